//! Registry faults under a lazily running container: correct bytes (after retry) or EIO within
//! the configured timeout; never wrong bytes, never a hang; the daemon stays up and reads
//! recover once the fault stops.

use std::process::Command;
use std::time::Instant;

use integration_tests::containerd::Containerd;
use integration_tests::daemon::SociDaemon;
use integration_tests::fault_proxy::{Fault, FaultProxy};
use integration_tests::image::{push_busybox_image, random_bytes, Entry};
use integration_tests::registry::Registry;
use integration_tests::{bin, run};
use sha2::Digest;

const FILES: u64 = 10;

fn want(i: u64) -> String {
    format!(
        "{}\n",
        &hex::encode(sha2::Sha256::digest(random_bytes(1_200_000, 500 + i)))[..16]
    )
}

/// Runs `sha256sum /data/fN` in a container; returns (stdout, stderr, seconds).
fn read_file(ctd: &Containerd, image: &str, i: u64, name: &str) -> (String, String, f64) {
    let started = Instant::now();
    let cmd = format!("sha256sum /data/f{i} | cut -c1-16");
    let o = ctd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "soci",
        image,
        name,
        "/bin/sh",
        "-c",
        &cmd,
    ]);
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
        started.elapsed().as_secs_f64(),
    )
}

#[test]
fn faults_give_correct_bytes_or_eio_and_reads_recover() {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("soci-faults")
        .tempdir_in("/tmp")
        .unwrap();
    let mut data = vec![Entry::Dir("data/".into())];
    for i in 0..FILES {
        data.push(Entry::File(
            format!("data/f{i}"),
            random_bytes(1_200_000, 500 + i),
            0o644,
        ));
    }
    let repo = push_busybox_image(&reg, tmp.path(), "faults", data, &["/bin/true"]);
    run(Command::new(bin("soci")).args([
        "convert",
        "--plain-http",
        "--min-layer-size",
        "1000000",
        "--span-size",
        "262144",
        &format!("docker://{repo}:v1"),
        &format!("docker://{repo}:soci"),
    ]))
    .unwrap();

    let proxy = FaultProxy::start(&reg.addr);
    let cfg = format!(
        "[resolver]\nplain_http_hosts = [\"{}\"]\n[background_fetch]\ndisable = true\n[blob]\nfetching_timeout_sec = 3\nmax_span_verification_retries = 2\n",
        proxy.addr
    );
    let daemon = SociDaemon::start(&tmp.path().join("d"), &cfg);
    let ctd = Containerd::start_with_soci(&daemon.socket);
    let image = format!("{}/faults:soci", proxy.addr);
    ctd.soci(&["image", "rpull", "--plain-http", &image]);

    // (fault, times, whether correct bytes are required after retries)
    let cases = [
        (Fault::ServerError, 2, true),
        (Fault::TooManyRequests, 1, true),
        (Fault::ResetMidBody, 1, true),
        (Fault::Truncate, 1, true),
        (Fault::FlipByte, 1, true),
        (Fault::Stall, 1, false),
        (Fault::ServerError, u32::MAX, false),
        (Fault::FlipByte, u32::MAX, false),
    ];
    for (i, (fault, times, must_succeed)) in cases.into_iter().enumerate() {
        let i = i as u64;
        proxy.inject(fault, times);
        let before = proxy.applied();
        let (out, err, secs) = read_file(&ctd, &image, i, &format!("fault-{i}"));
        assert!(proxy.applied() > before, "{fault:?} was not exercised");
        assert!(secs < 30.0, "{fault:?}: the read took {secs:.1} s");
        if out == want(i) {
            eprintln!("{fault:?} x{times}: correct bytes in {secs:.1} s");
        } else {
            assert!(
                !must_succeed,
                "{fault:?} x{times}: expected correct bytes after retries, got {out:?} / {err}"
            );
            assert!(
                err.contains("Input/output error"),
                "{fault:?}: neither correct bytes nor EIO: {out:?} / {err}"
            );
            eprintln!("{fault:?} x{times}: EIO in {secs:.1} s");
        }
        proxy.clear();
        // A failed fetch answers only the kernel's immediate retry (`FAILED_FETCH_MEMO`,
        // 0.1 s); a fault that fails at once can leave the next container within it.
        std::thread::sleep(soci_fs::FAILED_FETCH_MEMO + std::time::Duration::from_millis(50));
        if matches!(fault, Fault::FlipByte) && !must_succeed {
            // A span that kept failing verification is refused (EIO, no fetch) for
            // POISONED_SPAN_TTL, then tried afresh.
            std::thread::sleep(soci_fs::POISONED_SPAN_TTL + std::time::Duration::from_millis(500));
        }
        let (out, err, _) = read_file(&ctd, &image, i, &format!("recover-{i}"));
        assert_eq!(
            out,
            want(i),
            "{fault:?}: no recovery after the fault stopped: {err}\ndaemon log:\n{}",
            daemon.log_text()
        );
    }
    assert!(
        std::os::unix::net::UnixStream::connect(&daemon.socket).is_ok(),
        "daemon stays up"
    );
}
