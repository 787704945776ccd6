//! Decoding what the kernel writes to `/dev/fuse` into a typed [`Operation`]: the header and
//! each opcode's argument struct are copied out with `zerocopy` (bounds-checked, no `unsafe`);
//! a request too short for its struct is [`Malformed`], an opcode we do not know is
//! [`Operation::Unknown`] (answered `ENOSYS`).

use zerocopy::FromBytes;

use super::abi::{
    fuse_batch_forget_in, fuse_flush_in, fuse_forget_in, fuse_forget_one, fuse_getattr_in,
    fuse_getxattr_in, fuse_in_header, fuse_init_in, fuse_interrupt_in, fuse_open_in, fuse_read_in,
    fuse_release_in, FUSE_COMPAT_INIT_IN_SIZE,
};
use super::{init, op, UNIQUE_RESEND};

/// Why a request could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// One decoded request.
#[derive(Debug)]
pub struct Request<'a> {
    /// Header (`unique` as received, resend bit included).
    pub header: fuse_in_header,
    /// The operation and its arguments.
    pub op: Operation<'a>,
}

/// A request's operation with its decoded arguments.
#[derive(Debug)]
pub enum Operation<'a> {
    /// `FUSE_LOOKUP`: a child's name.
    Lookup { name: &'a [u8] },
    /// `FUSE_FORGET` (no reply).
    Forget { arg: fuse_forget_in },
    /// `FUSE_BATCH_FORGET` (no reply); `forgets` holds `arg.count` entries.
    BatchForget {
        arg: fuse_batch_forget_in,
        forgets: Vec<fuse_forget_one>,
    },
    /// `FUSE_GETATTR`.
    Getattr { arg: fuse_getattr_in },
    /// `FUSE_READLINK`.
    Readlink,
    /// `FUSE_OPEN`.
    Open { arg: fuse_open_in },
    /// `FUSE_READ`.
    Read { arg: fuse_read_in },
    /// `FUSE_STATFS`.
    Statfs,
    /// `FUSE_RELEASE`.
    Release { arg: fuse_release_in },
    /// `FUSE_GETXATTR`: caller buffer size and the attribute's name.
    Getxattr {
        arg: fuse_getxattr_in,
        name: &'a [u8],
    },
    /// `FUSE_LISTXATTR`.
    Listxattr { arg: fuse_getxattr_in },
    /// `FUSE_FLUSH`.
    Flush { arg: fuse_flush_in },
    /// `FUSE_INIT`; `flags2` is 0 unless the kernel set `FUSE_INIT_EXT`.
    Init { arg: fuse_init_in },
    /// `FUSE_OPENDIR`.
    Opendir { arg: fuse_open_in },
    /// `FUSE_READDIR`.
    Readdir { arg: fuse_read_in },
    /// `FUSE_RELEASEDIR`.
    Releasedir { arg: fuse_release_in },
    /// `FUSE_INTERRUPT` (no reply).
    Interrupt { arg: fuse_interrupt_in },
    /// `FUSE_DESTROY`.
    Destroy,
    /// `FUSE_READDIRPLUS`.
    Readdirplus { arg: fuse_read_in },
    /// Any other opcode (answered `ENOSYS`).
    Unknown { opcode: u32 },
}

/// Largest `fuse_batch_forget_in.count` accepted (bounded by the request buffer anyway).
const MAX_BATCH_FORGET: usize = 1 << 16;

fn arg<T: FromBytes>(args: &[u8]) -> Result<T, Malformed> {
    T::read_from_prefix(args)
        .map(|(v, _)| v)
        .map_err(|_| Malformed)
}

/// The bytes up to the first NUL.
pub fn cstr(b: &[u8]) -> Result<&[u8], Malformed> {
    let end = b.iter().position(|&c| c == 0).ok_or(Malformed)?;
    Ok(&b[..end])
}

impl fuse_in_header {
    /// Whether the kernel sends this request again after `FUSE_NOTIFY_RESEND` (a daemon took
    /// it before and did not answer).
    pub fn is_resend(&self) -> bool {
        self.unique & UNIQUE_RESEND != 0
    }
}

impl<'a> Request<'a> {
    /// Decodes one request as read from `/dev/fuse`.
    pub fn parse(buf: &'a [u8]) -> Result<Request<'a>, Malformed> {
        let (header, _) = fuse_in_header::read_from_prefix(buf).map_err(|_| Malformed)?;
        let len = header.len as usize;
        if len < size_of::<fuse_in_header>() || len > buf.len() {
            return Err(Malformed);
        }
        // Request extensions (7.38) sit after the arguments; we ask for none, but skip them.
        let end = len
            .checked_sub(usize::from(header.total_extlen) * 8)
            .filter(|&e| e >= size_of::<fuse_in_header>())
            .ok_or(Malformed)?;
        let args = &buf[size_of::<fuse_in_header>()..end];
        Ok(Request {
            header,
            op: Operation::parse(header.opcode, args)?,
        })
    }
}

impl<'a> Operation<'a> {
    fn parse(opcode: u32, args: &'a [u8]) -> Result<Operation<'a>, Malformed> {
        Ok(match opcode {
            op::LOOKUP => Operation::Lookup { name: cstr(args)? },
            op::FORGET => Operation::Forget { arg: arg(args)? },
            op::BATCH_FORGET => {
                let a: fuse_batch_forget_in = arg(args)?;
                let rest = &args[size_of::<fuse_batch_forget_in>()..];
                let count = a.count as usize;
                if count > MAX_BATCH_FORGET {
                    return Err(Malformed);
                }
                let forgets = read_forgets(rest, count)?;
                Operation::BatchForget { arg: a, forgets }
            }
            op::GETATTR => Operation::Getattr { arg: arg(args)? },
            op::READLINK => Operation::Readlink,
            op::OPEN => Operation::Open { arg: arg(args)? },
            op::READ => Operation::Read { arg: arg(args)? },
            op::STATFS => Operation::Statfs,
            op::RELEASE => Operation::Release { arg: arg(args)? },
            op::GETXATTR => {
                let a: fuse_getxattr_in = arg(args)?;
                let name = cstr(&args[size_of::<fuse_getxattr_in>()..])?;
                Operation::Getxattr { arg: a, name }
            }
            op::LISTXATTR => Operation::Listxattr { arg: arg(args)? },
            op::FLUSH => Operation::Flush { arg: arg(args)? },
            op::INIT => Operation::Init {
                arg: init_in(args)?,
            },
            op::OPENDIR => Operation::Opendir { arg: arg(args)? },
            op::READDIR => Operation::Readdir { arg: arg(args)? },
            op::RELEASEDIR => Operation::Releasedir { arg: arg(args)? },
            op::INTERRUPT => Operation::Interrupt { arg: arg(args)? },
            op::DESTROY => Operation::Destroy,
            op::READDIRPLUS => Operation::Readdirplus { arg: arg(args)? },
            opcode => Operation::Unknown { opcode },
        })
    }

    /// Whether the kernel waits for a reply to this operation.
    pub fn expects_reply(&self) -> bool {
        !matches!(
            self,
            Operation::Forget { .. } | Operation::BatchForget { .. } | Operation::Interrupt { .. }
        )
    }
}

/// The forget entries one by one (the request buffer need not be 8-byte aligned).
fn read_forgets(rest: &[u8], count: usize) -> Result<Vec<fuse_forget_one>, Malformed> {
    let size = size_of::<fuse_forget_one>();
    if rest.len() < count * size {
        return Err(Malformed);
    }
    rest.chunks_exact(size).take(count).map(arg).collect()
}

/// `fuse_init_in`: 64 bytes with `FUSE_INIT_EXT`, else the 16-byte form (the rest read as 0).
fn init_in(args: &[u8]) -> Result<fuse_init_in, Malformed> {
    if args.len() < FUSE_COMPAT_INIT_IN_SIZE {
        return Err(Malformed);
    }
    let mut full = [0u8; size_of::<fuse_init_in>()];
    let n = args.len().min(full.len());
    full[..n].copy_from_slice(&args[..n]);
    let mut a: fuse_init_in = arg(&full)?;
    if a.flags & init::INIT_EXT != 0 {
        if args.len() < size_of::<fuse_init_in>() {
            return Err(Malformed);
        }
    } else {
        // Without FUSE_INIT_EXT the bytes after `flags` are not ours to read.
        a.flags2 = 0;
        a.unused = [0; 11];
    }
    Ok(a)
}
