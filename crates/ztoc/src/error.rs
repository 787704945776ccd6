//! Errors of the zTOC crate.

use crate::tar::TarError;
use crate::zlib::ZlibError;

/// Any failure building, parsing or using a zTOC.
#[derive(Debug, thiserror::Error)]
pub enum ZtocError {
    /// The zTOC flatbuffer is malformed.
    #[error("malformed zTOC: {0}")]
    Malformed(String),
    /// Decoding the zTOC would exceed a limit in proportion to its size (see the `limits`
    /// module): offsets pointing many times at one object, or fields no tar build produces.
    #[error("zTOC of {ztoc_bytes} bytes refused: {what}")]
    LimitExceeded {
        /// What overflowed.
        what: String,
        /// Size of the zTOC blob.
        ztoc_bytes: usize,
    },
    /// A file's data lies past what the zTOC's spans can produce: reads would come back short.
    #[error(
        "entry {name:?} (offset {offset}, size {size}) lies past the end of the layer's spans \
         ({covered} uncompressed bytes)"
    )]
    EntryPastEnd {
        /// Entry name, lossily decoded.
        name: String,
        /// Offset of its data.
        offset: u64,
        /// Size of its data.
        size: u64,
        /// Uncompressed bytes the spans cover.
        covered: u64,
    },
    /// The gzip checkpoint blob (or tar zinfo) is malformed.
    #[error("malformed checkpoints: {0}")]
    BadCheckpoints(String),
    /// The layer's tar stream is invalid or uses an unsupported feature.
    #[error("layer tar stream: {0}")]
    Tar(TarError),
    /// The layer's gzip stream is invalid or truncated.
    #[error("layer gzip stream: {0}")]
    Gzip(String),
    /// The layer is zstd-compressed; zTOCs are not built for zstd layers.
    #[error("zstd layers are not supported")]
    Zstd,
    /// A span's bytes do not match its digest.
    #[error("span {span} digest mismatch: expected {expected}, got {actual}")]
    SpanDigestMismatch {
        /// Span id.
        span: usize,
        /// Digest recorded in the zTOC.
        expected: String,
        /// Digest of the bytes received.
        actual: String,
    },
    /// A span id, offset or size is out of range for this zTOC.
    #[error("out of range: {0}")]
    OutOfRange(String),
    /// The span source failed to deliver bytes.
    #[error("span source: {0}")]
    Source(#[source] std::io::Error),
    /// A path is not in the zTOC.
    #[error("no entry named {0:?} in the zTOC")]
    NotFound(String),
    /// Reading the layer failed.
    #[error("reading the layer: {0}")]
    Io(std::io::Error),
}

// No `#[source]` on these: the message already includes the cause, and error reporters that
// print the whole chain would repeat it.
impl From<TarError> for ZtocError {
    fn from(e: TarError) -> Self {
        match e {
            // An I/O error under the tar walker is the gzip layer's error (or the file's).
            TarError::Io(io) => ZtocError::from(io),
            e => ZtocError::Tar(e),
        }
    }
}

impl From<std::io::Error> for ZtocError {
    fn from(e: std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof => {
                ZtocError::Gzip(e.to_string())
            }
            _ => ZtocError::Io(e),
        }
    }
}

impl From<ZlibError> for ZtocError {
    fn from(e: ZlibError) -> Self {
        ZtocError::Gzip(e.to_string())
    }
}

/// Result with [`ZtocError`].
pub type Result<T, E = ZtocError> = std::result::Result<T, E>;
