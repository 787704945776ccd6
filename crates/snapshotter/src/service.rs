//! The containerd `Snapshots` gRPC service over the metadata store and overlay layout.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;

use soci_index::labels as label;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::error::{Result, SnapError};
use crate::overlay::{disk_usage, Layout};
use crate::proto::snapshots as pb;
use crate::proto::snapshots::snapshots_server::Snapshots;
use crate::remote::Remote;
use crate::store::{Kind, MetaStore, Snapshot};

mod availability;
mod filter;
mod handback;
mod prepare;

use filter::Filter;

use handback::Cause;
pub use handback::HANDED_BACK;

/// Reason labels of `soci_layers_handed_back_total`.
pub const HAND_BACK_REASONS: [&str; 5] = [
    Cause::ALL[0].label(),
    Cause::ALL[1].label(),
    Cause::ALL[2].label(),
    Cause::ALL[3].label(),
    Cause::ALL[4].label(),
];

/// Shared state of the snapshotter.
pub struct Snapshotter {
    store: MetaStore,
    layout: Layout,
    remote: Option<Arc<Remote>>,
    /// Held while a snapshot's directories are created and recorded, and while orphan
    /// directories are removed: a directory whose record is not committed yet is not an orphan.
    dirs: std::sync::Mutex<()>,
}

fn ts(ns: i128) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ns.div_euclid(1_000_000_000)) as i64,
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    }
}

fn kind_pb(k: Kind) -> i32 {
    match k {
        Kind::View => pb::Kind::View as i32,
        Kind::Active => pb::Kind::Active as i32,
        Kind::Committed => pb::Kind::Committed as i32,
    }
}

fn info(name: &str, s: &Snapshot) -> pb::Info {
    pb::Info {
        name: name.to_string(),
        parent: s.parent.clone().unwrap_or_default(),
        kind: kind_pb(s.kind),
        created_at: Some(ts(s.created_ns)),
        updated_at: Some(ts(s.updated_ns)),
        labels: s.labels.clone().into_iter().collect(),
    }
}

fn labels(m: HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

impl Snapshotter {
    /// Opens the snapshotter state under `root` and removes orphan directories. With
    /// `remote`, layers prepared with remote-snapshot labels are served lazily or unpacked here.
    pub fn open(root: &std::path::Path, remote: Option<Arc<Remote>>) -> Result<Snapshotter> {
        std::fs::create_dir_all(root.join("snapshots"))?;
        let store = MetaStore::open(&root.join("metadata.db"))?;
        let s = Snapshotter {
            store,
            layout: Layout::new(root),
            remote,
            dirs: std::sync::Mutex::new(()),
        };
        let removed = s.cleanup()?;
        let n = s.store.list()?.len();
        info!(snapshots = n, orphans_removed = removed, root = %root.display(), "snapshot metadata recovered");
        Ok(s)
    }

    fn mounts_of(&self, key: &str) -> Result<Vec<crate::proto::types::Mount>> {
        let chain = self.store.chain(key)?;
        let (_, snap) = &chain[0];
        let parents: Vec<u64> = chain[1..].iter().map(|(_, s)| s.id).collect();
        Ok(self.layout.mounts(snap, &parents))
    }

    fn create(
        &self,
        key: &str,
        parent: &str,
        kind: Kind,
        l: HashMap<String, String>,
    ) -> Result<Vec<crate::proto::types::Mount>> {
        let parent = (!parent.is_empty()).then_some(parent);
        self.create_record(key, parent, kind, labels(l))?;
        debug!(key, ?parent, ?kind, "created snapshot");
        self.mounts_of(key)
    }

    fn commit(&self, name: &str, key: &str, l: HashMap<String, String>) -> Result<()> {
        let s = self.store.get(key)?;
        if s.kind != Kind::Active {
            return Err(SnapError::FailedPrecondition(format!(
                "snapshot {key} is not active"
            )));
        }
        let usage = disk_usage(&self.layout.fs(s.id))?;
        let mut l = labels(l);
        // A handed-back layer keeps saying so once containerd has committed it.
        if let Some(r) = s.labels.get(label::FALLBACK_REASON) {
            if r.starts_with(HANDED_BACK) {
                l.entry(label::FALLBACK_REASON.to_string())
                    .or_insert_with(|| r.clone());
            }
        }
        self.store.commit(key, name, l, usage)?;
        debug!(key, name, "committed snapshot");
        Ok(())
    }

    fn remove(&self, key: &str) -> Result<()> {
        let s = self.store.remove(key)?;
        if let Some(r) = &self.remote {
            r.release(s.id);
            if let Some(img) = s.labels.get(label::IMAGE_REF) {
                let l = label::IMAGE_REF;
                if !self
                    .store
                    .list()?
                    .iter()
                    .any(|(_, o)| o.labels.get(l) == Some(img))
                {
                    r.image_unused(img);
                }
            }
        }
        if let Err(e) = std::fs::remove_dir_all(self.layout.dir(s.id)) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(key, error = %e, "snapshot removed; its directory will be cleaned up later");
            }
        }
        debug!(key, "removed snapshot");
        Ok(())
    }

    fn usage(&self, key: &str) -> Result<pb::UsageResponse> {
        let s = self.store.get(key)?;
        let u = match (s.kind, s.usage) {
            (Kind::Committed, Some(u)) => u,
            _ => disk_usage(&self.layout.fs(s.id))?,
        };
        Ok(pb::UsageResponse {
            size: u.size,
            inodes: u.inodes,
        })
    }

    /// Creates a snapshot record and its directories (never concurrently with [`Self::cleanup`]).
    fn create_record(
        &self,
        key: &str,
        parent: Option<&str>,
        kind: Kind,
        labels: BTreeMap<String, String>,
    ) -> Result<Snapshot> {
        let _guard = self.dirs.lock().expect("dirs lock");
        self.store.create(key, parent, kind, labels, |id| {
            self.layout.make_dirs(id, kind)
        })
    }

    /// Removes snapshot directories (and lazy layer caches) no snapshot refers to; returns how
    /// many.
    pub fn cleanup(&self) -> Result<usize> {
        let _guard = self.dirs.lock().expect("dirs lock");
        let ids: std::collections::HashSet<u64> =
            self.store.list()?.into_iter().map(|(_, s)| s.id).collect();
        let mut removed = 0;
        for e in std::fs::read_dir(self.layout.snapshots_dir())? {
            let e = e?;
            let keep = e
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|id| ids.contains(&id));
            if !keep {
                match std::fs::remove_dir_all(e.path()) {
                    Ok(()) => removed += 1,
                    Err(err) => {
                        warn!(path = %e.path().display(), error = %err, "cannot remove orphan snapshot directory")
                    }
                }
            }
        }
        if let Some(r) = &self.remote {
            removed += r.remove_orphan_caches(&ids);
        }
        Ok(removed)
    }

    /// The remote-layer state, if enabled.
    pub fn remote(&self) -> Option<&Arc<Remote>> {
        self.remote.as_ref()
    }

    /// Number of snapshots.
    pub fn count(&self) -> Result<usize> {
        Ok(self.store.list()?.len())
    }

    fn list(&self, filters: &[String]) -> Result<Vec<pb::Info>> {
        let f = Filter::parse_all(filters)?;
        Ok(self
            .store
            .list()?
            .iter()
            .filter(|(k, s)| f.is_empty() || f.iter().any(|f| f.matches(k, s)))
            .map(|(k, s)| info(k, s))
            .collect())
    }
}

/// The gRPC face of a [`Snapshotter`].
#[derive(Clone)]
pub struct Service {
    inner: Arc<Snapshotter>,
}

impl Service {
    /// Wraps a snapshotter.
    pub fn new(inner: Arc<Snapshotter>) -> Service {
        Service { inner }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Snapshotter) -> Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| Status::internal(format!("task failed: {e}")))?
            .map_err(Status::from)
    }
}

type ListStream = Pin<Box<dyn Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for Service {
    #[tracing::instrument(level = "debug", name = "prepare", skip_all, fields(key = %r.get_ref().key, image = r.get_ref().labels.get(soci_index::labels::IMAGE_REF).map(String::as_str).unwrap_or(""), layer = r.get_ref().labels.get(soci_index::labels::LAYER_DIGEST).map(String::as_str).unwrap_or("")))]
    async fn prepare(
        &self,
        r: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let ns = crate::remote::content::namespace_of(r.metadata(), &r.get_ref().key);
        let r = r.into_inner();
        if let Some(remote) = self.inner.remote.clone() {
            let l = &r.labels;
            if l.contains_key(label::TARGET)
                && l.contains_key(label::IMAGE_REF)
                && l.contains_key(label::LAYER_DIGEST)
            {
                // Layer blobs the daemon pulls go to this namespace's content store.
                let prepare = self.prepare_remote(remote, r.key, r.parent, r.labels);
                let mounts = crate::remote::content::with_namespace(ns, prepare).await?;
                return Ok(Response::new(pb::PrepareSnapshotResponse { mounts }));
            }
        }
        self.inner.ensure_chain_served(&r.parent).await?;
        let mounts = self
            .blocking(move |s| s.create(&r.key, &r.parent, Kind::Active, r.labels))
            .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        r: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = r.into_inner();
        self.inner.ensure_chain_served(&r.parent).await?;
        let mounts = self
            .blocking(move |s| s.create(&r.key, &r.parent, Kind::View, r.labels))
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        r: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let key = r.into_inner().key;
        self.inner.ensure_chain_served(&key).await?;
        let mounts = self
            .blocking(move |s| {
                if s.store.get(&key)?.kind == Kind::Committed {
                    return Err(SnapError::FailedPrecondition(format!(
                        "snapshot {key} is committed: it has no mounts"
                    )));
                }
                s.mounts_of(&key)
            })
            .await?;
        Ok(Response::new(pb::MountsResponse { mounts }))
    }

    async fn commit(&self, r: Request<pb::CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = r.into_inner();
        self.blocking(move |s| s.commit(&r.name, &r.key, r.labels))
            .await?;
        Ok(Response::new(()))
    }

    async fn remove(&self, r: Request<pb::RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        let key = r.into_inner().key;
        self.blocking(move |s| s.remove(&key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        r: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let key = r.into_inner().key;
        let i = self
            .blocking(move |s| Ok(info(&key, &s.store.get(&key)?)))
            .await?;
        Ok(Response::new(pb::StatSnapshotResponse { info: Some(i) }))
    }

    async fn update(
        &self,
        r: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = r.into_inner();
        let i = r
            .info
            .ok_or_else(|| Status::invalid_argument("update without info"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let out = self
            .blocking(move |s| {
                let snap = s.store.update_labels(&i.name, labels(i.labels), &paths)?;
                Ok(info(&i.name, &snap))
            })
            .await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(out),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        r: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<ListStream>, Status> {
        let filters = r.into_inner().filters;
        let infos = self.blocking(move |s| s.list(&filters)).await?;
        let chunks: Vec<Result<pb::ListSnapshotsResponse, Status>> = infos
            .chunks(100)
            .map(|c| Ok(pb::ListSnapshotsResponse { info: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn usage(
        &self,
        r: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let key = r.into_inner().key;
        Ok(Response::new(self.blocking(move |s| s.usage(&key)).await?))
    }

    async fn cleanup(&self, _r: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        self.blocking(|s| s.cleanup().map(|_| ())).await?;
        Ok(Response::new(()))
    }
}

#[cfg(test)]
mod tests;
