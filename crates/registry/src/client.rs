//! The registry client.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::{Response, StatusCode};
use tracing::warn;

use crate::auth::DockerConfig;
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
/// Longest token life we believe (a day), whatever `expires_in` says.
pub(crate) const MAX_TOKEN_LIFE_SECS: u64 = 24 * 3600;

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

    pub(crate) fn http(&self, ep: &Endpoint) -> &reqwest::Client {
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
    #[tracing::instrument(level = "debug", name = "get_manifest", skip_all, fields(repo = %repo.name, object = %object))]
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
    #[tracing::instrument(level = "debug", name = "referrers", skip_all, fields(repo = %repo.name, digest = %digest))]
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

#[path = "send.rs"]
mod send;

#[cfg(test)]
#[path = "auth_tests.rs"]
mod auth_tests;
