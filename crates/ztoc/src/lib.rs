//! zTOC: the SOCI table of contents of one container image layer.
//!
//! A zTOC lists every tar entry of a layer with the offset of its data in the uncompressed
//! stream, plus what is needed to decompress any part of the layer on its own: gzip zran
//! checkpoints (or fixed slices for uncompressed tar) and a sha256 digest per span. The
//! flatbuffer encoding is byte-compatible with upstream soci-snapshotter.
//!
//! - [`build`] makes a zTOC from a layer blob in one streaming pass; [`plan_cuts`] plans
//!   extra checkpoints around the bytes a workload reads (`soci prefetch record`).
//! - [`Ztoc::from_bytes`] / [`Ztoc::to_bytes`] read and write the flatbuffer.
//! - [`Spans`] gives span ranges, verifies span digests and decompresses spans;
//!   [`ReadPlan`] and [`Spans::decode_span`] are the one read pipeline (range -> spans ->
//!   verify -> decompress -> clip), used by [`read_uncompressed`] and [`Ztoc::read_file`] over
//!   a [`SpanSource`] and by the daemon's span manager.

mod builder;
mod checkpoint;
mod codec;
mod error;
mod extract;
mod fbs;
mod flat;
pub mod limits;
mod model;
mod pipeline;
mod refine;
mod span;
pub mod tar;
mod time;
mod windows;
mod zlib;

pub use builder::{build, build_with_checkpoints, BuildOptions};
pub use checkpoint::{Checkpoint, GzipCheckpoints, WINDOW_SIZE};
pub use error::{Result, ZtocError};
pub use extract::{normalize_name, read_uncompressed, SpanSource};
pub use model::{
    CompressionAlgorithm, CompressionInfo, SpanDigest, TocEntry, Ztoc,
    DEFAULT_BUILD_TOOL_IDENTIFIER, DEFAULT_SPAN_SIZE, XATTR_PAX_PREFIX, ZTOC_VERSION,
};
pub use pipeline::{DecodeError, ReadPlan, SpanRun};
pub use refine::{
    plan_cuts, CutPlan, CutPolicy, CHECKPOINT_COST, MAX_EXTRA_CHECKPOINTS, MAX_HOT_RANGES,
};
pub use span::{Span, SpanId, Spans, MAX_SPAN_BYTES};
pub use tar::EntryKind;
pub use time::{format_mod_time, parse_mod_time};
pub use windows::WindowIndex;
pub use zlib::ZlibError;

impl Ztoc {
    /// Parses zTOC flatbuffer bytes (any malformed input gives [`ZtocError::Malformed`]).
    pub fn from_bytes(buf: &[u8]) -> Result<Ztoc> {
        codec::decode(buf)
    }

    /// Serialises to flatbuffer bytes identical to upstream's for the same zTOC.
    pub fn to_bytes(&self) -> Vec<u8> {
        codec::encode(self)
    }

    /// The validated span table.
    pub fn spans(&self) -> Result<Spans> {
        Spans::new(self)
    }
}
