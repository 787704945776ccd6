//! Decompressed spans kept in memory for all layers, bounded by bytes.

use std::sync::{Arc, Mutex};

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
