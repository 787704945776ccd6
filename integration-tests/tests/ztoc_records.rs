//! zTOCs fetched without their checkpoint records (the SOCI index's checkpoint index), end to
//! end: real registry, containerd, daemon and FUSE.
//! - the mount fetches the zTOC's skeleton and only the records the reads need; the files
//!   read are byte-identical;
//! - a record whose bytes in the registry do not match the index is never used: reads of its
//!   span fail with EIO naming the record, other files read correctly;
//! - a skeleton that does not match the index makes the daemon fetch the zTOC whole (here
//!   corrupt too: the layer is then pulled in full and the container still runs).

use std::process::Command;

use integration_tests::containerd::Containerd;
use integration_tests::daemon::SociDaemon;
use integration_tests::image::{push_busybox_image, random_bytes, Entry};
use integration_tests::registry::Registry;
use integration_tests::{bin, run, sha256_hex};
use soci_index::SociIndex;
use soci_registry::{Descriptor, Reference};
use soci_ztoc::{WindowIndex, Ztoc};

const MIB: usize = 1 << 20;
const FILES: u64 = 4;

struct Setup {
    reg: Registry,
    tmp: tempfile::TempDir,
    repo: String,
    /// The data layer's zTOC descriptor and bytes.
    ztoc: Descriptor,
    ztoc_bytes: Vec<u8>,
    files: Vec<Vec<u8>>,
}

/// busybox + a layer of four 3 MiB random files, converted with 1 MiB spans.
fn setup(name: &str) -> Setup {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("soci-records")
        .tempdir_in("/tmp")
        .unwrap();
    let files: Vec<Vec<u8>> = (0..FILES).map(|i| random_bytes(3 * MIB, 700 + i)).collect();
    let mut entries = vec![Entry::Dir("data/".into())];
    for (i, f) in files.iter().enumerate() {
        entries.push(Entry::File(format!("data/f{i}"), f.clone(), 0o644));
    }
    let repo = push_busybox_image(&reg, tmp.path(), name, entries, &["true"]);
    run(Command::new(bin("soci")).args([
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
    let index = soci_index(&reg, &repo, "soci");
    assert_eq!(index.ztocs.len(), 1, "one layer indexed: {:?}", index.ztocs);
    let ztoc = index.ztocs[0].clone();
    let r = Reference::parse(&format!("{repo}:soci")).unwrap();
    let ztoc_bytes = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(reg.client().get_blob(&r.repository, &ztoc))
        .unwrap()
        .to_vec();
    Setup {
        reg,
        tmp,
        repo,
        ztoc,
        ztoc_bytes,
        files,
    }
}

/// The SOCI index bound to `repo:tag` (an image index with a SOCI index manifest v2 entry).
fn soci_index(reg: &Registry, repo: &str, tag: &str) -> SociIndex {
    let c = reg.client();
    let r = Reference::parse(&format!("{repo}:{tag}")).unwrap();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let (_, idx) = c.get_manifest(&r.repository, tag).await.unwrap();
        let idx: serde_json::Value = serde_json::from_slice(&idx).unwrap();
        let soci = idx["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e.get("artifactType").is_some())
            .unwrap()["digest"]
            .as_str()
            .unwrap()
            .to_string();
        let (_, sb) = c.get_manifest(&r.repository, &soci).await.unwrap();
        SociIndex::parse(&sb).unwrap()
    })
}

fn daemon(s: &Setup) -> SociDaemon {
    // No background fetch: only what the containers read is fetched.
    let cfg = format!(
        "[resolver]\nplain_http_hosts = [\"{}\"]\n[background_fetch]\ndisable = true\n",
        s.reg.addr
    );
    SociDaemon::start(&s.tmp.path().join("d"), &cfg)
}

/// The span holding the middle of file `i`, and the index.
fn middle_span(s: &Setup, i: u64) -> (usize, WindowIndex) {
    let z = Ztoc::from_bytes(&s.ztoc_bytes).unwrap();
    let spans = z.spans().unwrap();
    let e = z
        .entries
        .iter()
        .find(|e| e.name == format!("data/f{i}").into_bytes())
        .unwrap();
    let idx = soci_index::checkpoint_index(&s.ztoc)
        .expect("converted zTOC has a checkpoint index")
        .unwrap();
    (spans.span_of(e.offset + e.size / 2), idx)
}

fn sha256sum(ctd: &Containerd, image: &str, id: &str, file: &str) -> std::process::Output {
    ctd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "soci",
        image,
        id,
        "sha256sum",
        file,
    ])
}

#[test]
fn ztoc_is_fetched_without_its_records_and_reads_match() {
    let s = setup("records");
    let idx = soci_index::checkpoint_index(&s.ztoc).unwrap().unwrap();
    assert_eq!(Some(&idx), WindowIndex::of(&s.ztoc_bytes).unwrap().as_ref());
    let records = idx.records.len() as u64;
    assert!(records >= 12, "{records} records");
    // The test's own GET of the whole zTOC (in `setup`) is not the daemon's.
    let own = s.reg.blob_gets(&s.ztoc.digest.to_string()).len();
    let d = daemon(&s);
    let ctd = Containerd::start_with_soci(&d.socket);
    let image = format!("{}:soci", s.repo);
    let mode = ctd.soci(&["image", "rpull", "--plain-http", &image]);
    assert!(
        mode.contains("lazy: 1 of 2 layers"),
        "{mode}\n{}",
        d.log_text()
    );
    let out = sha256sum(&ctd, &image, "rec-1", "/data/f1");
    assert!(out.status.success(), "{out:?}\n{}", d.log_text());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with(&sha256_hex(&s.files[1])), "{stdout}");

    let gets = s.reg.blob_gets_settled(&s.ztoc.digest.to_string())[own..].to_vec();
    let fetched: u64 = gets.iter().sum();
    let record = 32785u64;
    let skeleton = s.ztoc.size - records * record;
    // The skeleton, and the records of the 3-4 spans f1 lies in (plus what read-ahead took).
    assert!(
        fetched >= skeleton + 3 * record && fetched <= skeleton + records / 2 * record,
        "zTOC of {} bytes ({records} records, skeleton {skeleton}): GETs {gets:?}\n{}",
        s.ztoc.size,
        d.log_text()
    );
    assert!(
        !d.log_text().contains("fetching it whole"),
        "{}",
        d.log_text()
    );
}

/// `soci convert --no-checkpoint-index` writes the SOCI index upstream's tools write (same
/// zTOCs, no annotation); such an image still runs lazily, its zTOC fetched whole.
#[test]
fn without_the_checkpoint_index_the_ztoc_is_fetched_whole() {
    let s = setup("noindex");
    run(Command::new(bin("soci")).args([
        "convert",
        "--plain-http",
        "--no-checkpoint-index",
        "--min-layer-size",
        "4000000",
        "--span-size",
        "1048576",
        &format!("docker://{}:v1", s.repo),
        &format!("docker://{}:plain", s.repo),
    ]))
    .unwrap();
    let index = soci_index(&s.reg, &s.repo, "plain");
    assert_eq!(index.ztocs.len(), 1);
    let z = &index.ztocs[0];
    assert_eq!(z.digest, s.ztoc.digest, "the same zTOC");
    assert!(
        !z.annotations
            .contains_key(soci_index::ANNOTATION_CHECKPOINT_INDEX),
        "{z:?}"
    );
    let own = s.reg.blob_gets(&s.ztoc.digest.to_string()).len();
    let d = daemon(&s);
    let ctd = Containerd::start_with_soci(&d.socket);
    let image = format!("{}:plain", s.repo);
    let mode = ctd.soci(&["image", "rpull", "--plain-http", &image]);
    assert!(mode.contains("lazy: 1 of 2 layers"), "{mode}");
    let out = sha256sum(&ctd, &image, "plain-1", "/data/f1");
    assert!(out.status.success(), "{out:?}\n{}", d.log_text());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&sha256_hex(&s.files[1])));
    let gets = s.reg.blob_gets_settled(&s.ztoc.digest.to_string())[own..].to_vec();
    assert_eq!(gets, vec![s.ztoc.size], "one whole GET of the zTOC");
}

#[test]
fn records_that_do_not_match_their_index_are_never_used() {
    let s = setup("badrecord");
    let (k, idx) = middle_span(&s, 2);
    // One byte of record k's window, in the registry's storage.
    let path = s.reg.blob_path(&s.ztoc.digest.to_string());
    let mut blob = std::fs::read(&path).unwrap();
    let at = (idx.records_offset + k as u64 * 32785 + 17 + 1000) as usize;
    blob[at] ^= 0x5a;
    std::fs::write(&path, &blob).unwrap();

    let d = daemon(&s);
    let ctd = Containerd::start_with_soci(&d.socket);
    let image = format!("{}:soci", s.repo);
    let mode = ctd.soci(&["image", "rpull", "--plain-http", &image]);
    assert!(
        mode.contains("lazy: 1 of 2 layers"),
        "{mode}\n{}",
        d.log_text()
    );
    let bad = sha256sum(&ctd, &image, "bad-1", "/data/f2");
    assert!(
        !bad.status.success(),
        "read of a span whose record is corrupt succeeded: {bad:?}"
    );
    let stdout = String::from_utf8_lossy(&bad.stdout);
    assert!(!stdout.contains(&sha256_hex(&s.files[2])), "{stdout}");
    let good = sha256sum(&ctd, &image, "bad-2", "/data/f0");
    assert!(good.status.success(), "{good:?}\n{}", d.log_text());
    assert!(String::from_utf8_lossy(&good.stdout).starts_with(&sha256_hex(&s.files[0])));
    let log = d.log_text();
    assert!(
        log.contains(&format!("record {k} digest mismatch")),
        "daemon log does not name record {k}:\n{log}"
    );
}

#[test]
fn skeleton_that_does_not_match_the_index_is_fetched_whole() {
    let s = setup("badskeleton");
    let (_, idx) = middle_span(&s, 0);
    // A byte of the file table (after the records): the skeleton digest and the zTOC digest
    // both fail, so the layer is pulled in full.
    let path = s.reg.blob_path(&s.ztoc.digest.to_string());
    let mut blob = std::fs::read(&path).unwrap();
    let tail = idx.records_range().end as usize;
    assert!(blob.len() > tail + 64, "zTOC has a tail");
    let at = blob.len() - 40;
    blob[at] ^= 0x01;
    std::fs::write(&path, &blob).unwrap();
    let own = s.reg.blob_gets(&s.ztoc.digest.to_string()).len();

    let d = daemon(&s);
    let ctd = Containerd::start_with_soci(&d.socket);
    let image = format!("{}:soci", s.repo);
    let mode = ctd.soci(&["image", "rpull", "--plain-http", &image]);
    assert!(
        mode.contains("lazy_mount_failed"),
        "{mode}\n{}",
        d.log_text()
    );
    let out = sha256sum(&ctd, &image, "skel-1", "/data/f3");
    assert!(out.status.success(), "{mode}\n{out:?}\n{}", d.log_text());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&sha256_hex(&s.files[3])));
    let log = d.log_text();
    assert!(log.contains("skeleton digest mismatch"), "{log}");
    assert!(log.contains("fetching it whole"), "{log}");
    // The whole zTOC was fetched too (and refused: its digest fails).
    let gets = s.reg.blob_gets_settled(&s.ztoc.digest.to_string())[own..].to_vec();
    assert!(gets.contains(&s.ztoc.size), "{gets:?}");
}
