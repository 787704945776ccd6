//! Encoding replies: a [`Reply`] is a `fuse_out_header` followed by the `as_bytes()` of the
//! reply structs, sent whole through a [`ReplySink`] (the `/dev/fuse` channel in production,
//! a buffer in tests). [`DirBuf`] packs `fuse_dirent`/`fuse_direntplus` records into the
//! caller's size.

use std::io::IoSlice;

use zerocopy::{Immutable, IntoBytes};

use super::abi::{fuse_dirent, fuse_dirent_size, fuse_direntplus, fuse_entry_out, fuse_out_header};

/// Where replies go. One call is one message: the kernel takes a reply in a single write.
pub trait ReplySink: Send + Sync {
    /// Sends the concatenation of `parts` as one reply or notification.
    fn send(&self, parts: &[IoSlice<'_>]);
}

const OUT_HEADER: usize = size_of::<fuse_out_header>();

/// The header of a reply to `unique` with `error` (0 or a negated errno) and `payload` bytes.
pub fn out_header(unique: u64, error: i32, payload: usize) -> fuse_out_header {
    fuse_out_header {
        len: (OUT_HEADER + payload) as u32,
        error,
        unique,
    }
}

/// A reply being built in one buffer (header patched by [`Reply::finish`]).
#[derive(Debug)]
pub struct Reply {
    buf: Vec<u8>,
}

impl Reply {
    /// A successful reply to request `unique`.
    pub fn ok(unique: u64) -> Reply {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(out_header(unique, 0, 0).as_bytes());
        Reply { buf }
    }

    /// A successful reply carrying one struct.
    pub fn with<T: IntoBytes + Immutable>(unique: u64, v: &T) -> Reply {
        let mut r = Reply::ok(unique);
        r.push(v);
        r
    }

    /// An error reply (`errno` positive), finished.
    pub fn error(unique: u64, errno: i32) -> Vec<u8> {
        out_header(unique, -errno, 0).as_bytes().to_vec()
    }

    /// Appends a wire struct.
    pub fn push<T: IntoBytes + Immutable>(&mut self, v: &T) -> &mut Self {
        self.buf.extend_from_slice(v.as_bytes());
        self
    }

    /// Appends raw bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }

    /// Payload length so far (without the header).
    pub fn payload_len(&self) -> usize {
        self.buf.len() - OUT_HEADER
    }

    /// The finished reply, length patched in.
    pub fn finish(mut self) -> Vec<u8> {
        let len = (self.buf.len() as u32).to_ne_bytes();
        self.buf[..4].copy_from_slice(&len);
        self.buf
    }
}

/// The payload of a READDIR/READDIRPLUS reply, bounded by the caller's `size`.
#[derive(Debug)]
pub struct DirBuf {
    reply: Reply,
    max: usize,
}

impl DirBuf {
    /// An empty listing for request `unique` of at most `max` payload bytes.
    pub fn new(unique: u64, max: usize) -> DirBuf {
        DirBuf {
            reply: Reply::ok(unique),
            max,
        }
    }

    fn fits(&self, size: usize) -> bool {
        self.reply.payload_len() + size <= self.max
    }

    fn name(&mut self, name: &[u8]) {
        let pad = fuse_dirent_size(name.len()) - size_of::<fuse_dirent>() - name.len();
        self.reply.bytes(name).bytes(&[0u8; 8][..pad]);
    }

    /// Appends a `fuse_dirent` if it fits; false if it does not (nothing appended).
    pub fn dirent(&mut self, d: fuse_dirent, name: &[u8]) -> bool {
        if !self.fits(fuse_dirent_size(name.len())) {
            return false;
        }
        let d = fuse_dirent {
            namelen: name.len() as u32,
            ..d
        };
        self.reply.push(&d);
        self.name(name);
        true
    }

    /// Appends a `fuse_direntplus` if it fits; false if it does not (nothing appended).
    pub fn direntplus(&mut self, entry_out: fuse_entry_out, d: fuse_dirent, name: &[u8]) -> bool {
        let size = size_of::<fuse_entry_out>() + fuse_dirent_size(name.len());
        if !self.fits(size) {
            return false;
        }
        let dirent = fuse_dirent {
            namelen: name.len() as u32,
            ..d
        };
        self.reply.push(&fuse_direntplus { entry_out, dirent });
        self.name(name);
        true
    }

    /// Payload bytes so far.
    pub fn payload_len(&self) -> usize {
        self.reply.payload_len()
    }

    /// The finished reply.
    pub fn finish(self) -> Vec<u8> {
        self.reply.finish()
    }
}
