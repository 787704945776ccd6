//! The daemon as containerd's proxy snapshotter: pull and run through real containerd, across
//! a graceful restart and a kill -9 during a pull.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::containerd::Containerd;
use integration_tests::daemon::SociDaemon;
use integration_tests::image::{push_busybox_image, random_bytes, Entry};
use integration_tests::registry::Registry;

fn push_image(reg: &Registry, dir: &std::path::Path, name: &str) -> String {
    let mut data = vec![Entry::Dir("data/".into())];
    for i in 0..4 {
        data.push(Entry::File(
            format!("data/f{i}"),
            random_bytes(3 << 20, 40 + i),
            0o644,
        ));
    }
    data.push(Entry::File(
        "data/msg".into(),
        b"ran on soci\n".to_vec(),
        0o644,
    ));
    let repo = push_busybox_image(
        reg,
        dir,
        name,
        data,
        &["/bin/sh", "-c", "cat /data/msg; ls /data | wc -l"],
    );
    format!("{repo}:v1")
}

#[test]
fn pull_and_run_through_containerd_across_restarts() {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("soci-e2e")
        .tempdir_in("/tmp")
        .unwrap();
    let image = push_image(&reg, tmp.path(), "app");
    let mut daemon = SociDaemon::start(&tmp.path().join("d"), "");
    let ctd = Containerd::start_with_soci(&daemon.socket);
    let plugins = ctd.ctr_ok(&["plugins", "ls"]);
    assert!(
        plugins
            .lines()
            .any(|l| l.contains("io.containerd.snapshotter.v1")
                && l.contains("soci")
                && l.contains("ok")),
        "{plugins}"
    );

    ctd.ctr_ok(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "soci",
        &image,
    ]);
    let snaps = ctd.ctr_ok(&["snapshots", "--snapshotter", "soci", "ls"]);
    assert_eq!(
        snaps.lines().filter(|l| l.contains("Committed")).count(),
        2,
        "{snaps}"
    );

    // Graceful restart between pull and run.
    assert_eq!(daemon.stop(), Some(0));
    daemon.restart();
    let out = ctd.ctr_retry(
        &["run", "--rm", "--snapshotter", "soci", &image, "run-1"],
        Duration::from_secs(60),
    );
    assert_eq!(out, "ran on soci\n5\n");
    assert!(daemon.log_text().contains("snapshot metadata recovered"));
}

#[test]
fn kill9_during_pull_then_pull_completes() {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("soci-e2e")
        .tempdir_in("/tmp")
        .unwrap();
    let image = push_image(&reg, tmp.path(), "crash");
    let mut daemon = SociDaemon::start(&tmp.path().join("d"), "");
    let ctd = Containerd::start_with_soci(&daemon.socket);
    let mut pull = Command::new("ctr")
        .arg("-a")
        .arg(&ctd.socket)
        .args([
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            "soci",
            &image,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill the daemon as soon as the pull has created its first snapshot.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !daemon.log_text().contains("created snapshot") {
        assert!(
            Instant::now() < deadline,
            "pull never reached the snapshotter"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    daemon.kill9();
    let _ = pull.wait();
    daemon.restart();
    ctd.ctr_retry(
        &[
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            "soci",
            &image,
        ],
        Duration::from_secs(90),
    );
    let out = ctd.ctr_retry(
        &["run", "--rm", "--snapshotter", "soci", &image, "run-2"],
        Duration::from_secs(30),
    );
    assert_eq!(out, "ran on soci\n5\n");
}

#[test]
fn socket_activation_hides_a_daemon_crash_from_containerd() {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("soci-sa")
        .tempdir_in("/tmp")
        .unwrap();
    let image = push_image(&reg, tmp.path(), "sa");
    let mut daemon = SociDaemon::start_activated(&tmp.path().join("d"), "");
    let ctd = Containerd::start_with_soci(&daemon.socket);
    ctd.ctr_ok(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "soci",
        &image,
    ]);
    assert!(daemon.log_text().contains("socket activation"));

    // Crash the daemon, start a container while it is down, bring the daemon back: the call
    // waits in the socket backlog and succeeds, with no retry.
    daemon.kill9();
    let sock = ctd.socket.clone();
    let img = image.clone();
    let run = std::thread::spawn(move || {
        Command::new("ctr")
            .arg("-a")
            .arg(&sock)
            .args(["run", "--rm", "--snapshotter", "soci", &img, "sa-1"])
            .output()
            .unwrap()
    });
    // A supervised restart is about this quick; containerd's handshake deadline is ~1 s.
    std::thread::sleep(Duration::from_millis(100));
    daemon.restart();
    let o = run.join().unwrap();
    assert!(
        o.status.success(),
        "ctr run failed across the restart: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), "ran on soci\n5\n");
}
