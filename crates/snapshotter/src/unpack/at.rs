//! Directory-fd relative file operations for the unpacker.
//!
//! A layer is hostile input: any path built from its names and resolved by the kernel from `/`
//! can be bent outside the snapshot by a symlink the same layer created a moment earlier. So the
//! snapshot directory is opened once and every later syscall names a file as (directory fd,
//! single final component): directories are reached with `openat2(RESOLVE_IN_ROOT)`, which makes
//! the kernel treat the snapshot as `/` while it walks (absolute symlinks and `..` land inside,
//! exactly as containerd's `fs.RootPath` evaluates them), and the final component is acted on
//! only by calls that do not follow it.
//!
//! `RESOLVE_IN_ROOT` rather than `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`: layers routinely put
//! files under symlinked directories (`/lib -> usr/lib`), and containerd follows those inside
//! the root; refusing every symlink would fail real images. The kernel checks confinement on
//! every step (and answers `EAGAIN` if a concurrent rename could have broken it, which we retry a
//! bounded number of times). `RESOLVE_NO_MAGICLINKS` and `RESOLVE_NO_XDEV` are added because a
//! snapshot has no business reaching `/proc` style links or other mounts.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::fcntl::{openat, openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstatat, mkdirat, FileStat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};

/// How many times an `openat2` that answered `EAGAIN` (a rename raced the walk) is retried.
const EAGAIN_RETRIES: usize = 64;
/// Deepest directory tree `remove_all` descends (each level holds one fd).
const MAX_REMOVE_DEPTH: usize = 512;

pub(super) fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// An `io::Error` from an errno, naming what was being done to which path of the layer.
pub(super) fn err(e: Errno, what: &str, name: &[u8]) -> io::Error {
    let io = io::Error::from(e);
    io::Error::new(
        io.kind(),
        format!("{what} {:?}: {io}", String::from_utf8_lossy(name)),
    )
}

/// `name` as a path component, or an error if it holds a NUL.
pub(super) fn cname(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| {
        invalid(format!(
            "NUL in layer path {:?}",
            String::from_utf8_lossy(name)
        ))
    })
}

/// Whether `st` is of file type `t`.
pub(super) fn is(st: &FileStat, t: SFlag) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == t
}

/// `lstat` of `name` in `dir`; `None` if it does not exist.
pub(super) fn lstat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Option<FileStat>> {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(err(e, "stat", name.to_bytes())),
    }
}

/// The snapshot directory, held open; every path of the layer is resolved inside it.
pub(super) struct Root {
    fd: OwnedFd,
}

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC
}

impl Root {
    /// Opens the snapshot directory (a path the daemon chose, so it is trusted).
    pub(super) fn open(dst: &Path) -> io::Result<Root> {
        let fd = nix::fcntl::open(dst, dir_flags(), Mode::empty())
            .map_err(|e| err(e, "opening snapshot directory", dst.as_os_str().as_bytes()))?;
        Ok(Root { fd })
    }

    fn resolve(&self, parts: &[&[u8]]) -> Result<OwnedFd, Errno> {
        if parts.is_empty() {
            return self.fd.try_clone().map_err(|_| Errno::EMFILE);
        }
        let path = parts.join(&b"/"[..]);
        let how = OpenHow::new().flags(dir_flags()).resolve(
            ResolveFlag::RESOLVE_IN_ROOT
                | ResolveFlag::RESOLVE_NO_MAGICLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        );
        let mut tries = 0;
        loop {
            match openat2(self.fd.as_fd(), OsStr::from_bytes(&path), how) {
                Err(Errno::EAGAIN) if tries < EAGAIN_RETRIES => tries += 1,
                r => return r,
            }
        }
    }

    /// Opens the directory `parts` (cleaned components), resolving symlinks on the way as if
    /// the snapshot were `/`. `None` if some component does not exist.
    pub(super) fn open_dir(&self, parts: &[&[u8]]) -> io::Result<Option<OwnedFd>> {
        match self.resolve(parts) {
            Ok(fd) => Ok(Some(fd)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(err(e, "opening directory", &parts.join(&b"/"[..]))),
        }
    }

    /// Opens the directory `parts`, creating missing components with mode 0755 (containerd's
    /// `mkparent`). A component that exists but resolves to nothing (a dangling symlink) is an
    /// error: where containerd would create its target, we refuse rather than guess.
    pub(super) fn make_dir(&self, parts: &[&[u8]]) -> io::Result<OwnedFd> {
        if let Some(fd) = self.open_dir(parts)? {
            return Ok(fd);
        }
        let mut cur = self
            .fd
            .try_clone()
            .map_err(|e| invalid(format!("dup of snapshot fd: {e}")))?;
        for (i, c) in parts.iter().enumerate() {
            if let Some(fd) = self.open_dir(&parts[..=i])? {
                cur = fd;
                continue;
            }
            let name = cname(c)?;
            let here = parts[..=i].join(&b"/"[..]);
            if lstat_at(cur.as_fd(), &name)?.is_some() {
                return Err(invalid(format!(
                    "layer path {:?} goes through a dangling symlink",
                    String::from_utf8_lossy(&here)
                )));
            }
            mkdirat(
                cur.as_fd(),
                name.as_c_str(),
                Mode::from_bits_truncate(0o755),
            )
            .map_err(|e| err(e, "creating directory", &here))?;
            cur = openat(
                cur.as_fd(),
                name.as_c_str(),
                dir_flags() | OFlag::O_NOFOLLOW,
                Mode::empty(),
            )
            .map_err(|e| err(e, "opening directory", &here))?;
        }
        Ok(cur)
    }
}

/// Removes `name` in `dir` and, if it is a directory, everything below it, never following a
/// symlink (Go's `os.RemoveAll`, through fds). Nothing happens if it does not exist.
pub(super) fn remove_all(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    remove_all_depth(dir, name, 0)
}

fn remove_all_depth(dir: BorrowedFd<'_>, name: &CStr, depth: usize) -> io::Result<()> {
    let Some(st) = lstat_at(dir, name)? else {
        return Ok(());
    };
    if !is(&st, SFlag::S_IFDIR) {
        return unlinkat(dir, name, UnlinkatFlags::NoRemoveDir)
            .map_err(|e| err(e, "removing", name.to_bytes()));
    }
    if depth >= MAX_REMOVE_DEPTH {
        return Err(invalid(format!(
            "directory {:?} nested deeper than {MAX_REMOVE_DEPTH} levels",
            name
        )));
    }
    let fd = openat(dir, name, dir_flags() | OFlag::O_NOFOLLOW, Mode::empty())
        .map_err(|e| err(e, "opening directory", name.to_bytes()))?;
    let children: Vec<CString> = {
        let dup = fd
            .try_clone()
            .map_err(|e| invalid(format!("dup of directory fd: {e}")))?;
        let mut d = nix::dir::Dir::from_fd(dup).map_err(|e| err(e, "listing", name.to_bytes()))?;
        let mut v = Vec::new();
        for ent in d.iter() {
            let ent = ent.map_err(|e| err(e, "listing", name.to_bytes()))?;
            let n = ent.file_name();
            if n.to_bytes() != b"." && n.to_bytes() != b".." {
                v.push(n.to_owned());
            }
        }
        v
    };
    for c in &children {
        remove_all_depth(fd.as_fd(), c, depth + 1)?;
    }
    unlinkat(dir, name, UnlinkatFlags::RemoveDir).map_err(|e| err(e, "removing", name.to_bytes()))
}

/// Sets an xattr on `name` in `dir` without following it: `lsetxattr` on
/// `/proc/self/fd/<dir>/<name>`, where only the magic link to our own directory fd is followed.
/// `ENOTSUP` is ignored, as containerd does ("ignored xattr in archive").
pub(super) fn lsetxattr_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    key: &[u8],
    value: &[u8],
) -> io::Result<()> {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name.to_bytes());
    let p = cname(&p)?;
    let k = cname(key)?;
    // SAFETY: `p` and `k` are valid NUL-terminated strings and `value` a live slice for the
    // duration of the call; lsetxattr only reads them.
    let rc = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            k.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    xattr_result(rc, key, name.to_bytes())
}

/// Sets an xattr on an open directory (the opaque marker on a whiteout's directory).
pub(super) fn fsetxattr(dir: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> io::Result<()> {
    let k = cname(key)?;
    // SAFETY: `dir` is an open fd, `k` a valid C string and `value` a live slice.
    let rc = unsafe {
        libc::fsetxattr(
            dir.as_raw_fd(),
            k.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    xattr_result(rc, key, b"<directory>")
}

fn xattr_result(rc: libc::c_int, key: &[u8], name: &[u8]) -> io::Result<()> {
    if rc == 0 {
        return Ok(());
    }
    match Errno::last() {
        Errno::EOPNOTSUPP => {
            tracing::warn!(
                xattr = %String::from_utf8_lossy(key),
                path = %String::from_utf8_lossy(name),
                "ignored xattr in layer: not supported"
            );
            Ok(())
        }
        e => Err(err(
            e,
            &format!("setting xattr {}", String::from_utf8_lossy(key)),
            name,
        )),
    }
}
