//! Read-ahead within a file: a read that needs span k of a file also starts fetching the
//! file's next spans (up to `read_ahead_spans`), in parallel and without making the read wait.
//!
//! Why: a sequential cold read of a multi-span file otherwise pays one round trip per span,
//! one after another. The read-ahead spans are one range request (consecutive missing spans
//! are merged, up to [`MAX_READ_AHEAD_BYTES`]), fetched under the same per-span locks as any
//! fetch, so the read that reaches span k+1 waits for the read-ahead's fetch instead of
//! starting its own. Bounded: spans already local or being fetched are skipped, at most
//! [`MAX_READ_AHEAD_TASKS`] per layer run at once, only spans of the same file are fetched (a
//! reader of a small file never pulls its neighbours), and only once a range request of the
//! layer has been answered (no read-ahead into a registry that ignores ranges or is failing).
//! A read whose spans a prefetch named starts none: the prefetch (recorded from a run, or
//! listing whole files) already holds what the workload reads next, and fetching past it only
//! takes bandwidth from the reads that need it (recorded prefetches of refined zTOCs name
//! small spans of partly read files).

use std::io;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use soci_ztoc::SpanId;
use tokio::time::Instant;
use tracing::{debug, Instrument};

use super::fetch::Want;
use super::{Priority, SpanManager};

/// Read-ahead fetches running at once per layer.
pub const MAX_READ_AHEAD_TASKS: u64 = 2;

/// Largest compressed range one read-ahead fetch asks for.
pub const MAX_READ_AHEAD_BYTES: u64 = 16 << 20;

/// Gives a read-ahead slot back when the task ends (or panics).
struct Slot(Arc<SpanManager>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.read_ahead_running.fetch_sub(1, Ordering::AcqRel);
    }
}

impl SpanManager {
    /// [`SpanManager::read`] of `range`, which lies in the data of a file at uncompressed
    /// bytes `file`: also starts fetching the file's spans after the range's (read-ahead).
    pub async fn read_in_file(&self, range: Range<u64>, file: Range<u64>) -> io::Result<Vec<u8>> {
        self.start_read_ahead(&range, &file);
        self.read(range).await
    }

    /// The spans a read of `range` in `file` would fetch ahead now (empty: nothing to do).
    pub(super) fn read_ahead_spans(&self, range: &Range<u64>, file: &Range<u64>) -> Range<SpanId> {
        let depth = self.cfg.read_ahead_spans;
        let size = self.spans.uncompressed_size();
        if depth == 0 || range.is_empty() || file.end > size || range.end > file.end {
            return 0..0;
        }
        let from = self.spans.spans_for(range).end;
        let to = self
            .spans
            .spans_for(file)
            .end
            .min(from.saturating_add(depth));
        // Start at the first span neither local nor being fetched; stop before the next
        // such span (the run stays one request).
        let free = |id: SpanId| !self.is_cached(id) && self.locks[id].try_lock().is_ok();
        let Some(first) = (from..to).find(|&id| free(id)) else {
            return 0..0;
        };
        let mut end = first + 1;
        while end < to && free(end) {
            let bytes = self
                .spans
                .run(first..end + 1)
                .map_or(u64::MAX, |r| r.compressed.end - r.compressed.start);
            // Uncompressed too: a hostile zTOC's spans may inflate 1000:1.
            if bytes > MAX_READ_AHEAD_BYTES
                || self.uncompressed_len(first..end + 1) > MAX_READ_AHEAD_BYTES
            {
                break;
            }
            end += 1;
        }
        first..end
    }

    fn start_read_ahead(&self, range: &Range<u64>, file: &Range<u64>) {
        if self.closed.load(Ordering::Relaxed)
            || self.reader.whole_only()
            || !self.ranges_work.load(Ordering::Relaxed)
        {
            return;
        }
        if self
            .spans
            .spans_for(range)
            .all(|id| self.prefetched[id].load(Ordering::Relaxed))
        {
            return;
        }
        let ids = self.read_ahead_spans(range, file);
        if ids.is_empty() {
            return;
        }
        let Some(me) = self.me.upgrade() else { return };
        if self.read_ahead_running.fetch_add(1, Ordering::AcqRel) >= MAX_READ_AHEAD_TASKS {
            self.read_ahead_running.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let slot = Slot(me.clone());
        let span =
            tracing::debug_span!("read_ahead", layer = %self.layer, span = ids.start, spans = ?ids);
        tokio::spawn(
            async move {
                let _slot = slot;
                let deadline = Instant::now() + me.cfg.fetch_timeout;
                let got = me
                    .gather(ids.clone(), Priority::Background, deadline, Want::LocalSkipBusy)
                    .await;
                if let Err(e) = got {
                    debug!(layer = %me.layer, spans = ?ids, error = %e, "read-ahead failed (the read itself will tell)");
                }
            }
            .instrument(span),
        );
    }
}
