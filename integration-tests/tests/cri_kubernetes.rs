//! The kubelet's path: containerd's CRI plugin with `soci` as its snapshotter and snapshot
//! annotations on (deploy/ documents this), driven by a CRI v1 client as the kubelet drives it.

use std::process::Command;
use std::time::Duration;

use integration_tests::cri::{self, Cri, CriOptions};
use integration_tests::daemon::SociDaemon;
use integration_tests::image::{push_busybox_image, random_bytes, Entry};
use integration_tests::registry::Registry;
use integration_tests::{bin, run};

#[test]
fn cri_pulls_and_runs_converted_image_lazily_and_unconverted_by_full_pull() {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("soci-cri")
        .tempdir_in("/tmp")
        .unwrap();
    let mut data = vec![Entry::Dir("data/".into())];
    for i in 0..10u64 {
        data.push(Entry::File(
            format!("data/big{i}"),
            random_bytes(8 << 20, 500 + i),
            0o644,
        ));
    }
    data.push(Entry::File(
        "data/hello".into(),
        b"hello from a lazy pod\n".to_vec(),
        0o644,
    ));
    let repo = push_busybox_image(
        &reg,
        tmp.path(),
        "cri-app",
        data,
        &["/bin/cat", "/data/hello"],
    );
    run(Command::new(bin("soci")).args([
        "convert",
        "--plain-http",
        &format!("docker://{repo}:v1"),
        &format!("docker://{repo}:soci"),
    ]))
    .unwrap();
    let pause = cri::push_pause_image(&reg, tmp.path(), "cri-pause");
    let certs = tmp.path().join("certs.d");
    cri::write_plain_http_hosts(&certs, &reg.addr);

    // No background fetch during the test, so bytes served are what the start needed.
    let daemon = SociDaemon::start(
        &tmp.path().join("d"),
        "[background_fetch]\nsilence_period_msec = 600000\n",
    );
    let ctd = cri::start_containerd(&CriOptions {
        soci_socket: &daemon.socket,
        certs_dir: &certs,
        sandbox_image: &pause,
        extra: "",
    });
    let client = Cri::connect(&ctd.socket, &ctd.socket, &tmp.path().join("logs")).unwrap();

    let before = reg.blob_bytes_served();
    let lazy = format!("{repo}:soci");
    client.pull(&lazy, None).unwrap();
    let out = client
        .run("cri-lazy", &lazy, &[], Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log_text()));
    assert_eq!((out.code, out.log.as_str()), (0, "hello from a lazy pod\n"));
    let served = reg.blob_bytes_served() - before;
    let image_bytes = 80u64 << 20; // the data layer alone (random, incompressible)
    assert!(
        served * 10 < image_bytes,
        "registry served {served} bytes for a lazy CRI pull of a {image_bytes}-byte image"
    );
    let modes = ctd.soci(&["-n", cri::K8S_NAMESPACE, "image", "mode", &lazy]);
    assert!(modes.contains("snapshotter: soci"), "{modes}");

    let full = format!("{repo}:v1");
    client.pull(&full, None).unwrap();
    let out = client
        .run(
            "cri-full",
            &full,
            &["/bin/sh", "-c", "wc -c < /data/big3"],
            Duration::from_secs(120),
        )
        .unwrap();
    assert_eq!((out.code, out.log.trim()), (0, "8388608"));
}
