//! Upstream soci-snapshotter names a user keeps: the `containerd.io/snapshot/remote/soci.index.digest`
//! label (nerdctl's `--soci-index-digest`) selects that SOCI index instead of discovery, and
//! upstream's metric families (`soci_fs_*`) are served next to ours after a lazy run, with
//! upstream's names, types and labels and plausible values.

use std::collections::BTreeMap;
use std::process::Command;

use integration_tests::containerd::Containerd;
use integration_tests::daemon::SociDaemon;
use integration_tests::image::{
    busybox_layer, random_bytes, Compression, Entry, Layer, LayoutWriter,
};
use integration_tests::registry::{free_port, Registry};
use integration_tests::{bin, run};
use soci_registry::{
    Client, ClientOptions, Descriptor, HostsConfig, ImageIndex, ImageManifest, Reference,
};

const MIB: usize = 1 << 20;
const NS: &str = "pullmode";

/// Pushes an image as `name:tag` (layout dir `seed`) and its SOCI conversion as `name:tag-soci`.
fn push(reg: &Registry, dir: &std::path::Path, name: &str, tag: &str, seed: u64) {
    let layers = [
        busybox_layer(),
        Layer {
            entries: vec![
                Entry::Dir("data/".into()),
                Entry::File("data/big".into(), random_bytes(4 * MIB, seed), 0o644),
                Entry::File("data/msg".into(), format!("{name} ok\n").into(), 0o644),
            ],
            compression: Compression::Gzip,
        },
    ];
    let mut w = LayoutWriter::new(&dir.join(format!("l{seed}")));
    let m = w.manifest(
        "amd64",
        &layers,
        &[
            "/bin/sh",
            "-c",
            "cat /data/msg; sha256sum /data/big | head -c 16; echo",
        ],
    );
    w.tag_manifest(&m, tag);
    reg.push_layout(&w.dir, tag, &format!("{name}:{tag}"), None);
    run(Command::new(bin("soci")).args([
        "convert",
        "--plain-http",
        "--min-layer-size",
        "1000",
        "--span-size",
        "262144",
        &format!("docker://{}/{name}:{tag}", reg.addr),
        &format!("docker://{}/{name}:{tag}-soci", reg.addr),
    ]))
    .unwrap();
}

/// The data layer of `name:tag` and the SOCI v2 index digest of `name:tag-soci`.
fn layer_and_index(reg: &Registry, name: &str, tag: &str) -> (Descriptor, String) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = Client::new(ClientOptions {
        hosts: HostsConfig {
            plain_http_hosts: vec![reg.addr.clone()],
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap();
    let r = Reference::parse(&format!("{}/{name}:{tag}", reg.addr)).unwrap();
    rt.block_on(async {
        let (_, m) = c.get_manifest(&r.repository, tag).await.unwrap();
        let m: ImageManifest = serde_json::from_slice(&m).unwrap();
        let (_, idx) = c
            .get_manifest(&r.repository, &format!("{tag}-soci"))
            .await
            .unwrap();
        let idx: ImageIndex = serde_json::from_slice(&idx).unwrap();
        let soci = idx
            .manifests
            .iter()
            .find(|d| d.artifact_type.is_some())
            .expect("SOCI index entry");
        (m.layers[1].clone(), soci.digest.to_string())
    })
}

fn scrape(addr: &str) -> (String, BTreeMap<String, f64>) {
    let body = integration_tests::get_metrics(addr);
    let values = body
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(' '))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect();
    (body, values)
}

fn expected(name: &str, seed: u64) -> String {
    use sha2::Digest;
    let h = hex::encode(sha2::Sha256::digest(random_bytes(4 * MIB, seed)));
    format!("{name} ok\n{}\n", &h[..16])
}

#[test]
fn index_digest_label_selects_the_index_and_upstream_metrics_are_served() {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("pullmode-um")
        .tempdir_in("/tmp")
        .unwrap();
    // One repository: an index named by digest is looked up in the image's repository.
    push(&reg, tmp.path(), "pullmode-um", "v1", 901);
    push(&reg, tmp.path(), "pullmode-um", "noidx", 902);
    push(&reg, tmp.path(), "pullmode-um", "wrong", 903);
    let (layer, index) = layer_and_index(&reg, "pullmode-um", "v1");
    let (noidx_layer, noidx_index) = layer_and_index(&reg, "pullmode-um", "noidx");
    let (wrong_layer, _) = layer_and_index(&reg, "pullmode-um", "wrong");
    let metrics = format!("127.0.0.1:{}", free_port());
    let cfg = format!(
        "metrics_address = \"{metrics}\"\n[resolver]\nplain_http_hosts = [\"{}\"]\n\
         [background_fetch]\ndisable = true\n",
        reg.addr
    );
    let d = SociDaemon::start(&tmp.path().join("d"), &cfg);
    let ctd = Containerd::start_with_soci(&d.socket);
    // Layers are shared by chain id across images (busybox) and namespaces, so each case
    // uses its own data layer. The unconverted image with the label naming its index's
    // digest is lazy, although its manifest names no index...
    let image = format!("{}/pullmode-um:v1", reg.addr);
    let lazy = ctd.soci(&[
        "-n",
        NS,
        "image",
        "rpull",
        "--plain-http",
        "--soci-index-digest",
        &index,
        &image,
    ]);
    assert!(
        lazy.contains("snapshotter: soci (lazy: 2 of 2 layers)"),
        "{lazy}"
    );
    // ...without the label, discovery finds none for such an image...
    let plain_image = format!("{}/pullmode-um:noidx", reg.addr);
    let plain = ctd.soci(&["-n", NS, "image", "rpull", "--plain-http", &plain_image]);
    let line = |out: &str, l: &Descriptor| {
        out.lines()
            .find(|x| x.contains(l.digest.as_str()))
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        line(&plain, &noidx_layer).contains("full (no_index)"),
        "{plain}"
    );
    // ...and another image's index does not fit (its zTOCs are for other layers).
    let wrong_image = format!("{}/pullmode-um:wrong", reg.addr);
    let wrong = ctd.soci(&[
        "-n",
        NS,
        "image",
        "rpull",
        "--plain-http",
        "--soci-index-digest",
        &noidx_index,
        &wrong_image,
    ]);
    assert!(
        line(&wrong, &wrong_layer).contains("corrupt_index"),
        "{wrong}"
    );
    let out = ctd.ctr_ok(&[
        "-n",
        NS,
        "run",
        "--rm",
        "--snapshotter",
        "soci",
        &image,
        "pullmode-um-run",
    ]);
    assert_eq!(out, expected("pullmode-um", 901));

    let (body, m) = scrape(&metrics);
    let l = layer.digest.as_str();
    let get = |k: String| {
        *m.get(&k)
            .unwrap_or_else(|| panic!("no series {k} in:\n{body}"))
    };
    for family in [
        "# TYPE soci_fs_operation_count counter",
        "# TYPE soci_fs_bytes_served gauge",
        "# TYPE soci_fs_operation_duration_milliseconds histogram",
        "# TYPE soci_fs_operation_duration_microseconds histogram",
        "# TYPE soci_fs_layer_fetched_size_bytes counter",
        "# TYPE soci_fs_layer_size_bytes counter",
        // ours, on the same endpoint
        "# TYPE soci_fetched_bytes_total counter",
    ] {
        assert!(body.contains(family), "{family} missing:\n{body}");
    }
    let op = |name: &str, o: &str| format!("{name}{{layer=\"{l}\",operation_type=\"{o}\"}}");
    let reads = get(op("soci_fs_operation_count", "synchronous_read_count"));
    assert!(reads >= 1.0, "{reads}");
    let served = get(op("soci_fs_bytes_served", "synchronous_bytes_served"));
    assert!(
        served >= (4 * MIB) as f64,
        "sha256sum read the whole file: {served}"
    );
    let fetches = get(op(
        "soci_fs_operation_count",
        "synchronous_read_remote_registry_fetch_count",
    ));
    assert!(fetches >= 1.0 && fetches <= reads, "{fetches} of {reads}");
    assert_eq!(
        get(op(
            "soci_fs_operation_duration_microseconds_count",
            "synchronous_read"
        )),
        reads
    );
    assert!(
        get(op(
            "soci_fs_operation_duration_milliseconds_count",
            "remote_registry_get"
        )) >= fetches
    );
    assert_eq!(
        get(op("soci_fs_operation_duration_milliseconds_count", "mount")),
        1.0
    );
    assert!(
        get(op(
            "soci_fs_operation_duration_milliseconds_count",
            "ztoc_fetch"
        )) >= 1.0
    );
    assert_eq!(
        get(format!(
            "soci_fs_operation_duration_milliseconds_count{{layer=\"{index}\",operation_type=\"soci_index_fetch\"}}"
        )),
        1.0
    );
    let sized = body
        .lines()
        .find(|x| {
            x.starts_with(&format!(
                "soci_fs_layer_size_bytes{{digest=\"{l}\",mountpoint=\""
            ))
        })
        .unwrap_or_else(|| panic!("no layer_size for {l}:\n{body}"));
    assert!(sized.ends_with(&format!(" {}", layer.size)), "{sized}");
    let fetched: f64 = body
        .lines()
        .find(|x| x.starts_with(&format!("soci_fs_layer_fetched_size_bytes{{digest=\"{l}\"")))
        .and_then(|x| x.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no layer_fetched_size for {l}:\n{body}"));
    assert!(
        fetched > 0.0 && fetched <= layer.size as f64,
        "{fetched} of {}",
        layer.size
    );
    assert!(
        !m.contains_key(&op("soci_fs_operation_count", "fuse_mount_failure_count")),
        "no lazy mount failed:\n{body}"
    );
    drop(ctd);
    drop(d);
}
