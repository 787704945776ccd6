//! Prefetch: fetch the spans a prefetch artifact names as the layer is mounted, in the order
//! the artifact ranks them, so the container's first reads of those files find them cached or
//! arriving.
//!
//! Why through the span manager: prefetched spans are verified, decompressed and cached exactly
//! like spans a read fetches (same locks, so a read arriving meanwhile waits for the prefetch
//! instead of fetching twice). Requests are few and large: the named ranges are merged, cached
//! spans dropped, and each run of consecutive missing spans is one range request (cut at
//! [`MAX_PREFETCH_REQUEST_BYTES`] so memory stays bounded and runs fetch in parallel).
//! Best effort by construction: the result is a report, never an error, and everything ends by
//! the caller's deadline.

use std::ops::{Range, RangeInclusive};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use soci_ztoc::{SpanId, Spans};
use tokio::time::Instant;

use super::{Priority, SpanManager};

/// Largest compressed range fetched by one prefetch request (a larger run is split).
pub const MAX_PREFETCH_REQUEST_BYTES: u64 = 32 << 20;
/// Most uncompressed bytes one prefetch request decompresses at once (a run of spans that
/// inflate far more than usual is split; one span always goes).
pub const MAX_PREFETCH_DECODE_BYTES: u64 = 64 << 20;

/// What a prefetch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefetchReport {
    /// Spans fetched, verified and cached by the prefetch.
    pub spans: u64,
    /// Compressed bytes of those spans.
    pub bytes: u64,
    /// Range requests made (one per run of consecutive missing spans).
    pub requests: u64,
    /// Spans named but already cached.
    pub cached: u64,
    /// The first failure (the other requests still ran).
    pub error: Option<String>,
    /// The deadline passed before every request finished.
    pub timed_out: bool,
}

/// The range requests a prefetch of `ranges` (inclusive span ids) of a layer with `spans`
/// makes: ids past the layer dropped, ranges merged, spans `cached` says are held skipped, runs
/// cut at [`MAX_PREFETCH_REQUEST_BYTES`] fetched and [`MAX_PREFETCH_DECODE_BYTES`] inflated,
/// in the order `ranges` first names them (the order reads are expected in).
/// Also returns how many named spans are cached. Pure, so the daemon can fetch the same
/// requests ahead of a layer's mount (the mount's prefetch then finds them).
pub fn plan_prefetch(
    spans: &Spans,
    ranges: &[RangeInclusive<SpanId>],
    cached: impl Fn(SpanId) -> bool,
) -> (Vec<Range<SpanId>>, u64) {
    let uncompressed_len = |run: Range<SpanId>| -> u64 {
        run.filter_map(|id| spans.span(id).ok())
            .map(|s| s.uncompressed.end - s.uncompressed.start)
            .sum()
    };
    let compressed_len = |run: Range<SpanId>| -> u64 {
        match (spans.span(run.start), spans.span(run.end - 1)) {
            (Ok(a), Ok(b)) => b.compressed.end.saturating_sub(a.compressed.start),
            _ => 0,
        }
    };
    let n = spans.len();
    // Each range with its place in the artifact: requests go out in that order (a recorded
    // prefetch lists spans in the order the workload first read them).
    let mut ids: Vec<(Range<SpanId>, usize)> = ranges
        .iter()
        .enumerate()
        .filter(|(_, r)| r.start() <= r.end() && *r.start() < n)
        .map(|(i, r)| (*r.start()..(*r.end()).min(n - 1) + 1, i))
        .collect();
    ids.sort_by_key(|(r, _)| (r.start, r.end));
    let mut out: Vec<(Range<SpanId>, usize)> = Vec::new();
    let mut held = 0;
    let mut next = 0; // first id not yet looked at (ranges may overlap)
    let mut run_plain = 0u64; // uncompressed bytes of the last run
    for (r, place) in ids {
        for id in r.start.max(next)..r.end {
            if cached(id) {
                held += 1;
                continue;
            }
            let size = uncompressed_len(id..id + 1);
            let extend = out.last().is_some_and(|(last, _)| {
                last.end == id
                    && compressed_len(last.start..id + 1) <= MAX_PREFETCH_REQUEST_BYTES
                    && run_plain.saturating_add(size) <= MAX_PREFETCH_DECODE_BYTES
            });
            match out.last_mut() {
                Some((last, first)) if extend => {
                    last.end = id + 1;
                    *first = (*first).min(place);
                    run_plain += size;
                }
                _ => {
                    out.push((id..id + 1, place));
                    run_plain = size;
                }
            }
        }
        next = next.max(r.end);
    }
    // Stable: runs named at the same place keep their offset order.
    out.sort_by_key(|(_, place)| *place);
    let out = out.into_iter().map(|(r, _)| r).collect();
    (out, held)
}

impl SpanManager {
    /// The range requests a prefetch of `ranges` (inclusive span ids) makes now: see
    /// [`plan_prefetch`] (cached spans skipped). Also returns how many named spans are cached.
    pub fn prefetch_requests(
        &self,
        ranges: &[RangeInclusive<SpanId>],
    ) -> (Vec<Range<SpanId>>, u64) {
        plan_prefetch(&self.spans, ranges, |id| self.is_cached(id))
    }

    /// Uncompressed bytes of spans `run` (0 for ids past the end).
    pub(super) fn uncompressed_len(&self, run: Range<SpanId>) -> u64 {
        run.filter_map(|id| self.spans.span(id).ok())
            .map(|s| s.uncompressed.end - s.uncompressed.start)
            .sum()
    }

    fn compressed_len(&self, run: Range<SpanId>) -> u64 {
        match (self.spans.span(run.start), self.spans.span(run.end - 1)) {
            (Ok(a), Ok(b)) => b.compressed.end.saturating_sub(a.compressed.start),
            _ => 0,
        }
    }

    /// Fetches the spans of `ranges` (inclusive span ids) that are not cached, with at most
    /// `concurrency` range requests at once, all by `deadline`. Never fails: what happened is
    /// in the report (the caller logs it once). The spans are marked as prefetched (reads of
    /// them start no read-ahead) and the requests planned when this is called; the fetching
    /// is the future, which borrows nothing (it may run in a task of its own).
    pub fn prefetch(
        self: &Arc<Self>,
        ranges: &[RangeInclusive<SpanId>],
        concurrency: usize,
        deadline: Instant,
    ) -> impl std::future::Future<Output = PrefetchReport> + Send + 'static {
        for r in ranges {
            for id in *r.start()..=(*r.end()).min(self.prefetched.len().saturating_sub(1)) {
                self.prefetched[id].store(true, Ordering::Relaxed);
            }
        }
        let (runs, cached) = self.prefetch_requests(ranges);
        self.clone().fetch_runs(runs, cached, concurrency, deadline)
    }

    async fn fetch_runs(
        self: Arc<Self>,
        runs: Vec<Range<SpanId>>,
        cached: u64,
        concurrency: usize,
        deadline: Instant,
    ) -> PrefetchReport {
        let mut total = PrefetchReport {
            cached,
            ..Default::default()
        };
        let workers = concurrency.max(1).min(runs.len());
        let queue = Arc::new(Mutex::new(runs.into_iter()));
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..workers {
            let (me, queue) = (self.clone(), queue.clone());
            set.spawn(async move {
                let mut r = PrefetchReport::default();
                // The guard is consumed inside `and_then`: not held across the fetch.
                while let Some(run) = queue.lock().ok().and_then(|mut q| q.next()) {
                    if me.closed.load(Ordering::Relaxed) {
                        break;
                    }
                    if Instant::now() >= deadline {
                        r.timed_out = true;
                        break;
                    }
                    let bytes = me.compressed_len(run.clone());
                    r.requests += 1;
                    if let Ok(sr) = me.spans.run(run.clone()) {
                        let _ = me.reader.settled(sr.compressed, deadline).await;
                        if me.closed.load(Ordering::Relaxed) {
                            break;
                        }
                    }
                    let fetch = me.ensure_until(run.clone(), Priority::Background, deadline);
                    match tokio::time::timeout_at(deadline, fetch).await {
                        Ok(Ok(())) => {
                            r.spans += run.len() as u64;
                            r.bytes += bytes;
                        }
                        Ok(Err(e)) => {
                            r.error.get_or_insert_with(|| e.to_string());
                        }
                        Err(_) => {
                            r.timed_out = true;
                            break;
                        }
                    }
                }
                r
            });
        }
        // Each request is bounded by `deadline`; the grace only covers task wake-ups.
        let grace = deadline + std::time::Duration::from_secs(1);
        loop {
            match tokio::time::timeout_at(grace, set.join_next()).await {
                Ok(Some(Ok(r))) => {
                    total.spans += r.spans;
                    total.bytes += r.bytes;
                    total.requests += r.requests;
                    total.timed_out |= r.timed_out;
                    if total.error.is_none() {
                        total.error = r.error;
                    }
                }
                Ok(Some(Err(e))) => {
                    total
                        .error
                        .get_or_insert_with(|| format!("prefetch task: {e}"));
                }
                Ok(None) => break,
                Err(_) => {
                    total.timed_out = true;
                    set.abort_all();
                    break;
                }
            }
        }
        total
    }
}

#[cfg(test)]
#[path = "prefetch_tests.rs"]
mod tests;
