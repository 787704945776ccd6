//! Upstream soci-snapshotter's per-layer metrics of the remote-snapshot steps (mount, zTOC
//! and index fetch), kept out of the steps themselves: each is one call there.

use std::path::Path;
use std::time::Instant;

use soci_fs::metrics::op;
use soci_index::SociImage;
use soci_registry::Descriptor;

use super::Remote;

impl Remote {
    /// Records the latency of step `operation` for `layer` (upstream's
    /// `soci_fs_operation_duration_milliseconds`).
    pub(super) fn observe(&self, operation: &'static str, layer: &str, started: Instant) {
        self.metrics
            .upstream
            .observe_ms(operation, layer, started.elapsed());
    }

    /// Mounts a layer lazily at `fs_dir` for snapshot `id`, counted as upstream counts it:
    /// `mount` latency, `fuse_mount_failure_count` on failure (the layer is then pulled in
    /// full), and the layer's size and fetched bytes while it is mounted.
    #[tracing::instrument(level = "debug", name = "mount_lazy", skip_all, fields(id = id, image = %img.reference, layer = %layer.digest))]
    pub async fn mount_lazy(
        &self,
        id: u64,
        fs_dir: &Path,
        img: &SociImage,
        ztoc: &Descriptor,
        layer: &Descriptor,
    ) -> super::Result<()> {
        let started = Instant::now();
        let r = self
            .mount_lazy_uncounted(id, fs_dir, img, ztoc, layer)
            .await;
        let (m, digest) = (&self.metrics.upstream, layer.digest.as_str());
        self.observe(op::MOUNT, digest, started);
        match &r {
            Ok(()) => m.mounted(
                &id.to_string(),
                &fs_dir.display().to_string(),
                digest,
                layer.size,
            ),
            Err(_) => m.inc(op::FUSE_MOUNT_FAILURE_COUNT, digest),
        }
        r
    }
}
