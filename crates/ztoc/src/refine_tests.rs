use std::io::Write;

use flate2::{write::GzEncoder, Compression};

use super::*;
use crate::{build, build_with_checkpoints, read_uncompressed, BuildOptions, EntryKind, Ztoc};

/// Compressible but varied bytes (many deflate blocks per MiB).
fn text(n: usize, seed: u64) -> Vec<u8> {
    let words = [
        "import ",
        "def ",
        "return ",
        "self",
        ".append(",
        "class ",
        "\n    ",
        "None",
        "for ",
        " in ",
        "range(",
        "):",
        "lambda ",
        "yield ",
        "# comment ",
        "0x",
        "raise ",
    ];
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let mut out = Vec::with_capacity(n + 16);
    while out.len() < n {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let w = words[(x >> 33) as usize % words.len()];
        out.extend_from_slice(w.as_bytes());
        // Some noise: deflate blocks of tens of KiB, as in real code and binaries.
        out.extend_from_slice(&x.to_le_bytes()[..(x >> 60) as usize % 4]);
        if (x >> 20).is_multiple_of(7) {
            out.extend_from_slice(format!("{}", x % 100_000).as_bytes());
        }
    }
    out.truncate(n);
    out
}

/// A gzip layer of 40 files of 150 KiB (6 MiB) and the tar bytes.
fn layer() -> (Vec<u8>, Vec<u8>) {
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..40u64 {
        let data = text(150 << 10, i);
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, format!("lib/m{i:02}.py"), data.as_slice())
            .unwrap();
    }
    let t = b.into_inner().unwrap();
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(&t).unwrap();
    (gz.finish().unwrap(), t)
}

const SPAN: u64 = 2 << 20;

fn opts() -> BuildOptions {
    BuildOptions {
        span_size: SPAN,
        ..Default::default()
    }
}

fn all_boundaries(blob: &[u8]) -> Vec<(u64, u64)> {
    let mut idx = GzipIndexer::new(blob, SPAN).unwrap();
    idx.scan = Some(BoundaryScan::new(Vec::new()));
    std::io::copy(&mut idx, &mut std::io::sink()).unwrap();
    idx.into_scan().unwrap().0.all
}

fn file_range(z: &Ztoc, name: &str) -> Range<u64> {
    let e = z
        .entries
        .iter()
        .find(|e| e.name == name.as_bytes())
        .unwrap();
    e.offset..e.offset + e.size
}

#[test]
fn no_cut_points_build_is_byte_identical() {
    let (blob, _) = layer();
    let plain = build_with_checkpoints(blob.as_slice(), &opts(), &[]).unwrap();
    let default = build(blob.as_slice(), &opts()).unwrap();
    assert_eq!(plain.to_bytes(), default.to_bytes());
    // A plan without hot ranges adds nothing.
    let plan = plan_cuts(blob.as_slice(), SPAN, &[], &CutPolicy::default()).unwrap();
    assert!(plan.checkpoints.is_empty() && plan.hot.is_empty());
    assert_eq!(plan.regular, plain.span_count());
}

#[test]
fn cut_points_isolate_hot_files_at_block_boundaries() {
    let (blob, tar_bytes) = layer();
    let plain = build(blob.as_slice(), &opts()).unwrap();
    // Two far-apart hot files and two neighbours (merged: no gap between them).
    let hot: Vec<Range<u64>> = ["lib/m03.py", "lib/m20.py", "lib/m21.py"]
        .iter()
        .map(|n| file_range(&plain, n))
        .collect();
    let plan = plan_cuts(blob.as_slice(), SPAN, &hot, &CutPolicy::default()).unwrap();
    assert_eq!(plan.hot.len(), 2, "{plan:?}");
    assert!(!plan.checkpoints.is_empty());
    let refined = build_with_checkpoints(blob.as_slice(), &opts(), &plan.checkpoints).unwrap();
    // Same TOC, more checkpoints, every cut one of them.
    assert_eq!(refined.entries, plain.entries);
    assert_eq!(
        refined.span_count(),
        plain.span_count() + plan.checkpoints.len()
    );
    let spans = refined.spans().unwrap();
    let bounds = all_boundaries(&blob);
    for h in &hot {
        let seg = plan.hot.iter().find(|g| g.contains(&h.start)).unwrap();
        assert!(seg.start <= h.start && seg.end >= h.end, "{h:?} in {seg:?}");
    }
    for seg in &plan.hot {
        // A segment starts at a block boundary, where its span starts (or a checkpoint less
        // than a checkpoint's cost before it is kept instead).
        let at = *bounds.iter().find(|b| b.1 == seg.start).unwrap();
        let s = spans.span(spans.span_of(seg.start)).unwrap();
        assert!(
            s.uncompressed.start == at.1
                || (s.uncompressed.start < at.1
                    && at.0 - s.compressed.start <= CHECKPOINT_COST + 1),
            "segment {seg:?}: span {s:?}, boundary {at:?}"
        );
        // ... and ends at a block boundary, where its last span ends (or within the cost).
        let end = *bounds.iter().find(|b| b.1 == seg.end).unwrap();
        let last = spans.span(spans.span_of(seg.end - 1)).unwrap();
        assert!(
            last.uncompressed.end == end.1
                || (last.uncompressed.end > end.1
                    && last.compressed.end - end.0 <= CHECKPOINT_COST),
            "segment {seg:?}: span {last:?}, boundary {end:?}"
        );
    }
    // The hot spans are far smaller than the regular ones would be.
    let hot_bytes: u64 = hot
        .iter()
        .flat_map(|h| spans.spans_for(h))
        .map(|id| {
            let s = spans.span(id).unwrap();
            s.compressed.end - s.compressed.start
        })
        .sum();
    let plain_spans = plain.spans().unwrap();
    let plain_bytes: u64 = hot
        .iter()
        .flat_map(|h| plain_spans.spans_for(h))
        .map(|id| {
            let s = plain_spans.span(id).unwrap();
            s.compressed.end - s.compressed.start
        })
        .sum();
    assert!(hot_bytes * 3 < plain_bytes, "{hot_bytes} vs {plain_bytes}");
    // Every span verifies and every file reads back as the tar has it.
    for id in 0..spans.len() {
        let s = spans.span(id).unwrap();
        let c = &blob[s.compressed.start as usize..s.compressed.end as usize];
        spans.verify(id, c).unwrap();
        assert_eq!(
            spans.decompress(id, c).unwrap(),
            &tar_bytes[s.uncompressed.start as usize..s.uncompressed.end as usize]
        );
    }
    for e in &refined.entries {
        if e.kind != EntryKind::Regular {
            continue;
        }
        let got =
            read_uncompressed(&spans, &mut blob.as_slice(), e.offset..e.offset + e.size).unwrap();
        assert_eq!(
            got,
            &tar_bytes[e.offset as usize..(e.offset + e.size) as usize]
        );
    }
    // Round trip through the flatbuffer.
    let back = Ztoc::from_bytes(&refined.to_bytes()).unwrap();
    assert_eq!(back.span_count(), refined.span_count());
}

#[test]
fn small_gaps_merge_and_the_cut_budget_holds() {
    let (blob, _) = layer();
    let plain = build(blob.as_slice(), &opts()).unwrap();
    // Every other file hot: gaps of one file (~50 KiB compressed) merge under a 128 KiB gap.
    let hot: Vec<Range<u64>> = (0..40)
        .step_by(2)
        .map(|i| file_range(&plain, &format!("lib/m{i:02}.py")))
        .collect();
    let wide = plan_cuts(blob.as_slice(), SPAN, &hot, &CutPolicy::default()).unwrap();
    assert_eq!(wide.hot.len(), 1, "{wide:?}");
    let narrow = CutPolicy {
        min_gap: 0,
        max_extra: 512,
    };
    let fine = plan_cuts(blob.as_slice(), SPAN, &hot, &narrow).unwrap();
    assert!(fine.hot.len() > 10, "{fine:?}");
    let tight = CutPolicy {
        min_gap: 0,
        max_extra: 4,
    };
    let few = plan_cuts(blob.as_slice(), SPAN, &hot, &tight).unwrap();
    assert!(few.checkpoints.len() <= 4, "{few:?}");
    assert!(few.min_gap > 0);
    // Ranges past the layer and empty ranges are harmless.
    let odd = [5..5, u64::MAX - 10..u64::MAX];
    let p = plan_cuts(blob.as_slice(), SPAN, &odd, &CutPolicy::default()).unwrap();
    let z = build_with_checkpoints(blob.as_slice(), &opts(), &p.checkpoints).unwrap();
    z.spans().unwrap();
}

#[test]
fn extras_off_block_boundaries_are_skipped() {
    let (blob, _) = layer();
    let plain = build(blob.as_slice(), &opts()).unwrap();
    let bounds = all_boundaries(&blob);
    let on = bounds[bounds.len() / 2].1;
    let z = build_with_checkpoints(blob.as_slice(), &opts(), &[1, on, on + 1]).unwrap();
    assert_eq!(z.span_count(), plain.span_count() + 1);
    z.spans().unwrap();
}
