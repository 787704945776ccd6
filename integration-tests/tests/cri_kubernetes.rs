//! The kubelet's path: containerd's CRI plugin with `soci` as its snapshotter and snapshot
//! annotations on (deploy/ documents this), driven by a CRI v1 client as the kubelet drives it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration_tests::cri::{self, Cri, CriOptions};
use integration_tests::daemon::SociDaemon;
use integration_tests::get_metrics;
use integration_tests::image::{
    busybox_layer, push_busybox_image, random_bytes, Compression, Entry, Layer, LayoutWriter,
};
use integration_tests::registry::{free_port, Registry};
use integration_tests::{bin, run};

#[test]
fn cri_pulls_and_runs_converted_image_lazily_and_unconverted_by_full_pull() {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("soci-cri")
        .tempdir_in("/tmp")
        .unwrap();
    let mut data = vec![Entry::Dir("data/".into())];
    for i in 0..10u64 {
        data.push(Entry::File(
            format!("data/big{i}"),
            random_bytes(8 << 20, 500 + i),
            0o644,
        ));
    }
    data.push(Entry::File(
        "data/hello".into(),
        b"hello from a lazy pod\n".to_vec(),
        0o644,
    ));
    let repo = push_busybox_image(
        &reg,
        tmp.path(),
        "cri-app",
        data,
        &["/bin/cat", "/data/hello"],
    );
    run(Command::new(bin("soci")).args([
        "convert",
        "--plain-http",
        &format!("docker://{repo}:v1"),
        &format!("docker://{repo}:soci"),
    ]))
    .unwrap();
    let pause = cri::push_pause_image(&reg, tmp.path(), "cri-pause");
    let certs = tmp.path().join("certs.d");
    cri::write_plain_http_hosts(&certs, &reg.addr);

    // No background fetch during the test, so bytes served are what the start needed.
    let daemon = SociDaemon::start(
        &tmp.path().join("d"),
        "[background_fetch]\nsilence_period_msec = 600000\n",
    );
    let ctd = cri::start_containerd(&CriOptions {
        soci_socket: &daemon.socket,
        certs_dir: &certs,
        sandbox_image: &pause,
        extra: "",
    });
    let client = Cri::connect(&ctd.socket, &ctd.socket, &tmp.path().join("logs")).unwrap();

    let before = reg.blob_bytes_served();
    let lazy = format!("{repo}:soci");
    client.pull(&lazy, None).unwrap();
    let out = client
        .run("cri-lazy", &lazy, &[], Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log_text()));
    assert_eq!((out.code, out.log.as_str()), (0, "hello from a lazy pod\n"));
    let served = reg.blob_bytes_served() - before;
    let image_bytes = 80u64 << 20; // the data layer alone (random, incompressible)
    assert!(
        served * 10 < image_bytes,
        "registry served {served} bytes for a lazy CRI pull of a {image_bytes}-byte image"
    );
    let modes = ctd.soci(&["-n", cri::K8S_NAMESPACE, "image", "mode", &lazy]);
    assert!(modes.contains("snapshotter: soci"), "{modes}");

    let full = format!("{repo}:v1");
    client.pull(&full, None).unwrap();
    let out = client
        .run(
            "cri-full",
            &full,
            &["/bin/sh", "-c", "wc -c < /data/big3"],
            Duration::from_secs(120),
        )
        .unwrap();
    assert_eq!((out.code, out.log.trim()), (0, "8388608"));
}

fn metric(addr: &str, name: &str) -> u64 {
    let m = get_metrics(addr);
    m.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in metrics:\n{m}"))
}

/// FUSE mounts under `dir` (the daemon's lazy layers).
fn fuse_mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" - fuse"))
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .filter(|p| p.starts_with(&prefix))
        .collect()
}

/// Whether this containerd honours `[proxy_plugins.X.exports] root` in CRI's ImageFsInfo:
/// 1.6.32+, 1.7.16+ and 2.x (containerd PRs #10127, #10096).
fn exports_root_supported() -> (bool, String) {
    let out = run(Command::new("containerd").arg("--version")).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v = text
        .split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .unwrap_or("0.0.0");
    let n: Vec<u32> = v
        .split(|c: char| !c.is_ascii_digit())
        .take(3)
        .map(|p| p.parse().unwrap_or(0))
        .collect();
    let ok = match (n.first(), n.get(1), n.get(2)) {
        (Some(&maj), _, _) if maj >= 2 => true,
        (Some(1), Some(6), Some(&p)) => p >= 32,
        (Some(1), Some(7), Some(&p)) => p >= 16,
        (Some(1), Some(&m), _) => m >= 8,
        _ => false,
    };
    (ok, text.trim().to_string())
}

/// A private image whose credentials only PullImage carries (no image service proxy): the
/// daemon cannot authenticate, hands the layers back, containerd pulls them and the pod runs.
#[test]
fn handback_private_image_with_pull_image_credentials_only() {
    let public = Registry::start();
    let private = Registry::start_with_auth(Some(("handback", "k8s-s3cret")));
    let tmp = tempfile::Builder::new()
        .prefix("handback-cri")
        .tempdir_in("/tmp")
        .unwrap();
    let data = vec![
        Entry::Dir("data/".into()),
        Entry::File("data/big".into(), random_bytes(2 << 20, 77), 0o644),
        Entry::File("data/msg".into(), b"private pod runs\n".to_vec(), 0o644),
    ];
    let layers = [
        busybox_layer(),
        Layer {
            entries: data,
            compression: Compression::Gzip,
        },
    ];
    let mut w = LayoutWriter::new(&tmp.path().join("private"));
    let m = w.manifest("amd64", &layers, &["/bin/cat", "/data/msg"]);
    w.tag_manifest(&m, "v1");
    private.push_layout(
        &w.dir,
        "v1",
        "handback-private:v1",
        Some("handback:k8s-s3cret"),
    );
    let pause = cri::push_pause_image(&public, tmp.path(), "handback-pause");
    let certs = tmp.path().join("certs.d");
    cri::write_plain_http_hosts(&certs, &public.addr);
    cri::write_plain_http_hosts(&certs, &private.addr);
    let metrics = format!("127.0.0.1:{}", free_port());
    let daemon = SociDaemon::start(
        &tmp.path().join("d"),
        &format!(
            "metrics_address = \"{metrics}\"\n[resolver]\nplain_http_hosts = [\"{}\", \"{}\"]\n[blob]\nfetching_timeout_sec = 2\n",
            public.addr, private.addr
        ),
    );
    let ctd = cri::start_containerd(&CriOptions {
        soci_socket: &daemon.socket,
        certs_dir: &certs,
        sandbox_image: &pause,
        extra: "",
    });
    let client = Cri::connect(&ctd.socket, &ctd.socket, &tmp.path().join("logs")).unwrap();
    let image = format!("{}/handback-private:v1", private.addr);
    let auth = cri::v1::AuthConfig {
        username: "handback".into(),
        password: "k8s-s3cret".into(),
        ..Default::default()
    };
    client
        .pull(&image, Some(auth))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log_text()));
    let out = client
        .run("handback-private", &image, &[], Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log_text()));
    assert_eq!((out.code, out.log.as_str()), (0, "private pod runs\n"));
    let modes = ctd.soci(&["-n", cri::K8S_NAMESPACE, "image", "mode", &image]);
    assert_eq!(
        modes.matches("handed back to containerd (auth)").count(),
        2,
        "{modes}"
    );
    // Both layers (the pause image is pulled later, at RunPodSandbox).
    assert!(
        get_metrics(&metrics).contains("soci_layers_handed_back_total{reason=\"auth\"} 2"),
        "{}",
        get_metrics(&metrics)
    );
}

/// RemoveImage cleans the image's snapshots and FUSE mounts in the daemon (containerd's GC
/// removes them asynchronously: waited for, bounded); ImageFsInfo reports the daemon's root
/// when containerd honours the documented `exports.root`.
#[test]
fn handback_remove_image_cleans_snapshots_and_image_fs_is_the_daemon_root() {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("handback-rm")
        .tempdir_in("/tmp")
        .unwrap();
    let data = vec![
        Entry::Dir("data/".into()),
        Entry::File("data/big".into(), random_bytes(4 << 20, 99), 0o644),
        Entry::File("data/msg".into(), b"lazy, then removed\n".to_vec(), 0o644),
    ];
    let repo = push_busybox_image(
        &reg,
        tmp.path(),
        "handback-rm",
        data,
        &["/bin/cat", "/data/msg"],
    );
    run(Command::new(bin("soci")).args([
        "convert",
        "--plain-http",
        "--min-layer-size",
        "1000000",
        &format!("docker://{repo}:v1"),
        &format!("docker://{repo}:soci"),
    ]))
    .unwrap();
    let pause = cri::push_pause_image(&reg, tmp.path(), "handback-rm-pause");
    let certs = tmp.path().join("certs.d");
    cri::write_plain_http_hosts(&certs, &reg.addr);
    let metrics = format!("127.0.0.1:{}", free_port());
    let daemon = SociDaemon::start(
        &tmp.path().join("d"),
        &format!(
            "metrics_address = \"{metrics}\"\n[background_fetch]\nsilence_period_msec = 600000\n"
        ),
    );
    let ctd = cri::start_containerd(&CriOptions {
        soci_socket: &daemon.socket,
        certs_dir: &certs,
        sandbox_image: &pause,
        extra: "",
    });
    let client = Cri::connect(&ctd.socket, &ctd.socket, &tmp.path().join("logs")).unwrap();

    // ImageFsInfo: the documented exports.root, where containerd honours it.
    let fs = client.image_fs_mountpoints().unwrap();
    let (supported, version) = exports_root_supported();
    if supported {
        assert!(
            fs.iter().any(|m| Path::new(m) == daemon.root),
            "{version}: ImageFsInfo {fs:?}, daemon root {}",
            daemon.root.display()
        );
    } else {
        // Older containerd ignores proxy plugin exports and reports a path under its own
        // root (the documented limitation in deploy/kubernetes/containerd-1.x.toml).
        assert!(
            fs.iter()
                .any(|m| m.ends_with("io.containerd.snapshotter.v1.soci")),
            "{version}: ImageFsInfo {fs:?}"
        );
    }

    client.pull(&pause, None).unwrap();
    let baseline = metric(&metrics, "soci_snapshots");
    let image = format!("{repo}:soci");
    client.pull(&image, None).unwrap();
    let out = client
        .run("handback-rm", &image, &[], Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log_text()));
    assert_eq!((out.code, out.log.as_str()), (0, "lazy, then removed\n"));
    assert!(
        !fuse_mounts_under(&daemon.root).is_empty(),
        "the converted image has no lazy layer mounted"
    );
    assert!(metric(&metrics, "soci_snapshots") > baseline);

    client.remove_image(&image).unwrap();
    assert!(client.image_status(&image).unwrap().is_none());
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let n = metric(&metrics, "soci_snapshots");
        let mounts = fuse_mounts_under(&daemon.root);
        if n == baseline && mounts.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "after RemoveImage: {n} snapshots (baseline {baseline}), FUSE mounts {mounts:?}\n{}",
            String::from_utf8_lossy(
                &ctd.ctr(&[
                    "-n",
                    cri::K8S_NAMESPACE,
                    "snapshots",
                    "--snapshotter",
                    "soci",
                    "ls"
                ])
                .stdout
            )
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The documented containerd snippets are valid TOML with the keys a Kubernetes node needs.
#[test]
fn deploy_kubernetes_snippets_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    let load = |f: &str| -> toml::Value {
        let text = std::fs::read_to_string(dir.join(f)).unwrap();
        toml::from_str(&text).unwrap_or_else(|e| panic!("{f}: {e}"))
    };
    let v1 = load("containerd-1.x.toml");
    assert_eq!(v1["version"].as_integer(), Some(2));
    let soci = &v1["proxy_plugins"]["soci"];
    assert_eq!(soci["type"].as_str(), Some("snapshot"));
    assert_eq!(
        soci["address"].as_str(),
        Some("/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock")
    );
    assert_eq!(
        soci["exports"]["root"].as_str(),
        Some("/var/lib/soci-snapshotter-grpc")
    );
    let c = &v1["plugins"]["io.containerd.grpc.v1.cri"]["containerd"];
    assert_eq!(c["snapshotter"].as_str(), Some("soci"));
    assert_eq!(c["disable_snapshot_annotations"].as_bool(), Some(false));

    let v2 = load("containerd-2.x.toml");
    assert_eq!(v2["version"].as_integer(), Some(3));
    let i = &v2["plugins"]["io.containerd.cri.v1.images"];
    assert_eq!(i["snapshotter"].as_str(), Some("soci"));
    assert_eq!(i["disable_snapshot_annotations"].as_bool(), Some(false));
    assert_eq!(
        v2["proxy_plugins"]["soci"]["exports"]["root"].as_str(),
        Some("/var/lib/soci-snapshotter-grpc")
    );

    let t = load("containerd-2.1-transfer.toml");
    let p = &t["plugins"];
    assert_eq!(
        p["io.containerd.transfer.v1.local"]["unpack_config"][0]["snapshotter"].as_str(),
        Some("soci")
    );
    assert!(p["io.containerd.cri.v1.images"]
        .get("disable_snapshot_annotations")
        .is_none());
    assert_eq!(
        t["proxy_plugins"]["soci"]["exports"]["enable_remote_snapshot_annotations"].as_str(),
        Some("true")
    );

    // The CRI harness runs exactly this snippet (paths aside).
    let s = cri::deploy_snippet(Path::new("/s.sock"), Path::new("/r"));
    let parsed: toml::Value = toml::from_str(&s).unwrap();
    assert_eq!(
        parsed["proxy_plugins"]["soci"]["address"].as_str(),
        Some("/s.sock")
    );
    assert_eq!(
        parsed["proxy_plugins"]["soci"]["exports"]["root"].as_str(),
        Some("/r")
    );
}
