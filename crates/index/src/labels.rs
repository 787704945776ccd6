//! Snapshot label names shared by the snapshotter daemon and the `soci` CLI.
//!
//! Why here: the daemon writes these labels (and containerd or `soci image rpull` sends some
//! of them with a remote Prepare), and `soci image mode` reads them back. Both depend on this
//! crate, so one definition keeps writer and reader from drifting apart.

/// containerd: the snapshot name the client wants (the layer's chain id).
pub const TARGET: &str = "containerd.io/snapshot.ref";
/// Image reference (CRI and `soci image rpull`).
pub const IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// Image manifest digest.
pub const MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// Layer digest.
pub const LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// Comma-separated digests of the image's layers from this one up (CRI).
pub const IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
/// Set on remote snapshots.
pub const REMOTE: &str = "containerd.io/snapshot/remote";
/// `lazy` (served over FUSE) or `full` (downloaded and unpacked).
pub const MODE: &str = "containerd.io/snapshot/soci.mode";
/// Why a layer of a remote pull was not lazy.
pub const FALLBACK_REASON: &str = "containerd.io/snapshot/soci.fallback-reason";
/// zTOC digest of a lazy layer.
pub const ZTOC_DIGEST: &str = "containerd.io/snapshot/soci.ztoc-digest";
/// Upstream's (nerdctl `--soci-index-digest`): use this SOCI index instead of discovery.
pub const SOCI_INDEX_DIGEST: &str = "containerd.io/snapshot/remote/soci.index.digest";
/// Marks a layer that could not be restored.
pub const BROKEN: &str = "containerd.io/snapshot/broken";
/// Prefix of the [`FALLBACK_REASON`] value of a layer handed back to containerd.
pub const HANDED_BACK: &str = "handed_back:";
/// [`MODE`] value of a layer served over FUSE.
pub const MODE_LAZY: &str = "lazy";
/// [`MODE`] value of a layer downloaded and unpacked by the daemon.
pub const MODE_FULL: &str = "full";
