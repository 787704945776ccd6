//! `soci prefetch record` end to end: an image whose workload reads three files spread across
//! a big layer is run once under the daemon; the spans its reads needed become the prefetch
//! artifact of a new SOCI index (same zTOCs); a fresh run of the recorded image then gets
//! those spans before the container starts and reads nothing from the registry on demand.
//! A workload that reads nothing gives a valid index without prefetch; a planted hostile
//! record is refused.
//!
//! Evidence is the registry's access log: GETs of the data layer made during `soci image rpull`
//! (which returns once every layer is mounted and prefetched) and during `ctr run`.

use std::collections::BTreeSet;
use std::process::Command;

use integration_tests::containerd::Containerd;
use integration_tests::daemon::SociDaemon;
use integration_tests::image::{push_busybox_image, random_bytes, Entry};
use integration_tests::registry::Registry;
use integration_tests::{bin, sha256_hex};
use soci_index::prefetch::MEDIA_TYPE_PREFETCH;
use soci_index::SociIndex;
use soci_registry::{Digest, Reference};

const MIB: usize = 1 << 20;
/// The data files the workload reads, with sizes; fillers between them are never read.
const READ: [(&str, usize); 3] = [
    ("data/a.bin", 3 * MIB / 2),
    ("data/b.bin", 3 * MIB / 2),
    ("data/c.bin", 3 * MIB / 2),
];

/// The image manifest digest, SOCI index and data layer digest (the last) of `repo:tag`.
fn soci_index(reg: &Registry, repo: &str, tag: &str) -> (String, SociIndex, String) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = reg.client();
    let r = Reference::parse(&format!("{repo}:{tag}")).unwrap();
    rt.block_on(async {
        let (_, idx) = c.get_manifest(&r.repository, tag).await.unwrap();
        let idx: serde_json::Value = serde_json::from_slice(&idx).unwrap();
        let m = idx["manifests"].as_array().unwrap();
        assert_eq!(m.len(), 2, "{idx}");
        let img = m.iter().find(|e| e.get("artifactType").is_none()).unwrap();
        let soci = m.iter().find(|e| e.get("artifactType").is_some()).unwrap();
        let md = img["digest"].as_str().unwrap().to_string();
        let (_, mb) = c.get_manifest(&r.repository, &md).await.unwrap();
        let mb: serde_json::Value = serde_json::from_slice(&mb).unwrap();
        let layer = mb["layers"][1]["digest"].as_str().unwrap().to_string();
        assert_eq!(
            mb["annotations"]["com.amazon.soci.index-digest"], soci["digest"],
            "binding"
        );
        assert_eq!(
            soci["annotations"]["com.amazon.soci.image-manifest-digest"].as_str(),
            Some(md.as_str())
        );
        let (_, sb) = c
            .get_manifest(&r.repository, soci["digest"].as_str().unwrap())
            .await
            .unwrap();
        (md, SociIndex::parse(&sb).unwrap(), layer)
    })
}

/// The span ids a full read of each file of `READ` touches, from the data layer's zTOC.
fn expected_spans(reg: &Registry, repo: &str, idx: &SociIndex, layer: &str) -> BTreeSet<usize> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = reg.client();
    let r = Reference::parse(&format!("{repo}:soci")).unwrap();
    let z = idx
        .ztoc_for(&Digest::parse(layer).unwrap())
        .unwrap()
        .clone();
    let bytes = rt.block_on(c.get_blob(&r.repository, &z)).unwrap();
    let z = soci_ztoc::Ztoc::from_bytes(&bytes).unwrap();
    let spans = z.spans().unwrap();
    let mut out = BTreeSet::new();
    for (name, _) in READ {
        let e = z
            .entries
            .iter()
            .find(|e| soci_index::prefetch::clean_path(&e.name) == name.as_bytes())
            .unwrap();
        out.extend(spans.spans_for(&(e.offset..e.offset + e.size)));
    }
    assert!(out.len() < spans.len() - 3, "{out:?} of {}", spans.len());
    out
}

/// Pulls `image` lazily in `ns` and runs it; returns the layer's GETs from the pull's start
/// until the container exited and its prefetch (if the image has one) completed, the prefetch
/// range requests made meanwhile, and the output. The mount does not wait for the prefetch:
/// the container's reads overlap it, and any GET beyond the prefetch's is a demand read.
fn pull_and_run(
    reg: &Registry,
    ctd: &Containerd,
    (daemon, maddr): (&SociDaemon, &str),
    ns: &str,
    image: &str,
    (layer, prefetched): (&str, bool),
) -> (Vec<u64>, u64, String) {
    let before = reg.blob_gets(layer).len();
    let requests = || integration_tests::counter(maddr, "soci_prefetch_requests_total");
    let (done, req0) = (daemon.prefetches_done(layer), requests());
    let mode = ctd.soci(&["-n", ns, "image", "rpull", "--plain-http", image]);
    assert!(mode.contains("lazy: 1 of 2 layers"), "{mode}");
    let out = ctd.ctr_ok(&["-n", ns, "run", "--rm", "--snapshotter", "soci", image, ns]);
    if prefetched {
        daemon.wait_prefetched(layer, done);
    }
    let gets = reg.blob_gets_settled(layer)[before..].to_vec();
    (gets, requests() - req0, out)
}

/// `soci prefetch record` of `repo:soci` into `repo:dst_tag`; the command's output.
fn record(
    ctd: &Containerd,
    daemon: &SociDaemon,
    repo: &str,
    dst_tag: &str,
    ns: &str,
    args: &[&str],
) -> std::process::Output {
    let mut cmd = Command::new(bin("soci"));
    cmd.arg("-a").arg(&ctd.socket);
    // Whole spans, same zTOCs (refining is prefetch_refine.rs's).
    cmd.args([
        "prefetch",
        "record",
        "--keep-spans",
        "--plain-http",
        "--run-timeout",
        "60s",
    ]);
    cmd.arg("--daemon-root").arg(&daemon.root);
    cmd.args(["--scratch-namespace", ns]);
    cmd.arg("--dst").arg(format!("docker://{repo}:{dst_tag}"));
    cmd.arg(format!("docker://{repo}:soci"));
    if !args.is_empty() {
        cmd.arg("--").args(args);
    }
    cmd.output().unwrap()
}

#[test]
fn recorded_prefetch_replaces_demand_reads_and_hostile_records_are_refused() {
    integration_tests::require("ctr", "containerd");
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("record")
        .tempdir_in("/tmp")
        .unwrap();
    let maddr = format!("127.0.0.1:{}", integration_tests::registry::free_port());
    let cfg = format!(
        "metrics_address = \"{maddr}\"\n[resolver]\nplain_http_hosts = [\"{}\"]\n[background_fetch]\ndisable = true\n[prefetch]\nenable = true\n",
        reg.addr
    );
    let daemon = SociDaemon::start(&tmp.path().join("d"), &cfg);
    let ctd = Containerd::start_with_soci(&daemon.socket);

    // busybox + a data layer: a, 3 MiB filler, b, 3 MiB filler, c (1 MiB spans).
    let mut entries = vec![Entry::Dir("data/".into())];
    let mut want = String::new();
    for (i, (name, size)) in READ.iter().enumerate() {
        let d = random_bytes(*size, 100 + i as u64);
        want.push_str(&format!("{}\n", &sha256_hex(&d)[..16]));
        entries.push(Entry::File((*name).into(), d, 0o644));
        entries.push(Entry::File(
            format!("data/filler{i}.bin"),
            random_bytes(3 * MIB, 200 + i as u64),
            0o644,
        ));
    }
    let cmd = "sha256sum /data/a.bin /data/b.bin /data/c.bin | cut -c1-16";
    let repo = push_busybox_image(
        &reg,
        tmp.path(),
        "record-app",
        entries,
        &["/bin/sh", "-c", cmd],
    );
    integration_tests::run(Command::new(bin("soci")).args([
        "convert",
        "--plain-http",
        "--min-layer-size",
        "4000000",
        "--span-size",
        "1048576",
        &format!("docker://{repo}:v1"),
        &format!("docker://{repo}:soci"),
    ]))
    .unwrap();
    let (soci_manifest, soci_idx, layer) = soci_index(&reg, &repo, "soci");
    let expected = expected_spans(&reg, &repo, &soci_idx, &layer);

    // Without prefetch: every span the workload needs is a demand read during the run.
    let d = (&daemon, maddr.as_str());
    let (gets, prefetch_requests, out) = pull_and_run(
        &reg,
        &ctd,
        d,
        "record-base",
        &format!("{repo}:soci"),
        (&layer, false),
    );
    assert_eq!(out, want);
    assert_eq!(prefetch_requests, 0);
    assert!(!gets.is_empty());
    let base_bytes: u64 = gets.iter().sum();

    // 1. The layers are mounted already (record-base): refused, with what to do.
    let t = std::time::Instant::now();
    let o = record(&ctd, &daemon, &repo, "rec", "record-rec0", &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(
        stderr.contains("already mounted") && stderr.contains("images rm --sync"),
        "{stderr}"
    );
    ctd.ctr_ok(&[
        "-n",
        "record-base",
        "images",
        "rm",
        "--sync",
        &format!("{repo}:soci"),
    ]);
    eprintln!("refusal: {:?}", t.elapsed());

    // Record (the image's own command), from cold mounts in a scratch namespace.
    let t = std::time::Instant::now();
    let o = record(&ctd, &daemon, &repo, "rec", "record-rec1", &[]);
    eprintln!("record: {:?}", t.elapsed());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let digest = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(Digest::parse(&digest).is_some(), "{digest:?} {stderr}");
    assert!(stderr.contains(&want), "container output shown: {stderr}");
    let (rec_manifest, rec_idx, rec_layer) = soci_index(&reg, &repo, "rec");
    assert_eq!(rec_layer, layer);
    assert_ne!(rec_manifest, soci_manifest);
    // Same zTOCs, reused by digest; one prefetch artifact, for the data layer.
    let ztocs = |i: &SociIndex| -> Vec<_> {
        i.ztocs
            .iter()
            .filter(|d| d.media_type != MEDIA_TYPE_PREFETCH)
            .cloned()
            .collect()
    };
    assert_eq!(ztocs(&rec_idx), ztocs(&soci_idx));
    let pf = rec_idx
        .prefetch_for(&Digest::parse(&layer).unwrap())
        .expect("prefetch artifact for the data layer")
        .clone();
    assert_eq!(rec_idx.ztocs.last(), Some(&pf));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let r = Reference::parse(&format!("{repo}:rec")).unwrap();
    let pbytes = rt
        .block_on(reg.client().get_blob(&r.repository, &pf))
        .unwrap();
    let artifact =
        soci_index::prefetch::PrefetchArtifact::parse(&pbytes, "pf", &layer, 1 << 20).unwrap();
    let recorded: BTreeSet<usize> = artifact.span_ranges().into_iter().flatten().collect();
    assert_eq!(recorded, expected, "{}", String::from_utf8_lossy(&pbytes));
    // The scratch namespace is gone.
    let ns = ctd.ctr_ok(&["namespaces", "ls", "-q"]);
    assert!(!ns.lines().any(|l| l == "record-rec1"), "{ns}");

    // 2. The recorded image, fresh: every GET is one of the prefetch's requests (the
    //    container's reads, overlapping them, made none of their own).
    let (gets, prefetch_requests, out) = pull_and_run(
        &reg,
        &ctd,
        d,
        "record-after",
        &format!("{repo}:rec"),
        (&layer, true),
    );
    assert_eq!(
        out,
        want,
        "output byte-identical; daemon warnings:\n{}",
        daemon
            .log_text()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(prefetch_requests > 0, "no prefetch");
    assert_eq!(
        gets.len() as u64,
        prefetch_requests,
        "demand reads went to the registry: {gets:?}"
    );
    let pulled: u64 = gets.iter().sum();
    // Only the read spans (3 files of 1.5 MiB in 1 MiB spans: at most 2 + 1 spans each).
    assert!(pulled <= 9 * MIB as u64 + MIB as u64, "{gets:?}");
    assert!(
        pulled <= base_bytes + 2 * MIB as u64,
        "{pulled} vs {base_bytes}"
    );
    eprintln!(
        "record: without prefetch {} demand GETs ({base_bytes} B); recorded: {} prefetch GETs ({pulled} B), 0 demand",
        reg.blob_gets(&layer).len(),
        gets.len()
    );
    let m = integration_tests::get_metrics(&maddr);
    assert!(m.contains("soci_prefetch_layers_total 1"), "{m}");
    ctd.ctr_ok(&[
        "-n",
        "record-after",
        "images",
        "rm",
        "--sync",
        &format!("{repo}:rec"),
    ]);

    // 3. A workload that reads nothing of the layer: a valid index, no prefetch artifact.
    let o = record(&ctd, &daemon, &repo, "empty", "record-rec2", &["/bin/true"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (_, empty_idx, _) = soci_index(&reg, &repo, "empty");
    assert_eq!(empty_idx.ztocs, ztocs(&soci_idx));
    assert_eq!(
        empty_idx.to_json(),
        soci_idx.to_json(),
        "same SOCI index as convert's"
    );
    let (_, _, out) = pull_and_run(
        &reg,
        &ctd,
        d,
        "record-empty",
        &format!("{repo}:empty"),
        (&layer, false),
    );
    assert_eq!(out, want);
    ctd.ctr_ok(&[
        "-n",
        "record-empty",
        "images",
        "rm",
        "--sync",
        &format!("{repo}:empty"),
    ]);

    // 4. A planted record for this image (span ids past the layer, listed twice) is refused,
    //    and the scratch namespace is still removed.
    let dir = daemon.root.join("record");
    let planted = dir.join("999999.json");
    let far = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 3_600_000;
    std::fs::write(
        &planted,
        serde_json::json!({
            "version": 1, "snapshot": 999999, "image": format!("{repo}:soci"),
            "manifest": soci_manifest, "layer": layer, "ztoc": "sha256:00",
            "mounted_unix_ms": far, "span_count": 4_000_000_000u64,
            "spans": [1, 1, 2_000_000_000u64],
        })
        .to_string(),
    )
    .unwrap();
    let o = record(&ctd, &daemon, &repo, "hostile", "record-rec3", &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(
        stderr.contains("demand record") && stderr.contains("999999.json"),
        "{stderr}"
    );
    let ns = ctd.ctr_ok(&["namespaces", "ls", "-q"]);
    assert!(!ns.lines().any(|l| l == "record-rec3"), "{ns}");
    std::fs::remove_file(&planted).unwrap();
    // An existing namespace is refused (the recording needs fresh mounts of its own).
    ctd.ctr_ok(&["namespaces", "create", "record-taken"]);
    let o = record(&ctd, &daemon, &repo, "x", "record-taken", &[]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("exists"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
