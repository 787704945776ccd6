//! Upstream's `[[resolver.host."HOST".mirrors]]` in the daemon config: an image named after a
//! registry the daemon cannot reach loads lazily through the configured mirror.

use std::process::Command;

use integration_tests::containerd::Containerd;
use integration_tests::daemon::SociDaemon;
use integration_tests::image::{push_busybox_image, Entry};
use integration_tests::registry::Registry;
use integration_tests::{bin, run};

#[test]
fn image_of_an_unreachable_registry_loads_lazily_through_a_config_mirror() {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("soci-mirror")
        .tempdir_in("/tmp")
        .unwrap();
    let data = vec![
        Entry::Dir("data/".into()),
        Entry::File(
            "data/big.bin".into(),
            integration_tests::image::random_bytes(4 << 20, 7),
            0o644,
        ),
        Entry::File(
            "data/hello.txt".into(),
            b"through the mirror\n".to_vec(),
            0o644,
        ),
    ];
    let repo = push_busybox_image(
        &reg,
        tmp.path(),
        "mirrored",
        data,
        &["cat", "/data/hello.txt"],
    );
    run(Command::new(bin("soci")).args([
        "convert",
        "--plain-http",
        "--min-layer-size",
        "0",
        &format!("docker://{repo}:v1"),
        &format!("docker://{repo}:soci"),
    ]))
    .unwrap();

    // The image is named after a registry that does not resolve; only mirrors reach it.
    let origin = "mirror-origin.invalid:5000";
    let image = format!("{origin}/mirrored:soci");
    // The CLI (rpull) reaches it through a containerd hosts.toml mirror ...
    let hosts = tmp.path().join("certs.d");
    std::fs::create_dir_all(hosts.join(origin)).unwrap();
    std::fs::write(
        hosts.join(origin).join("hosts.toml"),
        format!(
            "[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            reg.addr
        ),
    )
    .unwrap();
    // ... and the daemon through upstream's config key (loopback mirror: plain HTTP).
    let cfg = format!(
        "[resolver]\nhosts_dir = \"/nonexistent-soci-hosts\"\n\
         [[resolver.host.\"{origin}\".mirrors]]\nhost = \"{}\"\n\
         [background_fetch]\ndisable = true\n",
        reg.addr
    );
    let daemon = SociDaemon::start(&tmp.path().join("d"), &cfg);
    let ctd = Containerd::start_with_soci(&daemon.socket);
    let mode = ctd.soci(&[
        "image",
        "rpull",
        "--hosts-dir",
        hosts.to_str().unwrap(),
        &image,
    ]);
    assert!(
        mode.contains("snapshotter: soci (lazy: "),
        "{mode}\n{}",
        daemon.log_text()
    );
    let out = ctd.ctr_ok(&["run", "--rm", "--snapshotter", "soci", &image, "mirror-1"]);
    assert_eq!(out, "through the mirror\n");
}
