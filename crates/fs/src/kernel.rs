//! The Linux FUSE wire protocol (`include/uapi/linux/fuse.h`), as much of it as a read-only
//! filesystem needs: request decoding and reply encoding, with no I/O. Little-endian only
//! (the kernel uses host order; x86_64 and arm64 Linux are little-endian).

/// Lowest protocol minor version accepted (7.23: 64-byte `fuse_init_out`).
pub const MIN_MINOR: u32 = 23;
/// Protocol version we speak.
pub const KERNEL_VERSION: u32 = 7;
/// Minor version we announce: 7.40 brings `FUSE_NOTIFY_RESEND` (a resumed daemon asks the
/// kernel to queue again the requests a dead daemon took and never answered). Checked against
/// `fuse.h` for 7.32-7.40: no request or reply we use changed size (`fuse_attr.flags`,
/// `fuse_open_out.backing_id` and `fuse_init_out.flags2`/`max_stack_depth` took former
/// padding, written as 0); request extensions (7.38 `total_extlen`) come only with
/// `FUSE_SECURITY_CTX`/`FUSE_CREATE_SUPP_GROUP`, which we never ask for.
pub const KERNEL_MINOR: u32 = 40;
/// Minor version that brought `FUSE_NOTIFY_RESEND` and `FUSE_HAS_RESEND`.
pub const RESEND_MINOR: u32 = 40;
/// Bit 63 of `unique` marks a request the kernel sends again after `FUSE_NOTIFY_RESEND`
/// (`FUSE_UNIQUE_RESEND`). The reply carries the id as received, bit included.
pub const UNIQUE_RESEND: u64 = 1 << 63;

/// Opcodes we handle.
pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const READLINK: u32 = 5;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const READDIRPLUS: u32 = 44;
}

/// `fuse_init_in`/`fuse_init_out` flags.
pub mod init {
    pub const ASYNC_READ: u32 = 1 << 0;
    pub const DO_READDIRPLUS: u32 = 1 << 13;
    pub const READDIRPLUS_AUTO: u32 = 1 << 14;
    pub const PARALLEL_DIROPS: u32 = 1 << 18;
    pub const MAX_PAGES: u32 = 1 << 22;
    pub const CACHE_SYMLINKS: u32 = 1 << 23;
    /// `fuse_init_in` is the 64-byte one carrying `flags2` (7.36); a reply that sets it has
    /// its `flags2` read too.
    pub const INIT_EXT: u32 = 1 << 30;
}

/// `flags2` of `fuse_init_in`/`fuse_init_out`: bits 32..63 of the init flags, shifted down.
pub mod init2 {
    /// `FUSE_HAS_RESEND` (1 << 39): the kernel can resend pending requests, and marks them
    /// with [`super::UNIQUE_RESEND`].
    pub const HAS_RESEND: u32 = 1 << (39 - 32);
}

/// `enum fuse_notify_code`: the `error` field of a notification (`unique` 0).
pub mod notify {
    /// `FUSE_NOTIFY_RESEND`: move every request read but not answered back to the pending
    /// queue, marked with [`super::UNIQUE_RESEND`]. No payload.
    pub const RESEND: i32 = 7;
}

/// `fuse_open_out.open_flags`.
pub const FOPEN_KEEP_CACHE: u32 = 1 << 1;
/// Directory contents may be cached.
pub const FOPEN_CACHE_DIR: u32 = 1 << 3;

mod handshake;
pub use handshake::{notify_resend, InitIn, InitOut, InitWants, Session, UnsupportedVersion};

const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;
/// Size of `fuse_init_out` (7.23 and later).
pub const INIT_OUT: usize = 64;
/// Size of `fuse_init_in` with `FUSE_INIT_EXT` (7.36 and later); before, 16 bytes.
pub const INIT_IN_EXT: usize = 64;
/// Size of `fuse_entry_out`.
pub const ENTRY_OUT: usize = 128;
const DIRENT_HEADER: usize = 24;

/// The fixed part of every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    /// Total request length.
    pub len: u32,
    /// Operation.
    pub opcode: u32,
    /// Request id the reply must carry.
    pub unique: u64,
    /// Inode the request is about.
    pub nodeid: u64,
}

impl InHeader {
    /// Whether the kernel sends this request again after `FUSE_NOTIFY_RESEND` (a daemon took
    /// it before and did not answer).
    pub fn is_resend(&self) -> bool {
        self.unique & UNIQUE_RESEND != 0
    }
}

/// Why a request could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed;

/// A decoded request: header and the argument bytes after it.
#[derive(Debug)]
pub struct Request<'a> {
    /// Header.
    pub header: InHeader,
    /// Arguments.
    pub args: &'a [u8],
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, Malformed> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(Malformed)
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, Malformed> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or(Malformed)
}

impl<'a> Request<'a> {
    /// Decodes one request as read from `/dev/fuse`.
    pub fn parse(buf: &'a [u8]) -> Result<Request<'a>, Malformed> {
        let len = u32_at(buf, 0)?;
        if (len as usize) < IN_HEADER || len as usize > buf.len() {
            return Err(Malformed);
        }
        let header = InHeader {
            len,
            opcode: u32_at(buf, 4)?,
            unique: u64_at(buf, 8)?,
            nodeid: u64_at(buf, 16)?,
        };
        Ok(Request {
            header,
            args: &buf[IN_HEADER..len as usize],
        })
    }

    /// The NUL-terminated name at the start of the arguments (LOOKUP).
    pub fn name(&self) -> Result<&'a [u8], Malformed> {
        cstr(self.args)
    }

    /// `fuse_read_in`: (offset, size).
    pub fn read_args(&self) -> Result<(u64, u32), Malformed> {
        Ok((u64_at(self.args, 8)?, u32_at(self.args, 16)?))
    }

    /// `fuse_getxattr_in.size` and, for GETXATTR, the name after it.
    pub fn xattr_args(&self) -> Result<(u32, &'a [u8]), Malformed> {
        let size = u32_at(self.args, 0)?;
        let rest = self.args.get(8..).ok_or(Malformed)?;
        Ok((size, rest))
    }
}

/// The bytes up to the first NUL.
pub fn cstr(b: &[u8]) -> Result<&[u8], Malformed> {
    let end = b.iter().position(|&c| c == 0).ok_or(Malformed)?;
    Ok(&b[..end])
}

/// Attributes of an inode (`fuse_attr`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    /// Seconds and nanoseconds (used for atime, mtime and ctime).
    pub time: (i64, u32),
    /// File type bits and permissions.
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
}

/// Builds a reply in one buffer (header patched by [`Reply::finish`]).
pub struct Reply {
    buf: Vec<u8>,
}

impl Reply {
    /// A successful reply to request `unique`.
    pub fn ok(unique: u64) -> Reply {
        let mut buf = Vec::with_capacity(OUT_HEADER + ENTRY_OUT);
        buf.extend_from_slice(&[0; 8]);
        buf.extend_from_slice(&unique.to_le_bytes());
        Reply { buf }
    }

    /// The header of a successful reply to `unique` carrying `payload` bytes, for writing
    /// header and payload together without copying the payload.
    pub fn header(unique: u64, payload: usize) -> [u8; OUT_HEADER] {
        let mut h = [0u8; OUT_HEADER];
        h[0..4].copy_from_slice(&((OUT_HEADER + payload) as u32).to_le_bytes());
        h[8..16].copy_from_slice(&unique.to_le_bytes());
        h
    }

    /// An error reply (`errno` positive).
    pub fn error(unique: u64, errno: i32) -> Vec<u8> {
        let mut r = Reply::ok(unique);
        r.buf[4..8].copy_from_slice(&(-errno).to_le_bytes());
        r.finish()
    }

    /// Appends a u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
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

    /// Appends a `fuse_attr`.
    pub fn attr(&mut self, a: &Attr) -> &mut Self {
        let (s, ns) = a.time;
        self.u64(a.ino).u64(a.size).u64(a.blocks);
        for _ in 0..3 {
            self.u64(s as u64);
        }
        for _ in 0..3 {
            self.u32(ns);
        }
        self.u32(a.mode)
            .u32(a.nlink)
            .u32(a.uid)
            .u32(a.gid)
            .u32(a.rdev)
            .u32(4096)
            .u32(0)
    }

    /// Appends a `fuse_entry_out` valid for `ttl`.
    pub fn entry(&mut self, a: &Attr, ttl: std::time::Duration) -> &mut Self {
        let (s, ns) = (ttl.as_secs(), ttl.subsec_nanos());
        self.u64(a.ino).u64(0).u64(s).u64(s).u32(ns).u32(ns).attr(a)
    }

    /// Appends a `fuse_attr_out` valid for `ttl`.
    pub fn attr_out(&mut self, a: &Attr, ttl: std::time::Duration) -> &mut Self {
        self.u64(ttl.as_secs())
            .u32(ttl.subsec_nanos())
            .u32(0)
            .attr(a)
    }

    /// Appends a `fuse_dirent` if it fits in `max` payload bytes; false if it does not.
    pub fn dirent(&mut self, max: usize, ino: u64, off: u64, typ: u32, name: &[u8]) -> bool {
        let size = (DIRENT_HEADER + name.len()).next_multiple_of(8);
        if self.payload_len() + size > max {
            return false;
        }
        self.u64(ino)
            .u64(off)
            .u32(name.len() as u32)
            .u32(typ)
            .bytes(name);
        let pad = size - DIRENT_HEADER - name.len();
        self.buf.extend(std::iter::repeat_n(0, pad));
        true
    }

    /// Appends a `fuse_direntplus` if it fits in `max` payload bytes; false if it does not.
    pub fn direntplus(
        &mut self,
        max: usize,
        a: &Attr,
        off: u64,
        name: &[u8],
        ttl: std::time::Duration,
    ) -> bool {
        let size = ENTRY_OUT + (DIRENT_HEADER + name.len()).next_multiple_of(8);
        if self.payload_len() + size > max {
            return false;
        }
        self.entry(a, ttl);
        let typ = (a.mode & libc::S_IFMT) >> 12;
        self.dirent(usize::MAX, a.ino, off, typ, name)
    }

    /// The finished reply, length patched in.
    pub fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_le_bytes());
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(opcode: u32, unique: u64, nodeid: u64, args: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&((IN_HEADER + args.len()) as u32).to_le_bytes());
        b.extend_from_slice(&opcode.to_le_bytes());
        b.extend_from_slice(&unique.to_le_bytes());
        b.extend_from_slice(&nodeid.to_le_bytes());
        b.extend_from_slice(&[0; 16]);
        b.extend_from_slice(args);
        b
    }

    #[test]
    fn parses_lookup_and_read() {
        let b = request(op::LOOKUP, 7, 1, b"etc\0");
        let r = Request::parse(&b).unwrap();
        assert_eq!(r.header.opcode, op::LOOKUP);
        assert_eq!(r.header.unique, 7);
        assert_eq!(r.name().unwrap(), b"etc");

        let mut args = Vec::new();
        args.extend_from_slice(&0u64.to_le_bytes());
        args.extend_from_slice(&4096u64.to_le_bytes());
        args.extend_from_slice(&131072u32.to_le_bytes());
        args.extend_from_slice(&[0; 20]);
        let b = request(op::READ, 8, 5, &args);
        assert_eq!(
            Request::parse(&b).unwrap().read_args().unwrap(),
            (4096, 131072)
        );
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(Request::parse(&[1, 2, 3]).unwrap_err(), Malformed);
        let mut b = request(op::LOOKUP, 1, 1, b"x\0");
        b[0] = 200; // longer than the buffer
        assert!(Request::parse(&b).is_err());
        let b = request(op::LOOKUP, 1, 1, b"no-nul");
        assert!(Request::parse(&b).unwrap().name().is_err());
        let b = request(op::READ, 1, 1, &[0; 4]);
        assert!(Request::parse(&b).unwrap().read_args().is_err());
    }

    #[test]
    fn reply_layouts_match_the_kernel_structs() {
        let a = Attr {
            ino: 2,
            mode: libc::S_IFREG | 0o644,
            ..Default::default()
        };
        let mut r = Reply::ok(9);
        r.entry(&a, std::time::Duration::from_secs(1));
        let b = r.finish();
        assert_eq!(b.len(), OUT_HEADER + ENTRY_OUT);
        assert_eq!(u32_at(&b, 0).unwrap() as usize, b.len());
        assert_eq!(u64_at(&b, 8).unwrap(), 9);

        let mut r = Reply::ok(1);
        r.attr_out(&a, std::time::Duration::ZERO);
        assert_eq!(r.payload_len(), 104);

        let mut r = Reply::ok(4);
        r.bytes(b"abc");
        assert_eq!(
            [&Reply::header(4, 3)[..], b"abc"].concat(),
            r.finish(),
            "header + payload == a built reply"
        );

        let e = Reply::error(3, libc::ENOENT);
        assert_eq!(e.len(), OUT_HEADER);
        assert_eq!(
            i32::from_le_bytes(e[4..8].try_into().unwrap()),
            -libc::ENOENT
        );
    }

    #[test]
    fn dirents_are_padded_and_bounded() {
        let mut r = Reply::ok(1);
        assert!(r.dirent(64, 5, 1, 8, b"abc"));
        assert_eq!(r.payload_len(), 32);
        assert!(!r.dirent(64, 6, 2, 8, b"a-name-too-long-for-what-is-left"));
        assert_eq!(r.payload_len(), 32);
        let a = Attr {
            ino: 3,
            mode: libc::S_IFDIR | 0o755,
            ..Default::default()
        };
        assert!(r.direntplus(4096, &a, 2, b"d", std::time::Duration::ZERO));
        assert_eq!(r.payload_len(), 32 + ENTRY_OUT + 32);
    }
}
