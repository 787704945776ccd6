//! One shared attempt per key for the daemon's registry look-ups (image discovery, zTOCs, layer
//! lists, layer downloads started ahead of their Prepare).
//!
//! Why: concurrent Prepares of one image must share one round trip, but a *failed* attempt
//! must not outlive itself. A cell that keeps an `Err` turns one registry outage into failed
//! pulls long after the registry recovered. So: callers that arrive while an attempt runs wait
//! for it and see its result; as soon as it fails, its cell is dropped from the map (only if
//! the map still holds that very cell: a newer attempt is never removed), and the next caller
//! starts afresh.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// The shared state of one attempt.
pub(super) type Cell<T> = Arc<tokio::sync::OnceCell<T>>;

/// The attempt for `key`: the one in flight (or kept), else a new one.
pub(super) fn cell<K: Eq + Hash + Clone, T>(map: &Mutex<HashMap<K, Cell<T>>>, key: &K) -> Cell<T> {
    map.lock()
        .expect("attempt map")
        .entry(key.clone())
        .or_default()
        .clone()
}

/// Forgets the attempt `cell` for `key`, unless a newer attempt has replaced it already.
pub(super) fn forget<K: Eq + Hash, T>(map: &Mutex<HashMap<K, Cell<T>>>, key: &K, cell: &Cell<T>) {
    let mut m = map.lock().expect("attempt map");
    if m.get(key).is_some_and(|c| Arc::ptr_eq(c, cell)) {
        m.remove(key);
    }
}

/// Runs (or joins) the attempt for `key`; a failed attempt is forgotten once it ends, so only
/// the callers that waited on it see its error. Successes stay for later callers.
pub(super) async fn run<K, V, E, F>(
    map: &Mutex<HashMap<K, Cell<Result<V, E>>>>,
    key: &K,
    init: F,
) -> Result<V, E>
where
    K: Eq + Hash + Clone,
    V: Clone,
    E: Clone,
    F: std::future::Future<Output = Result<V, E>>,
{
    let c = cell(map, key);
    let r = c.get_or_init(|| init).await.clone();
    if r.is_err() {
        forget(map, key, &c);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    type Attempts = Mutex<HashMap<u8, Cell<Result<u32, String>>>>;

    #[tokio::test]
    async fn failure_is_seen_by_its_waiters_only_then_retried() {
        let map: Mutex<HashMap<String, Cell<Result<u32, String>>>> = Mutex::default();
        let k = "img".to_string();
        let r = run(&map, &k, async {
            Err::<u32, _>("registry down".to_string())
        })
        .await;
        assert_eq!(r, Err("registry down".to_string()));
        assert!(map.lock().unwrap().is_empty(), "failed attempt kept");
        let r = run(&map, &k, async { Ok::<_, String>(7) }).await;
        assert_eq!(r, Ok(7));
        // Successes are shared.
        let r = run(&map, &k, async { Ok::<_, String>(8) }).await;
        assert_eq!(r, Ok(7));
    }

    #[tokio::test]
    async fn forgetting_an_old_attempt_leaves_the_new_one() {
        let map: Mutex<HashMap<u8, Cell<u32>>> = Mutex::default();
        let old = cell(&map, &1);
        map.lock().unwrap().remove(&1);
        let new = cell(&map, &1);
        forget(&map, &1, &old);
        assert!(Arc::ptr_eq(&cell(&map, &1), &new));
        forget(&map, &1, &new);
        assert!(map.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn concurrent_waiters_share_one_failed_attempt() {
        let map: Arc<Attempts> = Arc::default();
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (m, c) = (map.clone(), calls.clone());
        let first = tokio::spawn(async move {
            run(&m, &1, async {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = rx.await;
                Err::<u32, _>("down".to_string())
            })
            .await
        });
        tokio::task::yield_now().await;
        while map.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        let (m, c) = (map.clone(), calls.clone());
        let second = tokio::spawn(async move {
            run(&m, &1, async {
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
        assert!(map.lock().unwrap().is_empty());
    }
}
