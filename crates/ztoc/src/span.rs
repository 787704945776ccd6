//! Spans: the unit of fetching, verification and decompression.
//!
//! gzip span `i` covers compressed bytes `[in_i - (bits_i ? 1 : 0), in_{i+1})` (the last ends
//! at the blob size) and uncompressed bytes `[out_i, out_{i+1})`. The last ends at the
//! uncompressed archive size, or is empty when its checkpoint lies past that size: upstream
//! sets that size where the tar reader stops (the end-of-archive marker) while checkpoints
//! cover the whole gzip stream (record padding, a second concatenated archive), and never
//! compares the two. Uncompressed tar layers use fixed slices of the span size.
//!
//! Validation also refuses entries whose data lies past what the spans cover: such a file
//! would `stat` at its full size and read back short.

use std::ops::Range;

use sha2::{Digest, Sha256};

use crate::checkpoint::GzipCheckpoints;
use crate::codec::decode_tar_zinfo;
use crate::error::{Result, ZtocError};
use crate::model::{CompressionAlgorithm, SpanDigest, Ztoc};
use crate::tar::EntryKind;
use crate::zlib::{Flush, Inflater, Status, WINDOW_BITS_AUTO, WINDOW_BITS_RAW};

/// Largest uncompressed span accepted (guards allocations driven by a hostile zTOC).
pub const MAX_SPAN_BYTES: u64 = 256 << 20;

/// The most compressed bytes a span of `uncompressed` bytes may have: deflate's stored blocks
/// add 5 bytes per 64 KiB, plus gzip member headers and trailers inside the span (1 MiB
/// leaves room for long header fields). Anything more is refused at validation.
pub fn max_compressed_len(uncompressed: u64) -> u64 {
    uncompressed + uncompressed / 8 + (1 << 20)
}
const GZIP_TRAILER: usize = 8;
/// First output buffer of a span's inflate; doubled as it fills.
const INFLATE_CHUNK: usize = 1 << 20;

/// Index of a span within a layer.
pub type SpanId = usize;

/// Byte ranges of one span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// Span id.
    pub id: SpanId,
    /// Range in the layer blob.
    pub compressed: Range<u64>,
    /// Range in the uncompressed tar stream.
    pub uncompressed: Range<u64>,
}

#[derive(Debug, Clone)]
enum Layout {
    Gzip(GzipCheckpoints),
    Tar { span_size: u64 },
}

/// The validated span table of a zTOC: ranges, digests and what is needed to decompress.
#[derive(Debug, Clone)]
pub struct Spans {
    layout: Layout,
    digests: Vec<SpanDigest>,
    compressed_size: u64,
    uncompressed_size: u64,
}

fn bad(msg: impl Into<String>) -> ZtocError {
    ZtocError::BadCheckpoints(msg.into())
}

impl Spans {
    /// Builds and validates the span table of `z`.
    pub fn new(z: &Ztoc) -> Result<Self> {
        Spans::build(z, None)
    }

    /// The span table of a zTOC parsed from its skeleton
    /// ([`crate::WindowIndex::ztoc_from_skeleton`]): checkpoints from `idx`, windows loaded
    /// as their records are fetched ([`Spans::windows_missing`], [`Spans::load_windows`]).
    pub fn with_window_index(z: &Ztoc, idx: &crate::WindowIndex) -> Result<Self> {
        Spans::build(z, Some(idx))
    }

    fn build(z: &Ztoc, idx: Option<&crate::WindowIndex>) -> Result<Self> {
        let c = &z.compression;
        let count = usize::try_from(i64::from(c.max_span_id) + 1)
            .map_err(|_| bad(format!("invalid max span id {}", c.max_span_id)))?;
        if c.span_digests.len() != count {
            return Err(bad(format!(
                "{} span digests for max span id {}",
                c.span_digests.len(),
                c.max_span_id
            )));
        }
        let layout = match c.algorithm {
            CompressionAlgorithm::Gzip => {
                let cps = match idx {
                    Some(idx) => GzipCheckpoints::lazy(&c.checkpoints, idx)?,
                    None => GzipCheckpoints::parse(c.checkpoints.clone())?,
                };
                if cps.points().len() != count {
                    return Err(bad(format!(
                        "{} checkpoints for {count} spans",
                        cps.points().len()
                    )));
                }
                Layout::Gzip(cps)
            }
            CompressionAlgorithm::Uncompressed if idx.is_some() => {
                return Err(bad("a checkpoint index for an uncompressed layer"));
            }
            CompressionAlgorithm::Uncompressed => {
                let (_, span_size, size) = decode_tar_zinfo(&c.checkpoints).map_err(bad)?;
                let span_size = u64::try_from(span_size)
                    .ok()
                    .filter(|&s| s > 0)
                    .ok_or_else(|| bad(format!("invalid tar span size {span_size}")))?;
                if size != z.compressed_archive_size as i64 {
                    return Err(bad("tar zinfo size differs from the layer size"));
                }
                let expected = z.compressed_archive_size.div_ceil(span_size) as usize;
                if expected != count {
                    return Err(bad(format!("{count} spans for a {size}-byte tar layer")));
                }
                Layout::Tar { span_size }
            }
        };
        // What decompression can produce: up to the archive end, or to the last checkpoint
        // when it lies past that end (see the module docs).
        let uncompressed_size = match &layout {
            Layout::Gzip(cps) => cps
                .points()
                .last()
                .map_or(0, |p| p.uncompressed_offset)
                .max(z.uncompressed_archive_size),
            Layout::Tar { .. } => z.compressed_archive_size,
        };
        let spans = Spans {
            layout,
            digests: c.span_digests.clone(),
            compressed_size: z.compressed_archive_size,
            uncompressed_size,
        };
        for id in 0..count {
            let s = spans.span(id)?;
            if s.compressed.start > s.compressed.end || s.compressed.end > spans.compressed_size {
                return Err(bad(format!("span {id} has an invalid compressed range")));
            }
            if s.uncompressed.start > s.uncompressed.end {
                return Err(bad(format!("span {id} has an invalid uncompressed range")));
            }
            if s.uncompressed.end - s.uncompressed.start > MAX_SPAN_BYTES {
                return Err(bad(format!(
                    "span {id} is larger than {MAX_SPAN_BYTES} bytes"
                )));
            }
            let (clen, ulen) = (
                s.compressed.end - s.compressed.start,
                s.uncompressed.end - s.uncompressed.start,
            );
            if clen > max_compressed_len(ulen) {
                // A reader fetches and hashes the whole compressed range before inflating
                // it: without this bound one read could buffer gigabytes.
                return Err(bad(format!(
                    "span {id} has {clen} compressed bytes for {ulen} uncompressed"
                )));
            }
        }
        spans.check_entries(z)?;
        Ok(spans)
    }

    /// Refuses regular files whose data ends past the spans' coverage (an empty file may
    /// point anywhere: nothing is read).
    fn check_entries(&self, z: &Ztoc) -> Result<()> {
        let covered = self.uncompressed_size();
        for e in &z.entries {
            if e.kind != EntryKind::Regular || e.size == 0 {
                continue;
            }
            if e.offset.checked_add(e.size).is_none_or(|end| end > covered) {
                return Err(ZtocError::EntryPastEnd {
                    name: String::from_utf8_lossy(&e.name).into_owned(),
                    offset: e.offset,
                    size: e.size,
                    covered,
                });
            }
        }
        Ok(())
    }

    /// Number of spans.
    pub fn len(&self) -> usize {
        self.digests.len()
    }

    /// Whether there are no spans.
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Uncompressed size covered by the spans.
    pub fn uncompressed_size(&self) -> u64 {
        self.uncompressed_size
    }

    /// The ranges of span `id`.
    pub fn span(&self, id: SpanId) -> Result<Span> {
        if id >= self.len() {
            return Err(ZtocError::OutOfRange(format!(
                "span {id} of {}",
                self.len()
            )));
        }
        let last = id + 1 == self.len();
        Ok(match &self.layout {
            Layout::Gzip(cps) => {
                let p = cps.points()[id];
                let start = p.compressed_offset - u64::from(p.bits > 0);
                let (cend, uend) = if last {
                    (self.compressed_size, self.uncompressed_size)
                } else {
                    let n = cps.points()[id + 1];
                    (n.compressed_offset, n.uncompressed_offset)
                };
                Span {
                    id,
                    compressed: start..cend,
                    uncompressed: p.uncompressed_offset..uend,
                }
            }
            Layout::Tar { span_size } => {
                let start = id as u64 * span_size;
                let end = if last {
                    self.compressed_size
                } else {
                    start + span_size
                };
                Span {
                    id,
                    compressed: start..end,
                    uncompressed: start..end,
                }
            }
        })
    }

    /// The span holding uncompressed offset `off` (the last span for offsets past the end).
    pub fn span_of(&self, off: u64) -> SpanId {
        match &self.layout {
            Layout::Gzip(cps) => cps
                .points()
                .partition_point(|p| p.uncompressed_offset <= off)
                .saturating_sub(1),
            Layout::Tar { span_size } => {
                ((off / span_size) as usize).min(self.len().saturating_sub(1))
            }
        }
    }

    /// The spans an uncompressed byte range touches (empty for an empty range).
    pub fn spans_for(&self, range: &Range<u64>) -> Range<SpanId> {
        if range.start >= range.end || self.is_empty() {
            return 0..0;
        }
        self.span_of(range.start)..self.span_of(range.end - 1) + 1
    }

    /// The zTOC blob's bytes to fetch for the windows spans `ids` need, when the zTOC was
    /// fetched without its records and some of them are not loaded yet (one range: from the
    /// first missing record to the last).
    pub fn windows_missing(&self, ids: Range<SpanId>) -> Option<Range<u64>> {
        match &self.layout {
            Layout::Gzip(cps) => cps.lazy_windows()?.missing(ids),
            Layout::Tar { .. } => None,
        }
    }

    /// Verifies the checkpoint records in `data` (zTOC blob bytes from `offset`, whole
    /// records, as [`Spans::windows_missing`] named them) against the index and keeps their
    /// windows for every clone of this table; returns how many were new.
    pub fn load_windows(&self, offset: u64, data: &[u8]) -> Result<usize> {
        match &self.layout {
            Layout::Gzip(cps) => match cps.lazy_windows() {
                Some(l) => l.load(cps.points(), offset, data),
                None => Ok(0),
            },
            Layout::Tar { .. } => Ok(0),
        }
    }

    /// Checks span `id`'s compressed bytes against its digest.
    pub fn verify(&self, id: SpanId, compressed: &[u8]) -> Result<()> {
        let expected = self
            .digests
            .get(id)
            .ok_or_else(|| ZtocError::OutOfRange(format!("span {id}")))?;
        let actual: [u8; 32] = Sha256::digest(compressed).into();
        if actual != expected.0 {
            return Err(ZtocError::SpanDigestMismatch {
                span: id,
                expected: expected.to_string(),
                actual: SpanDigest(actual).to_string(),
            });
        }
        Ok(())
    }

    /// Decompresses span `id` from exactly its compressed bytes. Verify first.
    pub fn decompress(&self, id: SpanId, compressed: &[u8]) -> Result<Vec<u8>> {
        let span = self.span(id)?;
        if compressed.len() as u64 != span.compressed.end - span.compressed.start {
            return Err(ZtocError::OutOfRange(format!(
                "span {id}: got {} compressed bytes, expected {}",
                compressed.len(),
                span.compressed.end - span.compressed.start
            )));
        }
        let want = (span.uncompressed.end - span.uncompressed.start) as usize;
        match &self.layout {
            Layout::Tar { .. } => Ok(compressed.to_vec()),
            Layout::Gzip(cps) => {
                let p = cps.points()[id];
                let window = cps.window(id).ok_or_else(|| {
                    ZtocError::OutOfRange(format!(
                        "span {id}: its checkpoint's window is not loaded"
                    ))
                })?;
                inflate_span(compressed, p.bits, window, want)
                    .map_err(|e| ZtocError::Gzip(format!("span {id}: {e}")))
            }
        }
    }
}

/// Inflates `want` bytes starting at a checkpoint, crossing gzip member boundaries.
fn inflate_span(mut input: &[u8], bits: u8, window: &[u8], want: usize) -> Result<Vec<u8>, String> {
    // The output grows as inflate fills it instead of being sized from the zTOC's claim: a
    // span claiming 256 MiB whose stream ends early costs what the stream produced.
    let mut out = Vec::new();
    if want == 0 {
        return Ok(out);
    }
    let mut inf = Inflater::new(WINDOW_BITS_RAW).map_err(|e| e.to_string())?;
    if bits > 0 {
        let (&first, rest) = input.split_first().ok_or("empty span")?;
        inf.prime(bits, first >> (8 - bits))
            .map_err(|e| e.to_string())?;
        input = rest;
    }
    inf.set_dictionary(window).map_err(|e| e.to_string())?;
    let mut produced = 0;
    let mut raw = true;
    while produced < want {
        if produced == out.len() {
            out.resize(want.min((2 * out.len()).max(INFLATE_CHUNK)), 0);
        }
        let p = inf
            .inflate(input, &mut out[produced..], Flush::None)
            .map_err(|e| e.to_string())?;
        input = &input[p.consumed..];
        produced += p.produced;
        match p.status {
            Status::StreamEnd if produced < want => {
                if raw {
                    // Raw inflate leaves the member's trailer; later members are parsed as gzip.
                    input = input.get(GZIP_TRAILER..).ok_or("truncated gzip trailer")?;
                    raw = false;
                }
                if input.is_empty() {
                    return Err(format!("stream ended after {produced} of {want} bytes"));
                }
                inf.reset(WINDOW_BITS_AUTO).map_err(|e| e.to_string())?;
            }
            Status::StreamEnd => {}
            Status::Ok | Status::BufError => {
                if p.consumed == 0 && p.produced == 0 {
                    return Err(format!(
                        "compressed data ended after {produced} of {want} bytes"
                    ));
                }
            }
        }
    }
    Ok(out)
}
