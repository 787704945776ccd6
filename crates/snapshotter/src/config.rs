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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root_path: DEFAULT_ROOT.into(),
            address: DEFAULT_ADDRESS.into(),
            log_level: "info".into(),
            log_format: "text".into(),
            shutdown_timeout_sec: 10,
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
        assert!(Config::load(Path::new("/nonexistent/x.toml"), true).is_err());
        assert!(Config::load(Path::new("/nonexistent/x.toml"), false).is_ok());
    }
}
