//! Authentication against a tiny local HTTP registry: token refresh after a 403 without a
//! challenge (ECR's answer to an expired token), token expiry, registry tokens.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::auth::Credentials;
use crate::client::{Client, ClientOptions};
use crate::hosts::HostsConfig;
use crate::keychain::{CredentialSource, Keychain};
use crate::reference::Repository;

const MANIFEST: &[u8] = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"a","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":1},"layers":[]}"#;

/// Token server and registry in one: `/token` issues `t1`, `t2`, ... (valid until revoked);
/// `/v2/...` wants the newest token: none → 401 challenge, an older or revoked one → 403
/// without a challenge.
struct Fake {
    issued: AtomicUsize,
    revoked: AtomicBool,
    refuse_all: AtomicBool,
    expires_in: u64,
    seen: Mutex<Vec<String>>,
}

async fn serve(fake: Arc<Fake>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let a2 = addr.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let (fake, addr) = (fake.clone(), a2.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let text = String::from_utf8_lossy(&head).to_string();
                let path = text.split_whitespace().nth(1).unwrap_or("").to_string();
                let auth = text.lines().find_map(|l| {
                    l.to_ascii_lowercase()
                        .starts_with("authorization: ")
                        .then(|| l["authorization: ".len()..].trim().to_string())
                });
                fake.seen
                    .lock()
                    .unwrap()
                    .push(format!("{path} {}", auth.clone().unwrap_or_default()));
                let (status, headers, body): (&str, String, Vec<u8>) = if path.starts_with("/token")
                {
                    let n = fake.issued.fetch_add(1, Ordering::SeqCst) + 1;
                    fake.revoked.store(false, Ordering::SeqCst);
                    (
                        "200 OK",
                        "Content-Type: application/json\r\n".into(),
                        format!(r#"{{"token":"t{n}","expires_in":{}}}"#, fake.expires_in)
                            .into_bytes(),
                    )
                } else {
                    let newest = format!("Bearer t{}", fake.issued.load(Ordering::SeqCst));
                    match auth {
                        None => (
                            "401 Unauthorized",
                            format!("WWW-Authenticate: Bearer realm=\"http://{addr}/token\",service=\"fake\"\r\n"),
                            Vec::new(),
                        ),
                        Some(a)
                            if a == newest
                                && !fake.revoked.load(Ordering::SeqCst)
                                && !fake.refuse_all.load(Ordering::SeqCst) => (
                            "200 OK",
                            "Content-Type: application/vnd.oci.image.manifest.v1+json\r\n".into(),
                            MANIFEST.to_vec(),
                        ),
                        Some(a) if a == "Bearer registry-tok" => (
                            "200 OK",
                            "Content-Type: application/vnd.oci.image.manifest.v1+json\r\n".into(),
                            MANIFEST.to_vec(),
                        ),
                        Some(_) => ("403 Forbidden", String::new(), b"denied".to_vec()),
                    }
                };
                let raw = format!(
                    "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n{headers}\r\n",
                    body.len()
                );
                let _ = s.write_all(raw.as_bytes()).await;
                let _ = s.write_all(&body).await;
            });
        }
    });
    addr
}

fn client(addr: &str, kc: Keychain) -> (Client, Repository) {
    let opts = ClientOptions {
        hosts: HostsConfig {
            plain_http_hosts: vec![addr.to_string()],
            ..Default::default()
        },
        max_retries: 1,
        min_backoff: Duration::from_millis(10),
        ..Default::default()
    };
    let repo = Repository {
        registry: addr.to_string(),
        name: "r".into(),
    };
    (Client::with_keychain(opts, kc).unwrap(), repo)
}

fn fake(expires_in: u64) -> Arc<Fake> {
    Arc::new(Fake {
        issued: AtomicUsize::new(0),
        revoked: AtomicBool::new(false),
        refuse_all: AtomicBool::new(false),
        expires_in,
        seen: Mutex::new(Vec::new()),
    })
}

#[tokio::test]
async fn expired_token_answered_with_403_gets_one_fresh_authentication() {
    let f = fake(3600);
    let addr = serve(f.clone()).await;
    let (c, repo) = client(&addr, Keychain::new());
    c.get_manifest(&repo, "v1").await.unwrap();
    assert_eq!(f.issued.load(Ordering::SeqCst), 1);
    // The registry now considers t1 expired and says 403 without a challenge.
    f.revoked.store(true, Ordering::SeqCst);
    c.get_manifest(&repo, "v1")
        .await
        .unwrap_or_else(|e| panic!("{e}: {:#?}", f.seen.lock().unwrap()));
    assert_eq!(f.issued.load(Ordering::SeqCst), 2, "one fresh token");
}

#[tokio::test]
async fn a_403_after_fresh_authentication_is_an_error_not_a_loop() {
    let f = fake(3600);
    let addr = serve(f.clone()).await;
    let (c, repo) = client(&addr, Keychain::new());
    c.get_manifest(&repo, "v1").await.unwrap();
    // Every token is refused from now on.
    f.refuse_all.store(true, Ordering::SeqCst);
    let e = c.get_manifest(&repo, "v1").await.unwrap_err();
    assert!(e.to_string().contains("403"), "{e}");
    assert_eq!(
        f.issued.load(Ordering::SeqCst),
        2,
        "exactly one fresh token"
    );
}

#[tokio::test]
async fn token_past_its_expires_in_is_renewed_before_use() {
    let f = fake(1);
    let addr = serve(f.clone()).await;
    let (c, repo) = client(&addr, Keychain::new());
    c.get_manifest(&repo, "v1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    c.get_manifest(&repo, "v1").await.unwrap();
    assert_eq!(f.issued.load(Ordering::SeqCst), 2);
    let seen = f.seen.lock().unwrap();
    let refused = seen
        .iter()
        .filter(|l| l.contains("/v2/") && l.ends_with(" "))
        .count();
    // Unauthenticated manifest requests: the first one and the one after the expiry; the
    // expired token itself was never sent again.
    assert_eq!(refused, 2, "{seen:#?}");
    assert_eq!(
        seen.iter().filter(|l| l.ends_with("Bearer t1")).count(),
        1,
        "{seen:#?}"
    );
}

struct RegistryToken;
impl CredentialSource for RegistryToken {
    fn credentials(&self, _: &str, _: &str) -> crate::Result<Option<Credentials>> {
        Ok(Some(Credentials::registry_token("registry-tok")))
    }
}

#[tokio::test]
async fn registry_token_is_sent_as_bearer_without_token_endpoint() {
    let f = fake(3600);
    let addr = serve(f.clone()).await;
    let (c, repo) = client(&addr, Keychain::new().with(Arc::new(RegistryToken)));
    c.get_manifest(&repo, "v1").await.unwrap();
    assert_eq!(f.issued.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_absurd_expires_in_is_capped_not_a_panic() {
    let f = fake(u64::MAX);
    let addr = serve(f.clone()).await;
    let (c, repo) = client(&addr, Keychain::new());
    c.get_manifest(&repo, "v1").await.unwrap();
    c.get_manifest(&repo, "v1").await.unwrap();
    assert_eq!(f.issued.load(Ordering::SeqCst), 1, "the token is reused");
}
