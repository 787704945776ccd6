//! Reads of spans already held, served by the slice: only the bytes asked for are copied from
//! memory or read from the span file.
//!
//! Why: spans are large (4 MiB by default) and a FUSE READ is at most 1 MiB, usually much
//! less for random access. Loading a whole span from disk to answer 4 KiB costs a 4 MiB read
//! and copy, and once the file is bigger than the memory cache, random reads of it do that
//! almost every time. A span file holds verified bytes (written only after its digest
//! matched), so a slice of it is as trusted as the whole. Anything not held (or a span file
//! removed meanwhile) falls back to the full path, which fetches.

use std::io;
use std::ops::Range;

use soci_ztoc::SpanId;

use super::SpanManager;

impl SpanManager {
    /// Bytes `range` (held by spans `ids`) if every span is held; `None` to take the full
    /// path.
    pub(super) async fn read_held(
        &self,
        range: &Range<u64>,
        ids: Range<SpanId>,
    ) -> io::Result<Option<Vec<u8>>> {
        if ids.is_empty() || !ids.clone().all(|id| self.is_cached(id)) {
            return Ok(None);
        }
        let want = (range.end - range.start) as usize;
        if ids.len() == 1 {
            // One span (most reads): its slice is the answer, no second copy.
            let Ok(s) = self.spans.span(ids.start) else {
                return Ok(None);
            };
            if range.start < s.uncompressed.start || range.end > s.uncompressed.end {
                return Ok(None);
            }
            let within = range.start - s.uncompressed.start..range.end - s.uncompressed.start;
            let got = self.cache.read_slice(ids.start, within).await?;
            return Ok(got.filter(|b| b.len() == want).map(Vec::from));
        }
        let mut out = Vec::with_capacity(want);
        for id in ids {
            let Ok(s) = self.spans.span(id) else {
                return Ok(None);
            };
            let (from, to) = (
                range.start.max(s.uncompressed.start),
                range.end.min(s.uncompressed.end),
            );
            if from >= to {
                continue;
            }
            let within = from - s.uncompressed.start..to - s.uncompressed.start;
            match self.cache.read_slice(id, within).await? {
                Some(b) => out.extend_from_slice(&b),
                None => return Ok(None),
            }
        }
        Ok((out.len() == want).then_some(out))
    }
}
