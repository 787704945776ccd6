//! The INIT handshake and what a session keeps of it: version and flag negotiation over the
//! `fuse_init_in`/`fuse_init_out` wire structs, and the resend notification a resuming daemon
//! sends. Kept apart from request decoding because it is what a daemon restart depends on.

use zerocopy::IntoBytes;

use super::abi::{fuse_init_in, fuse_init_out, fuse_out_header};
use super::{
    init, init2, notify, KERNEL_MINOR, KERNEL_VERSION, MIN_MINOR, PASSTHROUGH_MINOR,
    PASSTHROUGH_STACK_DEPTH, RESEND_MINOR,
};

/// What the server wants from a session (the parts of `fuse_init_out` it chooses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitWants {
    /// Init flags asked for; only those the kernel offers are kept.
    pub flags: u32,
    /// `flags2` bits asked for (only [`init2::PASSTHROUGH`] is understood), kept if the
    /// kernel offers them in a 7.40+ `fuse_init_in` with `FUSE_INIT_EXT`.
    pub flags2: u32,
    /// `max_background`.
    pub max_background: u16,
    /// `congestion_threshold`.
    pub congestion_threshold: u16,
    /// `max_write`.
    pub max_write: u32,
    /// `max_pages`.
    pub max_pages: u16,
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

/// Answers the kernel's INIT: the smaller of both minors, the wanted flags the kernel offers,
/// `FUSE_INIT_EXT` echoed when the kernel sent it, with it the wanted `flags2` bits the kernel
/// offers (passthrough only from 7.40, with `max_stack_depth`
/// [`PASSTHROUGH_STACK_DEPTH`]), the kernel's `max_readahead`. Also returns the resulting
/// [`Session`]. Passthrough is granted iff the reply's `flags2` has [`init2::PASSTHROUGH`].
pub fn negotiate(
    init: &fuse_init_in,
    wants: &InitWants,
) -> Result<(fuse_init_out, Session), UnsupportedVersion> {
    if init.major != KERNEL_VERSION || init.minor < MIN_MINOR {
        return Err(UnsupportedVersion {
            major: init.major,
            minor: init.minor,
        });
    }
    let minor = KERNEL_MINOR.min(init.minor);
    let ext = init.flags & init::INIT_EXT;
    let flags2 = if ext != 0 { init.flags2 } else { 0 };
    let mut granted2 = flags2 & wants.flags2 & init2::PASSTHROUGH;
    if minor < PASSTHROUGH_MINOR {
        granted2 &= !init2::PASSTHROUGH;
    }
    let out = fuse_init_out {
        major: KERNEL_VERSION,
        minor,
        max_readahead: init.max_readahead,
        flags: (init.flags & wants.flags & !init::INIT_EXT) | ext,
        max_background: wants.max_background,
        congestion_threshold: wants.congestion_threshold,
        max_write: wants.max_write,
        time_gran: 1,
        max_pages: wants.max_pages,
        flags2: granted2,
        max_stack_depth: if granted2 & init2::PASSTHROUGH != 0 {
            PASSTHROUGH_STACK_DEPTH
        } else {
            0
        },
        ..Default::default()
    };
    let resend = minor >= RESEND_MINOR && flags2 & init2::HAS_RESEND != 0;
    Ok((out, Session { minor, resend }))
}

/// The `FUSE_NOTIFY_RESEND` notification: a bare `fuse_out_header` with `unique` 0 and the
/// notify code in `error`.
pub fn notify_resend() -> [u8; size_of::<fuse_out_header>()] {
    let h = fuse_out_header {
        len: size_of::<fuse_out_header>() as u32,
        error: notify::RESEND,
        unique: 0,
    };
    let mut b = [0u8; size_of::<fuse_out_header>()];
    b.copy_from_slice(h.as_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::super::test_util::request;
    use super::super::{op, Operation, Reply, Request, UNIQUE_RESEND};
    use super::*;
    use zerocopy::FromBytes;

    /// A kernel's INIT with the 64-byte `fuse_init_in` (6.18 sends minor 45).
    fn init_request(minor: u32, flags: u32, flags2: u32) -> Vec<u8> {
        let arg = fuse_init_in {
            major: 7,
            minor,
            max_readahead: 131072,
            flags,
            flags2,
            unused: [0; 11],
        };
        request(op::INIT, 2, 0, arg.as_bytes())
    }

    fn init_of(b: &[u8]) -> fuse_init_in {
        match Request::parse(b).unwrap().op {
            Operation::Init { arg } => arg,
            other => panic!("not INIT: {other:?}"),
        }
    }

    const WANTS: InitWants = InitWants {
        flags: init::ASYNC_READ | init::MAX_PAGES,
        flags2: 0,
        max_background: 16,
        congestion_threshold: 12,
        max_write: 131072,
        max_pages: 256,
    };

    #[test]
    fn init_with_a_resend_kernel_negotiates_7_40_and_flags2() {
        let offered = init::ASYNC_READ | init::MAX_PAGES | init::INIT_EXT | (1 << 3);
        let init = init_of(&init_request(45, offered, init2::HAS_RESEND | 1));
        assert_eq!(init.flags2, init2::HAS_RESEND | 1);
        let (out, session) = negotiate(&init, &WANTS).unwrap();
        assert_eq!(
            session,
            Session {
                minor: 40,
                resend: true
            }
        );
        let reply = Reply::with(2, &out).finish();
        assert_eq!(reply.len(), 16 + 64, "sizeof(fuse_init_out) is 64");
        let (p, _) = fuse_init_out::read_from_prefix(&reply[16..]).unwrap();
        assert_eq!(
            (p.major, p.minor),
            (7, KERNEL_MINOR),
            "the smaller minor: ours"
        );
        // Only the wanted flags the kernel offers, and FUSE_INIT_EXT echoed.
        assert_eq!(p.flags, init::ASYNC_READ | init::MAX_PAGES | init::INIT_EXT);
        assert_eq!(
            (p.max_write, p.max_pages, p.max_readahead),
            (131072, 256, 131072)
        );
        assert_eq!((p.flags2, p.max_stack_depth, p.unused), (0, 0, [0; 6]));
        // Byte positions as in fuse.h, independently of the struct.
        assert_eq!(
            &reply[16 + 20..16 + 24],
            &131072u32.to_ne_bytes(),
            "max_write at 20"
        );
        assert_eq!(
            &reply[16 + 28..16 + 30],
            &256u16.to_ne_bytes(),
            "max_pages at 28"
        );
    }

    #[test]
    fn init_with_older_kernels() {
        // 7.31 kernel: 16-byte fuse_init_in, no flags2, no resend; its minor wins.
        let mut args = Vec::new();
        for v in [7u32, 31, 65536, init::ASYNC_READ] {
            args.extend_from_slice(&v.to_ne_bytes());
        }
        let init = init_of(&request(op::INIT, 2, 0, &args));
        let (out, session) = negotiate(&init, &WANTS).unwrap();
        assert_eq!(
            (out.minor, out.flags, out.flags2, out.max_readahead),
            (31, init::ASYNC_READ, 0, 65536)
        );
        assert!(!session.resend);
        // 7.38 kernel: flags2 present, but no FUSE_HAS_RESEND.
        let init = init_of(&init_request(38, init::INIT_EXT, 0));
        let (out, session) = negotiate(&init, &WANTS).unwrap();
        assert_eq!((out.minor, out.flags), (38, init::INIT_EXT));
        assert!(!session.resend);
        // A 7.39 kernel offering resend bits gets no resend session (7.40 brought it).
        let init = init_of(&init_request(39, init::INIT_EXT, init2::HAS_RESEND));
        assert!(!negotiate(&init, &WANTS).unwrap().1.resend);
        // flags2 is only read when FUSE_INIT_EXT says it is there.
        let init = init_of(&init_request(45, 0, init2::HAS_RESEND));
        assert_eq!(init.flags2, 0);
        assert!(!negotiate(&init, &WANTS).unwrap().1.resend);
        // Too old, or another major.
        for (major, minor) in [(7, 22), (7, 0), (8, 40), (6, 40)] {
            let mut init = init_of(&init_request(minor, 0, 0));
            init.major = major;
            assert_eq!(
                negotiate(&init, &WANTS).unwrap_err(),
                UnsupportedVersion { major, minor }
            );
        }
        // FUSE_INIT_EXT set but the struct cut short; shorter than the 7.x compat struct.
        let full = init_request(45, init::INIT_EXT, 0);
        let b = request(op::INIT, 2, 0, &full[40..][..16]);
        assert!(Request::parse(&b).is_err());
        let b = request(op::INIT, 2, 0, &full[40..][..12]);
        assert!(Request::parse(&b).is_err());
    }

    /// Passthrough is granted only when asked, offered, with FUSE_INIT_EXT, from 7.40; then
    /// `max_stack_depth` is 1 (overlayfs must still stack on the mount), else 0.
    #[test]
    fn passthrough_negotiation_table() {
        let pt = init2::PASSTHROUGH;
        assert_eq!(pt, 1 << 5, "FUSE_PASSTHROUGH is 1ULL << 37");
        let ext = init::INIT_EXT | init::ASYNC_READ;
        let ask = InitWants {
            flags2: pt,
            ..WANTS
        };
        // (kernel minor, kernel flags, kernel flags2, wants) -> granted
        let table = [
            (45, ext, pt | init2::HAS_RESEND, ask, true),
            (40, ext, pt, ask, true),
            (45, ext, pt, WANTS, false), // not asked (config off)
            (45, ext, init2::HAS_RESEND, ask, false), // kernel without it
            (45, init::ASYNC_READ, pt, ask, false), // no FUSE_INIT_EXT: flags2 unread
            (39, ext, pt, ask, false),   // before 7.40
        ];
        for (minor, flags, flags2, wants, granted) in table {
            let init = init_of(&init_request(minor, flags, flags2));
            let (out, _) = negotiate(&init, &wants).unwrap();
            let row = (minor, flags, flags2, wants.flags2);
            assert_eq!(out.flags2 & pt != 0, granted, "{row:?}");
            assert_eq!(out.max_stack_depth, if granted { 1 } else { 0 }, "{row:?}");
            assert_eq!(out.flags2 & !pt, 0, "no other flags2 bit: {row:?}");
            if granted {
                assert_ne!(
                    out.flags & init::INIT_EXT,
                    0,
                    "flags2 is read only with INIT_EXT"
                );
                // Byte positions as in fuse.h: flags2 at 32, max_stack_depth at 36.
                let reply = Reply::with(2, &out).finish();
                assert_eq!(&reply[16 + 32..16 + 36], &pt.to_ne_bytes());
                assert_eq!(&reply[16 + 36..16 + 40], &1u32.to_ne_bytes());
            }
        }
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
        let arg = super::super::abi::fuse_read_in {
            offset: 8192,
            size: 4096,
            ..Default::default()
        };
        let b = request(op::READ, unique, 5, arg.as_bytes());
        let r = Request::parse(&b).unwrap();
        assert!(r.header.is_resend());
        assert_eq!(r.header.unique, unique, "the id is not stripped");
        assert!(matches!(r.op, Operation::Read { arg: a } if a == arg));
        let plain = request(op::READ, 0x1234, 5, arg.as_bytes());
        assert!(!Request::parse(&plain).unwrap().header.is_resend());
        let e = Reply::error(r.header.unique, libc::EIO);
        assert_eq!(&e[8..16], &unique.to_ne_bytes());
    }
}
