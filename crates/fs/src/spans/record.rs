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

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use soci_ztoc::SpanId;

use super::SpanManager;

/// Called with the whole first-access list each time it grows (at most once per span of the
/// layer), while the record's lock is held, so calls see the list in order.
pub type RecordSink = Box<dyn Fn(&[SpanId]) + Send + Sync>;

/// The spans a layer's FUSE reads touched, each once, in first-access order.
pub struct DemandRecord {
    seen: Vec<AtomicBool>,
    order: Mutex<Vec<SpanId>>,
    sink: Option<RecordSink>,
}

impl DemandRecord {
    /// A record for a layer of `span_count` spans; `sink` (if any) is told of every growth.
    pub fn new(span_count: usize, sink: Option<RecordSink>) -> DemandRecord {
        DemandRecord {
            seen: (0..span_count).map(|_| AtomicBool::new(false)).collect(),
            order: Mutex::new(Vec::new()),
            sink,
        }
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

    /// The record, if recording was started.
    pub fn demand_record(&self) -> Option<&Arc<DemandRecord>> {
        self.record.get()
    }

    /// Notes a read of uncompressed bytes `range` of the layer (the FUSE read handler calls
    /// this; so should any path that serves file bytes without a FUSE read, e.g. passthrough
    /// opens, with the file's whole range). Ranges past the layer are ignored.
    pub fn note_demand(&self, range: &Range<u64>) {
        if let Some(r) = self.record.get() {
            if range.start < range.end && range.end <= self.spans.uncompressed_size() {
                r.note(self.spans.spans_for(range));
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
}
