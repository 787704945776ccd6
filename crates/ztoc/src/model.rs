//! The zTOC model: what a zTOC says about one layer.

use std::collections::BTreeMap;

use crate::tar::EntryKind;

/// zTOC format version written by this crate (upstream's current version).
pub const ZTOC_VERSION: &str = "0.9";
/// Build tool identifier upstream's CLI writes; used as our default for byte compatibility.
pub const DEFAULT_BUILD_TOOL_IDENTIFIER: &str = "AWS SOCI CLI v0.2";
/// Default span size in uncompressed bytes (4 MiB).
pub const DEFAULT_SPAN_SIZE: u64 = 1 << 22;
/// Prefix of PAX records that carry extended attributes.
pub const XATTR_PAX_PREFIX: &[u8] = b"SCHILY.xattr.";

/// How the layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CompressionAlgorithm {
    /// gzip (possibly several members); spans start at zran checkpoints.
    Gzip,
    /// Plain tar; spans are fixed slices of the blob.
    Uncompressed,
}

impl CompressionAlgorithm {
    /// Lower-case name as upstream prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            CompressionAlgorithm::Gzip => "gzip",
            CompressionAlgorithm::Uncompressed => "uncompressed",
        }
    }
}

/// A sha256 span digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanDigest(pub [u8; 32]);

impl SpanDigest {
    /// Parses `sha256:<64 hex>`.
    pub fn parse(s: &[u8]) -> Option<Self> {
        let hex_part = s.strip_prefix(b"sha256:")?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut out).ok()?;
        Some(SpanDigest(out))
    }
}

impl std::fmt::Display for SpanDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl std::fmt::Debug for SpanDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// One tar entry of the layer. Byte strings are kept raw: tar names, user names and PAX values
/// need not be UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TocEntry {
    /// Raw tar name (may end in `/`, may start with `./`).
    pub name: Vec<u8>,
    /// Entry kind.
    pub kind: EntryKind,
    /// Offset of the entry's data in the uncompressed tar stream.
    pub offset: u64,
    /// Size of the entry's data.
    pub size: u64,
    /// Link target for symlinks and hardlinks.
    pub linkname: Vec<u8>,
    /// Raw tar mode field (permission bits, possibly type bits).
    pub mode: i64,
    /// Owner id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Owner name.
    pub uname: Vec<u8>,
    /// Group name.
    pub gname: Vec<u8>,
    /// Modification time as stored (RFC 3339); see [`crate::parse_mod_time`].
    pub mod_time: String,
    /// Device major number.
    pub devmajor: i64,
    /// Device minor number.
    pub devminor: i64,
    /// All PAX records of the entry, sorted by key.
    pub pax: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl TocEntry {
    /// Extended attributes (PAX `SCHILY.xattr.*` records), name without the prefix.
    pub fn xattrs(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.pax.iter().filter_map(|(k, v)| {
            k.strip_prefix(XATTR_PAX_PREFIX)
                .map(|name| (name, v.as_slice()))
        })
    }

    /// Modification time as (seconds, nanoseconds) since the epoch, if it parses.
    pub fn mtime(&self) -> Option<(i64, u32)> {
        crate::time::parse_mod_time(&self.mod_time)
    }
}

/// How to find and decompress the spans of the layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompressionInfo {
    /// Compression of the layer blob.
    pub algorithm: CompressionAlgorithm,
    /// Number of spans minus one.
    pub max_span_id: i32,
    /// sha256 of each span's compressed bytes.
    pub span_digests: Vec<SpanDigest>,
    /// gzip checkpoint blob, or a `TarZinfo` flatbuffer for uncompressed layers.
    pub checkpoints: Vec<u8>,
}

/// A zTOC: table of contents plus random-access information of one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ztoc {
    /// Format version (`0.9`).
    pub version: String,
    /// Tool that built it.
    pub build_tool_identifier: String,
    /// Size of the layer blob.
    pub compressed_archive_size: u64,
    /// Where a tar reader stops in the uncompressed stream.
    pub uncompressed_archive_size: u64,
    /// Entries in archive order.
    pub entries: Vec<TocEntry>,
    /// Span information.
    pub compression: CompressionInfo,
}

impl Ztoc {
    /// Number of spans.
    pub fn span_count(&self) -> usize {
        self.compression.span_digests.len()
    }

    /// Whether any entry carries an extended attribute (upstream writes the
    /// `com.amazon.soci.disable-xattrs` annotation when none does).
    pub fn has_xattrs(&self) -> bool {
        self.entries.iter().any(|e| e.xattrs().next().is_some())
    }
}
