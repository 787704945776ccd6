//! The one read pipeline of a layer: uncompressed range -> spans -> compressed runs -> verify
//! -> decompress -> clip.
//!
//! Why one place: the daemon's span manager (which adds caching, locks and deadlines around
//! the middle steps) and the CLI's `ztoc get-file` ([`crate::read_uncompressed`]) must agree
//! on which spans a range needs, which compressed bytes a run of spans is, what counts as a
//! verified span and how span bytes are cut back to the range asked for. Everything here is
//! pure (no I/O): callers fetch the compressed bytes however they like.

use std::ops::Range;

use crate::error::{Result, ZtocError};
use crate::span::{SpanId, Spans};

/// What a read of uncompressed bytes `range` needs: the spans it touches, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadPlan {
    /// The uncompressed bytes asked for.
    pub range: Range<u64>,
    /// The spans holding them (empty for an empty range).
    pub spans: Range<SpanId>,
}

/// A run of consecutive spans fetched with one range request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanRun {
    /// The spans.
    pub spans: Range<SpanId>,
    /// Their compressed bytes in the layer blob.
    pub compressed: Range<u64>,
}

/// Why a span could not be turned into verified bytes.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes received are not the span's (digest mismatch): fetching again may help.
    #[error(transparent)]
    BadBytes(ZtocError),
    /// The span cannot be decoded from these (verified) bytes, or the bytes given do not
    /// cover it: fetching again does not help.
    #[error(transparent)]
    Unusable(ZtocError),
}

impl DecodeError {
    /// The underlying zTOC error.
    pub fn into_inner(self) -> ZtocError {
        match self {
            DecodeError::BadBytes(e) | DecodeError::Unusable(e) => e,
        }
    }
}

impl Spans {
    /// The spans a read of `range` needs; a range past the spans' coverage is an error
    /// (a zTOC entry pointing outside the archive), never a short read.
    pub fn plan(&self, range: Range<u64>) -> Result<ReadPlan> {
        let size = self.uncompressed_size();
        if range.start > range.end || range.end > size {
            return Err(ZtocError::OutOfRange(format!(
                "bytes {range:?} are past the end of the layer ({size} bytes): the zTOC entry \
                 points outside the archive"
            )));
        }
        let spans = self.spans_for(&range);
        Ok(ReadPlan { range, spans })
    }

    /// The run of spans `ids` (consecutive) with its compressed byte range.
    pub fn run(&self, ids: Range<SpanId>) -> Result<SpanRun> {
        if ids.is_empty() {
            return Err(ZtocError::OutOfRange(format!("empty span run {ids:?}")));
        }
        let first = self.span(ids.start)?;
        let last = self.span(ids.end - 1)?;
        Ok(SpanRun {
            compressed: first.compressed.start..last.compressed.end,
            spans: ids,
        })
    }

    /// Groups ascending span ids into runs of consecutive ids (one range request each).
    pub fn runs_of(&self, ids: &[SpanId]) -> Result<Vec<SpanRun>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < ids.len() {
            let mut j = i + 1;
            while j < ids.len() && ids[j] == ids[j - 1] + 1 {
                j += 1;
            }
            out.push(self.run(ids[i]..ids[j - 1] + 1)?);
            i = j;
        }
        Ok(out)
    }

    /// Verifies (unless `verify` is false) and decompresses span `id` out of `data`, the blob
    /// bytes starting at offset `base`; the result is exactly the span's uncompressed size.
    pub fn decode_span(
        &self,
        id: SpanId,
        data: &[u8],
        base: u64,
        verify: bool,
    ) -> Result<Vec<u8>, DecodeError> {
        let s = self.span(id).map_err(DecodeError::Unusable)?;
        let slice = s
            .compressed
            .start
            .checked_sub(base)
            .zip(s.compressed.end.checked_sub(base))
            .and_then(|(a, b)| data.get(usize::try_from(a).ok()?..usize::try_from(b).ok()?))
            .ok_or_else(|| {
                DecodeError::Unusable(ZtocError::OutOfRange(format!(
                    "span {id} is outside the {} bytes fetched from offset {base}",
                    data.len()
                )))
            })?;
        if verify {
            self.verify(id, slice).map_err(DecodeError::BadBytes)?;
        }
        let plain = self.decompress(id, slice).map_err(|e| {
            if verify {
                DecodeError::Unusable(e)
            } else {
                // Unverified bytes that do not decompress may simply be damaged.
                DecodeError::BadBytes(e)
            }
        })?;
        let want = s.uncompressed.end - s.uncompressed.start;
        if plain.len() as u64 != want {
            return Err(DecodeError::Unusable(ZtocError::Gzip(format!(
                "span {id} decompressed to {} bytes, {want} expected",
                plain.len()
            ))));
        }
        Ok(plain)
    }
}

impl ReadPlan {
    /// Cuts the plan's range out of its spans' uncompressed bytes (`bufs[i]` holds span
    /// `self.spans.start + i` whole) into one buffer: the only copy of the bytes on a read.
    pub fn assemble<B: AsRef<[u8]>>(&self, spans: &Spans, bufs: &[B]) -> Result<Vec<u8>> {
        let want = self.range.end - self.range.start;
        if bufs.len() != self.spans.len() {
            return Err(ZtocError::OutOfRange(format!(
                "{} span buffers for spans {:?}",
                bufs.len(),
                self.spans
            )));
        }
        // Sized by the spans actually held, never by the request alone.
        let held: usize = bufs.iter().map(|b| b.as_ref().len()).sum();
        let mut out = Vec::with_capacity((want as usize).min(held));
        for (id, buf) in self.spans.clone().zip(bufs) {
            let s = spans.span(id)?;
            let from = self.range.start.max(s.uncompressed.start);
            let to = self.range.end.min(s.uncompressed.end);
            if from >= to {
                continue;
            }
            let rel = (from - s.uncompressed.start) as usize..(to - s.uncompressed.start) as usize;
            let buf = buf.as_ref();
            let part = buf.get(rel.clone()).ok_or_else(|| {
                ZtocError::OutOfRange(format!(
                    "span {id} holds {} bytes, bytes {rel:?} wanted",
                    buf.len()
                ))
            })?;
            out.extend_from_slice(part);
        }
        if out.len() as u64 != want {
            return Err(ZtocError::OutOfRange(format!(
                "the spans cover {} of the {want} bytes {:?}",
                out.len(),
                self.range
            )));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_spans(size: usize, span: u64) -> (Vec<u8>, Spans) {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(size as u64);
        h.set_mode(0o644);
        let data: Vec<u8> = (0..size).map(|i| (i * 13 % 251) as u8).collect();
        b.append_data(&mut h, "f", data.as_slice()).unwrap();
        let blob = b.into_inner().unwrap();
        let opts = crate::BuildOptions {
            span_size: span,
            algorithm: Some(crate::CompressionAlgorithm::Uncompressed),
            ..Default::default()
        };
        let z = crate::build(blob.as_slice(), &opts).unwrap();
        (blob, z.spans().unwrap())
    }

    #[test]
    fn plan_runs_decode_and_assemble_agree_with_the_blob() {
        let (blob, spans) = tar_spans(100_000, 4096);
        let plan = spans.plan(5000..20_000).unwrap();
        assert_eq!(plan.spans, 1..5);
        let runs = spans.runs_of(&[1, 2, 4, 7, 8]).unwrap();
        let ids: Vec<_> = runs.iter().map(|r| r.spans.clone()).collect();
        assert_eq!(ids, vec![1..3, 4..5, 7..9]);
        assert_eq!(runs[0].compressed, 4096..3 * 4096);
        let run = spans.run(plan.spans.clone()).unwrap();
        let data = &blob[run.compressed.start as usize..run.compressed.end as usize];
        let bufs: Vec<Vec<u8>> = plan
            .spans
            .clone()
            .map(|id| {
                spans
                    .decode_span(id, data, run.compressed.start, true)
                    .unwrap()
            })
            .collect();
        assert_eq!(plan.assemble(&spans, &bufs).unwrap(), &blob[5000..20_000]);
    }

    #[test]
    fn bad_bytes_short_data_and_ranges_past_the_end_are_errors() {
        let (blob, spans) = tar_spans(10_000, 4096);
        let mut bad = blob[..4096].to_vec();
        bad[7] ^= 1;
        assert!(matches!(
            spans.decode_span(0, &bad, 0, true),
            Err(DecodeError::BadBytes(ZtocError::SpanDigestMismatch { .. }))
        ));
        assert!(matches!(
            spans.decode_span(1, &blob[..5000], 0, true),
            Err(DecodeError::Unusable(_))
        ));
        let end = spans.uncompressed_size();
        assert!(spans.plan(end - 1..end + 1).is_err());
        let plan = spans.plan(0..5000).unwrap();
        let short = vec![vec![0u8; 4096], vec![0u8; 10]];
        assert!(plan.assemble(&spans, &short).is_err(), "never short data");
        assert!(plan.assemble(&spans, &short[..1]).is_err());
    }
}
