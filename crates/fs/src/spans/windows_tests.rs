//! A layer whose zTOC came without its checkpoint records: each read fetches the records of
//! its spans from the zTOC blob alongside the spans' bytes, and never uses a record that does
//! not match the index.

use std::io::Write;
use std::sync::Mutex;

use super::*;

/// A layer blob and its zTOC blob, recording the requests for each.
struct Source {
    layer: Vec<u8>,
    ztoc: Vec<u8>,
    layer_calls: Mutex<Vec<Range<u64>>>,
    ztoc_calls: Mutex<Vec<Range<u64>>>,
}

impl RangeReader for Source {
    fn read_range(&self, range: Range<u64>, _deadline: Instant) -> ReadFuture<'_, Bytes> {
        Box::pin(async move {
            self.layer_calls.lock().unwrap().push(range.clone());
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(Bytes::copy_from_slice(
                &self.layer[range.start as usize..range.end as usize],
            ))
        })
    }

    fn read_ztoc_range(&self, range: Range<u64>, _deadline: Instant) -> ReadFuture<'_, Bytes> {
        Box::pin(async move {
            self.ztoc_calls.lock().unwrap().push(range.clone());
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(Bytes::copy_from_slice(
                &self.ztoc[range.start as usize..range.end as usize],
            ))
        })
    }
}

/// A manager over a gzip layer whose zTOC is parsed from its skeleton; `flip` corrupts one
/// byte of the zTOC blob the reader serves. Returns the manager, source and the tar stream.
fn setup(flip: Option<usize>) -> (Arc<SpanManager>, Arc<Source>, Vec<u8>, tempfile::TempDir) {
    let mut b = tar::Builder::new(Vec::new());
    let data: Vec<u8> = (0..600_000usize)
        .map(|k| ((k * 7919) % 251) as u8 ^ (k >> 9) as u8)
        .collect();
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    b.append_data(&mut h, "f", data.as_slice()).unwrap();
    let plain = b.into_inner().unwrap();
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    e.write_all(&plain).unwrap();
    let layer = e.finish().unwrap();
    let opts = soci_ztoc::BuildOptions {
        span_size: 32768,
        ..Default::default()
    };
    let mut ztoc = soci_ztoc::build(layer.as_slice(), &opts)
        .unwrap()
        .to_bytes();
    let idx = soci_ztoc::WindowIndex::of(&ztoc).unwrap().unwrap();
    assert!(idx.records.len() >= 6, "{} records", idx.records.len());
    let [h, t] = idx.skeleton_ranges(ztoc.len() as u64).unwrap();
    let z = idx
        .ztoc_from_skeleton(
            ztoc.len() as u64,
            &ztoc[..h.end as usize],
            &ztoc[t.start as usize..],
        )
        .unwrap();
    let spans = soci_ztoc::Spans::with_window_index(&z, &idx).unwrap();
    if let Some(at) = flip {
        ztoc[idx.records_offset as usize + at] ^= 1;
    }
    let src = Arc::new(Source {
        layer,
        ztoc,
        layer_calls: Mutex::default(),
        ztoc_calls: Mutex::default(),
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = SpanConfig {
        read_ahead_spans: 0,
        ..SpanConfig::new(dir.path().join("c"), SpanCache::new(1 << 20, 0))
    };
    let m = SpanManager::new(
        "sha256:test".into(),
        spans,
        src.clone(),
        cfg,
        Arc::new(FsMetrics::default()),
    )
    .unwrap();
    (m, src, plain, dir)
}

const RECORD: u64 = 32785;

/// Uncompressed bytes from inside span `a` to inside span `b`.
fn inside(m: &SpanManager, a: usize, b: usize) -> Range<u64> {
    m.spans.span(a).unwrap().uncompressed.start + 10..m.spans.span(b).unwrap().uncompressed.end - 10
}

fn slice(plain: &[u8], r: &Range<u64>) -> Vec<u8> {
    plain[r.start as usize..r.end as usize].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_come_with_their_spans_in_one_request_each() {
    let (m, src, plain, _d) = setup(None);
    // Spans 1..=3: one request of the layer, one of their three records.
    let r = inside(&m, 1, 3);
    assert_eq!(m.read(r.clone()).await.unwrap(), slice(&plain, &r));
    let (layer, ztoc) = (
        src.layer_calls.lock().unwrap().clone(),
        src.ztoc_calls.lock().unwrap().clone(),
    );
    assert_eq!(layer.len(), 1, "{layer:?}");
    assert_eq!(ztoc.len(), 1, "{ztoc:?}");
    assert_eq!(ztoc[0].end - ztoc[0].start, 3 * RECORD, "{ztoc:?}");
    // Spans 0..=4: spans 0 and 4 are two runs, each with its own record.
    let r = inside(&m, 0, 4);
    assert_eq!(m.read(r.clone()).await.unwrap(), slice(&plain, &r));
    let ztoc = src.ztoc_calls.lock().unwrap().clone();
    assert_eq!(ztoc.len(), 3, "{ztoc:?}");
    assert!(
        ztoc[1..].iter().all(|c| c.end - c.start == RECORD),
        "{ztoc:?}"
    );
    // Everything, and nothing fetched twice once cached.
    assert_eq!(m.read(0..plain.len() as u64).await.unwrap(), plain);
    let n = src.ztoc_calls.lock().unwrap().len();
    assert_eq!(m.read(0..plain.len() as u64).await.unwrap(), plain);
    assert_eq!(src.ztoc_calls.lock().unwrap().len(), n);
}

#[tokio::test]
async fn a_record_that_does_not_match_is_never_used() {
    // A byte inside record 2's window.
    let (m, _src, plain, _d) = setup(Some(2 * RECORD as usize + 17 + 500));
    let bad = inside(&m, 2, 2);
    let e = m.read(bad.clone()).await.unwrap_err().to_string();
    assert!(e.contains("record 2 digest mismatch"), "{e}");
    assert_eq!(m.cached_count(), 0);
    // Spans whose records are intact still read.
    let good = inside(&m, 0, 0);
    assert_eq!(m.read(good.clone()).await.unwrap(), slice(&plain, &good));
    // And the bad one stays refused, no bytes served.
    assert!(m.read(bad).await.is_err());
}

#[tokio::test]
async fn a_bad_record_costs_only_its_own_spans() {
    // Records 1..=3 come in one request; record 2's window is corrupt.
    let (m, src, plain, _d) = setup(Some(2 * RECORD as usize + 17 + 500));
    assert!(m.read(inside(&m, 1, 3)).await.is_err());
    let n = src.ztoc_calls.lock().unwrap().len();
    // Spans 1 and 3 read at once from the records that matched: not refused, not refetched.
    for s in [1, 3] {
        let r = inside(&m, s, s);
        assert_eq!(
            m.read(r.clone()).await.unwrap(),
            slice(&plain, &r),
            "span {s}"
        );
    }
    assert_eq!(src.ztoc_calls.lock().unwrap().len(), n);
    // Span 2 stays refused (poisoned), no bytes served.
    let e = m.read(inside(&m, 2, 2)).await.unwrap_err().to_string();
    assert!(e.contains("failed verification"), "{e}");
}
