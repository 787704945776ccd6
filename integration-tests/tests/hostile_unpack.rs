//! Hostile layers pulled in full by the daemon itself (no SOCI index) change nothing outside
//! the snapshot: a hardlink to a symlink at a host file with a set-id, world-writable header
//! mode, a directory replaced by a symlink to a host directory, and whiteouts naming `.`/`..`
//! (which once deleted the daemon's `<root>/tmp`, where other pulls stage). The daemon keeps
//! serving and a benign image still runs.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use integration_tests::containerd::Containerd;
use integration_tests::daemon::SociDaemon;
use integration_tests::image::{
    busybox_layer, push_busybox_image, Compression, Entry, LayoutWriter,
};
use integration_tests::registry::Registry;
use integration_tests::{bin, run};

type Seen = Vec<(PathBuf, u32, u32, u64, i64, i64, i64, Vec<u8>)>;

/// Mode, owner, links, mtime, ctime and content of everything under `dir`.
fn observe(dir: &Path) -> Seen {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        let body = if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
            Vec::new()
        } else {
            std::fs::read(&p).unwrap()
        };
        out.push((
            p,
            m.mode(),
            m.uid(),
            m.nlink(),
            m.mtime(),
            m.ctime(),
            m.ctime_nsec(),
            body,
        ));
    }
    out.sort();
    out
}

fn header(kind: tar::EntryType, mode: u32, size: usize) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1);
    h.set_size(size as u64);
    h
}

/// Pushes busybox + `layer` (a raw tar) as `REGISTRY/name:v1`, with no SOCI index.
fn push_raw(reg: &Registry, dir: &Path, name: &str, layer: Vec<u8>) -> String {
    let mut w = LayoutWriter::new(&dir.join(name));
    let m = w.manifest_from_tars(
        "amd64",
        &busybox_layer(),
        &[layer],
        Compression::Gzip,
        &["/bin/true"],
    );
    w.tag_manifest(&m, "v1");
    reg.push_layout(&w.dir, "v1", &format!("{name}:v1"), None);
    format!("{}/{name}:v1", reg.addr)
}

fn rpull(ctd: &Containerd, image: &str) -> Result<String, String> {
    run(Command::new(bin("soci")).arg("-a").arg(&ctd.socket).args([
        "image",
        "rpull",
        "--plain-http",
        image,
    ]))
    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    .map_err(|e| e.to_string())
}

#[test]
fn hostile_full_pull_layers_change_nothing_outside_the_snapshot() {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("unpack-it")
        .tempdir_in("/tmp")
        .unwrap();
    // The host canary: outside every root the test or the daemon uses.
    let canary = tempfile::Builder::new()
        .prefix("unpack-canary")
        .tempdir_in("/tmp")
        .unwrap();
    let host_file = canary.path().join("passwd");
    let host_dir = canary.path().join("etc");
    std::fs::write(&host_file, b"root:x:0:0\n").unwrap();
    std::fs::create_dir(&host_dir).unwrap();
    std::fs::write(host_dir.join("shadow"), b"secret\n").unwrap();
    for (p, mode) in [(&host_file, 0o644), (&host_dir, 0o755)] {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    }
    let before = observe(canary.path());

    let cfg = format!(
        "[resolver]\nplain_http_hosts = [\"{}\"]\n[background_fetch]\ndisable = true\n[pull_modes.parallel_pull_unpack]\nenable = true\n",
        reg.addr
    );
    let daemon = SociDaemon::start(&tmp.path().join("d"), &cfg);
    let ctd = Containerd::start_with_soci(&daemon.socket);
    // Another pull's staging directory, as the daemon keeps them in `<root>/tmp`.
    let staging = daemon.root.join("tmp");
    let sibling = staging.join("unpack-other-pull");
    std::fs::create_dir_all(&sibling).unwrap();
    std::fs::write(sibling.join("layer-file"), b"x").unwrap();

    // 1. Whiteouts naming the directory itself or its parent.
    for (i, name) in [".wh...", ".wh..", "a/.wh...", ".wh."]
        .into_iter()
        .enumerate()
    {
        let mut b = tar::Builder::new(Vec::new());
        b.append_data(
            &mut header(tar::EntryType::Directory, 0o755, 0),
            "a/",
            &b""[..],
        )
        .unwrap();
        let mut h = header(tar::EntryType::Regular, 0o644, 0);
        h.as_old_mut().name = [0; 100];
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        b.append(&h, &b""[..]).unwrap();
        let img = push_raw(
            &reg,
            tmp.path(),
            &format!("unpack-wh{i}"),
            b.into_inner().unwrap(),
        );
        let r = rpull(&ctd, &img);
        assert!(
            staging.is_dir() && sibling.join("layer-file").exists(),
            "{name}: the daemon's {} lost (rpull: {r:?})",
            staging.display()
        );
        let e = r.expect_err("a layer with an invalid whiteout pulled");
        assert!(e.contains("invalid whiteout name"), "{name}: {e}");
    }
    // 2. Hardlinks to symlinks at the host file (absolute and relative), with mode 04777, and a
    //    directory replaced by a symlink to a host directory after its entry was recorded.
    let mut b = tar::Builder::new(Vec::new());
    let up = "../".repeat(24);
    let rel_file = format!("{up}{}", host_file.display());
    for (name, target) in [("abs", host_file.display().to_string()), ("rel", rel_file)] {
        b.append_link(
            &mut header(tar::EntryType::Symlink, 0o777, 0),
            name,
            &target,
        )
        .unwrap();
        b.append_link(
            &mut header(tar::EntryType::Link, 0o4777, 0),
            format!("{name}-hard"),
            name,
        )
        .unwrap();
    }
    b.append_data(
        &mut header(tar::EntryType::Directory, 0o7777, 0),
        "d/",
        &b""[..],
    )
    .unwrap();
    b.append_link(
        &mut header(tar::EntryType::Symlink, 0o777, 0),
        "d",
        host_dir.display().to_string(),
    )
    .unwrap();
    b.append_data(
        &mut header(tar::EntryType::Directory, 0o777, 0),
        "e/",
        &b""[..],
    )
    .unwrap();
    b.append_data(
        &mut header(tar::EntryType::Regular, 0o4777, 1),
        "e/f",
        &b"x"[..],
    )
    .unwrap();
    let img = push_raw(&reg, tmp.path(), "unpack-links", b.into_inner().unwrap());
    let r = rpull(&ctd, &img);
    assert_eq!(
        observe(canary.path()),
        before,
        "host canary changed (rpull: {r:?})"
    );
    let out = r.expect("links image pulls");
    assert!(out.contains("full pull"), "{out}");

    assert_eq!(observe(canary.path()), before, "host canary changed");

    // The daemon still answers: a benign image pulls in full and runs.
    let benign = push_busybox_image(
        &reg,
        tmp.path(),
        "unpack-benign",
        vec![
            Entry::Dir("data/".into()),
            Entry::File("data/msg".into(), b"benign ok\n".to_vec(), 0o644),
            Entry::Symlink("data/link".into(), "msg".into()),
            Entry::Hardlink("data/hard".into(), "data/msg".into()),
        ],
        &["/bin/sh", "-c", "cat /data/msg /data/link /data/hard"],
    );
    let img = format!("{benign}:v1");
    let out = rpull(&ctd, &img).expect("benign image pulls");
    assert!(out.contains("full pull"), "{out}");
    let out = ctd.ctr_ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "soci",
        &img,
        "unpack-benign",
    ]);
    assert_eq!(out, "benign ok\nbenign ok\nbenign ok\n");
    assert_eq!(observe(canary.path()), before, "host canary changed");
}
