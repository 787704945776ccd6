//! Refined span boundaries: extra checkpoints around the bytes a workload reads ("hot"
//! ranges), so those bytes sit in small spans and a prefetch fetches little more than them.
//!
//! Why this is a zTOC like any other: span boundaries are just the checkpoint list, and
//! readers (upstream's `pt_index_from_ucmp_offset`, our [`crate::Spans::span_of`]) find a
//! span by searching checkpoint offsets, never by dividing by the span size. Only gzip layers
//! can be refined: the uncompressed-tar zinfo fixes spans at multiples of the span size.
//!
//! A checkpoint can only sit at a deflate block boundary and costs
//! [`CHECKPOINT_COST`] bytes of zTOC, which every mount fetches. So a plan is made from one
//! scan of the blob ([`plan_cuts`]): each hot range is widened to the block boundary at or
//! before its start and at or after its end; hot segments closer than
//! [`CutPolicy::min_gap`] compressed bytes are merged (a cut pair costs more zTOC than the
//! gap, or one more request than the gap's transfer time); and a cut is made only where it
//! keeps more than its cost of compressed bytes out of a hot span. The regular
//! every-`span_size` checkpoints stay where upstream puts them.

use std::io::{self, Read};
use std::ops::Range;

use crate::builder::GzipIndexer;
use crate::checkpoint::CHECKPOINT_SIZE;
use crate::error::{Result, ZtocError};

/// zTOC bytes one checkpoint adds (its record in the checkpoint blob).
pub const CHECKPOINT_COST: u64 = CHECKPOINT_SIZE as u64;

/// Most extra checkpoints a plan may add (about 64 MiB of zTOC); a plan needing more merges
/// hot segments across larger gaps until it fits.
pub const MAX_EXTRA_CHECKPOINTS: usize = 2048;

/// Most hot ranges a plan accepts (a demand record holds fewer).
pub const MAX_HOT_RANGES: usize = 1 << 20;

/// How hot ranges become cut points.
#[derive(Debug, Clone)]
pub struct CutPolicy {
    /// Hot segments whose compressed gap is smaller than this are merged (no cut between).
    pub min_gap: u64,
    /// Most extra checkpoints (at most [`MAX_EXTRA_CHECKPOINTS`]).
    pub max_extra: usize,
}

impl Default for CutPolicy {
    fn default() -> Self {
        CutPolicy {
            min_gap: 128 << 10,
            max_extra: 512,
        }
    }
}

/// The extra checkpoints of a refined zTOC and what they isolate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CutPlan {
    /// Uncompressed offsets of the extra checkpoints, ascending, each a block boundary (give
    /// them to [`crate::build_with_checkpoints`]).
    pub checkpoints: Vec<u64>,
    /// Regular (every-`span_size`) checkpoints of the layer.
    pub regular: usize,
    /// The hot segments after widening and merging (uncompressed; the last may end at
    /// `u64::MAX`: the end of the stream).
    pub hot: Vec<Range<u64>>,
    /// The `min_gap` used (larger than asked when the plan had to shrink).
    pub min_gap: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Boundary {
    cin: u64,
    cout: u64,
}

/// Collects, in one pass over the blob, the regular checkpoints and the block boundaries
/// around each hot range (memory in proportion to the ranges and spans, not the blocks).
#[derive(Debug)]
pub(crate) struct BoundaryScan {
    hot: Vec<Range<u64>>,
    next_start: usize,
    next_end: usize,
    prev: Option<Boundary>,
    starts: Vec<Option<Boundary>>,
    ends: Vec<Option<Boundary>>,
    regular: Vec<Boundary>,
    #[cfg(test)]
    pub(crate) all: Vec<(u64, u64)>,
}

impl BoundaryScan {
    fn new(hot: Vec<Range<u64>>) -> Self {
        let n = hot.len();
        BoundaryScan {
            hot,
            next_start: 0,
            next_end: 0,
            prev: None,
            starts: vec![None; n],
            ends: vec![None; n],
            regular: Vec::new(),
            #[cfg(test)]
            all: Vec::new(),
        }
    }

    /// A block boundary at compressed offset `cin`, uncompressed `cout`; `regular` when the
    /// builder puts a regular checkpoint there.
    pub(crate) fn boundary(&mut self, cin: u64, cout: u64, regular: bool) {
        let b = Boundary { cin, cout };
        #[cfg(test)]
        self.all.push((cin, cout));
        while self.next_start < self.hot.len() && self.hot[self.next_start].start < cout {
            self.starts[self.next_start] = self.prev;
            self.next_start += 1;
        }
        while self.next_end < self.next_start && self.hot[self.next_end].end <= cout {
            self.ends[self.next_end] = Some(b);
            self.next_end += 1;
        }
        if regular {
            self.regular.push(b);
        }
        self.prev = Some(b);
    }

    fn finish(&mut self) {
        while self.next_start < self.hot.len() {
            self.starts[self.next_start] = self.prev;
            self.next_start += 1;
        }
    }
}

/// Sorted, merged, non-empty ranges.
fn normalize(hot: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut v: Vec<Range<u64>> = hot.iter().filter(|r| r.start < r.end).cloned().collect();
    v.sort_by_key(|r| (r.start, r.end));
    let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(l) if r.start <= l.end => l.end = l.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Scans gzip layer `blob` once and plans the extra checkpoints that put the uncompressed
/// byte ranges `hot` into small spans (see the module docs), for a zTOC of `span_size`.
pub fn plan_cuts(
    blob: impl Read,
    span_size: u64,
    hot: &[Range<u64>],
    policy: &CutPolicy,
) -> Result<CutPlan> {
    if span_size == 0 || span_size > i64::MAX as u64 {
        return Err(ZtocError::OutOfRange(format!("span size {span_size}")));
    }
    if hot.len() > MAX_HOT_RANGES {
        return Err(ZtocError::OutOfRange(format!(
            "{} hot ranges, at most {MAX_HOT_RANGES}",
            hot.len()
        )));
    }
    let mut idx = GzipIndexer::new(io::BufReader::with_capacity(64 << 10, blob), span_size)?;
    idx.scan = Some(BoundaryScan::new(normalize(hot)));
    io::copy(&mut idx, &mut io::sink())?;
    let (mut scan, _) = idx.into_scan()?;
    scan.finish();
    Ok(plan_from_scan(&scan, policy))
}

/// Hot segments in boundary terms: start boundary, end boundary (`None`: stream end).
type Segment = (Boundary, Option<Boundary>);

fn segments(scan: &BoundaryScan, min_gap: u64) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::new();
    for (s, e) in scan.starts.iter().zip(&scan.ends) {
        let Some(s) = *s else { continue };
        match out.last_mut() {
            Some((_, le)) if le.is_none_or(|le| s.cin <= le.cin.saturating_add(min_gap)) => {
                // Merged: ends where the later of the two ends (the stream end wins).
                if let Some(l) = *le {
                    *le = e.map(|e| if e.cin > l.cin { e } else { l });
                }
            }
            _ => out.push((s, *e)),
        }
    }
    out
}

fn plan_from_scan(scan: &BoundaryScan, policy: &CutPolicy) -> CutPlan {
    let max_extra = policy.max_extra.min(MAX_EXTRA_CHECKPOINTS);
    let mut min_gap = policy.min_gap;
    loop {
        let segs = segments(scan, min_gap);
        let cuts = cuts_of(&segs, &scan.regular);
        if cuts.len() <= max_extra || segs.len() <= 1 {
            let mut cuts = cuts;
            cuts.truncate(max_extra);
            return CutPlan {
                checkpoints: cuts,
                regular: scan.regular.len(),
                hot: segs
                    .iter()
                    .map(|(s, e)| s.cout..e.map_or(u64::MAX, |e| e.cout))
                    .collect(),
                min_gap,
            };
        }
        min_gap = min_gap.saturating_mul(2).max(CHECKPOINT_COST);
    }
}

/// Extra checkpoints (uncompressed offsets, ascending) worth their cost around `segs`.
fn cuts_of(segs: &[Segment], regular: &[Boundary]) -> Vec<u64> {
    let is_regular = |b: Boundary| regular.binary_search_by_key(&b.cout, |r| r.cout).is_ok();
    let mut cuts: Vec<u64> = Vec::new();
    let mut last_cut_cin: Option<u64> = None;
    for (k, &(s, e)) in segs.iter().enumerate() {
        if !is_regular(s) {
            // Compressed start of the span that would hold the segment's start.
            let i = regular.partition_point(|r| r.cout <= s.cout);
            let prev = i
                .checked_sub(1)
                .map(|i| regular[i].cin)
                .max(last_cut_cin)
                .unwrap_or(0);
            if s.cin.saturating_sub(prev) > CHECKPOINT_COST {
                cuts.push(s.cout);
                last_cut_cin = Some(s.cin);
            }
        }
        let Some(e) = e else { break };
        if is_regular(e) {
            continue;
        }
        let i = regular.partition_point(|r| r.cout <= e.cout);
        let next_regular = regular.get(i).map_or(u64::MAX, |r| r.cin);
        let next_seg = segs.get(k + 1).map_or(u64::MAX, |(s, _)| s.cin);
        if next_regular.min(next_seg).saturating_sub(e.cin) > CHECKPOINT_COST {
            cuts.push(e.cout);
            last_cut_cin = Some(e.cin);
        }
    }
    cuts.dedup();
    cuts
}

#[cfg(test)]
#[path = "refine_tests.rs"]
mod tests;
