//! Remote snapshots: when containerd prepares a layer with the remote-snapshot labels, the
//! layer is served lazily over FUSE from its zTOC (if the image's SOCI v2 trust chain holds
//! and the layer has a zTOC), or downloaded and unpacked here; either way the snapshot is
//! committed under the target name and containerd is told it already exists.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use soci_fs::FsMetrics;
use soci_index::{NoSoci, SociImage};
use soci_registry::{Client, ClientOptions, Descriptor, HostsConfig, Repository};
use tracing::info;

use crate::config::Config;
pub use error::{RemoteError, Result};
pub use full_pull::FullPulls;
use lazy::LazyState;
use resolver::ResolverState;

pub mod content;
mod early;
mod error;
mod full_pull;
mod health;
mod lazy;
pub(crate) mod mounter;
mod observe;
mod parallel;
mod prefetch;
mod record;
mod resolver;
mod singleflight;
mod spool;

pub use parallel::{ImageLimits, PullStats};

pub use health::{BrokenLayer, NotServed, PROBE_TIMEOUT};
pub use mounter::{detach_stale_mount, FuseMounter, LazyMount, Mounter};
pub use prefetch::PrefetchState;

/// The layers of an image (for full pulls) and its download and unpack limits.
struct ImageLayers {
    layers: Vec<Descriptor>,
    limits: Arc<parallel::ImageLimits>,
}

/// State of remote layers.
pub struct Remote {
    /// Credentials from the kubelet's PullImage requests (`[cri_keychain]` enabled).
    pub cri_credentials: Option<Arc<crate::cri::CredentialStore>>,
    client: Arc<Client>,
    cfg: Config,
    /// Discovery and zTOC preparation (`resolver.rs`).
    resolver: ResolverState,
    /// Mounts, fd holder, span budgets, background fetch (`lazy.rs`).
    lazy: LazyState,
    /// Layer lists, downloads ahead of Prepare, limits (`full_pull.rs`).
    /// Full pulls done by the daemon (parallel pull mode, fallback full pulls).
    pub full: Arc<FullPulls>,
    /// Images and reasons already logged (one line per image and reason).
    logged: Mutex<HashSet<String>>,
    /// Decompressed spans in memory and on disk, all layers.
    pub cache: Arc<soci_fs::SpanCache>,
    /// FUSE and span counters.
    pub metrics: Arc<FsMetrics>,
    /// Fallbacks by reason label.
    pub fallbacks: Mutex<BTreeMap<&'static str, u64>>,
    /// Layers handed back to containerd to pull itself, by cause label.
    pub handed_back: Mutex<BTreeMap<&'static str, u64>>,
    /// Layers served lazily.
    pub layers_lazy: std::sync::atomic::AtomicU64,
    /// Lazy layers not served, and their restore locks.
    health: health::Health,
    /// Prefetch counters and bound.
    pub prefetch: Arc<prefetch::PrefetchState>,
    /// Prefetch bytes fetched at discovery, ahead of their layers' mounts.
    early: Arc<early::EarlyBytes>,
}

/// How one layer will be provided.
pub enum LayerPlan {
    /// Over FUSE from a zTOC.
    Lazy {
        /// The image, its SOCI index and trust chain checked.
        image: Arc<SociImage>,
        /// The layer's zTOC.
        ztoc: Descriptor,
        /// The layer.
        layer: Descriptor,
    },
    /// Downloaded and unpacked here.
    Full {
        /// Where the layer blob is.
        repo: Repository,
        /// The layer.
        layer: Descriptor,
        /// Why the image is not lazy, if discovery said so (else the layer has no zTOC, or
        /// parallel pull mode is on).
        reason: Option<NoSoci>,
        /// The image's download and unpack limits, shared with the layers pulled ahead.
        limits: Arc<ImageLimits>,
    },
}

impl Remote {
    /// Remote-layer state under `root`.
    pub fn new(root: &Path, cfg: &Config) -> Result<Remote> {
        Remote::with_mounter(root, cfg, Arc::new(FuseMounter))
    }

    /// Remote-layer state under `root` whose lazy layers are mounted by `mounter`.
    pub fn with_mounter(root: &Path, cfg: &Config, mounter: Arc<dyn Mounter>) -> Result<Remote> {
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
            // Span reads carry their own deadline (`fetching_timeout_sec`); the client's
            // request timeout bounds the other requests (manifests, whole blobs).
            ..Default::default()
        };
        let (keychain, cri_credentials) = crate::cri::keychain(root, cfg);
        let client = Client::with_keychain(opts, keychain)?;
        let cache_root = root.join("cache");
        std::fs::create_dir_all(&cache_root)
            .map_err(|e| RemoteError::io(cache_root.display().to_string(), e))?;
        let client = Arc::new(client);
        let full = Arc::new(FullPulls::new(client.clone(), cfg, root.join("tmp"))?);
        Ok(Remote {
            cri_credentials,
            client,
            cfg: cfg.clone(),
            resolver: ResolverState::default(),
            lazy: LazyState {
                cache_root,
                mounts: Mutex::new(HashMap::new()),
                mounter,
                holder: Mutex::new(None),
                holder_path: root.join("fuse-holder.sock"),
                held: Mutex::new(BTreeMap::new()),
                background_slots: Arc::new(tokio::sync::Semaphore::new(
                    cfg.background_fetch.max_concurrent_fetches.max(1),
                )),
            },
            full,
            logged: Mutex::new(HashSet::new()),
            cache: soci_fs::SpanCache::new(
                cfg.blob.memory_cache_mb << 20,
                cfg.blob.disk_cache_mb << 20,
            ),
            metrics: Arc::new(FsMetrics::default()),
            fallbacks: Mutex::new(BTreeMap::new()),
            handed_back: Mutex::new(BTreeMap::new()),
            layers_lazy: Default::default(),
            health: Default::default(),
            prefetch: Arc::new(prefetch::PrefetchState::new(&cfg.prefetch)),
            early: Arc::default(),
        })
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

    /// The last snapshot prepared for `image` is gone: its CRI credentials are not needed.
    pub fn image_unused(&self, image: &str) {
        if let Some(c) = &self.cri_credentials {
            c.forget(image);
        }
    }

    /// Bytes of decompressed spans in memory.
    pub fn memory_bytes(&self) -> usize {
        self.cache.memory_bytes()
    }
}

#[cfg(test)]
pub(crate) mod tests;
