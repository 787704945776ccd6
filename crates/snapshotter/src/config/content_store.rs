//! `[content_store]`: where the daemon writes the layer blobs it downloads itself (upstream's
//! section; upstream `config/fs.go` `ContentStoreConfig`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[content_store]`. Upstream's `type` (`soci` or `containerd`: where upstream keeps SOCI
/// artifacts) is not implemented (the daemon reads SOCI artifacts from the registry) and is
/// warned about like any unknown key.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct ContentStoreConfig {
    /// containerd's socket, where layer blobs pulled by the daemon are written (unless
    /// `[pull_modes.parallel_pull_unpack] discard_unpacked_layers = true`); a `unix://`
    /// prefix is accepted, as upstream. Default `/run/containerd/containerd.sock`.
    pub containerd_address: String,
}

impl Default for ContentStoreConfig {
    fn default() -> Self {
        ContentStoreConfig {
            containerd_address: "/run/containerd/containerd.sock".into(),
        }
    }
}

impl ContentStoreConfig {
    /// The socket path (`unix://` trimmed, as upstream's `TrimSocketAddress`).
    pub fn socket(&self) -> PathBuf {
        let a = self.containerd_address.trim();
        let a = a.strip_prefix("unix://").unwrap_or(a);
        if a.is_empty() {
            ContentStoreConfig::default().containerd_address.into()
        } else {
            a.into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_trims_unix_scheme_and_defaults_when_empty() {
        let c = |a: &str| ContentStoreConfig {
            containerd_address: a.into(),
        };
        assert_eq!(c("unix:///x/c.sock").socket(), PathBuf::from("/x/c.sock"));
        assert_eq!(c("/y.sock").socket(), PathBuf::from("/y.sock"));
        assert_eq!(
            c("").socket(),
            PathBuf::from("/run/containerd/containerd.sock")
        );
    }
}
