//! Load: 20 containers started at once from one lazily loaded image, and 5 different images
//! pulled and run at once; all read correct bytes; daemon RSS and open fds reported and bounded.

use std::process::Command;

use integration_tests::containerd::Containerd;
use integration_tests::daemon::SociDaemon;
use integration_tests::image::{push_busybox_image, random_bytes, Entry};
use integration_tests::registry::Registry;
use integration_tests::{bin, run};
use sha2::Digest;

fn image(reg: &Registry, dir: &std::path::Path, name: &str, seed: u64) -> (String, String) {
    let mut data = vec![Entry::Dir("data/".into())];
    for i in 0..3u64 {
        data.push(Entry::File(
            format!("data/f{i}"),
            random_bytes(3 << 20, seed + i),
            0o644,
        ));
    }
    let repo = push_busybox_image(
        reg,
        dir,
        name,
        data,
        &[
            "/bin/sh",
            "-c",
            "sha256sum /data/f0 /data/f1 /data/f2 | cut -c1-16",
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
    let want = (0..3u64)
        .map(|i| {
            format!(
                "{}\n",
                &hex::encode(sha2::Sha256::digest(random_bytes(3 << 20, seed + i)))[..16]
            )
        })
        .collect();
    (format!("{repo}:soci"), want)
}

fn rss_kb_and_fds(d: &SociDaemon) -> (u64, usize) {
    let pid = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .find(|p| {
            let c = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let c = String::from_utf8_lossy(&c);
            c.contains("soci-snapshotter-grpc") && c.contains(d.socket.to_str().unwrap())
        })
        .expect("daemon pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    (
        rss,
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count(),
    )
}

/// Runs the image's check in a container that writes its result to `out/NAME` (a bind mount),
/// so the result does not depend on ctr's stdout streaming under load; returns it.
fn run_to_file(sock: &std::path::Path, img: &str, name: &str, out: &std::path::Path) -> String {
    let o = Command::new("ctr")
        .arg("-a")
        .arg(sock)
        .args(["run", "--rm", "--snapshotter", "soci"])
        .arg("--mount")
        .arg(format!(
            "type=bind,src={},dst=/out,options=rbind:rw",
            out.display()
        ))
        .args([
            img,
            name,
            "/bin/sh",
            "-c",
            &format!("sha256sum /data/f0 /data/f1 /data/f2 | cut -c1-16 > /out/{name}"),
        ])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::read_to_string(out.join(name)).unwrap_or_default()
}

#[test]
fn twenty_containers_and_five_images_at_once() {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("soci-load")
        .tempdir_in("/tmp")
        .unwrap();
    let images: Vec<(String, String)> = (0..5u64)
        .map(|i| image(&reg, tmp.path(), &format!("load{i}"), 1000 + 10 * i))
        .collect();
    let cfg = format!(
        "[resolver]\nplain_http_hosts = [\"{}\"]\n[background_fetch]\ndisable = true\n",
        reg.addr
    );
    let daemon = SociDaemon::start(&tmp.path().join("d"), &cfg);
    let ctd = Containerd::start_with_soci(&daemon.socket);

    // 20 containers at once from one image, pulled once.
    let (img0, want0) = images[0].clone();
    ctd.soci(&["image", "rpull", "--plain-http", &img0]);
    let sock = ctd.socket.clone();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let runs: Vec<_> = (0..20)
        .map(|i| {
            let (sock, img, out) = (sock.clone(), img0.clone(), out.clone());
            std::thread::spawn(move || run_to_file(&sock, &img, &format!("load-{i}"), &out))
        })
        .collect();
    for r in runs {
        assert_eq!(r.join().unwrap(), want0);
    }
    let (rss, fds) = rss_kb_and_fds(&daemon);
    eprintln!("after 20 concurrent containers: daemon RSS {rss} kB, {fds} open fds");

    // 5 images pulled and run at once (the first already pulled).
    let jobs: Vec<_> = images
        .iter()
        .enumerate()
        .map(|(i, (img, want))| {
            let (sock, img, want, out) = (sock.clone(), img.clone(), want.clone(), out.clone());
            std::thread::spawn(move || {
                let pull = Command::new(bin("soci"))
                    .arg("-a")
                    .arg(&sock)
                    .args(["image", "rpull", "--plain-http", &img])
                    .output()
                    .unwrap();
                assert!(
                    pull.status.success(),
                    "rpull {img}: {}",
                    String::from_utf8_lossy(&pull.stderr)
                );
                assert_eq!(run_to_file(&sock, &img, &format!("img-{i}"), &out), want);
            })
        })
        .collect();
    let failed = jobs
        .into_iter()
        .map(|j| j.join())
        .filter(|r| r.is_err())
        .count();
    assert_eq!(
        failed,
        0,
        "{failed} of 5 image jobs failed; daemon log:\n{}",
        daemon
            .log_text()
            .lines()
            .filter(|l| !l.contains("DEBUG"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let (rss, fds) = rss_kb_and_fds(&daemon);
    eprintln!("after 5 images at once: daemon RSS {rss} kB, {fds} open fds");
    assert!(rss < 200 * 1024, "daemon RSS {rss} kB");
    assert!(fds < 200, "daemon has {fds} open fds");
}
