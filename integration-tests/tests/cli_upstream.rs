//! The `soci` CLI as a drop-in for upstream soci-snapshotter's: the finch walkthrough (convert
//! in containerd's store, push with ctr, run lazily), nerdctl's exact argument lists, the local
//! store round trip (create / index / ztoc / rebuild-db) and `--version`.

use std::path::Path;
use std::process::{Command, Output};

use integration_tests::containerd::Containerd;
use integration_tests::daemon::SociDaemon;
use integration_tests::image::{push_busybox_image, Entry};
use integration_tests::registry::Registry;
use integration_tests::{bin, run};
use serde_json::Value;

fn tmpdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .unwrap()
}

/// An image of busybox plus a layer with `etc/cli.txt`, pushed as `REG/name:v1`.
fn image(reg: &Registry, dir: &Path, name: &str) -> String {
    push_busybox_image(
        reg,
        dir,
        name,
        vec![
            Entry::Dir("etc/".into()),
            Entry::File("etc/cli.txt".into(), b"hello from cli\n".to_vec(), 0o644),
        ],
        &["/bin/cat", "/etc/cli.txt"],
    )
}

fn soci(args: &[&str]) -> Output {
    Command::new(bin("soci")).args(args).output().unwrap()
}

/// Runs `soci` with nerdctl's exact arguments (which never pass `--root`), in a private mount
/// namespace where the default root `/var/lib/soci-snapshotter-grpc` is `root`, so the test
/// does not write the host's real artifacts database.
fn nerdctl_soci(root: &Path, args: &[&str]) -> Output {
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "mkdir -p /var/lib/soci-snapshotter-grpc && \
             mount --bind \"$0\" /var/lib/soci-snapshotter-grpc && exec \"$@\"",
        )
        .arg(root)
        .arg(bin("soci"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn skopeo_raw(reference: &str) -> Value {
    let o = run(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{reference}"),
    ]))
    .unwrap();
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn finch_walkthrough_convert_in_containerd_push_with_ctr_run_lazily() {
    let reg = Registry::start();
    let tmp = tmpdir("cli-finch");
    let repo = image(&reg, tmp.path(), "cli-finch");
    let daemon = SociDaemon::start(
        &tmp.path().join("d"),
        &format!("[resolver]\nplain_http_hosts = [\"{}\"]\n", reg.addr),
    );
    let ctd = Containerd::start_with_soci(&daemon.socket);
    let sock = ctd.socket.to_str().unwrap().to_string();
    let root = tmp.path().join("root");
    let (src, dst) = (format!("{repo}:v1"), format!("{repo}:soci"));
    ctd.ctr_ok(&["-n", "cli-finch", "images", "pull", "--plain-http", &src]);
    // Exactly the walkthrough: global flags, then convert SRC DST, both in containerd.
    ok(
        soci(&[
            "--address",
            &sock,
            "--namespace",
            "cli-finch",
            "--root",
            root.to_str().unwrap(),
            "convert",
            "--min-layer-size",
            "0",
            &src,
            &dst,
        ]),
        "soci convert",
    );
    // The new image index carries containerd GC labels for every child.
    let images = ctd.ctr_ok(&["-n", "cli-finch", "images", "ls"]);
    let line = images.lines().find(|l| l.starts_with(&dst)).unwrap();
    assert!(
        line.contains("application/vnd.oci.image.index.v1+json"),
        "{images}"
    );
    let digest = line
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap();
    let content = ctd.ctr_ok(&["-n", "cli-finch", "content", "ls"]);
    let row = content.lines().find(|l| l.starts_with(digest)).unwrap();
    assert!(row.contains("containerd.io/gc.ref.content.m.0"), "{row}");
    assert!(row.contains("containerd.io/gc.ref.content.m.1"), "{row}");
    ctd.ctr_ok(&["-n", "cli-finch", "images", "push", "--plain-http", &dst]);
    let idx = skopeo_raw(&dst);
    assert!(
        idx["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["artifactType"] == "application/vnd.amazon.soci.index.v2+json"),
        "{idx}"
    );
    // Run it lazily through our daemon in a fresh namespace.
    let mode = ctd.soci(&[
        "-n",
        "cli-finch-run",
        "image",
        "rpull",
        "--plain-http",
        &dst,
    ]);
    assert!(
        mode.contains("snapshotter: soci (lazy"),
        "{mode}\n{}",
        daemon.log_text()
    );
    let out = ctd.ctr_ok(&[
        "-n",
        "cli-finch-run",
        "run",
        "--rm",
        "--snapshotter",
        "soci",
        &dst,
        "cli-finch-1",
    ]);
    assert_eq!(out, "hello from cli\n");
    let mode = ctd.soci(&["-n", "cli-finch-run", "image", "mode", &dst]);
    assert!(mode.contains("snapshotter: soci (lazy"), "{mode}");
}

/// Old registry-to-registry spelling fails loudly instead of changing meaning.
#[test]
fn old_convert_spelling_fails_with_hint() {
    let o = soci(&[
        "convert",
        "--plain-http",
        "127.0.0.1:1/cli/a:v1",
        "127.0.0.1:1/cli/a:soci",
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("docker://"), "{e}");
    let o = soci(&[
        "-a",
        "/nonexistent/cli.sock",
        "convert",
        "127.0.0.1:1/cli/a:v1",
        "127.0.0.1:1/cli/a:soci",
    ]);
    assert!(!o.status.success());
}

#[test]
fn nerdctl_argument_lists() {
    let reg = Registry::start();
    let tmp = tmpdir("cli-nerdctl");
    let repo = image(&reg, tmp.path(), "cli-nerdctl");
    let ctd = Containerd::start("");
    let root = tmp.path().join("soci-root");
    std::fs::create_dir_all(&root).unwrap();
    let sock = ctd.socket.to_str().unwrap().to_string();
    let ns = "cli-nerdctl";
    let src = format!("{repo}:v1");
    ctd.ctr_ok(&["-n", ns, "images", "pull", "--plain-http", &src]);

    // nerdctl pkg/snapshotterutil/sociutil.go, ConvertSociIndexV2: `--address A --namespace N`
    // (setupSociCommand), then "convert", "--platform" P per platform, "--span-size" N,
    // "--min-layer-size" N, srcRef, destRef. It first runs `soci --version` (CheckSociVersion).
    ok(nerdctl_soci(&root, &["--version"]), "soci --version");
    let dst = format!("{repo}:soci");
    ok(
        nerdctl_soci(
            &root,
            &[
                "--address",
                &sock,
                "--namespace",
                ns,
                "convert",
                "--platform",
                "linux/amd64",
                "--span-size",
                "65536",
                "--min-layer-size",
                "0",
                &src,
                &dst,
            ],
        ),
        "nerdctl image convert --soci",
    );
    // nerdctl then looks the image up in containerd: an image index with a v2 SOCI entry.
    let images = ctd.ctr_ok(&["-n", ns, "images", "ls"]);
    let line = images.lines().find(|l| l.starts_with(&dst)).unwrap();
    assert!(
        line.contains("application/vnd.oci.image.index.v1+json"),
        "{images}"
    );
    let digest = line
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap();
    let idx: Value =
        serde_json::from_str(&ctd.ctr_ok(&["-n", ns, "content", "get", digest])).unwrap();
    let soci_entry = idx["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["artifactType"] == "application/vnd.amazon.soci.index.v2+json")
        .unwrap_or_else(|| panic!("{idx}"));
    assert_eq!(soci_entry["platform"]["architecture"], "amd64");

    // sociutil.go, CreateSociIndexV1: "create", "--platform" P, "--span-size" N,
    // "--min-layer-size" N, rawRef; PushSoci: "push", "--platform" P, "--skip-verify",
    // "--plain-http" (insecure registry), rawRef.
    ok(
        nerdctl_soci(
            &root,
            &[
                "--address",
                &sock,
                "--namespace",
                ns,
                "create",
                "--platform",
                "linux/amd64",
                "--span-size",
                "65536",
                "--min-layer-size",
                "0",
                &src,
            ],
        ),
        "nerdctl push --snapshotter soci: create",
    );
    ok(
        nerdctl_soci(
            &root,
            &[
                "--address",
                &sock,
                "--namespace",
                ns,
                "push",
                "--platform",
                "linux/amd64",
                "--skip-verify",
                "--plain-http",
                &src,
            ],
        ),
        "nerdctl push --snapshotter soci: push",
    );
    // The registry has the v1 index with the image manifest as subject and its zTOCs.
    let images = ctd.ctr_ok(&["-n", ns, "images", "ls"]);
    let src_digest = images
        .lines()
        .find(|l| l.starts_with(&format!("{src} ")))
        .and_then(|l| l.split_whitespace().find(|w| w.starts_with("sha256:")))
        .unwrap_or_else(|| panic!("{src} not in {images}"))
        .to_string();
    let info: Value = serde_json::from_str(&ok(
        soci(&[
            "index",
            "info",
            "--plain-http",
            "--allow-v1",
            "--platform",
            "linux/amd64",
            &src,
        ]),
        "index info (registry)",
    ))
    .unwrap();
    assert_eq!(info["version"], "v1", "{info}");
    let ztocs: Vec<_> = info["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| !l["ztoc"].is_null())
        .collect();
    assert_eq!(ztocs.len(), 2, "{info}");
    assert_eq!(
        info["index"]["config"]["mediaType"],
        "application/vnd.amazon.soci.index.v1+json"
    );
    assert_eq!(
        info["index"]["subject"]["digest"],
        src_digest.as_str(),
        "{info}"
    );
}

#[test]
fn create_index_ztoc_rebuild_db_round_trip() {
    let reg = Registry::start();
    let tmp = tmpdir("cli-rt");
    let repo = image(&reg, tmp.path(), "cli-rt");
    let ctd = Containerd::start("");
    let sock = ctd.socket.to_str().unwrap().to_string();
    let root = tmp.path().join("root");
    let src = format!("{repo}:v1");
    ctd.ctr_ok(&["-n", "cli-rt", "images", "pull", "--plain-http", &src]);
    let g = |extra: &[&str]| -> String {
        let mut a = vec![
            "-a",
            &sock,
            "-n",
            "cli-rt",
            "--root",
            root.to_str().unwrap(),
            "--content-store",
            "soci",
        ];
        a.extend_from_slice(extra);
        ok(soci(&a), &format!("soci {extra:?}"))
    };
    g(&[
        "create",
        "--min-layer-size",
        "0",
        "--span-size",
        "65536",
        &src,
    ]);
    let list = g(&["index", "list"]);
    assert!(list.starts_with("DIGEST"), "{list}");
    assert!(list.contains("v1") && list.contains(&src), "{list}");
    let index = g(&["index", "ls", "-q"]).trim().to_string();
    assert!(index.starts_with("sha256:"), "{index}");
    assert_eq!(g(&["index", "list", "-q", "--ref", &src]).trim(), index);
    assert_eq!(g(&["index", "list", "-q", "-p", "linux/arm64"]).trim(), "");
    let info: Value = serde_json::from_str(&g(&["index", "info", &index])).unwrap();
    assert_eq!(
        info["config"]["mediaType"],
        "application/vnd.amazon.soci.index.v1+json"
    );
    let ztocs: Vec<String> = g(&["ztoc", "ls", "-q"])
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(ztocs.len(), 2, "{ztocs:?}");
    assert_eq!(
        g(&["ztoc", "list", "-q", "--image-ref", &src])
            .lines()
            .count(),
        2
    );
    let table = g(&["ztoc", "list"]);
    assert!(table.contains("LAYER DIGEST"), "{table}");
    // The zTOC of the layer that has etc/cli.txt.
    let mut found = false;
    for z in &ztocs {
        let zi: Value = serde_json::from_str(&g(&["ztoc", "info", z])).unwrap();
        assert!(zi["num_files"].as_u64().unwrap() > 0, "{zi}");
        if zi["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["filename"] == "etc/cli.txt")
        {
            assert_eq!(
                g(&["ztoc", "get-file", z, "etc/cli.txt"]),
                "hello from cli\n"
            );
            let out = tmp.path().join("cli.txt");
            g(&[
                "ztoc",
                "get-file",
                z,
                "etc/cli.txt",
                "-o",
                out.to_str().unwrap(),
            ]);
            assert_eq!(std::fs::read(&out).unwrap(), b"hello from cli\n");
            found = true;
        }
    }
    assert!(found);
    // Wrong kinds are refused with upstream's hints.
    let o = soci(&[
        "--root",
        root.to_str().unwrap(),
        "--content-store",
        "soci",
        "index",
        "info",
        &ztocs[0],
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("soci ztoc info"));
    // rebuild-db recovers a lost database from the content store.
    std::fs::remove_file(root.join("soci-rs-artifacts.json")).unwrap();
    assert_eq!(g(&["index", "ls", "-q"]).trim(), "");
    g(&["rebuild-db"]);
    assert_eq!(g(&["index", "ls", "-q"]).trim(), index);
    assert_eq!(g(&["ztoc", "ls", "-q"]).lines().count(), 2);
    // rm removes the index, its orphaned zTOCs and their blobs.
    g(&["index", "rm", &index]);
    assert_eq!(g(&["index", "ls", "-q"]).trim(), "");
    assert_eq!(g(&["ztoc", "ls", "-q"]).trim(), "");
    assert!(!root.join("content/blobs/sha256").join(&index[7..]).exists());
}

#[test]
fn version_satisfies_nerdctl_check_truthfully() {
    let v = ok(soci(&["--version"]), "soci --version");
    assert!(v.starts_with("soci version v"), "{v}");
    // nerdctl: regexp `v?(\d+\.\d+\.\d+)`, first match, must be >= 0.10.0.
    let first = v
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .find(|t| t.split('.').filter(|p| !p.is_empty()).count() == 3)
        .unwrap();
    let parts: Vec<u64> = first.split('.').map(|p| p.parse().unwrap()).collect();
    assert!(parts >= vec![0, 10, 0], "{v}");
    assert!(v.contains("soci-rs") && v.contains("compat"), "{v}");
    assert_eq!(ok(soci(&["-v"]), "soci -v"), v);
}
