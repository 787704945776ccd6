//! Builds a zTOC from a layer blob in one streaming pass.
//!
//! For gzip, the blob is inflated once with `Z_BLOCK` stops; checkpoints are taken at deflate
//! block ends exactly where upstream takes them, span digests are hashed from the compressed
//! bytes as they are consumed, and the uncompressed bytes feed the tar walker. Memory is
//! bounded by the I/O buffers plus the checkpoints (32 KiB each) and the entry list.

use std::io::{self, BufReader, Read};

use sha2::{Digest, Sha256};

use crate::checkpoint::{blob_header, push_checkpoint, Checkpoint, HEADER_SIZE, WINDOW_SIZE};
use crate::codec::encode_tar_zinfo;
use crate::error::{Result, ZtocError};
use crate::model::{
    CompressionAlgorithm, CompressionInfo, SpanDigest, TocEntry, Ztoc,
    DEFAULT_BUILD_TOOL_IDENTIFIER, DEFAULT_SPAN_SIZE, ZTOC_VERSION,
};
use crate::tar::TarWalker;
use crate::time::format_mod_time;
use crate::zlib::{Flush, Inflater, Status, WINDOW_BITS_AUTO};

const INPUT_CHUNK: usize = 64 * 1024;
const READ_BUFFER: usize = 256 * 1024;
const TAR_ZINFO_VERSION: i32 = 2;

/// Options for [`build`].
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Span size in uncompressed bytes (upstream default 4 MiB).
    pub span_size: u64,
    /// Written into the zTOC.
    pub build_tool_identifier: String,
    /// Compression of the blob; `None` detects it from the first bytes.
    pub algorithm: Option<CompressionAlgorithm>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            span_size: DEFAULT_SPAN_SIZE,
            build_tool_identifier: DEFAULT_BUILD_TOOL_IDENTIFIER.to_string(),
            algorithm: None,
        }
    }
}

/// Builds the zTOC of a layer blob read from `blob`.
pub fn build(blob: impl Read, opts: &BuildOptions) -> Result<Ztoc> {
    build_with_checkpoints(blob, opts, &[])
}

/// [`build`] with extra checkpoints (gzip only): `extra` are ascending uncompressed offsets of
/// deflate block boundaries (a [`crate::CutPlan`]'s), taken on top of the every-`span_size`
/// checkpoints, which stay where upstream puts them. Offsets that are not a block boundary
/// are skipped. With no extras the zTOC is byte-identical to [`build`]'s (upstream's).
pub fn build_with_checkpoints(blob: impl Read, opts: &BuildOptions, extra: &[u64]) -> Result<Ztoc> {
    if opts.span_size == 0 || opts.span_size > i64::MAX as u64 {
        return Err(ZtocError::OutOfRange(format!(
            "span size {}",
            opts.span_size
        )));
    }
    let mut blob = BufReader::with_capacity(INPUT_CHUNK, blob);
    let algorithm = match opts.algorithm {
        Some(a) => a,
        None => detect(&mut blob)?,
    };
    let (entries, uncompressed_size, compression, compressed_size) = match algorithm {
        CompressionAlgorithm::Gzip => {
            let mut idx = GzipIndexer::new(blob, opts.span_size)?;
            idx.extra = extra.to_vec();
            let (entries, usize) = walk(&mut idx)?;
            let (info, csize) = idx.finish()?;
            (entries, usize, info, csize)
        }
        CompressionAlgorithm::Uncompressed => {
            let mut h = TarSpanHasher::new(blob, opts.span_size);
            let (entries, usize) = walk(&mut h)?;
            let (info, csize) = h.finish()?;
            (entries, usize, info, csize)
        }
    };
    Ok(Ztoc {
        version: ZTOC_VERSION.to_string(),
        build_tool_identifier: opts.build_tool_identifier.clone(),
        compressed_archive_size: compressed_size,
        uncompressed_archive_size: uncompressed_size,
        entries,
        compression,
    })
}

fn detect(r: &mut BufReader<impl Read>) -> Result<CompressionAlgorithm> {
    use std::io::BufRead;
    let head = r.fill_buf()?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(CompressionAlgorithm::Gzip)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Err(ZtocError::Zstd)
    } else {
        Ok(CompressionAlgorithm::Uncompressed)
    }
}

/// Walks the tar stream, then drains the reader so every byte is indexed and hashed.
fn walk(r: &mut impl Read) -> Result<(Vec<TocEntry>, u64)> {
    let mut w = TarWalker::new(BufReader::with_capacity(READ_BUFFER, &mut *r));
    let mut entries = Vec::new();
    while let Some(e) = w.next_entry()? {
        entries.push(TocEntry {
            name: e.name,
            kind: e.kind,
            offset: e.data_offset,
            size: e.size,
            linkname: e.linkname,
            mode: e.mode,
            uid: e.uid as u32,
            gid: e.gid as u32,
            uname: e.uname,
            gname: e.gname,
            mod_time: format_mod_time(e.mtime.0, e.mtime.1),
            devmajor: e.devmajor,
            devminor: e.devminor,
            pax: e.pax,
        });
    }
    let end = w.position();
    io::copy(&mut w.into_inner(), &mut io::sink())?;
    Ok((entries, end))
}

/// Inflates a gzip blob as a `Read` of its uncompressed bytes while recording checkpoints and
/// span digests (or, in scan mode, only telling a [`BoundaryScan`] of each block boundary).
pub(crate) struct GzipIndexer<R> {
    src: R,
    input: Box<[u8]>,
    in_pos: usize,
    in_len: usize,
    src_eof: bool,
    inflater: Inflater,
    total_in: u64,
    total_out: u64,
    /// Output offset of the last every-`span_size` checkpoint (extra ones do not move it, so
    /// the regular checkpoints stay where upstream puts them).
    last_checkpoint_out: u64,
    span_size: u64,
    /// Extra checkpoints still to come (ascending uncompressed offsets).
    extra: Vec<u64>,
    next_extra: usize,
    /// Scan mode: no checkpoints or digests, block boundaries reported here.
    pub(crate) scan: Option<crate::refine::BoundaryScan>,
    ring: Box<[u8]>,
    ring_pos: usize,
    blob: Vec<u8>,
    count: usize,
    hasher: Option<Sha256>,
    digests: Vec<SpanDigest>,
    last_byte: u8,
    finished: bool,
}

impl<R: Read> GzipIndexer<R> {
    pub(crate) fn new(src: R, span_size: u64) -> Result<Self> {
        Ok(GzipIndexer {
            src,
            input: vec![0u8; INPUT_CHUNK].into_boxed_slice(),
            in_pos: 0,
            in_len: 0,
            src_eof: false,
            inflater: Inflater::new(WINDOW_BITS_AUTO)?,
            total_in: 0,
            total_out: 0,
            last_checkpoint_out: 0,
            span_size,
            extra: Vec::new(),
            next_extra: 0,
            scan: None,
            ring: vec![0u8; WINDOW_SIZE].into_boxed_slice(),
            ring_pos: 0,
            blob: vec![0u8; HEADER_SIZE],
            count: 0,
            hasher: None,
            digests: Vec::new(),
            last_byte: 0,
            finished: false,
        })
    }

    /// Refills the input buffer; false at the end of the source.
    fn refill(&mut self) -> io::Result<bool> {
        if self.in_pos < self.in_len {
            return Ok(true);
        }
        if self.src_eof {
            return Ok(false);
        }
        loop {
            match self.src.read(&mut self.input) {
                Ok(0) => {
                    self.src_eof = true;
                    return Ok(false);
                }
                Ok(n) => {
                    self.in_pos = 0;
                    self.in_len = n;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn record_output(&mut self, out: &[u8]) {
        let tail = if out.len() > WINDOW_SIZE {
            &out[out.len() - WINDOW_SIZE..]
        } else {
            out
        };
        let first = tail.len().min(WINDOW_SIZE - self.ring_pos);
        self.ring[self.ring_pos..self.ring_pos + first].copy_from_slice(&tail[..first]);
        self.ring[..tail.len() - first].copy_from_slice(&tail[first..]);
        self.ring_pos = (self.ring_pos + tail.len()) % WINDOW_SIZE;
    }

    fn add_checkpoint(&mut self, bits: u8) {
        if let Some(h) = self.hasher.take() {
            self.digests.push(SpanDigest(h.finalize().into()));
        }
        let mut h = Sha256::new();
        if bits > 0 {
            h.update([self.last_byte]);
        }
        self.hasher = Some(h);
        let cp = Checkpoint {
            compressed_offset: self.total_in,
            uncompressed_offset: self.total_out,
            bits,
        };
        // Window: the last 32 KiB of output, oldest first, zero-padded at the stream start.
        self.blob.reserve(17 + WINDOW_SIZE);
        let (newer, older) = self.ring.split_at(self.ring_pos);
        let mut window = Vec::with_capacity(WINDOW_SIZE);
        window.extend_from_slice(older);
        window.extend_from_slice(newer);
        push_checkpoint(&mut self.blob, cp, &window);
        self.count += 1;
    }

    /// Whether an extra checkpoint is due at a block boundary at the current output offset
    /// (extras passed without a boundary at their offset are dropped).
    fn extra_due(&mut self) -> bool {
        while self
            .extra
            .get(self.next_extra)
            .is_some_and(|&x| x < self.total_out)
        {
            self.next_extra += 1;
        }
        if self.extra.get(self.next_extra) == Some(&self.total_out) {
            self.next_extra += 1;
            return true;
        }
        false
    }

    /// Scan mode's end: the scan and the blob's compressed size.
    pub(crate) fn into_scan(self) -> Result<(crate::refine::BoundaryScan, u64)> {
        if !self.finished {
            return Err(ZtocError::Gzip("gzip stream not fully consumed".into()));
        }
        let scan = self
            .scan
            .ok_or_else(|| ZtocError::Gzip("not a boundary scan".into()))?;
        Ok((scan, self.total_in))
    }

    fn finish(mut self) -> Result<(CompressionInfo, u64)> {
        if !self.finished {
            return Err(ZtocError::Gzip("gzip stream not fully consumed".into()));
        }
        if self.count == 0 {
            return Err(ZtocError::Gzip("no deflate data in the gzip stream".into()));
        }
        if let Some(h) = self.hasher.take() {
            self.digests.push(SpanDigest(h.finalize().into()));
        }
        blob_header(&mut self.blob, self.count, self.span_size);
        Ok((
            CompressionInfo {
                algorithm: CompressionAlgorithm::Gzip,
                max_span_id: (self.count - 1) as i32,
                span_digests: self.digests,
                checkpoints: self.blob,
            },
            self.total_in,
        ))
    }
}

impl<R: Read> Read for GzipIndexer<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.finished {
                return Ok(0);
            }
            if !self.refill()? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("gzip stream truncated after {} bytes", self.total_in),
                ));
            }
            let input = &self.input[self.in_pos..self.in_len];
            let p = self
                .inflater
                .inflate(input, buf, Flush::Block)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            if p.consumed > 0 {
                let consumed = &self.input[self.in_pos..self.in_pos + p.consumed];
                if let Some(h) = self.hasher.as_mut() {
                    h.update(consumed);
                }
                self.last_byte = consumed[consumed.len() - 1];
            }
            self.in_pos += p.consumed;
            self.total_in += p.consumed as u64;
            self.total_out += p.produced as u64;
            self.record_output(&buf[..p.produced]);
            if p.status == Status::StreamEnd {
                // Concatenated members: continue with the next one if more bytes follow.
                if self.refill()? {
                    self.inflater
                        .reset(WINDOW_BITS_AUTO)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                } else {
                    self.finished = true;
                }
            } else {
                let dt = self.inflater.data_type();
                if dt & 128 != 0 && dt & 64 == 0 {
                    let regular = self.total_out == 0
                        || self.total_out - self.last_checkpoint_out > self.span_size;
                    if regular {
                        self.last_checkpoint_out = self.total_out;
                    }
                    if let Some(scan) = self.scan.as_mut() {
                        scan.boundary(self.total_in, self.total_out, regular);
                    } else if self.extra_due() | regular {
                        self.add_checkpoint((dt & 7) as u8);
                    }
                }
                if p.consumed == 0 && p.produced == 0 && p.status == Status::BufError {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "inflate made no progress",
                    ));
                }
            }
            if p.produced > 0 {
                return Ok(p.produced);
            }
        }
    }
}

/// Passes an uncompressed tar blob through while hashing fixed-size spans.
struct TarSpanHasher<R> {
    src: R,
    span_size: u64,
    pos: u64,
    hasher: Sha256,
    digests: Vec<SpanDigest>,
}

impl<R: Read> TarSpanHasher<R> {
    fn new(src: R, span_size: u64) -> Self {
        TarSpanHasher {
            src,
            span_size,
            pos: 0,
            hasher: Sha256::new(),
            digests: Vec::new(),
        }
    }

    fn finish(mut self) -> Result<(CompressionInfo, u64)> {
        if self.pos == 0 {
            return Err(ZtocError::OutOfRange("empty layer".into()));
        }
        if !self.pos.is_multiple_of(self.span_size) {
            let h = std::mem::take(&mut self.hasher);
            self.digests.push(SpanDigest(h.finalize().into()));
        }
        let checkpoints =
            encode_tar_zinfo(TAR_ZINFO_VERSION, self.span_size as i64, self.pos as i64);
        Ok((
            CompressionInfo {
                algorithm: CompressionAlgorithm::Uncompressed,
                max_span_id: (self.digests.len() - 1) as i32,
                span_digests: self.digests,
                checkpoints,
            },
            self.pos,
        ))
    }
}

impl<R: Read> Read for TarSpanHasher<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.src.read(buf)?;
        let mut data = &buf[..n];
        while !data.is_empty() {
            let room = (self.span_size - self.pos % self.span_size) as usize;
            let take = room.min(data.len());
            self.hasher.update(&data[..take]);
            self.pos += take as u64;
            data = &data[take..];
            if self.pos.is_multiple_of(self.span_size) {
                let h = std::mem::take(&mut self.hasher);
                self.digests.push(SpanDigest(h.finalize().into()));
            }
        }
        Ok(n)
    }
}
