//! Unpacks a layer tar (gzip, zstd or plain) into a snapshot directory, converting OCI
//! whiteouts to overlayfs form: `.wh.NAME` → character device 0/0 `NAME`, `.wh..wh..opq` →
//! `trusted.overlay.opaque=y` on the directory. Paths that would escape the directory are
//! refused.

use std::ffi::CString;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use soci_registry::oci::LayerCompression;

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

fn safe_rel(p: &Path) -> io::Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unsafe path {}", p.display()),
                ))
            }
        }
    }
    Ok(out)
}

/// Refuses a path whose parent (inside `dst`) is, or goes through, a symlink.
fn check_parent(dst: &Path, rel: &Path) -> io::Result<()> {
    let mut cur = dst.to_path_buf();
    if let Some(parent) = rel.parent() {
        for c in parent.components() {
            cur.push(c);
            match std::fs::symlink_metadata(&cur) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("path {} goes through a symlink", rel.display()),
                    ))
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::create_dir_all(&cur)?,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "NUL in path"))
}

fn mknod(path: &Path, mode: u32, dev: libc::dev_t) -> io::Result<()> {
    let _ = std::fs::remove_file(path);
    let c = cpath(path)?;
    // SAFETY: c is a valid NUL-terminated path for the duration of the call.
    if unsafe { libc::mknod(c.as_ptr(), mode, dev) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_opaque(dir: &Path) -> io::Result<()> {
    let c = cpath(dir)?;
    let name = c"trusted.overlay.opaque";
    // SAFETY: valid C strings and a 1-byte value buffer.
    if unsafe { libc::lsetxattr(c.as_ptr(), name.as_ptr(), b"y".as_ptr().cast(), 1, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn lchown(path: &Path, uid: u64, gid: u64) -> io::Result<()> {
    let c = cpath(path)?;
    // SAFETY: valid C string.
    if unsafe { libc::lchown(c.as_ptr(), uid as libc::uid_t, gid as libc::gid_t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Unpacks the tar stream `r` into `dst`; returns the number of entries.
pub fn unpack(r: impl Read, dst: &Path) -> io::Result<u64> {
    let mut a = tar::Archive::new(r);
    a.set_preserve_permissions(true);
    a.set_preserve_ownerships(true);
    a.set_preserve_mtime(true);
    a.set_unpack_xattrs(true);
    a.set_overwrite(true);
    let mut n = 0;
    for entry in a.entries()? {
        let mut e = entry?;
        n += 1;
        let raw = e.path()?.into_owned();
        let rel = safe_rel(&raw)?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        check_parent(dst, &rel)?;
        let name = rel
            .file_name()
            .map(|f| f.as_bytes().to_vec())
            .unwrap_or_default();
        let parent = dst.join(rel.parent().unwrap_or(Path::new("")));
        if name == b".wh..wh..opq" {
            set_opaque(&parent)?;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(b".wh.") {
            let target = parent.join(std::ffi::OsStr::from_bytes(hidden));
            if target.is_dir() && !std::fs::symlink_metadata(&target)?.file_type().is_symlink() {
                std::fs::remove_dir_all(&target)?;
            }
            mknod(&target, libc::S_IFCHR, 0)?;
            continue;
        }
        let h = e.header();
        let kind = h.entry_type();
        if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            let perm = h.mode()? & 0o7777;
            let (fmt, dev) = if kind.is_fifo() {
                (libc::S_IFIFO, 0)
            } else {
                let major = h.device_major()?.unwrap_or(0);
                let minor = h.device_minor()?.unwrap_or(0);
                (
                    if kind.is_character_special() {
                        libc::S_IFCHR
                    } else {
                        libc::S_IFBLK
                    },
                    libc::makedev(major, minor),
                )
            };
            let path = dst.join(&rel);
            mknod(&path, fmt | perm, dev)?;
            lchown(&path, h.uid()?, h.gid()?)?;
            continue;
        }
        e.unpack_in(dst)?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    #[test]
    fn whiteouts_devices_and_escapes() {
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |name: &str, kind: tar::EntryType, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, name, data).unwrap();
        };
        add("d/", tar::EntryType::Directory, b"");
        add("d/f", tar::EntryType::Regular, b"hi");
        add("d/.wh.gone", tar::EntryType::Regular, b"");
        add("d/.wh..wh..opq", tar::EntryType::Regular, b"");
        add("p", tar::EntryType::Fifo, b"");
        let t = b.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(unpack(t.as_slice(), dir.path()).unwrap(), 5);
        assert_eq!(std::fs::read(dir.path().join("d/f")).unwrap(), b"hi");
        let w = std::fs::symlink_metadata(dir.path().join("d/gone")).unwrap();
        assert!(w.file_type().is_char_device() && w.rdev() == 0);
        assert!(std::fs::symlink_metadata(dir.path().join("p"))
            .unwrap()
            .file_type()
            .is_fifo());

        // A symlink to outside followed by a file "through" it is refused.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "esc", "/tmp").unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, "esc/owned", &b"x"[..]).unwrap();
        let t = b.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        assert!(unpack(t.as_slice(), dir.path()).is_err());
        assert!(!Path::new("/tmp/owned").exists());
    }
}
