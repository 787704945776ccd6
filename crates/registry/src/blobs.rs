//! Reading blobs: whole (size- and digest-verified, streamed) or by HTTP range.

use std::ops::Range;

use bytes::Bytes;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use reqwest::{Response, StatusCode};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::client::Client;
use crate::digest::Digest;
use crate::error::{RegistryError, Result};
use crate::oci::Descriptor;
use crate::reference::Repository;

impl Client {
    async fn blob_response(
        &self,
        repo: &Repository,
        digest: &Digest,
        what: &str,
        range: Option<&Range<u64>>,
    ) -> Result<Response> {
        self.pull_endpoints(repo, false, |ep| async move {
            let url = Self::url(&ep, repo, &format!("blobs/{digest}"));
            let range_header = range.map(|r| format!("bytes={}-{}", r.start, r.end - 1));
            let resp = self
                .send(&ep, repo, false, what, &|c| {
                    let b = c.get(&url);
                    match &range_header {
                        Some(h) => b.header(RANGE, h),
                        None => b,
                    }
                })
                .await?;
            Self::check_status(resp, what, &[StatusCode::OK, StatusCode::PARTIAL_CONTENT]).await
        })
        .await
    }

    /// Fetches a whole blob into memory and verifies it (size capped by `desc.size`).
    pub async fn get_blob(&self, repo: &Repository, desc: &Descriptor) -> Result<Bytes> {
        let mut buf = Vec::with_capacity(desc.size.min(64 << 20) as usize);
        self.get_blob_to(repo, desc, &mut buf).await?;
        Ok(Bytes::from(buf))
    }

    /// Streams a blob into `out`, verifying its size and digest. On error `out` may hold a
    /// partial copy: discard it.
    pub async fn get_blob_to<W: AsyncWrite + Unpin>(
        &self,
        repo: &Repository,
        desc: &Descriptor,
        out: &mut W,
    ) -> Result<()> {
        let what = format!("blob {} in {}/{}", desc.digest, repo.registry, repo.name);
        let mut resp = self.blob_response(repo, &desc.digest, &what, None).await?;
        let mut hasher = Sha256::new();
        let mut n: u64 = 0;
        while let Some(chunk) = resp.chunk().await.map_err(|e| RegistryError::Transport {
            what: what.clone(),
            url: resp.url().to_string(),
            message: format!("{e}"),
        })? {
            n += chunk.len() as u64;
            if n > desc.size {
                return Err(RegistryError::TooLarge {
                    what,
                    limit: desc.size,
                });
            }
            hasher.update(&chunk);
            out.write_all(&chunk).await.map_err(|e| RegistryError::Io {
                what: what.clone(),
                source: e,
            })?;
        }
        out.flush().await.map_err(|e| RegistryError::Io {
            what: what.clone(),
            source: e,
        })?;
        let actual = Digest::from_hasher(hasher);
        if n != desc.size || actual != desc.digest {
            return Err(RegistryError::DigestMismatch {
                what,
                expected: desc.digest.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(())
    }

    /// Reads bytes `range` of a blob with an HTTP range request (not verified here: callers
    /// verify span digests). A server that ignores `Range` is handled by reading up to the
    /// range end and slicing.
    pub async fn get_blob_range(
        &self,
        repo: &Repository,
        digest: &Digest,
        range: Range<u64>,
    ) -> Result<Bytes> {
        let what = format!(
            "blob {digest} bytes {}-{} in {}/{}",
            range.start, range.end, repo.registry, repo.name
        );
        if range.start >= range.end {
            return Ok(Bytes::new());
        }
        let want = range.end - range.start;
        let mut resp = self
            .blob_response(repo, digest, &what, Some(&range))
            .await?;
        let partial = resp.status() == StatusCode::PARTIAL_CONTENT;
        if partial {
            let cr = resp
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let expect_prefix = format!("bytes {}-{}/", range.start, range.end - 1);
            if !cr.is_empty() && !cr.starts_with(&expect_prefix) {
                return Err(RegistryError::Status {
                    what,
                    status: 206,
                    body: format!("unexpected Content-Range {cr}"),
                });
            }
        }
        let (skip, limit) = if partial {
            (0, want)
        } else {
            (range.start, range.end)
        };
        let mut out = Vec::with_capacity(want as usize);
        let mut pos: u64 = 0;
        while let Some(chunk) = resp.chunk().await.map_err(|e| RegistryError::Transport {
            what: what.clone(),
            url: resp.url().to_string(),
            message: format!("{e}"),
        })? {
            let (cs, ce) = (pos, pos + chunk.len() as u64);
            pos = ce;
            let (a, b) = (cs.max(skip), ce.min(limit));
            if a < b {
                out.extend_from_slice(&chunk[(a - cs) as usize..(b - cs) as usize]);
            }
            if pos >= limit {
                break;
            }
        }
        if out.len() as u64 != want {
            return Err(RegistryError::Transport {
                what,
                url: resp.url().to_string(),
                message: format!("short read: {} of {want} bytes", out.len()),
            });
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
