//! Daemon configuration (`/etc/soci-snapshotter-grpc/config.toml`). Every key is optional;
//! defaults are documented here and in `deploy/config.toml`. Unknown keys are ignored so that
//! upstream soci-snapshotter configs load.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default config file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/soci-snapshotter-grpc/config.toml";
/// Default state directory.
pub const DEFAULT_ROOT: &str = "/var/lib/soci-snapshotter-grpc";
/// Default gRPC socket.
pub const DEFAULT_ADDRESS: &str = "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock";

/// Daemon configuration.
#[derive(Debug, Clone, Deserialize)]
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
    /// Prometheus metrics listen address (`host:port`); none by default.
    pub metrics_address: Option<String>,
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
}

/// `[resolver]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ResolverConfig {
    /// Registries reached over plain HTTP (`host:port`). Default none.
    pub plain_http_hosts: Vec<String>,
    /// containerd hosts directory (`<host>/hosts.toml`). Default `/etc/containerd/certs.d`.
    pub hosts_dir: PathBuf,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        ResolverConfig {
            plain_http_hosts: Vec::new(),
            hosts_dir: "/etc/containerd/certs.d".into(),
        }
    }
}

/// `[blob]`.
#[derive(Debug, Clone, Deserialize)]
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
}

impl Default for BlobConfig {
    fn default() -> Self {
        BlobConfig {
            fetching_timeout_sec: 30,
            max_span_verification_retries: 3,
            memory_cache_mb: 64,
            disk_cache_mb: 20480,
        }
    }
}

/// `[fuse]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct FuseConfig {
    /// Attribute and entry cache timeout in seconds. Default 1.
    pub attr_timeout: u64,
    /// Keep lazy layers mounted across daemon restarts: a small holder process
    /// (`soci-snapshotter-grpc fd-holder`) keeps their `/dev/fuse` descriptors and the next
    /// daemon resumes serving them, so running containers keep reading. When false, layers
    /// are unmounted on shutdown and mounted again at start. Default true.
    pub keep_mounts_across_restart: bool,
    /// How long the holder waits for a daemon to come back before it lets the mounts fail
    /// (readers then get an error instead of waiting). Seconds. Default 60.
    pub holder_timeout_sec: u64,
}

impl Default for FuseConfig {
    fn default() -> Self {
        FuseConfig {
            attr_timeout: 1,
            keep_mounts_across_restart: true,
            holder_timeout_sec: 60,
        }
    }
}

/// `[background_fetch]`.
#[derive(Debug, Clone, Deserialize)]
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
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct PullModes {
    /// `[pull_modes.soci_v1]`: v1 indexes (referrers API). Default off.
    pub soci_v1: Toggle,
    /// `[pull_modes.soci_v2]`: v2 indexes (image index binding). Default on.
    pub soci_v2: Toggle,
    /// `[pull_modes.parallel_pull_unpack]`: for layers pulled in full, download and unpack
    /// the coming layers of an image in parallel, each unpacked as its bytes arrive, ahead of
    /// their Prepare (off: downloaded ahead, unpacked at Prepare). Default on.
    pub parallel_pull_unpack: Toggle,
}

impl Default for PullModes {
    fn default() -> Self {
        PullModes {
            soci_v1: Toggle { enable: false },
            soci_v2: Toggle { enable: true },
            parallel_pull_unpack: Toggle { enable: true },
        }
    }
}

/// An `enable` switch.
#[derive(Debug, Clone, Deserialize)]
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

impl Default for Config {
    fn default() -> Self {
        Config {
            root_path: DEFAULT_ROOT.into(),
            address: DEFAULT_ADDRESS.into(),
            log_level: "info".into(),
            log_format: "text".into(),
            shutdown_timeout_sec: 10,
            metrics_address: None,
            disable_verification: false,
            resolver: ResolverConfig::default(),
            blob: BlobConfig::default(),
            fuse: FuseConfig::default(),
            background_fetch: BackgroundFetchConfig::default(),
            pull_modes: PullModes::default(),
        }
    }
}

impl Config {
    /// Loads a config file; a missing file gives the defaults when `required` is false.
    pub fn load(path: &Path, required: bool) -> Result<Config, String> {
        match std::fs::read_to_string(path) {
            Ok(s) => toml::from_str(&s).map_err(|e| format!("config {}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                Ok(Config::default())
            }
            Err(e) => Err(format!("config {}: {e}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c: Config =
            toml::from_str("log_level = \"debug\"\n[unknown_upstream_section]\nx = 1\n").unwrap();
        assert_eq!(c.log_level, "debug");
        assert_eq!(c.root_path, PathBuf::from(DEFAULT_ROOT));
        let shipped = include_str!("../../../deploy/config.toml");
        let c: Config = toml::from_str(shipped).unwrap();
        assert_eq!(c.address, PathBuf::from(DEFAULT_ADDRESS));
        assert!(!c.pull_modes.soci_v1.enable && c.pull_modes.soci_v2.enable);
        assert_eq!(c.background_fetch.silence_period_msec, 30_000);
        let c: Config = toml::from_str("[pull_modes.soci_v1]\nenable = true\n").unwrap();
        assert!(c.pull_modes.soci_v1.enable && c.pull_modes.soci_v2.enable);
        assert!(Config::load(Path::new("/nonexistent/x.toml"), true).is_err());
        assert!(Config::load(Path::new("/nonexistent/x.toml"), false).is_ok());
    }
}
