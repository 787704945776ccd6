//! Warm connections: a lazy start's first round trips (manifest, SOCI index) run on one
//! connection, then every zTOC and the first range reads open their own at once, each paying a
//! TCP (and, for https, TLS) handshake on the critical path. Opening a few connections while
//! the manifest is fetched moves those handshakes off it: the later requests find them idle in
//! the pool.

use std::time::Duration;

use crate::{Client, Repository};

/// Upper bound on the time one warming request may take (it is detached: nothing waits on it).
const WARM_TIMEOUT: Duration = Duration::from_secs(10);

impl Client {
    /// Opens up to `n` connections to the first pull endpoint of `repo`'s registry in the
    /// background (`GET /v2/` each, answer ignored: a 401 warms the connection as well as a
    /// 200). Best effort: failures are ignored; needs a tokio runtime (does nothing without).
    pub fn warm_connections(&self, repo: &Repository, n: usize) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Some(ep) = self
            .options()
            .hosts
            .endpoints(&repo.registry)
            .ok()
            .and_then(|eps| eps.into_iter().find(|e| e.pull))
        else {
            return;
        };
        let url = format!("{}{}/", ep.base, ep.path_prefix);
        let http = self.http(&ep).clone();
        for _ in 0..n.min(16) {
            let (http, url) = (http.clone(), url.clone());
            handle.spawn(async move {
                if let Ok(resp) = http.get(&url).timeout(WARM_TIMEOUT).send().await {
                    // Read the (small) body so the connection goes back to the pool.
                    let _ = tokio::time::timeout(WARM_TIMEOUT, resp.bytes()).await;
                }
            });
        }
    }
}
