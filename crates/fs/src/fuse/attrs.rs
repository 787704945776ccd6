//! Node attributes and xattr answers in the kernel's shapes (pure functions of a tree node).

use super::{Answer, Handled};
use crate::kernel::abi::{fuse_attr, fuse_getxattr_out};
use crate::kernel::Reply;
use crate::tree::{Node, NodeKind};

pub(super) fn mode(n: &Node) -> u32 {
    let t = match n.kind {
        NodeKind::Dir => libc::S_IFDIR,
        NodeKind::File => libc::S_IFREG,
        NodeKind::Symlink => libc::S_IFLNK,
        NodeKind::Char => libc::S_IFCHR,
        NodeKind::Block => libc::S_IFBLK,
        NodeKind::Fifo => libc::S_IFIFO,
    };
    t | u32::from(n.perm)
}

pub(super) fn attr(ino: u64, n: &Node) -> fuse_attr {
    let (s, ns) = n.mtime;
    fuse_attr {
        ino,
        size: n.size,
        blocks: n.size.div_ceil(512),
        atime: s as u64,
        mtime: s as u64,
        ctime: s as u64,
        atimensec: ns,
        mtimensec: ns,
        ctimensec: ns,
        mode: mode(n),
        nlink: n.nlink,
        uid: n.uid,
        gid: n.gid,
        rdev: n.rdev,
        blksize: 4096,
        flags: 0,
    }
}

/// Answer to a GETXATTR/LISTXATTR of `data` for a caller buffer of `size`: the needed size
/// for a probe (`size` 0), `ERANGE` if it does not fit, else the bytes.
pub(super) fn xattr_reply(unique: u64, data: &[u8], size: u32) -> Handled {
    if size == 0 {
        let out = fuse_getxattr_out {
            size: data.len() as u32,
            padding: 0,
        };
        Ok(Answer::Now(Reply::with(unique, &out).finish()))
    } else if data.len() > size as usize {
        Err(libc::ERANGE)
    } else {
        let mut r = Reply::ok(unique);
        r.bytes(data);
        Ok(Answer::Now(r.finish()))
    }
}
