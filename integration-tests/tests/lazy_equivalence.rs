//! Every file of a multi-layer image seen through lazily mounted layers equals the same image
//! pulled with containerd's overlayfs snapshotter: contents, modes, owners, times, symlinks,
//! hardlinks, whiteouts and opaque directories; xattrs are checked on the FUSE mounts.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::process::Command;

use integration_tests::containerd::Containerd;
use integration_tests::daemon::SociDaemon;
use integration_tests::image::{busybox_layer, random_bytes, Compression, LayoutWriter};
use integration_tests::registry::Registry;
use integration_tests::{bin, run};

fn tar_layer(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    build(&mut b);
    b.into_inner().unwrap()
}

fn h(kind: tar::EntryType, mode: u32, uid: u64, size: usize) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(uid);
    h.set_mtime(1_650_000_000 + uid);
    h.set_size(size as u64);
    h
}

fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, uid: u64, data: &[u8]) {
    b.append_data(
        &mut h(tar::EntryType::Regular, mode, uid, data.len()),
        path,
        data,
    )
    .unwrap();
}

fn dir(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, uid: u64) {
    b.append_data(
        &mut h(tar::EntryType::Directory, mode, uid, 0),
        path,
        &b""[..],
    )
    .unwrap();
}

fn link(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, target: &str) {
    b.append_link(&mut h(kind, 0o777, 0, 0), path, target)
        .unwrap();
}

/// Raw layers: the OCI layout writer takes entries, so this test writes tars itself.
fn layers() -> Vec<Vec<u8>> {
    let l1 = tar_layer(|b| {
        dir(b, "app/", 0o755, 0);
        file(b, "app/exec", 0o4755, 0, b"#!/bin/sh\necho hi\n");
        file(b, "app/secret", 0o600, 1000, b"secret");
        file(b, "app/empty", 0o644, 0, b"");
        file(b, "app/big", 0o644, 0, &random_bytes(700_000, 5));
        file(b, "app/delete-me", 0o644, 0, b"gone soon");
        file(b, "app/changed", 0o644, 0, b"v1");
        link(b, tar::EntryType::Symlink, "app/rel-link", "big");
        link(b, tar::EntryType::Symlink, "app/abs-link", "/app/secret");
        link(b, tar::EntryType::Symlink, "app/dangling", "/nowhere");
        link(b, tar::EntryType::Link, "app/hard", "app/big");
        dir(b, "opq/", 0o755, 0);
        file(b, "opq/old", 0o644, 0, b"hidden by opaque");
        dir(b, "gone/", 0o755, 0);
        file(b, "gone/inside", 0o644, 0, b"x");
    });
    let l2 = tar_layer(|b| {
        dir(b, "app/", 0o755, 0);
        file(b, "app/.wh.delete-me", 0o644, 0, b"");
        file(b, "app/changed", 0o640, 7, b"v2");
        file(b, ".wh.gone", 0o644, 0, b"");
        dir(b, "opq/", 0o700, 3);
        file(b, "opq/.wh..wh..opq", 0o644, 0, b"");
        file(b, "opq/new", 0o644, 0, b"new in opaque dir");
        b.append_pax_extensions([("SCHILY.xattr.user.color", &b"blue"[..])])
            .unwrap();
        file(b, "app/xattr", 0o644, 0, b"with xattr");
    });
    let l3 = tar_layer(|b| {
        dir(b, "data/", 0o755, 0);
        for i in 0..3u64 {
            file(
                b,
                &format!("data/f{i}"),
                0o644,
                0,
                &random_bytes(300_000, 20 + i),
            );
        }
        link(b, tar::EntryType::Link, "data/f0-again", "data/f0");
    });
    vec![l1, l2, l3]
}

const LISTING: &str =
    "cd / && find app opq data bin etc gone -print 2>/dev/null | sort | while read f; do \
stat -c '%n %a %u %g %h %F %s %Y' \"$f\"; \
if [ -L \"$f\" ]; then readlink \"$f\"; elif [ -f \"$f\" ]; then sha256sum \"$f\"; fi; done";

fn getxattr(path: &std::path::Path, name: &str) -> Option<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a live buffer of the given size.
    let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then(|| buf[..r as usize].to_vec())
}

#[test]
fn lazy_rootfs_equals_overlayfs_rootfs() {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("soci-eq")
        .tempdir_in("/tmp")
        .unwrap();
    let mut w = LayoutWriter::new(&tmp.path().join("eq"));
    let raw = layers();
    let m = w.manifest_from_tars(
        "amd64",
        &busybox_layer(),
        &raw,
        Compression::Gzip,
        &["/bin/sh", "-c", LISTING],
    );
    w.tag_manifest(&m, "v1");
    reg.push_layout(&w.dir, "v1", "eq:v1", None);
    let repo = format!("{}/eq", reg.addr);
    run(Command::new(bin("soci")).args([
        "convert",
        "--plain-http",
        "--min-layer-size",
        "1",
        "--span-size",
        "65536",
        &format!("docker://{repo}:v1"),
        &format!("docker://{repo}:soci"),
    ]))
    .unwrap();

    let cfg = format!(
        "[resolver]\nplain_http_hosts = [\"{}\"]\n[background_fetch]\ndisable = true\n",
        reg.addr
    );
    let daemon = SociDaemon::start(&tmp.path().join("d"), &cfg);
    let proxy = format!(
        "[proxy_plugins]\n  [proxy_plugins.soci]\n    type = \"snapshot\"\n    address = \"{}\"\n",
        daemon.socket.display()
    );
    let ctd = Containerd::start(&proxy);

    let image = format!("{repo}:soci");
    let mode = run(Command::new(bin("soci")).arg("-a").arg(&ctd.socket).args([
        "image",
        "rpull",
        "--plain-http",
        &image,
    ]))
    .unwrap();
    let mode = String::from_utf8_lossy(&mode.stdout).into_owned();
    assert!(
        mode.contains("snapshotter: soci (lazy: 4 of 4 layers)"),
        "{mode}"
    );
    let lazy = ctd.ctr_ok(&["run", "--rm", "--snapshotter", "soci", &image, "eq-lazy"]);

    ctd.ctr_ok(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "overlayfs",
        &format!("{repo}:v1"),
    ]);
    let plain = ctd.ctr_ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "overlayfs",
        &format!("{repo}:v1"),
        "eq-plain",
    ]);
    // containerd applies a hardlink header's owner, mode and time to the shared inode.
    assert!(
        plain.contains("app/big 777 0 0 2 regular file 700000"),
        "{plain}"
    );
    assert!(
        !plain.contains("delete-me") && !plain.contains("gone") && !plain.contains("opq/old"),
        "{plain}"
    );
    assert!(plain.contains("opq/new"), "{plain}");
    assert_eq!(lazy, plain, "lazy and overlayfs views differ");

    // xattrs and the opaque marker, read on the lazily mounted layers themselves.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let fuse: Vec<std::path::PathBuf> = mounts
        .lines()
        .filter(|l| l.contains(" - fuse.soci soci ") && l.contains(daemon.root.to_str().unwrap()))
        .filter_map(|l| l.split_whitespace().nth(4).map(std::path::PathBuf::from))
        .collect();
    assert_eq!(fuse.len(), 4, "{mounts}");
    let with_xattr = fuse
        .iter()
        .find(|p| p.join("app/xattr").exists())
        .expect("layer 2 mounted");
    assert_eq!(
        getxattr(&with_xattr.join("app/xattr"), "user.color").as_deref(),
        Some(&b"blue"[..])
    );
    assert_eq!(
        getxattr(&with_xattr.join("opq"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
}
