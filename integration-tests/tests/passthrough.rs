//! FUSE passthrough end to end (kernel 6.9+): once a file's spans are all local, opens of it
//! through the lazy mount get a backing file and reads no longer reach the daemon; files not
//! local yet read as before; open files and later opens keep working across a graceful
//! restart and a crash of the daemon.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::containerd::Containerd;
use integration_tests::daemon::SociDaemon;
use integration_tests::image::{push_busybox_image, random_bytes, Entry};
use integration_tests::registry::{free_port, Registry};
use integration_tests::{bin, get_metrics, run, sha256_hex};

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

const READS: &str = "soci_fuse_read_duration_seconds_count";
const OPENS: &str = "soci_passthrough_opens_total";

/// Test files: name, size (all different: backing files are named `<offset>-<size>`).
const FILES: [(&str, usize); 5] = [
    ("early", (3 << 20) + 1),
    ("late", (3 << 20) + 2),
    ("held", (2 << 20) + 3),
    ("fresh", (2 << 20) + 4),
    ("crashfresh", (2 << 20) + 5),
];

/// The lazy mount holding `data/early.bin`.
fn lazy_mount(root: &Path) -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter(|l| l.contains(" - fuse.soci ") && l.contains(root.to_str().unwrap()))
        .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
        .find(|m| m.join("data/early.bin").exists())
        .unwrap_or_else(|| panic!("no lazy mount with data/early.bin:\n{info}"))
}

fn wait_for(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within {secs} s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a backing file of `size` bytes exists for some mount under `root`.
fn backing_file_exists(root: &Path, size: usize) -> bool {
    let suffix = format!("-{size}");
    std::fs::read_dir(root.join("cache/passthrough"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|d| std::fs::read_dir(d.path()).ok())
        .flatten()
        .flatten()
        .any(|f| f.file_name().to_string_lossy().ends_with(&suffix))
}

#[test]
fn passthrough_serves_whole_files_and_survives_restarts() {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("passthrough-")
        .tempdir_in("/tmp")
        .unwrap();
    let mut entries = vec![Entry::Dir("data/".into())];
    let mut sums = std::collections::HashMap::new();
    for (i, (name, size)) in FILES.iter().enumerate() {
        let bytes = random_bytes(*size, 900 + i as u64);
        sums.insert(*name, sha256_hex(&bytes));
        entries.push(Entry::File(format!("data/{name}.bin"), bytes, 0o644));
    }
    let repo = push_busybox_image(&reg, tmp.path(), "passthrough", entries, &["/bin/true"]);
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
    // Background fetch starts 4 s after the mount: time to read a file that is not local.
    let cfg = format!(
        "metrics_address = \"{maddr}\"\n[resolver]\nplain_http_hosts = [\"{}\"]\n\
         [background_fetch]\nsilence_period_msec = 4000\nfetch_period_msec = 0\n\
         [fuse]\nholder_timeout_sec = 60\npassthrough = true\n",
        reg.addr
    );
    let mut daemon = SociDaemon::start(&tmp.path().join("d"), &cfg);
    let ctd = Containerd::start_with_soci(&daemon.socket);
    ctd.soci(&["image", "rpull", "--plain-http", &format!("{repo}:soci")]);
    let m = lazy_mount(&daemon.root);
    let sum = |name: &str| sha256_hex(&std::fs::read(m.join(format!("data/{name}.bin"))).unwrap());

    // Not local yet: read through the daemon, correctly, without passthrough.
    let before = get_metrics(&maddr);
    assert_eq!(sum("early"), sums["early"]);
    let after = get_metrics(&maddr);
    assert!(metric(&after, READS) > metric(&before, READS), "{after}");
    assert_eq!(metric(&after, OPENS), 0, "{after}");

    // The background fetch completes the layer; then every file gets a backing file.
    for (name, size) in FILES {
        wait_for(&format!("backing file of {name}"), 120, || {
            backing_file_exists(&daemon.root, size)
        });
    }
    // A file never read before: passthrough, and not one read reaches the daemon.
    let before = get_metrics(&maddr);
    assert_eq!(sum("late"), sums["late"]);
    let after = get_metrics(&maddr);
    assert_eq!(metric(&after, READS), metric(&before, READS), "{after}");
    assert_eq!(metric(&after, OPENS), metric(&before, OPENS) + 1, "{after}");
    // The one first read through the daemon is passed through now too.
    assert_eq!(sum("early"), sums["early"]);
    let after2 = get_metrics(&maddr);
    assert_eq!(
        metric(&after2, OPENS),
        metric(&after, OPENS) + 1,
        "{after2}"
    );
    assert_eq!(metric(&after2, READS), metric(&before, READS), "{after2}");

    // A file held open across a graceful restart: readable even while no daemon runs.
    let held = File::open(m.join("data/held.bin")).unwrap();
    let size = FILES[2].1;
    let mut buf = vec![0u8; size];
    held.read_exact_at(&mut buf[..size / 2], 0).unwrap();
    assert_eq!(daemon.stop(), Some(0));
    held.read_exact_at(&mut buf[size / 2..], (size / 2) as u64)
        .unwrap();
    assert_eq!(sha256_hex(&buf), sums["held"], "read with the daemon down");
    daemon.restart();
    wait_for("the restarted daemon resuming the mount", 60, || {
        daemon
            .log_text()
            .contains("serving the mount kept by the fd holder again")
    });
    let m2 = lazy_mount(&daemon.root);
    assert_eq!(m2, m);
    // Known and new inodes are passed through on the resumed connection.
    assert_eq!(sum("late"), sums["late"]);
    assert_eq!(sum("fresh"), sums["fresh"]);
    let t = get_metrics(&maddr);
    assert_eq!(metric(&t, OPENS), 2, "{t}");
    assert_eq!(metric(&t, READS), 0, "{t}");
    held.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(sha256_hex(&buf), sums["held"]);

    // Crash: files passed through before keep their backing file; a file never opened is
    // read through the daemon (the new daemon cannot know the old one's cached opens).
    daemon.kill9();
    daemon.restart();
    wait_for("the daemon resuming after the crash", 60, || {
        daemon
            .log_text()
            .matches("serving the mount kept by the fd holder again")
            .count()
            >= 2
    });
    assert_eq!(sum("late"), sums["late"]);
    assert_eq!(sum("crashfresh"), sums["crashfresh"]);
    let t = get_metrics(&maddr);
    assert_eq!(metric(&t, OPENS), 1, "{t}");
    assert!(metric(&t, READS) > 0, "{t}");
    held.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(sha256_hex(&buf), sums["held"]);
    drop(held);
    drop(ctd);
}
