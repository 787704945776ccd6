//! A registry failure during a pull must not outlive the pull: once the registry is back, the
//! next pull and run of the same image succeed through the soci snapshotter, with no daemon
//! restart (issue 12, class 7: failed ahead-of-time downloads stayed cached).

use std::process::Command;
use std::time::Duration;

use integration_tests::bin;
use integration_tests::containerd::Containerd;
use integration_tests::daemon::SociDaemon;
use integration_tests::gate::{Gate, GateMode};
use integration_tests::image::{push_busybox_image, random_bytes, Entry};
use integration_tests::registry::Registry;

fn rpull(ctd: &Containerd, image: &str) -> std::process::Output {
    Command::new(bin("soci"))
        .arg("-a")
        .arg(&ctd.socket)
        .args(["image", "rpull", "--plain-http", image])
        .output()
        .expect("run soci image rpull")
}

#[test]
fn pull_after_registry_recovers_succeeds_without_restart() {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("broken-stale")
        .tempdir_in("/tmp")
        .unwrap();
    let data = vec![
        Entry::Dir("data/".into()),
        Entry::File("data/big".into(), random_bytes(2 << 20, 4242), 0o644),
        Entry::File("data/msg".into(), b"registry is back\n".to_vec(), 0o644),
    ];
    // No SOCI index: every layer is downloaded by the snapshotter, ahead of its Prepare.
    push_busybox_image(&reg, tmp.path(), "stale", data, &["/bin/cat", "/data/msg"]);
    let gate = Gate::start(&reg.addr);
    let image = format!("{}/stale:v1", gate.addr);
    let cfg = format!(
        "[resolver]\nplain_http_hosts = [\"{}\"]\n[blob]\nfetching_timeout_sec = 2\n",
        gate.addr
    );
    let daemon = SociDaemon::start(&tmp.path().join("d"), &cfg);
    let ctd = Containerd::start_with_soci(&daemon.socket);

    // Layer blobs fail (manifests and the config still load): the pull fails.
    gate.set(GateMode::BlobsDown);
    let o = rpull(&ctd, &image);
    assert!(
        !o.status.success(),
        "pull succeeded with the registry's blobs down: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    // The downloads started ahead for the other layers fail too while it is down.
    std::thread::sleep(Duration::from_secs(4));

    // The registry is back: the same daemon pulls and runs the image.
    gate.set(GateMode::Open);
    let o = rpull(&ctd, &image);
    assert!(
        o.status.success(),
        "pull after the registry came back failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        daemon.log_text()
    );
    let id = format!("broken-stale-{}", std::process::id());
    let out = ctd.ctr_ok(&["run", "--rm", "--snapshotter", "soci", &image, &id]);
    assert_eq!(out, "registry is back\n");
}
