//! Random access: read uncompressed bytes of the layer through the zTOC, fetching only the
//! compressed ranges of the spans involved and verifying each span before use.

use std::io;
use std::ops::Range;

use crate::error::{Result, ZtocError};
use crate::model::{TocEntry, Ztoc};
use crate::pipeline::DecodeError;
use crate::span::Spans;
use crate::tar::EntryKind;

/// Where compressed layer bytes come from (a local blob, an HTTP range reader, ...).
pub trait SpanSource {
    /// Returns exactly the bytes `range` of the layer blob.
    fn read_range(&mut self, range: Range<u64>) -> io::Result<Vec<u8>>;
}

impl SpanSource for std::fs::File {
    fn read_range(&mut self, range: Range<u64>) -> io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        self.read_exact_at(&mut buf, range.start)?;
        Ok(buf)
    }
}

impl SpanSource for &[u8] {
    fn read_range(&mut self, range: Range<u64>) -> io::Result<Vec<u8>> {
        usize::try_from(range.start)
            .ok()
            .zip(usize::try_from(range.end).ok())
            .and_then(|(s, e)| self.get(s..e))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "range past end of blob"))
    }
}

/// Reads the uncompressed bytes `range` of the layer: one read of the touched spans'
/// compressed bytes, then verify, decompress and clip each span (the pipeline the daemon's
/// span manager uses too, see [`crate::ReadPlan`]).
pub fn read_uncompressed(
    spans: &Spans,
    source: &mut dyn SpanSource,
    range: Range<u64>,
) -> Result<Vec<u8>> {
    let plan = spans.plan(range)?;
    if plan.spans.is_empty() {
        return Ok(Vec::new());
    }
    let run = spans.run(plan.spans.clone())?;
    let data = source
        .read_range(run.compressed.clone())
        .map_err(ZtocError::Source)?;
    let bufs = plan
        .spans
        .clone()
        .map(|id| {
            spans
                .decode_span(id, &data, run.compressed.start, true)
                .map_err(DecodeError::into_inner)
        })
        .collect::<Result<Vec<_>>>()?;
    plan.assemble(spans, &bufs)
}

/// Normalises a tar name: no leading `./` or `/`, no trailing `/`.
pub fn normalize_name(name: &[u8]) -> &[u8] {
    let mut n = name;
    loop {
        if let Some(r) = n.strip_prefix(b"./") {
            n = r;
        } else if let Some(r) = n.strip_prefix(b"/") {
            n = r;
        } else {
            break;
        }
    }
    while let Some(r) = n.strip_suffix(b"/") {
        n = r;
    }
    if n == b"." {
        return b"";
    }
    n
}

impl Ztoc {
    /// The last entry with this (normalised) path; later entries win as in tar extraction.
    pub fn find(&self, path: &[u8]) -> Option<&TocEntry> {
        let want = normalize_name(path);
        self.entries
            .iter()
            .rev()
            .find(|e| normalize_name(&e.name) == want)
    }

    /// The contents of a regular file (hardlinks are followed to their target).
    pub fn read_file(
        &self,
        spans: &Spans,
        source: &mut dyn SpanSource,
        path: &[u8],
    ) -> Result<Vec<u8>> {
        let mut entry = self
            .find(path)
            .ok_or_else(|| ZtocError::NotFound(String::from_utf8_lossy(path).into_owned()))?;
        if entry.kind == EntryKind::Hardlink {
            entry = self.find(&entry.linkname).ok_or_else(|| {
                ZtocError::NotFound(String::from_utf8_lossy(&entry.linkname).into_owned())
            })?;
        }
        if entry.kind != EntryKind::Regular {
            return Err(ZtocError::OutOfRange(format!(
                "{} is a {}, not a regular file",
                String::from_utf8_lossy(path),
                entry.kind.as_str()
            )));
        }
        read_uncompressed(spans, source, entry.offset..entry.offset + entry.size)
    }
}
