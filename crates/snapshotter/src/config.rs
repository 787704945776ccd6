//! Daemon configuration (`/etc/soci-snapshotter-grpc/config.toml`). Every key is optional;
//! defaults are documented here and in `deploy/config.toml`.
//!
//! Why the notes: users move here from upstream soci-snapshotter with their config file. A key
//! of theirs must either mean what it means upstream or be named in a warning at start, never
//! be dropped silently: [`Config::load`] returns one note per key soci-rs ignores and per key
//! whose upstream meaning it does not implement.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod content_store;
mod parallel;
pub use content_store::ContentStoreConfig;
pub use parallel::{parse_size, ParallelPullUnpack};

/// Default config file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/soci-snapshotter-grpc/config.toml";
/// Default state directory.
pub const DEFAULT_ROOT: &str = "/var/lib/soci-snapshotter-grpc";
/// Default gRPC socket.
pub const DEFAULT_ADDRESS: &str = "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock";

/// Daemon configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Config {
    /// State directory (`--root` wins). Default `/var/lib/soci-snapshotter-grpc`.
    pub root_path: PathBuf,
    /// gRPC unix socket (`--address` wins). Default
    /// `/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock`.
    pub address: PathBuf,
    /// Log level: `error`, `warn`, `info`, `debug`, `trace` (`--log-level` wins). Default `info`.
    pub log_level: String,
    /// `text` or `json` (`--log-format` wins). Default `text`.
    pub log_format: String,
    /// Seconds to let in-flight calls finish on SIGTERM/SIGINT. Default 10.
    pub shutdown_timeout_sec: u64,
    /// Prometheus metrics listen address (`host:port`); empty (the default) means off, as
    /// upstream.
    pub metrics_address: String,
    /// Skip span digest checks (never recommended). Default false.
    pub disable_verification: bool,
    /// How to reach registries.
    pub resolver: ResolverConfig,
    /// Span fetching.
    pub blob: BlobConfig,
    /// FUSE settings.
    pub fuse: FuseConfig,
    /// Background fetch of the spans not read yet.
    pub background_fetch: BackgroundFetchConfig,
    /// Which SOCI index versions are used.
    pub pull_modes: PullModes,
    /// Credentials from the kubelet (CRI image service proxy).
    pub cri_keychain: CriKeychainConfig,
    /// Prefetch of the files an image's prefetch artifacts name.
    pub prefetch: PrefetchConfig,
    /// Where layer blobs pulled by the daemon are written (containerd's content store).
    pub content_store: ContentStoreConfig,
}

/// `[prefetch]` (upstream's section and keys, plus `timeout_sec`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct PrefetchConfig {
    /// Fetch the spans a layer's prefetch artifact names before its lazy mount is reported
    /// ready. Default false (as upstream: artifacts are ignored).
    pub enable: bool,
    /// Layers prefetching at once across the daemon; 0 (or negative) = no limit. Default 0.
    pub max_concurrency: i64,
    /// soci-rs: time one layer's prefetch may add to its mount (artifact fetch included), in
    /// seconds; past it the mount goes ahead without the rest. Default 10.
    pub timeout_sec: u64,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig {
            enable: false,
            max_concurrency: 0,
            timeout_sec: 10,
        }
    }
}

/// `[resolver]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct ResolverConfig {
    /// Registries reached over plain HTTP (`host:port`). Default none.
    pub plain_http_hosts: Vec<String>,
    /// containerd hosts directory (`<host>/hosts.toml`). Default `/etc/containerd/certs.d`.
    pub hosts_dir: PathBuf,
    /// Upstream's `[[resolver.host."HOST".mirrors]]`: pull mirrors per registry host, tried
    /// in order before `hosts.toml` mirrors and the registry itself. Default none.
    pub host: std::collections::BTreeMap<String, HostMirrors>,
}

/// `[resolver.host."HOST"]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct HostMirrors {
    /// The mirrors of this host.
    pub mirrors: Vec<MirrorConfig>,
}

/// `[[resolver.host."HOST".mirrors]]` (upstream's keys).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct MirrorConfig {
    /// `host[:port]` with an optional path used as the API root (default `/v2`); a scheme
    /// written here is ignored, as upstream.
    pub host: String,
    /// Plain HTTP instead of HTTPS (loopback hosts always use plain HTTP). Default false.
    pub insecure: bool,
    /// Upstream's per-mirror request timeout: not implemented (warned about when set).
    pub request_timeout_sec: i64,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        ResolverConfig {
            plain_http_hosts: Vec::new(),
            hosts_dir: "/etc/containerd/certs.d".into(),
            host: Default::default(),
        }
    }
}

/// `[blob]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct BlobConfig {
    /// Deadline for one span fetch, in seconds. Default 30.
    pub fetching_timeout_sec: u64,
    /// Re-fetches of a span whose digest does not match. Default 3.
    pub max_span_verification_retries: u32,
    /// Memory for decompressed spans, shared by all layers, in MiB (spans are also cached on
    /// disk). Default 64.
    pub memory_cache_mb: usize,
    /// Disk for decompressed spans, shared by all layers, in MiB; 0 = no limit. Spans over
    /// the limit are kept in memory only and background fetch stops; a layer's spans are
    /// deleted with its snapshot. Default 20480.
    pub disk_cache_mb: u64,
    /// Read-ahead within a file: when a read of a file needs span k, the file's next spans,
    /// up to this many, are fetched in parallel (one range request, at most 16 MiB), without
    /// making the read wait; 0 turns it off. Default 4.
    pub read_ahead_spans: usize,
}

impl Default for BlobConfig {
    fn default() -> Self {
        BlobConfig {
            fetching_timeout_sec: 30,
            max_span_verification_retries: 3,
            memory_cache_mb: 64,
            disk_cache_mb: 20480,
            read_ahead_spans: soci_fs::DEFAULT_READ_AHEAD_SPANS,
        }
    }
}

/// `[fuse]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct FuseConfig {
    /// How long the kernel caches a node's attributes, in seconds. 0 means the default, 1
    /// (as upstream).
    pub attr_timeout: u64,
    /// How long the kernel caches a name lookup, in seconds. 0 means the default, 1 (as
    /// upstream).
    pub entry_timeout: u64,
    /// How long the kernel caches a lookup that found nothing, in seconds. 0 means the
    /// default, 1 (as upstream).
    pub negative_timeout: u64,
    /// Keep lazy layers mounted across daemon restarts: a small holder process
    /// (`soci-snapshotter-grpc fd-holder`) keeps their `/dev/fuse` descriptors and the next
    /// daemon resumes serving them, so running containers keep reading. When false, layers
    /// are unmounted on shutdown and mounted again at start. Default true.
    pub keep_mounts_across_restart: bool,
    /// How long the holder waits for a daemon to come back before it lets the mounts fail
    /// (readers then get an error instead of waiting). Seconds. Default 60.
    pub holder_timeout_sec: u64,
    /// FUSE passthrough (kernel 6.9+, as stargz-snapshotter's `[fuse] passthrough`; upstream
    /// soci-snapshotter has no such key): once every span of a file is local, the daemon
    /// writes the file to `<root>/cache/passthrough/<snapshot>/` (counted in
    /// `[blob] disk_cache_mb`) and the kernel reads that copy directly, without the daemon.
    /// Needs `CAP_SYS_ADMIN`; where the kernel refuses, reads stay as they are. Default true.
    pub passthrough: bool,
}

impl FuseConfig {
    /// The three kernel cache timeouts, 0 read as upstream's default of 1 s.
    pub fn cache_timeouts(&self) -> soci_fs::CacheTimeouts {
        let secs = |s: u64| Duration::from_secs(if s == 0 { 1 } else { s });
        soci_fs::CacheTimeouts {
            entry: secs(self.entry_timeout),
            attr: secs(self.attr_timeout),
            negative: secs(self.negative_timeout),
        }
    }
}

impl Default for FuseConfig {
    fn default() -> Self {
        FuseConfig {
            attr_timeout: 1,
            entry_timeout: 1,
            negative_timeout: 1,
            keep_mounts_across_restart: true,
            holder_timeout_sec: 60,
            passthrough: true,
        }
    }
}

/// `[background_fetch]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct BackgroundFetchConfig {
    /// Turn background fetch off. Default false.
    pub disable: bool,
    /// Wait after a layer is mounted, and after any on-demand read, before fetching in the
    /// background (ms). Default 30000.
    pub silence_period_msec: u64,
    /// Pause between background span fetches (ms). Default 500.
    pub fetch_period_msec: u64,
    /// Background span fetches running at once across all layers. Default 2.
    pub max_concurrent_fetches: usize,
}

impl Default for BackgroundFetchConfig {
    fn default() -> Self {
        BackgroundFetchConfig {
            disable: false,
            silence_period_msec: 30_000,
            fetch_period_msec: 500,
            max_concurrent_fetches: 2,
        }
    }
}

/// `[pull_modes]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct PullModes {
    /// `[pull_modes.soci_v1]`: v1 indexes (referrers API). Default off.
    pub soci_v1: Toggle,
    /// `[pull_modes.soci_v2]`: v2 indexes (image index binding). Default on.
    pub soci_v2: Toggle,
    /// `[pull_modes.parallel_pull_unpack]`.
    pub parallel_pull_unpack: ParallelPullUnpack,
}

impl Default for PullModes {
    fn default() -> Self {
        PullModes {
            soci_v1: Toggle { enable: false },
            soci_v2: Toggle { enable: true },
            parallel_pull_unpack: ParallelPullUnpack::default(),
        }
    }
}

/// An `enable` switch.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Toggle {
    /// Whether enabled.
    pub enable: bool,
}

impl Default for Toggle {
    fn default() -> Self {
        Toggle { enable: true }
    }
}

/// `[cri_keychain]` (upstream's keys and defaults): serve the CRI v1 ImageService on the
/// daemon's socket, forward it to containerd, and use the credentials of each PullImage for
/// that image's lazy layers.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct CriKeychainConfig {
    /// Serve the ImageService proxy and keep PullImage credentials. Default false.
    pub enable_keychain: bool,
    /// containerd's CRI socket, where the proxy forwards. Default
    /// `/run/containerd/containerd.sock`.
    pub image_service_path: PathBuf,
    /// soci-rs only: how long credentials from a PullImage are kept (also across daemon
    /// restarts, in `<root>/cri-credentials.json`), unless the image is pulled again (fresh
    /// credentials), removed, or its last snapshot removed. Default 43200 (12 h).
    pub credentials_ttl_sec: u64,
}

impl Default for CriKeychainConfig {
    fn default() -> Self {
        CriKeychainConfig {
            enable_keychain: false,
            image_service_path: "/run/containerd/containerd.sock".into(),
            credentials_ttl_sec: 12 * 3600,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root_path: DEFAULT_ROOT.into(),
            address: DEFAULT_ADDRESS.into(),
            log_level: "info".into(),
            log_format: "text".into(),
            shutdown_timeout_sec: 10,
            metrics_address: String::new(),
            disable_verification: false,
            resolver: ResolverConfig::default(),
            blob: BlobConfig::default(),
            fuse: FuseConfig::default(),
            background_fetch: BackgroundFetchConfig::default(),
            pull_modes: PullModes::default(),
            cri_keychain: CriKeychainConfig::default(),
            prefetch: PrefetchConfig::default(),
            content_store: ContentStoreConfig::default(),
        }
    }
}

impl Config {
    /// Loads a config file; a missing file gives the defaults when `required` is false.
    /// Returns the config and one note per key that soci-rs ignores or does not implement
    /// with upstream's meaning (to be logged as warnings).
    pub fn load(path: &Path, required: bool) -> Result<(Config, Vec<String>), String> {
        match std::fs::read_to_string(path) {
            Ok(s) => Config::parse(&s).map_err(|e| format!("config {}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                Ok((Config::default(), Vec::new()))
            }
            Err(e) => Err(format!("config {}: {e}", path.display())),
        }
    }

    /// Parses config text; see [`Config::load`] for the notes.
    pub fn parse(text: &str) -> Result<(Config, Vec<String>), String> {
        let mut notes = Vec::new();
        let de = toml::Deserializer::parse(text).map_err(|e| e.to_string())?;
        let cfg: Config = serde_ignored::deserialize(de, |path| {
            notes.push(format!(
                "config key `{path}` is not supported by soci-rs and is ignored"
            ))
        })
        .map_err(|e| e.to_string())?;
        let p = &cfg.pull_modes.parallel_pull_unpack;
        p.chunk_size().map_err(|e| {
            format!("pull_modes.parallel_pull_unpack.concurrent_download_chunk_size: {e}")
        })?;
        for (host, h) in &cfg.resolver.host {
            if h.mirrors.iter().any(|m| m.request_timeout_sec != 0) {
                notes.push(format!(
                    "config key `resolver.host.\"{host}\".mirrors.request_timeout_sec` is not \
                     implemented by soci-rs: mirrors use `[blob] fetching_timeout_sec`"
                ));
            }
        }
        Ok((cfg, notes))
    }

    /// Upstream-style config mirrors as the registry client takes them.
    pub fn mirrors(&self) -> std::collections::BTreeMap<String, Vec<soci_registry::Mirror>> {
        self.resolver
            .host
            .iter()
            .map(|(h, m)| {
                let list = m
                    .mirrors
                    .iter()
                    .map(|m| soci_registry::Mirror {
                        host: m.host.clone(),
                        insecure: m.insecure,
                    })
                    .collect();
                (h.clone(), list)
            })
            .collect()
    }

    /// The metrics listen address, if metrics are on.
    pub fn metrics_addr(&self) -> Option<&str> {
        Some(self.metrics_address.trim()).filter(|a| !a.is_empty())
    }

    /// The config as TOML (for `config dump` / `config default`).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

#[cfg(test)]
mod tests;
