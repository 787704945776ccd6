//! The Linux FUSE wire protocol (`include/uapi/linux/fuse.h`, 7.40), as much of it as a
//! read-only filesystem needs: the wire structs ([`abi`]), request decoding ([`Request`],
//! [`Operation`]), reply encoding ([`Reply`], [`DirBuf`]) behind a [`ReplySink`], and the INIT
//! handshake. No I/O here. Host byte order, as the kernel uses (x86_64 and arm64 Linux are
//! little-endian).
//!
//! # Why not a FUSE library
//!
//! A daemon restart must not break running containers: the fd holder keeps each mount's
//! `/dev/fuse` descriptor, and the next daemon *resumes* the live, already initialised
//! connection (no second INIT: the kernel sends one per connection) and first asks the
//! kernel with `FUSE_NOTIFY_RESEND` to queue again what the dead daemon took.
//!
//! - `fuser` cannot do that: a session is created by mounting (or from a `/dev/fuse` fd it then
//!   waits on for INIT), and its request loop refuses every request until it has seen INIT
//!   itself, so a taken-over connection would answer everything with an error. It also keeps
//!   the negotiated state private and has no resend notification.
//! - `fuse-backend-rs` comes closer: its `FuseSession` can be built around an existing
//!   `/dev/fuse` file, and its `Server` dispatches requests read from a channel. What it would
//!   give us: the struct definitions and a tested dispatcher. What it would not: its server
//!   also expects to negotiate INIT before serving (a resumed session would have to inject a
//!   fake INIT to set the protocol minor and flags the kernel really agreed, with no check
//!   that they match), it has no `FUSE_NOTIFY_RESEND` or resend-bit handling, and its
//!   `FileSystem` trait is synchronous per request, so a READ waiting on the network would
//!   hold a worker thread instead of a tokio task; it also pulls in its own vhost-user and
//!   virtio-fs layers we do not need. For about 20 opcodes of a read-only filesystem, owning
//!   the protocol costs less than working around those.
//!
//! What owning it costs is correctness of the wire format, so every struct is declared as in
//! `fuse.h` with compile-time size and offset checks ([`abi`]), decoding never indexes by
//! hand, and the dispatcher has table tests per opcode and a fuzz target
//! (`fuzz/fuzz_targets/fuse_dispatch.rs`).

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
    /// `FUSE_PASSTHROUGH` (1 << 37): opens may be answered with a backing file the kernel
    /// reads directly ([`super::FOPEN_PASSTHROUGH`]). Granted only with a `max_stack_depth`
    /// of 1 or 2 in the reply and no `FUSE_WRITEBACK_CACHE`.
    pub const PASSTHROUGH: u32 = 1 << (37 - 32);
}

/// Minor version that brought passthrough (`FUSE_PASSTHROUGH`, `backing_id`,
/// `max_stack_depth`).
pub const PASSTHROUGH_MINOR: u32 = 40;

/// `max_stack_depth` we announce with passthrough. The kernel makes it the stacking depth of
/// our FUSE superblock and refuses backing files whose filesystem is that deep or deeper
/// (`ELOOP`). Our mounts are overlayfs lower layers, and overlayfs refuses lower layers whose
/// depth + 1 exceeds `FILESYSTEM_MAX_STACK_DEPTH` (2): 1 keeps overlayfs mountable on top and
/// still allows backing files on any plain filesystem (depth 0: ext4, xfs, tmpfs). A daemon
/// root on overlayfs itself gets `ELOOP`, and so normal reads.
pub const PASSTHROUGH_STACK_DEPTH: u32 = 1;

/// `enum fuse_notify_code`: the `error` field of a notification (`unique` 0).
pub mod notify {
    /// `FUSE_NOTIFY_RESEND`: move every request read but not answered back to the pending
    /// queue, marked with [`super::UNIQUE_RESEND`]. No payload.
    pub const RESEND: i32 = 7;
}

/// `fuse_open_out.open_flags`.
pub const FOPEN_KEEP_CACHE: u32 = 1 << 1;
/// `fuse_getattr_in.getattr_flags`: `fh` is an open file handle.
pub const FUSE_GETATTR_FH: u32 = 1 << 0;
/// Directory contents may be cached.
pub const FOPEN_CACHE_DIR: u32 = 1 << 3;
/// No FLUSH on close (a read-only filesystem has nothing to flush). Without it every close
/// waits for the daemon: a process closing a file while no daemon serves (during a restart,
/// or the exec of the next daemon itself closing inherited descriptors) would block.
pub const FOPEN_NOFLUSH: u32 = 1 << 5;
/// Reads (and mmap) of this open go to the backing file `backing_id` of `fuse_open_out`.
/// The kernel refuses (the open fails with EIO) any other flag with it except
/// `FOPEN_DIRECT_IO`, `FOPEN_PARALLEL_DIRECT_WRITES`, `FOPEN_NOFLUSH`: notably not
/// [`FOPEN_KEEP_CACHE`]. It also fails an open whose mode differs from the inode's other
/// open files (a cached open while the inode has passthrough opens, or the reverse), or a
/// second backing file for an inode that has one.
pub const FOPEN_PASSTHROUGH: u32 = 1 << 7;

pub mod abi;
pub mod backing;
pub mod bdi;
mod handshake;
mod reply;
mod request;

pub use handshake::{negotiate, notify_resend, InitWants, Session, UnsupportedVersion};
pub use reply::{out_header, DirBuf, Reply, ReplySink};
pub use request::{cstr, Malformed, Operation, Request};

/// Building requests as the kernel writes them (tests here and in the dispatcher's).
#[cfg(test)]
pub(crate) mod test_util {
    use super::abi::fuse_in_header;
    use zerocopy::IntoBytes;

    /// A request: `fuse_in_header` (uid/gid/pid 0) followed by `args`.
    pub(crate) fn request(opcode: u32, unique: u64, nodeid: u64, args: &[u8]) -> Vec<u8> {
        let h = fuse_in_header {
            len: (size_of::<fuse_in_header>() + args.len()) as u32,
            opcode,
            unique,
            nodeid,
            ..Default::default()
        };
        [h.as_bytes(), args].concat()
    }
}

#[cfg(test)]
mod tests {
    use super::abi::*;
    use super::test_util::request;
    use super::*;
    use std::mem::offset_of;
    use zerocopy::{FromBytes, IntoBytes};

    #[test]
    fn parses_lookup_read_and_xattr_names() {
        let b = request(op::LOOKUP, 7, 1, b"etc\0");
        let r = Request::parse(&b).unwrap();
        assert_eq!(
            (r.header.opcode, r.header.unique, r.header.nodeid),
            (op::LOOKUP, 7, 1)
        );
        assert!(matches!(r.op, Operation::Lookup { name: b"etc" }));

        let arg = fuse_read_in {
            offset: 4096,
            size: 131072,
            ..Default::default()
        };
        let b = request(op::READ, 8, 5, arg.as_bytes());
        assert!(matches!(Request::parse(&b).unwrap().op, Operation::Read { arg: a } if a == arg));

        let x = fuse_getxattr_in {
            size: 0,
            padding: 0,
        };
        let b = request(op::GETXATTR, 9, 5, &[x.as_bytes(), b"user.a\0"].concat());
        assert!(matches!(
            Request::parse(&b).unwrap().op,
            Operation::Getxattr { arg, name: b"user.a" } if arg.size == 0
        ));
        let b = request(4242, 10, 1, &[]);
        assert!(matches!(
            Request::parse(&b).unwrap().op,
            Operation::Unknown { opcode: 4242 }
        ));
    }

    #[test]
    fn batch_forget_reads_its_entries() {
        let mut args = fuse_batch_forget_in { count: 2, dummy: 0 }
            .as_bytes()
            .to_vec();
        for (n, l) in [(5u64, 1u64), (6, 3)] {
            args.extend_from_slice(
                fuse_forget_one {
                    nodeid: n,
                    nlookup: l,
                }
                .as_bytes(),
            );
        }
        let b = request(op::BATCH_FORGET, 0, 0, &args);
        let r = Request::parse(&b).unwrap();
        let Operation::BatchForget { forgets, .. } = &r.op else {
            panic!("{:?}", r.op)
        };
        assert_eq!(forgets.iter().map(|f| f.nodeid).collect::<Vec<_>>(), [5, 6]);
        assert!(!r.op.expects_reply());
        // count larger than what follows
        args[0] = 3;
        assert!(Request::parse(&request(op::BATCH_FORGET, 0, 0, &args)).is_err());
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(Request::parse(&[1, 2, 3]).unwrap_err(), Malformed);
        let mut b = request(op::LOOKUP, 1, 1, b"x\0");
        b[0] = 200; // longer than the buffer
        assert!(Request::parse(&b).is_err());
        assert!(Request::parse(&request(op::LOOKUP, 1, 1, b"no-nul")).is_err());
        assert!(Request::parse(&request(op::READ, 1, 1, &[0; 4])).is_err());
        assert!(Request::parse(&request(op::GETXATTR, 1, 1, &[0; 8])).is_err());
        // Extensions longer than the request.
        let mut b = request(op::GETATTR, 1, 1, &[0; 16]);
        let ext = offset_of!(fuse_in_header, total_extlen);
        b[ext..ext + 2].copy_from_slice(&3u16.to_ne_bytes());
        assert!(Request::parse(&b).is_err());
        // Extensions that fit are cut off the arguments.
        let mut b = request(op::LOOKUP, 1, 1, b"abc\0\0\0\0\0ext\0\0\0\0\0");
        b[ext..ext + 2].copy_from_slice(&1u16.to_ne_bytes());
        assert!(matches!(
            Request::parse(&b).unwrap().op,
            Operation::Lookup { name: b"abc" }
        ));
    }

    #[test]
    fn replies_are_header_then_structs() {
        let entry = fuse_entry_out {
            nodeid: 2,
            ..Default::default()
        };
        let b = Reply::with(9, &entry).finish();
        assert_eq!(b.len(), 16 + 128);
        let (h, rest) = fuse_out_header::read_from_prefix(&b).unwrap();
        assert_eq!((h.len as usize, h.error, h.unique), (b.len(), 0, 9));
        assert_eq!(fuse_entry_out::read_from_bytes(rest).unwrap(), entry);

        let e = Reply::error(3, libc::ENOENT);
        assert_eq!(
            fuse_out_header::read_from_bytes(&e).unwrap(),
            out_header(3, -libc::ENOENT, 0)
        );
    }

    #[test]
    fn dirents_are_padded_and_bounded() {
        let mut d = DirBuf::new(1, 64);
        let de = fuse_dirent {
            ino: 5,
            off: 1,
            namelen: 0,
            r#type: 8,
        };
        assert!(d.dirent(de, b"abc"));
        assert_eq!(d.payload_len(), 32);
        assert!(!d.dirent(de, b"a-name-too-long-for-what-is-left"));
        assert_eq!(d.payload_len(), 32);
        let mut d = DirBuf::new(1, 4096);
        assert!(d.direntplus(fuse_entry_out::default(), de, b"d"));
        assert_eq!(d.payload_len(), 128 + 32);
        let b = d.finish();
        let (p, _) = fuse_direntplus::read_from_prefix(&b[16..]).unwrap();
        assert_eq!((p.dirent.ino, p.dirent.namelen), (5, 1));
        assert_eq!(&b[16 + 152..], b"d\0\0\0\0\0\0\0");
    }
}
