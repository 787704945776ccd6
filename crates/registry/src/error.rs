//! Registry errors. Every variant names the artifact involved; none carries credentials.

/// Failure talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The reference string is invalid.
    #[error("{0}")]
    InvalidReference(String),
    /// A transport failure (connect, timeout, TLS) after retries.
    #[error("{what}: request to {url} failed: {message}")]
    Transport {
        /// What was being fetched or pushed.
        what: String,
        /// URL without credentials.
        url: String,
        /// reqwest's description.
        message: String,
    },
    /// The registry answered with an unexpected status.
    #[error("{what}: registry answered {status}: {body}")]
    Status {
        /// What was being fetched or pushed.
        what: String,
        /// HTTP status.
        status: u16,
        /// Start of the response body.
        body: String,
    },
    /// Authentication was required and failed or no credentials were found.
    #[error("{what}: authentication to {registry} failed ({detail}); credentials come from the docker config file (DOCKER_CONFIG or ~/.docker/config.json) or, with the CRI keychain, the kubelet's PullImage")]
    Unauthorized {
        /// What was being fetched or pushed.
        what: String,
        /// Registry host.
        registry: String,
        /// Why.
        detail: String,
    },
    /// The object does not exist.
    #[error("{what}: not found")]
    NotFound {
        /// What was looked up.
        what: String,
    },
    /// Content does not match its digest.
    #[error("{what}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// What was fetched.
        what: String,
        /// Expected digest.
        expected: String,
        /// Digest of the bytes received.
        actual: String,
    },
    /// Content is larger than allowed or than its descriptor says.
    #[error("{what}: larger than {limit} bytes")]
    TooLarge {
        /// What was fetched.
        what: String,
        /// The limit.
        limit: u64,
    },
    /// Invalid configuration (hosts.toml, docker config, credential helper).
    #[error("configuration: {0}")]
    Config(String),
    /// Local I/O.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl RegistryError {
    /// Whether the object was simply not there.
    pub fn is_not_found(&self) -> bool {
        matches!(self, RegistryError::NotFound { .. })
    }
}

/// Result with [`RegistryError`].
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;
