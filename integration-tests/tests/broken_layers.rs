//! A lazy layer that is not served is never handed to containerd as an empty directory
//! (issue 17): with the registry down at restart, or with the layer's FUSE connection aborted,
//! a new container fails with an error naming the layer; running containers get read errors,
//! never missing files; once the registry is back the layer is restored (on the next use or by
//! the background retry) and containers run again with no manual cleanup.

use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::containerd::Containerd;
use integration_tests::daemon::SociDaemon;
use integration_tests::gate::{Gate, GateMode};
use integration_tests::get_metrics;
use integration_tests::image::{push_busybox_image, random_bytes, Entry};
use integration_tests::registry::{free_port, Registry};
use integration_tests::{bin, run};

const MSG: &str = "served lazily\n";

struct Setup {
    _reg: Registry,
    gate: Gate,
    tmp: tempfile::TempDir,
    image: String,
    metrics: String,
    daemon: SociDaemon,
    ctd: Containerd,
}

/// Registry behind a gate, a converted image pulled lazily through the daemon.
fn setup(name: &str) -> Setup {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix(&format!("broken-{name}"))
        .tempdir_in("/tmp")
        .unwrap();
    let data = vec![
        Entry::Dir("data/".into()),
        Entry::File("data/big".into(), random_bytes(3 << 20, 1717), 0o644),
        Entry::File("data/msg".into(), MSG.as_bytes().to_vec(), 0o644),
    ];
    let repo = push_busybox_image(&reg, tmp.path(), name, data, &["/bin/cat", "/data/msg"]);
    run(Command::new(bin("soci")).args([
        "convert",
        "--plain-http",
        "--min-layer-size",
        "1000000",
        &format!("docker://{repo}:v1"),
        &format!("docker://{repo}:soci"),
    ]))
    .unwrap();
    let gate = Gate::start(&reg.addr);
    let image = format!("{}/{name}:soci", gate.addr);
    let metrics = format!("127.0.0.1:{}", free_port());
    let cfg = format!(
        "metrics_address = \"{metrics}\"\n[resolver]\nplain_http_hosts = [\"{}\"]\n[background_fetch]\nsilence_period_msec = 600000\n[blob]\nfetching_timeout_sec = 2\n",
        gate.addr
    );
    let daemon = SociDaemon::start(&tmp.path().join("d"), &cfg);
    let ctd = Containerd::start_with_soci(&daemon.socket);
    let mode = ctd.soci(&["image", "rpull", "--plain-http", &image]);
    assert!(mode.contains("snapshotter: soci"), "{mode}");
    Setup {
        _reg: reg,
        gate,
        tmp,
        image,
        metrics,
        daemon,
        ctd,
    }
}

/// Sum of every `soci_layers_broken{...}` series.
fn broken_metric(addr: &str) -> u64 {
    get_metrics(addr)
        .lines()
        .filter(|l| l.starts_with("soci_layers_broken{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn wait_until(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts a long-running container of the image (no file of the lazy layer read yet).
fn start_long(s: &Setup, id: &str) {
    s.ctd.ctr_ok(&[
        "run",
        "-d",
        "--snapshotter",
        "soci",
        &s.image,
        id,
        "/bin/sh",
        "-c",
        "sleep 3600",
    ]);
}

/// `cat /data/msg` inside running container `id`: (stdout, success).
fn exec_cat(s: &Setup, id: &str, n: u32) -> (String, bool) {
    let o = s.ctd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        &format!("cat{n}"),
        id,
        "/bin/cat",
        "/data/msg",
    ]);
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        o.status.success(),
    )
}

fn stop_long(s: &Setup, id: &str) {
    let _ = s.ctd.ctr(&["task", "kill", "-s", "SIGKILL", id]);
    std::thread::sleep(Duration::from_millis(300));
    let _ = s.ctd.ctr(&["task", "delete", "-f", id]);
    let _ = s.ctd.ctr(&["container", "delete", id]);
}

/// A new container, its output printed so a missing file shows: (stdout, stderr, success).
fn try_run(s: &Setup, id: &str) -> (String, String, bool) {
    let o = s.ctd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "soci",
        &s.image,
        id,
        "/bin/sh",
        "-c",
        "cat /data/msg || echo MISSING",
    ]);
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
        o.status.success(),
    )
}

fn lazy_layers(s: &Setup) -> usize {
    s.ctd
        .soci(&["image", "mode", &s.image])
        .lines()
        .filter(|l| l.starts_with("layer ") && l.contains(" lazy"))
        .count()
}

#[test]
fn restart_with_registry_down_refuses_containers_then_heals() {
    let mut s = setup("restart");
    let pid = std::process::id();
    let lazy = lazy_layers(&s);
    assert!(lazy >= 1, "no lazy layer");
    let long = format!("broken-long-{pid}");
    start_long(&s, &long);

    // Restart while the registry is unreachable: the layers cannot be restored.
    assert_eq!(s.daemon.stop(), Some(0));
    s.gate.set(GateMode::Down);
    s.daemon.restart();
    wait_until("layers marked broken", 60, || {
        s.daemon.log_text().matches("marked broken").count() >= lazy
    });

    // A new container is refused with the layer and the reason, never started without files.
    let (out, err, ok) = try_run(&s, &format!("broken-r1-{pid}"));
    assert!(
        !ok && !out.contains("MISSING"),
        "container ran on a layer that is not served: {out}{err}"
    );
    assert!(err.contains("is not served"), "{err}");
    // The running container gets read errors, not an empty layer.
    let (out, ok) = exec_cat(&s, &long, 1);
    assert!(
        !ok && !out.contains(MSG.trim()),
        "read of a broken layer: {out}"
    );
    // Visible in `soci image mode` and the metrics.
    let mode = s.ctd.soci(&["image", "mode", &s.image]);
    assert!(mode.contains("BROKEN"), "{mode}");
    assert_eq!(broken_metric(&s.metrics), lazy as u64);

    // The registry is back: the next container runs, with no manual cleanup.
    s.gate.set(GateMode::Open);
    let (out, err, ok) = try_run(&s, &format!("broken-r2-{pid}"));
    assert!(ok && out == MSG, "{out}{err}\n{}", s.daemon.log_text());
    wait_until("broken layers healed", 30, || {
        broken_metric(&s.metrics) == 0
    });
    let mode = s.ctd.soci(&["image", "mode", &s.image]);
    assert!(!mode.contains("BROKEN"), "{mode}");
    // The old container's mount is dead for good: still errors, never missing files.
    let (out, ok) = exec_cat(&s, &long, 2);
    assert!(!ok && !out.contains("MISSING"), "{out}");
    stop_long(&s, &long);
    let _ = &s.tmp;
}

#[test]
fn broken_layers_heal_in_the_background() {
    let mut s = setup("heal");
    let lazy = lazy_layers(&s);
    assert_eq!(s.daemon.stop(), Some(0));
    s.gate.set(GateMode::Down);
    s.daemon.restart();
    wait_until("layers marked broken", 60, || {
        s.daemon.log_text().matches("marked broken").count() >= lazy
    });
    assert_eq!(broken_metric(&s.metrics), lazy as u64);
    // Nobody asks for the layers: the background retry restores them once the registry is back.
    s.gate.set(GateMode::Open);
    wait_until("background restore", 60, || broken_metric(&s.metrics) == 0);
    let mode = s.ctd.soci(&["image", "mode", &s.image]);
    assert!(!mode.contains("BROKEN"), "{mode}");
    let snaps = s.ctd.ctr_ok(&["snapshots", "--snapshotter", "soci", "ls"]);
    for key in snaps
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
    {
        let info = s
            .ctd
            .ctr_ok(&["snapshots", "--snapshotter", "soci", "info", key]);
        assert!(!info.contains("containerd.io/snapshot/broken"), "{info}");
    }
    let (out, err, ok) = try_run(&s, &format!("broken-heal-{}", std::process::id()));
    assert!(ok && out == MSG, "{out}{err}");
}

/// The fusectl connection numbers of the daemon's lazy mounts (device minor of each mount).
fn fuse_connections(root: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(" - fuse.soci ") && l.contains(root.to_str().unwrap()))
        .filter_map(|l| {
            let dev = l.split_whitespace().nth(2)?;
            Some(dev.split_once(':')?.1.to_string())
        })
        .collect()
}

#[test]
fn aborted_fuse_connection_is_remounted_on_next_use() {
    let s = setup("abort");
    let pid = std::process::id();
    let conns = std::path::Path::new("/sys/fs/fuse/connections");
    if std::fs::read_dir(conns)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true)
    {
        let st = Command::new("mount")
            .args(["-t", "fusectl", "none", "/sys/fs/fuse/connections"])
            .status()
            .expect("run mount");
        assert!(st.success(), "prerequisite: fusectl cannot be mounted");
    }
    let long = format!("broken-along-{pid}");
    start_long(&s, &long);
    let ids = fuse_connections(&s.daemon.root);
    assert!(!ids.is_empty(), "no lazy mounts");
    for n in &ids {
        std::fs::write(conns.join(n).join("abort"), "1").expect("abort FUSE connection");
    }
    // The running container gets errors from the dead layer, not an empty one.
    let (out, ok) = exec_cat(&s, &long, 1);
    assert!(
        !ok && !out.contains(MSG.trim()),
        "read of an aborted layer: {out}"
    );
    // A new container: the layer is found dead and mounted again (the registry is up).
    let (out, err, ok) = try_run(&s, &format!("broken-a1-{pid}"));
    assert!(ok && out == MSG, "{out}{err}\n{}", s.daemon.log_text());
    assert!(
        s.daemon.log_text().contains("mounted but not served"),
        "{}",
        s.daemon.log_text()
    );
    assert_eq!(broken_metric(&s.metrics), 0);
    stop_long(&s, &long);
}
