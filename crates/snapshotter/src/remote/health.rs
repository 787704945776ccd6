//! Whether a lazy layer is really served, and the lazy layers that are not ("broken").
//!
//! Why: a lazy layer's snapshot directory is only a mount point. When its FUSE mount is gone
//! (not restored after a restart) or dead (connection aborted by the kernel, server gone),
//! overlayfs takes the bare, empty directory as a lower layer and a container runs with the
//! layer's files silently missing. So every use of a lazy layer first asks the kernel, through
//! the mount, whether this daemon answers for it: `statfs` is never answered from a kernel cache,
//! it always reaches the FUSE server (or fails with `ENOTCONN` on a dead connection). A layer
//! that is not served is restored on the spot or the request fails naming the layer and why;
//! the broken ones are also retried in the background (see `service::availability`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nix::errno::Errno;
use tracing::warn;

use super::Remote;

/// Longest wait for the FUSE server of a mount to answer a `statfs`.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A lazy layer that is not served, and why.
#[derive(Clone, Debug)]
pub struct BrokenLayer {
    /// Snapshot name (containerd's chain id).
    pub snapshot: String,
    /// Layer digest.
    pub layer: String,
    /// Short cause, for metric labels: `not_served`, `registry`, `ztoc_changed`, `mount`,
    /// `deadline`.
    pub cause: &'static str,
    /// The full reason (also in the snapshot's `containerd.io/snapshot/broken` label).
    pub reason: String,
    /// When it was found broken.
    pub since: SystemTime,
    /// Restore attempts made since.
    pub attempts: u32,
}

/// Broken-layer bookkeeping of one snapshot.
pub(super) struct Broken {
    info: BrokenLayer,
    /// The background retry, stopped when the snapshot is removed.
    retry: Option<tokio::task::AbortHandle>,
}

/// Broken layers and the per-layer restore locks.
#[derive(Default)]
pub(super) struct Health {
    broken: std::sync::Mutex<BTreeMap<u64, Broken>>,
    restoring: std::sync::Mutex<BTreeMap<u64, Arc<tokio::sync::Mutex<()>>>>,
}

/// Why a lazy layer is not served right now (the start of its `broken` label).
#[derive(Debug, thiserror::Error)]
pub enum NotServed {
    /// This daemon has no mount for it.
    #[error("it is not mounted by this daemon")]
    NotMounted,
    /// The FUSE server did not answer the probe in time.
    #[error("its FUSE server did not answer within {0:?}")]
    NoAnswer(Duration),
    /// The probe's blocking task failed.
    #[error("probe task failed: {0}")]
    Task(String),
    /// The FUSE connection is aborted (its server is gone).
    #[error("its FUSE connection is aborted")]
    Aborted,
    /// `statfs` of the mount point failed otherwise.
    #[error("statfs of its mount point failed: {0}")]
    Statfs(Errno),
    /// The mount point is not a FUSE mount.
    #[error("nothing is mounted on its mount point")]
    NotFuse,
}

impl Remote {
    /// Checks that lazy layer `id` is served by this daemon right now: mounted by it, and its
    /// FUSE server answers a `statfs` through the mount point `fs_dir` within
    /// [`PROBE_TIMEOUT`]. The error says why not.
    pub async fn probe(&self, id: u64, fs_dir: &Path) -> Result<(), NotServed> {
        if !self.is_mounted(id) {
            return Err(NotServed::NotMounted);
        }
        let dir = fs_dir.to_path_buf();
        let statfs = tokio::task::spawn_blocking(move || nix::sys::statfs::statfs(&dir));
        match tokio::time::timeout(PROBE_TIMEOUT, statfs).await {
            Err(_) => Err(NotServed::NoAnswer(PROBE_TIMEOUT)),
            Ok(Err(e)) => Err(NotServed::Task(e.to_string())),
            Ok(Ok(Err(Errno::ENOTCONN))) => Err(NotServed::Aborted),
            Ok(Ok(Err(e))) => Err(NotServed::Statfs(e)),
            Ok(Ok(Ok(st))) if st.filesystem_type() != nix::sys::statfs::FUSE_SUPER_MAGIC => {
                Err(NotServed::NotFuse)
            }
            Ok(Ok(Ok(_))) => Ok(()),
        }
    }

    /// Forgets a mount of snapshot `id` that is not served any more and takes it off its
    /// mount point (detached if busy: running containers keep getting errors from the dead
    /// connection, never an empty directory), so the layer can be mounted again.
    pub fn drop_dead_mount(&self, id: u64, fs_dir: &Path) {
        let dead = self.lazy.mounts.lock().expect("mounts").remove(&id);
        if let Some(m) = dead {
            self.unhold(id);
            if let Err(e) = m.unmount() {
                warn!(id, error = %e, "unmounting a dead lazy layer failed");
            }
        }
        self.lazy.mounter.detach_stale(fs_dir);
    }

    /// The lock one restore of snapshot `id` holds (a Prepare, the background retry and the
    /// start-up pass never restore the same layer at once).
    pub fn restore_lock(&self, id: u64) -> Arc<tokio::sync::Mutex<()>> {
        self.health
            .restoring
            .lock()
            .expect("restoring")
            .entry(id)
            .or_default()
            .clone()
    }

    /// Records lazy layer `id` as broken (or updates why); returns whether it needs a
    /// background retry started.
    pub fn mark_broken(&self, id: u64, info: BrokenLayer) -> bool {
        let mut map = self.health.broken.lock().expect("broken");
        match map.get_mut(&id) {
            Some(b) => {
                b.info.attempts += 1;
                b.info.cause = info.cause;
                b.info.reason = info.reason;
                b.retry.is_none()
            }
            None => {
                map.insert(id, Broken { info, retry: None });
                true
            }
        }
    }

    /// Keeps the handle of the background retry of broken layer `id` (aborted if the layer
    /// is not broken any more).
    pub fn set_retry(&self, id: u64, h: tokio::task::AbortHandle) {
        match self.health.broken.lock().expect("broken").get_mut(&id) {
            Some(b) => b.retry = Some(h),
            None => h.abort(),
        }
    }

    /// Layer `id` is served again (or gone): forgets it as broken. The retry task, if any,
    /// sees this and ends; it is not aborted here since it may be the caller.
    pub fn clear_broken(&self, id: u64) -> bool {
        self.health
            .broken
            .lock()
            .expect("broken")
            .remove(&id)
            .is_some()
    }

    /// Whether layer `id` is known broken.
    pub fn is_broken(&self, id: u64) -> bool {
        self.health.broken.lock().expect("broken").contains_key(&id)
    }

    /// Snapshot `id` is removed: stops its retry and forgets its state.
    pub(super) fn forget_health(&self, id: u64) {
        if let Some(b) = self.health.broken.lock().expect("broken").remove(&id) {
            if let Some(h) = b.retry {
                h.abort();
            }
        }
        self.health.restoring.lock().expect("restoring").remove(&id);
    }

    /// The broken lazy layers, by snapshot id.
    pub fn broken_layers(&self) -> Vec<(u64, BrokenLayer)> {
        self.health
            .broken
            .lock()
            .expect("broken")
            .iter()
            .map(|(id, b)| (*id, b.info.clone()))
            .collect()
    }

    /// Longest a lazy layer's restore waits on registries: discovery and the zTOC, a few
    /// requests of `fetching_timeout_sec` each.
    pub fn restore_deadline(&self) -> Duration {
        Duration::from_secs(self.cfg.blob.fetching_timeout_sec.max(1) * 3)
    }

    /// Longest a remote Prepare waits on registries in all: the lazy path's round trips
    /// (discovery, zTOC) plus one whole-blob request's own bound (`fetching_timeout_sec` x 10).
    /// Past it the Prepare fails naming the layer; a download started ahead keeps going for the
    /// next Prepare.
    pub fn prepare_deadline(&self) -> Duration {
        Duration::from_secs(self.cfg.blob.fetching_timeout_sec.max(1) * 13)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(dir: &Path) -> Arc<Remote> {
        let cfg = crate::config::Config::default();
        Arc::new(Remote::new(dir, &cfg).unwrap())
    }

    fn info(reason: &str) -> BrokenLayer {
        BrokenLayer {
            snapshot: "sha256:chain".into(),
            layer: "sha256:layer".into(),
            cause: "registry",
            reason: reason.into(),
            since: SystemTime::now(),
            attempts: 1,
        }
    }

    #[tokio::test]
    async fn unmounted_layer_is_not_served() {
        let tmp = tempfile::tempdir().unwrap();
        let r = remote(tmp.path());
        let e = r.probe(7, tmp.path()).await.unwrap_err();
        assert!(matches!(e, NotServed::NotMounted), "{e}");
    }

    #[tokio::test]
    async fn broken_bookkeeping() {
        let tmp = tempfile::tempdir().unwrap();
        let r = remote(tmp.path());
        assert!(r.mark_broken(3, info("down")));
        let h = tokio::spawn(std::future::pending::<()>());
        r.set_retry(3, h.abort_handle());
        assert!(!r.mark_broken(3, info("still down")), "one retry task");
        let b = r.broken_layers();
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].1.reason, "still down");
        assert_eq!(b[0].1.attempts, 2);
        r.forget_health(3);
        assert!(!r.is_broken(3));
        assert!(
            h.await.unwrap_err().is_cancelled(),
            "retry stops on removal"
        );
    }
}
