//! What the span manager remembers between reads: decompressed spans in memory for all
//! layers (bounded by bytes), the disk budget, and, per layer, spans that recently failed
//! verification (so a poisoned span costs one fetch per few seconds, not one per read).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use lru::LruCache;
use soci_ztoc::SpanId;

type SpanLru = LruCache<(u64, SpanId), Arc<Vec<u8>>>;

/// Decompressed spans kept in memory for all layers, bounded by bytes (least recently used
/// spans go first; they stay on disk).
pub struct MemoryCache {
    /// Spans by (layer key, span id), and the bytes they hold.
    inner: Mutex<(SpanLru, usize)>,
    budget: usize,
}

impl MemoryCache {
    /// A cache of at most `budget` bytes.
    pub fn new(budget: usize) -> Arc<MemoryCache> {
        Arc::new(MemoryCache {
            inner: Mutex::new((LruCache::unbounded(), 0)),
            budget,
        })
    }

    pub(crate) fn get(&self, key: (u64, SpanId)) -> Option<Arc<Vec<u8>>> {
        self.inner
            .lock()
            .expect("memory cache")
            .0
            .get(&key)
            .cloned()
    }

    pub(crate) fn contains(&self, key: (u64, SpanId)) -> bool {
        self.inner.lock().expect("memory cache").0.contains(&key)
    }

    pub(crate) fn put(&self, key: (u64, SpanId), data: Arc<Vec<u8>>) {
        if data.len() > self.budget {
            return;
        }
        let mut g = self.inner.lock().expect("memory cache");
        let (lru, bytes) = &mut *g;
        *bytes += data.len();
        if let Some(old) = lru.put(key, data) {
            *bytes -= old.len();
        }
        while *bytes > self.budget {
            match lru.pop_lru() {
                Some((_, d)) => *bytes -= d.len(),
                None => break,
            }
        }
    }

    /// Drops every span of layer `layer`.
    pub(crate) fn forget(&self, layer: u64) {
        let mut g = self.inner.lock().expect("memory cache");
        let (lru, bytes) = &mut *g;
        let keys: Vec<(u64, SpanId)> = lru
            .iter()
            .filter(|(k, _)| k.0 == layer)
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            if let Some(d) = lru.pop(&k) {
                *bytes -= d.len();
            }
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.inner.lock().expect("memory cache").1
    }
}

impl std::fmt::Debug for MemoryCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MemoryCache({} of {} bytes)", self.bytes(), self.budget)
    }
}

/// A byte budget for decompressed spans on disk, shared by every layer. Spans that do not fit
/// are served from memory only (and fetched again when evicted); background fetch stops.
#[derive(Debug)]
pub struct DiskBudget {
    limit: u64,
    used: std::sync::atomic::AtomicU64,
}

impl DiskBudget {
    /// A budget of `limit` bytes; 0 means no limit.
    pub fn new(limit: u64) -> Arc<DiskBudget> {
        Arc::new(DiskBudget {
            limit,
            used: Default::default(),
        })
    }

    /// Bytes of span files on disk now.
    pub fn used(&self) -> u64 {
        self.used.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether `n` more bytes would fit.
    pub fn fits(&self, n: u64) -> bool {
        self.limit == 0 || self.used().saturating_add(n) <= self.limit
    }

    /// Takes `n` bytes of the budget if they fit.
    pub(crate) fn try_reserve(&self, n: u64) -> bool {
        use std::sync::atomic::Ordering;
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                let after = u.saturating_add(n);
                (self.limit == 0 || after <= self.limit).then_some(after)
            })
            .is_ok()
    }

    /// Counts `n` bytes already on disk (found at start-up), limit or not.
    pub(crate) fn add(&self, n: u64) {
        self.used.fetch_add(n, std::sync::atomic::Ordering::AcqRel);
    }

    /// Gives back `n` bytes.
    pub(crate) fn release(&self, n: u64) {
        use std::sync::atomic::Ordering;
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(n))
            });
    }
}

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
mod disk_tests {
    use super::{DiskBudget, NegativeCache, Standing};
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

    #[test]
    fn budget_bounds_and_releases() {
        let b = DiskBudget::new(100);
        assert!(b.try_reserve(60));
        assert!(!b.try_reserve(50));
        assert!(b.fits(40) && !b.fits(41));
        b.release(60);
        assert!(b.try_reserve(100));
        b.add(10);
        assert_eq!(b.used(), 110);
        let unlimited = DiskBudget::new(0);
        assert!(unlimited.try_reserve(u64::MAX / 2));
    }
}
