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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use crate::client::ClientOptions;
    use crate::hosts::HostsConfig;
    use crate::{Client, Repository};

    /// Answers every request on a kept-alive connection with an empty 404; counts connections.
    async fn server() -> (String, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let a2 = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                a2.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    loop {
                        if s.read(&mut b).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(b[0]);
                        if head.ends_with(b"\r\n\r\n") {
                            head.clear();
                            let r = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
                            if s.write_all(r).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    #[tokio::test]
    async fn warmed_connections_are_reused_by_concurrent_requests() {
        let (addr, accepted) = server().await;
        let opts = ClientOptions {
            hosts: HostsConfig {
                plain_http_hosts: vec![addr.clone()],
                ..Default::default()
            },
            ..Default::default()
        };
        let c =
            Client::with_credentials(opts, crate::auth::DockerConfig::default()).expect("client");
        let repo = Repository {
            registry: addr,
            name: "r".into(),
        };
        c.warm_connections(&repo, 3);
        let until = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while accepted.load(Ordering::SeqCst) < 3 && tokio::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        // Let the warming answers return their connections to the pool.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let (a, b, d) = tokio::join!(
            c.get_manifest(&repo, "a"),
            c.get_manifest(&repo, "b"),
            c.get_manifest(&repo, "d")
        );
        assert!(a.is_err() && b.is_err() && d.is_err(), "404s");
        assert_eq!(accepted.load(Ordering::SeqCst), 3, "no new connection");
    }
}
