//! Unpacker tests: containerd semantics, and nothing outside the snapshot changes.
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

/// A tar entry with raw name and link bytes (the tar crate refuses `..` and friends).
fn raw(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, name: &[u8], link: &[u8], mode: u32) {
    let data = if kind == tar::EntryType::Regular {
        &b"evil"[..]
    } else {
        &b""[..]
    };
    let mut h = header(kind, data.len());
    h.set_mode(mode);
    h.set_mtime(1);
    h.set_uid(4321);
    h.set_gid(4321);
    h.as_old_mut().name = [0; 100];
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.as_old_mut().linkname = [0; 100];
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    h.set_cksum();
    b.append(&h, data).unwrap();
}

/// Everything observable about a tree that an unpack could change (ctime catches any chmod,
/// chown, link or write, even one undone later).
type Tree =
    std::collections::BTreeMap<std::path::PathBuf, (u32, u32, u32, u64, i64, i64, i64, Vec<u8>)>;

fn observe(dir: &Path, skip: &Path, out: &mut Tree) {
    let m = std::fs::symlink_metadata(dir).unwrap();
    out.insert(
        dir.to_path_buf(),
        (
            m.mode(),
            m.uid(),
            m.gid(),
            m.nlink(),
            m.mtime(),
            m.ctime(),
            m.ctime_nsec(),
            Vec::new(),
        ),
    );
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p == skip {
            continue;
        }
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.is_dir() {
            observe(&p, skip, out);
            continue;
        }
        let content = if m.file_type().is_symlink() {
            std::fs::read_link(&p).unwrap().into_os_string().into_vec()
        } else {
            std::fs::read(&p).unwrap()
        };
        out.insert(
            p,
            (
                m.mode(),
                m.uid(),
                m.gid(),
                m.nlink(),
                m.mtime(),
                m.ctime(),
                m.ctime_nsec(),
                content,
            ),
        );
    }
}

/// A sandbox: `snap` (the unpack target) next to `outside/` holding a file and a dir with
/// known content, modes and times.
struct Sandbox {
    top: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        let top = tempfile::tempdir().unwrap();
        let o = top.path().join("outside");
        std::fs::create_dir_all(o.join("dir")).unwrap();
        std::fs::write(o.join("file"), b"host secret").unwrap();
        std::fs::write(o.join("dir/inner"), b"inner").unwrap();
        for (p, mode) in [("file", 0o644), ("dir", 0o755), ("dir/inner", 0o600)] {
            std::fs::set_permissions(
                o.join(p),
                std::os::unix::fs::PermissionsExt::from_mode(mode),
            )
            .unwrap();
        }
        std::fs::create_dir(top.path().join("snap")).unwrap();
        Sandbox { top }
    }
    fn snap(&self) -> std::path::PathBuf {
        self.top.path().join("snap")
    }
    fn outside(&self) -> std::path::PathBuf {
        self.top.path().join("outside")
    }
    fn observe(&self) -> Tree {
        let mut t = Tree::new();
        observe(self.top.path(), &self.snap(), &mut t);
        t
    }
}

use std::os::unix::ffi::OsStringExt;

#[test]
fn hardlink_to_symlink_does_not_touch_its_target() {
    let s = Sandbox::new();
    let before = s.observe();
    let outside_file = s.outside().join("file");
    let mut b = tar::Builder::new(Vec::new());
    raw(
        &mut b,
        tar::EntryType::Symlink,
        b"abs",
        outside_file.as_os_str().as_bytes(),
        0o777,
    );
    raw(
        &mut b,
        tar::EntryType::Symlink,
        b"rel",
        b"../outside/file",
        0o777,
    );
    raw(&mut b, tar::EntryType::Link, b"h1", b"abs", 0o4777);
    raw(&mut b, tar::EntryType::Link, b"h2", b"rel", 0o4777);
    let t = b.into_inner().unwrap();
    let r = unpack(t.as_slice(), &s.snap());
    assert_eq!(s.observe(), before, "outside changed (unpack: {r:?})");
    r.unwrap();
    // The links are links to the symlinks themselves.
    let h = std::fs::symlink_metadata(s.snap().join("h1")).unwrap();
    assert!(h.file_type().is_symlink() && h.nlink() == 2 && h.uid() == 4321);
    assert_eq!(
        std::fs::read_link(s.snap().join("h2")).unwrap(),
        Path::new("../outside/file")
    );
}

#[test]
fn directory_replaced_by_symlink_does_not_touch_its_target() {
    for target in [
        s_abs as fn(&Sandbox) -> Vec<u8>,
        |_: &Sandbox| b"../outside/dir".to_vec(),
        |_: &Sandbox| b"/".to_vec(),
    ] {
        let s = Sandbox::new();
        let before = s.observe();
        let mut b = tar::Builder::new(Vec::new());
        raw(&mut b, tar::EntryType::Directory, b"d/", b"", 0o7777);
        raw(&mut b, tar::EntryType::Regular, b"d/inner", b"", 0o4777);
        raw(&mut b, tar::EntryType::Symlink, b"d", &target(&s), 0o777);
        raw(&mut b, tar::EntryType::Directory, b"e/", b"", 0o777);
        raw(&mut b, tar::EntryType::Regular, b"e/f", b"", 0o644);
        let t = b.into_inner().unwrap();
        let r = unpack(t.as_slice(), &s.snap());
        assert_eq!(s.observe(), before, "outside changed (unpack: {r:?})");
        r.unwrap();
        // Entries under the symlink afterwards: resolved inside the snapshot or refused.
        let mut b = tar::Builder::new(Vec::new());
        raw(&mut b, tar::EntryType::Directory, b"d/", b"", 0o7777);
        raw(&mut b, tar::EntryType::Regular, b"d/inner", b"", 0o4777);
        raw(&mut b, tar::EntryType::Regular, b"d/new", b"", 0o4777);
        raw(&mut b, tar::EntryType::Link, b"d/hl", b"e/f", 0o4777);
        raw(&mut b, tar::EntryType::Regular, b"d/../d/x", b"", 0o4777);
        let t = b.into_inner().unwrap();
        let r = unpack(t.as_slice(), &s.snap());
        assert_eq!(
            s.observe(),
            before,
            "outside changed (second unpack: {r:?})"
        );
    }
}

fn s_abs(s: &Sandbox) -> Vec<u8> {
    s.outside().join("dir").into_os_string().into_vec()
}

#[test]
fn invalid_whiteouts_are_refused() {
    for name in [
        &b".wh.."[..],
        b".wh.",
        b".wh...",
        b"a/.wh..",
        b"a/.wh...",
        b"a/b/.wh.",
        b"./.wh..",
    ] {
        let s = Sandbox::new();
        // Like the daemon's staging dir: the snapshot's parent holds other pulls' dirs.
        std::fs::create_dir(s.snap().join("a")).unwrap();
        std::fs::write(s.snap().join("a/keep"), b"k").unwrap();
        let before = s.observe();
        let mut b = tar::Builder::new(Vec::new());
        raw(&mut b, tar::EntryType::Regular, name, b"", 0o644);
        let t = b.into_inner().unwrap();
        let r = unpack(t.as_slice(), &s.snap());
        let msg = format!("{:?}", r);
        assert!(
            msg.contains("invalid whiteout name"),
            "{:?}: {msg}",
            String::from_utf8_lossy(name)
        );
        assert_eq!(
            s.observe(),
            before,
            "outside changed for {:?}",
            String::from_utf8_lossy(name)
        );
        assert!(s.snap().join("a/keep").exists());
    }
}

#[test]
fn escapes_are_refused_or_confined() {
    let s = Sandbox::new();
    let before = s.observe();
    let mut b = tar::Builder::new(Vec::new());
    raw(
        &mut b,
        tar::EntryType::Symlink,
        b"esc",
        s.outside().as_os_str().as_bytes(),
        0o777,
    );
    raw(&mut b, tar::EntryType::Regular, b"esc/owned", b"", 0o644);
    let t = b.into_inner().unwrap();
    // containerd would create the symlink's target inside the root; we refuse.
    assert!(unpack(t.as_slice(), &s.snap()).is_err());
    assert_eq!(s.observe(), before);
    // `..` stops at the root, as in containerd: `../../x` is `x`.
    for name in [&b"../x"[..], b"../../y", b"a/../../../z", b"/abs"] {
        let mut b = tar::Builder::new(Vec::new());
        raw(&mut b, tar::EntryType::Regular, name, b"", 0o644);
        let t = b.into_inner().unwrap();
        unpack(t.as_slice(), &s.snap()).unwrap();
    }
    for f in ["x", "y", "z", "abs"] {
        assert_eq!(std::fs::read(s.snap().join(f)).unwrap(), b"evil", "{f}");
    }
    assert_eq!(s.observe(), before);
    // Symlinks inside the root resolve inside it: `lib -> /usr/lib` then `lib/a`.
    let mut b = tar::Builder::new(Vec::new());
    raw(&mut b, tar::EntryType::Directory, b"usr/lib/", b"", 0o755);
    raw(&mut b, tar::EntryType::Symlink, b"lib", b"/usr/lib", 0o777);
    raw(&mut b, tar::EntryType::Regular, b"lib/a", b"", 0o644);
    raw(
        &mut b,
        tar::EntryType::Symlink,
        b"up",
        b"../../../..",
        0o777,
    );
    raw(&mut b, tar::EntryType::Regular, b"up/b", b"", 0o644);
    let t = b.into_inner().unwrap();
    unpack(t.as_slice(), &s.snap()).unwrap();
    assert_eq!(std::fs::read(s.snap().join("usr/lib/a")).unwrap(), b"evil");
    assert_eq!(std::fs::read(s.snap().join("b")).unwrap(), b"evil");
    assert_eq!(s.observe(), before);
}

#[test]
fn replacing_a_directory_removes_it_without_following_symlinks() {
    let s = Sandbox::new();
    let before = s.observe();
    let mut b = tar::Builder::new(Vec::new());
    raw(&mut b, tar::EntryType::Directory, b"d/", b"", 0o755);
    raw(
        &mut b,
        tar::EntryType::Symlink,
        b"d/out",
        s.outside().as_os_str().as_bytes(),
        0o777,
    );
    raw(
        &mut b,
        tar::EntryType::Symlink,
        b"d/rel",
        b"../../outside",
        0o777,
    );
    raw(
        &mut b,
        tar::EntryType::Directory,
        b"d/sub/deeper/",
        b"",
        0o755,
    );
    raw(
        &mut b,
        tar::EntryType::Regular,
        b"d/sub/deeper/f",
        b"",
        0o644,
    );
    raw(&mut b, tar::EntryType::Regular, b"d", b"", 0o644);
    raw(
        &mut b,
        tar::EntryType::Symlink,
        b"w",
        s.outside().as_os_str().as_bytes(),
        0o777,
    );
    raw(&mut b, tar::EntryType::Regular, b".wh.w", b"", 0o644);
    let t = b.into_inner().unwrap();
    unpack(t.as_slice(), &s.snap()).unwrap();
    assert_eq!(s.observe(), before);
    assert_eq!(std::fs::read(s.snap().join("d")).unwrap(), b"evil");
    let w = std::fs::symlink_metadata(s.snap().join("w")).unwrap();
    assert!(w.file_type().is_char_device() && w.rdev() == 0 && w.uid() == 4321);
}

#[test]
fn devices_fifos_xattrs_and_modes() {
    let s = Sandbox::new();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Char, 0);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    h.set_mode(0o666);
    b.append_data(&mut h, "dev/null", &b""[..]).unwrap();
    let mut h = header(tar::EntryType::Block, 0);
    h.set_device_major(7).unwrap();
    h.set_device_minor(0).unwrap();
    b.append_data(&mut h, "dev/loop0", &b""[..]).unwrap();
    b.append_pax_extensions([
        ("SCHILY.xattr.user.k", &b"v"[..]),
        ("SCHILY.xattr.trusted.t", &b"x"[..]),
    ])
    .unwrap();
    let mut h = header(tar::EntryType::Regular, 1);
    h.set_mode(0o4755);
    b.append_data(&mut h, "bin/su", &b"s"[..]).unwrap();
    b.append_pax_extensions([("SCHILY.xattr.trusted.sym", &b"y"[..])])
        .unwrap();
    b.append_link(&mut header(tar::EntryType::Symlink, 0), "bin/sym", "su")
        .unwrap();
    let mut h = header(tar::EntryType::Directory, 0);
    h.set_mode(0o1777);
    b.append_data(&mut h, "tmp/", &b""[..]).unwrap();
    b.append_data(
        &mut header(tar::EntryType::Regular, 0),
        ".wh..wh..opq",
        &b""[..],
    )
    .unwrap();
    let t = b.into_inner().unwrap();
    unpack(t.as_slice(), &s.snap()).unwrap();
    let m = std::fs::symlink_metadata(s.snap().join("dev/null")).unwrap();
    assert!(m.file_type().is_char_device());
    assert_eq!(
        (m.rdev(), m.mode() & 0o7777, m.uid()),
        (libc::makedev(1, 3), 0o666, 1000)
    );
    let m = std::fs::symlink_metadata(s.snap().join("dev/loop0")).unwrap();
    assert!(m.file_type().is_block_device() && m.rdev() == libc::makedev(7, 0));
    // Missing parents are created 0755.
    assert_eq!(
        std::fs::metadata(s.snap().join("dev")).unwrap().mode() & 0o7777,
        0o755
    );
    let su = s.snap().join("bin/su");
    let m = std::fs::metadata(&su).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o4755, 1000, 1001));
    let get = |p: &Path, k: &str| {
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        let k = std::ffi::CString::new(k).unwrap();
        let mut buf = [0u8; 16];
        // SAFETY: valid C strings and buffer.
        let n =
            unsafe { libc::lgetxattr(c.as_ptr(), k.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        (n >= 0).then(|| buf[..n as usize].to_vec())
    };
    assert_eq!(get(&su, "user.k").as_deref(), Some(&b"v"[..]));
    assert_eq!(get(&su, "trusted.t").as_deref(), Some(&b"x"[..]));
    assert_eq!(
        get(&s.snap().join("bin/sym"), "trusted.sym").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(get(&s.snap().join("bin/sym"), "trusted.t"), None);
    assert_eq!(
        get(&s.snap(), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        std::fs::metadata(s.snap().join("tmp")).unwrap().mode() & 0o7777,
        0o1777
    );
}
