//! Hostile zTOCs against the real daemon, memory-capped in a cgroup v1 memory cgroup:
//! - an amplification zTOC (4 MiB whose every entry names one 1 MiB string: gigabytes if
//!   decoded copy by copy) is refused; the daemon is not OOM-killed and the image runs by
//!   pulling that layer in full;
//! - a zTOC whose file entry lies past what its spans cover is refused at load, so the file is
//!   never served lazily with short data: the container reads the full, correct file.

use std::path::{Path, PathBuf};
use std::process::Command;

use flatbuffers::{FlatBufferBuilder, UnionWIPOffset, WIPOffset};
use integration_tests::containerd::Containerd;
use integration_tests::daemon::SociDaemon;
use integration_tests::image::{
    busybox_layer, random_bytes, Compression, Entry, Layer, LayoutWriter,
};
use integration_tests::registry::Registry;
use integration_tests::{bin, run, sha256_hex};
use soci_index::{SociIndex, ANNOTATION_IMAGE_MANIFEST_DIGEST, ANNOTATION_INDEX_DIGEST};
use soci_registry::oci::MEDIA_TYPE_OCI_MANIFEST;
use soci_registry::{Client, ClientOptions, Descriptor, Digest, HostsConfig, Reference};

const CGROUP_ROOT: &str = "/sys/fs/cgroup/memory";
const MEMORY_LIMIT: u64 = 256 << 20;

/// A cgroup v1 memory cgroup, removed on drop (its processes moved back to the root first).
struct MemoryCgroup(PathBuf);

impl MemoryCgroup {
    fn new(case: &str, limit: u64) -> MemoryCgroup {
        assert!(
            Path::new(CGROUP_ROOT).join("cgroup.procs").exists(),
            "cgroup v1 memory controller not mounted at {CGROUP_ROOT}"
        );
        let dir = Path::new(CGROUP_ROOT).join(format!("ztoc-test-{}-{case}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create memory cgroup");
        std::fs::write(dir.join("memory.limit_in_bytes"), limit.to_string()).unwrap();
        MemoryCgroup(dir)
    }

    fn add(&self, pid: u32) {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).expect("join cgroup");
    }

    fn read(&self, file: &str) -> u64 {
        std::fs::read_to_string(self.0.join(file))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        if let Ok(procs) = std::fs::read_to_string(self.0.join("cgroup.procs")) {
            for p in procs.lines() {
                let _ = std::fs::write(Path::new(CGROUP_ROOT).join("cgroup.procs"), p);
            }
        }
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// The pid of the daemon started with config file `cfg` (found in /proc).
fn daemon_pid(cfg: &Path) -> u32 {
    let needle = cfg.to_string_lossy().into_owned();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("soci-snapshotter-grpc") && cmd.contains(&needle) {
            return pid;
        }
    }
    panic!("daemon with config {needle} not found");
}

/// Whether `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

type Off = WIPOffset<UnionWIPOffset>;

/// A 4 MiB zTOC whose ~110k entries all name (and link to, and are owned by) one 1 MiB string.
fn amplification_ztoc() -> Vec<u8> {
    let mut b = FlatBufferBuilder::with_capacity(8 << 20);
    let big = b.create_byte_string(&vec![b'a'; 1 << 20]).as_union_value();
    let reg = b.create_byte_string(b"reg").as_union_value();
    let mut entries: Vec<Off> = Vec::new();
    while b.unfinished_data().len() < 4 << 20 {
        let t = b.start_table();
        b.push_slot_always(4, big); // name
        b.push_slot_always(6, reg); // type
        b.push_slot_always(12, big); // linkname
        b.push_slot_always(20, big); // uname
        b.push_slot_always(22, big); // gname
        entries.push(b.end_table(t).as_union_value());
    }
    let md = b.create_vector(&entries);
    let t = b.start_table();
    b.push_slot_always(4, md);
    let toc = b.end_table(t);
    let d = b
        .create_byte_string(format!("sha256:{}", "ab".repeat(32)).as_bytes())
        .as_union_value();
    let digests = b.create_vector(&[d]);
    let cps = b.create_vector(&[0u8; 16]);
    let t = b.start_table();
    b.push_slot_always(8, digests);
    b.push_slot_always(10, cps);
    let info = b.end_table(t);
    let v = b.create_byte_string(b"0.9").as_union_value();
    let t = b.start_table();
    b.push_slot_always(4, v);
    b.push_slot_always(6, v);
    b.push_slot::<i64>(8, 100, 0);
    b.push_slot::<i64>(10, 100, 0);
    b.push_slot_always(12, toc);
    b.push_slot_always(14, info);
    let root = b.end_table(t);
    b.finish_minimal(root);
    b.finished_data().to_vec()
}

const WORKLOAD: &[&str] = &[
    "/bin/sh",
    "-c",
    "cat /data/msg; sha256sum /data/big | head -c 16; echo",
];

/// Pushes `name:v1` (busybox + a data layer) and converts it to `name:soci`; returns the
/// repository reference and the workload's expected output.
fn converted_image(reg: &Registry, dir: &Path, name: &str) -> (String, String) {
    let big = random_bytes(3 << 20, 90);
    let msg = format!("{name} ok {}\n", "x".repeat(3000));
    let layers = [
        busybox_layer(),
        Layer {
            entries: vec![
                Entry::Dir("data/".into()),
                Entry::File("data/big".into(), big.clone(), 0o644),
                Entry::File("data/msg".into(), msg.clone().into_bytes(), 0o644),
            ],
            compression: Compression::Gzip,
        },
    ];
    let mut w = LayoutWriter::new(&dir.join(name));
    let m = w.manifest("amd64", &layers, WORKLOAD);
    w.tag_manifest(&m, "v1");
    reg.push_layout(&w.dir, "v1", &format!("{name}:v1"), None);
    let repo = format!("{}/{name}", reg.addr);
    run(Command::new(bin("soci")).args([
        "convert",
        "--plain-http",
        "--min-layer-size",
        "1000000",
        &format!("docker://{repo}:v1"),
        &format!("docker://{repo}:soci"),
    ]))
    .unwrap();
    let expected = format!("{msg}{}\n", &sha256_hex(&big)[..16]);
    (repo, expected)
}

/// Re-publishes `repo:soci` as `repo:hostile` with the data layer's zTOC replaced by what
/// `make` returns (given the honest zTOC bytes): a new SOCI index, the image manifest re-bound
/// to it, and a new image index.
fn replace_ztoc(reg: &Registry, repo: &str, make: impl FnOnce(&[u8]) -> Vec<u8>) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = Client::new(ClientOptions {
        hosts: HostsConfig {
            plain_http_hosts: vec![reg.addr.clone()],
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap();
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
        let soci_digest = entries[soci_pos]["digest"].as_str().unwrap().to_string();
        let (_, sbytes) = c.get_manifest(repo, &soci_digest).await.unwrap();
        let mut soci = SociIndex::parse(&sbytes).unwrap();
        let img_digest = entries[img_pos]["digest"].as_str().unwrap().to_string();
        let (_, mbytes) = c.get_manifest(repo, &img_digest).await.unwrap();
        let mut m: serde_json::Value = serde_json::from_slice(&mbytes).unwrap();
        // The data layer is the last one.
        let data_layer = m["layers"][1]["digest"].as_str().unwrap().to_string();
        let zpos = soci
            .ztocs
            .iter()
            .position(|z| {
                z.annotations.get("com.amazon.soci.image-layer-digest") == Some(&data_layer)
            })
            .expect("the data layer is indexed");
        let zdesc = soci.ztocs[zpos].clone();
        let honest = c.get_blob(repo, &zdesc).await.unwrap();
        let hostile = make(&honest);
        let hd = Digest::of(&hostile);
        c.push_blob(repo, &hd, bytes::Bytes::from(hostile.clone()))
            .await
            .unwrap();
        soci.ztocs[zpos] = Descriptor {
            digest: hd,
            size: hostile.len() as u64,
            ..zdesc
        };
        let sjson = soci.to_json();
        let sd = c
            .put_manifest(
                repo,
                "hostile-soci",
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
                "hostile-image",
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
        let ijson = serde_json::to_vec(&idx).unwrap();
        c.put_manifest(
            repo,
            "hostile",
            "application/vnd.oci.image.index.v1+json",
            bytes::Bytes::from(ijson),
        )
        .await
        .unwrap();
    });
}

/// A registry, a daemon in a memory cgroup, and containerd using it.
struct Setup {
    reg: Registry,
    tmp: tempfile::TempDir,
    cgroup: MemoryCgroup,
    daemon: SociDaemon,
    pid: u32,
    ctd: Containerd,
}

fn setup(case: &str) -> Setup {
    integration_tests::require("ctr", "containerd");
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("ztoc-hostile")
        .tempdir_in("/tmp")
        .unwrap();
    let cgroup = MemoryCgroup::new(case, MEMORY_LIMIT);
    let cfg = format!(
        "[resolver]\nplain_http_hosts = [\"{}\"]\n[background_fetch]\ndisable = true\n",
        reg.addr
    );
    let daemon = SociDaemon::start(&tmp.path().join("d"), &cfg);
    let pid = daemon_pid(&tmp.path().join("d").join("config.toml"));
    cgroup.add(pid);
    let ctd = Containerd::start_with_soci(&daemon.socket);
    Setup {
        reg,
        tmp,
        cgroup,
        daemon,
        pid,
        ctd,
    }
}

impl Setup {
    /// Checks the daemon is alive and still answers, then stops everything (cgroup last).
    fn finish(self) {
        assert!(alive(self.pid), "daemon {} still running", self.pid);
        let snaps = self
            .ctd
            .ctr_ok(&["snapshots", "--snapshotter", "soci", "ls"]);
        assert!(!snaps.trim().is_empty());
        eprintln!(
            "daemon cgroup peak memory: {} MiB",
            self.cgroup.read("memory.max_usage_in_bytes") >> 20
        );
        drop(self.ctd);
        drop(self.daemon);
        drop(self.cgroup);
        drop(self.tmp);
    }
}

#[test]
fn amplification_ztoc_is_refused_and_the_daemon_survives() {
    let s = setup("amp");
    let (amp, expected) = converted_image(&s.reg, s.tmp.path(), "ztoc-amp");
    replace_ztoc(&s.reg, &amp, |_| amplification_ztoc());
    let image = format!("{amp}:hostile");
    s.ctd.soci(&["image", "rpull", "--plain-http", &image]);
    let out = s.ctd.ctr_ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "soci",
        &image,
        "ztoc-amp-run",
    ]);
    assert_eq!(
        out, expected,
        "the image runs with correct output by fallback"
    );
    assert!(
        alive(s.pid),
        "daemon {} survived the amplification zTOC",
        s.pid
    );
    let log = s.daemon.log_text();
    assert!(
        log.contains("refused"),
        "the daemon logs the refused zTOC:\n{log}"
    );
    s.finish();
}

#[test]
fn entry_past_the_end_is_not_served_short() {
    let s = setup("past");
    let (past, expected) = converted_image(&s.reg, s.tmp.path(), "ztoc-past");
    // The file the workload reads claims 100 kB more than the spans cover.
    replace_ztoc(&s.reg, &past, |honest| {
        let mut z = soci_ztoc::Ztoc::from_bytes(honest).unwrap();
        let covered = z.spans().unwrap().uncompressed_size();
        let e = z
            .entries
            .iter_mut()
            .find(|e| e.name.ends_with(b"data/msg"))
            .unwrap();
        e.size = covered - e.offset + 100_000;
        z.to_bytes()
    });
    let image = format!("{past}:hostile");
    s.ctd.soci(&["image", "rpull", "--plain-http", &image]);
    let o = s.ctd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "soci",
        &image,
        "ztoc-past-run",
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        stdout,
        expected,
        "the file is not served short: stderr {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let log = s.daemon.log_text();
    assert!(
        log.contains("lies past the end"),
        "the daemon logs the refused entry:\n{log}"
    );
    s.finish();
}
