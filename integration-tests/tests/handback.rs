//! Issue 13 part 1: a layer the daemon cannot provide is handed back to containerd (Prepare
//! answers with an ordinary active snapshot's mounts), so containerd (or `soci image rpull`)
//! pulls it with its own credentials and transport, instead of the whole pull failing with
//! Unavailable. Each case: the container runs with the right output, the committed snapshot's
//! `soci.fallback-reason` label and the `soci_layers_handed_back_total` metric name the reason.
//! (a) registry credentials only rpull has; (b) registry unreachable for the daemon only;
//! (c) a corrupt zTOC while the daemon's own full pull fails too.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration_tests::containerd::Containerd;
use integration_tests::cri::{self, Cri, CriOptions};
use integration_tests::daemon::SociDaemon;
use integration_tests::gate::{Gate, GateMode};
use integration_tests::get_metrics;
use integration_tests::image::{
    busybox_layer, push_busybox_image, random_bytes, Compression, Entry, Layer, LayoutWriter,
};
use integration_tests::registry::{free_port, Registry};
use integration_tests::{bin, run};

/// The value of `soci_layers_handed_back_total{reason="<reason>"}`.
fn handed_back(metrics_addr: &str, reason: &str) -> u64 {
    let m = get_metrics(metrics_addr);
    let key = format!("soci_layers_handed_back_total{{reason=\"{reason}\"}} ");
    m.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in metrics:\n{m}"))
}

fn data_entries(msg: &str) -> Vec<Entry> {
    vec![
        Entry::Dir("data/".into()),
        Entry::File("data/big".into(), random_bytes(2 << 20, 1313), 0o644),
        Entry::File("data/msg".into(), msg.as_bytes().to_vec(), 0o644),
    ]
}

/// hosts.toml for `host` sending containerd to the registry at `upstream` (plain HTTP).
fn hosts_redirect(certs_dir: &Path, host: &str, upstream: &str) {
    let d = certs_dir.join(host);
    fs::create_dir_all(&d).unwrap();
    fs::write(
        d.join("hosts.toml"),
        format!(
            "server = \"http://{upstream}\"\n[host.\"http://{upstream}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )
    .unwrap();
}

fn tmpdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .unwrap()
}

#[test]
fn handback_credentials_only_rpull_has() {
    let reg = Registry::start_with_auth(Some(("handback", "hb-s3cret")));
    let tmp = tmpdir("handback-a");
    let msg = "pulled with rpull's credentials\n";
    let layers = [
        busybox_layer(),
        Layer {
            entries: data_entries(msg),
            compression: Compression::Gzip,
        },
    ];
    let mut w = LayoutWriter::new(&tmp.path().join("img"));
    let m = w.manifest("amd64", &layers, &["/bin/cat", "/data/msg"]);
    w.tag_manifest(&m, "v1");
    reg.push_layout(&w.dir, "v1", "handback-a:v1", Some("handback:hb-s3cret"));
    let image = format!("{}/handback-a:v1", reg.addr);

    // The daemon has no credentials for this registry; rpull has them (docker config).
    let metrics = format!("127.0.0.1:{}", free_port());
    let cfg = format!(
        "metrics_address = \"{metrics}\"\n[resolver]\nplain_http_hosts = [\"{}\"]\n[blob]\nfetching_timeout_sec = 2\n",
        reg.addr
    );
    let daemon = SociDaemon::start(&tmp.path().join("d"), &cfg);
    let ctd = Containerd::start_with_soci(&daemon.socket);
    let creds = tmp.path().join("creds");
    fs::create_dir_all(&creds).unwrap();
    // base64("handback:hb-s3cret")
    fs::write(
        creds.join("config.json"),
        format!(
            r#"{{"auths":{{"{}":{{"auth":"aGFuZGJhY2s6aGItczNjcmV0"}}}}}}"#,
            reg.addr
        ),
    )
    .unwrap();
    let o = Command::new(bin("soci"))
        .env("DOCKER_CONFIG", &creds)
        .arg("-a")
        .arg(&ctd.socket)
        .args(["-n", "handback-a", "image", "rpull", "--plain-http", &image])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "rpull failed: {}\n{out}\n{}",
        String::from_utf8_lossy(&o.stderr),
        daemon.log_text()
    );
    assert_eq!(
        out.matches("handed back to containerd (auth)").count(),
        2,
        "{out}"
    );
    let id = format!("handback-a-{}", std::process::id());
    let ran = ctd.ctr_ok(&[
        "-n",
        "handback-a",
        "run",
        "--rm",
        "--snapshotter",
        "soci",
        &image,
        &id,
    ]);
    assert_eq!(ran, msg);
    assert_eq!(handed_back(&metrics, "auth"), 2);
    // One log line for the image, not one per layer.
    let log = daemon.log_text();
    assert_eq!(
        log.matches("handed back to containerd to pull itself")
            .count(),
        1,
        "{log}"
    );
}

/// A containerd with CRI and the soci snapshotter; the sandbox image is pushed to `reg`.
fn cri_setup(
    reg: &Registry,
    tmp: &Path,
    daemon_cfg: &str,
    certs: &Path,
) -> (SociDaemon, Containerd, Cri) {
    let pause = cri::push_pause_image(reg, tmp, "handback-pause");
    cri::write_plain_http_hosts(certs, &reg.addr);
    let daemon = SociDaemon::start(&tmp.join("d"), daemon_cfg);
    let ctd = cri::start_containerd(&CriOptions {
        soci_socket: &daemon.socket,
        certs_dir: certs,
        sandbox_image: &pause,
        extra: "",
    });
    let client = Cri::connect(&ctd.socket, &ctd.socket, &tmp.join("logs")).unwrap();
    (daemon, ctd, client)
}

#[test]
fn handback_registry_unreachable_for_the_daemon_only() {
    let reg = Registry::start();
    let tmp = tmpdir("handback-b");
    let msg = "containerd reached the registry\n";
    push_busybox_image(
        &reg,
        tmp.path(),
        "handback-b",
        data_entries(msg),
        &["/bin/cat", "/data/msg"],
    );
    // The image's host is a closed port; containerd's hosts.toml sends it to the registry,
    // the daemon (no hosts.toml for it) finds nothing listening.
    let closed = format!("127.0.0.1:{}", free_port());
    let certs = tmp.path().join("certs.d");
    hosts_redirect(&certs, &closed, &reg.addr);
    let metrics = format!("127.0.0.1:{}", free_port());
    let cfg = format!(
        "metrics_address = \"{metrics}\"\n[resolver]\nhosts_dir = \"{}\"\nplain_http_hosts = [\"{closed}\", \"{}\"]\n[blob]\nfetching_timeout_sec = 2\n",
        tmp.path().join("daemon-certs.d").display(),
        reg.addr
    );
    let (daemon, ctd, client) = cri_setup(&reg, tmp.path(), &cfg, &certs);
    let image = format!("{closed}/handback-b:v1");
    client
        .pull(&image, None)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log_text()));
    let out = client
        .run("handback-b", &image, &[], Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log_text()));
    assert_eq!((out.code, out.log.as_str()), (0, msg));
    let modes = ctd.soci(&["-n", cri::K8S_NAMESPACE, "image", "mode", &image]);
    assert_eq!(
        modes
            .matches("handed back to containerd (registry)")
            .count(),
        2,
        "{modes}"
    );
    assert_eq!(handed_back(&metrics, "registry"), 2);
}

/// Digests of the zTOC blobs in the registry's storage (from the SOCI index manifests).
fn ztoc_digests(reg: &Registry) -> Vec<String> {
    let mut out = Vec::new();
    let root = reg.storage.join("docker/registry/v2/blobs/sha256");
    for prefix in fs::read_dir(&root).unwrap().flatten() {
        for blob in fs::read_dir(prefix.path()).unwrap().flatten() {
            let data = blob.path().join("data");
            if fs::metadata(&data)
                .map(|m| m.len() > 1 << 20)
                .unwrap_or(true)
            {
                continue;
            }
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&fs::read(&data).unwrap())
            else {
                continue;
            };
            for l in v["layers"].as_array().into_iter().flatten() {
                if l["annotations"]
                    .get("com.amazon.soci.image-layer-digest")
                    .is_some()
                {
                    out.push(l["digest"].as_str().unwrap().to_string());
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

#[test]
fn handback_corrupt_ztoc_and_failed_full_pull() {
    let reg = Registry::start();
    let tmp = tmpdir("handback-c");
    let msg = "corrupt ztoc, layer pulled by containerd\n";
    let repo = push_busybox_image(
        &reg,
        tmp.path(),
        "handback-c",
        data_entries(msg),
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
    let ztocs = ztoc_digests(&reg);
    assert!(!ztocs.is_empty(), "no zTOC blobs found in the registry");
    for z in &ztocs {
        let p = reg.blob_path(z);
        let mut data = fs::read(&p).unwrap();
        for b in data.iter_mut().skip(8).step_by(7) {
            *b ^= 0x5a;
        }
        fs::write(&p, data).unwrap();
    }
    // The daemon reaches the registry through a gate that refuses layer blobs (its own full
    // pull fails); containerd goes to the registry directly.
    let gate = Gate::start(&reg.addr);
    gate.set(GateMode::BlobsDown);
    let certs = tmp.path().join("certs.d");
    hosts_redirect(&certs, &gate.addr, &reg.addr);
    let metrics = format!("127.0.0.1:{}", free_port());
    let cfg = format!(
        "metrics_address = \"{metrics}\"\n[resolver]\nhosts_dir = \"{}\"\nplain_http_hosts = [\"{}\", \"{}\"]\n[blob]\nfetching_timeout_sec = 2\n",
        tmp.path().join("daemon-certs.d").display(),
        gate.addr,
        reg.addr
    );
    let (daemon, ctd, client) = cri_setup(&reg, tmp.path(), &cfg, &certs);
    let image = format!("{}/handback-c:soci", gate.addr);
    client
        .pull(&image, None)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log_text()));
    let out = client
        .run("handback-c", &image, &[], Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log_text()));
    assert_eq!((out.code, out.log.as_str()), (0, msg));
    let modes = ctd.soci(&["-n", cri::K8S_NAMESPACE, "image", "mode", &image]);
    // The zTOC'd data layer: handed back after the corrupt zTOC and the failed full pull.
    assert!(
        modes.contains("handed back to containerd (full_pull_failed;after=corrupt_ztoc)")
            || modes
                .contains("handed back to containerd (full_pull_failed;after=lazy_mount_failed)"),
        "{modes}"
    );
    assert!(handed_back(&metrics, "full_pull_failed") >= 1);
    let log = daemon.log_text();
    assert!(log.contains("zTOC"), "{log}");
}

/// Upstream's meaning of `experimental_parallel_pull_as_fallback = false`: layers of an image
/// without a SOCI index are not pulled by the daemon but handed to containerd (here rpull, which
/// does what containerd's unpacker does), so their blobs land in containerd's content store and
/// the image can be exported.
#[test]
fn handback_when_parallel_pull_fallback_is_disabled() {
    let reg = Registry::start();
    let tmp = tmpdir("handback-off");
    let msg = "containerd pulled this unconverted image\n";
    let repo = push_busybox_image(
        &reg,
        tmp.path(),
        "handback-off",
        data_entries(msg),
        &["/bin/cat", "/data/msg"],
    );
    let image = format!("{repo}:v1");
    let metrics = format!("127.0.0.1:{}", free_port());
    let cfg = format!(
        "metrics_address = \"{metrics}\"\n[pull_modes.parallel_pull_unpack]\nexperimental_parallel_pull_as_fallback = false\n"
    );
    let daemon = SociDaemon::start(&tmp.path().join("d"), &cfg);
    assert!(
        !daemon
            .log_text()
            .contains("experimental_parallel_pull_as_fallback"),
        "no warning expected: the key means what it means upstream\n{}",
        daemon.log_text()
    );
    let ctd = Containerd::start_with_soci(&daemon.socket);
    let out = ctd.soci(&[
        "-n",
        "handback-off",
        "image",
        "rpull",
        "--plain-http",
        &image,
    ]);
    assert_eq!(
        out.matches("handed back to containerd (fallback_disabled;after=no_index)")
            .count(),
        2,
        "{out}\n{}",
        daemon.log_text()
    );
    let id = format!("handback-off-{}", std::process::id());
    let ran = ctd.ctr_ok(&[
        "-n",
        "handback-off",
        "run",
        "--rm",
        "--snapshotter",
        "soci",
        &image,
        &id,
    ]);
    assert_eq!(ran, msg);
    assert_eq!(handed_back(&metrics, "fallback_disabled"), 2);
    // The layer blobs are in containerd's content store: export works.
    let tar = tmp.path().join("export.tar");
    ctd.ctr_ok(&[
        "-n",
        "handback-off",
        "images",
        "export",
        tar.to_str().unwrap(),
        &image,
    ]);
    assert!(fs::metadata(&tar).unwrap().len() > 1 << 20);
}
