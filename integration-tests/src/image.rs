//! Builds OCI image layouts for tests from files described in code (no network).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::{require, run};

/// Compression of a test layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// gzip (OCI media type `tar+gzip`).
    Gzip,
    /// zstd (`tar+zstd`), made with the zstd CLI.
    Zstd,
    /// Plain tar.
    None,
}

/// One file in a layer.
#[derive(Debug, Clone)]
pub enum Entry {
    /// Regular file with mode.
    File(String, Vec<u8>, u32),
    /// Directory.
    Dir(String),
    /// Symlink (path, target).
    Symlink(String, String),
    /// Hardlink (path, target).
    Hardlink(String, String),
}

/// A layer: entries plus compression.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Entries in archive order.
    pub entries: Vec<Entry>,
    /// Compression.
    pub compression: Compression,
}

/// Deterministic incompressible bytes.
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn tar_bytes(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        match e {
            Entry::File(p, data, mode) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, data.as_slice()).unwrap();
            }
            Entry::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, p, &b""[..]).unwrap();
            }
            Entry::Symlink(p, t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, t).unwrap();
            }
            Entry::Hardlink(p, t) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                h.set_size(0);
                b.append_link(&mut h, p, t).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// Writes OCI layouts.
pub struct LayoutWriter {
    /// Layout directory.
    pub dir: PathBuf,
    index: Vec<serde_json::Value>,
}

/// A manifest written into a layout.
#[derive(Debug, Clone)]
pub struct WrittenManifest {
    /// Manifest descriptor JSON (with platform).
    pub descriptor: serde_json::Value,
    /// Layer digests and uncompressed tars, in order.
    pub layers: Vec<(String, Vec<u8>)>,
}

impl LayoutWriter {
    /// A new layout directory.
    pub fn new(dir: &Path) -> LayoutWriter {
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        LayoutWriter {
            dir: dir.to_path_buf(),
            index: Vec::new(),
        }
    }

    /// Stores a blob; returns its descriptor parts.
    pub fn blob(&self, data: &[u8]) -> (String, u64) {
        let d = sha(data);
        fs::write(self.dir.join("blobs/sha256").join(&d[7..]), data).unwrap();
        (d, data.len() as u64)
    }

    fn compress(&self, tar: &[u8], c: Compression) -> (Vec<u8>, &'static str) {
        match c {
            Compression::None => (tar.to_vec(), "application/vnd.oci.image.layer.v1.tar"),
            Compression::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
                e.write_all(tar).unwrap();
                (
                    e.finish().unwrap(),
                    "application/vnd.oci.image.layer.v1.tar+gzip",
                )
            }
            Compression::Zstd => {
                require("zstd", "zstd");
                let tmp = tempfile::NamedTempFile::new().unwrap();
                fs::write(tmp.path(), tar).unwrap();
                let out = run(Command::new("zstd").args(["-q", "-c"]).arg(tmp.path())).unwrap();
                (out.stdout, "application/vnd.oci.image.layer.v1.tar+zstd")
            }
        }
    }

    /// Writes an image manifest (+config, layers) for `arch`; returns its descriptor.
    pub fn manifest(&mut self, arch: &str, layers: &[Layer], cmd: &[&str]) -> WrittenManifest {
        let mut layer_descs = Vec::new();
        let mut diff_ids = Vec::new();
        let mut written = Vec::new();
        for l in layers {
            let tar = tar_bytes(&l.entries);
            diff_ids.push(sha(&tar));
            let (blob, mt) = self.compress(&tar, l.compression);
            let (d, size) = self.blob(&blob);
            layer_descs.push(json!({"mediaType": mt, "digest": d, "size": size}));
            written.push((d, tar));
        }
        self.finish_manifest(arch, layer_descs, diff_ids, written, cmd)
    }

    /// Writes a manifest whose first layer is `first` and whose other layers are given as raw
    /// tar streams (for entries the [`Entry`] list cannot express: whiteouts, PAX xattrs).
    pub fn manifest_from_tars(
        &mut self,
        arch: &str,
        first: &Layer,
        tars: &[Vec<u8>],
        c: Compression,
        cmd: &[&str],
    ) -> WrittenManifest {
        let mut all = vec![tar_bytes(&first.entries)];
        all.extend(tars.iter().cloned());
        let mut layer_descs = Vec::new();
        let mut diff_ids = Vec::new();
        let mut written = Vec::new();
        for tar in all {
            diff_ids.push(sha(&tar));
            let (blob, mt) = self.compress(&tar, c);
            let (d, size) = self.blob(&blob);
            layer_descs.push(json!({"mediaType": mt, "digest": d, "size": size}));
            written.push((d, tar));
        }
        self.finish_manifest(arch, layer_descs, diff_ids, written, cmd)
    }

    fn finish_manifest(
        &mut self,
        arch: &str,
        layer_descs: Vec<serde_json::Value>,
        diff_ids: Vec<String>,
        written: Vec<(String, Vec<u8>)>,
        cmd: &[&str],
    ) -> WrittenManifest {
        let config = json!({
            "architecture": arch,
            "os": "linux",
            "config": {"Cmd": cmd, "Env": ["PATH=/bin:/usr/bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let cfg = serde_json::to_vec(&config).unwrap();
        let (cd, cs) = self.blob(&cfg);
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
            "layers": layer_descs,
        });
        let mb = serde_json::to_vec(&manifest).unwrap();
        let (md, ms) = self.blob(&mb);
        let descriptor = json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md,
            "size": ms,
            "platform": {"architecture": arch, "os": "linux"},
        });
        WrittenManifest {
            descriptor,
            layers: written,
        }
    }

    /// Tags a single manifest.
    pub fn tag_manifest(&mut self, m: &WrittenManifest, tag: &str) {
        let mut d = m.descriptor.clone();
        d["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        self.index.push(d);
        self.flush();
    }

    /// Writes an image index over `manifests` and tags it.
    pub fn tag_index(&mut self, manifests: &[&WrittenManifest], tag: &str) {
        let idx = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests.iter().map(|m| m.descriptor.clone()).collect::<Vec<_>>(),
        });
        let b = serde_json::to_vec(&idx).unwrap();
        let (d, s) = self.blob(&b);
        self.index.push(json!({
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": d,
            "size": s,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }));
        self.flush();
    }

    fn flush(&self) {
        let idx = json!({"schemaVersion": 2, "manifests": self.index});
        fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&idx).unwrap(),
        )
        .unwrap();
    }
}

/// A layer with a static busybox and the applet links a test command needs.
pub fn busybox_layer() -> Layer {
    require("busybox", "busybox-static");
    let bb = fs::read("/bin/busybox").expect("/bin/busybox (busybox-static)");
    let mut entries = vec![
        Entry::Dir("bin/".into()),
        Entry::File("bin/busybox".into(), bb, 0o755),
    ];
    for app in [
        "sh",
        "cat",
        "echo",
        "ls",
        "sha256sum",
        "head",
        "wc",
        "true",
        "find",
        "stat",
        "readlink",
        "xargs",
        "sort",
    ] {
        entries.push(Entry::Symlink(format!("bin/{app}"), "busybox".into()));
    }
    for d in ["etc/", "tmp/", "proc/", "sys/", "dev/"] {
        entries.push(Entry::Dir(d.into()));
    }
    Layer {
        entries,
        compression: Compression::Gzip,
    }
}

/// Files of every layer as a map path -> contents (later layers win).
pub fn expected_files(layers: &[Layer]) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    for l in layers {
        for e in &l.entries {
            if let Entry::File(p, d, _) = e {
                m.insert(p.clone(), d.clone());
            }
        }
    }
    m
}

/// Pushes an image of busybox plus one gzip layer holding `entries` to `REGISTRY/name:v1`, with
/// `cmd` as its command; returns `REGISTRY/name`.
pub fn push_busybox_image(
    reg: &crate::registry::Registry,
    dir: &Path,
    name: &str,
    entries: Vec<Entry>,
    cmd: &[&str],
) -> String {
    let layers = [
        busybox_layer(),
        Layer {
            entries,
            compression: Compression::Gzip,
        },
    ];
    let mut w = LayoutWriter::new(&dir.join(name));
    let m = w.manifest("amd64", &layers, cmd);
    w.tag_manifest(&m, "v1");
    reg.push_layout(&w.dir, "v1", &format!("{name}:v1"), None);
    format!("{}/{name}", reg.addr)
}
