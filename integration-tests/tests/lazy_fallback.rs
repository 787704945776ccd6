//! Images without a usable SOCI v2 index still run, by full pull, with the reason recorded;
//! a span tampered in the registry gives EIO, never wrong bytes.

use std::process::Command;

use integration_tests::containerd::Containerd;
use integration_tests::daemon::SociDaemon;
use integration_tests::image::{
    busybox_layer, random_bytes, Compression, Entry, Layer, LayoutWriter,
};
use integration_tests::registry::Registry;
use integration_tests::{bin, run};
use soci_index::{SociIndex, SociVersion, ARTIFACT_TYPE_V1};
use soci_registry::oci::MEDIA_TYPE_OCI_MANIFEST;
use soci_registry::{Client, ClientOptions, Descriptor, HostsConfig, ImageIndex, Reference};

fn setup(reg: &Registry, tmp: &std::path::Path) -> (SociDaemon, Containerd) {
    let cfg = format!("[resolver]\nplain_http_hosts = [\"{}\"]\n[background_fetch]\ndisable = true\n[blob]\nmax_span_verification_retries = 1\nfetching_timeout_sec = 10\n", reg.addr);
    let d = SociDaemon::start(&tmp.join("d"), &cfg);
    let c = Containerd::start_with_soci(&d.socket);
    (d, c)
}

fn image(reg: &Registry, dir: &std::path::Path, name: &str, big: Compression) -> String {
    let mut data = vec![Entry::Dir("data/".into())];
    for i in 0..3 {
        data.push(Entry::File(
            format!("data/b{i}"),
            random_bytes(5 << 20, 70 + i),
            0o644,
        ));
    }
    data.push(Entry::File(
        "data/msg".into(),
        format!("{name} ok\n").into_bytes(),
        0o644,
    ));
    let layers = [
        busybox_layer(),
        Layer {
            entries: data,
            compression: big,
        },
    ];
    let mut w = LayoutWriter::new(&dir.join(name));
    let m = w.manifest(
        "amd64",
        &layers,
        &[
            "/bin/sh",
            "-c",
            "cat /data/msg; sha256sum /data/b1 | head -c 16; echo",
        ],
    );
    w.tag_manifest(&m, "v1");
    reg.push_layout(&w.dir, "v1", &format!("{name}:v1"), None);
    format!("{}/{name}", reg.addr)
}

fn expect_full(ctd: &Containerd, image: &str, reason: &str, expected_output: &str) {
    let mode = ctd.soci(&["image", "rpull", "--plain-http", image]);
    // Layers shared with earlier images (busybox) keep the reason of their first pull.
    let summary = mode.lines().last().unwrap_or("");
    assert!(
        summary.starts_with("snapshotter: overlayfs (full pull: ") && summary.contains(reason),
        "{image}: {mode}"
    );
    let out = ctd.ctr_ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "soci",
        image,
        &format!("run-{reason}"),
    ]);
    assert_eq!(out, expected_output);
}

fn b1_prefix() -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(random_bytes(5 << 20, 71)))[..16].to_string()
}

#[test]
fn unconverted_v1_only_and_zstd_images_run_by_full_pull() {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("soci-fb")
        .tempdir_in("/tmp")
        .unwrap();
    let (daemon, ctd) = setup(&reg, tmp.path());

    let plain = image(&reg, tmp.path(), "plain", Compression::Gzip);
    expect_full(
        &ctd,
        &format!("{plain}:v1"),
        "no_index",
        &format!("plain ok\n{}\n", b1_prefix()),
    );

    // v1 only: a SOCI v1 index (subject = the image manifest) found through the referrers
    // fallback tag, with the zTOCs of a v2 conversion.
    let v1 = image(&reg, tmp.path(), "v1only", Compression::Gzip);
    run(Command::new(bin("soci")).args([
        "convert",
        "--plain-http",
        "--min-layer-size",
        "1000000",
        &format!("docker://{v1}:v1"),
        &format!("docker://{v1}:v2"),
    ]))
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let hosts = HostsConfig {
        plain_http_hosts: vec![reg.addr.clone()],
        ..Default::default()
    };
    let c = Client::new(ClientOptions {
        hosts,
        ..Default::default()
    })
    .unwrap();
    let r = Reference::parse(&format!("{v1}:v1")).unwrap();
    rt.block_on(async {
        let (mdesc, _) = c.get_manifest(&r.repository, "v1").await.unwrap();
        let (_, idx) = c.get_manifest(&r.repository, "v2").await.unwrap();
        let idx: ImageIndex = serde_json::from_slice(&idx).unwrap();
        let sdesc = idx
            .manifests
            .iter()
            .find(|d| d.artifact_type.is_some())
            .unwrap();
        let (_, sbytes) = c
            .get_manifest(&r.repository, sdesc.digest.as_str())
            .await
            .unwrap();
        let v2 = SociIndex::parse(&sbytes).unwrap();
        let subject = Descriptor::new(MEDIA_TYPE_OCI_MANIFEST, mdesc.digest.clone(), mdesc.size);
        let v1idx = SociIndex::new(SociVersion::V1, v2.ztocs, Some(subject), "test");
        let v1bytes = v1idx.to_json();
        c.push_blob(
            &r.repository,
            &soci_registry::Digest::of(b"{}"),
            bytes::Bytes::from_static(b"{}"),
        )
        .await
        .unwrap();
        let v1digest = c
            .put_manifest(
                &r.repository,
                "soci-v1",
                MEDIA_TYPE_OCI_MANIFEST,
                bytes::Bytes::from(v1bytes.clone()),
            )
            .await
            .unwrap();
        let mut entry = Descriptor::new(MEDIA_TYPE_OCI_MANIFEST, v1digest, v1bytes.len() as u64);
        entry.artifact_type = Some(ARTIFACT_TYPE_V1.into());
        let referrers = ImageIndex {
            schema_version: 2,
            media_type: Some("application/vnd.oci.image.index.v1+json".into()),
            artifact_type: None,
            manifests: vec![entry],
            subject: None,
            annotations: Default::default(),
        };
        let body = bytes::Bytes::from(serde_json::to_vec(&referrers).unwrap());
        c.put_manifest(
            &r.repository,
            &format!("sha256-{}", mdesc.digest.hex()),
            "application/vnd.oci.image.index.v1+json",
            body,
        )
        .await
        .unwrap();
    });
    let info = run(Command::new(bin("soci")).args([
        "index",
        "info",
        "--plain-http",
        "--allow-v1",
        "--platform",
        "linux/amd64",
        &format!("{v1}:v1"),
    ]))
    .unwrap();
    assert!(String::from_utf8_lossy(&info.stdout).contains("\"version\": \"v1\""));
    expect_full(
        &ctd,
        &format!("{v1}:v1"),
        "v1_only",
        &format!("v1only ok\n{}\n", b1_prefix()),
    );

    let zstd = image(&reg, tmp.path(), "zstd", Compression::Zstd);
    run(Command::new(bin("soci")).args([
        "convert",
        "--plain-http",
        "--min-layer-size",
        "1000",
        &format!("docker://{zstd}:v1"),
        &format!("docker://{zstd}:soci"),
    ]))
    .unwrap();
    expect_full(
        &ctd,
        &format!("{zstd}:soci"),
        "zstd_layer",
        &format!("zstd ok\n{}\n", b1_prefix()),
    );

    // The reason is logged once per image at info level.
    let log = daemon.log_text();
    for reason in ["no_index", "v1_only", "zstd_layer"] {
        let lines = log
            .lines()
            .filter(|l| l.contains("pulled in full") && l.contains(reason))
            .count();
        assert_eq!(lines, 1, "{reason} logged once:\n{log}");
    }
}

#[test]
fn tampered_span_gives_eio_not_wrong_bytes() {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("soci-tamper")
        .tempdir_in("/tmp")
        .unwrap();
    let (daemon, ctd) = setup(&reg, tmp.path());
    let name = image(&reg, tmp.path(), "tamper", Compression::Gzip);
    run(Command::new(bin("soci")).args([
        "convert",
        "--plain-http",
        "--min-layer-size",
        "1000000",
        &format!("docker://{name}:v1"),
        &format!("docker://{name}:soci"),
    ]))
    .unwrap();
    let image = format!("{name}:soci");
    let mode = ctd.soci(&["image", "rpull", "--plain-http", &image]);
    assert!(
        mode.contains("snapshotter: soci (lazy: 2 of 2 layers)"),
        "{mode}"
    );
    // Flip a byte in the middle of the data layer, after the zTOC was built.
    let layout = tmp.path().join("tamper");
    let idx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let mdig = idx["manifests"][0]["digest"].as_str().unwrap()[7..].to_string();
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(&mdig)).unwrap())
            .unwrap();
    let layer = m["layers"][1]["digest"].as_str().unwrap().to_string();
    let path = reg.blob_path(&layer);
    let mut data = std::fs::read(&path).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    std::fs::write(&path, &data).unwrap();

    let o = ctd.ctr(&["run", "--rm", "--snapshotter", "soci", &image, "tampered"]);
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !out.contains(&b1_prefix()),
        "wrong or unverified bytes reached the container: {out}"
    );
    assert!(
        err.contains("Input/output error") && out.contains("tamper ok"),
        "EIO for the tampered file only: stdout {out}\nstderr {err}"
    );
    assert!(
        daemon.log_text().contains("digest mismatch"),
        "daemon logs the verification failure"
    );
}
