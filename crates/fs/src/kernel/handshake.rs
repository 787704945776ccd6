//! The INIT handshake and what a session keeps of it: typed `fuse_init_in`/`fuse_init_out`,
//! version and flag negotiation, and the resend notification a resuming daemon sends. Kept
//! apart from request decoding because it is what a daemon restart depends on.

use super::{init, init2, notify, u32_at, Malformed, Reply, Request};
use super::{INIT_OUT, KERNEL_MINOR, KERNEL_VERSION, MIN_MINOR, OUT_HEADER, RESEND_MINOR};

impl<'a> Request<'a> {
    /// `fuse_init_in`; `flags2` only when the kernel set `FUSE_INIT_EXT` (0 otherwise).
    pub fn init_args(&self) -> Result<InitIn, Malformed> {
        let flags = u32_at(self.args, 12)?;
        let flags2 = if flags & init::INIT_EXT != 0 {
            u32_at(self.args, 16)?
        } else {
            0
        };
        Ok(InitIn {
            major: u32_at(self.args, 0)?,
            minor: u32_at(self.args, 4)?,
            max_readahead: u32_at(self.args, 8)?,
            flags,
            flags2,
        })
    }
}

/// `struct fuse_init_in` (the fields before `unused[11]`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InitIn {
    /// Protocol major version of the kernel.
    pub major: u32,
    /// Highest protocol minor version the kernel speaks.
    pub minor: u32,
    /// Largest readahead the kernel will do.
    pub max_readahead: u32,
    /// What the kernel offers (bits 0..31).
    pub flags: u32,
    /// What the kernel offers (bits 32..63; 0 without `FUSE_INIT_EXT`).
    pub flags2: u32,
}

/// What the server wants from a session (the parts of `fuse_init_out` it chooses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitWants {
    /// Init flags asked for; only those the kernel offers are kept.
    pub flags: u32,
    /// `max_background`.
    pub max_background: u16,
    /// `congestion_threshold`.
    pub congestion_threshold: u16,
    /// `max_write`.
    pub max_write: u32,
    /// `max_pages`.
    pub max_pages: u16,
}

/// `struct fuse_init_out`, field by field (64 bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InitOut {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u32,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub max_write: u32,
    pub time_gran: u32,
    pub max_pages: u16,
    pub map_alignment: u16,
    /// 7.36+, read by the kernel only if `flags` has `FUSE_INIT_EXT`.
    pub flags2: u32,
    /// 7.40+, used only with `FUSE_PASSTHROUGH` (never asked for: 0).
    pub max_stack_depth: u32,
}

/// Byte offsets of `fuse_init_out` fields, as in `fuse.h` (the tests check the encoding).
#[cfg_attr(not(test), allow(dead_code))]
mod init_out_at {
    pub const FLAGS: usize = 12;
    pub const MAX_WRITE: usize = 20;
    pub const MAX_PAGES: usize = 28;
    pub const FLAGS2: usize = 32;
    pub const MAX_STACK_DEPTH: usize = 36;
    /// `unused[6]` runs from here to the end.
    pub const UNUSED: usize = 40;
}
const _: () = assert!(init_out_at::UNUSED + 6 * 4 == INIT_OUT);

impl InitOut {
    /// Appends the 64-byte struct to `r`.
    pub fn encode(&self, r: &mut Reply) {
        let start = r.payload_len();
        r.u32(self.major)
            .u32(self.minor)
            .u32(self.max_readahead)
            .u32(self.flags)
            .bytes(&self.max_background.to_le_bytes())
            .bytes(&self.congestion_threshold.to_le_bytes())
            .u32(self.max_write)
            .u32(self.time_gran)
            .bytes(&self.max_pages.to_le_bytes())
            .bytes(&self.map_alignment.to_le_bytes())
            .u32(self.flags2)
            .u32(self.max_stack_depth)
            .bytes(&[0; INIT_OUT - init_out_at::UNUSED]);
        debug_assert_eq!(r.payload_len() - start, INIT_OUT);
    }
}

/// The protocol state of an initialised connection: what a later daemon must know to serve
/// it without an INIT of its own (kept with the fd holder).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Session {
    /// Negotiated protocol minor version.
    pub minor: u32,
    /// Whether the kernel offered `FUSE_HAS_RESEND`, so a resuming daemon can get back the
    /// requests a dead one took.
    pub resend: bool,
}

/// Why an INIT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnsupportedVersion {
    /// Kernel major.
    pub major: u32,
    /// Kernel minor.
    pub minor: u32,
}

impl InitIn {
    /// Answers the kernel's INIT: the smaller of both minors, the wanted flags the kernel
    /// offers, `FUSE_INIT_EXT` echoed when the kernel sent it (we ask no `flags2` feature:
    /// 0). Also returns the resulting [`Session`].
    pub fn negotiate(&self, wants: &InitWants) -> Result<(InitOut, Session), UnsupportedVersion> {
        if self.major != KERNEL_VERSION || self.minor < MIN_MINOR {
            return Err(UnsupportedVersion {
                major: self.major,
                minor: self.minor,
            });
        }
        let minor = KERNEL_MINOR.min(self.minor);
        let ext = self.flags & init::INIT_EXT;
        let out = InitOut {
            major: KERNEL_VERSION,
            minor,
            max_readahead: self.max_readahead,
            flags: (self.flags & wants.flags & !init::INIT_EXT) | ext,
            max_background: wants.max_background,
            congestion_threshold: wants.congestion_threshold,
            max_write: wants.max_write,
            time_gran: 1,
            max_pages: wants.max_pages,
            map_alignment: 0,
            flags2: 0,
            max_stack_depth: 0,
        };
        let resend = minor >= RESEND_MINOR && self.flags2 & init2::HAS_RESEND != 0;
        Ok((out, Session { minor, resend }))
    }
}

/// The `FUSE_NOTIFY_RESEND` notification: a bare `fuse_out_header` with `unique` 0 and the
/// notify code in `error`.
pub fn notify_resend() -> [u8; OUT_HEADER] {
    let mut h = [0u8; OUT_HEADER];
    h[0..4].copy_from_slice(&(OUT_HEADER as u32).to_le_bytes());
    h[4..8].copy_from_slice(&notify::RESEND.to_le_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::super::{op, u64_at, INIT_IN_EXT, IN_HEADER, UNIQUE_RESEND};
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

    /// A 7.45 kernel's INIT (as 6.18 sends it): 64-byte `fuse_init_in` with `FUSE_INIT_EXT`.
    fn init_request(minor: u32, flags: u32, flags2: u32) -> Vec<u8> {
        let mut args = Vec::new();
        for v in [7, minor, 131072, flags, flags2] {
            args.extend_from_slice(&u32::to_le_bytes(v));
        }
        args.extend_from_slice(&[0; 44]);
        assert_eq!(args.len(), INIT_IN_EXT);
        request(op::INIT, 2, 0, &args)
    }

    const WANTS: InitWants = InitWants {
        flags: init::ASYNC_READ | init::MAX_PAGES,
        max_background: 16,
        congestion_threshold: 12,
        max_write: 131072,
        max_pages: 256,
    };

    #[test]
    fn init_with_a_resend_kernel_negotiates_7_40_and_flags2() {
        let offered = init::ASYNC_READ | init::MAX_PAGES | init::INIT_EXT | (1 << 3);
        let b = init_request(45, offered, init2::HAS_RESEND | 1);
        let req = Request::parse(&b).unwrap();
        let init = req.init_args().unwrap();
        assert_eq!(init.flags2, init2::HAS_RESEND | 1);
        let (out, session) = init.negotiate(&WANTS).unwrap();
        assert_eq!(
            session,
            Session {
                minor: 40,
                resend: true
            }
        );
        let mut r = Reply::ok(req.header.unique);
        out.encode(&mut r);
        let reply = r.finish();
        assert_eq!(
            reply.len(),
            OUT_HEADER + INIT_OUT,
            "sizeof(fuse_init_out) is 64"
        );
        let p = &reply[OUT_HEADER..];
        assert_eq!(u32_at(p, 0).unwrap(), 7);
        assert_eq!(
            u32_at(p, 4).unwrap(),
            KERNEL_MINOR,
            "the smaller minor: ours"
        );
        // Only the wanted flags the kernel offers, and FUSE_INIT_EXT echoed.
        assert_eq!(
            u32_at(p, init_out_at::FLAGS).unwrap(),
            init::ASYNC_READ | init::MAX_PAGES | init::INIT_EXT
        );
        assert_eq!(u32_at(p, init_out_at::MAX_WRITE).unwrap(), 131072);
        assert_eq!(&p[init_out_at::MAX_PAGES..][..2], &256u16.to_le_bytes());
        assert_eq!(
            u32_at(p, init_out_at::FLAGS2).unwrap(),
            0,
            "no flags2 feature"
        );
        assert_eq!(u32_at(p, init_out_at::MAX_STACK_DEPTH).unwrap(), 0);
        assert!(p[init_out_at::UNUSED..].iter().all(|&b| b == 0));
    }

    #[test]
    fn init_with_older_kernels() {
        // 7.31 kernel: 16-byte fuse_init_in, no flags2, no resend; its minor wins.
        let mut args = Vec::new();
        for v in [7u32, 31, 65536, init::ASYNC_READ] {
            args.extend_from_slice(&v.to_le_bytes());
        }
        let b = request(op::INIT, 2, 0, &args);
        let init = Request::parse(&b).unwrap().init_args().unwrap();
        let (out, session) = init.negotiate(&WANTS).unwrap();
        assert_eq!(
            (out.minor, out.flags, out.flags2),
            (31, init::ASYNC_READ, 0)
        );
        assert!(!session.resend);
        // 7.38 kernel: flags2 present, but no FUSE_HAS_RESEND.
        let b = init_request(38, init::INIT_EXT, 0);
        let init = Request::parse(&b).unwrap().init_args().unwrap();
        let (out, session) = init.negotiate(&WANTS).unwrap();
        assert_eq!((out.minor, out.flags), (38, init::INIT_EXT));
        assert!(!session.resend);
        // flags2 is only read when FUSE_INIT_EXT says it is there.
        let b = init_request(45, 0, init2::HAS_RESEND);
        let init = Request::parse(&b).unwrap().init_args().unwrap();
        assert_eq!(init.flags2, 0);
        assert!(!init.negotiate(&WANTS).unwrap().1.resend);
        // Too old, or another major.
        let b = init_request(22, 0, 0);
        let init = Request::parse(&b).unwrap().init_args().unwrap();
        assert!(init.negotiate(&WANTS).is_err());
        let mut b = init_request(40, 0, 0);
        b[IN_HEADER] = 8;
        let init = Request::parse(&b).unwrap().init_args().unwrap();
        assert!(init.negotiate(&WANTS).is_err());
        // FUSE_INIT_EXT set but the struct cut short.
        let b = request(
            op::INIT,
            2,
            0,
            &init_request(45, init::INIT_EXT, 0)[IN_HEADER..][..16],
        );
        assert!(Request::parse(&b).unwrap().init_args().is_err());
    }

    #[test]
    fn resend_notification_bytes() {
        // struct fuse_out_header { len = 16, error = FUSE_NOTIFY_RESEND (7), unique = 0 }
        assert_eq!(
            notify_resend(),
            [16, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn resent_request_keeps_its_id_in_the_reply() {
        let unique = UNIQUE_RESEND | 0x1234;
        let mut args = Vec::new();
        args.extend_from_slice(&0u64.to_le_bytes());
        args.extend_from_slice(&8192u64.to_le_bytes());
        args.extend_from_slice(&4096u32.to_le_bytes());
        args.extend_from_slice(&[0; 20]);
        let b = request(op::READ, unique, 5, &args);
        let r = Request::parse(&b).unwrap();
        assert!(r.header.is_resend());
        assert_eq!(r.header.unique, unique, "the id is not stripped");
        assert_eq!(r.read_args().unwrap(), (8192, 4096));
        assert!(!Request::parse(&request(op::READ, 0x1234, 5, &args))
            .unwrap()
            .header
            .is_resend());
        let h = Reply::header(r.header.unique, 0);
        assert_eq!(u64_at(&h, 8).unwrap(), unique);
        let e = Reply::error(r.header.unique, libc::EIO);
        assert_eq!(u64_at(&e, 8).unwrap(), unique);
    }
}
