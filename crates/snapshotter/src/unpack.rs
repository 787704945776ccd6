//! Unpacks a layer tar (gzip, zstd or plain) into a snapshot directory with the same tar
//! reader the zTOC builder uses (Go `archive/tar` semantics, so a layer unpacks exactly as it is
//! served lazily and as containerd's `archive.Apply` would unpack it), converting OCI whiteouts to
//! overlayfs form: `.wh.NAME` → character device 0/0 `NAME`, `.wh..wh..opq` →
//! `trusted.overlay.opaque=y`.
//!
//! The layer is hostile input and the daemon runs as root, so nothing it names may reach outside
//! the snapshot directory. Rather than checking paths and then handing them to path-based
//! syscalls (which follow whatever symlinks the layer planted), every operation goes through
//! [`at`]: the snapshot is opened once, each entry's parent directory is resolved inside it with
//! `openat2(RESOLVE_IN_ROOT)`, and the final component is touched only by calls that do not
//! follow it. Names are cleaned like Go's `filepath.Clean` with `..` stopping at the root
//! (`../x` is `x`), as containerd does.

mod at;
#[cfg(test)]
mod tests;

use std::ffi::{CStr, OsStr};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{
    fchmodat, mkdirat, mknodat, utimensat, FchmodatFlags, Mode, SFlag, UtimensatFlags,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchownat, linkat, symlinkat, Gid, Uid};

use soci_registry::oci::LayerCompression;
use soci_ztoc::tar::{TarEntry, TarWalker};
use soci_ztoc::{EntryKind, XATTR_PAX_PREFIX};

use at::{cname, err, invalid, is, lstat_at, Root};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";
const OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";

/// Decompressing reader for a layer blob.
pub fn decoder<'a>(r: impl Read + 'a, c: LayerCompression) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match c {
        LayerCompression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(r)),
        LayerCompression::Zstd => Box::new(zstd::stream::read::Decoder::new(r)?),
        LayerCompression::Uncompressed => Box::new(r),
        LayerCompression::Unknown => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "unknown layer media type",
            ))
        }
    })
}

/// The components of a tar name after Go's `filepath.Clean`, with `..` confined to the root:
/// empty and `.` components vanish, `..` drops the previous component or nothing.
fn clean(name: &[u8]) -> Vec<&[u8]> {
    let mut out: Vec<&[u8]> = Vec::new();
    for c in name.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Whether a whiteout's hidden name stays in the whiteout's directory (containerd's
/// `validateWhiteout`: `.wh.`, `.wh..` and `.wh...` would name the directory or its parent).
fn valid_whiteout(hidden: &[u8]) -> bool {
    !matches!(hidden, b"" | b"." | b"..")
}

/// Owner, xattrs, mode and times of `name` in `dir`, none of them following a symlink there.
fn set_meta(dir: BorrowedFd<'_>, name: &CStr, e: &TarEntry) -> io::Result<()> {
    let n = name.to_bytes();
    fchownat(
        dir,
        name,
        Some(Uid::from_raw(e.uid as u32)),
        Some(Gid::from_raw(e.gid as u32)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|x| err(x, "chown", n))?;
    for (k, v) in &e.pax {
        if let Some(key) = k.strip_prefix(XATTR_PAX_PREFIX) {
            at::lsetxattr_at(dir, name, key, v)?;
        }
    }
    // After chown, which clears set-id bits. Never on a symlink (a hardlink to one included:
    // containerd's handleLChmod): check the entry itself, then chmod without following it.
    let st = lstat_at(dir, name)?.ok_or_else(|| invalid(format!("{:?} vanished", lossy(n))))?;
    if !is(&st, SFlag::S_IFLNK) {
        let mode = Mode::from_bits_truncate((e.mode & 0o7777) as libc::mode_t);
        // NoFollowSymlink: should the entry have become a symlink since the check, this fails
        // (EOPNOTSUPP) instead of changing the link's target.
        fchmodat(dir, name, mode, FchmodatFlags::NoFollowSymlink)
            .map_err(|x| err(x, "chmod", n))?;
    }
    set_times(dir, name, e.mtime)
}

fn set_times(dir: BorrowedFd<'_>, name: &CStr, mtime: (i64, u32)) -> io::Result<()> {
    let t = TimeSpec::new(mtime.0 as libc::time_t, mtime.1 as libc::c_long);
    utimensat(dir, name, &t, &t, UtimensatFlags::NoFollowSymlink)
        .map_err(|x| err(x, "setting times of", name.to_bytes()))
}

/// Unpacks the tar stream `r` into `dst`; returns the number of entries.
pub fn unpack(r: impl Read, dst: &Path) -> io::Result<u64> {
    let root = Root::open(dst)?;
    let mut w = TarWalker::new(io::BufReader::with_capacity(1 << 20, r));
    let mut n = 0;
    let mut dirs: Vec<(Vec<u8>, (i64, u32))> = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    while let Some(e) = w.next_entry().map_err(|x| invalid(x.to_string()))? {
        n += 1;
        let parts = clean(&e.name);
        // An entry naming the root itself is ignored, as containerd does.
        let Some((base, parent_parts)) = parts.split_last() else {
            continue;
        };
        let parent = root.make_dir(parent_parts)?;
        let p = parent.as_fd();
        if *base == OPAQUE {
            at::fsetxattr(p, OPAQUE_XATTR, b"y")?;
            continue;
        }
        if let Some(hidden) = base.strip_prefix(WHITEOUT_PREFIX) {
            if !valid_whiteout(hidden) {
                return Err(invalid(format!(
                    "invalid whiteout name: {:?} in {:?}",
                    lossy(base),
                    lossy(&e.name)
                )));
            }
            let h = cname(hidden)?;
            at::remove_all(p, &h)?;
            mknodat(p, h.as_c_str(), SFlag::S_IFCHR, Mode::empty(), 0)
                .map_err(|x| err(x, "creating whiteout", &e.name))?;
            fchownat(
                p,
                h.as_c_str(),
                Some(Uid::from_raw(e.uid as u32)),
                Some(Gid::from_raw(e.gid as u32)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|x| err(x, "chown", &e.name))?;
            continue;
        }
        let name = cname(base)?;
        // What is there is replaced, unless both are directories (then they merge).
        match lstat_at(p, &name)? {
            Some(st) if is(&st, SFlag::S_IFDIR) && e.kind == EntryKind::Directory => {}
            Some(_) => at::remove_all(p, &name)?,
            None => {}
        }
        create(&root, p, &name, &e, &mut w, &mut buf)?;
        set_meta(p, &name, &e)?;
        if e.kind == EntryKind::Directory {
            dirs.push((parts.join(&b"/"[..]), e.mtime));
        }
    }
    // Directory times last: creating their children changed them. Each is found again inside
    // the root and left alone unless it is still a directory.
    for (path, mtime) in &dirs {
        let parts = clean(path);
        let Some((base, parent_parts)) = parts.split_last() else {
            continue;
        };
        // Gone, or a parent is no longer a directory: nothing to do.
        let parent = match root.open_dir(parent_parts) {
            Ok(Some(p)) => p,
            Ok(None) => continue,
            Err(x) if x.kind() == io::ErrorKind::NotADirectory => continue,
            Err(x) => return Err(x),
        };
        let name = cname(base)?;
        if lstat_at(parent.as_fd(), &name)?.is_some_and(|st| is(&st, SFlag::S_IFDIR)) {
            set_times(parent.as_fd(), &name, *mtime)?;
        }
    }
    Ok(n)
}

/// Creates the entry `name` in `dir` (which holds nothing of that name, or a directory when
/// the entry is one).
fn create<R: Read>(
    root: &Root,
    dir: BorrowedFd<'_>,
    name: &CStr,
    e: &TarEntry,
    w: &mut TarWalker<R>,
    buf: &mut [u8],
) -> io::Result<()> {
    let what = |x: Errno| err(x, "creating", &e.name);
    match e.kind {
        EntryKind::Directory => {
            if lstat_at(dir, name)?.is_none() {
                mkdirat(dir, name, Mode::from_bits_truncate(0o755)).map_err(what)?;
            }
        }
        EntryKind::Regular => {
            let fd = openat(
                dir,
                name,
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            )
            .map_err(what)?;
            let mut f = std::fs::File::from(fd);
            loop {
                let k = w.read_data(buf).map_err(|x| invalid(x.to_string()))?;
                if k == 0 {
                    break;
                }
                f.write_all(&buf[..k])?;
            }
        }
        EntryKind::Symlink => {
            symlinkat(OsStr::from_bytes(&e.linkname), dir, name).map_err(what)?;
        }
        EntryKind::Hardlink => {
            let target = clean(&e.linkname);
            let Some((tbase, tparent)) = target.split_last() else {
                return Err(invalid(format!(
                    "hardlink {:?} points to the root",
                    lossy(&e.name)
                )));
            };
            let tdir = root.open_dir(tparent)?.ok_or_else(|| {
                invalid(format!(
                    "hardlink {:?}: target {:?} not found",
                    lossy(&e.name),
                    lossy(&e.linkname)
                ))
            })?;
            // Flags 0: a symlink target is linked itself, never followed.
            linkat(
                tdir.as_fd(),
                cname(tbase)?.as_c_str(),
                dir,
                name,
                AtFlags::empty(),
            )
            .map_err(what)?;
        }
        EntryKind::Char | EntryKind::Block | EntryKind::Fifo => {
            let (kind, dev) = match e.kind {
                EntryKind::Fifo => (SFlag::S_IFIFO, 0),
                EntryKind::Char => (
                    SFlag::S_IFCHR,
                    libc::makedev(e.devmajor as u32, e.devminor as u32),
                ),
                _ => (
                    SFlag::S_IFBLK,
                    libc::makedev(e.devmajor as u32, e.devminor as u32),
                ),
            };
            mknodat(dir, name, kind, Mode::from_bits_truncate(0o600), dev).map_err(what)?;
        }
    }
    Ok(())
}
