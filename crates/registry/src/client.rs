//! The registry client.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use base64::Engine as _;
use bytes::Bytes;
use reqwest::header::{
    HeaderMap, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use reqwest::{RequestBuilder, Response, StatusCode};
use tracing::{debug, warn};

use crate::auth::{parse_challenge, DockerConfig, SecretKind};
use crate::digest::Digest;
use crate::error::{RegistryError, Result};
use crate::hosts::{Endpoint, HostsConfig};
use crate::keychain::Keychain;
use crate::oci::Descriptor;
use crate::oci::{ImageIndex, MANIFEST_ACCEPT, MEDIA_TYPE_OCI_INDEX};
use crate::reference::Repository;

/// Client settings. Defaults mirror upstream soci-snapshotter's HTTP defaults where they exist.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Endpoints, mirrors, plain HTTP.
    pub hosts: HostsConfig,
    /// TCP connect timeout (default 3 s).
    pub connect_timeout: Duration,
    /// Longest silence while reading a response (default 30 s).
    pub read_timeout: Duration,
    /// Whole-request deadline (default 300 s).
    pub request_timeout: Duration,
    /// Retries after the first attempt on transport errors, 429 and 5xx (default 4).
    pub max_retries: u32,
    /// First backoff (default 50 ms), doubled each retry.
    pub min_backoff: Duration,
    /// Backoff cap, also the cap on honoured `Retry-After` (default 5 s).
    pub max_backoff: Duration,
    /// Largest manifest accepted (default 4 MiB).
    pub max_manifest_bytes: u64,
    /// Chunk size for chunked blob uploads (default 16 MiB).
    pub upload_chunk_bytes: u64,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            hosts: HostsConfig::default(),
            connect_timeout: Duration::from_secs(3),
            read_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(300),
            max_retries: 4,
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            max_manifest_bytes: 4 << 20,
            upload_chunk_bytes: 16 << 20,
        }
    }
}

/// An OCI distribution client. Cheap to share behind an `Arc`; safe for concurrent use.
pub struct Client {
    http: reqwest::Client,
    http_insecure: reqwest::Client,
    opts: ClientOptions,
    creds: Keychain,
    /// Authorization header values by endpoint and scope, with the token's expiry if known.
    auth_cache: Mutex<HashMap<String, CachedAuth>>,
    /// Registries (by host name) seen answering a range request with the whole blob (200):
    /// callers fetch their blobs whole, once, instead of once per range.
    no_ranges: Mutex<HashSet<String>>,
}

/// Largest error body kept (the rest is not read).
const MAX_ERROR_BODY_BYTES: u64 = 4 << 10;
/// Largest token-endpoint answer accepted.
const MAX_TOKEN_BYTES: u64 = 1 << 20;

/// An `Authorization` header value and when it stops being sent (a bearer token's
/// `expires_in`, less a margin), so that an expired token is replaced before a request rather
/// than after the registry refuses it.
struct CachedAuth {
    header: String,
    expires: Option<Instant>,
}

enum Attempt {
    Done(Response),
    Retry(String, Option<Duration>),
}

fn scope(repo: &Repository, push: bool) -> String {
    format!(
        "repository:{}:{}",
        repo.name,
        if push { "pull,push" } else { "pull" }
    )
}

/// Percent-encodes a query value.
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The start of an error body: at most [`MAX_ERROR_BODY_BYTES`] are read, whatever the
/// registry declares or sends.
async fn body_snippet(mut resp: Response) -> String {
    let mut buf = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        let room = MAX_ERROR_BODY_BYTES as usize - buf.len();
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if buf.len() >= MAX_ERROR_BODY_BYTES as usize {
            break;
        }
    }
    String::from_utf8_lossy(&buf).chars().take(300).collect()
}

/// Time left before `deadline` (`None`: no deadline).
pub(crate) fn remaining(deadline: Option<Instant>) -> Option<Duration> {
    deadline.map(|d| d.saturating_duration_since(Instant::now()))
}

impl Client {
    /// A client with credentials from the default docker config file (read again when it
    /// changes; see [`Keychain::docker_default`]).
    pub fn new(opts: ClientOptions) -> Result<Client> {
        Self::with_keychain(opts, Keychain::docker_default())
    }

    /// A client with the given, fixed credentials.
    pub fn with_credentials(opts: ClientOptions, creds: DockerConfig) -> Result<Client> {
        Self::with_keychain(opts, Keychain::new().with(std::sync::Arc::new(creds)))
    }

    /// A client asking `creds` for credentials at every authentication.
    pub fn with_keychain(opts: ClientOptions, creds: Keychain) -> Result<Client> {
        let build = |insecure: bool| {
            reqwest::Client::builder()
                .connect_timeout(opts.connect_timeout)
                .read_timeout(opts.read_timeout)
                .timeout(opts.request_timeout)
                .user_agent(concat!("soci-rs/", env!("CARGO_PKG_VERSION")))
                .tls_danger_accept_invalid_certs(insecure)
                .build()
                .map_err(|e| RegistryError::Config(format!("HTTP client: {e}")))
        };
        Ok(Client {
            http: build(false)?,
            http_insecure: build(true)?,
            opts,
            creds,
            auth_cache: Mutex::new(HashMap::new()),
            no_ranges: Mutex::new(HashSet::new()),
        })
    }

    /// The options in use.
    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    fn http(&self, ep: &Endpoint) -> &reqwest::Client {
        if ep.skip_verify {
            &self.http_insecure
        } else {
            &self.http
        }
    }

    pub(crate) fn backoff_for(&self, attempt: u32) -> Duration {
        self.backoff(attempt, None)
    }

    fn backoff(&self, attempt: u32, hint: Option<Duration>) -> Duration {
        let exp = self
            .opts
            .min_backoff
            .saturating_mul(1u32 << attempt.min(16));
        hint.unwrap_or(exp).min(self.opts.max_backoff)
    }

    /// Whether `registry` honours range requests (as far as seen: until it answers one with
    /// the whole blob).
    pub fn supports_ranges(&self, registry: &str) -> bool {
        !self
            .no_ranges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(registry)
    }

    pub(crate) fn note_no_ranges(&self, registry: &str) {
        let new = self
            .no_ranges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(registry.to_string());
        if new {
            warn!(
                registry,
                "registry ignores range requests; its blobs are fetched whole"
            );
        }
    }

    /// Sends a request built by `build`, handling auth challenges and retrying transport
    /// errors, 429 and 5xx with exponential backoff.
    pub(crate) async fn send(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        push: bool,
        what: &str,
        build: &(dyn Fn(&reqwest::Client) -> RequestBuilder + Sync),
    ) -> Result<Response> {
        self.send_until(ep, repo, push, what, build, None).await
    }

    /// [`Client::send`] within `deadline`: every attempt's timeout and every backoff fit
    /// before it; past it the request fails at once (no attempt is started that could not end
    /// in time).
    pub(crate) async fn send_until(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        push: bool,
        what: &str,
        build: &(dyn Fn(&reqwest::Client) -> RequestBuilder + Sync),
        deadline: Option<Instant>,
    ) -> Result<Response> {
        let retries = AtomicU32::new(0);
        self.send_counted(ep, repo, push, what, build, deadline, &retries)
            .await
    }

    /// [`Client::send_until`] drawing on a retry budget shared with the caller: `retries`
    /// counts the retries made so far (here and by the caller, e.g. after a broken body), and
    /// no retry is made once it reaches `max_retries`. This is the one place transport
    /// retries happen: a request costs at most `max_retries + 1` attempts, whoever retries.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn send_counted(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        push: bool,
        what: &str,
        build: &(dyn Fn(&reqwest::Client) -> RequestBuilder + Sync),
        deadline: Option<Instant>,
        retries: &AtomicU32,
    ) -> Result<Response> {
        let key = format!("{} {}", ep.base, scope(repo, push));
        let mut authed_once = false;
        let mut refreshed_after_403 = false;
        let late = |attempts: u32, why: &str| RegistryError::Transport {
            what: what.into(),
            url: ep.base.clone(),
            message: format!("deadline passed after {attempts} attempts ({why})"),
        };
        let mut last_why = String::from("no answer");
        loop {
            let attempt = retries.load(Ordering::Acquire);
            let mut req = build(self.http(ep));
            if let Some(left) = remaining(deadline) {
                if left.is_zero() {
                    return Err(late(attempt, &last_why));
                }
                req = req.timeout(left.min(self.opts.request_timeout));
            }
            let cached = self.cached_auth(&key);
            if let Some(h) = &cached {
                req = req.header(AUTHORIZATION, h);
            }
            let outcome = match req.send().await {
                Err(e) => Attempt::Retry(format!("{e}"), None),
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED => {
                    if authed_once {
                        return Err(RegistryError::Unauthorized {
                            what: what.into(),
                            registry: repo.registry.clone(),
                            detail: "credentials rejected".into(),
                        });
                    }
                    authed_once = true;
                    self.authenticate(ep, repo, push, what, resp.headers(), &key)
                        .await?;
                    continue;
                }
                // An expired token answered with 403 and no challenge (ECR does this): forget
                // the token and ask again without it, which brings the 401 challenge and one
                // fresh authentication.
                Ok(resp)
                    if resp.status() == StatusCode::FORBIDDEN
                        && cached.is_some()
                        && !authed_once
                        && !refreshed_after_403
                        && !resp.headers().contains_key(WWW_AUTHENTICATE) =>
                {
                    debug!(what, registry = %repo.registry, "403 with a cached token: authenticating again");
                    refreshed_after_403 = true;
                    self.auth_cache
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&key);
                    continue;
                }
                Ok(resp)
                    if resp.status() == StatusCode::TOO_MANY_REQUESTS
                        || resp.status().is_server_error() =>
                {
                    let hint = resp
                        .headers()
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|s| s.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let status = resp.status();
                    Attempt::Retry(
                        format!("status {status}: {}", body_snippet(resp).await),
                        hint,
                    )
                }
                Ok(resp) => Attempt::Done(resp),
            };
            match outcome {
                Attempt::Done(resp) => return Ok(resp),
                Attempt::Retry(why, hint) => {
                    last_why = why.clone();
                    if attempt >= self.opts.max_retries {
                        return Err(RegistryError::Transport {
                            what: what.into(),
                            url: ep.base.clone(),
                            message: format!("{why} (after {} attempts)", attempt + 1),
                        });
                    }
                    let wait = self.backoff(attempt, hint);
                    if remaining(deadline).is_some_and(|left| left <= wait) {
                        return Err(late(attempt + 1, &why));
                    }
                    debug!(what, %why, ?wait, "retrying registry request");
                    tokio::time::sleep(wait).await;
                    retries.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
    }

    /// Answers a 401 challenge: basic credentials, or a bearer token from the realm.
    async fn authenticate(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        push: bool,
        what: &str,
        headers: &HeaderMap,
        key: &str,
    ) -> Result<()> {
        let unauthorized = |detail: &str| RegistryError::Unauthorized {
            what: what.into(),
            registry: repo.registry.clone(),
            detail: detail.into(),
        };
        let challenge = headers
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_challenge)
            .ok_or_else(|| unauthorized("no usable WWW-Authenticate challenge"))?;
        let creds = self.creds.credentials(&repo.registry, &repo.name)?;
        let mut expires = None;
        let header = match challenge.scheme.as_str() {
            _ if creds
                .as_ref()
                .is_some_and(|c| c.kind == SecretKind::RegistryToken) =>
            {
                let c = creds.as_ref().map(|c| c.secret.as_str()).unwrap_or("");
                format!("Bearer {c}")
            }
            "basic" => {
                let c = creds.ok_or_else(|| unauthorized("no credentials configured"))?;
                let raw = format!("{}:{}", c.username, c.secret);
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(raw)
                )
            }
            "bearer" => {
                let realm = challenge
                    .params
                    .get("realm")
                    .ok_or_else(|| unauthorized("bearer challenge without realm"))?;
                let mut url = format!(
                    "{realm}{}scope={}",
                    if realm.contains('?') { '&' } else { '?' },
                    query_escape(&scope(repo, push))
                );
                if let Some(s) = challenge.params.get("service") {
                    url.push_str(&format!("&service={}", query_escape(s)));
                }
                let mut req = self.http(ep).get(&url);
                if let Some(c) = &creds {
                    req = req.basic_auth(&c.username, Some(&c.secret));
                }
                let resp = req.send().await.map_err(|e| RegistryError::Transport {
                    what: format!("token for {what}"),
                    url: realm.clone(),
                    message: format!("{e}"),
                })?;
                if !resp.status().is_success() {
                    return Err(unauthorized(&format!(
                        "token endpoint answered {}",
                        resp.status()
                    )));
                }
                #[derive(serde::Deserialize)]
                struct Token {
                    token: Option<String>,
                    access_token: Option<String>,
                    expires_in: Option<u64>,
                }
                let body = Self::read_capped(resp, &format!("token for {what}"), MAX_TOKEN_BYTES)
                    .await
                    .map_err(|e| unauthorized(&format!("invalid token response: {e}")))?;
                let t: Token = serde_json::from_slice(&body)
                    .map_err(|_| unauthorized("invalid token response"))?;
                if let Some(secs) = t.expires_in.filter(|s| *s > 0) {
                    // Renew a little early: a request started just before expiry still works.
                    let life = secs.saturating_sub((secs / 10).min(30)).max(1);
                    expires = Some(Instant::now() + Duration::from_secs(life));
                }
                let t = t
                    .token
                    .or(t.access_token)
                    .ok_or_else(|| unauthorized("token response without token"))?;
                format!("Bearer {t}")
            }
            other => return Err(unauthorized(&format!("unsupported auth scheme {other}"))),
        };
        self.auth_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string(), CachedAuth { header, expires });
        Ok(())
    }

    /// The cached header for `key`, unless its token has expired (then it is dropped).
    fn cached_auth(&self, key: &str) -> Option<String> {
        let mut cache = self.auth_cache.lock().unwrap_or_else(|e| e.into_inner());
        let entry = cache.get(key)?;
        if entry.expires.is_some_and(|t| Instant::now() >= t) {
            cache.remove(key);
            return None;
        }
        Some(entry.header.clone())
    }

    pub(crate) fn url(ep: &Endpoint, repo: &Repository, tail: &str) -> String {
        format!("{}{}/{}/{}", ep.base, ep.path_prefix, repo.name, tail)
    }

    /// Tries each pull endpoint in order; moves on after not-found and transport errors.
    pub(crate) async fn pull_endpoints<T, F, Fut>(
        &self,
        repo: &Repository,
        resolve: bool,
        mut f: F,
    ) -> Result<T>
    where
        F: FnMut(Endpoint) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let eps: Vec<Endpoint> = self
            .opts
            .hosts
            .endpoints(&repo.registry)?
            .into_iter()
            .filter(|e| if resolve { e.resolve } else { e.pull })
            .collect();
        let mut last = None;
        for (i, ep) in eps.iter().enumerate() {
            match f(ep.clone()).await {
                Ok(v) => return Ok(v),
                Err(e @ (RegistryError::NotFound { .. } | RegistryError::Transport { .. }))
                    if i + 1 < eps.len() =>
                {
                    warn!(endpoint = %ep.base, error = %e, "registry endpoint failed, trying the next");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last
            .unwrap_or_else(|| RegistryError::Config(format!("no endpoint for {}", repo.registry))))
    }

    pub(crate) fn push_endpoint(&self, repo: &Repository) -> Result<Endpoint> {
        self.opts
            .hosts
            .endpoints(&repo.registry)?
            .into_iter()
            .find(|e| e.push)
            .ok_or_else(|| RegistryError::Config(format!("no push endpoint for {}", repo.registry)))
    }

    pub(crate) async fn check_status(
        resp: Response,
        what: &str,
        ok: &[StatusCode],
    ) -> Result<Response> {
        let status = resp.status();
        if ok.contains(&status) {
            return Ok(resp);
        }
        if status == StatusCode::NOT_FOUND {
            return Err(RegistryError::NotFound { what: what.into() });
        }
        Err(RegistryError::Status {
            what: what.into(),
            status: status.as_u16(),
            body: body_snippet(resp).await,
        })
    }

    /// Reads a body up to `limit` bytes (more is an error; the buffer grows as bytes arrive).
    pub(crate) async fn read_capped(mut resp: Response, what: &str, limit: u64) -> Result<Vec<u8>> {
        if resp.content_length().is_some_and(|n| n > limit) {
            return Err(RegistryError::TooLarge {
                what: what.into(),
                limit,
            });
        }
        let mut out = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| RegistryError::Transport {
            what: what.into(),
            url: resp.url().to_string(),
            message: format!("{e}"),
        })? {
            if out.len() as u64 + chunk.len() as u64 > limit {
                return Err(RegistryError::TooLarge {
                    what: what.into(),
                    limit,
                });
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Fetches a manifest or index by tag or digest. The returned bytes match the returned
    /// descriptor's digest (checked against the requested digest or `Docker-Content-Digest`).
    pub async fn get_manifest(
        &self,
        repo: &Repository,
        object: &str,
    ) -> Result<(Descriptor, Bytes)> {
        let what = format!("manifest {}/{}:{object}", repo.registry, repo.name);
        let by_digest = Digest::parse(object);
        self.pull_endpoints(repo, by_digest.is_none(), |ep| {
            let what = what.clone();
            let by_digest = by_digest.clone();
            async move {
                let url = Self::url(&ep, repo, &format!("manifests/{object}"));
                let resp = self
                    .send(&ep, repo, false, &what, &|c| {
                        c.get(&url).header(ACCEPT, MANIFEST_ACCEPT)
                    })
                    .await?;
                let resp = Self::check_status(resp, &what, &[StatusCode::OK]).await?;
                let header_digest = resp
                    .headers()
                    .get("docker-content-digest")
                    .and_then(|v| v.to_str().ok())
                    .and_then(Digest::parse);
                let content_type = resp
                    .headers()
                    .get(CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(|s| s.split(';').next().unwrap_or("").trim().to_string());
                let body = Self::read_capped(resp, &what, self.opts.max_manifest_bytes).await?;
                let actual = Digest::of(&body);
                if let Some(expected) = by_digest.or(header_digest) {
                    if expected != actual {
                        return Err(RegistryError::DigestMismatch {
                            what,
                            expected: expected.to_string(),
                            actual: actual.to_string(),
                        });
                    }
                }
                #[derive(serde::Deserialize)]
                struct Probe {
                    #[serde(rename = "mediaType")]
                    media_type: Option<String>,
                    manifests: Option<serde_json::Value>,
                }
                let probe: Probe =
                    serde_json::from_slice(&body).map_err(|e| RegistryError::Status {
                        what: what.clone(),
                        status: 200,
                        body: format!("invalid JSON: {e}"),
                    })?;
                let media_type = probe
                    .media_type
                    .or(content_type.filter(|c| c.contains("manifest") || c.contains("index")))
                    .unwrap_or_else(|| {
                        if probe.manifests.is_some() {
                            MEDIA_TYPE_OCI_INDEX.to_string()
                        } else {
                            crate::oci::MEDIA_TYPE_OCI_MANIFEST.to_string()
                        }
                    });
                Ok((
                    Descriptor::new(media_type, actual, body.len() as u64),
                    Bytes::from(body),
                ))
            }
        })
        .await
    }

    /// The referrers of `digest` (OCI 1.1 referrers API, then the `sha256-<hex>` tag
    /// fallback), filtered by artifact type. `None` when the registry has neither.
    pub async fn referrers(
        &self,
        repo: &Repository,
        digest: &Digest,
        artifact_type: &str,
    ) -> Result<Option<ImageIndex>> {
        let what = format!("referrers of {digest} in {}/{}", repo.registry, repo.name);
        let ep = self.push_endpoint(repo)?;
        let url = format!(
            "{}?artifactType={artifact_type}",
            Self::url(&ep, repo, &format!("referrers/{digest}"))
        );
        let resp = self
            .send(&ep, repo, false, &what, &|c| {
                c.get(&url).header(ACCEPT, MEDIA_TYPE_OCI_INDEX)
            })
            .await?;
        let body = if resp.status() == StatusCode::OK {
            Some(Self::read_capped(resp, &what, self.opts.max_manifest_bytes).await?)
        } else {
            match self
                .get_manifest(repo, &format!("sha256-{}", digest.hex()))
                .await
            {
                Ok((_, b)) => Some(b.to_vec()),
                Err(e) if e.is_not_found() => None,
                Err(e) => return Err(e),
            }
        };
        let Some(body) = body else { return Ok(None) };
        let mut idx: ImageIndex =
            serde_json::from_slice(&body).map_err(|e| RegistryError::Status {
                what,
                status: 200,
                body: format!("invalid referrers index: {e}"),
            })?;
        idx.manifests
            .retain(|d| d.artifact_type.as_deref() == Some(artifact_type));
        Ok(Some(idx))
    }
}

#[cfg(test)]
#[path = "auth_tests.rs"]
mod auth_tests;
