//! Layer blobs the daemon downloads itself (parallel pull mode, and the fallback full pull of
//! images without a usable SOCI index) also go into containerd's content store.
//!
//! Why: containerd skips fetching a layer whose Prepare answers AlreadyExists, so without this
//! an image the daemon pulled has no layer blobs in containerd and `ctr image export`,
//! `ctr image push`, `nerdctl save` fail. Upstream soci-snapshotter writes the compressed layer
//! into containerd's content store while unpacking (`fs/parallel_unpacker.go`,
//! `soci/store.ContainerdStore.Push`: ref = the digest, committed with the expected size and
//! digest, no labels, no lease) unless `discard_unpacked_layers = true`; so do we.
//!
//! How: the download stream is teed ([`Tee`]) into a task that writes the bytes with
//! containerd's Content `Write` in the namespace of the Prepare that started the download
//! ([`with_namespace`]), and commits with the expected digest and size only after the
//! registry download verified the digest (containerd checks it again: a blob that fails its
//! digest is never committed). A write that fails, or falls too far behind the download, is
//! aborted with a warning and the `soci_content_store_writes_total{result="failed"}` metric;
//! it never fails the layer. GC: as upstream, nothing pins the blob itself; the image's
//! manifest, already in containerd when its layers are prepared, references every layer with
//! `containerd.io/gc.ref.content.l.<i>` labels (containerd's pull and `soci image rpull` both
//! set them), so the committed blob lives as long as the image.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::{
    AbortRequest, InfoRequest, WriteAction, WriteContentRequest,
};
use tokio::io::AsyncWrite;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use soci_registry::{Descriptor, Repository};

use crate::config::Config;

tokio::task_local! {
    /// The containerd namespace of the Prepare being served.
    static NAMESPACE: String;
}

/// Bytes of one layer queued for containerd before the write is given up (containerd far
/// slower than the registry): bounds the memory a stuck containerd can cost.
const MAX_QUEUED: usize = 64 << 20;
/// Bytes per Write message (containerd's default gRPC message limit is 16 MiB).
const MESSAGE: usize = 1 << 20;
/// Connecting to containerd and each call before the data flows.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Waiting for containerd to commit once the download is complete.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Results of content store writes, for metrics.
#[derive(Debug, Default)]
pub struct ContentStats {
    /// Layer blobs committed to containerd's content store.
    pub written: AtomicU64,
    /// Layer blobs containerd already had (nothing written).
    pub existing: AtomicU64,
    /// Writes given up (containerd unreachable or refusing, too slow, download failed).
    pub failed: AtomicU64,
}

/// Process-wide content store write results.
pub static STATS: ContentStats = ContentStats {
    written: AtomicU64::new(0),
    existing: AtomicU64::new(0),
    failed: AtomicU64::new(0),
};

/// Runs `f` with `ns` as the containerd namespace that blobs written meanwhile go to.
pub async fn with_namespace<F: std::future::Future>(ns: Option<String>, f: F) -> F::Output {
    match ns {
        Some(ns) => NAMESPACE.scope(ns, f).await,
        None => f.await,
    }
}

/// The containerd namespace of the Prepare being served, if known.
pub fn namespace() -> Option<String> {
    NAMESPACE.try_with(|n| n.clone()).ok()
}

/// The namespace of a Prepare: the `containerd-namespace` gRPC header containerd forwards,
/// else the first part of containerd's backend key (`<namespace>/<id>/<key>`).
pub fn namespace_of(md: &tonic::metadata::MetadataMap, key: &str) -> Option<String> {
    let from_header = md
        .get("containerd-namespace")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    from_header
        .or_else(|| {
            let mut parts = key.splitn(3, '/');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(ns), Some(id), Some(_)) if id.bytes().all(|b| b.is_ascii_digit()) => {
                    Some(ns.to_string())
                }
                _ => None,
            }
        })
        .filter(|ns| !ns.is_empty())
}

enum Msg {
    Data(Vec<u8>),
    Commit,
}

/// The write of one layer blob into containerd's content store, fed by a [`Tee`].
pub struct BlobSink {
    tx: Option<mpsc::UnboundedSender<Msg>>,
    queued: Arc<AtomicUsize>,
    /// The write; taken by [`BlobSink::finish`], else reaped (bounded) on drop.
    task: Option<tokio::task::JoinHandle<()>>,
    digest: String,
}

impl Drop for BlobSink {
    /// A sink dropped without `finish` (the download's caller returned early): the write sees
    /// its stream end and aborts; if containerd does not answer, the task is stopped after
    /// [`COMMIT_TIMEOUT`] instead of waiting forever.
    fn drop(&mut self) {
        self.tx = None;
        let (Some(task), Ok(rt)) = (self.task.take(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        let digest = std::mem::take(&mut self.digest);
        rt.spawn(reap(task, digest));
    }
}

/// Waits for a blob write to end, at most [`COMMIT_TIMEOUT`]; stops it after that.
async fn reap(mut task: tokio::task::JoinHandle<()>, digest: String) {
    if tokio::time::timeout(COMMIT_TIMEOUT, &mut task)
        .await
        .is_err()
    {
        task.abort();
        STATS.failed.fetch_add(1, Ordering::Relaxed);
        warn!(layer = %digest, "containerd did not finish the layer blob write in time");
    }
}

impl BlobSink {
    /// Starts writing `layer` to containerd, unless `discard_unpacked_layers` is set or the
    /// request's namespace is unknown (then nothing is written).
    pub fn begin(cfg: &Config, repo: &Repository, layer: &Descriptor) -> Option<BlobSink> {
        if cfg.pull_modes.parallel_pull_unpack.discard_unpacked_layers {
            return None;
        }
        let Some(ns) = namespace() else {
            debug!(layer = %layer.digest, "no containerd namespace: layer blob not stored");
            return None;
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let job = Job {
            address: cfg.content_store.socket(),
            ns,
            digest: layer.digest.to_string(),
            size: layer.size as i64,
            labels: HashMap::from([(
                format!("containerd.io/distribution.source.{}", repo.registry),
                repo.name.clone(),
            )]),
        };
        let q = queued.clone();
        let task = tokio::spawn(async move {
            let digest = job.digest.clone();
            match job.run(rx, q).await {
                Ok(true) => {
                    STATS.written.fetch_add(1, Ordering::Relaxed);
                    debug!(layer = %digest, "layer blob stored in containerd's content store");
                }
                Ok(false) => {
                    STATS.existing.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    STATS.failed.fetch_add(1, Ordering::Relaxed);
                    warn!(layer = %digest, error = %e, "layer blob not stored in containerd's content store (export/push of the image will miss it)");
                }
            }
        });
        Some(BlobSink {
            tx: Some(tx),
            queued,
            task: Some(task),
            digest: layer.digest.to_string(),
        })
    }

    fn push(&mut self, data: &[u8]) {
        let Some(tx) = &self.tx else { return };
        if self.queued.fetch_add(data.len(), Ordering::Relaxed) + data.len() > MAX_QUEUED {
            // containerd keeps up far slower than the registry: give up (the task aborts).
            self.tx = None;
            return;
        }
        if tx.send(Msg::Data(data.to_vec())).is_err() {
            // The task ended (blob already present, or the write failed).
            self.tx = None;
        }
    }

    /// Commits the blob if the download succeeded (`ok`), else aborts the write; waits for
    /// containerd (bounded) so that the image is exportable once the layer is reported ready.
    pub async fn finish(mut self, ok: bool) {
        if let Some(tx) = self.tx.take() {
            if ok {
                let _ = tx.send(Msg::Commit);
            }
        }
        if let Some(task) = self.task.take() {
            reap(task, std::mem::take(&mut self.digest)).await;
        }
    }
}

/// One blob write: where to, and what is expected.
struct Job {
    address: PathBuf,
    ns: String,
    digest: String,
    size: i64,
    labels: HashMap<String, String>,
}

impl Job {
    fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Ok(v) = self.ns.parse() {
            r.metadata_mut().insert("containerd-namespace", v);
        }
        r
    }

    fn reference(&self) -> String {
        format!("soci-rs-layer-{}", self.digest)
    }

    /// Writes the blob; Ok(false) when containerd already has it.
    async fn run(
        &self,
        mut rx: mpsc::UnboundedReceiver<Msg>,
        queued: Arc<AtomicUsize>,
    ) -> Result<bool, String> {
        let what = |e: &dyn std::fmt::Display| {
            format!(
                "containerd at {} (namespace {}): {e}",
                self.address.display(),
                self.ns
            )
        };
        let channel = tokio::time::timeout(CALL_TIMEOUT, containerd_client::connect(&self.address))
            .await
            .map_err(|e| what(&e))?
            .map_err(|e| what(&e))?;
        let mut content = ContentClient::new(channel);
        let info = InfoRequest {
            digest: self.digest.clone(),
        };
        match tokio::time::timeout(CALL_TIMEOUT, content.info(self.req(info))).await {
            Ok(Ok(_)) => return Ok(false),
            Ok(Err(e)) if e.code() == tonic::Code::NotFound => {}
            Ok(Err(e)) => return Err(what(&e.message())),
            Err(e) => return Err(what(&e)),
        }
        let (req_tx, req_rx) = mpsc::channel::<WriteContentRequest>(4);
        let msg = |action: WriteAction, offset: i64, data: Vec<u8>, labels| WriteContentRequest {
            action: action as i32,
            r#ref: self.reference(),
            total: self.size,
            expected: self.digest.clone(),
            offset,
            data,
            labels,
        };
        let produce = async move {
            // The sender lives here: when the download fails the request stream ends without
            // a commit and containerd's Write ends too.
            let req_tx = req_tx;
            let (mut offset, mut buf) = (0i64, Vec::with_capacity(MESSAGE));
            loop {
                match rx.recv().await {
                    Some(Msg::Data(d)) => {
                        queued.fetch_sub(d.len(), Ordering::Relaxed);
                        buf.extend_from_slice(&d);
                        if buf.len() >= MESSAGE {
                            let n = buf.len() as i64;
                            let data = std::mem::replace(&mut buf, Vec::with_capacity(MESSAGE));
                            let m = msg(WriteAction::Write, offset, data, HashMap::new());
                            req_tx
                                .send(m)
                                .await
                                .map_err(|_| "write ended".to_string())?;
                            offset += n;
                        }
                    }
                    Some(Msg::Commit) => {
                        if offset + buf.len() as i64 != self.size {
                            return Err(format!(
                                "{} bytes downloaded, descriptor says {}",
                                offset + buf.len() as i64,
                                self.size
                            ));
                        }
                        let m = msg(WriteAction::Commit, offset, buf, self.labels.clone());
                        req_tx
                            .send(m)
                            .await
                            .map_err(|_| "write ended".to_string())?;
                        return Ok(());
                    }
                    None => return Err("download failed or given up".to_string()),
                }
            }
        };
        let consume = async {
            let stream = tokio_stream::wrappers::ReceiverStream::new(req_rx);
            let mut s = match content.clone().write(self.req(stream)).await {
                Ok(r) => r.into_inner(),
                Err(e) if e.code() == tonic::Code::AlreadyExists => return Ok(false),
                Err(e) => return Err(e.message().to_string()),
            };
            loop {
                match s.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => return Ok(true),
                    Err(e) if e.code() == tonic::Code::AlreadyExists => return Ok(false),
                    Err(e) => return Err(e.message().to_string()),
                }
            }
        };
        let (produced, consumed) = tokio::join!(produce, consume);
        match (produced, consumed) {
            (Ok(()), Ok(written)) => Ok(written),
            (p, c) => {
                // Nothing half-written stays in containerd's ingest directory.
                let abort = AbortRequest {
                    r#ref: self.reference(),
                };
                let _ = tokio::time::timeout(CALL_TIMEOUT, content.abort(self.req(abort))).await;
                let why = [p.err(), c.err()]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join("; ");
                Err(what(&why))
            }
        }
    }
}

/// An `AsyncWrite` that passes everything written to `inner` on to a [`BlobSink`] too.
pub struct Tee<'a, W> {
    inner: &'a mut W,
    sink: Option<&'a mut BlobSink>,
}

impl<'a, W> Tee<'a, W> {
    /// Tees writes to `inner` into `sink` (when there is one).
    pub fn new(inner: &'a mut W, sink: Option<&'a mut BlobSink>) -> Self {
        Tee { inner, sink }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Tee<'_, W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let me = self.get_mut();
        let r = Pin::new(&mut *me.inner).poll_write(cx, buf);
        if let (Poll::Ready(Ok(n)), Some(sink)) = (&r, me.sink.as_deref_mut()) {
            sink.push(&buf[..*n]);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_from_header_or_backend_key() {
        let mut md = tonic::metadata::MetadataMap::new();
        assert_eq!(
            namespace_of(&md, "k8s.io/12/extract-1 sha256:ab"),
            Some("k8s.io".into())
        );
        assert_eq!(namespace_of(&md, "plain-key"), None);
        assert_eq!(namespace_of(&md, "a/b/c"), None, "id must be numeric");
        md.insert("containerd-namespace", "finch".parse().unwrap());
        assert_eq!(namespace_of(&md, "default/1/x"), Some("finch".into()));
    }

    #[tokio::test]
    async fn namespace_is_scoped_to_the_request() {
        assert_eq!(namespace(), None);
        let inner = with_namespace(Some("ns1".into()), async { namespace() }).await;
        assert_eq!(inner, Some("ns1".into()));
        assert_eq!(with_namespace(None, async { namespace() }).await, None);
    }

    #[tokio::test]
    async fn tee_without_sink_passes_through() {
        use tokio::io::AsyncWriteExt;
        let mut out = Vec::new();
        let mut t = Tee::new(&mut out, None);
        t.write_all(b"hello").await.unwrap();
        assert_eq!(out, b"hello");
    }
}
