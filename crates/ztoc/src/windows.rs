//! Checkpoint windows fetched on demand: a zTOC split into its skeleton and its records.
//!
//! Why: a gzip zTOC is mostly checkpoint records, one 32 KiB window per span (a 1 GiB layer's
//! zTOC is ~8 MiB, 98% windows), and a lazy mount used to fetch all of it before the
//! container could start, although a start reads a handful of spans. The rest of the zTOC
//! (the file table, span digests, the records' header) is the *skeleton*: every byte before
//! the first record and after the last. A [`WindowIndex`], carried in the SOCI index next to
//! the zTOC descriptor (so as trusted as the zTOC digest itself), holds the records' offset,
//! the skeleton's sha256, and per checkpoint its offsets and the sha256 of its record. A mount
//! then fetches the skeleton (two range requests), verifies it, and fetches each record
//! when a span needs its window, verified on its own: no byte is used unverified, and the
//! zTOC blob itself stays byte-identical to upstream's (readers that do not know the index
//! fetch it whole as before).

use std::ops::Range;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

use crate::checkpoint::{Checkpoint, GzipCheckpoints, CHECKPOINT_SIZE, HEADER_SIZE, WINDOW_SIZE};
use crate::error::{Result, ZtocError};
use crate::fbs::ztoc as fb;
use crate::flat::Table;
use crate::{CompressionAlgorithm, Ztoc};

/// Bytes one checkpoint takes in the encoded index.
const ENTRY_SIZE: usize = 8 + 8 + 1 + 32;
const FIXED_SIZE: usize = 8 + 32 + 4;

fn bad(msg: impl Into<String>) -> ZtocError {
    ZtocError::BadCheckpoints(format!("checkpoint index: {}", msg.into()))
}

/// Where a gzip zTOC's checkpoint records lie and what they hash to (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowIndex {
    /// Offset in the zTOC blob of the first checkpoint record.
    pub records_offset: u64,
    /// sha256 of the zTOC blob without its records (the bytes before and after them).
    pub skeleton: [u8; 32],
    /// Per checkpoint: its offsets and the sha256 of its whole record.
    pub records: Vec<(Checkpoint, [u8; 32])>,
}

impl WindowIndex {
    /// The index of a zTOC blob, or `None` when it has no separable records (uncompressed
    /// layers, legacy version 1 checkpoint blobs).
    pub fn of(blob: &[u8]) -> Result<Option<WindowIndex>> {
        let z = Ztoc::from_bytes(blob)?;
        if z.compression.algorithm != CompressionAlgorithm::Gzip {
            return Ok(None);
        }
        let cps = GzipCheckpoints::parse(z.compression.checkpoints.clone())?;
        if cps.is_legacy_v1() {
            return Ok(None);
        }
        let data = checkpoints_vector(blob)?;
        let records_offset = data.start + HEADER_SIZE;
        let records_end = data.end;
        let mut h = Sha256::new();
        h.update(&blob[..records_offset]);
        h.update(&blob[records_end..]);
        let records = blob[records_offset..records_end]
            .chunks_exact(CHECKPOINT_SIZE)
            .zip(cps.points())
            .map(|(rec, &p)| (p, Sha256::digest(rec).into()))
            .collect();
        Ok(Some(WindowIndex {
            records_offset: records_offset as u64,
            skeleton: h.finalize().into(),
            records,
        }))
    }

    /// The zTOC blob's bytes holding the records (empty if the index's numbers overflow).
    pub fn records_range(&self) -> Range<u64> {
        self.records_offset..self.records_end().unwrap_or(self.records_offset)
    }

    /// End of the records; `None` when the index's numbers overflow (a hostile index).
    fn records_end(&self) -> Option<u64> {
        let len = u64::try_from(self.records.len())
            .ok()?
            .checked_mul(CHECKPOINT_SIZE as u64)?;
        self.records_offset.checked_add(len)
    }

    /// The two ranges of a `ztoc_size`-byte blob that make its skeleton: before and after
    /// the records (`None` if the index does not fit that size).
    pub fn skeleton_ranges(&self, ztoc_size: u64) -> Option<[Range<u64>; 2]> {
        let end = self.records_end()?;
        (self.records_offset >= HEADER_SIZE as u64 && end <= ztoc_size)
            .then_some([0..self.records_offset, end..ztoc_size])
    }

    /// Compact binary form (little-endian): records offset, skeleton digest, count, then per
    /// checkpoint `in`, `out`, `bits` and the record's digest.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FIXED_SIZE + self.records.len() * ENTRY_SIZE);
        out.extend_from_slice(&self.records_offset.to_le_bytes());
        out.extend_from_slice(&self.skeleton);
        out.extend_from_slice(&(self.records.len() as u32).to_le_bytes());
        for (p, d) in &self.records {
            out.extend_from_slice(&p.compressed_offset.to_le_bytes());
            out.extend_from_slice(&p.uncompressed_offset.to_le_bytes());
            out.push(p.bits);
            out.extend_from_slice(d);
        }
        out
    }

    /// Parses [`WindowIndex::encode`]'s form; the length must match the count exactly.
    pub fn decode(b: &[u8]) -> Result<WindowIndex> {
        let fixed = b
            .get(..FIXED_SIZE)
            .ok_or_else(|| bad(format!("{} bytes, shorter than its header", b.len())))?;
        let u64_at = |s: &[u8], i: usize| u64::from_le_bytes(s[i..i + 8].try_into().expect("8"));
        let records_offset = u64_at(fixed, 0);
        let skeleton: [u8; 32] = fixed[8..40].try_into().expect("32");
        let n = u32::from_le_bytes(fixed[40..44].try_into().expect("4")) as usize;
        let body = &b[FIXED_SIZE..];
        if n == 0 || body.len() != n.saturating_mul(ENTRY_SIZE) {
            return Err(bad(format!(
                "{} bytes do not hold {n} checkpoints",
                b.len()
            )));
        }
        let records = body
            .chunks_exact(ENTRY_SIZE)
            .map(|e| {
                let p = Checkpoint {
                    compressed_offset: u64_at(e, 0),
                    uncompressed_offset: u64_at(e, 8),
                    bits: e[16],
                };
                (p, e[17..49].try_into().expect("32"))
            })
            .collect();
        Ok(WindowIndex {
            records_offset,
            skeleton,
            records,
        })
    }

    /// Parses a zTOC from its skeleton (`head`: the bytes before the records, `tail`: those
    /// after), checked against the skeleton digest; the span table's windows are then
    /// fetched record by record ([`crate::Spans::windows_missing`], [`crate::Spans::load_windows`]).
    pub fn ztoc_from_skeleton(&self, ztoc_size: u64, head: &[u8], tail: &[u8]) -> Result<Ztoc> {
        let [h, t] = self
            .skeleton_ranges(ztoc_size)
            .ok_or_else(|| bad(format!("records do not fit a {ztoc_size}-byte zTOC")))?;
        if head.len() as u64 != h.end || tail.len() as u64 != t.end - t.start {
            return Err(bad(format!(
                "skeleton parts of {} and {} bytes, expected {} and {}",
                head.len(),
                tail.len(),
                h.end,
                t.end - t.start
            )));
        }
        let mut hasher = Sha256::new();
        hasher.update(head);
        hasher.update(tail);
        let actual: [u8; 32] = hasher.finalize().into();
        if actual != self.skeleton {
            return Err(bad(format!(
                "skeleton digest mismatch: expected sha256:{}, got sha256:{}",
                hex::encode(self.skeleton),
                hex::encode(actual)
            )));
        }
        // The records are left out as zeros (a zeroed allocation: pages never touched stay
        // unmapped); the decoder only reads the vector around them, checked below.
        let size = usize::try_from(ztoc_size).map_err(|_| bad("zTOC size"))?;
        let mut buf = vec![0u8; size];
        buf[..head.len()].copy_from_slice(head);
        buf[t.start as usize..].copy_from_slice(tail);
        let data = checkpoints_vector(&buf)?;
        // Both ends fit `ztoc_size` (checked by `skeleton_ranges`), hence `usize`.
        let hole = h.end as usize..t.start as usize;
        if data.start + HEADER_SIZE != hole.start || data.end != hole.end {
            return Err(bad(format!(
                "the zTOC's checkpoints lie at {data:?}, the index says records at {hole:?}"
            )));
        }
        crate::codec::decode_parts(&buf, Some(hole))
    }
}

/// Where the checkpoints vector's bytes lie in a zTOC blob.
fn checkpoints_vector(blob: &[u8]) -> Result<Range<usize>> {
    let malformed = |e: String| ZtocError::Malformed(e);
    let info = Table::root(blob)
        .and_then(|r| r.table(fb::Ztoc::VT_COMPRESSION_INFO))
        .map_err(malformed)?
        .ok_or_else(|| malformed("no compression info".into()))?;
    let data = info
        .bytes(fb::CompressionInfo::VT_CHECKPOINTS)
        .map_err(malformed)?
        .ok_or_else(|| malformed("no checkpoints".into()))?;
    // `data` borrows from `blob`: its offset is the pointer difference.
    let start = data.as_ptr() as usize - blob.as_ptr() as usize;
    Ok(start..start + data.len())
}

/// Windows of a split zTOC, filled as records are fetched and verified.
#[derive(Debug)]
pub(crate) struct LazyWindows {
    records_offset: u64,
    digests: Vec<[u8; 32]>,
    loaded: Vec<OnceLock<Box<[u8]>>>,
}

impl LazyWindows {
    pub(crate) fn new(idx: &WindowIndex) -> LazyWindows {
        LazyWindows {
            records_offset: idx.records_offset,
            digests: idx.records.iter().map(|(_, d)| *d).collect(),
            loaded: idx.records.iter().map(|_| OnceLock::new()).collect(),
        }
    }

    pub(crate) fn window(&self, i: usize) -> Option<&[u8]> {
        self.loaded.get(i)?.get().map(|w| &w[..])
    }

    /// Blob range of the records `first..=last` among `ids` whose window is missing.
    pub(crate) fn missing(&self, ids: Range<usize>) -> Option<Range<u64>> {
        let missing = |i: &usize| self.loaded.get(*i).is_some_and(|w| w.get().is_none());
        let first = ids.clone().find(missing)?;
        let last = ids.rev().find(missing).unwrap_or(first);
        let at = |i: usize| {
            (i as u64)
                .checked_mul(CHECKPOINT_SIZE as u64)?
                .checked_add(self.records_offset)
        };
        Some(at(first)?..at(last + 1)?)
    }

    /// Verifies and keeps the records in `data` (blob bytes from `offset`, whole records).
    /// Records that match are kept even when others do not (the error names the first that
    /// did not), so one bad record costs only its own spans.
    pub(crate) fn load(&self, points: &[Checkpoint], offset: u64, data: &[u8]) -> Result<usize> {
        let rel = offset
            .checked_sub(self.records_offset)
            .filter(|r| r.is_multiple_of(CHECKPOINT_SIZE as u64))
            .ok_or_else(|| {
                bad(format!(
                    "records fetched from offset {offset}: not a record"
                ))
            })?;
        if !data.len().is_multiple_of(CHECKPOINT_SIZE) {
            return Err(bad(format!("{} bytes are not whole records", data.len())));
        }
        let first = (rel / CHECKPOINT_SIZE as u64) as usize;
        let mut n = 0;
        let mut mismatch = None;
        for (k, rec) in data.chunks_exact(CHECKPOINT_SIZE).enumerate() {
            let i = first + k;
            let (Some(want), Some(p)) = (self.digests.get(i), points.get(i)) else {
                return Err(bad(format!("record {i} of {}", self.digests.len())));
            };
            let got: [u8; 32] = Sha256::digest(rec).into();
            if &got != want {
                mismatch.get_or_insert_with(|| {
                    bad(format!(
                        "record {i} digest mismatch: expected sha256:{}, got sha256:{}",
                        hex::encode(want),
                        hex::encode(got)
                    ))
                });
                continue;
            }
            let field = |a: usize| i64::from_le_bytes(rec[a..a + 8].try_into().expect("8"));
            if field(0) != p.compressed_offset as i64
                || field(8) != p.uncompressed_offset as i64
                || rec[16] != p.bits
            {
                mismatch.get_or_insert_with(|| {
                    bad(format!("record {i} differs from the index's offsets"))
                });
                continue;
            }
            let window: Box<[u8]> = rec[17..17 + WINDOW_SIZE].into();
            if self.loaded[i].set(window).is_ok() {
                n += 1;
            }
        }
        match mismatch {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }
}
