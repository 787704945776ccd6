//! A zTOC fetched as its skeleton plus records on demand (`WindowIndex`) serves the same
//! bytes as the whole zTOC, and refuses every byte that does not match the index.

use std::io::Write;

use flate2::{write::GzEncoder, Compression};
use soci_ztoc::{build, BuildOptions, Spans, WindowIndex, Ztoc};

/// A gzip layer of several spans (64 KiB spans, 600 KiB of poorly compressible data).
fn layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (i, n) in [200_000usize, 5, 400_000].into_iter().enumerate() {
        let data: Vec<u8> = (0..n)
            .map(|k| ((k * 7919 + i * 13) % 251) as u8 ^ (k >> 9) as u8)
            .collect();
        let mut h = tar::Header::new_gnu();
        h.set_size(n as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, format!("f{i}"), data.as_slice())
            .unwrap();
    }
    let tar = b.into_inner().unwrap();
    let mut e = GzEncoder::new(Vec::new(), Compression::new(6));
    e.write_all(&tar).unwrap();
    e.finish().unwrap()
}

struct Split {
    blob: Vec<u8>,
    ztoc: Vec<u8>,
    idx: WindowIndex,
}

fn split() -> Split {
    let blob = layer();
    let opts = BuildOptions {
        span_size: 64 << 10,
        ..Default::default()
    };
    let ztoc = build(blob.as_slice(), &opts).unwrap().to_bytes();
    let idx = WindowIndex::of(&ztoc)
        .unwrap()
        .expect("gzip v2 zTOC has an index");
    Split { blob, ztoc, idx }
}

fn skeleton(s: &Split) -> (Vec<u8>, Vec<u8>) {
    let [h, t] = s.idx.skeleton_ranges(s.ztoc.len() as u64).unwrap();
    (
        s.ztoc[h.start as usize..h.end as usize].to_vec(),
        s.ztoc[t.start as usize..t.end as usize].to_vec(),
    )
}

fn lazy_spans(s: &Split) -> (Ztoc, Spans) {
    let (head, tail) = skeleton(s);
    let z = s
        .idx
        .ztoc_from_skeleton(s.ztoc.len() as u64, &head, &tail)
        .unwrap();
    let spans = Spans::with_window_index(&z, &s.idx).unwrap();
    (z, spans)
}

#[test]
fn skeleton_and_records_serve_what_the_whole_ztoc_serves() {
    let s = split();
    assert!(s.idx.records.len() >= 5, "several spans");
    let [h, t] = s.idx.skeleton_ranges(s.ztoc.len() as u64).unwrap();
    let skeleton_bytes = h.end + (t.end - t.start);
    assert!(
        skeleton_bytes * 10 < s.ztoc.len() as u64,
        "skeleton {skeleton_bytes} of {} bytes",
        s.ztoc.len()
    );
    // The index survives its binary form.
    assert_eq!(WindowIndex::decode(&s.idx.encode()).unwrap(), s.idx);

    let whole = Ztoc::from_bytes(&s.ztoc).unwrap();
    let full = whole.spans().unwrap();
    let (z, spans) = lazy_spans(&s);
    assert_eq!(z.entries, whole.entries);
    assert_eq!(spans.len(), full.len());
    // Nothing decodes before its window is there.
    let r0 = spans.span(0).unwrap().compressed;
    let data0 = &s.blob[r0.start as usize..r0.end as usize];
    assert!(spans.decode_span(0, data0, r0.start, true).is_err());
    // Windows come in any order, some twice.
    for ids in [3..5, 0..2, 1..4, 5..spans.len(), 0..spans.len()] {
        if let Some(range) = spans.windows_missing(ids.clone()) {
            let data = &s.ztoc[range.start as usize..range.end as usize];
            spans.load_windows(range.start, data).unwrap();
        }
        assert!(spans.windows_missing(ids).is_none());
    }
    for id in 0..spans.len() {
        let r = spans.span(id).unwrap().compressed;
        let data = &s.blob[r.start as usize..r.end as usize];
        assert_eq!(
            spans.decode_span(id, data, r.start, true).unwrap(),
            full.decode_span(id, data, r.start, true).unwrap(),
            "span {id}"
        );
    }
    // A clone shares the loaded windows.
    assert!(spans.clone().windows_missing(0..spans.len()).is_none());
}

#[test]
fn bytes_that_do_not_match_the_index_are_refused() {
    let s = split();
    let (head, tail) = skeleton(&s);
    let size = s.ztoc.len() as u64;
    // Skeleton: one flipped bit anywhere, or parts of the wrong size.
    let mut h2 = head.clone();
    h2[head.len() / 2] ^= 1;
    let e = s.idx.ztoc_from_skeleton(size, &h2, &tail).unwrap_err();
    assert!(e.to_string().contains("skeleton digest mismatch"), "{e}");
    let mut t2 = tail.clone();
    t2[0] ^= 0x80;
    assert!(s.idx.ztoc_from_skeleton(size, &head, &t2).is_err());
    assert!(s.idx.ztoc_from_skeleton(size, &head[1..], &tail).is_err());
    assert!(s.idx.ztoc_from_skeleton(size + 1, &head, &tail).is_err());
    // An index whose records sit elsewhere than the zTOC's checkpoints.
    let mut moved = s.idx.clone();
    moved.records_offset -= 1;
    let [mh, mt] = moved.skeleton_ranges(size).unwrap();
    let (a, b) = (
        &s.ztoc[..mh.end as usize],
        &s.ztoc[mt.start as usize..mt.end as usize],
    );
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    sha2::Digest::update(&mut hasher, a);
    sha2::Digest::update(&mut hasher, b);
    moved.skeleton = sha2::Digest::finalize(hasher).into();
    let e = moved.ztoc_from_skeleton(size, a, b).unwrap_err();
    assert!(e.to_string().contains("the index says records"), "{e}");
    // Offsets that disagree with the header's count or are out of order.
    let z = s.idx.ztoc_from_skeleton(size, &head, &tail).unwrap();
    let mut fewer = s.idx.clone();
    fewer.records.pop();
    assert!(Spans::with_window_index(&z, &fewer).is_err());
    let mut disorder = s.idx.clone();
    disorder.records.swap(1, 2);
    assert!(Spans::with_window_index(&z, &disorder).is_err());
    let mut huge = s.idx.clone();
    huge.records[1].0.bits = 9;
    assert!(Spans::with_window_index(&z, &huge).is_err());

    // Records: a flipped window byte, a record that is not at a record boundary, records
    // whose digest matches a lying index's offsets.
    let spans = Spans::with_window_index(&z, &s.idx).unwrap();
    let r = s.idx.records_range();
    let rec = 32785usize;
    let first = r.start as usize + rec;
    let mut bad = s.ztoc[first..first + rec].to_vec();
    bad[rec - 1] ^= 1;
    let e = spans.load_windows(first as u64, &bad).unwrap_err();
    assert!(e.to_string().contains("record 1 digest mismatch"), "{e}");
    assert!(spans
        .load_windows(first as u64 + 1, &s.ztoc[first + 1..first + 1 + rec])
        .is_err());
    assert!(spans
        .load_windows(first as u64, &s.ztoc[first..first + rec - 1])
        .is_err());
    assert!(spans
        .load_windows(r.end, &s.ztoc[first..first + rec])
        .is_err());
    let mut liar = s.idx.clone();
    liar.records[1].0.uncompressed_offset += 1;
    liar.records[1].1 = sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(
        &s.ztoc[first..first + rec],
    ))
    .into();
    let lz = Spans::with_window_index(&z, &liar).unwrap();
    let e = lz
        .load_windows(first as u64, &s.ztoc[first..first + rec])
        .unwrap_err();
    assert!(e.to_string().contains("differs from the index"), "{e}");
    // Nothing refused was kept.
    assert_eq!(
        spans.windows_missing(1..2),
        Some(first as u64..(first + rec) as u64)
    );
}

#[test]
fn malformed_index_bytes_are_errors() {
    let s = split();
    let enc = s.idx.encode();
    for bad in [
        Vec::new(),
        enc[..43].to_vec(),
        enc[..enc.len() - 1].to_vec(),
        [enc.clone(), vec![0]].concat(),
        {
            let mut b = enc.clone();
            b[40..44].copy_from_slice(&u32::MAX.to_le_bytes());
            b
        },
        {
            let mut b = enc[..44].to_vec();
            b[40..44].copy_from_slice(&0u32.to_le_bytes());
            b
        },
    ] {
        assert!(WindowIndex::decode(&bad).is_err());
    }
    // Records past the zTOC's end, or where the end overflows.
    let mut far = s.idx.clone();
    far.records_offset = u64::MAX / 2;
    assert!(far.skeleton_ranges(s.ztoc.len() as u64).is_none());
    let mut wrap = s.idx.clone();
    wrap.records_offset = u64::MAX - 5;
    assert!(wrap.skeleton_ranges(s.ztoc.len() as u64).is_none());
    assert!(wrap.records_range().is_empty());
    // A span table made with such an index (skipping the skeleton's checks) names no records
    // to fetch and decodes nothing.
    let (head, tail) = skeleton(&s);
    let z = s
        .idx
        .ztoc_from_skeleton(s.ztoc.len() as u64, &head, &tail)
        .unwrap();
    let spans = Spans::with_window_index(&z, &wrap).unwrap();
    assert_eq!(spans.windows_missing(0..spans.len()), None);
    assert!(spans.load_windows(0, &[]).is_err());
    assert!(far
        .ztoc_from_skeleton(s.ztoc.len() as u64, &head, &tail)
        .is_err());
}

#[test]
fn uncompressed_layers_have_no_index() {
    let blob = {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        b.append_data(&mut h, "a", &b"abc"[..]).unwrap();
        b.into_inner().unwrap()
    };
    let z = build(blob.as_slice(), &BuildOptions::default()).unwrap();
    assert_eq!(WindowIndex::of(&z.to_bytes()).unwrap(), None);
}
