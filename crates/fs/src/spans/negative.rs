//! Spans of one layer that recently failed: verification failures are refused for a while
//! (so a poisoned span costs one fetch per few seconds, not one per read), and fetch failures
//! are remembered just long enough to answer the kernel's immediate retry of a page.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use soci_ztoc::SpanId;
use tokio::time::Instant;

/// How long a span that failed verification answers EIO at once before one fresh try.
pub const POISONED_SPAN_TTL: Duration = Duration::from_secs(5);

/// How long a span whose fetch just failed (timeout, transport) answers EIO at once. Only
/// long enough for the kernel's immediate retry: a failed readahead page is read again
/// synchronously inside the same `read(2)` (microseconds after our EIO reply), which must
/// not cost a second fetch deadline. Kept short so that later reads, e.g. a new container
/// started right after, fetch afresh (the registry may have recovered).
pub const FAILED_FETCH_MEMO: Duration = Duration::from_millis(100);

/// Spans of one layer that failed verification, and until when they are refused; and spans
/// whose fetch failed just now.
#[derive(Debug)]
pub(crate) struct NegativeCache {
    ttl: Duration,
    until: Mutex<HashMap<SpanId, Instant>>,
    failed: Mutex<HashMap<SpanId, Instant>>,
}

/// What the negative cache says about a span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Standing {
    /// Never failed (or fetched fine since).
    Clean,
    /// Failed verification less than the TTL ago: refuse without fetching.
    Poisoned,
    /// Failed before, the TTL has passed: one fresh try, no verification retries.
    Probation,
}

impl NegativeCache {
    pub(crate) fn new(ttl: Duration) -> Self {
        NegativeCache {
            ttl,
            until: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
        }
    }

    /// Notes that fetching `id` failed (not its verification).
    pub(crate) fn fetch_failed(&self, id: SpanId) {
        let mut f = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        f.retain(|_, t| now.duration_since(*t) < FAILED_FETCH_MEMO);
        f.insert(id, now);
    }

    /// Whether fetching `id` failed less than [`FAILED_FETCH_MEMO`] ago.
    pub(crate) fn failed_just_now(&self, id: SpanId) -> bool {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .is_some_and(|t| t.elapsed() < FAILED_FETCH_MEMO)
    }

    pub(crate) fn standing(&self, id: SpanId) -> Standing {
        match self
            .until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
        {
            None => Standing::Clean,
            Some(&t) if Instant::now() < t => Standing::Poisoned,
            Some(_) => Standing::Probation,
        }
    }

    pub(crate) fn poison(&self, id: SpanId) {
        let until = Instant::now() + self.ttl;
        self.until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, until);
    }

    pub(crate) fn clear(&self, id: SpanId) {
        self.until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::{NegativeCache, Standing};
    use std::time::Duration;

    #[tokio::test]
    async fn poisoned_spans_expire_into_one_fresh_try() {
        let n = NegativeCache::new(Duration::from_millis(300));
        assert_eq!(n.standing(3), Standing::Clean);
        n.poison(3);
        assert_eq!(n.standing(3), Standing::Poisoned);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(n.standing(3), Standing::Poisoned);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(n.standing(3), Standing::Probation);
        n.clear(3);
        assert_eq!(n.standing(3), Standing::Clean);
    }
}
