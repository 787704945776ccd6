//! Sending one request: authentication (401 challenges, basic and bearer, a token renewed
//! after a bare 403) and the one transport retry loop of the client (transport errors, 429 and
//! 5xx, exponential backoff, `Retry-After` honoured up to `max_backoff`), all within the
//! caller's deadline.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use base64::Engine as _;
use reqwest::header::{HeaderMap, AUTHORIZATION, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{RequestBuilder, Response, StatusCode};
use tokio::time::Instant;
use tracing::debug;

use super::{
    body_snippet, query_escape, remaining, scope, Attempt, CachedAuth, Client, MAX_TOKEN_BYTES,
    MAX_TOKEN_LIFE_SECS,
};
use crate::auth::{parse_challenge, SecretKind};
use crate::error::{RegistryError, Result};
use crate::hosts::Endpoint;
use crate::reference::Repository;

impl Client {
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
    #[tracing::instrument(level = "debug", name = "http", skip_all, fields(what = %what, attempts = tracing::field::Empty, status = tracing::field::Empty))]
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
                Attempt::Done(resp) => {
                    let span = tracing::Span::current();
                    span.record("status", resp.status().as_u16());
                    span.record("attempts", attempt + 1);
                    return Ok(resp);
                }
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
    #[tracing::instrument(level = "debug", name = "auth", skip_all, fields(what = %what))]
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
                    // Capped at a day: the value is the token server's, and an absurd one
                    // must not overflow the clock (a panic in whatever task asked).
                    let secs = secs.min(MAX_TOKEN_LIFE_SECS);
                    let life = secs.saturating_sub((secs / 10).min(30)).max(1);
                    expires = Instant::now().checked_add(Duration::from_secs(life));
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
}
