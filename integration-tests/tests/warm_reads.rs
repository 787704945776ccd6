//! Warm reads through the daemon (the path without passthrough: kernels before 6.9, files not
//! local yet, `[fuse] passthrough = false`): the kernel would cap the lazy mount's read-ahead
//! at 128 KiB, so a sequential read reached the daemon as one READ per 128 KiB although a READ
//! may carry 1 MiB. The daemon raises the mount's read-ahead window to 1 MiB after INIT.

use std::path::{Path, PathBuf};
use std::process::Command;

use integration_tests::containerd::Containerd;
use integration_tests::daemon::SociDaemon;
use integration_tests::image::{push_busybox_image, random_bytes, Entry};
use integration_tests::registry::{free_port, Registry};
use integration_tests::{bin, get_metrics, run, sha256_hex};

const READS: &str = "soci_fuse_read_duration_seconds_count";

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

/// The lazy mount under `root` holding `data/big.bin`.
fn lazy_mount(root: &Path) -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter(|l| l.contains(" - fuse.soci ") && l.contains(root.to_str().unwrap()))
        .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
        .find(|m| m.join("data/big.bin").exists())
        .unwrap_or_else(|| panic!("no lazy mount with data/big.bin:\n{info}"))
}

#[test]
fn warm_mount_reads_ahead_as_far_as_one_read_carries() {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("warm-")
        .tempdir_in("/tmp")
        .unwrap();
    let size = 8 << 20;
    let bytes = random_bytes(size, 1616);
    let want = sha256_hex(&bytes);
    let entries = vec![
        Entry::Dir("data/".into()),
        Entry::File("data/big.bin".into(), bytes, 0o644),
    ];
    let repo = push_busybox_image(&reg, tmp.path(), "warm", entries, &["/bin/true"]);
    run(Command::new(bin("soci")).args([
        "convert",
        "--plain-http",
        "--min-layer-size",
        "1000000",
        &format!("docker://{repo}:v1"),
        &format!("docker://{repo}:soci"),
    ]))
    .unwrap();
    let maddr = format!("127.0.0.1:{}", free_port());
    let cfg = format!(
        "metrics_address = \"{maddr}\"\n[resolver]\nplain_http_hosts = [\"{}\"]\n\
         [background_fetch]\ndisable = true\n[fuse]\npassthrough = false\n",
        reg.addr
    );
    let daemon = SociDaemon::start(&tmp.path().join("d"), &cfg);
    let ctd = Containerd::start_with_soci(&daemon.socket);
    ctd.soci(&["image", "rpull", "--plain-http", &format!("{repo}:soci")]);
    let m = lazy_mount(&daemon.root);

    // The window of the mount's BDI (an anonymous device: /sys/class/bdi/0:N).
    let dev = std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(&m).unwrap());
    let ra = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    let kb = std::fs::read_to_string(&ra).unwrap();
    assert_eq!(kb.trim(), "1024", "{ra}");

    // A sequential read of 8 MiB reaches the daemon in about 8 READs, not 64.
    let before = metric(&get_metrics(&maddr), READS);
    let got = std::fs::read(m.join("data/big.bin")).unwrap();
    assert_eq!(sha256_hex(&got), want);
    let reads = metric(&get_metrics(&maddr), READS) - before;
    assert!(
        (1..=24).contains(&reads),
        "{reads} READs for 8 MiB (1 MiB READs expected)"
    );
}
