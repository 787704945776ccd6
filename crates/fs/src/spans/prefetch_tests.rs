use super::*;

use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::Duration;

use bytes::Bytes;

use crate::spans::{FsMetrics, RangeReader, ReadFuture, SpanCache, SpanConfig};

/// An in-memory blob recording its range requests; can fail or stall them.
#[derive(Default)]
struct Fake {
    blob: Vec<u8>,
    calls: Mutex<Vec<Range<u64>>>,
    fail: AtomicU32,
    stall_ms: AtomicU64,
    /// A range already being fetched (as discovery's early prefetch does) until the gate
    /// opens: reading all of it waits for the gate, parts of it are there at once.
    ahead: Mutex<Option<(Range<u64>, tokio::sync::watch::Receiver<bool>)>>,
}

impl Fake {
    fn ahead_gate(&self, range: &Range<u64>) -> Option<tokio::sync::watch::Receiver<bool>> {
        match &*self.ahead.lock().unwrap() {
            Some((r, gate)) if r.start <= range.start && range.end <= r.end => Some(gate.clone()),
            _ => None,
        }
    }
}

impl RangeReader for Fake {
    fn read_range(&self, range: Range<u64>, _deadline: Instant) -> ReadFuture<'_, Bytes> {
        Box::pin(async move {
            self.calls.lock().unwrap().push(range.clone());
            if let Some(mut gate) = self.ahead_gate(&range) {
                let whole = self.ahead.lock().unwrap().as_ref().map(|(r, _)| r.clone());
                if whole.as_ref() == Some(&range) {
                    let _ = gate.wait_for(|open| *open).await;
                }
            }
            let ms = self.stall_ms.load(Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            if self.fail.load(Ordering::SeqCst) > 0 {
                return Err(io::Error::other("connection reset"));
            }
            Ok(Bytes::copy_from_slice(
                &self.blob[range.start as usize..range.end as usize],
            ))
        })
    }

    fn settled(&self, range: Range<u64>, _deadline: Instant) -> ReadFuture<'_, ()> {
        Box::pin(async move {
            if let Some(mut gate) = self.ahead_gate(&range) {
                let _ = gate.wait_for(|open| *open).await;
            }
            Ok(())
        })
    }
}

/// An uncompressed tar layer with one `size`-byte file, spans of `span` bytes.
fn manager(size: usize, span: u64, fake: Fake) -> (Arc<SpanManager>, Arc<Fake>, tempfile::TempDir) {
    manager_with(size, span, fake, 0)
}

/// [`manager`] with `read_ahead_spans`.
fn manager_with(
    size: usize,
    span: u64,
    fake: Fake,
    read_ahead_spans: usize,
) -> (Arc<SpanManager>, Arc<Fake>, tempfile::TempDir) {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(size as u64);
    h.set_mode(0o644);
    let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    b.append_data(&mut h, "f", data.as_slice()).unwrap();
    let blob = b.into_inner().unwrap();
    let opts = soci_ztoc::BuildOptions {
        span_size: span,
        algorithm: Some(soci_ztoc::CompressionAlgorithm::Uncompressed),
        ..Default::default()
    };
    let z = soci_ztoc::build(blob.as_slice(), &opts).unwrap();
    let fake = Arc::new(Fake { blob, ..fake });
    let dir = tempfile::tempdir().unwrap();
    let cfg = SpanConfig {
        cache_dir: dir.path().join("c"),
        disable_verification: false,
        max_verification_retries: 0,
        fetch_timeout: Duration::from_secs(5),
        poisoned_ttl: crate::spans::POISONED_SPAN_TTL,
        cache: SpanCache::new(1 << 20, 0),
        read_ahead_spans,
    };
    let m = SpanManager::new(
        "sha256:layer".into(),
        z.spans().unwrap(),
        fake.clone(),
        cfg,
        Arc::new(FsMetrics::default()),
    )
    .unwrap();
    (m, fake, dir)
}

#[tokio::test]
async fn a_read_during_a_prefetch_of_bytes_fetched_ahead_is_not_queued_behind_it() {
    let (m, fake, _d) = manager(1 << 20, 65536, Fake::default());
    let (open, gate) = tokio::sync::watch::channel(false);
    let run = m.spans.run(0..6).unwrap().compressed;
    *fake.ahead.lock().unwrap() = Some((run.clone(), gate));
    let deadline = Instant::now() + Duration::from_secs(10);
    let pf = {
        let m = m.clone();
        tokio::spawn(async move { m.prefetch(&[0..=5], 4, deadline).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The prefetch waits for the bytes fetched ahead without holding span 3: a read of it
    // takes its part now (with the locks taken first, it waited for the whole range).
    let span3 = m.spans.span(3).unwrap().uncompressed;
    let got = tokio::time::timeout(Duration::from_secs(2), m.read(span3.clone()))
        .await
        .expect("the read waited behind the prefetch")
        .unwrap();
    assert_eq!(got, &fake.blob[span3.start as usize..span3.end as usize]);
    assert!(!pf.is_finished());
    open.send(true).unwrap();
    let r = pf.await.unwrap();
    assert!(r.error.is_none() && !r.timed_out, "{r:?}");
    // Everything is local now, span 3 fetched once.
    assert!(m.is_local(0..span3.end));
    let calls = fake.calls.lock().unwrap().clone();
    let span3c = m.spans.span(3).unwrap().compressed;
    assert_eq!(
        calls
            .iter()
            .filter(|c| c.start <= span3c.start && span3c.end <= c.end)
            .count(),
        1,
        "{calls:?}"
    );
}

#[tokio::test]
async fn requests_go_out_in_the_order_the_artifact_names_their_spans() {
    let (m, fake, _d) = manager(1 << 20, 65536, Fake::default());
    // First read: span 9, then 2, then 12 and 13; 3 comes last but joins 2's request.
    let ranges = [9..=9, 2..=2, 12..=13, 5..=5, 3..=3];
    let (runs, _) = m.prefetch_requests(&ranges);
    assert_eq!(runs, vec![9..10, 2..4, 12..14, 5..6]);
    // One request at a time: the registry sees them in that order.
    let deadline = Instant::now() + Duration::from_secs(5);
    let r = m.prefetch(&ranges, 1, deadline).await;
    assert_eq!((r.requests, r.spans), (4, 6), "{r:?}");
    let starts: Vec<u64> = fake
        .calls
        .lock()
        .unwrap()
        .iter()
        .map(|c| c.start / 65536)
        .collect();
    assert_eq!(starts, vec![9, 2, 12, 5]);
}

#[tokio::test]
async fn adjacent_ranges_are_one_request_and_reads_then_hit_the_cache() {
    // 1 MiB file, 64 KiB spans: 17 spans (header + data + tar end).
    let (m, fake, _d) = manager(1 << 20, 65536, Fake::default());
    let n = m.span_count();
    assert!(n >= 17, "{n}");
    let (runs, cached) = m.prefetch_requests(&[
        4..=5,
        0..=1,
        2..=3,
        9..=9,
        8..=8,
        RangeInclusive::new(12, 11),
        99..=120,
    ]);
    assert_eq!(
        runs,
        vec![0..6, 8..10],
        "merged, sorted, empty and out-of-layer dropped"
    );
    assert_eq!(cached, 0);

    let deadline = Instant::now() + Duration::from_secs(5);
    let r = m.prefetch(&[0..=1, 2..=5, 8..=9], 4, deadline).await;
    assert_eq!(r.spans, 8, "{r:?}");
    assert_eq!(r.requests, 2, "{r:?}");
    assert_eq!(r.bytes, 8 * 65536);
    assert!(r.error.is_none() && !r.timed_out, "{r:?}");
    let calls = fake.calls.lock().unwrap().clone();
    assert_eq!(calls, vec![0..6 * 65536, 8 * 65536..10 * 65536]);
    // The spans are verified and cached like any: reads need no request.
    let got = m.read(100..6 * 65536).await.unwrap();
    assert_eq!(got, &fake.blob[100..6 * 65536]);
    assert_eq!(fake.calls.lock().unwrap().len(), 2);
    // A second prefetch finds everything cached.
    let r = m.prefetch(&[0..=5], 4, deadline).await;
    assert_eq!((r.spans, r.requests, r.cached), (0, 0, 6), "{r:?}");
    // Cached spans split a run in two.
    let (runs, cached) = m.prefetch_requests(&[4..=12]);
    assert_eq!((runs, cached), (vec![6..8, 10..13], 4));
}

#[tokio::test]
async fn long_runs_are_cut_at_the_request_limit() {
    // 40 MiB in 1 MiB spans: one run of 41 spans becomes two requests.
    let (m, _fake, _d) = manager(40 << 20, 1 << 20, Fake::default());
    let n = m.span_count();
    let (runs, _) = m.prefetch_requests(&[0..=n - 1]);
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_eq!(runs[0], 0..32);
    assert_eq!(runs[1], 32..n);
}

#[tokio::test]
async fn failures_and_deadlines_end_in_a_report_not_an_error() {
    let fake = Fake {
        fail: AtomicU32::new(1),
        ..Default::default()
    };
    let (m, _fake, _d) = manager(1 << 20, 65536, fake);
    let r = m
        .prefetch(&[0..=1, 4..=4], 2, Instant::now() + Duration::from_secs(5))
        .await;
    assert_eq!(r.spans, 0);
    assert_eq!(r.requests, 2);
    assert!(
        r.error.as_deref().unwrap().contains("sha256:layer"),
        "{r:?}"
    );

    let fake = Fake {
        stall_ms: AtomicU64::new(10_000),
        ..Default::default()
    };
    let (m, _fake, _d) = manager(1 << 20, 65536, fake);
    let t = std::time::Instant::now();
    let r = m
        .prefetch(
            &[0..=1, 4..=4, 8..=8],
            2,
            Instant::now() + Duration::from_millis(300),
        )
        .await;
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(r.timed_out, "{r:?}");
    assert_eq!(r.spans, 0);
    assert_eq!(m.cached_count(), 0);
}

#[tokio::test]
async fn runs_are_cut_at_the_decode_limit_too() {
    // 160 MiB of numbered lines gzip to well under the 32 MiB request limit, so that limit
    // alone would make one run that inflates to 160 MiB in one go.
    let size = 160usize << 20;
    let mut text = Vec::with_capacity(size);
    let mut i = 0u64;
    while text.len() < size {
        text.extend_from_slice(format!("line {i} of a very compressible file\n").as_bytes());
        i += 1;
    }
    text.truncate(size);
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(size as u64);
    h.set_mode(0o644);
    b.append_data(&mut h, "lines", text.as_slice()).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &b.into_inner().unwrap()).unwrap();
    let blob = gz.finish().unwrap();
    let opts = soci_ztoc::BuildOptions {
        span_size: 16 << 20,
        ..Default::default()
    };
    let z = soci_ztoc::build(blob.as_slice(), &opts).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = SpanConfig::new(dir.path().join("c"), SpanCache::new(1 << 20, 0));
    let m = SpanManager::new(
        "sha256:lines".into(),
        z.spans().unwrap(),
        Arc::new(Fake {
            blob,
            ..Default::default()
        }),
        cfg,
        Arc::new(FsMetrics::default()),
    )
    .unwrap();
    let n = m.span_count();
    let sizes: Vec<_> = (0..n).map(|i| m.uncompressed_len(i..i + 1)).collect();
    assert!(
        n >= 9,
        "{n} spans: {sizes:?} blob {}",
        z.compressed_archive_size
    );
    let (runs, _) = m.prefetch_requests(&[0..=n - 1]);
    assert!(runs.len() >= 3, "{runs:?}");
    for r in &runs {
        let plain = m.uncompressed_len(r.clone());
        assert!(plain <= MAX_PREFETCH_DECODE_BYTES, "{r:?}: {plain} bytes");
    }
    assert_eq!(runs.first().map(|r| r.start), Some(0));
    assert_eq!(runs.last().map(|r| r.end), Some(n));
}

#[tokio::test]
async fn reads_of_prefetched_spans_start_no_read_ahead() {
    // 1 MiB file at tar offset 512, 64 KiB spans, read-ahead of 4 spans.
    let (m, fake, _d) = manager_with(1 << 20, 65536, Fake::default(), 4);
    let file = 512..512 + (1 << 20);
    let deadline = Instant::now() + Duration::from_secs(5);
    let r = m.prefetch(&[0..=2], 4, deadline).await;
    assert_eq!((r.spans, r.requests), (3, 1), "{r:?}");
    // A read inside the prefetched spans: served locally, nothing fetched past them.
    let got = m.read_in_file(70_000..140_000, file.clone()).await.unwrap();
    assert_eq!(got, &fake.blob[70_000..140_000]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake.calls.lock().unwrap().len(), 1);
    // A cold read elsewhere in the file still reads ahead.
    m.read_in_file(5 * 65536..5 * 65536 + 10, file)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let calls = fake.calls.lock().unwrap().clone();
    assert!(calls.len() >= 3, "{calls:?}");
    assert!(calls.iter().any(|c| c.start == 6 * 65536), "{calls:?}");
}
