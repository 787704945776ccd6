//! Reading blobs: whole (size- and digest-verified, streamed) or by HTTP range.
//!
//! Every size here comes from someone else (a descriptor, a zTOC, a response header), so no
//! buffer is sized from one before the bytes arrive: buffers grow as bytes come, capped by
//! what was asked for. A range answer is accepted only when it is exactly the bytes asked
//! for; a registry that answers a range request with the whole blob (200) is remembered so
//! that callers fetch its blobs whole, once ([`Client::supports_ranges`]).

use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use reqwest::{Response, StatusCode};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::client::{remaining, Client};
use crate::digest::Digest;
use crate::error::{RegistryError, Result};
use crate::oci::Descriptor;
use crate::reference::Repository;

/// Largest blob [`Client::get_blob`] keeps in memory (configs, zTOCs); bigger ones are
/// streamed with [`Client::get_blob_to`].
pub const MAX_BLOB_IN_MEMORY: u64 = 1 << 30;

/// First allocation for an in-memory blob; the buffer grows as bytes arrive.
const INITIAL_BLOB_BUFFER: u64 = 1 << 20;

/// A whole blob being read: never more than its descriptor's size; size and digest checked
/// when the body ends.
pub struct BlobStream {
    resp: Response,
    what: String,
    expected: Descriptor,
    hasher: Sha256,
    received: u64,
    done: bool,
}

impl BlobStream {
    /// The next chunk of the blob, `None` at the end (after its size and digest matched).
    pub async fn chunk(&mut self) -> Result<Option<Bytes>> {
        if self.done {
            return Ok(None);
        }
        let next = self
            .resp
            .chunk()
            .await
            .map_err(|e| RegistryError::Transport {
                what: self.what.clone(),
                url: self.resp.url().to_string(),
                message: format!("{e}"),
            })?;
        let Some(chunk) = next else {
            self.done = true;
            let actual = Digest::from_hasher(std::mem::take(&mut self.hasher));
            if self.received != self.expected.size || actual != self.expected.digest {
                return Err(RegistryError::DigestMismatch {
                    what: format!(
                        "{} ({} of {} bytes)",
                        self.what, self.received, self.expected.size
                    ),
                    expected: self.expected.digest.to_string(),
                    actual: actual.to_string(),
                });
            }
            return Ok(None);
        };
        self.received += chunk.len() as u64;
        if self.received > self.expected.size {
            self.done = true;
            return Err(RegistryError::TooLarge {
                what: self.what.clone(),
                limit: self.expected.size,
            });
        }
        self.hasher.update(&chunk);
        Ok(Some(chunk))
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }
}

/// A failed range attempt, and whether another attempt may succeed.
struct RangeFailure {
    error: RegistryError,
    retry: bool,
}

impl RangeFailure {
    fn fatal(error: RegistryError) -> Self {
        RangeFailure {
            error,
            retry: false,
        }
    }
    fn retry(error: RegistryError) -> Self {
        RangeFailure { error, retry: true }
    }
}

/// Parses `bytes START-END/TOTAL` (TOTAL may be `*`) into `START..END+1`.
fn parse_content_range(v: &str) -> Option<Range<u64>> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    let end = b.checked_add(1)?;
    if a >= end {
        return None;
    }
    let total = total.trim();
    if total != "*" && total.parse::<u64>().ok()? < end {
        return None;
    }
    Some(a..end)
}

/// Where a streamed range read hands its bytes: (offset in the range, bytes).
type Progress<'a> = &'a (dyn Fn(u64, &[u8]) + Send + Sync);

impl Client {
    async fn blob_response(
        &self,
        repo: &Repository,
        digest: &Digest,
        what: &str,
        range: Option<&Range<u64>>,
        deadline: Option<Instant>,
        retries: &AtomicU32,
    ) -> Result<Response> {
        self.pull_endpoints(repo, false, |ep| async move {
            let url = Self::url(&ep, repo, &format!("blobs/{digest}"));
            let range_header = range.map(|r| format!("bytes={}-{}", r.start, r.end - 1));
            let resp = self
                .send_counted(
                    &ep,
                    repo,
                    false,
                    what,
                    &|c| {
                        let b = c.get(&url);
                        match &range_header {
                            Some(h) => b.header(RANGE, h),
                            None => b,
                        }
                    },
                    deadline,
                    retries,
                )
                .await?;
            Self::check_status(resp, what, &[StatusCode::OK, StatusCode::PARTIAL_CONTENT]).await
        })
        .await
    }

    /// Fetches a whole blob into memory and verifies it. Blobs over
    /// [`MAX_BLOB_IN_MEMORY`] are refused before any request; the buffer grows as bytes
    /// arrive (never sized from the descriptor alone).
    #[tracing::instrument(level = "debug", name = "get_blob", skip_all, fields(digest = %desc.digest, size = desc.size))]
    pub async fn get_blob(&self, repo: &Repository, desc: &Descriptor) -> Result<Bytes> {
        if desc.size > MAX_BLOB_IN_MEMORY {
            return Err(RegistryError::TooLarge {
                what: format!("blob {} in {}/{}", desc.digest, repo.registry, repo.name),
                limit: MAX_BLOB_IN_MEMORY,
            });
        }
        let mut buf = Vec::with_capacity(desc.size.min(INITIAL_BLOB_BUFFER) as usize);
        self.get_blob_to(repo, desc, &mut buf).await?;
        Ok(Bytes::from(buf))
    }

    /// Opens a whole blob for streaming (size capped by `desc.size`, digest checked at the
    /// end), within `deadline` if given (else the client's request timeout).
    pub async fn open_blob(
        &self,
        repo: &Repository,
        desc: &Descriptor,
        deadline: Option<Instant>,
    ) -> Result<BlobStream> {
        let what = format!("blob {} in {}/{}", desc.digest, repo.registry, repo.name);
        let resp = self
            .blob_response(
                repo,
                &desc.digest,
                &what,
                None,
                deadline,
                &AtomicU32::new(0),
            )
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(RegistryError::Status {
                what,
                status: resp.status().as_u16(),
                body: "partial answer to a whole-blob request".into(),
            });
        }
        if resp.content_length().is_some_and(|n| n != desc.size) {
            return Err(RegistryError::Status {
                what,
                status: 200,
                body: format!(
                    "Content-Length {:?} differs from the descriptor size {}",
                    resp.content_length(),
                    desc.size
                ),
            });
        }
        Ok(BlobStream {
            resp,
            what,
            expected: desc.clone(),
            hasher: Sha256::new(),
            received: 0,
            done: false,
        })
    }

    /// Streams a blob into `out`, verifying its size and digest. On error `out` may hold a
    /// partial copy: discard it.
    pub async fn get_blob_to<W: AsyncWrite + Unpin>(
        &self,
        repo: &Repository,
        desc: &Descriptor,
        out: &mut W,
    ) -> Result<()> {
        let mut stream = self.open_blob(repo, desc, None).await?;
        let io_err = |e| RegistryError::Io {
            what: stream_what(repo, desc),
            source: e,
        };
        while let Some(chunk) = stream.chunk().await? {
            out.write_all(&chunk).await.map_err(io_err)?;
        }
        out.flush().await.map_err(io_err)?;
        Ok(())
    }

    /// Reads bytes `range` of a blob with an HTTP range request (not verified here: callers
    /// verify span digests). See [`Client::get_blob_range_until`].
    pub async fn get_blob_range(
        &self,
        repo: &Repository,
        digest: &Digest,
        range: Range<u64>,
    ) -> Result<Bytes> {
        self.get_blob_range_until(repo, digest, range, None).await
    }

    /// Reads exactly bytes `range` of a blob, all attempts within `deadline` (else each
    /// attempt within the client's request timeout). Failed requests (transport errors, 429,
    /// 5xx) and broken transfers (reset, truncated body) share one budget of `max_retries`
    /// retries, so a range costs at most `max_retries + 1` HTTP attempts; a 206 whose `Content-Range` or
    /// `Content-Length` is not the range asked for, or whose body runs past it, is an error
    /// at once. A 200 (range ignored) is read only up to the range end, then dropped, and the
    /// registry is remembered as one without range support.
    pub async fn get_blob_range_until(
        &self,
        repo: &Repository,
        digest: &Digest,
        range: Range<u64>,
        deadline: Option<Instant>,
    ) -> Result<Bytes> {
        self.range_read(repo, digest, range, deadline, None).await
    }

    /// As [`Client::get_blob_range_until`], but handing each part of the range to `progress`
    /// as it arrives (with its offset in the range) instead of collecting it: bytes in order
    /// from 0, and from 0 again on a retry. Ok once all of the range went to `progress`.
    pub async fn get_blob_range_streamed(
        &self,
        repo: &Repository,
        digest: &Digest,
        range: Range<u64>,
        deadline: Option<Instant>,
        progress: &(dyn Fn(u64, &[u8]) + Send + Sync),
    ) -> Result<()> {
        self.range_read(repo, digest, range, deadline, Some(progress))
            .await
            .map(drop)
    }

    #[tracing::instrument(level = "debug", name = "get_range", skip_all, fields(digest = %digest, start = range.start, len = range.end - range.start))]
    async fn range_read(
        &self,
        repo: &Repository,
        digest: &Digest,
        range: Range<u64>,
        deadline: Option<Instant>,
        progress: Option<Progress<'_>>,
    ) -> Result<Bytes> {
        let what = format!(
            "blob {digest} bytes {}-{} in {}/{}",
            range.start, range.end, repo.registry, repo.name
        );
        if range.start >= range.end {
            return Ok(Bytes::new());
        }
        let retries = AtomicU32::new(0);
        loop {
            let failure = match self
                .range_once(repo, digest, &range, &what, (deadline, &retries), progress)
                .await
            {
                Ok(b) => return Ok(b),
                Err(f) => f,
            };
            let attempt = retries.load(Ordering::Acquire);
            let wait = self.backoff_for(attempt);
            // A request error already used up the budget inside the client's send loop.
            if !failure.retry
                || attempt >= self.options().max_retries
                || remaining(deadline).is_some_and(|left| left <= wait)
            {
                return Err(failure.error);
            }
            tracing::debug!(what, error = %failure.error, "range read failed; retrying");
            tokio::time::sleep(wait).await;
            retries.fetch_add(1, Ordering::AcqRel);
        }
    }

    async fn range_once(
        &self,
        repo: &Repository,
        digest: &Digest,
        range: &Range<u64>,
        what: &str,
        (deadline, retries): (Option<Instant>, &AtomicU32),
        progress: Option<Progress<'_>>,
    ) -> std::result::Result<Bytes, RangeFailure> {
        let want = range.end - range.start;
        // The send loop retried request failures within the shared budget: not again here.
        let mut resp = self
            .blob_response(repo, digest, what, Some(range), deadline, retries)
            .await
            .map_err(RangeFailure::fatal)?;
        let url = resp.url().to_string();
        let protocol = |msg: String| {
            RangeFailure::fatal(RegistryError::Status {
                what: what.into(),
                status: resp.status().as_u16(),
                body: msg,
            })
        };
        let partial = resp.status() == StatusCode::PARTIAL_CONTENT;
        let declared = resp
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let (skip, limit) = if partial {
            let cr = resp
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            match cr.as_deref().map(parse_content_range) {
                None => return Err(protocol("partial answer without Content-Range".into())),
                Some(Some(r)) if r == *range => {}
                Some(_) => {
                    return Err(protocol(format!(
                        "Content-Range {:?} is not the requested bytes {}-{}",
                        cr.unwrap_or_default(),
                        range.start,
                        range.end - 1
                    )))
                }
            }
            if declared.is_some_and(|n| n != want) {
                return Err(protocol(format!(
                    "Content-Length {declared:?} for a {want}-byte range"
                )));
            }
            (0, want)
        } else {
            self.note_no_ranges(&repo.registry);
            if declared.is_some_and(|n| n < range.end) {
                return Err(protocol(format!(
                    "whole-blob answer of {declared:?} bytes ends before byte {}",
                    range.end
                )));
            }
            (range.start, range.end)
        };
        // Grows as bytes arrive; never more than `want` bytes are kept.
        // Collected only without `progress` (which gets the bytes instead).
        let mut out: Vec<u8> = Vec::new();
        let mut got: u64 = 0;
        let mut pos: u64 = 0;
        loop {
            let chunk = match resp.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    return Err(RangeFailure::retry(RegistryError::Transport {
                        what: what.into(),
                        url,
                        message: format!("{e} after {got} of {want} bytes"),
                    }))
                }
            };
            let (cs, ce) = (pos, pos + chunk.len() as u64);
            pos = ce;
            if partial && ce > want {
                return Err(RangeFailure::fatal(RegistryError::Status {
                    what: what.into(),
                    status: 206,
                    body: format!("body longer than the {want}-byte range"),
                }));
            }
            let (a, b) = (cs.max(skip), ce.min(limit));
            if a < b {
                let part = &chunk[(a - cs) as usize..(b - cs) as usize];
                match progress {
                    Some(p) => p(got, part),
                    None => out.extend_from_slice(part),
                }
                got += part.len() as u64;
            }
            if !partial && pos >= limit {
                // The rest of the blob is not needed: dropping the response closes the
                // connection instead of reading on.
                break;
            }
        }
        if got != want {
            return Err(RangeFailure::retry(RegistryError::Transport {
                what: what.into(),
                url,
                message: format!("short body: {got} of {want} bytes"),
            }));
        }
        Ok(Bytes::from(out))
    }

    /// Size of a blob if it exists (HEAD).
    pub async fn blob_size(&self, repo: &Repository, digest: &Digest) -> Result<Option<u64>> {
        let what = format!("blob {digest} in {}/{}", repo.registry, repo.name);
        let ep = self.push_endpoint(repo)?;
        let url = Self::url(&ep, repo, &format!("blobs/{digest}"));
        let resp = self
            .send(&ep, repo, false, &what, &|c| c.head(&url))
            .await?;
        match resp.status() {
            StatusCode::OK => Ok(resp
                .headers()
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.parse().ok())),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(RegistryError::Status {
                what,
                status: s.as_u16(),
                body: String::new(),
            }),
        }
    }
}

fn stream_what(repo: &Repository, desc: &Descriptor) -> String {
    format!("blob {} in {}/{}", desc.digest, repo.registry, repo.name)
}

#[cfg(test)]
#[path = "blobs_tests.rs"]
mod tests;
