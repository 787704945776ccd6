//! Lazy layers are handed to containerd only while they are served.
//!
//! Why: a lazy layer that is not served (not restored after a restart, FUSE connection aborted,
//! server gone) is an empty directory to overlayfs, and a container on it would run with the
//! layer's files silently missing. So every Prepare, View and Mounts whose chain holds a lazy
//! layer probes it first ([`Remote::probe`]); one not served is restored on the spot (the
//! registry or the credentials may be back), and if that fails the request fails naming the
//! layer and why, never with mounts. A layer that stays broken is labelled
//! `containerd.io/snapshot/broken` and retried in the background with capped exponential
//! backoff until it is served again (the label goes away) or its snapshot is removed.
//! The start-up restore pass goes through the same path.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use soci_index::labels as label;
use tonic::Status;
use tracing::{info, warn};

use super::Snapshotter;
use crate::remote::{BrokenLayer, LayerPlan, NotServed, Remote, RemoteError, PROBE_TIMEOUT};
use crate::store::Snapshot;

/// First background retry of a broken layer, after this long.
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Background retries back off (doubling) up to this interval, and go on at it.
pub const RETRY_MAX: Duration = Duration::from_secs(120);

type Served<'a> = Pin<Box<dyn Future<Output = Result<(), NotServedNow>> + Send + 'a>>;

/// Why a lazy layer is not served and could not be restored (the `broken` label's text).
#[derive(Debug, thiserror::Error)]
enum NotServedNow {
    /// Another restore of it holds its lock past that restore's own deadline.
    #[error("another restore of it did not end within {0:?}")]
    Busy(Duration),
    /// The probe failed and so did the restore.
    #[error("{why}; restoring it failed: {error}")]
    Broken {
        /// Why the probe failed.
        why: NotServed,
        /// Why the restore failed.
        error: RestoreError,
    },
}

/// Why a restore of a lazy layer failed.
#[derive(Debug, thiserror::Error)]
enum RestoreError {
    /// Planning it failed (discovery, registry).
    #[error("{0}")]
    Plan(RemoteError),
    /// Mounting it failed.
    #[error("{0}")]
    Mount(RemoteError),
    /// The image has another zTOC for this layer now.
    #[error("the image no longer has the same zTOC for this layer")]
    ZtocChanged,
    /// The restore deadline passed.
    #[error("not done within {0:?}")]
    Deadline(Duration),
}

impl RestoreError {
    /// Short cause for metrics and the broken-layer list.
    fn cause(&self) -> &'static str {
        match self {
            RestoreError::Plan(_) => "registry",
            RestoreError::Mount(_) => "mount",
            RestoreError::ZtocChanged => "ztoc_changed",
            RestoreError::Deadline(_) => "deadline",
        }
    }
}

fn is_lazy(s: &Snapshot) -> bool {
    s.labels.get(label::MODE).map(String::as_str) == Some(label::MODE_LAZY)
}

impl Snapshotter {
    /// Mounts again the lazy layers of committed snapshots (after a restart). A layer that
    /// cannot be restored is labelled broken, logged and retried in the background; nothing
    /// else waits for it.
    pub async fn restore_lazy_layers(self: Arc<Self>) {
        let Some(remote) = self.remote.clone() else {
            return;
        };
        let lazy: Vec<(String, Snapshot)> = match self.store.list() {
            Ok(l) => l.into_iter().filter(|(_, s)| is_lazy(s)).collect(),
            Err(e) => return warn!(error = %e, "cannot list snapshots to restore lazy layers"),
        };
        for (name, snap) in lazy {
            let _ = self.ensure_served(&remote, &name, &snap).await;
        }
        remote.drop_unclaimed_held();
    }

    /// Checks that every lazy layer in `key`'s chain (`key` included) is served, restoring the
    /// ones that are not; else an Unavailable status naming the layer and why. A chain that
    /// does not exist is left to the caller to report.
    pub(super) async fn ensure_chain_served(self: &Arc<Self>, key: &str) -> Result<(), Status> {
        let Some(remote) = self.remote.clone() else {
            return Ok(());
        };
        if key.is_empty() {
            return Ok(());
        }
        let (me, k) = (self.clone(), key.to_string());
        let chain = match tokio::task::spawn_blocking(move || me.store.chain(&k)).await {
            Ok(Ok(c)) => c,
            Ok(Err(_)) => return Ok(()),
            Err(e) => return Err(Status::internal(format!("task failed: {e}"))),
        };
        for (name, snap) in chain.into_iter().filter(|(_, s)| is_lazy(s)) {
            if let Err(why) = self.ensure_served(&remote, &name, &snap).await {
                let layer = snap
                    .labels
                    .get(label::LAYER_DIGEST)
                    .map(String::as_str)
                    .unwrap_or("?");
                return Err(Status::unavailable(format!(
                    "lazy layer {layer} (snapshot {name}) is not served: {why}"
                )));
            }
        }
        Ok(())
    }

    /// Makes sure lazy layer `name` is served: probes it and, if it is not, restores it.
    /// On failure it is marked broken and the error says why. Boxed: the background retry
    /// it may start calls it again.
    fn ensure_served<'a>(
        self: &'a Arc<Self>,
        remote: &'a Arc<Remote>,
        name: &'a str,
        snap: &'a Snapshot,
    ) -> Served<'a> {
        Box::pin(async move {
            let lock = remote.restore_lock(snap.id);
            // Another restore of this layer holds it for at most its own deadline.
            let wait = remote.restore_deadline() + 3 * PROBE_TIMEOUT;
            let _guard = tokio::time::timeout(wait, lock.lock())
                .await
                .map_err(|_| NotServedNow::Busy(wait))?;
            let fs_dir = self.layout.fs(snap.id);
            let why = match remote.probe(snap.id, &fs_dir).await {
                Ok(()) => {
                    self.served_again(remote, name, snap.id);
                    return Ok(());
                }
                Err(why) => why,
            };
            if remote.is_mounted(snap.id) {
                warn!(snapshot = %name, reason = %why, "lazy layer is mounted but not served; mounting it again");
            }
            match self.restore(remote, snap).await {
                Ok(()) => {
                    info!(snapshot = %name, "lazy layer restored");
                    self.served_again(remote, name, snap.id);
                    Ok(())
                }
                Err(error) => {
                    let cause = error.cause();
                    let broken = NotServedNow::Broken { why, error };
                    let reason = broken.to_string();
                    warn!(snapshot = %name, error = %reason, "lazy layer cannot be restored; marked broken");
                    remote.drop_held(snap.id, &fs_dir);
                    self.mark_broken(remote, name, snap, cause, &reason);
                    Err(broken)
                }
            }
        })
    }

    /// Mounts lazy layer `snap` again (taking over the fd holder's mount if it kept one),
    /// within [`Remote::restore_deadline`]. The error has a short cause for metrics.
    async fn restore(&self, remote: &Arc<Remote>, snap: &Snapshot) -> Result<(), RestoreError> {
        let fs_dir = self.layout.fs(snap.id);
        if !remote.is_held(snap.id) {
            remote.drop_dead_mount(snap.id, &fs_dir);
        }
        let deadline = remote.restore_deadline();
        let attempt = async {
            match remote.plan(&snap.labels).await {
                Ok(LayerPlan::Lazy { image, ztoc, layer })
                    if snap.labels.get(label::ZTOC_DIGEST) == Some(&ztoc.digest.to_string()) =>
                {
                    remote
                        .mount_lazy(snap.id, &fs_dir, &image, &ztoc, &layer)
                        .await
                        .map_err(RestoreError::Mount)
                }
                Ok(_) => Err(RestoreError::ZtocChanged),
                Err(e) => Err(RestoreError::Plan(e)),
            }
        };
        match tokio::time::timeout(deadline, attempt).await {
            Ok(r) => r,
            Err(_) => Err(RestoreError::Deadline(deadline)),
        }
    }

    /// Labels lazy layer `name` broken (the reason is the label's value) and makes sure a
    /// background retry runs for it.
    fn mark_broken(
        self: &Arc<Self>,
        remote: &Arc<Remote>,
        name: &str,
        snap: &Snapshot,
        cause: &'static str,
        reason: &str,
    ) {
        let label: String = reason.chars().take(300).collect();
        let update = |s: &Snapshot| {
            let mut labels = s.labels.clone();
            labels.insert(label::BROKEN.into(), label.clone());
            self.store
                .update_labels(name, labels, &[format!("labels.{}", label::BROKEN)])
        };
        if let Err(e) = self.store.get(name).and_then(|s| update(&s)) {
            warn!(snapshot = %name, error = %e, "cannot label a broken lazy layer");
        }
        let info = BrokenLayer {
            snapshot: name.to_string(),
            layer: snap
                .labels
                .get(label::LAYER_DIGEST)
                .cloned()
                .unwrap_or_default(),
            cause,
            reason: reason.to_string(),
            since: SystemTime::now(),
            attempts: 1,
        };
        if remote.mark_broken(snap.id, info) {
            self.spawn_retry(remote, name.to_string(), snap.id);
        }
    }

    /// Lazy layer `name` is served: forgets it as broken and drops its broken label.
    fn served_again(&self, remote: &Remote, name: &str, id: u64) {
        let was_broken = remote.clear_broken(id);
        let Ok(s) = self.store.get(name) else { return };
        if !s.labels.contains_key(label::BROKEN) {
            return;
        }
        let mut labels = s.labels.clone();
        labels.remove(label::BROKEN);
        match self
            .store
            .update_labels(name, labels, &[format!("labels.{}", label::BROKEN)])
        {
            Ok(_) => {
                info!(snapshot = %name, was_broken, "lazy layer is served again; broken label removed")
            }
            Err(e) => warn!(snapshot = %name, error = %e, "cannot remove the broken label"),
        }
    }

    /// Retries broken layer `id` in the background: first after [`RETRY_FIRST`], doubling up
    /// to [`RETRY_MAX`]; ends once it is served or its snapshot is removed (which also aborts
    /// it).
    fn spawn_retry(self: &Arc<Self>, remote: &Arc<Remote>, name: String, id: u64) {
        let (me, r) = (self.clone(), remote.clone());
        let task = tokio::spawn(async move {
            let mut wait = RETRY_FIRST;
            loop {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(RETRY_MAX);
                if !r.is_broken(id) {
                    return;
                }
                let snap = match me.store.get(&name) {
                    Ok(s) if s.id == id => s,
                    _ => {
                        r.clear_broken(id);
                        return;
                    }
                };
                if me.ensure_served(&r, &name, &snap).await.is_ok() {
                    return;
                }
            }
        });
        remote.set_retry(id, task.abort_handle());
    }
}
