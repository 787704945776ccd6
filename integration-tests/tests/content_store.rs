//! Layer blobs the daemon pulls itself (upstream's parallel pull mode, and the fallback full
//! pull of an image without a SOCI index) are written to containerd's content store in the
//! pull's namespace, as upstream does unless `discard_unpacked_layers = true`: the image can
//! then be exported (`ctr image export`), its layer digests match the registry's, and
//! containerd's garbage collector keeps them (they are referenced by the image's manifest).
//! With `discard_unpacked_layers = true` the blobs are not written and export fails.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use integration_tests::containerd::Containerd;
use integration_tests::daemon::SociDaemon;
use integration_tests::image::{
    busybox_layer, random_bytes, Compression, Entry, Layer, LayoutWriter,
};
use integration_tests::registry::{free_port, Registry};
use integration_tests::{run, sha256_hex};

const MIB: usize = 1 << 20;

/// busybox + two ~1.5 MiB incompressible layers; returns every layer digest, in order.
fn push_image(reg: &Registry, dir: &Path, name: &str) -> Vec<String> {
    let mut layers = vec![busybox_layer()];
    for i in 0..2u8 {
        layers.push(Layer {
            entries: vec![
                Entry::Dir(format!("d{i}/")),
                Entry::File(
                    format!("d{i}/blob"),
                    random_bytes(3 * MIB / 2, 700 + i as u64),
                    0o644,
                ),
                Entry::File(format!("d{i}/msg"), format!("{name} {i}\n").into(), 0o644),
            ],
            compression: Compression::Gzip,
        });
    }
    let mut w = LayoutWriter::new(&dir.join(name));
    let m = w.manifest("amd64", &layers, &["/bin/sh", "-c", "cat /d0/msg /d1/msg"]);
    w.tag_manifest(&m, "v1");
    reg.push_layout(&w.dir, "v1", &format!("{name}:v1"), None);
    m.layers.iter().map(|(d, _)| d.clone()).collect()
}

fn scrape(addr: &str) -> BTreeMap<String, f64> {
    integration_tests::get_metrics(addr)
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(' '))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// A daemon whose `containerd_address` is `<tmp>/ctd.sock`: a symlink made to containerd's
/// socket once it runs (containerd must start after the daemon, see TESTING.md).
struct Setup {
    tmp: tempfile::TempDir,
    metrics: String,
    d: SociDaemon,
    ctd: Containerd,
}

fn setup(prefix: &str, reg: &Registry, pull: &str) -> Setup {
    let tmp = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let link = tmp.path().join("ctd.sock");
    let cfg = format!(
        "metrics_address = \"{metrics}\"\n[resolver]\nplain_http_hosts = [\"{}\"]\n\
         [content_store]\ncontainerd_address = \"unix://{}\"\n\
         [pull_modes.parallel_pull_unpack]\n{pull}",
        reg.addr,
        link.display()
    );
    let d = SociDaemon::start(&tmp.path().join("d"), &cfg);
    let ctd = Containerd::start_with_soci(&d.socket);
    std::os::unix::fs::symlink(&ctd.socket, &link).unwrap();
    Setup {
        tmp,
        metrics,
        d,
        ctd,
    }
}

/// Exports `image` and returns the digests of the layer blobs in the archive whose bytes hash
/// to their name (the registry's layer digests, if the export is right).
fn export_layers(s: &Setup, ns: &str, image: &str, want: &[String]) -> Result<Vec<String>, String> {
    let tar = s.tmp.path().join(format!("{ns}-export.tar"));
    let o = s
        .ctd
        .ctr(&["-n", ns, "image", "export", tar.to_str().unwrap(), image]);
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    let dir = s.tmp.path().join(format!("{ns}-export"));
    std::fs::create_dir_all(&dir).unwrap();
    run(Command::new("tar").arg("-xf").arg(&tar).arg("-C").arg(&dir)).unwrap();
    let mut found = Vec::new();
    for d in want {
        let hex = d.trim_start_matches("sha256:");
        if let Ok(bytes) = std::fs::read(dir.join("blobs/sha256").join(hex)) {
            if sha256_hex(&bytes) == hex {
                found.push(d.clone());
            }
        }
    }
    Ok(found)
}

/// Runs containerd's garbage collector synchronously (removing a throwaway image with
/// `--sync`), after ingesting an unreferenced blob that the collector must delete: proof that
/// it ran.
fn collect_garbage(s: &Setup, ns: &str, image: &str) {
    let probe = format!("{ns} unreferenced probe blob\n");
    let digest = format!("sha256:{}", sha256_hex(probe.as_bytes()));
    let mut child = Command::new("ctr")
        .arg("-a")
        .arg(&s.ctd.socket)
        .args(["-n", ns, "content", "ingest", "--expected-digest", &digest])
        .arg(format!("{ns}-probe"))
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(probe.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "ingest of the probe blob");
    let tmp_ref = format!("{image}-{ns}-gc");
    s.ctd.ctr_ok(&["-n", ns, "image", "tag", image, &tmp_ref]);
    s.ctd.ctr_ok(&["-n", ns, "image", "rm", "--sync", &tmp_ref]);
    let ls = s.ctd.ctr_ok(&["-n", ns, "content", "ls", "-q"]);
    assert!(
        !ls.contains(&digest),
        "the garbage collector ran and removed the unreferenced probe: {ls}"
    );
}

/// Pulls with rpull, checks every layer blob is exportable with the registry's digest, runs
/// GC, checks again, and runs the image.
fn check_exportable(s: &Setup, ns: &str, image: &str, layers: &[String], want_mode: &str) {
    let mode = s
        .ctd
        .soci(&["-n", ns, "image", "rpull", "--plain-http", image]);
    assert!(mode.contains(want_mode), "{mode}");
    let found = export_layers(s, ns, image, layers).expect("export works");
    assert_eq!(found, layers, "exported layer blobs = the registry's");
    let m = scrape(&s.metrics);
    assert!(
        m["soci_content_store_writes_total{result=\"written\"}"] >= layers.len() as f64,
        "every layer blob written: {m:?}"
    );
    assert_eq!(m["soci_content_store_writes_total{result=\"failed\"}"], 0.0);
    collect_garbage(s, ns, image);
    let found = export_layers(s, ns, image, layers).expect("export works after GC");
    assert_eq!(found, layers, "GC kept the layer blobs");
    let out = s.ctd.ctr_ok(&[
        "-n",
        ns,
        "run",
        "--rm",
        "--snapshotter",
        "soci",
        image,
        &format!("{ns}-run"),
    ]);
    assert!(out.contains(" 1\n"), "{out}");
}

#[test]
fn parallel_mode_writes_layer_blobs_to_containerd() {
    let reg = Registry::start();
    let dir = tempfile::Builder::new()
        .prefix("content-par")
        .tempdir_in("/tmp")
        .unwrap();
    let layers = push_image(&reg, dir.path(), "content-par");
    let s = setup(
        "content-par",
        &reg,
        "enable = true\nconcurrent_download_chunk_size = \"512kb\"\n",
    );
    let image = format!("{}/content-par:v1", reg.addr);
    check_exportable(&s, "content-par", &image, &layers, "parallel_pull_unpack");
    drop(s.ctd);
    drop(s.d);
}

#[test]
fn fallback_full_pull_writes_layer_blobs_to_containerd() {
    let reg = Registry::start();
    let dir = tempfile::Builder::new()
        .prefix("content-fb")
        .tempdir_in("/tmp")
        .unwrap();
    // No SOCI index, lazy loading on, default experimental_parallel_pull_as_fallback = true.
    let layers = push_image(&reg, dir.path(), "content-fb");
    // Spooled path too: one unpack slot, so later layers wait in a temp file.
    let s = setup("content-fb", &reg, "max_concurrent_unpacks_per_image = 1\n");
    let image = format!("{}/content-fb:v1", reg.addr);
    check_exportable(&s, "content-fb", &image, &layers, "no_index");
    drop(s.ctd);
    drop(s.d);
}

#[test]
fn discard_unpacked_layers_keeps_no_blob() {
    let reg = Registry::start();
    let dir = tempfile::Builder::new()
        .prefix("content-discard")
        .tempdir_in("/tmp")
        .unwrap();
    let layers = push_image(&reg, dir.path(), "content-discard");
    let s = setup("content-discard", &reg, "discard_unpacked_layers = true\n");
    let (ns, image) = (
        "content-discard",
        format!("{}/content-discard:v1", reg.addr),
    );
    let mode = s
        .ctd
        .soci(&["-n", ns, "image", "rpull", "--plain-http", &image]);
    assert!(mode.contains("no_index"), "{mode}");
    let m = scrape(&s.metrics);
    assert_eq!(
        m["soci_content_store_writes_total{result=\"written\"}"],
        0.0
    );
    // As upstream with discard_unpacked_layers = true: the layer blobs are not in
    // containerd's content store, so exporting the image fails naming a missing blob.
    let err = export_layers(&s, ns, &image, &layers).expect_err("export must fail");
    assert!(
        err.contains("not found") && layers.iter().any(|l| err.contains(l.as_str()))
            || err.contains("content digest"),
        "export fails on a missing layer blob: {err}"
    );
    let out = s.ctd.ctr_ok(&[
        "-n",
        ns,
        "run",
        "--rm",
        "--snapshotter",
        "soci",
        &image,
        "content-discard-run",
    ]);
    assert!(out.contains(" 1\n"), "the image still runs: {out}");
    drop(s.ctd);
    drop(s.d);
}
