//! Full pulls done by the snapshotter: every layer in parallel pull mode, and (lazy loading on)
//! layers without a zTOC and images without a usable SOCI index. Each layer is fetched with
//! chunked parallel range requests (`concurrent_download_chunk_size`) within the download
//! limits and unpacked into a staging directory: streamed straight into the unpacker when an
//! unpack slot is free, else spooled to a temp file that is unpacked from as soon as a slot
//! frees, while the download goes on (see `parallel.rs`, `spool.rs`). The
//! Prepare only renames the staging directory into place, and only once the whole blob's
//! size and digest matched. With `experimental_parallel_pull_as_fallback` (or parallel mode)
//! the coming layers of an image are pulled ahead of their Prepare.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tracing::Instrument;

use soci_registry::oci::layer_compression;
use soci_registry::{Descriptor, Digest, Reference, Repository};

use super::singleflight::SingleFlight;
use super::spool;
use super::{content, ImageLayers, ImageLimits, LayerPlan, Remote, RemoteError, Result};
use crate::config::Config;
use soci_index::labels as label;
use soci_registry::Client;
use std::sync::atomic::{AtomicU64, Ordering};

/// Layer lists of images pulled in full, by image reference and manifest.
pub(super) type LayerLists = SingleFlight<String, Result<Arc<ImageLayers>>>;

/// Layers pulled ahead of their Prepare (digest-verified and unpacked into a staging
/// directory), by layer digest.
pub(super) type Downloads = SingleFlight<Digest, Result<Arc<Fetched>>>;

/// Full pulls done by the daemon: layer lists, downloads started ahead of Prepare, the
/// limits, and the registry client and config they need. Owned by [`Remote`] (as
/// `remote.full`), which plans; this type only downloads and unpacks.
pub struct FullPulls {
    client: Arc<Client>,
    cfg: Config,
    /// Where downloads are staged (emptied at start).
    tmp_root: PathBuf,
    /// Layer lists of images pulled in full, by image reference and manifest.
    image_layers: LayerLists,
    /// Layer downloads started ahead of their Prepare, by layer digest.
    downloads: Downloads,
    /// Full-pull limits (`[pull_modes.parallel_pull_unpack]`) and counters.
    pub(super) limits: super::parallel::PullLimits,
    /// Layers downloaded and unpacked into place.
    pub layers_unpacked: AtomicU64,
}

impl FullPulls {
    /// Full pulls staged under `tmp_root` (emptied first: downloads of a previous run are of
    /// no use).
    pub(super) fn new(client: Arc<Client>, cfg: &Config, tmp_root: PathBuf) -> Result<FullPulls> {
        let _ = std::fs::remove_dir_all(&tmp_root);
        std::fs::create_dir_all(&tmp_root)
            .map_err(|e| RemoteError::io(tmp_root.display().to_string(), e))?;
        Ok(FullPulls {
            client,
            limits: super::parallel::PullLimits::new(&cfg.pull_modes.parallel_pull_unpack),
            cfg: cfg.clone(),
            tmp_root,
            image_layers: Default::default(),
            downloads: Default::default(),
            layers_unpacked: AtomicU64::new(0),
        })
    }

    /// The layer list of an image, looked up once per image.
    pub(super) async fn layer_list(
        &self,
        key: &str,
        fetch: impl std::future::Future<Output = Result<Vec<Descriptor>>>,
    ) -> Result<Arc<ImageLayers>> {
        self.image_layers
            .run(&key.to_string(), async {
                let layers = fetch.await?;
                Ok(Arc::new(ImageLayers {
                    layers,
                    limits: Arc::new(self.limits.image()),
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
        limits: &Arc<ImageLimits>,
        wanted: impl Fn(&Digest) -> bool,
    ) {
        let p = &self.cfg.pull_modes.parallel_pull_unpack;
        if !p.enable && !p.experimental_parallel_pull_as_fallback {
            // Such layers are handed to containerd (see `full_pulls_go_to_containerd`).
            return;
        }
        let upcoming: Vec<&str> = labels
            .get(label::IMAGE_LAYERS)
            .map(|s| s.split(',').collect())
            .unwrap_or_else(|| {
                labels
                    .get(label::LAYER_DIGEST)
                    .map(|d| vec![d.as_str()])
                    .unwrap_or_default()
            });
        let queue: Vec<_> = layers
            .iter()
            .filter(|l| upcoming.contains(&l.digest.as_str()) && wanted(&l.digest))
            .filter_map(|l| Some((l.clone(), self.downloads.cell_if_new(&l.digest)?)))
            .collect();
        if queue.is_empty() {
            return;
        }
        let (me, repo, limits) = (self.clone(), repo.clone(), limits.clone());
        let ns = content::namespace();
        tokio::spawn(content::with_namespace(ns.clone(), async move {
            // Download slots go to the layers in image order: containerd prepares the bottom
            // layer first, and one queued behind later layers held up its Prepare and every
            // one after it (the benchmark's 1 MiB bottom layer started 9.7 s into the pull,
            // behind three big ones, and then waited for their unpack slot).
            for (layer, cell) in queue {
                let Ok(slot) = limits.layers.clone().acquire_owned().await else {
                    return;
                };
                let (me, repo, limits) = (me.clone(), repo.clone(), limits.clone());
                tokio::spawn(content::with_namespace(ns.clone(), async move {
                    let slot = std::sync::Mutex::new(Some(slot));
                    let take = || slot.lock().unwrap_or_else(|p| p.into_inner()).take();
                    let mut init = std::pin::pin!(cell.get_or_init(|| me.download(
                        &repo,
                        &layer,
                        &limits,
                        take()
                    )));
                    // The first poll runs the download (which takes the slot) unless a Prepare
                    // of this layer is downloading it already: then the slot is given back at
                    // once, since that download may itself be waiting for one (with one slot
                    // per image, holding it here would deadlock them).
                    let r = match std::future::poll_fn(|cx| {
                        std::task::Poll::Ready(std::future::Future::poll(init.as_mut(), cx))
                    })
                    .await
                    {
                        std::task::Poll::Ready(r) => r,
                        std::task::Poll::Pending => {
                            drop(take());
                            init.await
                        }
                    };
                    if r.is_err() {
                        // Only a Prepare already waiting sees this failure; a later one
                        // downloads afresh (the registry may be back).
                        me.downloads.forget(&layer.digest, &cell);
                    }
                }));
            }
        }));
    }
    /// Pulls and unpacks a layer into a staging directory (see the module docs), holding one
    /// of the image's download slots (`slot`, else one taken here); on success the blob's size
    /// and digest have matched.
    pub(super) async fn download(
        &self,
        repo: &Repository,
        layer: &Descriptor,
        img: &ImageLimits,
        slot: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Result<Arc<Fetched>> {
        let downloading = match slot {
            Some(s) => s,
            None => img.layers.clone().acquire_owned().await?,
        };
        let opts = self.limits.chunked(img);
        // Shared with the unpacking thread, so that the directory is removed only once that
        // thread has stopped writing into it (a cancelled download does not stop it at once).
        let staged = Arc::new(Staged::new(&self.tmp_root).map_err(|e| {
            RemoteError::io(format!("staging directory for layer {}", layer.digest), e)
        })?);
        if let Some(_unpacking) = self.limits.try_unpack(img) {
            self.stream_unpack(repo, layer, &opts, &staged)
                .instrument(tracing::debug_span!("layer_stream_unpack", layer = %layer.digest, bytes = layer.size))
                .await?;
            return Ok(Arc::new(Fetched::Unpacked(staged)));
        }
        // No unpack slot now: download to a temp file (removed on drop), and unpack it from
        // there as soon as a slot frees, while the download goes on (see `spool.rs`).
        self.limits.stats.spooled.fetch_add(1, Ordering::Relaxed);
        let what = |w: &str| format!("{w} for layer {}", layer.digest);
        let tmp = tempfile::NamedTempFile::new_in(&self.tmp_root)
            .map_err(|e| RemoteError::io(what("temp file"), e))?
            .into_temp_path();
        let f = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| RemoteError::io(what("temp file"), e))?;
        let reader =
            std::fs::File::open(&tmp).map_err(|e| RemoteError::io(what("temp file"), e))?;
        let (mut f, progress) = spool::spool(f);
        let unpack_failed = tokio::sync::Notify::new();
        let download = async {
            let mut blob = content::BlobSink::begin(&self.cfg, repo, layer);
            let mut fetched = (self.client)
                .get_blob_chunked_to(
                    repo,
                    layer,
                    &opts,
                    &mut content::Tee::new(&mut f, blob.as_mut()),
                )
                .await
                .map_err(RemoteError::from);
            if fetched.is_ok() {
                if let Err(e) = tokio::io::AsyncWriteExt::flush(&mut f).await {
                    fetched = Err(RemoteError::io(what("temp file"), e));
                }
            }
            f.finish(fetched.is_ok());
            if let Some(b) = blob {
                b.finish(fetched.is_ok()).await;
            }
            let stats = fetched?;
            self.limits.record(&stats);
            Ok::<(), RemoteError>(())
        };
        let download = download.instrument(
            tracing::debug_span!("layer_download", layer = %layer.digest, bytes = layer.size),
        );
        let download = async {
            // An unpack that failed (a hostile tar) stops the download: its bytes are of no use.
            let r = tokio::select! {
                r = download => Some(r),
                () = unpack_failed.notified() => None,
            };
            drop(downloading);
            r
        };
        let state = progress.clone();
        let unpack = async {
            let r = async {
                let mut failed = progress.clone();
                let slot = self
                    .limits
                    .unpack(img)
                    .instrument(tracing::debug_span!("unpack_slot_wait", layer = %layer.digest));
                let _unpacking = tokio::select! {
                    slot = slot => slot?,
                    // No slot is needed for a download that failed.
                    _ = failed.wait_for(|p| *p == spool::Progress::Failed) => {
                        return Err(RemoteError::io(what("download"), std::io::Error::other("failed")));
                    }
                };
                let (dir, compression, rt) = (
                    staged.clone(),
                    layer_compression(&layer.media_type),
                    tokio::runtime::Handle::current(),
                );
                tokio::task::spawn_blocking(move || {
                    let file = std::io::BufReader::with_capacity(
                        1 << 20,
                        spool::SpoolReader::new(reader, progress, rt),
                    );
                    crate::unpack::unpack(crate::unpack::decoder(file, compression)?, &dir.0)
                })
                .instrument(tracing::debug_span!("layer_unpack", layer = %layer.digest))
                .await?
                .map_err(|e| RemoteError::io(what("unpacking"), e))
            }
            .await;
            // Only an unpack that failed on its own stops the download: one that failed because
            // the download did leaves it to finish and report why (auth, digest, disk full).
            if r.is_err() && *state.borrow() != spool::Progress::Failed {
                unpack_failed.notify_one();
            }
            r
        };
        match tokio::join!(download, unpack) {
            // The download's own failure says more than the unpack's that followed from it.
            (Some(Err(e)), _) => Err(e),
            (_, Err(e)) => Err(e),
            (Some(Ok(())), Ok(_)) => Ok(Arc::new(Fetched::Unpacked(staged))),
            // Not reached: the download stops early only when the unpack failed.
            (None, Ok(_)) => Err(RemoteError::io(
                what("download"),
                std::io::Error::other("stopped"),
            )),
        }
    }

    /// Streams a layer blob into the unpacker: chunks arrive in order, are hashed, and are
    /// unpacked into `dir` on a blocking thread; the caller uses `dir` only on success (the
    /// digest of the whole blob matched).
    async fn stream_unpack(
        &self,
        repo: &Repository,
        layer: &Descriptor,
        opts: &soci_registry::ChunkedDownload,
        staged: &Arc<Staged>,
    ) -> Result<()> {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let compression = layer_compression(&layer.media_type);
        let (dir, rt) = (staged.clone(), tokio::runtime::Handle::current());
        let unpacker = tokio::task::spawn_blocking(move || {
            let mut raw = BlockingRead { rt, r: rx };
            let n = crate::unpack::unpack(crate::unpack::decoder(&mut raw, compression)?, &dir.0)?;
            // Whatever follows the tar's end (padding, gzip trailer) still has to be hashed.
            std::io::copy(&mut raw, &mut std::io::sink())?;
            Ok::<u64, std::io::Error>(n)
        });
        let mut blob = content::BlobSink::begin(&self.cfg, repo, layer);
        let fetched = (self.client)
            .get_blob_chunked_to(
                repo,
                layer,
                opts,
                &mut content::Tee::new(&mut tx, blob.as_mut()),
            )
            .await;
        drop(tx);
        let unpacked = unpacker.await?;
        if let Some(b) = blob {
            // Committed only if the whole blob matched its digest and unpacked.
            b.finish(fetched.is_ok() && unpacked.is_ok()).await;
        }
        let stats = fetched?;
        self.limits.record(&stats);
        unpacked.map_err(|e| RemoteError::io(format!("unpacking layer {}", layer.digest), e))?;
        Ok(())
    }

    /// Layers not served lazily are left to containerd (`experimental_parallel_pull_as_fallback
    /// = false` without parallel pull mode, upstream's meaning) instead of pulled by the daemon.
    pub fn go_to_containerd(&self) -> bool {
        let p = &self.cfg.pull_modes.parallel_pull_unpack;
        !p.enable && !p.experimental_parallel_pull_as_fallback
    }

    /// Why a layer planned [`super::LayerPlan::Full`] without a discovery failure is pulled
    /// in full (the `soci.fallback-reason` label).
    pub fn reason(&self) -> &'static str {
        if self.cfg.pull_modes.parallel_pull_unpack.enable {
            "parallel_pull_unpack"
        } else {
            "layer_without_ztoc"
        }
    }

    /// What full pulls did (for metrics).
    pub fn stats(&self) -> &super::PullStats {
        &self.limits.stats
    }

    /// Forgets a download not needed (the layer already exists).
    pub fn discard(&self, layer: &str) {
        if let Some(d) = Digest::parse(layer) {
            self.downloads.remove(&d);
        }
    }
    /// The layers of an image from its manifest (media type and size are needed to unpack).
    pub(super) async fn fetch_layers(
        &self,
        r: &Reference,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<Descriptor>> {
        let object = labels
            .get(label::MANIFEST_DIGEST)
            .cloned()
            .unwrap_or_else(|| r.object());
        let (desc, bytes) = self.client.get_manifest(&r.repository, &object).await?;
        let manifest: soci_registry::ImageManifest =
            if soci_registry::oci::is_index(&desc.media_type) {
                let idx: soci_registry::ImageIndex =
                    serde_json::from_slice(&bytes).map_err(|e| {
                        RemoteError::Manifest(format!("image index {}: {e}", desc.digest))
                    })?;
                let host = soci_registry::Platform::host();
                let entry = soci_index::platform::manifest_for(&idx, &host).ok_or_else(|| {
                    RemoteError::Manifest(format!("{r}: no manifest for this platform"))
                })?;
                let (m, b) = self
                    .client
                    .get_manifest(&r.repository, entry.digest.as_str())
                    .await?;
                serde_json::from_slice(&b).map_err(|e| {
                    RemoteError::Manifest(format!("image manifest {}: {e}", m.digest))
                })?
            } else {
                serde_json::from_slice(&bytes).map_err(|e| {
                    RemoteError::Manifest(format!("image manifest {}: {e}", desc.digest))
                })?
            };
        Ok(manifest.layers)
    }
    /// Fresh per-image limits for a layer pulled on its own (a lazy mount that failed).
    pub fn lone_layer_limits(&self) -> Arc<ImageLimits> {
        Arc::new(self.limits.image())
    }

    /// Downloads a layer (digest-verified) within its image's `limits` and unpacks it into
    /// `fs_dir`.
    #[tracing::instrument(level = "debug", name = "full_pull", skip_all, fields(layer = %layer.digest))]
    pub async fn unpack_full(
        &self,
        fs_dir: &Path,
        repo: &Repository,
        layer: &Descriptor,
        limits: &ImageLimits,
    ) -> Result<()> {
        // Started ahead by `start_downloads`, or fetched now. Whichever caller gets to the
        // cell first runs the download, so this one must use the image's limits too (a task
        // spawned ahead may not have run yet).
        let cell = self.downloads.cell(&layer.digest);
        let file = cell
            .get_or_init(|| async { self.download(repo, layer, limits, None).await })
            .await
            .clone();
        // Used up (or failed): the next Prepare of this layer starts afresh.
        self.downloads.forget(&layer.digest, &cell);
        let digest = layer.digest.clone();
        let dir = fs_dir.to_path_buf();
        let Fetched::Unpacked(staged) = &*file?;
        // The snapshot's empty fs directory is replaced by the unpacked tree.
        std::fs::rename(&staged.0, &dir).map_err(|e| {
            RemoteError::io(format!("moving unpacked layer {digest} into place"), e)
        })?;
        self.layers_unpacked.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl Remote {
    /// Plans a full pull of a layer of an image not served lazily (parallel pull mode, or no
    /// usable SOCI index: `reason`) and starts pulling the coming layers of the image.
    pub(super) async fn plan_full(
        self: &Arc<Self>,
        r: &Reference,
        labels: &BTreeMap<String, String>,
        layer_digest: &Digest,
        reason: Option<soci_index::NoSoci>,
    ) -> Result<LayerPlan> {
        let key = format!(
            "{r}@{}",
            labels
                .get(label::MANIFEST_DIGEST)
                .map(String::as_str)
                .unwrap_or("")
        );
        let list = self
            .full
            .layer_list(&key, self.full.fetch_layers(r, labels))
            .await?;
        let layer = list
            .layers
            .iter()
            .find(|l| &l.digest == layer_digest)
            .cloned()
            .ok_or_else(|| RemoteError::LayerNotInImage {
                layer: layer_digest.clone(),
                image: r.to_string(),
            })?;
        self.full
            .start_downloads(&r.repository, labels, &list.layers, &list.limits, |_| true);
        Ok(LayerPlan::Full {
            repo: r.repository.clone(),
            layer,
            reason,
            limits: list.limits.clone(),
        })
    }
}

/// A layer pulled ahead of its Prepare.
pub(crate) enum Fetched {
    /// Unpacked into this staging directory.
    Unpacked(Arc<Staged>),
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
