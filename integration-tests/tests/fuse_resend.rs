//! Reads a daemon took from `/dev/fuse` and did not answer before a kill -9 are answered by the
//! next daemon (`FUSE_NOTIFY_RESEND`), for every reader, including others waiting on the same
//! page: nothing hangs. Real registry (behind a gate that holds span fetches), containerd,
//! the daemon and its fd holder.

use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::containerd::Containerd;
use integration_tests::daemon::SociDaemon;
use integration_tests::gate::{Gate, GateMode};
use integration_tests::image::{push_busybox_image, random_bytes, Entry};
use integration_tests::registry::Registry;
use integration_tests::{bin, run, sha256_hex};

fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn reads_in_flight_at_kill_9_are_answered_by_the_next_daemon() {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("fuse-resend")
        .tempdir_in("/tmp")
        .unwrap();
    let mut data = vec![Entry::Dir("data/".into())];
    let mut sums = Vec::new();
    for i in 0..3u64 {
        let bytes = random_bytes(3 << 20, 900 + i);
        sums.push(sha256_hex(&bytes));
        data.push(Entry::File(format!("data/f{i}"), bytes, 0o644));
    }
    let repo = push_busybox_image(&reg, tmp.path(), "fuseresend", data, &["/bin/true"]);
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

    let gate = Gate::start(&reg.addr);
    let config = format!(
        "[resolver]\nplain_http_hosts = [\"{}\"]\n[background_fetch]\ndisable = true\n[fuse]\nholder_timeout_sec = 120\n",
        gate.addr
    );
    let mut daemon = SociDaemon::start(&tmp.path().join("d"), &config);
    let ctd = Containerd::start_with_soci(&daemon.socket);
    let image = format!("{}/fuseresend:soci", gate.addr);
    ctd.soci(&["image", "rpull", "--plain-http", &image]);

    // Two long-running containers; on /out/go each starts one reader per listed file, 0.2 s
    // apart, and writes each reader's sha256sum to /out/<id>-<n>. f0 is read three times:
    // twice in the first container (the second waits on the page the first one's read
    // locked), once in the other.
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let mount = format!("type=bind,src={},dst=/out,options=rbind:rw", out.display());
    let pid = std::process::id();
    let readers = [
        (format!("fuse{pid}a"), vec![0, 1, 0]),
        (format!("fuse{pid}b"), vec![0, 2]),
    ];
    for (id, files) in &readers {
        let list: Vec<String> = files.iter().map(|f| format!("f{f}")).collect();
        let script = format!(
            "touch /out/ready-{id}; while [ ! -e /out/go ]; do sleep 0.05; done; i=0; \
             for f in {}; do \
             (if sha256sum /data/$f > /out/t-{id}-$i 2>&1; then mv /out/t-{id}-$i /out/{id}-$i; \
             else echo failed > /out/{id}-$i; fi) & i=$((i+1)); sleep 0.2; done; sleep 3600",
            list.join(" ")
        );
        ctd.ctr_ok(&[
            "run",
            "-d",
            "--snapshotter",
            "soci",
            "--mount",
            &mount,
            &image,
            id,
            "/bin/sh",
            "-c",
            &script,
        ]);
    }
    for (id, _) in &readers {
        let ready = out.join(format!("ready-{id}"));
        wait_for("containers ready", Duration::from_secs(60), || {
            ready.exists()
        });
    }
    let fuse_mounts = |d: &SociDaemon| {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(" - fuse.soci soci ") && l.contains(d.root.to_str().unwrap()))
            .count()
    };
    let lazy = fuse_mounts(&daemon);
    assert!(lazy >= 1, "no lazy mounts");

    // Close the gate, start the readers: their reads reach the daemon, which waits on the
    // registry with the requests taken from /dev/fuse.
    // Only the data layer's span fetches (the next daemon reads the zTOC by ranges too).
    let layer = {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let r = soci_registry::Reference::parse(&format!("{repo}:v1")).unwrap();
        let (_, m) = rt
            .block_on(reg.client().get_manifest(&r.repository, "v1"))
            .unwrap();
        let m: serde_json::Value = serde_json::from_slice(&m).unwrap();
        m["layers"][1]["digest"].as_str().unwrap().to_string()
    };
    gate.hold_only(&[layer]);
    gate.set(GateMode::HoldRanges);
    std::fs::write(out.join("go"), b"").unwrap();
    wait_for(
        "span fetches held at the gate",
        Duration::from_secs(30),
        || gate.held() >= 2,
    );
    std::thread::sleep(Duration::from_secs(1));
    let results: Vec<std::path::PathBuf> = readers
        .iter()
        .flat_map(|(id, files)| (0..files.len()).map(move |n| format!("{id}-{n}")))
        .map(|name| out.join(name))
        .collect();
    assert!(
        results.iter().all(|r| !r.exists()),
        "a read completed with the registry held"
    );

    // Crash with the reads in flight; the next daemon resumes the mounts; the registry
    // answers again.
    daemon.kill9();
    assert_eq!(fuse_mounts(&daemon), lazy, "the fd holder keeps the mounts");
    daemon.restart();
    wait_for("mounts resumed", Duration::from_secs(60), || {
        daemon
            .log_text()
            .matches("serving the mount kept by the fd holder again")
            .count()
            >= lazy
    });
    gate.set(GateMode::Open);

    // Every reader finishes, with the right bytes, in bounded time.
    let deadline = Instant::now() + Duration::from_secs(60);
    for ((id, files), _) in readers.iter().zip(0..) {
        for (n, f) in files.iter().enumerate() {
            let path = out.join(format!("{id}-{n}"));
            let got = loop {
                if let Ok(s) = std::fs::read_to_string(&path) {
                    break s;
                }
                assert!(
                    Instant::now() < deadline,
                    "reader {n} of {id} (data/f{f}) still blocked 60 s after the restart: \
                     the read the killed daemon took was never answered\n{}",
                    daemon.log_text()
                );
                std::thread::sleep(Duration::from_millis(50));
            };
            let sum = got.split_whitespace().next().unwrap_or("");
            assert_eq!(sum, sums[*f], "{id}-{n}: {got}");
        }
    }
    let log = daemon.log_text();
    assert!(
        log.contains("asked the kernel to resend FUSE requests"),
        "no resend asked for:\n{log}"
    );
    assert!(
        log.contains("answering a request the kernel sent again"),
        "no resent request seen:\n{log}"
    );

    for (id, _) in &readers {
        let _ = ctd.ctr(&["task", "kill", "-s", "SIGKILL", id]);
    }
    std::thread::sleep(Duration::from_millis(300));
    for (id, _) in &readers {
        let _ = ctd.ctr(&["task", "delete", "-f", id]);
        let _ = ctd.ctr(&["container", "delete", id]);
    }
}
