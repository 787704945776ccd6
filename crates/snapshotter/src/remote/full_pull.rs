//! Full pulls done by the snapshotter: layers without a zTOC, and images without a usable SOCI
//! index. The coming layers of an image are downloaded in parallel (bounded) ahead of their
//! Prepare; each Prepare unpacks its own digest-verified download.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use soci_registry::oci::layer_compression;
use soci_registry::{Descriptor, Digest, Reference, Repository};

use super::{ImageLayers, Remote, DOWNLOADS_PER_IMAGE, LABEL_LAYER_DIGEST, LABEL_MANIFEST_DIGEST};

impl Remote {
    /// The layer list of an image, looked up once per image.
    pub(super) async fn layer_list(
        &self,
        key: &str,
        fetch: impl std::future::Future<Output = Result<Vec<Descriptor>, String>>,
    ) -> Result<Arc<ImageLayers>, String> {
        let cell = self
            .image_layers
            .lock()
            .expect("image layers")
            .entry(key.to_string())
            .or_default()
            .clone();
        let r = cell
            .get_or_init(|| async {
                let layers = fetch.await?;
                Ok(Arc::new(ImageLayers {
                    layers,
                    slots: Arc::new(tokio::sync::Semaphore::new(DOWNLOADS_PER_IMAGE)),
                }))
            })
            .await
            .clone();
        if r.is_err() {
            self.image_layers.lock().expect("image layers").remove(key);
        }
        r
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
                let _ = cell
                    .get_or_init(|| async {
                        let _permit = slots.acquire_owned().await.map_err(|e| e.to_string())?;
                        me.download(&repo, &layer).await
                    })
                    .await;
            });
        }
    }
    /// Downloads a layer blob (digest-verified) into a temp file.
    pub(super) async fn download(
        &self,
        repo: &Repository,
        layer: &Descriptor,
    ) -> Result<Arc<tempfile::TempPath>, String> {
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
        Ok(Arc::new(tmp))
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
        let cell = self
            .downloads
            .lock()
            .expect("downloads")
            .entry(layer.digest.clone())
            .or_default()
            .clone();
        let file = cell
            .get_or_init(|| self.download(repo, layer))
            .await
            .clone();
        self.downloads
            .lock()
            .expect("downloads")
            .remove(&layer.digest);
        let file = file?;
        let dir = fs_dir.to_path_buf();
        let path = file.to_path_buf();
        let digest = layer.digest.clone();
        tokio::task::spawn_blocking(move || {
            let file = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(&path)?);
            crate::unpack::unpack(crate::unpack::decoder(file, compression)?, &dir)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("unpacking layer {digest}: {e}"))?;
        self.layers_full
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}
