//! Snapshotter errors and their gRPC codes (containerd's errdefs mapping).

/// A snapshot operation failure.
#[derive(Debug, thiserror::Error)]
pub enum SnapError {
    /// The snapshot (or parent) does not exist.
    #[error("{0}: not found")]
    NotFound(String),
    /// The key is already in use.
    #[error("{0}: already exists")]
    AlreadyExists(String),
    /// The operation does not fit the snapshot's state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Bad request.
    #[error("{0}")]
    InvalidArgument(String),
    /// Storage or filesystem failure.
    #[error("{0}")]
    Internal(String),
}

impl From<SnapError> for tonic::Status {
    fn from(e: SnapError) -> Self {
        let msg = e.to_string();
        match e {
            SnapError::NotFound(_) => tonic::Status::not_found(msg),
            SnapError::AlreadyExists(_) => tonic::Status::already_exists(msg),
            SnapError::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            SnapError::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            SnapError::Internal(_) => tonic::Status::internal(msg),
        }
    }
}

macro_rules! internal_from {
    ($($t:ty),*) => {$(
        impl From<$t> for SnapError {
            fn from(e: $t) -> Self {
                SnapError::Internal(e.to_string())
            }
        }
    )*};
}
internal_from!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    std::io::Error,
    serde_json::Error
);

/// Result with [`SnapError`].
pub type Result<T, E = SnapError> = std::result::Result<T, E>;
