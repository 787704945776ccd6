//! Unpacks a layer tar (gzip, zstd or plain) into a snapshot directory with the same tar
//! reader the zTOC builder uses (Go `archive/tar` semantics, so a layer unpacks exactly as it is
//! served lazily and as containerd would unpack it), converting OCI whiteouts to overlayfs
//! form: `.wh.NAME` → character device 0/0 `NAME`, `.wh..wh..opq` → `trusted.overlay.opaque=y`.
//! Paths that would escape the directory, directly or through a symlink, are refused.

use std::ffi::{CString, OsStr};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use soci_registry::oci::LayerCompression;
use soci_ztoc::tar::{TarEntry, TarWalker};
use soci_ztoc::{EntryKind, XATTR_PAX_PREFIX};

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

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// A relative path from a tar name, refusing `..`.
fn safe_rel(name: &[u8]) -> io::Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in name.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(invalid(format!(
                    "unsafe path {:?}",
                    String::from_utf8_lossy(name)
                )))
            }
            c => out.push(OsStr::from_bytes(c)),
        }
    }
    Ok(out)
}

/// Creates missing parents of `rel` under `dst`; refuses parents that are symlinks.
fn prepare_parent(dst: &Path, rel: &Path) -> io::Result<()> {
    let mut cur = dst.to_path_buf();
    if let Some(parent) = rel.parent() {
        for c in parent.components() {
            cur.push(c);
            match std::fs::symlink_metadata(&cur) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(invalid(format!(
                        "path {} goes through a symlink",
                        rel.display()
                    )))
                }
                Ok(m) if !m.is_dir() => {
                    std::fs::remove_file(&cur)?;
                    std::fs::create_dir(&cur)?;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::create_dir(&cur)?,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| invalid("NUL in path".into()))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Removes whatever is at `p` (not following symlinks) unless it is a directory and `keep_dir`.
fn clear(p: &Path, keep_dir: bool) -> io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() && keep_dir => Ok(()),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn mknod(path: &Path, mode: u32, dev: libc::dev_t) -> io::Result<()> {
    let c = cpath(path)?;
    // SAFETY: c is a valid NUL-terminated path for the duration of the call.
    check(unsafe { libc::mknod(c.as_ptr(), mode, dev) })
}

fn lsetxattr(path: &Path, name: &[u8], value: &[u8]) -> io::Result<()> {
    let c = cpath(path)?;
    let n = CString::new(name).map_err(|_| invalid("NUL in xattr name".into()))?;
    // SAFETY: valid C strings; value pointer and length describe a live slice.
    check(unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
}

/// Ownership, permissions and times, without following symlinks.
fn set_meta(path: &Path, e: &TarEntry, kind: EntryKind) -> io::Result<()> {
    let c = cpath(path)?;
    // SAFETY: valid C string.
    check(unsafe { libc::lchown(c.as_ptr(), e.uid as libc::uid_t, e.gid as libc::gid_t) })?;
    if kind != EntryKind::Symlink {
        // SAFETY: valid C string.
        check(unsafe { libc::chmod(c.as_ptr(), (e.mode & 0o7777) as libc::mode_t) })?;
    }
    let ts = libc::timespec {
        tv_sec: e.mtime.0 as libc::time_t,
        tv_nsec: e.mtime.1 as libc::c_long,
    };
    let times = [ts, ts];
    // SAFETY: valid C string and a two-element timespec array.
    check(unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

/// Unpacks the tar stream `r` into `dst`; returns the number of entries.
pub fn unpack(r: impl Read, dst: &Path) -> io::Result<u64> {
    let mut w = TarWalker::new(io::BufReader::with_capacity(1 << 20, r));
    let mut n = 0;
    let mut dirs = Vec::new();
    let tar_err = |e: soci_ztoc::tar::TarError| invalid(e.to_string());
    let mut buf = vec![0u8; 1 << 20];
    while let Some(e) = w.next_entry().map_err(tar_err)? {
        n += 1;
        let rel = safe_rel(&e.name)?;
        if rel.as_os_str().is_empty() {
            if e.kind == EntryKind::Directory {
                dirs.push((dst.to_path_buf(), e));
            }
            continue;
        }
        prepare_parent(dst, &rel)?;
        let path = dst.join(&rel);
        let base = rel
            .file_name()
            .map(|f| f.as_bytes().to_vec())
            .unwrap_or_default();
        if base == b".wh..wh..opq" {
            lsetxattr(
                path.parent().unwrap_or(dst),
                b"trusted.overlay.opaque",
                b"y",
            )?;
            continue;
        }
        if let Some(hidden) = base.strip_prefix(b".wh.") {
            let target = path.with_file_name(OsStr::from_bytes(hidden));
            clear(&target, false)?;
            mknod(&target, libc::S_IFCHR, 0)?;
            continue;
        }
        clear(&path, e.kind == EntryKind::Directory)?;
        match e.kind {
            EntryKind::Directory => {
                if !path.exists() {
                    std::fs::create_dir(&path)?;
                }
            }
            EntryKind::Regular => {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)?;
                loop {
                    let k = w.read_data(&mut buf).map_err(tar_err)?;
                    if k == 0 {
                        break;
                    }
                    f.write_all(&buf[..k])?;
                }
            }
            EntryKind::Symlink => {
                std::os::unix::fs::symlink(OsStr::from_bytes(&e.linkname), &path)?
            }
            EntryKind::Hardlink => {
                let target = dst.join(safe_rel(&e.linkname)?);
                prepare_parent(dst, &safe_rel(&e.linkname)?)?;
                std::fs::hard_link(&target, &path)?;
            }
            EntryKind::Char | EntryKind::Block | EntryKind::Fifo => {
                let (fmt, dev) = match e.kind {
                    EntryKind::Fifo => (libc::S_IFIFO, 0),
                    EntryKind::Char => (
                        libc::S_IFCHR,
                        libc::makedev(e.devmajor as u32, e.devminor as u32),
                    ),
                    _ => (
                        libc::S_IFBLK,
                        libc::makedev(e.devmajor as u32, e.devminor as u32),
                    ),
                };
                mknod(&path, fmt | (e.mode as u32 & 0o7777), dev)?;
            }
        }
        for (k, v) in &e.pax {
            if let Some(name) = k.strip_prefix(XATTR_PAX_PREFIX) {
                lsetxattr(&path, name, v)?;
            }
        }
        // Like containerd's unpack, a hardlink's header also sets the shared inode's metadata.
        if e.kind == EntryKind::Directory {
            dirs.push((path, e));
        } else {
            let kind = e.kind;
            set_meta(&path, &e, kind)?;
        }
    }
    // Directory times last: creating their children changed them.
    for (p, e) in dirs.iter().rev() {
        set_meta(p, e, EntryKind::Directory)?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    fn header(kind: tar::EntryType, size: usize) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o640);
        h.set_uid(1000);
        h.set_gid(1001);
        h.set_mtime(1_700_000_000);
        h.set_size(size as u64);
        h
    }

    #[test]
    fn whiteouts_devices_links_and_metadata() {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data) in [
            ("d/", tar::EntryType::Directory, &b""[..]),
            ("d/f", tar::EntryType::Regular, &b"hi"[..]),
            ("d/.wh.gone", tar::EntryType::Regular, &b""[..]),
            ("d/.wh..wh..opq", tar::EntryType::Regular, &b""[..]),
            ("p", tar::EntryType::Fifo, &b""[..]),
        ] {
            b.append_data(&mut header(kind, data.len()), name, data)
                .unwrap();
        }
        b.append_link(&mut header(tar::EntryType::Link, 0), "d/hard", "d/f")
            .unwrap();
        b.append_link(&mut header(tar::EntryType::Symlink, 0), "sym", "d/f")
            .unwrap();
        let t = b.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(unpack(t.as_slice(), dir.path()).unwrap(), 7);
        let f = dir.path().join("d/f");
        assert_eq!(std::fs::read(&f).unwrap(), b"hi");
        let m = std::fs::metadata(&f).unwrap();
        assert_eq!(
            (m.mode() & 0o7777, m.uid(), m.gid(), m.mtime()),
            (0o640, 1000, 1001, 1_700_000_000)
        );
        assert_eq!(m.nlink(), 2);
        let w = std::fs::symlink_metadata(dir.path().join("d/gone")).unwrap();
        assert!(w.file_type().is_char_device() && w.rdev() == 0);
        assert!(std::fs::symlink_metadata(dir.path().join("p"))
            .unwrap()
            .file_type()
            .is_fifo());
        assert_eq!(
            std::fs::read_link(dir.path().join("sym")).unwrap(),
            Path::new("d/f")
        );
        assert_eq!(
            std::fs::metadata(dir.path().join("d")).unwrap().mtime(),
            1_700_000_000
        );
    }

    #[test]
    fn stream_ending_right_after_data_is_accepted() {
        // umoci writes layers without padding or end blocks; Go's reader (containerd) accepts them.
        let mut b = tar::Builder::new(Vec::new());
        b.append_data(&mut header(tar::EntryType::Regular, 3), "a", &b"abc"[..])
            .unwrap();
        let t = b.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(unpack(&t[..515], dir.path()).unwrap(), 1);
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), b"abc");
        let dir = tempfile::tempdir().unwrap();
        assert!(
            unpack(&t[..514], dir.path()).is_err(),
            "truncated data is an error"
        );
    }

    #[test]
    fn escapes_are_refused() {
        let mut b = tar::Builder::new(Vec::new());
        b.append_link(&mut header(tar::EntryType::Symlink, 0), "esc", "/tmp")
            .unwrap();
        b.append_data(
            &mut header(tar::EntryType::Regular, 1),
            "esc/owned-by-soci-test",
            &b"x"[..],
        )
        .unwrap();
        let t = b.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        assert!(unpack(t.as_slice(), dir.path()).is_err());
        assert!(!Path::new("/tmp/owned-by-soci-test").exists());
        let mut raw = header(tar::EntryType::Regular, 1);
        raw.as_old_mut().name[..6].copy_from_slice(b"../x\0\0");
        raw.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append(&raw, &b"x"[..]).unwrap();
        let t = b.into_inner().unwrap();
        assert!(unpack(t.as_slice(), dir.path()).is_err());
    }
}
