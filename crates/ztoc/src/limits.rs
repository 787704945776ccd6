//! What a zTOC may decode to, in proportion to its encoded size.
//!
//! A flatbuffer is a graph of offsets, and nothing in the format stops many offsets from
//! pointing at one string, vector or table. A 4 MiB zTOC whose every entry names the same
//! 1 MiB string decodes, copy by copy, to gigabytes: decoding alone would take the daemon
//! down. Honest writers (upstream's Go marshaler and ours) store every string once, so what an
//! honest zTOC decodes to is a small multiple of its size. The decoder therefore charges every
//! entry, byte string, PAX record and digest to a [`DecodeBudget`] of
//! `DECODE_FACTOR x blob + DECODE_SLACK` bytes *before* copying it, and checks the per-field
//! caps below (those of the tar reader that builds zTOCs, so nothing an honest build can produce
//! is refused).

use crate::error::ZtocError;
use crate::model::{SpanDigest, TocEntry};

/// Decoded bytes allowed per encoded byte (honest zTOCs decode to about 2-3x their size).
pub const DECODE_FACTOR: u64 = 8;
/// Decoded bytes allowed on top of `DECODE_FACTOR x size` (small zTOCs, fixed costs).
pub const DECODE_SLACK: u64 = 1 << 20;
/// Smallest encoding of an entry: its 4-byte vector slot plus a table holding at least a
/// vtable offset and the offsets of its name and type (honest entries take over 100 bytes).
pub const MIN_ENTRY_BYTES: usize = 16;
/// Largest name, link name, user or group name, or mod time: the tar reader's cap on a PAX or
/// GNU long-name header (Go's `archive/tar` has the same), which bounds what a build records.
pub const MAX_FIELD_BYTES: usize = 1 << 20;
/// Largest total of an entry's PAX keys and values (they all come from one PAX header).
pub const MAX_ENTRY_PAX_BYTES: usize = 1 << 20;
/// Most PAX records in one entry (the shortest valid record, `5 k=\n`, takes 5 bytes).
pub const MAX_ENTRY_PAX_RECORDS: usize = MAX_ENTRY_PAX_BYTES / 5;

/// Charged per allocation (allocator overhead, rounding).
const ALLOC_COST: u64 = 16;
/// Charged per PAX record on top of its bytes (B-tree node share, two allocations).
const PAX_RECORD_COST: u64 = 64;

/// The decoded-size budget of one zTOC blob.
pub(crate) struct DecodeBudget {
    blob_len: usize,
    limit: u64,
    used: u64,
}

impl DecodeBudget {
    /// The budget of a blob of `blob_len` bytes.
    pub(crate) fn new(blob_len: usize) -> Self {
        let limit = DECODE_FACTOR
            .saturating_mul(blob_len as u64)
            .saturating_add(DECODE_SLACK);
        DecodeBudget {
            blob_len,
            limit,
            used: 0,
        }
    }

    fn exceeded(&self, what: String) -> ZtocError {
        ZtocError::LimitExceeded {
            what,
            ztoc_bytes: self.blob_len,
        }
    }

    fn charge(&mut self, n: u64, what: impl FnOnce() -> String) -> Result<(), ZtocError> {
        self.used = self.used.saturating_add(n);
        if self.used > self.limit {
            let limit = self.limit;
            return Err(self.exceeded(format!(
                "decoded size larger than {limit} bytes ({DECODE_FACTOR} x its size + \
                 {DECODE_SLACK}) at {}",
                what()
            )));
        }
        Ok(())
    }

    /// Checks the entry count against the blob size and charges the entry array.
    pub(crate) fn entries(&mut self, n: usize) -> Result<(), ZtocError> {
        let max = self.blob_len / MIN_ENTRY_BYTES;
        if n > max {
            return Err(self.exceeded(format!("{n} entries, at most {max} fit in its size")));
        }
        self.charge(
            (n as u64).saturating_mul(std::mem::size_of::<TocEntry>() as u64),
            || format!("{n} entries"),
        )
    }

    /// Checks and charges one byte field of entry `entry` before it is copied.
    pub(crate) fn field(&mut self, entry: usize, field: &str, len: usize) -> Result<(), ZtocError> {
        if len > MAX_FIELD_BYTES {
            return Err(self.exceeded(format!(
                "entry {entry}: {field} of {len} bytes, larger than {MAX_FIELD_BYTES}"
            )));
        }
        self.charge(len as u64 + ALLOC_COST, || format!("entry {entry} {field}"))
    }

    /// Checks and charges the PAX records (xattrs) of entry `entry`: `records` so far
    /// (including this one) with `bytes` of keys and values so far.
    pub(crate) fn pax_record(
        &mut self,
        entry: usize,
        records: usize,
        bytes: usize,
        this: usize,
    ) -> Result<(), ZtocError> {
        if records > MAX_ENTRY_PAX_RECORDS || bytes > MAX_ENTRY_PAX_BYTES {
            return Err(self.exceeded(format!(
                "entry {entry}: {records} xattr/PAX records of {bytes} bytes, more than \
                 {MAX_ENTRY_PAX_RECORDS} records or {MAX_ENTRY_PAX_BYTES} bytes"
            )));
        }
        self.charge(this as u64 + PAX_RECORD_COST, || {
            format!("entry {entry} xattr {records}")
        })
    }

    /// Charges the span digest array.
    pub(crate) fn digests(&mut self, n: usize) -> Result<(), ZtocError> {
        self.charge(
            (n as u64).saturating_mul(std::mem::size_of::<SpanDigest>() as u64),
            || format!("{n} span digests"),
        )
    }

    /// Charges a copied blob (version strings, checkpoints).
    pub(crate) fn bytes(&mut self, what: &str, len: usize) -> Result<(), ZtocError> {
        self.charge(len as u64 + ALLOC_COST, || what.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_proportional() {
        let mut b = DecodeBudget::new(1000);
        assert!(b.entries(1000 / MIN_ENTRY_BYTES + 1).is_err());
        let mut b = DecodeBudget::new(1000);
        assert!(b.field(0, "name", MAX_FIELD_BYTES + 1).is_err());
        b.field(0, "name", 4000).unwrap();
        let left = (DECODE_FACTOR * 1000 + DECODE_SLACK - 4000 - ALLOC_COST) as usize;
        assert!(b.bytes("x", left).is_err());
        let mut b = DecodeBudget::new(1000);
        assert!(b.pax_record(0, 1, MAX_ENTRY_PAX_BYTES + 1, 1).is_err());
        assert!(b.pax_record(0, MAX_ENTRY_PAX_RECORDS + 1, 0, 0).is_err());
    }
}
