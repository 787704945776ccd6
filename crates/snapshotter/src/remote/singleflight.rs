//! One shared attempt per key for the daemon's registry look-ups (image discovery, zTOCs, layer
//! lists, layer downloads started ahead of their Prepare).
//!
//! Why: concurrent Prepares of one image must share one round trip, but a *failed* attempt
//! must not outlive itself. A cell that keeps an `Err` turns one registry outage into failed
//! pulls long after the registry recovered. So: callers that arrive while an attempt runs wait
//! for it and see its result; as soon as it fails, its cell is dropped from the map (only if
//! the map still holds that very cell: a newer attempt is never removed), and the next caller
//! starts afresh. Successes stay until removed.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

/// The shared state of one attempt.
pub(super) type Cell<T> = Arc<tokio::sync::OnceCell<T>>;

/// Attempts by key: one in flight (or kept) per key, joined by every caller of that key.
pub(super) struct SingleFlight<K, T> {
    map: Mutex<HashMap<K, Cell<T>>>,
}

impl<K, T> Default for SingleFlight<K, T> {
    fn default() -> Self {
        SingleFlight {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Clone, T> SingleFlight<K, T> {
    fn lock(&self) -> MutexGuard<'_, HashMap<K, Cell<T>>> {
        // A panic while holding this lock leaves the map consistent (single inserts/removes).
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The attempt for `key`: the one in flight (or kept), else a new one.
    pub(super) fn cell(&self, key: &K) -> Cell<T> {
        self.lock().entry(key.clone()).or_default().clone()
    }

    /// A new attempt for `key`, or `None` if one is in flight (or kept) already.
    pub(super) fn cell_if_new(&self, key: &K) -> Option<Cell<T>> {
        let mut m = self.lock();
        if m.contains_key(key) {
            return None;
        }
        Some(m.entry(key.clone()).or_default().clone())
    }

    /// Forgets the attempt `cell` for `key`, unless a newer attempt has replaced it already.
    pub(super) fn forget(&self, key: &K, cell: &Cell<T>) {
        let mut m = self.lock();
        if m.get(key).is_some_and(|c| Arc::ptr_eq(c, cell)) {
            m.remove(key);
        }
    }

    /// Forgets whatever attempt `key` has (a kept result no longer needed).
    pub(super) fn remove(&self, key: &K) {
        self.lock().remove(key);
    }

    /// Whether no attempt is in flight or kept.
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

impl<K: Eq + Hash + Clone, V: Clone, E: Clone> SingleFlight<K, Result<V, E>> {
    /// Runs (or joins) the attempt for `key`; a failed attempt is forgotten once it ends, so
    /// only the callers that waited on it see its error. Successes stay for later callers.
    pub(super) async fn run<F>(&self, key: &K, init: F) -> Result<V, E>
    where
        F: Future<Output = Result<V, E>>,
    {
        let c = self.cell(key);
        let r = c.get_or_init(|| init).await.clone();
        if r.is_err() {
            self.forget(key, &c);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Attempts = SingleFlight<u8, Result<u32, String>>;

    #[tokio::test]
    async fn failure_is_seen_by_its_waiters_only_then_retried() {
        let map: SingleFlight<String, Result<u32, String>> = SingleFlight::default();
        let k = "img".to_string();
        let r = map
            .run(&k, async { Err::<u32, _>("registry down".to_string()) })
            .await;
        assert_eq!(r, Err("registry down".to_string()));
        assert!(map.is_empty(), "failed attempt kept");
        let r = map.run(&k, async { Ok::<_, String>(7) }).await;
        assert_eq!(r, Ok(7));
        // Successes are shared.
        let r = map.run(&k, async { Ok::<_, String>(8) }).await;
        assert_eq!(r, Ok(7));
    }

    #[tokio::test]
    async fn forgetting_an_old_attempt_leaves_the_new_one() {
        let map: SingleFlight<u8, u32> = SingleFlight::default();
        let old = map.cell(&1);
        map.remove(&1);
        let new = map.cell(&1);
        map.forget(&1, &old);
        assert!(Arc::ptr_eq(&map.cell(&1), &new));
        map.forget(&1, &new);
        assert!(map.is_empty());
    }

    #[tokio::test]
    async fn a_new_cell_only_when_none_is_in_flight() {
        let map: SingleFlight<u8, u32> = SingleFlight::default();
        let first = map.cell_if_new(&1).expect("first");
        assert!(map.cell_if_new(&1).is_none());
        assert!(Arc::ptr_eq(&map.cell(&1), &first));
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_successful_run() {
        let map: Arc<Attempts> = Arc::default();
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (m, c) = (map.clone(), calls.clone());
        let first = tokio::spawn(async move {
            m.run(&1, async {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = rx.await;
                Ok::<u32, String>(5)
            })
            .await
        });
        while map.is_empty() {
            tokio::task::yield_now().await;
        }
        let (m, c) = (map.clone(), calls.clone());
        let second = tokio::spawn(async move {
            m.run(&1, async {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok::<u32, String>(6)
            })
            .await
        });
        tokio::task::yield_now().await;
        let _ = tx.send(());
        assert_eq!(first.await.unwrap(), Ok(5));
        assert_eq!(second.await.unwrap(), Ok(5), "joined the running attempt");
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(!map.is_empty(), "a success is kept");
    }

    #[tokio::test]
    async fn concurrent_waiters_share_one_failed_attempt() {
        let map: Arc<Attempts> = Arc::default();
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (m, c) = (map.clone(), calls.clone());
        let first = tokio::spawn(async move {
            m.run(&1, async {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = rx.await;
                Err::<u32, _>("down".to_string())
            })
            .await
        });
        while map.is_empty() {
            tokio::task::yield_now().await;
        }
        let (m, c) = (map.clone(), calls.clone());
        let second = tokio::spawn(async move {
            m.run(&1, async {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok::<u32, String>(1)
            })
            .await
        });
        tokio::task::yield_now().await;
        let _ = tx.send(());
        assert!(first.await.unwrap().is_err());
        assert!(second.await.unwrap().is_err(), "joined the failing attempt");
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(map.is_empty());
    }
}
