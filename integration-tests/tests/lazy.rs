//! Lazy loading end to end: real registry, real containerd, the daemon, FUSE.

use std::process::Command;

use integration_tests::containerd::Containerd;
use integration_tests::daemon::SociDaemon;
use integration_tests::get_metrics;
use integration_tests::image::{
    busybox_layer, push_busybox_image, random_bytes, Compression, Entry, Layer, LayoutWriter,
};
use integration_tests::registry::Registry;
use integration_tests::{bin, run};

fn daemon_config(reg: &Registry) -> String {
    format!("[resolver]\nplain_http_hosts = [\"{}\"]\n[background_fetch]\nsilence_period_msec = 600000\n", reg.addr)
}

/// A ≥ 250 MiB image: busybox plus four layers of incompressible data and a few small files.
fn big_image(reg: &Registry, dir: &std::path::Path) -> (String, u64) {
    let mut layers = vec![busybox_layer()];
    for l in 0..4u64 {
        let mut entries = vec![Entry::Dir(format!("data{l}/"))];
        for f in 0..8u64 {
            entries.push(Entry::File(
                format!("data{l}/blob{f}.bin"),
                random_bytes(8 << 20, l * 100 + f),
                0o644,
            ));
        }
        entries.push(Entry::File(
            format!("data{l}/small.txt"),
            format!("small file of layer {l}\n").into_bytes(),
            0o644,
        ));
        layers.push(Layer {
            entries,
            compression: Compression::Gzip,
        });
    }
    let mut w = LayoutWriter::new(&dir.join("big"));
    let m = w.manifest(
        "amd64",
        &layers,
        &["/bin/sh", "-c", "cat /data0/small.txt /data3/small.txt"],
    );
    w.tag_manifest(&m, "v1");
    reg.push_layout(&w.dir, "v1", "big:v1", None);
    let size: u64 = m.descriptor["size"].as_u64().unwrap();
    let _ = size;
    let compressed: u64 = m
        .layers
        .iter()
        .map(|(d, _)| {
            std::fs::metadata(w.dir.join("blobs/sha256").join(&d[7..]))
                .unwrap()
                .len()
        })
        .sum();
    (format!("{}/big", reg.addr), compressed)
}

#[test]
fn converted_image_runs_lazily_and_fetches_little() {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("soci-lazy")
        .tempdir_in("/tmp")
        .unwrap();
    let (repo, compressed) = big_image(&reg, tmp.path());
    assert!(compressed >= 250 << 20, "image is {compressed} bytes");
    run(Command::new(bin("soci")).args([
        "convert",
        "--plain-http",
        &format!("docker://{repo}:v1"),
        &format!("docker://{repo}:soci"),
    ]))
    .unwrap();

    let daemon = SociDaemon::start(&tmp.path().join("d"), &daemon_config(&reg));
    let ctd = Containerd::start_with_soci(&daemon.socket);
    let before = reg.blob_bytes_served();
    let image = format!("{repo}:soci");
    let mode = ctd.soci(&["image", "rpull", "--plain-http", &image]);
    assert!(
        mode.contains("snapshotter: soci (lazy: 4 of 5 layers)"),
        "{mode}\n{}",
        daemon.log_text()
    );
    let out = ctd.ctr_ok(&["run", "--rm", "--snapshotter", "soci", &image, "lazy-1"]);
    assert_eq!(out, "small file of layer 0\nsmall file of layer 3\n");
    let served = reg.blob_bytes_served() - before;
    assert!(
        served * 10 < compressed,
        "registry served {served} of {compressed} bytes"
    );
    eprintln!(
        "lazy run: registry served {served} bytes of a {compressed}-byte image ({:.2}%)",
        served as f64 * 100.0 / compressed as f64
    );
    let mode = ctd.soci(&["image", "mode", &image]);
    assert!(mode.contains("snapshotter: soci"), "{mode}");
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

#[test]
fn background_fetch_fills_layers_then_registry_is_not_needed() {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("soci-bg")
        .tempdir_in("/tmp")
        .unwrap();
    let mut data = vec![Entry::Dir("data/".into())];
    for i in 0..4u64 {
        data.push(Entry::File(
            format!("data/f{i}"),
            random_bytes(3 << 20, 90 + i),
            0o644,
        ));
    }
    let repo = push_busybox_image(
        &reg,
        tmp.path(),
        "bg",
        data,
        &[
            "/bin/sh",
            "-c",
            "sha256sum /data/f0 /data/f1 /data/f2 /data/f3 | cut -c1-12",
        ],
    );
    run(Command::new(bin("soci")).args([
        "convert",
        "--plain-http",
        "--min-layer-size",
        "1000000",
        "--span-size",
        "1048576",
        &format!("docker://{repo}:v1"),
        &format!("docker://{repo}:soci"),
    ]))
    .unwrap();
    let info = run(Command::new(bin("soci")).args([
        "index",
        "info",
        "--plain-http",
        "--platform",
        "linux/amd64",
        &format!("{repo}:soci"),
    ]))
    .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let total_spans: u64 = info["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["ztoc"]["spans"].as_u64())
        .sum();
    assert!(total_spans >= 12, "{info}");

    let maddr = format!("127.0.0.1:{}", integration_tests::registry::free_port());
    let cfg = format!(
        "metrics_address = \"{maddr}\"\n[resolver]\nplain_http_hosts = [\"{}\"]\n[background_fetch]\nsilence_period_msec = 0\nfetch_period_msec = 0\n",
        reg.addr
    );
    let daemon = SociDaemon::start(&tmp.path().join("d"), &cfg);
    let ctd = Containerd::start_with_soci(&daemon.socket);
    let image = format!("{repo}:soci");
    ctd.soci(&["image", "rpull", "--plain-http", &image]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let text = loop {
        let t = get_metrics(&maddr);
        if metric(&t, "soci_spans_verified_total") >= total_spans {
            break t;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "background fetch did not finish:\n{t}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(
        metric(&text, "soci_fetched_bytes_total{priority=\"background\"}") > 0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "soci_layers_total{mode=\"lazy\"}"),
        2,
        "{text}"
    );
    assert!(
        text.contains("soci_fuse_read_duration_seconds_bucket"),
        "{text}"
    );

    // With every span on local disk, the registry is no longer needed.
    drop(reg);
    let out = ctd.ctr_ok(&["run", "--rm", "--snapshotter", "soci", &image, "bg-1"]);
    use sha2::Digest;
    let want: String = (0..4u64)
        .map(|i| {
            format!(
                "{}\n",
                &hex::encode(sha2::Sha256::digest(random_bytes(3 << 20, 90 + i)))[..12]
            )
        })
        .collect();
    assert_eq!(out, want);
    let after = get_metrics(&maddr);
    assert_eq!(metric(&after, "soci_read_errors_total"), 0, "{after}");
    // Served from local spans: through the daemon, or (FUSE passthrough, on by default) by the
    // kernel from backing files written once the background fetch completed the layer.
    assert!(
        metric(&after, "soci_fuse_read_duration_seconds_count")
            + metric(&after, "soci_passthrough_opens_total")
            > 0,
        "{after}"
    );

    // The disk cache gauge is what is on disk, and goes when the snapshots go: span files at
    // their size, passthrough backing files at their charge (whole 4 KiB blocks plus one for
    // the inode); passthrough's bookkeeping (`.ids`, `.cached`) is not cache data.
    let on_disk = |dir: &std::path::Path| -> u64 {
        let out = Command::new("find")
            .arg(dir)
            .args(["-type", "f", "-printf", "%s %p\\n"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(_, p)| !p.ends_with("/.ids") && !p.ends_with("/.cached"))
            .map(|(n, p)| {
                let n: u64 = n.parse().unwrap();
                if p.contains("/passthrough/") {
                    (n.div_ceil(4096) + 1) * 4096
                } else {
                    n
                }
            })
            .sum::<u64>()
    };
    let disk = metric(&after, "soci_span_cache_bytes{place=\"disk\"}");
    assert!(disk > 12 << 20, "{after}");
    assert_eq!(disk, on_disk(&daemon.root.join("cache")));
    ctd.ctr_ok(&["image", "rm", "--sync", &image]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let t = get_metrics(&maddr);
        if metric(&t, "soci_span_cache_bytes{place=\"disk\"}") == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "disk cache not released:\n{t}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(on_disk(&daemon.root.join("cache")), 0);
}

#[test]
fn running_container_keeps_reading_across_restart_and_crash() {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("soci-restart")
        .tempdir_in("/tmp")
        .unwrap();
    let mut data = vec![Entry::Dir("data/".into())];
    let mut sums = Vec::new();
    for i in 0..4u64 {
        let bytes = random_bytes(4 << 20, 120 + i);
        sums.push(integration_tests::sha256_hex(&bytes));
        data.push(Entry::File(format!("data/f{i}"), bytes, 0o644));
    }
    data.push(Entry::File(
        "data/msg".into(),
        b"still lazy\n".to_vec(),
        0o644,
    ));
    let repo = push_busybox_image(&reg, tmp.path(), "rs", data, &["/bin/cat", "/data/msg"]);
    run(Command::new(bin("soci")).args([
        "convert",
        "--plain-http",
        "--min-layer-size",
        "1000000",
        &format!("docker://{repo}:v1"),
        &format!("docker://{repo}:soci"),
    ]))
    .unwrap();
    // The holder gives up on a daemon that does not come back within 4 s.
    let config = format!("{}[fuse]\nholder_timeout_sec = 4\n", daemon_config(&reg));
    let mut daemon = SociDaemon::start(&tmp.path().join("d"), &config);
    let ctd = Containerd::start_with_soci(&daemon.socket);
    let image = format!("{repo}:soci");
    ctd.soci(&["image", "rpull", "--plain-http", &image]);

    // A long-running container reads file N when /out/goN appears, and writes its sum.
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let script = "touch /out/ready; for n in 0 1 2 3; do \
        while [ ! -e /out/go$n ]; do sleep 0.05; done; \
        if sha256sum /data/f$n > /out/t$n 2>&1; then mv /out/t$n /out/sum$n; \
        else echo failed > /out/sum$n; fi; done; sleep 3600";
    let mount = format!("type=bind,src={},dst=/out,options=rbind:rw", out.display());
    // runc's state directory is shared by every containerd on the host: a unique id.
    let long = format!("long{}", std::process::id());
    ctd.ctr_ok(&[
        "run",
        "-d",
        "--snapshotter",
        "soci",
        "--mount",
        &mount,
        &image,
        &long,
        "/bin/sh",
        "-c",
        script,
    ]);
    let wait_file = |name: &str, secs: u64| -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            if let Ok(s) = std::fs::read_to_string(out.join(name)) {
                return s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no /out/{name} within {secs} s"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let go = |n: u32| std::fs::write(out.join(format!("go{n}")), b"").unwrap();
    let sum_of = |s: String| s.split_whitespace().next().unwrap_or("").to_string();
    wait_file("ready", 60);
    go(0);
    assert_eq!(sum_of(wait_file("sum0", 60)), sums[0]);

    let fuse_mounts = |d: &SociDaemon| {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(" - fuse.soci soci ") && l.contains(d.root.to_str().unwrap()))
            .count()
    };
    let lazy = fuse_mounts(&daemon);
    assert!(lazy >= 1, "no lazy mounts");

    // Graceful restart: the mounts stay; a read while the daemon is down waits, then is served
    // by the next daemon.
    assert_eq!(daemon.stop(), Some(0));
    assert_eq!(
        fuse_mounts(&daemon),
        lazy,
        "SIGTERM leaves the mounts to the fd holder"
    );
    go(1);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        !out.join("sum1").exists(),
        "read completed with no daemon serving"
    );
    daemon.restart();
    assert_eq!(sum_of(wait_file("sum1", 60)), sums[1]);

    // Crash: the same with kill -9.
    daemon.kill9();
    assert_eq!(fuse_mounts(&daemon), lazy);
    go(2);
    std::thread::sleep(std::time::Duration::from_millis(300));
    daemon.restart();
    assert_eq!(sum_of(wait_file("sum2", 60)), sums[2]);
    let log = daemon.log_text();
    assert!(
        log.matches("serving the mount kept by the fd holder again")
            .count()
            >= 2 * lazy,
        "{log}"
    );
    // Snapshots are all there and new containers run.
    assert_eq!(
        ctd.ctr_retry(
            &["run", "--rm", "--snapshotter", "soci", &image, "r1"],
            std::time::Duration::from_secs(60)
        ),
        "still lazy\n"
    );

    // A daemon that never comes back: after the holder's timeout the read fails instead of
    // hanging, and a later daemon mounts the layers afresh.
    daemon.kill9();
    go(3);
    assert_eq!(wait_file("sum3", 30).trim(), "failed");
    daemon.restart();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while daemon.log_text().matches("lazy layer restored").count() < 3 * lazy {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            daemon.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(fuse_mounts(&daemon), lazy);
    assert_eq!(
        ctd.ctr_retry(
            &["run", "--rm", "--snapshotter", "soci", &image, "r2"],
            std::time::Duration::from_secs(60)
        ),
        "still lazy\n"
    );
    let _ = ctd.ctr(&["task", "kill", "-s", "SIGKILL", &long]);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let _ = ctd.ctr(&["task", "delete", "-f", &long]);
    let _ = ctd.ctr(&["container", "delete", &long]);
}

#[test]
fn startup_with_registry_down_marks_lazy_layers_broken_and_serves() {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("soci-broken")
        .tempdir_in("/tmp")
        .unwrap();
    let mut data = vec![Entry::Dir("data/".into())];
    data.push(Entry::File(
        "data/big".into(),
        random_bytes(3 << 20, 777),
        0o644,
    ));
    let repo = push_busybox_image(&reg, tmp.path(), "broken", data, &["/bin/true"]);
    run(Command::new(bin("soci")).args([
        "convert",
        "--plain-http",
        "--min-layer-size",
        "1000000",
        &format!("docker://{repo}:v1"),
        &format!("docker://{repo}:soci"),
    ]))
    .unwrap();
    let cfg = format!("{}[blob]\nfetching_timeout_sec = 2\n", daemon_config(&reg));
    let mut daemon = SociDaemon::start(&tmp.path().join("d"), &cfg);
    let ctd = Containerd::start_with_soci(&daemon.socket);
    ctd.soci(&["image", "rpull", "--plain-http", &format!("{repo}:soci")]);
    assert_eq!(daemon.stop(), Some(0));
    drop(reg);

    // The registry is gone: start-up does not wait for it.
    let started = std::time::Instant::now();
    daemon.restart();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "start-up took {:?}",
        started.elapsed()
    );
    let snaps = ctd.ctr_retry(
        &["snapshots", "--snapshotter", "soci", "ls"],
        std::time::Duration::from_secs(30),
    );
    assert_eq!(
        snaps.lines().filter(|l| l.contains("Committed")).count(),
        2,
        "{snaps}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while daemon.log_text().matches("marked broken").count() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            daemon.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // The label is visible through containerd.
    let key = snaps
        .lines()
        .find(|l| l.contains("Committed"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    let info = ctd.ctr_retry(
        &["snapshots", "--snapshotter", "soci", "info", &key],
        std::time::Duration::from_secs(10),
    );
    assert!(info.contains("containerd.io/snapshot/broken"), "{info}");
}
