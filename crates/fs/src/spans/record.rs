//! Demand record: which spans of a layer the container's own reads needed, in the order they
//! were first needed. `soci prefetch record` turns it into a prefetch artifact, so the next
//! start of the image fetches exactly those spans before the container runs.
//!
//! Why at the FUSE read and not at the fetch: a span fetched by the background fetcher or by a
//! prefetch is still recorded when a read needs it, and never recorded when none does, so the
//! record is what the workload read whatever the cache held. Memory is bounded by the layer:
//! one bit per span of the zTOC and at most one list entry per span, however hostile the image
//! or however many reads the workload makes. After every span was seen once a read costs one
//! atomic load per span it touches.
//!
//! The record also keeps the uncompressed byte ranges the reads asked for (merged), so
//! `soci prefetch record` can cut the layer's spans around exactly those bytes. Each read
//! that adds bytes not recorded before is told to a [`RangeSink`] in read order (the daemon
//! appends one line per such read to a file); a read of recorded bytes costs one lookup.
//! Bounded: after [`MAX_RANGE_EVENTS`] such reads the sink is told once that the list is
//! incomplete and nothing more is kept.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use soci_ztoc::SpanId;

use super::SpanManager;

/// Called with the whole first-access list each time it grows (at most once per span of the
/// layer), while the record's lock is held, so calls see the list in order.
pub type RecordSink = Box<dyn Fn(&[SpanId]) + Send + Sync>;

/// What a [`RangeSink`] is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeEvent {
    /// A read of these uncompressed bytes added bytes not recorded before.
    Read(Range<u64>),
    /// [`MAX_RANGE_EVENTS`] reads were told: the list stops here and is incomplete.
    Overflow,
}

/// Told of every read that adds bytes to the record (see the module docs), in read order.
pub type RangeSink = Box<dyn Fn(&RangeEvent) + Send + Sync>;

/// Most [`RangeEvent::Read`]s one record tells (a cold read of a whole 1 GiB layer in
/// 128 KiB reads takes 8192).
pub const MAX_RANGE_EVENTS: usize = 1 << 16;

/// Merged byte ranges read so far (start -> end).
#[derive(Default)]
struct RangeSet {
    ranges: BTreeMap<u64, u64>,
    events: usize,
    overflowed: bool,
}

impl RangeSet {
    /// Whether `r` is covered already.
    fn covers(&self, r: &Range<u64>) -> bool {
        self.ranges
            .range(..=r.start)
            .next_back()
            .is_some_and(|(_, &end)| end >= r.end)
    }

    /// Adds `r`, merging it with touching ranges.
    fn insert(&mut self, r: &Range<u64>) {
        let (mut start, mut end) = (r.start, r.end);
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        let inside: Vec<(u64, u64)> = self
            .ranges
            .range(start..=end)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in inside {
            self.ranges.remove(&s);
            end = end.max(e);
        }
        self.ranges.insert(start, end);
    }
}

/// The spans a layer's FUSE reads touched, each once, in first-access order.
pub struct DemandRecord {
    seen: Vec<AtomicBool>,
    order: Mutex<Vec<SpanId>>,
    sink: Option<RecordSink>,
    ranges: Mutex<RangeSet>,
    range_sink: Option<RangeSink>,
}

impl DemandRecord {
    /// A record for a layer of `span_count` spans; `sink` (if any) is told of every growth.
    pub fn new(span_count: usize, sink: Option<RecordSink>) -> DemandRecord {
        DemandRecord {
            seen: (0..span_count).map(|_| AtomicBool::new(false)).collect(),
            order: Mutex::new(Vec::new()),
            sink,
            ranges: Mutex::new(RangeSet::default()),
            range_sink: None,
        }
    }

    /// Also tells `sink` of the byte ranges read (see the module docs).
    pub fn with_range_sink(mut self, sink: RangeSink) -> DemandRecord {
        self.range_sink = Some(sink);
        self
    }

    /// Notes a read of uncompressed bytes `r`; returns whether it added bytes to the record
    /// (false once the record overflowed).
    pub fn note_range(&self, r: &Range<u64>) -> bool {
        if r.start >= r.end {
            return false;
        }
        // Plain data: consistent even if a sink panicked while holding the lock.
        let mut set = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        if set.overflowed || set.covers(r) {
            return false;
        }
        if set.events >= MAX_RANGE_EVENTS {
            set.overflowed = true;
            set.ranges.clear();
            if let Some(sink) = &self.range_sink {
                sink(&RangeEvent::Overflow);
            }
            return false;
        }
        set.events += 1;
        set.insert(r);
        if let Some(sink) = &self.range_sink {
            sink(&RangeEvent::Read(r.clone()));
        }
        true
    }

    /// The merged byte ranges read so far (empty once the record overflowed).
    pub fn ranges(&self) -> Vec<Range<u64>> {
        let set = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        set.ranges.iter().map(|(&s, &e)| s..e).collect()
    }

    /// Notes spans `ids` (ids past the layer are ignored); returns whether any was new.
    pub fn note(&self, ids: Range<SpanId>) -> bool {
        let ids = ids.start.min(self.seen.len())..ids.end.min(self.seen.len());
        if ids.clone().all(|i| self.seen[i].load(Ordering::Acquire)) {
            return false;
        }
        // Plain data: consistent even if a sink panicked while holding the lock.
        let mut order = self.order.lock().unwrap_or_else(|e| e.into_inner());
        let before = order.len();
        for i in ids {
            if !self.seen[i].swap(true, Ordering::AcqRel) {
                order.push(i);
            }
        }
        let grew = order.len() > before;
        if grew {
            if let Some(sink) = &self.sink {
                sink(&order);
            }
        }
        grew
    }

    /// The spans noted so far, in first-access order (never longer than the span count).
    pub fn order(&self) -> Vec<SpanId> {
        self.order.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The layer's span count.
    pub fn span_count(&self) -> usize {
        self.seen.len()
    }
}

/// Where a span manager keeps its record (set once, by whoever mounts the layer).
pub(crate) type RecordSlot = OnceLock<Arc<DemandRecord>>;

impl SpanManager {
    /// Starts recording this layer's demand reads into `record` (once; later calls are
    /// ignored). Returns the record in use.
    pub fn record_demand(&self, record: Arc<DemandRecord>) -> Arc<DemandRecord> {
        self.record.get_or_init(|| record).clone()
    }

    /// Uncompressed bytes the layer's spans cover (what a recorded byte range may reach).
    pub fn uncompressed_size(&self) -> u64 {
        self.spans.uncompressed_size()
    }

    /// The record, if recording was started.
    pub fn demand_record(&self) -> Option<&Arc<DemandRecord>> {
        self.record.get()
    }

    /// Notes a read of uncompressed bytes `range` of the layer (the FUSE read handler calls
    /// this; so should any path that serves file bytes without a FUSE read, e.g. passthrough
    /// opens, with the file's whole range). Ranges past the layer are ignored.
    pub fn note_demand(&self, range: &Range<u64>) {
        self.cfg.cache.stamp_demand();
        if let Some(r) = self.record.get() {
            if range.start < range.end && range.end <= self.spans.uncompressed_size() {
                r.note(self.spans.spans_for(range));
                r.note_range(range);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_access_order_each_span_once_and_bounded() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let c = calls.clone();
        let r = DemandRecord::new(
            5,
            Some(Box::new(move |o: &[SpanId]| {
                c.lock().unwrap().push(o.to_vec())
            })),
        );
        assert!(r.note(3..4));
        assert!(r.note(1..4));
        assert!(!r.note(1..3));
        assert!(r.note(4..100)); // past the layer: clamped
        assert!(!r.note(7..9));
        assert_eq!(r.order(), vec![3, 1, 2, 4]);
        assert_eq!(
            *calls.lock().unwrap(),
            vec![vec![3], vec![3, 1, 2], vec![3, 1, 2, 4]]
        );
        for _ in 0..1000 {
            r.note(0..5);
        }
        assert_eq!(r.order(), vec![3, 1, 2, 4, 0]);
        assert_eq!(r.order().len(), r.span_count());
    }

    #[test]
    fn ranges_merge_new_bytes_are_told_in_order_and_bounded() {
        let told = Arc::new(Mutex::new(Vec::new()));
        let t = told.clone();
        let r = DemandRecord::new(1, None).with_range_sink(Box::new(move |e: &RangeEvent| {
            t.lock().unwrap().push(e.clone())
        }));
        assert!(r.note_range(&(100..200)));
        assert!(!r.note_range(&(120..200)));
        assert!(r.note_range(&(0..50)));
        assert!(r.note_range(&(150..300)));
        assert!(r.note_range(&(50..100)));
        assert!(!r.note_range(&(7..7)));
        assert_eq!(r.ranges(), vec![0..300]);
        assert!(r.note_range(&(400..500)));
        assert!(r.note_range(&(350..450)));
        assert_eq!(r.ranges(), vec![0..300, 350..500]);
        assert_eq!(
            *told.lock().unwrap(),
            [100..200, 0..50, 150..300, 50..100, 400..500, 350..450]
                .into_iter()
                .map(RangeEvent::Read)
                .collect::<Vec<_>>()
        );
        // Bounded: many scattered reads end in one overflow, then nothing.
        for i in 0..(MAX_RANGE_EVENTS as u64 + 10) {
            r.note_range(&(1000 + 10 * i..1001 + 10 * i));
        }
        let told = told.lock().unwrap();
        assert_eq!(told.len(), MAX_RANGE_EVENTS + 1);
        assert_eq!(told.last(), Some(&RangeEvent::Overflow));
        assert!(r.ranges().is_empty());
    }
}
