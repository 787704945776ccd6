//! `soci ztoc` against layers made by real GNU tar and gzip.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;

use integration_tests::{bin, require, run, sha256_hex};

/// A tree with long names, deep paths, symlinks, hardlinks, empty and large files.
fn make_tree(root: &Path) {
    let deep = root.join("a").join("b".repeat(120)).join("c".repeat(90));
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("long-file-name-".repeat(12)), b"deep contents\n").unwrap();
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("etc/hostname"), b"soci-rs\n").unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(root.join("big.bin"), &big).unwrap();
    let text: Vec<u8> = (0..2_000_000u32)
        .flat_map(|i| format!("line {i}\n").into_bytes())
        .collect();
    fs::write(root.join("etc/text"), &text).unwrap();
    symlink("etc/hostname", root.join("link")).unwrap();
    fs::hard_link(root.join("etc/hostname"), root.join("hard")).unwrap();
    fs::create_dir_all(root.join("wh")).unwrap();
    fs::write(root.join("wh/.wh.gone"), b"").unwrap();
    fs::write(root.join("wh/.wh..wh..opq"), b"").unwrap();
}

fn regular_files(tar_path: &Path) -> Vec<String> {
    let out = run(Command::new("tar").arg("-tvf").arg(tar_path)).unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with('-'))
        .map(|l| l.split_whitespace().skip(5).collect::<Vec<_>>().join(" "))
        .collect()
}

fn check_layer(dir: &Path, tree: &str, format: &str, multi_member: bool) {
    let soci = bin("soci");
    let tar_path = dir.join(format!("{format}.tar"));
    run(Command::new("tar")
        .arg(format!("--format={format}"))
        .arg("-C")
        .arg(dir.join(tree))
        .arg("-cf")
        .arg(&tar_path)
        .arg("."))
    .unwrap();
    let gz_path = dir.join(format!("{format}.tar.gz"));
    if multi_member {
        // Two gzip members, split in the middle of the tar stream.
        let t = fs::read(&tar_path).unwrap();
        let (a, b) = t.split_at(t.len() / 2 + 1234);
        let mut out = Vec::new();
        for part in [a, b] {
            let p = dir.join("part");
            fs::write(&p, part).unwrap();
            out.extend(run(Command::new("gzip").arg("-c").arg(&p)).unwrap().stdout);
        }
        fs::write(&gz_path, out).unwrap();
    } else {
        let gz = run(Command::new("gzip").arg("-9").arg("-c").arg(&tar_path))
            .unwrap()
            .stdout;
        fs::write(&gz_path, gz).unwrap();
    }
    for layer in [&gz_path, &tar_path] {
        let ztoc = dir.join("layer.ztoc");
        run(Command::new(&soci)
            .args(["ztoc", "build", "--span-size", "65536"])
            .arg(layer)
            .arg("-o")
            .arg(&ztoc))
        .unwrap();
        let info = run(Command::new(&soci)
            .args(["ztoc", "info", "--json"])
            .arg(&ztoc))
        .unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["version"], "0.9");
        assert!(
            info["spans"].as_array().unwrap().len() > 10,
            "{format}: expected many spans"
        );
        let files = regular_files(&tar_path);
        assert!(files.len() >= 6, "{files:?}");
        for f in &files {
            let want = run(Command::new("tar").arg("-xOf").arg(&tar_path).arg(f))
                .unwrap()
                .stdout;
            let got = run(Command::new(&soci)
                .args(["ztoc", "get-file", "--layer"])
                .arg(layer)
                .arg(&ztoc)
                .arg(f))
            .unwrap()
            .stdout;
            assert_eq!(
                sha256_hex(&got),
                sha256_hex(&want),
                "{format} {} file {f}",
                layer.display()
            );
        }
    }
}

#[test]
fn ztoc_extracts_files_of_real_tar_and_gzip_layers() {
    require("tar", "tar");
    require("gzip", "gzip");
    let dir = tempfile::tempdir().unwrap();
    make_tree(&dir.path().join("tree"));
    check_layer(dir.path(), "tree", "gnu", false);
    check_layer(dir.path(), "tree", "pax", true);
    // ustar: a 130-byte path only fits by using the header's prefix field.
    let short = dir.path().join("short");
    make_tree(&short);
    fs::remove_dir_all(short.join("a")).unwrap();
    let p = short.join("p".repeat(60)).join("q".repeat(60));
    fs::create_dir_all(&p).unwrap();
    fs::write(p.join("file"), b"prefixed\n").unwrap();
    check_layer(dir.path(), "short", "ustar", false);
}

#[test]
fn bad_inputs_fail_with_clear_errors() {
    let soci = bin("soci");
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    fs::write(&junk, [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 1, 2, 3]).unwrap();
    let out = Command::new(&soci)
        .args(["ztoc", "build"])
        .arg(&junk)
        .arg("-o")
        .arg(dir.path().join("o"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("junk"), "error names the layer: {err}");
    let out = Command::new(&soci)
        .args(["ztoc", "info"])
        .arg(&junk)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("malformed zTOC"));
}
