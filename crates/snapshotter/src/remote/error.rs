//! Errors of the remote-layer path and the one place they become gRPC statuses.
//!
//! Why typed: the Prepare path decides from an error whether a layer is handed back to
//! containerd (and with which cause), or the Prepare fails (a full disk). Deciding that from
//! error text spread over a dozen `String` signatures was fragile; here each failure names
//! its kind and artifact, and [`RemoteError::status`] maps it to the code containerd's errdefs
//! understands. Clone: one attempt's error is shared by every caller that joined it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use soci_registry::{Digest, RegistryError};

/// A failure to provide a remote layer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RemoteError {
    /// A remote-snapshot label is missing or invalid.
    #[error("{0}")]
    Label(&'static str),
    /// The image reference does not parse.
    #[error("{0}")]
    Reference(String),
    /// The layer is not one of the image's.
    #[error("layer {layer} is not in image {image}")]
    LayerNotInImage {
        /// Layer digest.
        layer: Digest,
        /// Image reference.
        image: String,
    },
    /// A registry request failed.
    #[error("{0}")]
    Registry(Arc<RegistryError>),
    /// A manifest or image index is unusable (invalid JSON, no manifest for this platform).
    #[error("{0}")]
    Manifest(String),
    /// A layer's zTOC cannot be fetched, verified or parsed.
    #[error("{0}")]
    Ztoc(String),
    /// The FUSE mount of a lazy layer failed.
    #[error("FUSE mount at {}: {source}", path.display())]
    Mount {
        /// Mount point.
        path: PathBuf,
        /// Cause.
        source: Arc<std::io::Error>,
    },
    /// A local file operation failed (staging directory, temp file, unpacking, rename).
    #[error("{what}: {source}")]
    Io {
        /// What was done, naming the layer.
        what: String,
        /// Cause.
        source: Arc<std::io::Error>,
    },
    /// A step did not end within its deadline.
    #[error("not ready within the Prepare deadline of {0:?}")]
    Deadline(Duration),
    /// A blocking task or a limit's semaphore failed (daemon shutting down).
    #[error("{0}")]
    Task(String),
}

/// Result with [`RemoteError`].
pub type Result<T, E = RemoteError> = std::result::Result<T, E>;

impl RemoteError {
    /// An I/O failure while doing `what`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> RemoteError {
        RemoteError::Io {
            what: what.into(),
            source: Arc::new(source),
        }
    }

    /// Whether the registry refused the daemon's credentials (or it has none). The text check
    /// covers registry errors reported inside others (index discovery wraps them as text);
    /// it matches the wording of `RegistryError::Unauthorized`.
    pub fn is_auth(&self) -> bool {
        match self {
            RemoteError::Registry(e) => matches!(**e, RegistryError::Unauthorized { .. }),
            other => other.to_string().contains("authentication to "),
        }
    }

    /// Whether the disk is full: containerd cannot recover from that either, so the Prepare
    /// fails instead of handing the layer back.
    pub fn is_no_space(&self) -> bool {
        let enospc = |e: &std::io::Error| e.raw_os_error() == Some(libc::ENOSPC);
        match self {
            RemoteError::Io { source, .. } | RemoteError::Mount { source, .. }
                if enospc(source) =>
            {
                true
            }
            other => {
                let t = other.to_string();
                t.contains("os error 28") || t.contains("No space left on device")
            }
        }
    }

    /// The gRPC status of this error for the layer of target snapshot `target`, with
    /// containerd's errdefs codes.
    pub fn status(&self, target: &str) -> tonic::Status {
        let msg = format!("layer for {target}: {self}");
        if self.is_no_space() {
            return tonic::Status::resource_exhausted(msg);
        }
        match self {
            RemoteError::Label(_) | RemoteError::Reference(_) => {
                tonic::Status::invalid_argument(msg)
            }
            RemoteError::LayerNotInImage { .. } => tonic::Status::not_found(msg),
            RemoteError::Registry(e) => match **e {
                RegistryError::NotFound { .. } => tonic::Status::not_found(msg),
                RegistryError::Unauthorized { .. } => tonic::Status::permission_denied(msg),
                _ => tonic::Status::unavailable(msg),
            },
            RemoteError::Deadline(_) => tonic::Status::deadline_exceeded(msg),
            RemoteError::Manifest(_) | RemoteError::Ztoc(_) => {
                tonic::Status::failed_precondition(msg)
            }
            RemoteError::Mount { .. } | RemoteError::Io { .. } | RemoteError::Task(_) => {
                tonic::Status::internal(msg)
            }
        }
    }
}

impl From<RegistryError> for RemoteError {
    fn from(e: RegistryError) -> Self {
        RemoteError::Registry(Arc::new(e))
    }
}

impl From<tokio::task::JoinError> for RemoteError {
    fn from(e: tokio::task::JoinError) -> Self {
        RemoteError::Task(format!("task failed: {e}"))
    }
}

impl From<tokio::sync::AcquireError> for RemoteError {
    fn from(e: tokio::sync::AcquireError) -> Self {
        RemoteError::Task(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_failures_are_told_apart() {
        let e = RemoteError::from(RegistryError::Unauthorized {
            what: "manifest of r".into(),
            registry: "127.0.0.1:5000".into(),
            detail: "401".into(),
        });
        assert!(e.is_auth());
        assert_eq!(e.status("t").code(), tonic::Code::PermissionDenied);
        // Wrapped as text by discovery.
        let e = RemoteError::Manifest("index: authentication to r failed".into());
        assert!(e.is_auth());
        assert!(!RemoteError::Manifest("connection refused".into()).is_auth());
    }

    #[test]
    fn a_full_disk_is_resource_exhausted() {
        let e = RemoteError::io(
            "unpacking layer sha256:ab",
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert!(e.is_no_space());
        assert_eq!(e.status("t").code(), tonic::Code::ResourceExhausted);
        let e = RemoteError::io("x", std::io::Error::other("No space left on device"));
        assert!(e.is_no_space());
        assert!(!RemoteError::Task("closed".into()).is_no_space());
    }

    #[test]
    fn codes_follow_errdefs() {
        let code = |e: RemoteError| e.status("t").code();
        assert_eq!(
            code(RemoteError::Label("no label")),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            code(RemoteError::Deadline(Duration::from_secs(1))),
            tonic::Code::DeadlineExceeded
        );
        assert_eq!(
            code(RemoteError::from(RegistryError::NotFound {
                what: "m".into()
            })),
            tonic::Code::NotFound
        );
        assert_eq!(
            code(RemoteError::from(RegistryError::Config("x".into()))),
            tonic::Code::Unavailable
        );
    }
}
