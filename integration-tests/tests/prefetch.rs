//! Prefetch artifacts end to end: `soci convert --prefetch-file` writes them, the daemon
//! (`[prefetch] enable = true`) fetches their spans before the lazy mount is ready, in merged
//! range requests; a corrupted or hostile artifact does not fail the run; an artifact in
//! upstream's exact shape, inserted by hand, is honoured.
//!
//! Evidence comes from the registry's access log: GETs of the data layer's blob made during
//! `soci image rpull` (which returns once every layer is mounted) are the prefetch; GETs made
//! during `ctr run` are the container's first reads.

use std::process::Command;

use integration_tests::containerd::Containerd;
use integration_tests::daemon::SociDaemon;
use integration_tests::image::{push_busybox_image, random_bytes, Entry};
use integration_tests::registry::Registry;
use integration_tests::{bin, run, sha256_hex};
use soci_index::{SociIndex, ANNOTATION_IMAGE_MANIFEST_DIGEST, ANNOTATION_INDEX_DIGEST};
use soci_registry::oci::MEDIA_TYPE_OCI_MANIFEST;
use soci_registry::{Descriptor, Digest, Reference};

const NS: &str = "prefetch";
const MIB: usize = 1 << 20;

/// An image `name` of busybox plus a gzip layer: `data/a.bin` (3 MiB), `data/filler.bin`
/// (6 MiB, never prefetched), `data/b.bin` (3 MiB), all incompressible. Its command prints the
/// two files' hashes. Returns the repository and the expected output.
fn image(reg: &Registry, dir: &std::path::Path, name: &str, seed: u64) -> (String, String) {
    let a = random_bytes(3 * MIB, seed);
    let filler = random_bytes(6 * MIB, seed + 1);
    let b = random_bytes(3 * MIB, seed + 2);
    let expected = format!("{}\n{}\n", &sha256_hex(&a)[..16], &sha256_hex(&b)[..16]);
    let repo = push_busybox_image(
        reg,
        dir,
        name,
        vec![
            Entry::Dir("data/".into()),
            Entry::File("data/a.bin".into(), a, 0o644),
            Entry::File("data/filler.bin".into(), filler, 0o644),
            Entry::File("data/b.bin".into(), b, 0o644),
        ],
        &[
            "/bin/sh",
            "-c",
            "sha256sum /data/a.bin /data/b.bin | cut -c1-16",
        ],
    );
    (repo, expected)
}

fn convert(repo: &str, extra: &[&str]) {
    let mut cmd = Command::new(bin("soci"));
    cmd.args([
        "convert",
        "--plain-http",
        "--min-layer-size",
        "4000000",
        "--span-size",
        "1048576",
    ]);
    cmd.args(extra);
    cmd.args([
        &format!("docker://{repo}:v1"),
        &format!("docker://{repo}:soci"),
    ]);
    run(&mut cmd).unwrap();
}

/// The SOCI index of `repo:tag` and the digest of the image's data layer (the last).
fn soci_index(reg: &Registry, repo: &str, tag: &str) -> (SociIndex, String) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = reg.client();
    let r = Reference::parse(&format!("{repo}:{tag}")).unwrap();
    rt.block_on(async {
        let (_, idx) = c.get_manifest(&r.repository, tag).await.unwrap();
        let idx: serde_json::Value = serde_json::from_slice(&idx).unwrap();
        let m = &idx["manifests"].as_array().unwrap();
        let img = m.iter().find(|e| e.get("artifactType").is_none()).unwrap();
        let soci = m.iter().find(|e| e.get("artifactType").is_some()).unwrap();
        let (_, mb) = c
            .get_manifest(&r.repository, img["digest"].as_str().unwrap())
            .await
            .unwrap();
        let mb: serde_json::Value = serde_json::from_slice(&mb).unwrap();
        let layer = mb["layers"][1]["digest"].as_str().unwrap().to_string();
        let (_, sb) = c
            .get_manifest(&r.repository, soci["digest"].as_str().unwrap())
            .await
            .unwrap();
        (SociIndex::parse(&sb).unwrap(), layer)
    })
}

/// Re-publishes `repo:soci` as `repo:TAG` with the data layer's prefetch artifacts replaced by
/// one holding `artifact` (pushed as is, described as upstream does: its media type and only the
/// layer digest annotation, after the zTOCs).
fn with_artifact(reg: &Registry, repo: &str, tag: &str, artifact: &[u8]) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = reg.client();
    let r = Reference::parse(&format!("{repo}:soci")).unwrap();
    let repo = &r.repository;
    rt.block_on(async {
        let (_, idx) = c.get_manifest(repo, "soci").await.unwrap();
        let mut idx: serde_json::Value = serde_json::from_slice(&idx).unwrap();
        let entries = idx["manifests"].as_array().unwrap().clone();
        let img_pos = entries
            .iter()
            .position(|e| e.get("artifactType").is_none())
            .unwrap();
        let soci_pos = entries
            .iter()
            .position(|e| e.get("artifactType").is_some())
            .unwrap();
        let (_, sbytes) = c
            .get_manifest(repo, entries[soci_pos]["digest"].as_str().unwrap())
            .await
            .unwrap();
        let mut soci = SociIndex::parse(&sbytes).unwrap();
        let (_, mbytes) = c
            .get_manifest(repo, entries[img_pos]["digest"].as_str().unwrap())
            .await
            .unwrap();
        let mut m: serde_json::Value = serde_json::from_slice(&mbytes).unwrap();
        let layer = m["layers"][1]["digest"].as_str().unwrap().to_string();
        let ad = Digest::of(artifact);
        c.push_blob(repo, &ad, bytes::Bytes::from(artifact.to_vec()))
            .await
            .unwrap();
        soci.ztocs
            .retain(|d| d.media_type != soci_index::prefetch::MEDIA_TYPE_PREFETCH);
        let mut d = Descriptor::new(
            "application/vnd.amazon.soci.prefetch.v1+json",
            ad,
            artifact.len() as u64,
        );
        d.annotations
            .insert("com.amazon.soci.image-layer-digest".into(), layer);
        soci.ztocs.push(d);
        let sjson = soci.to_json();
        let sd = c
            .put_manifest(
                repo,
                &format!("{tag}-soci"),
                MEDIA_TYPE_OCI_MANIFEST,
                bytes::Bytes::from(sjson.clone()),
            )
            .await
            .unwrap();
        m["annotations"][ANNOTATION_INDEX_DIGEST] = sd.to_string().into();
        let mjson = serde_json::to_vec(&m).unwrap();
        let md = c
            .put_manifest(
                repo,
                &format!("{tag}-image"),
                MEDIA_TYPE_OCI_MANIFEST,
                bytes::Bytes::from(mjson.clone()),
            )
            .await
            .unwrap();
        let e = &mut idx["manifests"][img_pos];
        e["digest"] = md.to_string().into();
        e["size"] = mjson.len().into();
        e["annotations"][ANNOTATION_INDEX_DIGEST] = sd.to_string().into();
        let e = &mut idx["manifests"][soci_pos];
        e["digest"] = sd.to_string().into();
        e["size"] = sjson.len().into();
        e["annotations"][ANNOTATION_IMAGE_MANIFEST_DIGEST] = md.to_string().into();
        c.put_manifest(
            repo,
            tag,
            "application/vnd.oci.image.index.v1+json",
            bytes::Bytes::from(serde_json::to_vec(&idx).unwrap()),
        )
        .await
        .unwrap();
    });
}

/// Spans of the data layer's zTOC in `repo:soci` (`soci index info`).
fn span_count(repo: &str) -> u64 {
    let info = run(Command::new(bin("soci")).args([
        "index",
        "info",
        "--plain-http",
        "--platform",
        "linux/amd64",
        &format!("{repo}:soci"),
    ]))
    .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let n = info["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|l| l["ztoc"]["spans"].as_u64())
        .unwrap();
    assert!((11..=14).contains(&n), "{info}");
    n
}

/// Pulls `image` lazily and runs it as container `id`, checking its output; returns the data
/// layer's GETs from the pull's start until the container exited and, when `prefetched`, the
/// daemon reported the layer's prefetch complete (the mount does not wait for it, so the
/// container's reads and the prefetch overlap).
#[allow(clippy::too_many_arguments)]
fn pull_and_run(
    reg: &Registry,
    ctd: &Containerd,
    daemon: &SociDaemon,
    image: &str,
    layer: &str,
    id: &str,
    want: &str,
    prefetched: bool,
) -> Vec<u64> {
    let before = reg.blob_gets(layer).len();
    let done = daemon.prefetches_done(layer);
    let mode = ctd.soci(&["-n", NS, "image", "rpull", "--plain-http", image]);
    assert!(mode.contains("lazy: 1 of 2 layers"), "{mode}");
    let out = ctd.ctr_ok(&["-n", NS, "run", "--rm", "--snapshotter", "soci", image, id]);
    assert_eq!(out, want, "{id}: daemon log:\n{}", daemon.log_text());
    if prefetched {
        daemon.wait_prefetched(layer, done);
    }
    reg.blob_gets_settled(layer)[before..].to_vec()
}

#[test]
fn prefetched_spans_serve_the_first_reads_and_bad_artifacts_never_fail_a_run() {
    integration_tests::require("ctr", "containerd");
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("prefetch")
        .tempdir_in("/tmp")
        .unwrap();
    let maddr = format!("127.0.0.1:{}", integration_tests::registry::free_port());
    let cfg = format!(
        "metrics_address = \"{maddr}\"\n[resolver]\nplain_http_hosts = [\"{}\"]\n[background_fetch]\ndisable = true\n[prefetch]\nenable = true\n",
        reg.addr
    );
    let daemon = SociDaemon::start(&tmp.path().join("d"), &cfg);
    let ctd = Containerd::start_with_soci(&daemon.socket);
    let log = |what: &str| {
        let text = daemon.log_text();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains("prefetch")).collect();
        format!("{what}\n{}", lines.join("\n"))
    };

    // 1. Built by our convert: a.bin by flag, b.bin from upstream's JSON file shape.
    let (repo, want) = image(&reg, tmp.path(), "prefetch-ok", 10);
    let json = tmp.path().join("prefetch.json");
    std::fs::write(&json, br#"["/data/b.bin", "  "]"#).unwrap();
    convert(
        &repo,
        &[
            "--prefetch-file",
            "/data/a.bin",
            "--prefetch-files-json",
            json.to_str().unwrap(),
        ],
    );
    let (idx, layer) = soci_index(&reg, &repo, "soci");
    let pf = idx
        .prefetch_for(&Digest::parse(&layer).unwrap())
        .expect("artifact listed");
    assert_eq!(pf.annotations.len(), 1, "{pf:?}");
    let gets = pull_and_run(
        &reg,
        &ctd,
        &daemon,
        &format!("{repo}:soci"),
        &layer,
        "prefetch-ok",
        &want,
        true,
    );
    // a.bin and b.bin are 3 MiB apart (filler.bin): two merged requests of ~3-4 spans each,
    // and nothing else: the container's reads, while they arrive, made no requests of their own.
    assert_eq!(gets.len(), 2, "{:?}", log(&format!("{gets:?}")));
    for &b in &gets {
        assert!(b >= 3 * MIB as u64 && b <= 5 * MIB as u64, "{gets:?}");
    }
    eprintln!("prefetch: GETs of the data layer {gets:?}");

    // 2. The artifact's bytes corrupted in the registry (digest mismatch): the run is lazy
    //    and correct, the reads fetch on demand.
    let (repo, want) = image(&reg, tmp.path(), "prefetch-corrupt", 20);
    convert(&repo, &["--prefetch-file", "/data/a.bin"]);
    let (idx, layer) = soci_index(&reg, &repo, "soci");
    let pf = idx
        .prefetch_for(&Digest::parse(&layer).unwrap())
        .unwrap()
        .clone();
    let path = reg.blob_path(pf.digest.as_str());
    let mut bytes = std::fs::read(&path).unwrap();
    let i = bytes.iter().position(|b| b.is_ascii_digit()).unwrap();
    bytes[i] = if bytes[i] == b'9' { b'8' } else { bytes[i] + 1 };
    std::fs::write(&path, bytes).unwrap();
    let gets = pull_and_run(
        &reg,
        &ctd,
        &daemon,
        &format!("{repo}:soci"),
        &layer,
        "prefetch-corrupt",
        &want,
        false,
    );
    // Demand reads only (the metrics below count no prefetch request for it).
    assert!(!gets.is_empty());

    // 3. A hostile artifact (span ids past the layer's zTOC): refused, the run goes on.
    let (repo, want) = image(&reg, tmp.path(), "prefetch-hostile", 30);
    convert(&repo, &[]);
    let hostile = br#"{"version":"1.0","prefetch_spans":[{"start_span":0,"end_span":2147483647}]}"#;
    with_artifact(&reg, &repo, "hostile", hostile);
    let (_, layer) = soci_index(&reg, &repo, "hostile");
    let gets = pull_and_run(
        &reg,
        &ctd,
        &daemon,
        &format!("{repo}:hostile"),
        &layer,
        "prefetch-hostile",
        &want,
        false,
    );
    assert!(!gets.is_empty());
    let text = daemon.log_text();
    assert!(text.contains("outside layer"), "{}", log("no warning"));

    // 4. Upstream's shape, written by hand (Go's encoding, priority set on one range):
    //    honoured. 1 MiB spans: a.bin lies in spans 0..=4 at most, b.bin (from 9 MiB on) in
    //    8..=last; the two adjacent ranges are one request.
    let (repo, want) = image(&reg, tmp.path(), "prefetch-upstream", 40);
    convert(&repo, &[]);
    let n = span_count(&repo);
    let upstream = format!(
        r#"{{"version":"1.0","prefetch_spans":[{{"start_span":0,"end_span":3}},{{"start_span":4,"end_span":4,"priority":1}},{{"start_span":8,"end_span":{}}}]}}"#,
        n - 1
    );
    let upstream = upstream.as_bytes();
    with_artifact(&reg, &repo, "upstream", upstream);
    let (idx, layer) = soci_index(&reg, &repo, "upstream");
    let z = idx.ztoc_for(&Digest::parse(&layer).unwrap()).unwrap();
    assert_eq!(z.media_type, "application/octet-stream");
    let gets = pull_and_run(
        &reg,
        &ctd,
        &daemon,
        &format!("{repo}:upstream"),
        &layer,
        "prefetch-upstream",
        &want,
        true,
    );
    assert_eq!(gets.len(), 2, "{:?}", log(&format!("{gets:?}")));

    // Metrics: two prefetches done (4 requests), two refused (corrupt, hostile).
    let m = integration_tests::get_metrics(&maddr);
    assert_eq!(metric(&m, "soci_prefetch_layers_total"), 4, "{m}");
    assert_eq!(metric(&m, "soci_prefetch_requests_total"), 4, "{m}");
    assert_eq!(metric(&m, "soci_prefetch_failures_total"), 2, "{m}");
    assert!(
        metric(&m, "soci_prefetch_bytes_total") >= 12 * MIB as u64,
        "{m}"
    );
}

fn metric(text: &str, name: &str) -> u64 {
    integration_tests::metric_value(text, name).unwrap_or(u64::MAX)
}
