//! Remote snapshots: when containerd prepares a layer with the remote-snapshot labels, the
//! layer is served lazily over FUSE from its zTOC (if the image's SOCI v2 trust chain holds
//! and the layer has a zTOC), or downloaded and unpacked here; either way the snapshot is
//! committed under the target name and containerd is told it already exists.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use soci_fs::{FsMetrics, LayerTree, MountedLayer, RangeReader, SpanConfig, SpanManager};
use soci_index::{discover, DiscoverOptions, NoSoci, SociImage};
use soci_registry::{
    Client, ClientOptions, Descriptor, Digest, HostsConfig, Reference, Repository,
};
use tracing::{info, warn};

use crate::config::Config;
use crate::holder::{Held, HolderClient};
use soci_fs::metrics::op as UpOp;

mod attempt;
mod full_pull;
mod health;
mod observe;
mod parallel;
mod prefetch;

pub use parallel::PullStats;

pub use health::{BrokenLayer, PROBE_TIMEOUT};
pub use prefetch::PrefetchState;

/// containerd: the snapshot name the client wants (the layer's chain id).
pub const LABEL_TARGET: &str = "containerd.io/snapshot.ref";
/// Image reference (CRI and `soci image rpull`).
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// Image manifest digest.
pub const LABEL_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// Layer digest.
pub const LABEL_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// Set on remote snapshots.
pub const LABEL_REMOTE: &str = "containerd.io/snapshot/remote";
/// `lazy` (served over FUSE) or `full` (downloaded and unpacked).
pub const LABEL_MODE: &str = "containerd.io/snapshot/soci.mode";
/// Why a layer of a remote pull was not lazy.
pub const LABEL_REASON: &str = "containerd.io/snapshot/soci.fallback-reason";
/// zTOC digest of a lazy layer.
pub const LABEL_ZTOC: &str = "containerd.io/snapshot/soci.ztoc-digest";
/// Upstream's (nerdctl `--soci-index-digest`): use this SOCI index instead of discovery.
pub const LABEL_SOCI_INDEX_DIGEST: &str = "containerd.io/snapshot/remote/soci.index.digest";
/// Marks a layer that could not be restored.
pub const LABEL_BROKEN: &str = "containerd.io/snapshot/broken";

/// Range reads of a layer blob from the registry (or whole reads, if it ignores ranges).
struct RegistryReader {
    client: Arc<Client>,
    repo: Repository,
    layer: Descriptor,
}

impl RangeReader for RegistryReader {
    fn read_range(
        &self,
        range: Range<u64>,
        deadline: tokio::time::Instant,
    ) -> soci_fs::ReadFuture<'_, Bytes> {
        Box::pin(async move {
            self.client
                .get_blob_range_until(&self.repo, &self.layer.digest, range, Some(deadline))
                .await
                .map_err(io::Error::other)
        })
    }

    fn whole_only(&self) -> bool {
        !self.client.supports_ranges(&self.repo.registry)
    }

    fn read_whole(&self, tx: tokio::sync::mpsc::Sender<Bytes>) -> soci_fs::ReadFuture<'_, ()> {
        Box::pin(async move {
            let mut blob = self
                .client
                .open_blob(&self.repo, &self.layer, None)
                .await
                .map_err(io::Error::other)?;
            while let Some(chunk) = blob.chunk().await.map_err(io::Error::other)? {
                if tx.send(chunk).await.is_err() {
                    break;
                }
            }
            Ok(())
        })
    }
}

type Discovery = attempt::Cell<Result<Arc<SociImage>, NoSoci>>;

/// How long a definitive "no lazy loading for this manifest" answer is shared (by the layers
/// of one pull) before the image is looked at again.
const DEFINITIVE_ANSWER_TTL: Duration = Duration::from_secs(60);

/// Whether a discovery result is a fact about the (digest-pinned) image rather than a failure
/// of the attempt: such answers may be shared for a while, failures never outlive their attempt.
fn definitive(reason: &NoSoci) -> bool {
    matches!(
        reason,
        NoSoci::NoIndex(_)
            | NoSoci::V1Only(_)
            | NoSoci::ZstdLayer(_)
            | NoSoci::CorruptZtoc(..)
            | NoSoci::CorruptIndex(..)
            | NoSoci::NoPlatform(_)
    )
}

/// A layer ready to mount: its validated span table and inode tree.
#[derive(Clone)]
struct PreparedLayer {
    spans: soci_ztoc::Spans,
    tree: Arc<LayerTree>,
}

type Prepared = attempt::Cell<Result<PreparedLayer, String>>;

/// A layer pulled ahead of its Prepare (digest-verified): its blob in a temp file, or already
/// unpacked into a staging directory.
type Download = attempt::Cell<Result<Arc<full_pull::Fetched>, String>>;

/// The layers of an image (for full pulls) and its download and unpack limits.
struct ImageLayers {
    layers: Vec<Descriptor>,
    limits: Arc<parallel::ImageLimits>,
}

type LayerList = attempt::Cell<Result<Arc<ImageLayers>, String>>;

/// State of remote layers.
pub struct Remote {
    /// Credentials from the kubelet's PullImage requests (`[cri_keychain]` enabled).
    pub cri_credentials: Option<Arc<crate::cri::CredentialStore>>,
    client: Arc<Client>,
    cfg: Config,
    cache_root: PathBuf,
    tmp_root: PathBuf,
    images: Mutex<HashMap<String, Discovery>>,
    /// zTOCs fetched and parsed ahead of the layer's Prepare, by zTOC digest.
    prepared: Mutex<HashMap<Digest, Prepared>>,
    /// Layer lists of images pulled in full, by image reference and manifest.
    image_layers: Mutex<HashMap<String, LayerList>>,
    /// Layer downloads started ahead of their Prepare, by layer digest.
    downloads: Mutex<HashMap<Digest, Download>>,
    mounts: Mutex<HashMap<u64, MountedLayer>>,
    /// The fd holder keeping lazy mounts alive across restarts (if enabled and reachable).
    holder: Mutex<Option<HolderClient>>,
    holder_path: PathBuf,
    /// Mounts an earlier daemon left to the holder, not resumed yet.
    held: Mutex<BTreeMap<u64, Held>>,
    logged: Mutex<HashSet<String>>,
    /// Decompressed spans in memory, all layers.
    memory: Arc<soci_fs::MemoryCache>,
    /// Span files on disk, all layers.
    pub disk: Arc<soci_fs::DiskBudget>,
    /// Shared bound on background span fetches.
    background_slots: Arc<tokio::sync::Semaphore>,
    /// FUSE and span counters.
    pub metrics: Arc<FsMetrics>,
    /// Fallbacks by reason label.
    pub fallbacks: Mutex<BTreeMap<&'static str, u64>>,
    /// Layers handed back to containerd to pull itself, by cause label.
    pub handed_back: Mutex<BTreeMap<&'static str, u64>>,
    /// Layers served lazily / unpacked.
    pub layers_lazy: std::sync::atomic::AtomicU64,
    /// Layers downloaded and unpacked.
    pub layers_full: std::sync::atomic::AtomicU64,
    /// Lazy layers not served, and their restore locks.
    health: health::Health,
    /// Prefetch counters and bound.
    pub prefetch: prefetch::PrefetchState,
    /// Full-pull limits (`[pull_modes.parallel_pull_unpack]`) and counters.
    limits: parallel::PullLimits,
}

/// How one layer will be provided.
pub enum LayerPlan {
    /// Over FUSE from this zTOC.
    Lazy(Arc<SociImage>, Descriptor, Descriptor),
    /// Downloaded and unpacked; the reason when the image is not lazy.
    Full(Repository, Descriptor, Option<NoSoci>),
}

impl Remote {
    /// Remote-layer state under `root`.
    pub fn new(root: &Path, cfg: &Config) -> Result<Remote, String> {
        let hosts = HostsConfig {
            hosts_dir: cfg
                .resolver
                .hosts_dir
                .is_dir()
                .then(|| cfg.resolver.hosts_dir.clone()),
            plain_http: false,
            plain_http_hosts: cfg.resolver.plain_http_hosts.clone(),
            mirrors: cfg.mirrors(),
        };
        let opts = ClientOptions {
            hosts,
            request_timeout: Duration::from_secs(cfg.blob.fetching_timeout_sec.max(1) * 10),
            ..Default::default()
        };
        let (keychain, cri_credentials) = crate::cri::keychain(root, cfg);
        let client = Client::with_keychain(opts, keychain).map_err(|e| e.to_string())?;
        let cache_root = root.join("cache");
        let tmp_root = root.join("tmp");
        // Downloads of a previous run are of no use: start clean.
        let _ = std::fs::remove_dir_all(&tmp_root);
        for d in [&cache_root, &tmp_root] {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        Ok(Remote {
            cri_credentials,
            client: Arc::new(client),
            cfg: cfg.clone(),
            cache_root,
            tmp_root,
            images: Mutex::new(HashMap::new()),
            prepared: Mutex::new(HashMap::new()),
            image_layers: Mutex::new(HashMap::new()),
            downloads: Mutex::new(HashMap::new()),
            mounts: Mutex::new(HashMap::new()),
            holder: Mutex::new(None),
            holder_path: root.join("fuse-holder.sock"),
            held: Mutex::new(BTreeMap::new()),
            logged: Mutex::new(HashSet::new()),
            memory: soci_fs::MemoryCache::new(cfg.blob.memory_cache_mb << 20),
            disk: soci_fs::DiskBudget::new(cfg.blob.disk_cache_mb << 20),
            background_slots: Arc::new(tokio::sync::Semaphore::new(
                cfg.background_fetch.max_concurrent_fetches.max(1),
            )),
            metrics: Arc::new(FsMetrics::default()),
            fallbacks: Mutex::new(BTreeMap::new()),
            handed_back: Mutex::new(BTreeMap::new()),
            layers_lazy: Default::default(),
            layers_full: Default::default(),
            health: Default::default(),
            prefetch: prefetch::PrefetchState::new(&cfg.prefetch),
            limits: parallel::PullLimits::new(&cfg.pull_modes.parallel_pull_unpack),
        })
    }

    /// Discovers an image's SOCI index once per (reference, manifest) and shares the result.
    async fn image(
        self: &Arc<Self>,
        image_ref: &str,
        manifest: Option<&str>,
        index_digest: Option<&str>,
    ) -> Result<Arc<SociImage>, NoSoci> {
        let key = format!(
            "{image_ref}@{} {}",
            manifest.unwrap_or(""),
            index_digest.unwrap_or("")
        );
        let cell = attempt::cell(&self.images, &key);
        let result = cell
            .get_or_init(|| async {
                let index_digest = index_digest
                    .map(|d| {
                        Digest::parse(d).ok_or_else(|| {
                            NoSoci::CorruptIndex(
                                d.into(),
                                format!("invalid {LABEL_SOCI_INDEX_DIGEST} label"),
                            )
                        })
                    })
                    .transpose()?;
                // As upstream, an index named by the client is used even with v1/v2 off.
                if index_digest.is_none() && !self.cfg.pull_modes.soci_v2.enable {
                    return Err(NoSoci::NoIndex(
                        "SOCI v2 is disabled in the configuration".into(),
                    ));
                }
                let r = Reference::parse(image_ref).map_err(NoSoci::Registry)?;
                let opts = DiscoverOptions {
                    allow_v1: self.cfg.pull_modes.soci_v1.enable,
                    index_digest,
                    ..Default::default()
                };
                let started = std::time::Instant::now();
                let img = discover(&self.client, &r, &opts).await?;
                self.observe(
                    UpOp::SOCI_INDEX_FETCH,
                    img.index_desc.digest.as_str(),
                    started,
                );
                if let Some(m) = manifest {
                    if img.manifest_desc.digest.as_str() != m {
                        return Err(NoSoci::DigestMismatch(format!(
                            "{image_ref} resolves to manifest {}, containerd pulls {m}",
                            img.manifest_desc.digest
                        )));
                    }
                }
                let img = Arc::new(img);
                // containerd prepares layers one after another: fetch every zTOC now, in
                // parallel, so no layer waits for its own round trip.
                for (layer, ztoc) in img.layer_ztocs() {
                    if let Some(z) = ztoc {
                        let (me, img) = (self.clone(), img.clone());
                        tokio::spawn(async move {
                            let _ = me.prepare_layer(&img, &z, &layer).await;
                        });
                    }
                }
                Ok(img)
            })
            .await
            .clone();
        if let Err(reason) = &result {
            if manifest.is_some() && definitive(reason) {
                // A fact about immutable content: the other layers of this pull share it, and
                // it is looked up again after a short while (the image may get an index).
                let (me, cell) = (self.clone(), cell.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(DEFINITIVE_ANSWER_TTL).await;
                    attempt::forget(&me.images, &key, &cell);
                });
            } else {
                // Transient (registry, a moving tag): the next layer or pull tries again.
                attempt::forget(&self.images, &key, &cell);
            }
        }
        result
    }

    /// Decides how a layer is provided.
    pub async fn plan(
        self: &Arc<Self>,
        labels: &BTreeMap<String, String>,
    ) -> Result<LayerPlan, String> {
        let image_ref = labels
            .get(LABEL_IMAGE_REF)
            .ok_or("no image reference label")?;
        let layer_digest = labels
            .get(LABEL_LAYER_DIGEST)
            .and_then(|d| Digest::parse(d))
            .ok_or("no valid layer digest label")?;
        let r = Reference::parse(image_ref)?;
        if self.cfg.pull_modes.parallel_pull_unpack.enable {
            return self.plan_full(&r, labels, &layer_digest, None).await;
        }
        match self
            .image(
                image_ref,
                labels.get(LABEL_MANIFEST_DIGEST).map(String::as_str),
                labels.get(LABEL_SOCI_INDEX_DIGEST).map(String::as_str),
            )
            .await
        {
            Ok(img) => {
                let layer = img
                    .manifest
                    .layers
                    .iter()
                    .find(|l| l.digest == layer_digest)
                    .cloned()
                    .ok_or_else(|| format!("layer {layer_digest} is not in image {image_ref}"))?;
                match img.index.ztoc_for(&layer_digest).cloned() {
                    Some(z) => Ok(LayerPlan::Lazy(img, z, layer)),
                    None => {
                        let unindexed: Vec<Descriptor> = img
                            .manifest
                            .layers
                            .iter()
                            .filter(|l| img.index.ztoc_for(&l.digest).is_none())
                            .cloned()
                            .collect();
                        let key = format!("{image_ref}@{}", img.manifest_desc.digest);
                        let limits = self
                            .layer_list(&key, async { Ok(unindexed) })
                            .await?
                            .limits
                            .clone();
                        self.start_downloads(
                            &r.repository,
                            labels,
                            &img.manifest.layers,
                            &limits,
                            |d| img.index.ztoc_for(d).is_none(),
                        );
                        Ok(LayerPlan::Full(r.repository, layer, None))
                    }
                }
            }
            Err(reason) => {
                self.note_fallback(image_ref, &reason);
                self.plan_full(&r, labels, &layer_digest, Some(reason))
                    .await
            }
        }
    }

    fn note_fallback(&self, image_ref: &str, reason: &NoSoci) {
        if self
            .logged
            .lock()
            .expect("logged")
            .insert(format!("{image_ref} {}", reason.label()))
        {
            info!(image = image_ref, reason = reason.label(), detail = %reason, "image is pulled in full (no lazy loading)");
            *self
                .fallbacks
                .lock()
                .expect("fallbacks")
                .entry(reason.label())
                .or_default() += 1;
        }
    }

    /// Counts a layer of `image_ref` handed back to containerd for `cause`; true the first
    /// time for this image and cause (the one time it is logged).
    pub fn note_hand_back(&self, image_ref: &str, cause: &'static str) -> bool {
        *self
            .handed_back
            .lock()
            .expect("handed_back")
            .entry(cause)
            .or_default() += 1;
        self.logged
            .lock()
            .expect("logged")
            .insert(format!("{image_ref} handed_back:{cause}"))
    }

    /// Fetches, verifies and parses a layer's zTOC and builds its tree, once per zTOC.
    async fn prepare_layer(
        &self,
        img: &SociImage,
        ztoc: &Descriptor,
        layer: &Descriptor,
    ) -> Result<PreparedLayer, String> {
        attempt::run(&self.prepared, &ztoc.digest, async {
            let started = std::time::Instant::now();
            let z = img
                .fetch_ztoc(&self.client, ztoc, layer)
                .await
                .map_err(|e| e.to_string())?;
            self.observe(UpOp::ZTOC_FETCH, layer.digest.as_str(), started);
            let spans = z
                .spans()
                .map_err(|e| format!("zTOC {}: {e}", ztoc.digest))?;
            let tree = tokio::task::spawn_blocking(move || LayerTree::build(&z))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("zTOC {}: {e}", ztoc.digest))?;
            Ok(PreparedLayer {
                spans,
                tree: Arc::new(tree),
            })
        })
        .await
    }

    /// Mounts a layer lazily at `fs_dir` for snapshot `id` (see `observe.rs`).
    async fn mount_lazy_uncounted(
        &self,
        id: u64,
        fs_dir: &Path,
        img: &SociImage,
        ztoc: &Descriptor,
        layer: &Descriptor,
    ) -> Result<(), String> {
        let PreparedLayer { spans, tree } = self.prepare_layer(img, ztoc, layer).await?;
        // Mounted layers keep their own copy; the prepared one is not needed any more.
        self.prepared.lock().expect("prepared").remove(&ztoc.digest);
        let reader = Arc::new(RegistryReader {
            client: self.client.clone(),
            repo: img.reference.repository.clone(),
            layer: layer.clone(),
        });
        let cfg = SpanConfig {
            cache_dir: self.cache_root.join(id.to_string()),
            disable_verification: self.cfg.disable_verification,
            max_verification_retries: self.cfg.blob.max_span_verification_retries,
            fetch_timeout: Duration::from_secs(self.cfg.blob.fetching_timeout_sec.max(1)),
            poisoned_ttl: soci_fs::POISONED_SPAN_TTL,
            memory: self.memory.clone(),
            disk: self.disk.clone(),
        };
        let mgr = SpanManager::new(
            layer.digest.to_string(),
            spans,
            reader,
            cfg,
            self.metrics.clone(),
        )
        .map_err(|e| e.to_string())?;
        self.prefetch_layer(img, layer, &mgr).await;
        let served = soci_fs::Served {
            tree,
            spans: mgr.clone(),
            rt: tokio::runtime::Handle::current(),
            ttl: Duration::from_secs(self.cfg.fuse.attr_timeout),
            metrics: self.metrics.clone(),
            // Also when off: a connection taken over from a daemon that had it on keeps the
            // backing files its open inodes use.
            passthrough: Some(soci_fs::PassthroughConfig {
                dir: self.passthrough_dir(id),
                disk: self.disk.clone(),
                enabled: self.cfg.fuse.passthrough,
            }),
        };
        let dir = fs_dir.to_path_buf();
        let held = self.held.lock().expect("held").remove(&id);
        let resumed = held.is_some();
        let mounted = tokio::task::spawn_blocking(move || match held {
            Some(h) => {
                let session = soci_fs::Session {
                    minor: h.minor,
                    resend: h.resend,
                };
                soci_fs::resume(served, h.fd, session, &dir)
            }
            None => soci_fs::mount(served, &dir),
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("FUSE mount at {}: {e}", fs_dir.display()))?;
        if resumed {
            info!(id, mountpoint = %fs_dir.display(), "serving the mount kept by the fd holder again");
        } else {
            self.hold(id, &mounted);
        }
        if !self.cfg.background_fetch.disable {
            let bg = &self.cfg.background_fetch;
            let silence = Duration::from_millis(bg.silence_period_msec);
            let fill = mgr.background_fill(soci_fs::BackgroundConfig {
                delay: silence,
                period: Duration::from_millis(bg.fetch_period_msec),
                yield_to_demand: silence,
                slots: self.background_slots.clone(),
            });
            // Then every file the layer now holds whole gets a passthrough backing file.
            let backing_files = mounted.materialize_local_files();
            tokio::spawn(async move {
                fill.await;
                backing_files.await;
            });
        }
        self.mounts.lock().expect("mounts").insert(id, mounted);
        self.layers_lazy
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Connects to the fd holder (starting it if needed) and takes the list of mounts an
    /// earlier daemon left with it. Without a holder, lazy layers are simply mounted again.
    pub fn connect_holder(&self) {
        if !self.cfg.fuse.keep_mounts_across_restart {
            return;
        }
        match self.start_holder().and_then(|c| Ok((c.list()?, c))) {
            Ok((held, c)) => {
                if !held.is_empty() {
                    info!(
                        mounts = held.len(),
                        "fd holder kept lazy mounts from the last run"
                    );
                }
                *self.held.lock().expect("held") = held;
                *self.holder.lock().expect("holder") = Some(c);
            }
            Err(e) => warn!(error = %e, "no fd holder: lazy mounts will not survive a restart"),
        }
    }

    /// Connects to the fd holder, starting one (this executable, `fd-holder`) if none listens.
    fn start_holder(&self) -> Result<HolderClient, crate::holder::HolderError> {
        let exe = std::env::current_exe().map_err(crate::holder::HolderError::Spawn)?;
        let timeout = Duration::from_secs(self.cfg.fuse.holder_timeout_sec.max(1));
        HolderClient::connect_or_spawn(&self.holder_path, &exe, timeout)
    }

    /// Whether an earlier daemon left mount `id` with the holder (to be resumed).
    pub fn is_held(&self, id: u64) -> bool {
        self.held.lock().expect("held").contains_key(&id)
    }

    /// Gives up mount `id` (left by an earlier daemon, or half set up): the holder closes its
    /// descriptor, ending the connection, and the mount point is detached.
    pub fn drop_held(&self, id: u64, fs_dir: &Path) {
        self.held.lock().expect("held").remove(&id);
        self.unhold(id);
        detach_stale_mount(fs_dir);
    }

    /// Held mounts no snapshot claimed after the restore pass: their connections end.
    pub fn drop_unclaimed_held(&self) {
        let left: Vec<u64> = std::mem::take(&mut *self.held.lock().expect("held"))
            .into_keys()
            .collect();
        for id in left {
            warn!(id, "fd holder kept a mount no snapshot claims; released");
            self.unhold(id);
        }
    }

    fn hold(&self, id: u64, m: &MountedLayer) {
        let mut guard = self.holder.lock().expect("holder");
        let Some(c) = guard.as_ref() else { return };
        if let Err(e) = c.put(id, m.session(), m.fuse_fd()) {
            // The holder may have exited (it does when it holds nothing): start a new one.
            let retry = self
                .start_holder()
                .and_then(|c| c.put(id, m.session(), m.fuse_fd()).map(|()| c));
            match retry {
                Ok(c) => *guard = Some(c),
                Err(e2) => {
                    warn!(id, error = %e, retry = %e2, "fd holder unavailable: this mount will not survive a restart");
                    *guard = None;
                }
            }
        }
    }

    fn unhold(&self, id: u64) {
        if let Some(c) = self.holder.lock().expect("holder").as_ref() {
            if let Err(e) = c.del(id) {
                warn!(id, error = %e, "fd holder did not release a mount");
            }
        }
    }

    /// The last snapshot prepared for `image` is gone: its CRI credentials are not needed.
    pub fn image_unused(&self, image: &str) {
        if let Some(c) = &self.cri_credentials {
            c.forget(image);
        }
    }

    /// Directory of the passthrough backing files of snapshot `id`'s lazy layer.
    fn passthrough_dir(&self, id: u64) -> PathBuf {
        self.cache_root.join("passthrough").join(id.to_string())
    }

    /// Unmounts the lazy layer of snapshot `id` (if any) and drops its span cache.
    pub fn release(&self, id: u64) {
        self.metrics.upstream.unmounted(&id.to_string());
        self.forget_health(id);
        self.unhold(id);
        if let Some(m) = self.mounts.lock().expect("mounts").remove(&id) {
            let spans = m.spans().clone();
            let backing = m.passthrough().cloned();
            if let Err(e) = m.unmount() {
                warn!(id, error = %e, "unmounting lazy layer failed");
            }
            spans.remove_cache();
            if let Some(p) = backing {
                p.remove_files();
            }
        }
        let _ = std::fs::remove_dir_all(self.cache_root.join(id.to_string()));
        let _ = std::fs::remove_dir_all(self.passthrough_dir(id));
    }

    /// Whether snapshot `id` is a mounted lazy layer.
    pub fn is_mounted(&self, id: u64) -> bool {
        self.mounts.lock().expect("mounts").contains_key(&id)
    }

    /// Shutdown: with a holder, stops serving every lazy layer but leaves them mounted for
    /// the next daemon (reads in flight are answered first, within `wait`); without one,
    /// unmounts them.
    pub fn shutdown(&self, wait: Duration) {
        if self.holder.lock().expect("holder").is_none() {
            return self.unmount_all();
        }
        let all: Vec<(u64, MountedLayer)> = self.mounts.lock().expect("mounts").drain().collect();
        let n = all.len();
        for (_, m) in all {
            m.detach(wait);
        }
        if n > 0 {
            info!(
                mounts = n,
                "lazy layers left mounted for the next daemon (fd holder)"
            );
        }
    }

    /// Unmounts every lazy layer.
    pub fn unmount_all(&self) {
        let all: Vec<(u64, MountedLayer)> = self.mounts.lock().expect("mounts").drain().collect();
        for (id, m) in all {
            if let Err(e) = m.unmount() {
                warn!(id, error = %e, "unmounting lazy layer failed");
            }
        }
    }

    /// Bytes of decompressed spans in memory.
    pub fn memory_bytes(&self) -> usize {
        self.memory.bytes()
    }

    /// Span cache size on disk for snapshot `id`.
    pub fn cached_spans(&self, id: u64) -> Option<(usize, usize)> {
        self.mounts
            .lock()
            .expect("mounts")
            .get(&id)
            .map(|m| (m.spans().cached_count(), m.spans().span_count()))
    }
}

/// Detaches whatever is mounted at `dir` (a FUSE mount left by a previous daemon process).
pub fn detach_stale_mount(dir: &Path) {
    if let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) {
        // SAFETY: valid C string; MNT_DETACH on a path that may not be a mount point is harmless.
        unsafe {
            libc::umount2(c.as_ptr(), libc::MNT_DETACH);
        }
    }
}
