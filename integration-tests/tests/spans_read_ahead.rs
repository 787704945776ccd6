//! Read-ahead within a file, measured: a sequential cold read of a multi-span file through the
//! lazy mount, over 20 ms RTT (the delaying proxy), with `[blob] read_ahead_spans = 0` and
//! with the default. Each run has a fresh daemon and containerd (nothing cached). The bytes
//! must be right both ways, and read-ahead must make the read clearly faster.

use std::process::{Child, Command, Stdio};
use std::time::Instant;

use integration_tests::containerd::Containerd;
use integration_tests::daemon::SociDaemon;
use integration_tests::image::{push_busybox_image, random_bytes, Entry};
use integration_tests::registry::Registry;
use integration_tests::{bin, run};
use sha2::Digest;

const BIG: usize = 24 << 20;

struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `soci-delay-proxy` (10 ms each way) in front of `upstream`; returns its address.
fn delay_proxy(upstream: &str) -> (Proxy, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(bin("soci-delay-proxy"))
        .args([&addr, upstream, "10"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting soci-delay-proxy");
    let mut line = String::new();
    let out = child.stdout.take().expect("proxy stdout");
    std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line).unwrap();
    assert!(line.contains("ready"), "delay proxy: {line:?}");
    (Proxy(child), addr)
}

/// Seconds of `ctr run` for `cmd`, and its stdout.
fn timed_run(ctd: &Containerd, image: &str, name: &str, cmd: &str) -> (f64, String) {
    let started = Instant::now();
    let o = ctd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "soci",
        image,
        name,
        "/bin/sh",
        "-c",
        cmd,
    ]);
    let secs = started.elapsed().as_secs_f64();
    assert!(
        o.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    (secs, String::from_utf8_lossy(&o.stdout).into_owned())
}

#[test]
fn read_ahead_speeds_up_a_sequential_cold_read_over_20ms_rtt() {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("spans-readahead")
        .tempdir_in("/tmp")
        .unwrap();
    let data = random_bytes(BIG, 77);
    let want = hex::encode(sha2::Sha256::digest(&data));
    let entries = vec![
        Entry::Dir("data/".into()),
        Entry::File("data/big".into(), data, 0o644),
    ];
    let repo = push_busybox_image(&reg, tmp.path(), "readahead", entries, &["/bin/true"]);
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
    let (_proxy, far) = delay_proxy(&reg.addr);
    let image = format!("{far}/readahead:soci");

    let mut figures = Vec::new();
    for (i, depth) in [0usize, 4].into_iter().enumerate() {
        let cfg = format!(
            "[resolver]\nplain_http_hosts = [\"{far}\"]\n[background_fetch]\ndisable = true\n\
             [blob]\nread_ahead_spans = {depth}\n"
        );
        let daemon = SociDaemon::start(&tmp.path().join(format!("d{i}")), &cfg);
        let ctd = Containerd::start_with_soci(&daemon.socket);
        ctd.soci(&["image", "rpull", "--plain-http", &image]);
        // Container start alone (busybox layer spans), so the read's share can be told apart.
        let (start, _) = timed_run(&ctd, &image, &format!("spans-ra-true-{i}"), "true");
        let (total, out) = timed_run(
            &ctd,
            &image,
            &format!("spans-ra-cat-{i}"),
            "sha256sum /data/big",
        );
        assert!(out.starts_with(&want), "read_ahead_spans {depth}: {out:?}");
        eprintln!(
            "read_ahead_spans = {depth}: 24 MiB sequential cold read over 20 ms RTT: {total:.2} s \
             (container start alone {start:.2} s)"
        );
        figures.push(total);
    }
    assert!(
        figures[1] < figures[0] * 0.8,
        "read-ahead did not speed the read up: {figures:?}"
    );
}
