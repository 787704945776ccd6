//! Upstream's parallel pull mode (`[pull_modes.parallel_pull_unpack] enable = true`): lazy
//! loading off, every layer downloaded by the daemon as parallel range requests of
//! `concurrent_download_chunk_size`, streamed in order into the unpacker, within the download
//! and unpack limits; a registry that ignores ranges still works. The fallback full pull of
//! an image without a SOCI index uses the same chunked download. That the layer blobs also
//! land in containerd's content store (export/push work) is checked in `content_store.rs`.

use std::collections::BTreeMap;
use std::process::Command;

use integration_tests::containerd::Containerd;
use integration_tests::daemon::SociDaemon;
use integration_tests::fault_proxy::{Fault, FaultProxy};
use integration_tests::image::{
    busybox_layer, random_bytes, Compression, Entry, Layer, LayoutWriter,
};
use integration_tests::registry::{free_port, Registry};
use integration_tests::{bin, run};

const NS: &str = "pullmode";
const MIB: usize = 1 << 20;

/// busybox + three ~3 MiB incompressible layers; returns the layer digests of the data layers.
fn push_image(reg: &Registry, dir: &std::path::Path, name: &str) -> Vec<String> {
    let mut layers = vec![busybox_layer()];
    for i in 0..3u8 {
        layers.push(Layer {
            entries: vec![
                Entry::Dir(format!("d{i}/")),
                Entry::File(
                    format!("d{i}/blob"),
                    random_bytes(3 * MIB, 300 + i as u64),
                    0o644,
                ),
                Entry::File(
                    format!("d{i}/msg"),
                    format!("{name} layer {i}\n").into(),
                    0o644,
                ),
            ],
            compression: Compression::Gzip,
        });
    }
    let mut w = LayoutWriter::new(&dir.join(name));
    let m = w.manifest(
        "amd64",
        &layers,
        &[
            "/bin/sh",
            "-c",
            "cat /d0/msg /d1/msg /d2/msg; sha256sum /d2/blob | head -c 16; echo",
        ],
    );
    w.tag_manifest(&m, "v1");
    reg.push_layout(&w.dir, "v1", &format!("{name}:v1"), None);
    blobs_over(&reg.storage, 2 * MIB as u64)
}

/// Digests of the registry's blobs bigger than `min` bytes (the data layers).
fn blobs_over(storage: &std::path::Path, min: u64) -> Vec<String> {
    let root = storage.join("docker/registry/v2/blobs/sha256");
    let mut out = Vec::new();
    for p in std::fs::read_dir(&root).unwrap().flatten() {
        for b in std::fs::read_dir(p.path()).unwrap().flatten() {
            let data = b.path().join("data");
            if std::fs::metadata(&data)
                .map(|m| m.len() > min)
                .unwrap_or(false)
            {
                out.push(format!("sha256:{}", b.file_name().to_string_lossy()));
            }
        }
    }
    out.sort();
    out
}

fn expected_output(name: &str) -> String {
    use sha2::Digest;
    let h = hex::encode(sha2::Sha256::digest(random_bytes(3 * MIB, 302)));
    format!(
        "{name} layer 0\n{name} layer 1\n{name} layer 2\n{}\n",
        &h[..16]
    )
}

fn scrape(addr: &str) -> BTreeMap<String, f64> {
    let body = integration_tests::get_metrics(addr);
    body.lines()
        .filter(|l| !l.starts_with('#') && l.contains(' '))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn daemon(tmp: &std::path::Path, proxy: &FaultProxy, metrics: &str, pull: &str) -> SociDaemon {
    let cfg = format!(
        "metrics_address = \"{metrics}\"\n[resolver]\nplain_http_hosts = [\"{}\"]\n\
         [background_fetch]\ndisable = true\n[pull_modes.parallel_pull_unpack]\n{pull}",
        proxy.addr
    );
    SociDaemon::start(tmp, &cfg)
}

/// Ranged GETs per blob path seen by the proxy.
fn ranged_by_blob(proxy: &FaultProxy) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for p in proxy.blob_gets().ranged {
        let d = p.rsplit('/').next().unwrap_or("").to_string();
        *m.entry(d).or_default() += 1;
    }
    m
}

#[test]
fn parallel_mode_pulls_every_layer_in_parallel_chunks_and_runs() {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("pullmode-par")
        .tempdir_in("/tmp")
        .unwrap();
    let data_layers = push_image(&reg, tmp.path(), "pullmode-par");
    assert_eq!(data_layers.len(), 3, "{data_layers:?}");
    // The image has a SOCI index: parallel mode must not use it.
    run(Command::new(bin("soci")).args([
        "convert",
        "--plain-http",
        "--min-layer-size",
        "1000",
        &format!("docker://{}/pullmode-par:v1", reg.addr),
        &format!("docker://{}/pullmode-par:soci", reg.addr),
    ]))
    .unwrap();
    let proxy = FaultProxy::start(&reg.addr);
    let metrics = format!("127.0.0.1:{}", free_port());
    let d = daemon(
        &tmp.path().join("d"),
        &proxy,
        &metrics,
        "enable = true\nconcurrent_download_chunk_size = \"512kb\"\n\
         max_concurrent_downloads_per_image = 4\nmax_concurrent_unpacks_per_image = 1\n",
    );
    let ctd = Containerd::start_with_soci(&d.socket);
    let image = format!("{}/pullmode-par:soci", proxy.addr);
    let mode = ctd.soci(&["-n", NS, "image", "rpull", "--plain-http", &image]);
    assert!(
        mode.contains("full pull") && mode.contains("parallel_pull_unpack"),
        "every layer pulled in full by parallel mode: {mode}"
    );
    // Each ~3 MiB layer came as several 512 KiB range requests.
    let ranged = ranged_by_blob(&proxy);
    for l in &data_layers {
        let n = ranged.get(l).copied().unwrap_or(0);
        assert!(n >= 6, "layer {l}: {n} range requests: {ranged:?}");
    }
    let m = scrape(&metrics);
    let peak_chunks = m["soci_full_pull_peak_chunks_buffered"];
    assert!(
        (2.0..=4.0).contains(&peak_chunks),
        "chunks in flight: parallel, and bounded by max_concurrent_downloads_per_image = 4 \
         (memory <= 4 x 512 KiB per layer): {peak_chunks}"
    );
    assert!(m["soci_full_pull_range_requests_total"] >= 18.0, "{m:?}");
    assert_eq!(
        m["soci_full_pull_peak_unpacking_layers"], 1.0,
        "max_concurrent_unpacks_per_image = 1"
    );
    assert!(
        m["soci_full_pull_spooled_layers_total"] >= 1.0,
        "layers waiting for the unpack slot were downloaded meanwhile: {m:?}"
    );
    assert_eq!(
        m.get("soci_layers_total{mode=\"lazy\"}"),
        Some(&0.0),
        "{m:?}"
    );
    let out = ctd.ctr_ok(&[
        "-n",
        NS,
        "run",
        "--rm",
        "--snapshotter",
        "soci",
        &image,
        "pullmode-par-run",
    ]);
    assert_eq!(out, expected_output("pullmode-par"));

    // A registry that ignores ranges: the same mode still pulls, as whole-blob streams.
    push_image(&reg, tmp.path(), "pullmode-norange");
    proxy.inject(Fault::IgnoreRange, u32::MAX);
    let image = format!("{}/pullmode-norange:v1", proxy.addr);
    let mode = ctd.soci(&["-n", NS, "image", "rpull", "--plain-http", &image]);
    assert!(mode.contains("parallel_pull_unpack"), "{mode}");
    proxy.clear();
    let m = scrape(&metrics);
    assert!(m["soci_full_pull_whole_downloads_total"] >= 1.0, "{m:?}");
    let out = ctd.ctr_ok(&[
        "-n",
        NS,
        "run",
        "--rm",
        "--snapshotter",
        "soci",
        &image,
        "pullmode-norange-run",
    ]);
    assert_eq!(out, expected_output("pullmode-norange"));
    drop(ctd);
    drop(d);
}

#[test]
fn fallback_full_pull_uses_chunks() {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("pullmode-fb")
        .tempdir_in("/tmp")
        .unwrap();
    let data_layers = push_image(&reg, tmp.path(), "pullmode-fb");
    let proxy = FaultProxy::start(&reg.addr);
    let metrics = format!("127.0.0.1:{}", free_port());
    // Lazy loading on (default), no SOCI index: the fallback pull, with upstream's keys.
    let d = daemon(
        &tmp.path().join("d"),
        &proxy,
        &metrics,
        "experimental_parallel_pull_as_fallback = true\nconcurrent_download_chunk_size = \"1mb\"\n\
         max_concurrent_downloads_per_image = 2\nmax_concurrent_unpacks_per_image = 2\n",
    );
    let ctd = Containerd::start_with_soci(&d.socket);
    let image = format!("{}/pullmode-fb:v1", proxy.addr);
    let mode = ctd.soci(&["-n", NS, "image", "rpull", "--plain-http", &image]);
    assert!(mode.contains("no_index"), "{mode}");
    let ranged = ranged_by_blob(&proxy);
    for l in &data_layers {
        let n = ranged.get(l).copied().unwrap_or(0);
        assert!(n >= 3, "layer {l}: {n} range requests: {ranged:?}");
    }
    let m = scrape(&metrics);
    let peak = m["soci_full_pull_peak_chunks_buffered"];
    assert!((1.0..=2.0).contains(&peak), "window = 2: {peak}");
    assert!(m["soci_full_pull_peak_unpacking_layers"] <= 2.0, "{m:?}");
    let out = ctd.ctr_ok(&[
        "-n",
        NS,
        "run",
        "--rm",
        "--snapshotter",
        "soci",
        &image,
        "pullmode-fb-run",
    ]);
    assert_eq!(out, expected_output("pullmode-fb"));

    drop(ctd);
    drop(d);
}

/// Layers pulled ahead of their Prepare take the image's download slots in image order: the
/// bottom layer, whose Prepare containerd sends first, never waits behind the layers above it
/// (it did: a 1 MiB bottom layer started 9.7 s into a 408 MiB pull in the start benchmark).
#[test]
fn layers_pulled_ahead_start_in_image_order() {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("pullmode-order")
        .tempdir_in("/tmp")
        .unwrap();
    let mut layers = vec![busybox_layer()];
    for i in 0..5u8 {
        layers.push(Layer {
            entries: vec![Entry::File(
                format!("l{i}"),
                random_bytes(MIB, 400 + i as u64),
                0o644,
            )],
            compression: Compression::Gzip,
        });
    }
    let mut w = LayoutWriter::new(&tmp.path().join("img"));
    let m = w.manifest("amd64", &layers, &["/bin/true"]);
    w.tag_manifest(&m, "v1");
    reg.push_layout(&w.dir, "v1", "pullmode-order:v1", None);
    let order: Vec<String> = m.layers.iter().map(|(d, _)| d.clone()).collect();
    let proxy = FaultProxy::start(&reg.addr);
    let metrics = format!("127.0.0.1:{}", free_port());
    // One download at a time per image, one request per layer: the order is the one the
    // daemon chose.
    let d = daemon(
        &tmp.path().join("d"),
        &proxy,
        &metrics,
        "experimental_parallel_pull_as_fallback = true\nmax_concurrent_downloads_per_image = 1\n",
    );
    let ctd = Containerd::start_with_soci(&d.socket);
    let image = format!("{}/pullmode-order:v1", proxy.addr);
    let mode = ctd.soci(&["-n", NS, "image", "rpull", "--plain-http", &image]);
    assert!(mode.contains("no_index"), "{mode}");
    let fetched: Vec<String> = proxy
        .blob_gets()
        .whole
        .iter()
        .filter_map(|p| p.rsplit('/').next().map(str::to_string))
        .filter(|d| order.contains(d))
        .collect();
    assert_eq!(
        fetched,
        order,
        "layer downloads out of image order\n{}",
        d.log_text()
    );
    drop(ctd);
    drop(d);
}
