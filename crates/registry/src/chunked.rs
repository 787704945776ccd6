//! Chunked parallel download of a whole blob: a big layer is fetched as several HTTP range
//! requests at once and its bytes are handed on strictly in order (to an unpacker or a file),
//! so a full pull is not limited by one connection's throughput.
//!
//! Why this shape: memory stays bounded by `window x chunk_size` (a chunk fetched ahead of
//! the writer waits in the window; no new request starts until the oldest chunk is written),
//! every request has a deadline (the client's request timeout per attempt, bounded retries),
//! and the whole blob's size and digest are checked as the bytes stream out, so a caller
//! discards its output on any error. A registry that ignores ranges is detected by the range
//! reader ([`Client::supports_ranges`]); the download then goes on as one whole-blob stream
//! from the byte it had reached, without re-fetching chunks already written.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::client::Client;
use crate::error::{RegistryError, Result};
use crate::oci::Descriptor;
use crate::reference::Repository;

/// How a blob is split into parallel range requests.
#[derive(Debug, Clone, Default)]
pub struct ChunkedDownload {
    /// Bytes per range request; 0, or a blob no bigger than this, means one whole-blob request.
    pub chunk_size: u64,
    /// Range requests started ahead of the writer (at least 1): the memory bound is
    /// `window x chunk_size`.
    pub window: usize,
    /// Each request holds one permit of every semaphore here while it runs (e.g. a global
    /// and a per-image download limit).
    pub limits: Vec<Arc<Semaphore>>,
}

/// What a chunked download did (for logs, metrics and tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkedStats {
    /// Range requests made (0 when the blob was fetched in one request).
    pub range_requests: u64,
    /// Whether (part of) the blob came as one whole-blob stream.
    pub whole: bool,
    /// Most chunks held in memory at once.
    pub peak_buffered: usize,
}

/// A spawned range request; stopped when dropped (a download cancelled mid-way, e.g. its
/// Prepare's deadline passed, must not leave its requests holding permits and buffers).
struct ChunkTask(JoinHandle<Result<Bytes>>);

impl Drop for ChunkTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn acquire_all(limits: &[Arc<Semaphore>]) -> Result<Vec<OwnedSemaphorePermit>> {
    let mut held = Vec::with_capacity(limits.len());
    for s in limits {
        held.push(
            s.clone()
                .acquire_owned()
                .await
                .map_err(|_| RegistryError::Io {
                    what: "download limit".into(),
                    source: std::io::Error::other("download limiter closed"),
                })?,
        );
    }
    Ok(held)
}

impl Client {
    /// Streams blob `desc` into `out` in order, fetched as parallel range requests of
    /// `opts.chunk_size` bytes (see the module docs); size and digest of the whole blob are
    /// verified. On error `out` may hold a partial copy: discard it.
    pub async fn get_blob_chunked_to<W: AsyncWrite + Unpin>(
        self: &Arc<Self>,
        repo: &Repository,
        desc: &Descriptor,
        opts: &ChunkedDownload,
        out: &mut W,
    ) -> Result<ChunkedStats> {
        let what = format!("blob {} in {}/{}", desc.digest, repo.registry, repo.name);
        let io_err = |e| RegistryError::Io {
            what: what.clone(),
            source: e,
        };
        let mut stats = ChunkedStats::default();
        let chunked = opts.chunk_size > 0
            && desc.size > opts.chunk_size
            && self.supports_ranges(&repo.registry);
        if !chunked {
            let _permits = acquire_all(&opts.limits).await?;
            stats.whole = true;
            self.get_blob_to(repo, desc, out).await?;
            return Ok(stats);
        }
        let window = opts.window.max(1);
        let mut hasher = Sha256::new();
        let mut written: u64 = 0;
        let mut next: u64 = 0;
        let mut pending: VecDeque<ChunkTask> = VecDeque::new();
        let result = async {
            loop {
                while pending.len() < window
                    && next < desc.size
                    && self.supports_ranges(&repo.registry)
                {
                    let range = next..(next + opts.chunk_size).min(desc.size);
                    next = range.end;
                    let (me, repo, digest, limits) = (
                        self.clone(),
                        repo.clone(),
                        desc.digest.clone(),
                        opts.limits.clone(),
                    );
                    stats.range_requests += 1;
                    pending.push_back(ChunkTask(tokio::spawn(async move {
                        let _permits = acquire_all(&limits).await?;
                        me.get_blob_range_until(&repo, &digest, range, None).await
                    })));
                }
                stats.peak_buffered = stats.peak_buffered.max(pending.len());
                let Some(mut task) = pending.pop_front() else {
                    break;
                };
                let bytes = (&mut task.0).await.map_err(|e| RegistryError::Io {
                    what: what.clone(),
                    source: std::io::Error::other(e.to_string()),
                })??;
                hasher.update(&bytes);
                written += bytes.len() as u64;
                out.write_all(&bytes).await.map_err(io_err)?;
            }
            if written < desc.size {
                // The registry ignored a range request: the rest comes as one stream.
                stats.whole = true;
                let _permits = acquire_all(&opts.limits).await?;
                let mut s = self.open_blob(repo, desc, None).await?;
                let mut pos: u64 = 0;
                while let Some(c) = s.chunk().await? {
                    let (cs, ce) = (pos, pos + c.len() as u64);
                    pos = ce;
                    if ce > written {
                        let part = c.slice((written.max(cs) - cs) as usize..);
                        hasher.update(&part);
                        written += part.len() as u64;
                        out.write_all(&part).await.map_err(io_err)?;
                    }
                }
            }
            out.flush().await.map_err(io_err)?;
            Ok::<(), RegistryError>(())
        }
        .await;
        drop(pending);
        result?;
        if written != desc.size {
            return Err(RegistryError::Status {
                what,
                status: 206,
                body: format!("chunked download gave {written} of {} bytes", desc.size),
            });
        }
        let got = crate::digest::Digest::from_hasher(hasher);
        if got != desc.digest {
            return Err(RegistryError::DigestMismatch {
                what,
                expected: desc.digest.to_string(),
                actual: got.to_string(),
            });
        }
        Ok(stats)
    }
}
