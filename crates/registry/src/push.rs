//! Pushing to a registry: blob uploads (monolithic and chunked), cross-repository mounts,
//! manifests.

use bytes::Bytes;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION};
use reqwest::{Method, Response, StatusCode};
use sha2::{Digest as _, Sha256};

use crate::client::Client;
use crate::digest::Digest;
use crate::error::{RegistryError, Result};
use crate::hosts::Endpoint;
use crate::reference::Repository;

impl Client {
    fn absolute(ep: &Endpoint, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else {
            format!("{}{}", ep.base, location)
        }
    }

    async fn start_upload(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        what: &str,
        query: &str,
    ) -> Result<Response> {
        let url = format!("{}{}", Self::url(ep, repo, "blobs/uploads/"), query);
        let resp = self
            .send(ep, repo, true, what, &|c| {
                c.request(Method::POST, &url).header(CONTENT_LENGTH, "0")
            })
            .await?;
        Self::check_status(resp, what, &[StatusCode::ACCEPTED, StatusCode::CREATED]).await
    }

    fn location(resp: &Response, ep: &Endpoint, what: &str) -> Result<String> {
        let loc = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| RegistryError::Status {
                what: what.into(),
                status: resp.status().as_u16(),
                body: "upload without Location".into(),
            })?;
        Ok(Self::absolute(ep, loc))
    }

    fn with_digest(loc: &str, digest: &Digest) -> String {
        let sep = if loc.contains('?') { '&' } else { '?' };
        format!("{loc}{sep}digest={digest}")
    }

    /// Pushes a blob in one request (skipped when the registry already has it).
    pub async fn push_blob(&self, repo: &Repository, digest: &Digest, data: Bytes) -> Result<()> {
        if self.blob_size(repo, digest).await?.is_some() {
            return Ok(());
        }
        let what = format!("push of blob {digest} to {}/{}", repo.registry, repo.name);
        let actual = Digest::of(&data);
        if &actual != digest {
            return Err(RegistryError::DigestMismatch {
                what,
                expected: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        let ep = self.push_endpoint(repo)?;
        let resp = self.start_upload(&ep, repo, &what, "").await?;
        let location = Self::location(&resp, &ep, &what)?;
        self.finish_upload(&ep, repo, &what, &location, digest, data)
            .await
    }

    /// Pushes a blob from a file in chunks (PATCH with Content-Range, then PUT).
    pub async fn push_blob_file(
        &self,
        repo: &Repository,
        digest: &Digest,
        path: &std::path::Path,
    ) -> Result<()> {
        use tokio::io::AsyncReadExt;
        if self.blob_size(repo, digest).await?.is_some() {
            return Ok(());
        }
        let what = format!("push of blob {digest} to {}/{}", repo.registry, repo.name);
        let io = |e| RegistryError::Io {
            what: what.clone(),
            source: e,
        };
        let mut f = tokio::fs::File::open(path).await.map_err(io)?;
        let ep = self.push_endpoint(repo)?;
        let resp = self.start_upload(&ep, repo, &what, "").await?;
        let mut loc = Self::location(&resp, &ep, &what)?;
        let mut offset: u64 = 0;
        let mut hasher = Sha256::new();
        loop {
            let mut chunk = Vec::with_capacity(self.options().upload_chunk_bytes as usize);
            (&mut f)
                .take(self.options().upload_chunk_bytes)
                .read_to_end(&mut chunk)
                .await
                .map_err(io)?;
            if chunk.is_empty() {
                break;
            }
            hasher.update(&chunk);
            let end = offset + chunk.len() as u64 - 1;
            let body = Bytes::from(chunk);
            let l = loc.clone();
            let resp = self
                .send(&ep, repo, true, &what, &|c| {
                    c.patch(&l)
                        .header(CONTENT_TYPE, "application/octet-stream")
                        .header(CONTENT_RANGE, format!("{offset}-{end}"))
                        .body(body.clone())
                })
                .await?;
            let resp =
                Self::check_status(resp, &what, &[StatusCode::ACCEPTED, StatusCode::NO_CONTENT])
                    .await?;
            loc = Self::location(&resp, &ep, &what)?;
            offset = end + 1;
        }
        let actual = Digest::from_hasher(hasher);
        if &actual != digest {
            return Err(RegistryError::DigestMismatch {
                what,
                expected: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        self.finish_upload(&ep, repo, &what, &loc, digest, Bytes::new())
            .await
    }

    /// Completes an upload session with a PUT of `body` (empty after PATCHed chunks).
    async fn finish_upload(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        what: &str,
        location: &str,
        digest: &Digest,
        body: Bytes,
    ) -> Result<()> {
        let put = Self::with_digest(location, digest);
        let resp = self
            .send(ep, repo, true, what, &|c| {
                c.put(&put)
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .body(body.clone())
            })
            .await?;
        Self::check_status(
            resp,
            what,
            &[StatusCode::CREATED, StatusCode::NO_CONTENT, StatusCode::OK],
        )
        .await?;
        Ok(())
    }

    /// Asks the registry to mount a blob from another repository; `false` if it did not.
    pub async fn mount_blob(
        &self,
        repo: &Repository,
        from: &Repository,
        digest: &Digest,
    ) -> Result<bool> {
        if repo.registry != from.registry {
            return Ok(false);
        }
        if self.blob_size(repo, digest).await?.is_some() {
            return Ok(true);
        }
        let what = format!(
            "mount of blob {digest} from {} into {}",
            from.name, repo.name
        );
        let ep = self.push_endpoint(repo)?;
        let resp = self
            .start_upload(
                &ep,
                repo,
                &what,
                &format!("?mount={digest}&from={}", from.name),
            )
            .await?;
        Ok(resp.status() == StatusCode::CREATED)
    }

    /// Pushes a manifest under a tag or its digest; returns its digest.
    pub async fn put_manifest(
        &self,
        repo: &Repository,
        object: &str,
        media_type: &str,
        body: Bytes,
    ) -> Result<Digest> {
        let digest = Digest::of(&body);
        let what = format!(
            "push of manifest {digest} to {}/{}:{object}",
            repo.registry, repo.name
        );
        let ep = self.push_endpoint(repo)?;
        let url = Self::url(&ep, repo, &format!("manifests/{object}"));
        let resp = self
            .send(&ep, repo, true, &what, &|c| {
                c.put(&url)
                    .header(CONTENT_TYPE, media_type)
                    .body(body.clone())
            })
            .await?;
        Self::check_status(
            resp,
            &what,
            &[StatusCode::CREATED, StatusCode::OK, StatusCode::ACCEPTED],
        )
        .await?;
        Ok(digest)
    }
}
