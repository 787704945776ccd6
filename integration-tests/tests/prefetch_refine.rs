//! `soci prefetch record` refining zTOCs: an image whose workload reads four small files, far
//! apart in a layer of 1 MiB spans, is recorded twice, with `--keep-spans` (whole spans) and
//! by default (the data layer's zTOC rebuilt with extra checkpoints around the bytes read).
//! The refined image's container output equals the original's, its prefetch fetches far fewer
//! layer bytes than the whole-span one, and its run reads nothing from the registry on demand.
//! A record whose byte ranges are absurd is refused.
//!
//! Evidence is the registry's access log: GETs of the data layer made during `soci image rpull`
//! (which returns once every layer is mounted and prefetched) and during `ctr run`.

use std::process::Command;

use integration_tests::containerd::Containerd;
use integration_tests::daemon::SociDaemon;
use integration_tests::image::{push_busybox_image, random_bytes, Entry};
use integration_tests::registry::Registry;
use integration_tests::{bin, sha256_hex};
use soci_index::prefetch::MEDIA_TYPE_PREFETCH;
use soci_index::SociIndex;
use soci_registry::{Descriptor, Digest, Reference};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
/// Hot files: 96 KiB each, 1.5 MiB of filler between them.
const HOT: usize = 4;

/// The SOCI index and data layer digest (the last layer) of `repo:tag`.
fn soci_index(reg: &Registry, repo: &str, tag: &str) -> (SociIndex, String) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = reg.client();
    let r = Reference::parse(&format!("{repo}:{tag}")).unwrap();
    rt.block_on(async {
        let (_, idx) = c.get_manifest(&r.repository, tag).await.unwrap();
        let idx: serde_json::Value = serde_json::from_slice(&idx).unwrap();
        let m = idx["manifests"].as_array().unwrap();
        let img = m.iter().find(|e| e.get("artifactType").is_none()).unwrap();
        let soci = m.iter().find(|e| e.get("artifactType").is_some()).unwrap();
        let md = img["digest"].as_str().unwrap().to_string();
        let (_, mb) = c.get_manifest(&r.repository, &md).await.unwrap();
        let mb: serde_json::Value = serde_json::from_slice(&mb).unwrap();
        let layer = mb["layers"][1]["digest"].as_str().unwrap().to_string();
        assert_eq!(
            mb["annotations"]["com.amazon.soci.index-digest"],
            soci["digest"]
        );
        let (_, sb) = c
            .get_manifest(&r.repository, soci["digest"].as_str().unwrap())
            .await
            .unwrap();
        (SociIndex::parse(&sb).unwrap(), layer)
    })
}

fn get_ztoc_bytes(reg: &Registry, repo: &str, d: &Descriptor) -> bytes::Bytes {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let r = Reference::parse(&format!("{repo}:x")).unwrap();
    rt.block_on(reg.client().get_blob(&r.repository, d))
        .unwrap()
}

fn get_ztoc(reg: &Registry, repo: &str, d: &Descriptor) -> soci_ztoc::Ztoc {
    soci_ztoc::Ztoc::from_bytes(&get_ztoc_bytes(reg, repo, d)).unwrap()
}

/// Pulls `image` (which has a prefetch) lazily in `ns`, runs it and removes it; returns the
/// layer's GETs from the pull's start until the container exited and the prefetch completed,
/// the prefetch's range requests, and the output. The mount does not wait for the prefetch:
/// any GET beyond the prefetch's is a demand read.
fn pull_and_run(
    reg: &Registry,
    ctd: &Containerd,
    (daemon, maddr): (&SociDaemon, &str),
    ns: &str,
    image: &str,
    layer: &str,
) -> (Vec<u64>, u64, String) {
    let requests = || integration_tests::counter(maddr, "soci_prefetch_requests_total");
    let before = reg.blob_gets(layer).len();
    let (done, req0) = (daemon.prefetches_done(layer), requests());
    let mode = ctd.soci(&["-n", ns, "image", "rpull", "--plain-http", image]);
    assert!(mode.contains("lazy: 1 of 2 layers"), "{mode}");
    let out = ctd.ctr_ok(&["-n", ns, "run", "--rm", "--snapshotter", "soci", image, ns]);
    daemon.wait_prefetched(layer, done);
    let gets = reg.blob_gets_settled(layer)[before..].to_vec();
    ctd.ctr_ok(&["-n", ns, "images", "rm", "--sync", image]);
    (gets, requests() - req0, out)
}

/// `soci prefetch record` of `repo:soci` into `repo:dst_tag` with `flags`.
fn record(
    ctd: &Containerd,
    daemon: &SociDaemon,
    repo: &str,
    dst_tag: &str,
    ns: &str,
    flags: &[&str],
) -> std::process::Output {
    let mut cmd = Command::new(bin("soci"));
    cmd.arg("-a").arg(&ctd.socket);
    cmd.args(["prefetch", "record", "--plain-http", "--run-timeout", "60s"]);
    cmd.args(flags);
    cmd.arg("--daemon-root").arg(&daemon.root);
    cmd.args(["--scratch-namespace", ns]);
    cmd.arg("--dst").arg(format!("docker://{repo}:{dst_tag}"));
    cmd.arg(format!("docker://{repo}:soci"));
    cmd.output().unwrap()
}

#[test]
fn refined_ztocs_prefetch_fewer_bytes_same_output_no_demand_reads() {
    integration_tests::require("ctr", "containerd");
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("refine")
        .tempdir_in("/tmp")
        .unwrap();
    let maddr = format!("127.0.0.1:{}", integration_tests::registry::free_port());
    let cfg = format!(
        "metrics_address = \"{maddr}\"\n[resolver]\nplain_http_hosts = [\"{}\"]\n[background_fetch]\ndisable = true\n[prefetch]\nenable = true\n",
        reg.addr
    );
    let daemon = SociDaemon::start(&tmp.path().join("d"), &cfg);
    let ctd = Containerd::start_with_soci(&daemon.socket);

    let mut entries = vec![Entry::Dir("data/".into())];
    let mut want = String::new();
    let mut names = Vec::new();
    for i in 0..HOT {
        let d = random_bytes(96 * KIB, 300 + i as u64);
        want.push_str(&format!("{}\n", &sha256_hex(&d)[..16]));
        let name = format!("data/h{i}.bin");
        names.push(format!("/{name}"));
        entries.push(Entry::File(name, d, 0o644));
        entries.push(Entry::File(
            format!("data/filler{i}.bin"),
            random_bytes(3 * MIB / 2, 400 + i as u64),
            0o644,
        ));
    }
    let cmd = format!("sha256sum {} | cut -c1-16", names.join(" "));
    let repo = push_busybox_image(
        &reg,
        tmp.path(),
        "refine-app",
        entries,
        &["/bin/sh", "-c", &cmd],
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
    let (soci_idx, layer) = soci_index(&reg, &repo, "soci");
    let ldigest = Digest::parse(&layer).unwrap();
    let orig_ztoc = soci_idx.ztoc_for(&ldigest).unwrap().clone();

    // 1. Whole spans (--keep-spans): the same zTOC.
    let o = record(
        &ctd,
        &daemon,
        &repo,
        "keep",
        "refine-rec-keep",
        &["--keep-spans"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (keep_idx, _) = soci_index(&reg, &repo, "keep");
    assert_eq!(keep_idx.ztoc_for(&ldigest), Some(&orig_ztoc));
    assert!(keep_idx.prefetch_for(&ldigest).is_some());

    // 2. Refined (the default): a new zTOC for the data layer, same TOC, more checkpoints.
    let o = record(&ctd, &daemon, &repo, "refined", "refine-rec", &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("zTOC refined"), "{stderr}");
    let (ref_idx, _) = soci_index(&reg, &repo, "refined");
    let new_ztoc = ref_idx.ztoc_for(&ldigest).unwrap().clone();
    assert_ne!(new_ztoc.digest, orig_ztoc.digest);
    // Same span size etc.; the checkpoint index is the new zTOC's.
    let without_index = |d: &Descriptor| {
        let mut a = d.annotations.clone();
        a.remove(soci_index::ANNOTATION_CHECKPOINT_INDEX);
        a
    };
    assert_eq!(without_index(&new_ztoc), without_index(&orig_ztoc));
    let idx = soci_index::checkpoint_index(&new_ztoc)
        .expect("refined zTOC has a checkpoint index")
        .unwrap();
    assert_eq!(
        Some(idx),
        soci_ztoc::WindowIndex::of(&get_ztoc_bytes(&reg, &repo, &new_ztoc)).unwrap()
    );
    assert!(ref_idx
        .ztocs
        .iter()
        .any(|d| d.media_type == MEDIA_TYPE_PREFETCH));
    let (zo, zn) = (
        get_ztoc(&reg, &repo, &orig_ztoc),
        get_ztoc(&reg, &repo, &new_ztoc),
    );
    assert_eq!(zo.entries, zn.entries);
    assert!(zn.span_count() > zo.span_count());
    assert!(
        zn.span_count() <= zo.span_count() + 2 * HOT,
        "{} -> {}",
        zo.span_count(),
        zn.span_count()
    );
    zn.spans().unwrap();
    eprintln!(
        "refine: zTOC {} -> {} bytes, {} -> {} spans",
        orig_ztoc.size,
        new_ztoc.size,
        zo.span_count(),
        zn.span_count()
    );

    // 3. Fresh runs of both: same output, no demand GETs, the refined prefetch far smaller.
    let d = (&daemon, maddr.as_str());
    let (keep_pull, keep_requests, keep_out) = pull_and_run(
        &reg,
        &ctd,
        d,
        "refine-keep",
        &format!("{repo}:keep"),
        &layer,
    );
    let (ref_pull, ref_requests, ref_out) = pull_and_run(
        &reg,
        &ctd,
        d,
        "refine-after",
        &format!("{repo}:refined"),
        &layer,
    );
    assert_eq!(keep_out, want);
    assert_eq!(ref_out, want, "output byte-identical");
    assert_eq!(
        keep_pull.len() as u64,
        keep_requests,
        "keep: demand GETs beside the prefetch's: {keep_pull:?}"
    );
    assert_eq!(
        ref_pull.len() as u64,
        ref_requests,
        "refined: demand GETs beside the prefetch's: {ref_pull:?}"
    );
    let (kb, rb): (u64, u64) = (keep_pull.iter().sum(), ref_pull.iter().sum());
    eprintln!(
        "refine: prefetch of the data layer: whole spans {kb} B in {} GETs, refined {rb} B in {} GETs",
        keep_pull.len(),
        ref_pull.len()
    );
    assert!(rb > 0 && rb * 3 < kb, "refined {rb} vs whole spans {kb}");
    // The hot bytes themselves: at least the files read.
    assert!(rb >= (HOT * 96 * KIB) as u64, "{rb}");

    // 4. A record whose byte ranges are absurd is refused, naming the file.
    let dir = daemon.root.join("record");
    let far = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 3_600_000;
    let planted = dir.join("999998.json");
    std::fs::write(
        &planted,
        serde_json::json!({
            "version": 1, "snapshot": 999998, "image": format!("{repo}:soci"),
            "manifest": "sha256:00", "layer": layer, "ztoc": orig_ztoc.digest.to_string(),
            "mounted_unix_ms": far, "span_count": zo.span_count(), "spans": [0],
            "uncompressed_size": 1_000_000u64,
        })
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.join("999998.ranges"),
        "0 10\n18446744073709551000 18446744073709551615\n",
    )
    .unwrap();
    let o = record(&ctd, &daemon, &repo, "hostile", "refine-rec-h", &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(
        stderr.contains("999998.ranges") && stderr.contains("not a range"),
        "{stderr}"
    );
    let ns = ctd.ctr_ok(&["namespaces", "ls", "-q"]);
    assert!(!ns.lines().any(|l| l.starts_with("refine-rec")), "{ns}");
    std::fs::remove_file(&planted).unwrap();
    std::fs::remove_file(dir.join("999998.ranges")).unwrap();
}
