//! Full pulls done by the snapshotter: layers without a zTOC, and images without a usable SOCI
//! index. The coming layers of an image are pulled in parallel (bounded) ahead of their
//! Prepare: with `parallel_pull_unpack` each is unpacked into a staging directory as its bytes
//! arrive and the Prepare only renames it into place once the whole blob's digest matched;
//! otherwise each is downloaded to a temp file and the Prepare unpacks it.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::AsyncReadExt;

use soci_registry::oci::layer_compression;
use soci_registry::{Descriptor, Digest, Reference, Repository};

use super::{
    attempt, ImageLayers, Remote, DOWNLOADS_PER_IMAGE, LABEL_LAYER_DIGEST, LABEL_MANIFEST_DIGEST,
};

impl Remote {
    /// The layer list of an image, looked up once per image.
    pub(super) async fn layer_list(
        &self,
        key: &str,
        fetch: impl std::future::Future<Output = Result<Vec<Descriptor>, String>>,
    ) -> Result<Arc<ImageLayers>, String> {
        attempt::run(&self.image_layers, &key.to_string(), async {
            let layers = fetch.await?;
            Ok(Arc::new(ImageLayers {
                layers,
                slots: Arc::new(tokio::sync::Semaphore::new(DOWNLOADS_PER_IMAGE)),
            }))
        })
        .await
    }
    /// Starts downloading the layers containerd will prepare next (this one and those above
    /// it, from the `cri.image-layers` label) that `wanted` selects.
    pub(super) fn start_downloads(
        self: &Arc<Self>,
        repo: &Repository,
        labels: &BTreeMap<String, String>,
        layers: &[Descriptor],
        slots: &Arc<tokio::sync::Semaphore>,
        wanted: impl Fn(&Digest) -> bool,
    ) {
        let upcoming: Vec<&str> = labels
            .get("containerd.io/snapshot/cri.image-layers")
            .map(|s| s.split(',').collect())
            .unwrap_or_else(|| {
                labels
                    .get(LABEL_LAYER_DIGEST)
                    .map(|d| vec![d.as_str()])
                    .unwrap_or_default()
            });
        for l in layers
            .iter()
            .filter(|l| upcoming.contains(&l.digest.as_str()) && wanted(&l.digest))
        {
            let cell = {
                let mut map = self.downloads.lock().expect("downloads");
                if map.contains_key(&l.digest) {
                    continue;
                }
                map.entry(l.digest.clone()).or_default().clone()
            };
            let (me, repo, layer, slots) = (self.clone(), repo.clone(), l.clone(), slots.clone());
            tokio::spawn(async move {
                let r = cell
                    .get_or_init(|| async {
                        let _permit = slots.acquire_owned().await.map_err(|e| e.to_string())?;
                        me.download(&repo, &layer).await
                    })
                    .await;
                if r.is_err() {
                    // Only a Prepare already waiting sees this failure; a later one downloads
                    // afresh (the registry may be back).
                    attempt::forget(&me.downloads, &layer.digest, &cell);
                }
            });
        }
    }
    /// Pulls a layer ahead of its Prepare: unpacked while it downloads (`parallel_pull_unpack`)
    /// or downloaded to a temp file. Either way the blob's digest has matched on success.
    pub(super) async fn download(
        &self,
        repo: &Repository,
        layer: &Descriptor,
    ) -> Result<Arc<Fetched>, String> {
        if self
            .cfg
            .pull_modes
            .parallel_pull_unpack
            .experimental_parallel_pull_as_fallback
        {
            return self.download_unpacking(repo, layer).await.map(Arc::new);
        }
        let tmp = tempfile::NamedTempFile::new_in(&self.tmp_root)
            .map_err(|e| e.to_string())?
            .into_temp_path();
        let mut f = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| e.to_string())?;
        self.client
            .get_blob_to(repo, layer, &mut f)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(Fetched::File(tmp)))
    }

    /// Streams a layer blob into the unpacker: bytes are hashed as they arrive and unpacked
    /// into a staging directory on a blocking thread; the result is used only if the digest
    /// of the whole blob matched.
    async fn download_unpacking(
        &self,
        repo: &Repository,
        layer: &Descriptor,
    ) -> Result<Fetched, String> {
        let staged = Staged::new(&self.tmp_root).map_err(|e| e.to_string())?;
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let compression = layer_compression(&layer.media_type);
        let (dir, rt) = (staged.0.clone(), tokio::runtime::Handle::current());
        let unpacker = tokio::task::spawn_blocking(move || {
            let mut raw = BlockingRead { rt, r: rx };
            let n = crate::unpack::unpack(crate::unpack::decoder(&mut raw, compression)?, &dir)?;
            // Whatever follows the tar's end (padding, gzip trailer) still has to be hashed.
            std::io::copy(&mut raw, &mut std::io::sink())?;
            Ok::<u64, std::io::Error>(n)
        });
        let fetched = self.client.get_blob_to(repo, layer, &mut tx).await;
        drop(tx);
        let unpacked = unpacker.await.map_err(|e| e.to_string())?;
        fetched.map_err(|e| e.to_string())?;
        unpacked.map_err(|e| format!("unpacking layer {}: {e}", layer.digest))?;
        Ok(Fetched::Unpacked(staged))
    }
    /// Forgets a download not needed (the layer already exists).
    pub fn discard_download(&self, layer: &str) {
        if let Some(d) = Digest::parse(layer) {
            self.downloads.lock().expect("downloads").remove(&d);
        }
    }
    /// The layers of an image from its manifest (media type and size are needed to unpack).
    pub(super) async fn fetch_layers(
        &self,
        r: &Reference,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<Descriptor>, String> {
        let object = labels
            .get(LABEL_MANIFEST_DIGEST)
            .cloned()
            .unwrap_or_else(|| r.object());
        let (desc, bytes) = self
            .client
            .get_manifest(&r.repository, &object)
            .await
            .map_err(|e| e.to_string())?;
        let manifest: soci_registry::ImageManifest =
            if soci_registry::oci::is_index(&desc.media_type) {
                let idx: soci_registry::ImageIndex =
                    serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
                let host = soci_registry::Platform::host();
                let entry = idx
                    .manifests
                    .iter()
                    .find(|d| {
                        d.artifact_type.is_none()
                            && d.platform.as_ref().is_none_or(|p| p.matches(&host))
                    })
                    .ok_or("no manifest for this platform")?;
                let (_, b) = self
                    .client
                    .get_manifest(&r.repository, entry.digest.as_str())
                    .await
                    .map_err(|e| e.to_string())?;
                serde_json::from_slice(&b).map_err(|e| e.to_string())?
            } else {
                serde_json::from_slice(&bytes).map_err(|e| e.to_string())?
            };
        Ok(manifest.layers)
    }
    /// Downloads a layer (digest-verified) and unpacks it into `fs_dir`.
    pub async fn unpack_full(
        &self,
        fs_dir: &Path,
        repo: &Repository,
        layer: &Descriptor,
    ) -> Result<(), String> {
        let compression = layer_compression(&layer.media_type);
        // Started ahead by `start_downloads`, or fetched now.
        let cell = attempt::cell(&self.downloads, &layer.digest);
        let file = cell
            .get_or_init(|| self.download(repo, layer))
            .await
            .clone();
        // Used up (or failed): the next Prepare of this layer starts afresh.
        attempt::forget(&self.downloads, &layer.digest, &cell);
        let digest = layer.digest.clone();
        let dir = fs_dir.to_path_buf();
        match &*file? {
            Fetched::Unpacked(staged) => {
                // The snapshot's empty fs directory is replaced by the unpacked tree.
                std::fs::rename(&staged.0, &dir)
                    .map_err(|e| format!("moving unpacked layer {digest} into place: {e}"))?;
            }
            Fetched::File(tmp) => {
                let path = tmp.to_path_buf();
                tokio::task::spawn_blocking(move || {
                    let file =
                        std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(&path)?);
                    crate::unpack::unpack(crate::unpack::decoder(file, compression)?, &dir)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("unpacking layer {digest}: {e}"))?;
            }
        }
        self.layers_full
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// A layer pulled ahead of its Prepare.
pub(crate) enum Fetched {
    /// The blob, in a temp file (removed on drop).
    File(tempfile::TempPath),
    /// Already unpacked into this staging directory.
    Unpacked(Staged),
}

/// A staging directory, removed on drop unless it was moved into place.
pub(crate) struct Staged(PathBuf);

impl Staged {
    fn new(tmp_root: &Path) -> std::io::Result<Staged> {
        let dir = tempfile::Builder::new()
            .prefix("unpack-")
            .tempdir_in(tmp_root)?
            .keep();
        // The layer root gets the mode a snapshot directory has (the tar may set its own).
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        Ok(Staged(dir))
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The read half of an in-memory pipe fed by an async download, read on a blocking thread.
struct BlockingRead {
    rt: tokio::runtime::Handle,
    r: tokio::io::DuplexStream,
}

impl Read for BlockingRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.rt.block_on(self.r.read(buf))
    }
}
