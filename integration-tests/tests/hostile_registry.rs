//! A hostile or broken registry under a lazily running container: every read gives the right
//! bytes or a bounded EIO, the daemon stays up, a registry without range support costs one
//! whole fetch per layer (not one per span), a stalled registry fails a read within about one
//! fetch timeout, and reads recover once the registry behaves.

use std::process::Command;
use std::time::Instant;

use integration_tests::containerd::Containerd;
use integration_tests::daemon::SociDaemon;
use integration_tests::fault_proxy::{Fault, FaultProxy};
use integration_tests::image::{push_busybox_image, random_bytes, Entry};
use integration_tests::registry::Registry;
use integration_tests::{bin, run};
use sha2::Digest;

const FILES: u64 = 8;
const FETCH_TIMEOUT_SEC: f64 = 3.0;

fn want(i: u64) -> String {
    format!(
        "{}\n",
        &hex::encode(sha2::Sha256::digest(random_bytes(1_200_000, 900 + i)))[..16]
    )
}

/// Pushes and converts an image of `FILES` random 1.2 MB files (256 KiB spans).
fn image(reg: &Registry, dir: &std::path::Path, name: &str) -> String {
    let mut data = vec![Entry::Dir("data/".into())];
    for i in 0..FILES {
        data.push(Entry::File(
            format!("data/f{i}"),
            random_bytes(1_200_000, 900 + i),
            0o644,
        ));
    }
    let repo = push_busybox_image(reg, dir, name, data, &["/bin/true"]);
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
    repo
}

fn start(dir: &std::path::Path, proxy: &FaultProxy) -> (SociDaemon, Containerd) {
    let cfg = format!(
        "[resolver]\nplain_http_hosts = [\"{}\"]\n[background_fetch]\ndisable = true\n[blob]\nfetching_timeout_sec = {}\nmax_span_verification_retries = 2\n",
        proxy.addr, FETCH_TIMEOUT_SEC as u64
    );
    let daemon = SociDaemon::start(&dir.join("d"), &cfg);
    let ctd = Containerd::start_with_soci(&daemon.socket);
    (daemon, ctd)
}

/// Runs `cmd` in a lazy container; returns (stdout, stderr, seconds).
fn in_container(ctd: &Containerd, image: &str, name: &str, cmd: &str) -> (String, String, f64) {
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
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
        started.elapsed().as_secs_f64(),
    )
}

fn read_file(ctd: &Containerd, image: &str, i: u64, name: &str) -> (String, String, f64) {
    in_container(
        ctd,
        image,
        name,
        &format!("sha256sum /data/f{i} | cut -c1-16"),
    )
}

fn daemon_answers(daemon: &SociDaemon) {
    assert!(
        std::os::unix::net::UnixStream::connect(&daemon.socket).is_ok(),
        "daemon stays up; log: {}",
        std::fs::read_to_string(&daemon.log).unwrap_or_default()
    );
}

#[test]
fn hostile_answers_give_right_bytes_or_bounded_eio_and_reads_recover() {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("soci-hostile")
        .tempdir_in("/tmp")
        .unwrap();
    let repo = image(&reg, tmp.path(), "hostile");
    let proxy = FaultProxy::start(&reg.addr);
    let (daemon, ctd) = start(tmp.path(), &proxy);
    let image = format!("{}/hostile:soci", proxy.addr);
    let _ = repo;
    ctd.soci(&["image", "rpull", "--plain-http", &image]);

    // A read from the caches: the container's own start-up cost.
    let (out, err, _) = read_file(&ctd, &image, 0, "registry-warm");
    assert_eq!(out, want(0), "{err}");
    let (_, _, base) = in_container(&ctd, &image, "registry-base", "cat /data/f0 >/dev/null");

    let cases = [
        Fault::DropContentRange,
        Fault::ShiftContentRange,
        Fault::LongContentLength,
        Fault::ShortContentLength,
        Fault::StallHeaders,
        Fault::Stall,
    ];
    for (n, fault) in cases.into_iter().enumerate() {
        let i = 1 + n as u64 % (FILES - 1);
        proxy.inject(fault, u32::MAX);
        let before = proxy.applied();
        let (out, err, secs) = read_file(&ctd, &image, i, &format!("registry-fault-{n}"));
        assert!(proxy.applied() > before, "{fault:?} was not exercised");
        let read_secs = secs - base;
        if out == want(i) {
            panic!("{fault:?} on every fetch cannot give the right bytes; got them?");
        }
        assert!(
            err.contains("Input/output error"),
            "{fault:?}: neither correct bytes nor EIO: {out:?} / {err}"
        );
        assert!(
            read_secs < 2.0 * FETCH_TIMEOUT_SEC,
            "{fault:?}: EIO after {read_secs:.1} s (fetch timeout {FETCH_TIMEOUT_SEC} s)"
        );
        eprintln!("{fault:?}: EIO in {read_secs:.1} s");
        daemon_answers(&daemon);
        proxy.clear();
        // A failed fetch is shared only with the kernel's immediate retry (0.1 s,
        // `FAILED_FETCH_MEMO`): the next container's read after that fetches afresh. (A fault
        // that fails at once can leave the next container starting within the 0.1 s.)
        std::thread::sleep(soci_fs::FAILED_FETCH_MEMO + std::time::Duration::from_millis(50));
        let (out, err, _) = read_file(&ctd, &image, i, &format!("registry-recover-{n}"));
        assert_eq!(
            out,
            want(i),
            "{fault:?}: no recovery: {err}\ndaemon log:\n{}",
            daemon.log_text()
        );
    }
    daemon_answers(&daemon);
}

#[test]
fn registry_without_ranges_is_read_whole_once_per_layer() {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("soci-norange")
        .tempdir_in("/tmp")
        .unwrap();
    image(&reg, tmp.path(), "norange");
    let proxy = FaultProxy::start(&reg.addr);
    proxy.inject(Fault::IgnoreRange, u32::MAX);
    let (daemon, ctd) = start(tmp.path(), &proxy);
    let image = format!("{}/norange:soci", proxy.addr);
    ctd.soci(&["image", "rpull", "--plain-http", &image]);
    for i in 0..FILES {
        let (out, err, _) = read_file(&ctd, &image, i, &format!("registry-norange-{i}"));
        assert_eq!(out, want(i), "file {i}: {err}");
    }
    daemon_answers(&daemon);
    let gets = proxy.blob_gets();
    eprintln!("blob GETs: {gets:?}");
    // One range request reveals that ranges are ignored; after that each lazy layer blob is
    // fetched whole once (spans: 8 files x 1.2 MB / 256 KiB ≈ 37). Before any answer: the two
    // range requests of each zTOC's skeleton (two zTOCs, fetched in parallel at discovery;
    // then each zTOC is fetched whole) and the first span fetch.
    assert!(
        gets.ranged.len() <= 2 + 2 * 2,
        "range requests after the registry showed it ignores them: {:?}",
        gets.ranged
    );
    let mut per_blob = std::collections::BTreeMap::<&str, usize>::new();
    for p in gets.ranged.iter().chain(&gets.whole) {
        *per_blob.entry(p.as_str()).or_default() += 1;
    }
    for (p, n) in per_blob {
        assert!(n <= 3, "blob {p} fetched {n} times");
    }
}
