use super::*;
use std::sync::atomic::AtomicU32;
use std::sync::Mutex;
use tokio::time::Instant;

/// An in-memory blob that records requests and can corrupt, fail or stall responses.
#[derive(Default)]
struct FakeReader {
    blob: Vec<u8>,
    calls: Mutex<Vec<Range<u64>>>,
    corrupt: AtomicU32,
    /// Transport failures to return (the client's retries are over).
    fail: AtomicU32,
    /// Each call sleeps this long first.
    stall_ms: AtomicU64,
    /// No range support: only `read_whole`.
    whole_only: bool,
    /// Offset of a byte flipped in whole-blob reads.
    whole_flip: Option<usize>,
    whole_calls: AtomicU32,
    /// Every range read is corrupt until `discard` is called (bytes held ahead that are bad).
    bad_until_discarded: std::sync::atomic::AtomicBool,
    discards: AtomicU32,
}

impl RangeReader for FakeReader {
    fn read_range(&self, range: Range<u64>, _deadline: Instant) -> ReadFuture<'_, Bytes> {
        Box::pin(async move {
            self.calls.lock().unwrap().push(range.clone());
            let stall = self.stall_ms.load(Ordering::SeqCst).max(20);
            tokio::time::sleep(Duration::from_millis(stall)).await;
            if self.fail.load(Ordering::SeqCst) > 0 {
                self.fail.fetch_sub(1, Ordering::SeqCst);
                return Err(io::Error::other("connection reset (after client retries)"));
            }
            let mut data = self.blob[range.start as usize..range.end as usize].to_vec();
            if self.corrupt.load(Ordering::SeqCst) > 0 {
                self.corrupt.fetch_sub(1, Ordering::SeqCst);
                data[0] ^= 1;
            } else if self.bad_until_discarded.load(Ordering::SeqCst) {
                data[0] ^= 1;
            }
            Ok(Bytes::from(data))
        })
    }

    fn discard(&self, _range: Range<u64>) {
        self.discards.fetch_add(1, Ordering::SeqCst);
        self.bad_until_discarded.store(false, Ordering::SeqCst);
    }

    fn whole_only(&self) -> bool {
        self.whole_only
    }

    fn read_whole(&self, tx: mpsc::Sender<Bytes>) -> ReadFuture<'_, ()> {
        Box::pin(async move {
            self.whole_calls.fetch_add(1, Ordering::SeqCst);
            let mut blob = self.blob.clone();
            if let Some(i) = self.whole_flip {
                blob[i] ^= 0xff;
            }
            for c in blob.chunks(7_001) {
                tokio::time::sleep(Duration::from_millis(1)).await;
                tx.send(Bytes::copy_from_slice(c))
                    .await
                    .map_err(|_| io::Error::other("receiver gone"))?;
            }
            Ok(())
        })
    }
}

fn layer(gzip: bool) -> (Vec<u8>, soci_ztoc::Ztoc) {
    let mut b = tar::Builder::new(Vec::new());
    let mut x: u32 = 7;
    let data: Vec<u8> = (0..300_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    b.append_data(&mut h, "f", data.as_slice()).unwrap();
    let mut blob = b.into_inner().unwrap();
    if gzip {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&blob).unwrap();
        blob = e.finish().unwrap();
    }
    let opts = soci_ztoc::BuildOptions {
        span_size: 65536,
        ..Default::default()
    };
    let z = soci_ztoc::build(blob.as_slice(), &opts).unwrap();
    (blob, z)
}

type Setup = (
    Arc<SpanManager>,
    Arc<FakeReader>,
    Vec<u8>,
    tempfile::TempDir,
);

fn manager(corrupt: u32, retries: u32) -> Setup {
    manager_with(corrupt, retries, SpanCache::new(100_000, 0))
}

fn manager_with(corrupt: u32, retries: u32, cache: Arc<SpanCache>) -> Setup {
    build(
        false,
        FakeReader {
            corrupt: AtomicU32::new(corrupt),
            ..Default::default()
        },
        |c| {
            c.max_verification_retries = retries;
            c.cache = cache;
        },
    )
}

/// A manager over a fresh layer (tar or gzip) read through `reader` (its blob is set
/// here), with `tweak` applied to the config.
fn build(gzip: bool, mut reader: FakeReader, tweak: impl FnOnce(&mut SpanConfig)) -> Setup {
    let (blob, z) = layer(gzip);
    reader.blob = blob;
    let reader = Arc::new(reader);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = SpanConfig {
        cache_dir: dir.path().join("c"),
        disable_verification: false,
        max_verification_retries: 0,
        fetch_timeout: Duration::from_secs(5),
        poisoned_ttl: POISONED_SPAN_TTL,
        cache: SpanCache::new(100_000, 0),
        read_ahead_spans: 0,
    };
    tweak(&mut cfg);
    let m = SpanManager::new(
        "sha256:test".into(),
        z.spans().unwrap(),
        reader.clone(),
        cfg,
        Arc::new(FsMetrics::default()),
    )
    .unwrap();
    // The tar stream (what reads return) for gzip layers.
    let plain = if gzip {
        let mut out = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::GzDecoder::new(reader.blob.as_slice()),
            &mut out,
        )
        .unwrap();
        out
    } else {
        reader.blob.clone()
    };
    (m, reader, plain, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_share_one_coalesced_fetch() {
    let (m, reader, blob, _d) = manager(0, 0);
    // 512..200_000 touches four 64 KiB spans: one range request for all of them.
    let reads = (0..8).map(|_| {
        let m = m.clone();
        tokio::spawn(async move { m.read(512..200_000).await.unwrap() })
    });
    for r in reads {
        assert_eq!(r.await.unwrap(), &blob[512..200_000]);
    }
    let calls = reader.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(m.cached_count(), 4);
    // Served from the caches afterwards, memory or disk.
    assert_eq!(m.read(100..150_000).await.unwrap(), &blob[100..150_000]);
    assert_eq!(reader.calls.lock().unwrap().len(), 1);
    assert!(
        m.cfg.cache.memory_bytes() <= 100_000,
        "memory cache stays within its budget"
    );
    m.close();
    assert_eq!(
        m.cfg.cache.memory_bytes(),
        0,
        "a closed layer leaves nothing in memory"
    );
}

#[tokio::test]
async fn bad_span_is_refetched_then_eio() {
    let (m, reader, blob, _d) = manager(1, 1);
    assert_eq!(
        m.read(0..1000).await.unwrap(),
        &blob[0..1000],
        "one retry fixes one bad fetch"
    );
    assert_eq!(reader.calls.lock().unwrap().len(), 2);
    let (m, _reader, _blob, _d) = manager(5, 2);
    assert!(m.read(0..1000).await.is_err(), "never unverified bytes");
    assert_eq!(m.cached_count(), 0);
}

#[tokio::test]
async fn background_fill_caches_everything() {
    let (m, reader, blob, _d) = manager(0, 0);
    let slots = Arc::new(tokio::sync::Semaphore::new(1));
    let cfg = BackgroundConfig {
        delay: Duration::ZERO,
        period: Duration::ZERO,
        yield_to_demand: Duration::ZERO,
        slots,
    };
    m.clone().background_fill(cfg).await;
    assert_eq!(m.cached_count(), m.span_count());
    let n = reader.calls.lock().unwrap().len();
    assert_eq!(
        m.read(0..blob.len() as u64 - 2048).await.unwrap().len(),
        blob.len() - 2048
    );
    assert_eq!(
        reader.calls.lock().unwrap().len(),
        n,
        "no fetch after the fill"
    );
}

#[tokio::test]
async fn disk_budget_bounds_the_span_files_and_is_given_back() {
    let one_span = 64 * 1024;
    let disk = SpanCache::new(100_000, 2 * one_span);
    let (m, _reader, blob, d) = manager_with(0, 0, disk.clone());
    let all = 0..blob.len() as u64 - 2048;
    assert_eq!(m.read(all.clone()).await.unwrap().len(), all.end as usize);
    assert!(m.cached_count() <= 2 && m.cached_count() >= 1);
    assert!(disk.disk_bytes() <= 2 * one_span);
    let files: u64 = std::fs::read_dir(d.path().join("c"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert_eq!(files, disk.disk_bytes());
    // Spans that did not fit are still served (from memory or fetched again).
    assert_eq!(m.read(all.clone()).await.unwrap().len(), all.end as usize);
    // A background fill stops at the budget instead of fetching for nothing.
    let cfg = BackgroundConfig {
        delay: Duration::ZERO,
        period: Duration::ZERO,
        yield_to_demand: Duration::ZERO,
        slots: Arc::new(tokio::sync::Semaphore::new(1)),
    };
    m.clone().background_fill(cfg).await;
    assert!(m.cached_count() < m.span_count());
    m.remove_cache();
    assert_eq!(disk.disk_bytes(), 0);
    assert_eq!(m.cached_count(), 0);
}

#[tokio::test]
async fn a_verification_retry_never_gets_the_same_held_bytes_again() {
    // Bytes held ahead (a prefetch's range) that are bad: the retry must not be served them.
    let (m, reader, blob, _d) = build(
        false,
        FakeReader {
            bad_until_discarded: true.into(),
            ..Default::default()
        },
        |c| c.max_verification_retries = 1,
    );
    assert_eq!(m.read(0..1000).await.unwrap(), &blob[0..1000]);
    assert_eq!(reader.discards.load(Ordering::SeqCst), 1);
    assert_eq!(reader.calls.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn transport_failures_are_not_retried_by_the_span_manager() {
    // The registry client already retried; a second round here would double the time.
    let (m, reader, blob, _d) = build(
        false,
        FakeReader {
            fail: AtomicU32::new(1),
            ..Default::default()
        },
        |c| c.max_verification_retries = 3,
    );
    assert!(m.read(0..1000).await.is_err());
    assert_eq!(reader.calls.lock().unwrap().len(), 1);
    // The kernel's immediate retry of the page gets the same answer without a fetch.
    assert!(m.read(0..1000).await.is_err());
    assert_eq!(reader.calls.lock().unwrap().len(), 1);
    // Not remembered longer: a later read fetches again and succeeds.
    tokio::time::sleep(crate::cache::FAILED_FETCH_MEMO + Duration::from_millis(100)).await;
    assert_eq!(m.read(0..1000).await.unwrap(), &blob[0..1000]);
}

#[tokio::test]
async fn a_failed_background_fetch_does_not_fail_the_read_after_it() {
    // A read-ahead or prefetch that failed (a transient registry error) is not remembered: a
    // demand read right after it makes its own attempt instead of getting EIO.
    let (m, reader, blob, _d) = build(
        false,
        FakeReader {
            fail: AtomicU32::new(1),
            ..Default::default()
        },
        |_| {},
    );
    let report = m
        .prefetch(
            &[0..=0],
            1,
            tokio::time::Instant::now() + Duration::from_secs(5),
        )
        .await;
    assert_eq!(reader.calls.lock().unwrap().len(), 1, "{report:?}");
    assert_eq!(m.read(0..1000).await.unwrap(), &blob[0..1000]);
    assert_eq!(reader.calls.lock().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_deadline_covers_waiting_for_another_readers_fetch() {
    let (m, reader, _blob, _d) = build(
        false,
        FakeReader {
            stall_ms: AtomicU64::new(10_000),
            ..Default::default()
        },
        |c| c.fetch_timeout = Duration::from_millis(800),
    );
    let started = Instant::now();
    let a = tokio::spawn({
        let m = m.clone();
        async move { m.read(0..1000).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let b = tokio::spawn({
        let m = m.clone();
        async move { m.read(500..1500).await }
    });
    assert!(a.await.unwrap().is_err());
    assert!(b.await.unwrap().is_err());
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1200),
        "two readers of one stalled span took {took:?} (deadline 800 ms each)"
    );
    assert!(reader.calls.lock().unwrap().len() <= 2);
}

#[tokio::test]
async fn poisoned_span_is_refused_then_gets_one_fresh_try() {
    let (m, reader, blob, _d) = build(
        false,
        FakeReader {
            corrupt: AtomicU32::new(u32::MAX),
            ..Default::default()
        },
        |c| {
            c.max_verification_retries = 2;
            c.poisoned_ttl = Duration::from_millis(400);
        },
    );
    let calls = || reader.calls.lock().unwrap().len();
    assert!(m.read(0..1000).await.is_err());
    assert_eq!(calls(), 3, "first try and two verification retries");
    let started = Instant::now();
    assert!(m.read(0..1000).await.is_err());
    assert!(started.elapsed() < Duration::from_millis(15));
    assert_eq!(calls(), 3, "refused without fetching");
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert!(m.read(0..1000).await.is_err());
    assert_eq!(calls(), 4, "one fresh try after the refusal expires");
    assert!(m.read(0..1000).await.is_err());
    assert_eq!(calls(), 4, "refused again");
    tokio::time::sleep(Duration::from_millis(450)).await;
    reader.corrupt.store(0, Ordering::SeqCst);
    assert_eq!(m.read(0..1000).await.unwrap(), &blob[0..1000]);
    assert_eq!(m.read(0..1000).await.unwrap(), &blob[0..1000]);
    assert_eq!(calls(), 5);
}

#[tokio::test]
async fn bytes_past_the_end_of_the_layer_are_eio_not_short_data() {
    let (m, _reader, blob, _d) = manager(0, 0);
    let end = blob.len() as u64;
    let err = m.read(end - 100..end + 4096).await.unwrap_err();
    assert!(err.to_string().contains("past the end"), "{err}");
    assert!(m.read(end + 10..end + 20).await.is_err());
    assert_eq!(
        m.read(end - 100..end).await.unwrap(),
        &blob[blob.len() - 100..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_without_ranges_is_read_whole_once() {
    for gzip in [false, true] {
        let (m, reader, plain, _d) = build(
            gzip,
            FakeReader {
                whole_only: true,
                ..Default::default()
            },
            |_| {},
        );
        let reads = [
            0..1000u64,
            70_000..200_000,
            250_000..plain.len() as u64 - 10,
        ];
        let tasks: Vec<_> = reads
            .iter()
            .cloned()
            .map(|r| {
                let m = m.clone();
                tokio::spawn(async move { (r.clone(), m.read(r).await.unwrap()) })
            })
            .collect();
        for t in tasks {
            let (r, got) = t.await.unwrap();
            assert_eq!(got, &plain[r.start as usize..r.end as usize], "gzip {gzip}");
        }
        assert_eq!(reader.whole_calls.load(Ordering::SeqCst), 1, "gzip {gzip}");
        assert!(reader.calls.lock().unwrap().is_empty());
        assert_eq!(m.cached_count(), m.span_count());
    }
}

#[tokio::test]
async fn whole_blob_with_a_bad_span_serves_the_others() {
    let (m, reader, plain, _d) = build(
        false,
        FakeReader {
            whole_only: true,
            whole_flip: Some(140_000),
            ..Default::default()
        },
        |_| {},
    );
    assert_eq!(m.read(0..1000).await.unwrap(), &plain[0..1000]);
    assert!(
        m.read(131_072..131_100).await.is_err(),
        "never unverified bytes"
    );
    assert_eq!(
        m.read(200_000..200_100).await.unwrap(),
        &plain[200_000..200_100]
    );
    assert_eq!(reader.whole_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_succeed_while_a_tiny_cache_evicts_their_spans() {
    // Memory holds about one span, nothing fits on disk: concurrent reads evict each other's
    // spans between the fetch and the copy. Each read keeps the buffers it fetched.
    for memory in [70_000usize, 1_000] {
        let (m, _reader, blob, _d) = build(false, FakeReader::default(), |c| {
            c.cache = SpanCache::new(memory, 1);
        });
        let tasks: Vec<_> = (0..24u64)
            .map(|i| {
                let m = m.clone();
                let start = (i * 12_345) % 150_000;
                let r = start..start + 120_000;
                tokio::spawn(async move { (r.clone(), m.read(r).await) })
            })
            .collect();
        for t in tasks {
            let (r, got) = t.await.unwrap();
            let got = got.unwrap_or_else(|e| panic!("memory {memory}: read {r:?}: {e}"));
            assert_eq!(got, &blob[r.start as usize..r.end as usize]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_ahead_fetches_the_files_next_spans_in_one_request() {
    let (m, reader, blob, _d) = build(false, FakeReader::default(), |c| c.read_ahead_spans = 3);
    let file = 512..300_512u64;
    let span = |id: usize| m.spans.span(id).unwrap().compressed;
    // The layer's first fetch only reads (no read-ahead before ranges are known to work).
    assert_eq!(
        m.read_in_file(600..700, file.clone()).await.unwrap(),
        &blob[600..700]
    );
    assert_eq!(reader.calls.lock().unwrap().clone(), vec![span(0)]);
    // Span 1 is read; spans 2..5 come in one request, in parallel.
    let r = 70_000..70_100u64;
    assert_eq!(
        m.read_in_file(r.clone(), file.clone()).await.unwrap(),
        &blob[70_000..70_100]
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut calls = reader.calls.lock().unwrap().clone();
    calls.sort_by_key(|c| c.start);
    assert_eq!(calls, vec![span(0), span(1), span(2).start..span(4).end]);
    assert_eq!(m.cached_count(), 5);
    // Within the file only: the last span read ahead stops at the file's end.
    let before = reader.calls.lock().unwrap().len();
    let tail = file.end - 10..file.end;
    m.read_in_file(tail, file.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(reader.calls.lock().unwrap().len() <= before + 1);
    // Off: nothing but the read.
    let (m, reader, _blob, _d) = build(false, FakeReader::default(), |c| c.read_ahead_spans = 0);
    m.read_in_file(600..700, file.clone()).await.unwrap();
    m.read_in_file(70_000..70_100, file).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(reader.calls.lock().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decompression_stays_within_the_daemon_wide_decode_budget() {
    // A 1 MiB budget holds one 64 KiB span's decode at a time: concurrent reads of different
    // spans wait for each other instead of all holding their spans at once.
    let cache = SpanCache::with_decode_budget(1 << 20, 0, 1);
    let (m, _reader, blob, _d) = build(false, FakeReader::default(), |c| {
        c.cache = cache.clone();
    });
    let span = 65_536u64;
    let tasks: Vec<_> = (0..4u64)
        .map(|i| {
            let m = m.clone();
            let r = i * span + 100..i * span + 200;
            tokio::spawn(async move { (r.clone(), m.read(r).await) })
        })
        .collect();
    for t in tasks {
        let (r, got) = t.await.unwrap();
        assert_eq!(got.unwrap(), &blob[r.start as usize..r.end as usize]);
    }
    let peak = cache.decoding_peak_bytes();
    assert!(peak > 0 && peak <= span + 1024, "decoded at once: {peak}");
}

/// A read of spans held on disk reads just its bytes from the span files: nothing is loaded
/// whole into memory, nothing fetched; a span file removed meanwhile is fetched again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_spans_are_read_by_the_slice() {
    let cache = SpanCache::new(100_000, 0);
    let (m, reader, blob, d) = manager_with(0, 0, cache.clone());
    let all = 0..blob.len() as u64 - 2048;
    assert_eq!(m.read(all.clone()).await.unwrap(), blob[..all.end as usize]);
    let fetches = reader.calls.lock().unwrap().len();
    m.cache.forget_memory();
    assert_eq!(cache.memory_bytes(), 0);
    // 8 KiB across the boundary of spans 1 and 2 (64 KiB spans), and 4 KiB inside span 3.
    for r in [(128 << 10) - 4096..(128 << 10) + 4096, 200_000..204_096] {
        let got = m.read(r.clone()).await.unwrap();
        assert_eq!(got, blob[r.start as usize..r.end as usize]);
    }
    assert_eq!(cache.memory_bytes(), 0, "no span loaded whole into memory");
    assert_eq!(
        reader.calls.lock().unwrap().len(),
        fetches,
        "nothing fetched"
    );
    // A span file gone (removed by hand): the full path fetches it again.
    m.cache.forget_memory();
    std::fs::remove_file(d.path().join("c").join("3")).unwrap();
    let r = 200_000..204_096;
    assert_eq!(m.read(r.clone()).await.unwrap(), blob[200_000..204_096]);
    assert!(reader.calls.lock().unwrap().len() > fetches);
}
