//! A streaming tar walker that reports each entry's header and the offset of its data in the
//! uncompressed stream.
//!
//! It follows the behaviour of Go's `archive/tar` reader, which upstream's zTOC builder uses, so
//! that names, sizes, PAX records and the archive end position agree byte for byte: V7, USTAR
//! (with prefix), GNU (long names and links) and PAX (`x`) headers; the PAX keys `path`,
//! `linkpath`, `uname`, `gname`, `uid`, `gid`, `mtime` and `size` override header fields; an
//! empty PAX value keeps the header's value. Types upstream cannot index (global PAX headers,
//! GNU sparse files, unknown type flags) are reported as typed errors.

use std::collections::BTreeMap;
use std::io::{self, Read};

mod header;

use header::{cstr, merge_pax, parse_header, parse_pax};

/// Tar block size.
pub const BLOCK_SIZE: u64 = 512;
/// Largest PAX or GNU long-name payload accepted (same cap as Go's reader).
const MAX_SPECIAL_FILE: u64 = 1 << 20;

/// Error while walking a tar stream.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    /// The stream ended inside a header or an entry's data.
    #[error("tar stream truncated at offset {offset}")]
    Truncated {
        /// Uncompressed offset where data was missing.
        offset: u64,
    },
    /// A header block is invalid (checksum, numeric field, PAX record).
    #[error("invalid tar header at offset {offset}: {reason}")]
    InvalidHeader {
        /// Offset of the header block.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// An entry type that cannot be indexed.
    #[error("unsupported tar entry type {typeflag:?} ({name}) at offset {offset}")]
    UnsupportedType {
        /// The raw type flag.
        typeflag: char,
        /// Entry name, lossily decoded.
        name: String,
        /// Offset of the header block.
        offset: u64,
    },
    /// Reading the underlying stream failed.
    #[error("reading tar stream: {0}")]
    Io(#[from] io::Error),
}

/// Kind of a tar entry, as named in the zTOC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// Regular file (`reg`).
    Regular,
    /// Directory (`dir`).
    Directory,
    /// Symbolic link (`symlink`).
    Symlink,
    /// Hard link to an earlier entry (`hardlink`).
    Hardlink,
    /// Character device (`char`).
    Char,
    /// Block device (`block`).
    Block,
    /// Named pipe (`fifo`).
    Fifo,
}

impl EntryKind {
    /// The zTOC type string.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Regular => "reg",
            EntryKind::Directory => "dir",
            EntryKind::Symlink => "symlink",
            EntryKind::Hardlink => "hardlink",
            EntryKind::Char => "char",
            EntryKind::Block => "block",
            EntryKind::Fifo => "fifo",
        }
    }

    /// Parses a zTOC type string.
    pub fn from_name(s: &[u8]) -> Option<Self> {
        Some(match s {
            b"reg" => EntryKind::Regular,
            b"dir" => EntryKind::Directory,
            b"symlink" => EntryKind::Symlink,
            b"hardlink" => EntryKind::Hardlink,
            b"char" => EntryKind::Char,
            b"block" => EntryKind::Block,
            b"fifo" => EntryKind::Fifo,
            _ => return None,
        })
    }

    fn from_typeflag(flag: u8) -> Option<Self> {
        Some(match flag {
            b'0' => EntryKind::Regular,
            b'1' => EntryKind::Hardlink,
            b'2' => EntryKind::Symlink,
            b'3' => EntryKind::Char,
            b'4' => EntryKind::Block,
            b'5' => EntryKind::Directory,
            b'6' => EntryKind::Fifo,
            _ => return None,
        })
    }
}

/// One tar entry as the walker reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarEntry {
    /// Full name after USTAR prefix, GNU long name and PAX `path` resolution.
    pub name: Vec<u8>,
    /// Entry kind.
    pub kind: EntryKind,
    /// Offset of the entry's data in the uncompressed stream.
    pub data_offset: u64,
    /// Size from the header (PAX `size` wins).
    pub size: u64,
    /// Link target.
    pub linkname: Vec<u8>,
    /// Raw mode field.
    pub mode: i64,
    /// Owner id.
    pub uid: i64,
    /// Group id.
    pub gid: i64,
    /// Owner name.
    pub uname: Vec<u8>,
    /// Group name.
    pub gname: Vec<u8>,
    /// Modification time: seconds since the epoch and nanoseconds.
    pub mtime: (i64, u32),
    /// Device major number.
    pub devmajor: i64,
    /// Device minor number.
    pub devminor: i64,
    /// Every PAX record of the entry, sorted by key.
    pub pax: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// Walks a tar stream, tracking the position in the uncompressed bytes.
pub struct TarWalker<R> {
    r: R,
    pos: u64,
    /// Unread data of the previous entry (must be present).
    skip: u64,
    /// Padding after it (Go's reader accepts a stream that ends right before it).
    skip_pad: u64,
    done: bool,
}

impl<R: Read> TarWalker<R> {
    /// Starts walking `r` at offset 0.
    pub fn new(r: R) -> Self {
        TarWalker {
            r,
            pos: 0,
            skip: 0,
            skip_pad: 0,
            done: false,
        }
    }

    /// Where the reader stopped: after the end-of-archive blocks once [`Self::next_entry`]
    /// returned `None` (upstream's `uncompressed_archive_size`).
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Gives back the underlying reader.
    pub fn into_inner(self) -> R {
        self.r
    }

    /// Reads data of the entry last returned by [`Self::next_entry`]; 0 at its end. Data not
    /// read is skipped by the next call to [`Self::next_entry`].
    pub fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, TarError> {
        if self.skip == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min(self.skip.min(usize::MAX as u64) as usize);
        loop {
            match self.r.read(&mut buf[..want]) {
                Ok(0) => return Err(TarError::Truncated { offset: self.pos }),
                Ok(n) => {
                    self.pos += n as u64;
                    self.skip -= n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Reads up to one block; returns how many bytes were read (0 or 512, or an error).
    fn read_block(&mut self, blk: &mut [u8; 512]) -> Result<usize, TarError> {
        let mut n = 0;
        while n < blk.len() {
            match self.r.read(&mut blk[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.pos += n as u64;
        if n != 0 && n != blk.len() {
            return Err(TarError::Truncated { offset: self.pos });
        }
        Ok(n)
    }

    /// Reads until `buf` is full or the stream ends; returns the bytes read.
    fn read_upto(&mut self, buf: &mut [u8]) -> Result<usize, TarError> {
        let mut n = 0;
        while n < buf.len() {
            match self.r.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.pos += n as u64;
        Ok(n)
    }

    fn discard(&mut self, mut n: u64) -> Result<(), TarError> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let want = n.min(buf.len() as u64) as usize;
            let k = match self.r.read(&mut buf[..want]) {
                Ok(0) => return Err(TarError::Truncated { offset: self.pos }),
                Ok(k) => k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            self.pos += k as u64;
            n -= k as u64;
        }
        Ok(())
    }

    /// Reads a PAX or GNU long-name payload of `size` bytes plus padding.
    fn read_special(&mut self, size: u64, hdr_off: u64) -> Result<Vec<u8>, TarError> {
        if size > MAX_SPECIAL_FILE {
            return Err(invalid(hdr_off, "special header larger than 1 MiB"));
        }
        // Grown as bytes arrive, not sized from the header: a header claiming 1 MiB in a
        // truncated stream costs what the stream holds.
        let mut data = Vec::new();
        let mut chunk = [0u8; 8192];
        while (data.len() as u64) < size {
            let want = (size - data.len() as u64).min(chunk.len() as u64) as usize;
            match self.r.read(&mut chunk[..want]) {
                Ok(0) => return Err(TarError::Truncated { offset: self.pos }),
                Ok(k) => {
                    data.extend_from_slice(&chunk[..k]);
                    self.pos += k as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.discard(pad(size))?;
        Ok(data)
    }

    /// Returns the next entry, or `None` at the end of the archive.
    pub fn next_entry(&mut self) -> Result<Option<TarEntry>, TarError> {
        if self.done {
            return Ok(None);
        }
        let mut pax: Option<BTreeMap<Vec<u8>, Vec<u8>>> = None;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        loop {
            let skip = std::mem::take(&mut self.skip);
            self.discard(skip)?;
            let padding = std::mem::take(&mut self.skip_pad);
            if padding > 0 {
                let mut blk = [0u8; 512];
                let got = self.read_upto(&mut blk[..padding as usize])?;
                if got == 0 {
                    // Like Go's archive/tar: a stream ending right after the data is complete.
                    self.done = true;
                    return Ok(None);
                }
                if got as u64 != padding {
                    return Err(TarError::Truncated { offset: self.pos });
                }
            }
            let hdr_off = self.pos;
            let mut blk = [0u8; 512];
            if self.read_block(&mut blk)? == 0 {
                self.done = true;
                return Ok(None);
            }
            if blk.iter().all(|&b| b == 0) {
                let second = self.read_block(&mut blk)?;
                if second == 0 || blk.iter().all(|&b| b == 0) {
                    self.done = true;
                    return Ok(None);
                }
                return Err(invalid(hdr_off, "zero block followed by a non-zero block"));
            }
            let raw = parse_header(&blk, hdr_off)?;
            let typeflag = blk[156];
            match typeflag {
                b'x' => {
                    let data = self.read_special(nonneg(raw.size, hdr_off)?, hdr_off)?;
                    pax = Some(parse_pax(&data, hdr_off)?);
                    continue;
                }
                b'L' | b'K' => {
                    let data = self.read_special(nonneg(raw.size, hdr_off)?, hdr_off)?;
                    let s = cstr(&data).to_vec();
                    if typeflag == b'L' {
                        long_name = Some(s);
                    } else {
                        long_link = Some(s);
                    }
                    continue;
                }
                _ => {}
            }
            let mut e = raw;
            let records = pax.take().unwrap_or_default();
            merge_pax(&mut e, &records, hdr_off)?;
            if let Some(n) = long_name.take() {
                e.name = n;
            }
            if let Some(l) = long_link.take() {
                e.linkname = l;
            }
            let flag = if typeflag == 0 {
                if e.name.ends_with(b"/") {
                    b'5'
                } else {
                    b'0'
                }
            } else {
                typeflag
            };
            let unsupported = || TarError::UnsupportedType {
                typeflag: flag as char,
                name: String::from_utf8_lossy(&e.name).into_owned(),
                offset: hdr_off,
            };
            let kind = EntryKind::from_typeflag(flag).ok_or_else(unsupported)?;
            if records.keys().any(|k| k.starts_with(b"GNU.sparse.")) {
                return Err(unsupported());
            }
            let size = nonneg(e.size, hdr_off)?;
            let data_len = match kind {
                EntryKind::Regular => size,
                _ => 0,
            };
            self.skip = data_len;
            self.skip_pad = pad(data_len);
            return Ok(Some(TarEntry {
                name: e.name,
                kind,
                data_offset: self.pos,
                size,
                linkname: e.linkname,
                mode: e.mode,
                uid: e.uid,
                gid: e.gid,
                uname: e.uname,
                gname: e.gname,
                mtime: e.mtime,
                devmajor: e.devmajor,
                devminor: e.devminor,
                pax: records,
            }));
        }
    }
}

/// Padding after `n` bytes of data up to the next block.
pub fn pad(n: u64) -> u64 {
    (BLOCK_SIZE - n % BLOCK_SIZE) % BLOCK_SIZE
}

pub(crate) fn invalid(offset: u64, reason: impl Into<String>) -> TarError {
    TarError::InvalidHeader {
        offset,
        reason: reason.into(),
    }
}

fn nonneg(v: i64, off: u64) -> Result<u64, TarError> {
    u64::try_from(v).map_err(|_| invalid(off, "negative size"))
}

#[cfg(test)]
mod tests;
