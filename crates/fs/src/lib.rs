//! soci-fs: the read-only FUSE filesystem of one image layer, served lazily.
//!
//! [`LayerTree`] turns a zTOC into inodes (overlay whiteouts and opaque directories included);
//! [`SpanManager`] fetches, verifies, decompresses and caches spans through a [`RangeReader`];
//! [`mount`] serves both over FUSE (read-only, `allow_other`, `default_permissions`).

mod cache;
mod fuse;
mod spans;
mod tree;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use fuse::LayerFs;
pub use spans::{
    BackgroundConfig, FsMetrics, MemoryCache, Priority, RangeReader, SpanConfig, SpanManager,
    LATENCY_BUCKETS_MS,
};
pub use tree::{LayerTree, Node, NodeKind, TreeError, OPAQUE_XATTR, ROOT_INO};

/// A mounted layer; unmounted on [`MountedLayer::unmount`] or drop.
pub struct MountedLayer {
    session: Option<fuser::BackgroundSession>,
    spans: Arc<SpanManager>,
}

impl MountedLayer {
    /// The layer's span manager (for background fetch and stats).
    pub fn spans(&self) -> &Arc<SpanManager> {
        &self.spans
    }

    /// Unmounts and stops background work.
    pub fn unmount(mut self) -> std::io::Result<()> {
        self.spans.close();
        match self.session.take() {
            Some(s) => s.umount_and_join(),
            None => Ok(()),
        }
    }
}

impl Drop for MountedLayer {
    fn drop(&mut self) {
        self.spans.close();
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
    }
}

/// Mounts `tree` served by `spans` at `mountpoint`.
pub fn mount(
    tree: Arc<LayerTree>,
    spans: Arc<SpanManager>,
    mountpoint: &Path,
    rt: tokio::runtime::Handle,
    ttl: Duration,
    metrics: Arc<FsMetrics>,
) -> std::io::Result<MountedLayer> {
    use fuser::MountOption;
    let fs = LayerFs::new(tree, spans.clone(), rt, ttl, metrics);
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        MountOption::RO,
        MountOption::FSName("soci".into()),
        MountOption::Subtype("soci".into()),
        MountOption::DefaultPermissions,
        MountOption::Dev,
        MountOption::Suid,
    ];
    cfg.acl = fuser::SessionACL::All;
    let session = fuser::spawn_mount(fs, mountpoint, &cfg)?;
    Ok(MountedLayer {
        session: Some(session),
        spans,
    })
}
