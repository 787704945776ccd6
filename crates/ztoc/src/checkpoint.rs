//! gzip zran checkpoints and the upstream checkpoint blob.
//!
//! Blob layout (little-endian, packed): `i32 count`, `i64 span_size`, then per checkpoint
//! `i64 in`, `i64 out`, `u8 bits`, 32 KiB window. Version 2 stores every checkpoint; legacy
//! version 1 omits checkpoint 0 (implied: in 10, out 0, bits 0, zero window). The two are told
//! apart by the blob length.

use std::sync::Arc;

use crate::error::{Result, ZtocError};
use crate::windows::{LazyWindows, WindowIndex};

/// Size of the deflate window stored with each checkpoint.
pub const WINDOW_SIZE: usize = 32 * 1024;
pub(crate) const HEADER_SIZE: usize = 4 + 8;
pub(crate) const CHECKPOINT_SIZE: usize = 8 + 8 + 1 + WINDOW_SIZE;
static ZERO_WINDOW: [u8; WINDOW_SIZE] = [0; WINDOW_SIZE];

/// Where decompression can resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// Compressed offset of the first full byte after the checkpoint.
    pub compressed_offset: u64,
    /// Uncompressed offset of the checkpoint.
    pub uncompressed_offset: u64,
    /// Bits (0-7) of the byte before `compressed_offset` still to be consumed.
    pub bits: u8,
}

/// Parsed gzip checkpoint blob. Windows stay in the blob and are borrowed on use, or, for a
/// zTOC fetched without its records (`windows.rs`), are loaded as records are fetched.
#[derive(Debug, Clone)]
pub struct GzipCheckpoints {
    blob: Vec<u8>,
    lazy: Option<Arc<LazyWindows>>,
    legacy_v1: bool,
    span_size: i64,
    points: Vec<Checkpoint>,
}

fn bad(msg: impl Into<String>) -> ZtocError {
    ZtocError::BadCheckpoints(msg.into())
}

impl GzipCheckpoints {
    /// Parses and validates a checkpoint blob.
    pub fn parse(blob: Vec<u8>) -> Result<Self> {
        if blob.len() < HEADER_SIZE {
            return Err(bad(format!(
                "blob of {} bytes is shorter than its header",
                blob.len()
            )));
        }
        let count = i32::from_le_bytes(blob[0..4].try_into().expect("4 bytes"));
        let span_size = i64::from_le_bytes(blob[4..12].try_into().expect("8 bytes"));
        let count = usize::try_from(count)
            .ok()
            .filter(|&c| c > 0)
            .ok_or_else(|| bad(format!("invalid checkpoint count {count}")))?;
        let body = blob.len() - HEADER_SIZE;
        let legacy_v1 = if body == count * CHECKPOINT_SIZE {
            false
        } else if body == (count - 1) * CHECKPOINT_SIZE {
            true
        } else {
            return Err(bad(format!(
                "blob of {} bytes does not hold {count} checkpoints",
                blob.len()
            )));
        };
        let mut points = Vec::with_capacity(count);
        if legacy_v1 {
            points.push(Checkpoint {
                compressed_offset: 10,
                uncompressed_offset: 0,
                bits: 0,
            });
        }
        for rec in blob[HEADER_SIZE..].chunks_exact(CHECKPOINT_SIZE) {
            let cin = i64::from_le_bytes(rec[0..8].try_into().expect("8 bytes"));
            let cout = i64::from_le_bytes(rec[8..16].try_into().expect("8 bytes"));
            let (Ok(cin), Ok(cout)) = (u64::try_from(cin), u64::try_from(cout)) else {
                return Err(bad("negative checkpoint offset"));
            };
            points.push(Checkpoint {
                compressed_offset: cin,
                uncompressed_offset: cout,
                bits: rec[16],
            });
        }
        check_points(&points)?;
        Ok(GzipCheckpoints {
            blob,
            lazy: None,
            legacy_v1,
            span_size,
            points,
        })
    }

    /// Checkpoints whose windows come later: `header` is the blob's 12-byte header (count and
    /// span size), the offsets come from the index (validated as [`GzipCheckpoints::parse`]
    /// validates a blob's).
    pub(crate) fn lazy(header: &[u8], idx: &WindowIndex) -> Result<Self> {
        if header.len() != HEADER_SIZE {
            return Err(bad(format!(
                "{} header bytes for checkpoints fetched apart",
                header.len()
            )));
        }
        let count = i32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
        let span_size = i64::from_le_bytes(header[4..12].try_into().expect("8 bytes"));
        if usize::try_from(count).ok() != Some(idx.records.len()) {
            return Err(bad(format!(
                "blob header says {count} checkpoints, the index lists {}",
                idx.records.len()
            )));
        }
        let points: Vec<Checkpoint> = idx.records.iter().map(|(p, _)| *p).collect();
        if points
            .iter()
            .any(|p| i64::try_from(p.compressed_offset.max(p.uncompressed_offset)).is_err())
        {
            return Err(bad("negative checkpoint offset"));
        }
        check_points(&points)?;
        Ok(GzipCheckpoints {
            blob: header.to_vec(),
            lazy: Some(Arc::new(LazyWindows::new(idx))),
            legacy_v1: false,
            span_size,
            points,
        })
    }

    /// The windows still to fetch, when they come apart from the zTOC.
    pub(crate) fn lazy_windows(&self) -> Option<&LazyWindows> {
        self.lazy.as_deref()
    }

    /// The checkpoints, one per span.
    pub fn points(&self) -> &[Checkpoint] {
        &self.points
    }

    /// Span size recorded in the blob.
    pub fn span_size(&self) -> i64 {
        self.span_size
    }

    /// Whether this is a legacy version 1 blob.
    pub fn is_legacy_v1(&self) -> bool {
        self.legacy_v1
    }

    /// The 32 KiB window of checkpoint `i` (`None`: fetched apart and not loaded yet).
    pub fn window(&self, i: usize) -> Option<&[u8]> {
        if let Some(l) = &self.lazy {
            return l.window(i);
        }
        let stored = if self.legacy_v1 {
            i.checked_sub(1)
        } else {
            Some(i)
        };
        match stored {
            Some(j) => {
                let start = HEADER_SIZE + j * CHECKPOINT_SIZE + 17;
                self.blob.get(start..start + WINDOW_SIZE)
            }
            None => Some(&ZERO_WINDOW),
        }
    }
}

/// Checks bit counts and stream order.
fn check_points(points: &[Checkpoint]) -> Result<()> {
    for (k, p) in points.iter().enumerate() {
        if p.bits > 7 || (p.bits > 0 && p.compressed_offset == 0) {
            return Err(bad(format!(
                "invalid bit count {} at offset {}",
                p.bits, p.compressed_offset
            )));
        }
        if let Some(prev) = k.checked_sub(1).map(|j| points[j]) {
            if p.compressed_offset < prev.compressed_offset
                || p.uncompressed_offset < prev.uncompressed_offset
            {
                return Err(bad("checkpoints are not in stream order"));
            }
        }
    }
    Ok(())
}

/// Appends a checkpoint record to a blob under construction (see [`blob_header`]).
pub(crate) fn push_checkpoint(blob: &mut Vec<u8>, cp: Checkpoint, window: &[u8]) {
    blob.extend_from_slice(&(cp.compressed_offset as i64).to_le_bytes());
    blob.extend_from_slice(&(cp.uncompressed_offset as i64).to_le_bytes());
    blob.push(cp.bits);
    blob.extend_from_slice(window);
}

/// Writes the blob header (count and span size) into the first 12 bytes.
pub(crate) fn blob_header(blob: &mut [u8], count: usize, span_size: u64) {
    blob[0..4].copy_from_slice(&(count as i32).to_le_bytes());
    blob[4..12].copy_from_slice(&(span_size as i64).to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(points: &[(u64, u64, u8)], v1: bool) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        blob_header(&mut b, points.len(), 1 << 22);
        for (i, &(cin, cout, bits)) in points.iter().enumerate() {
            if v1 && i == 0 {
                continue;
            }
            let w = vec![i as u8; WINDOW_SIZE];
            let cp = Checkpoint {
                compressed_offset: cin,
                uncompressed_offset: cout,
                bits,
            };
            push_checkpoint(&mut b, cp, &w);
        }
        b
    }

    #[test]
    fn v2_and_v1_blobs() {
        let pts = [(10, 0, 0), (5000, 4_300_000, 3)];
        let v2 = GzipCheckpoints::parse(blob(&pts, false)).unwrap();
        assert!(!v2.is_legacy_v1());
        assert_eq!(v2.points()[1].bits, 3);
        assert_eq!(v2.window(1).unwrap()[0], 1);
        let v1 = GzipCheckpoints::parse(blob(&pts, true)).unwrap();
        assert!(v1.is_legacy_v1());
        assert_eq!(v1.points().len(), 2);
        assert_eq!(v1.points()[0].compressed_offset, 10);
        assert!(v1.window(0).unwrap().iter().all(|&b| b == 0));
        assert_eq!(v1.window(1).unwrap()[0], 1);
    }

    #[test]
    fn malformed_blobs_are_errors() {
        let good = blob(&[(10, 0, 0), (5000, 4_300_000, 3)], false);
        for bad in [
            Vec::new(),
            good[..11].to_vec(),
            good[..good.len() - 1].to_vec(),
            {
                let mut b = good.clone();
                b[0..4].copy_from_slice(&(-1i32).to_le_bytes());
                b
            },
            {
                let mut b = good.clone();
                b[0..4].copy_from_slice(&i32::MAX.to_le_bytes());
                b
            },
            {
                let mut b = good.clone();
                b[HEADER_SIZE + CHECKPOINT_SIZE + 16] = 9;
                b
            },
            blob(&[(10, 0, 0), (5, 4_300_000, 0)], false),
        ] {
            assert!(GzipCheckpoints::parse(bad).is_err());
        }
    }
}
