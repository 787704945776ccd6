//! `soci convert` and discovery against a real registry (Debian docker-registry), images built
//! locally and pushed with skopeo, converted images pulled and run by a real containerd.

use std::fs;
use std::process::Command;
use std::sync::Arc;

use integration_tests::containerd::Containerd;
use integration_tests::image::{
    busybox_layer, expected_files, random_bytes, Compression, Entry, Layer, LayoutWriter,
};
use integration_tests::registry::Registry;
use integration_tests::{bin, require, run};
use serde_json::Value;
use soci_registry::{Client, ClientOptions, Digest, HostsConfig, Reference};

fn skopeo_raw(reference: &str, creds: Option<&str>) -> Value {
    require("skopeo", "skopeo");
    let mut cmd = Command::new("skopeo");
    cmd.args(["inspect", "--raw", "--tls-verify=false"]);
    if let Some(c) = creds {
        cmd.arg(format!("--creds={c}"));
    }
    let out = run(cmd.arg(format!("docker://{reference}"))).unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

fn soci(args: &[&str]) -> std::process::Output {
    Command::new(bin("soci")).args(args).output().unwrap()
}

fn soci_ok(args: &[&str]) -> String {
    let o = soci(args);
    assert!(
        o.status.success(),
        "soci {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn app_layers() -> Vec<Layer> {
    let mut big = vec![Entry::Dir("data/".into())];
    for i in 0..6 {
        big.push(Entry::File(
            format!("data/blob{i}.bin"),
            random_bytes(2 << 20, i),
            0o644,
        ));
    }
    big.push(Entry::File(
        "data/hello.txt".into(),
        b"hello from a lazy layer\n".to_vec(),
        0o644,
    ));
    big.push(Entry::Hardlink(
        "data/hello-link.txt".into(),
        "data/hello.txt".into(),
    ));
    vec![
        busybox_layer(),
        Layer {
            entries: big,
            compression: Compression::Gzip,
        },
        Layer {
            entries: vec![Entry::File(
                "etc/app.conf".into(),
                b"mode=test\n".to_vec(),
                0o600,
            )],
            compression: Compression::Gzip,
        },
    ]
}

fn client(plain: &str) -> Arc<Client> {
    let hosts = HostsConfig {
        plain_http_hosts: vec![plain.to_string()],
        ..Default::default()
    };
    Arc::new(
        Client::new(ClientOptions {
            hosts,
            ..Default::default()
        })
        .unwrap(),
    )
}

/// Reads ranges of a registry blob for the zTOC extractor.
struct RangeSource<'a> {
    rt: &'a tokio::runtime::Runtime,
    client: Arc<Client>,
    reference: Reference,
    digest: Digest,
}

impl soci_ztoc::SpanSource for RangeSource<'_> {
    fn read_range(&mut self, range: std::ops::Range<u64>) -> std::io::Result<Vec<u8>> {
        self.rt
            .block_on(
                self.client
                    .get_blob_range(&self.reference.repository, &self.digest, range),
            )
            .map(|b| b.to_vec())
            .map_err(std::io::Error::other)
    }
}

#[test]
fn convert_binds_soci_index_and_image_still_runs() {
    let reg = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let layers = app_layers();
    let mut w = LayoutWriter::new(&dir.path().join("layout"));
    let m = w.manifest(
        "amd64",
        &layers,
        &["/bin/sh", "-c", "cat /data/hello.txt /etc/app.conf"],
    );
    w.tag_manifest(&m, "v1");
    reg.push_layout(&w.dir, "v1", "app:v1", None);
    let a = &reg.addr;

    let out = soci_ok(&[
        "convert",
        "--plain-http",
        &format!("docker://{a}/app:v1"),
        &format!("docker://{a}/app:soci"),
    ]);
    let index_digest = out.trim().to_string();

    // The binding, read back with an independent tool.
    let idx = skopeo_raw(&format!("{a}/app:soci"), None);
    assert_eq!(idx["mediaType"], "application/vnd.oci.image.index.v1+json");
    let entries = idx["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{idx}");
    let img = entries
        .iter()
        .find(|e| e.get("artifactType").is_none())
        .unwrap();
    let sidx = entries
        .iter()
        .find(|e| e["artifactType"] == "application/vnd.amazon.soci.index.v2+json")
        .unwrap();
    assert_eq!(img["platform"], sidx["platform"]);
    assert_eq!(
        img["annotations"]["com.amazon.soci.index-digest"],
        sidx["digest"]
    );
    assert_eq!(
        sidx["annotations"]["com.amazon.soci.image-manifest-digest"],
        img["digest"]
    );
    let manifest = skopeo_raw(
        &format!("{a}/app@{}", img["digest"].as_str().unwrap()),
        None,
    );
    assert_eq!(
        manifest["annotations"]["com.amazon.soci.index-digest"],
        sidx["digest"]
    );
    // Layers are unchanged.
    let orig = skopeo_raw(&format!("{a}/app:v1"), None);
    assert_eq!(manifest["layers"], orig["layers"]);

    let soci_index = skopeo_raw(
        &format!("{a}/app@{}", sidx["digest"].as_str().unwrap()),
        None,
    );
    assert_eq!(
        soci_index["config"]["mediaType"],
        "application/vnd.amazon.soci.index.v2+json"
    );
    assert_eq!(
        soci_index["config"]["digest"],
        "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    );
    assert!(soci_index.get("subject").is_none());
    let ztocs = soci_index["layers"].as_array().unwrap();
    assert_eq!(
        ztocs.len(),
        1,
        "only the layer above 10 MiB gets a zTOC: {soci_index}"
    );
    let zdesc = &ztocs[0];
    assert_eq!(zdesc["mediaType"], "application/octet-stream");
    assert_eq!(
        zdesc["annotations"]["com.amazon.soci.image-layer-digest"],
        orig["layers"][1]["digest"]
    );
    assert_eq!(zdesc["annotations"]["com.amazon.soci.span-size"], "4194304");
    assert_eq!(
        zdesc["annotations"]["com.amazon.soci.disable-xattrs"],
        "true"
    );

    // The zTOC parses and extracts every file of its layer by range requests.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = client(a);
    let r = Reference::parse(&format!("{a}/app:soci")).unwrap();
    let zd: soci_registry::Descriptor = serde_json::from_value(zdesc.clone()).unwrap();
    let zbytes = rt.block_on(c.get_blob(&r.repository, &zd)).unwrap();
    let z = soci_ztoc::Ztoc::from_bytes(&zbytes).unwrap();
    let spans = z.spans().unwrap();
    assert!(spans.len() >= 3);
    let layer_digest = Digest::parse(orig["layers"][1]["digest"].as_str().unwrap()).unwrap();
    let mut src = RangeSource {
        rt: &rt,
        client: c.clone(),
        reference: r.clone(),
        digest: layer_digest,
    };
    let want = expected_files(&layers[1..2]);
    for (path, data) in &want {
        assert_eq!(
            &z.read_file(&spans, &mut src, path.as_bytes()).unwrap(),
            data,
            "{path}"
        );
    }
    assert_eq!(
        z.read_file(&spans, &mut src, b"data/hello-link.txt")
            .unwrap(),
        b"hello from a lazy layer\n"
    );

    // soci index info / list.
    let info: Value = serde_json::from_str(&soci_ok(&[
        "index",
        "info",
        "--plain-http",
        "--platform",
        "linux/amd64",
        &format!("{a}/app:soci"),
    ]))
    .unwrap();
    assert_eq!(info["version"], "v2");
    assert_eq!(info["layers"][1]["ztoc"]["entries"], 9);
    assert!(info["layers"][0]["ztoc"].is_null());
    let list = soci_ok(&["index", "list", "--plain-http", &format!("{a}/app:soci")]);
    assert!(list.contains(sidx["digest"].as_str().unwrap()), "{list}");
    // An unconverted image has no index: a typed, clear error.
    let o = soci(&[
        "index",
        "info",
        "--plain-http",
        "--platform",
        "linux/amd64",
        &format!("{a}/app:v1"),
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no SOCI index"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Converting the converted image again changes nothing (no duplicate entries).
    let again = soci_ok(&[
        "convert",
        "--plain-http",
        &format!("docker://{a}/app:soci"),
        &format!("docker://{a}/app:soci2"),
    ]);
    assert_eq!(again.trim(), index_digest);
    assert_eq!(
        skopeo_raw(&format!("{a}/app:soci2"), None)["manifests"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Plain containerd (overlayfs) still pulls and runs the converted image.
    let ctd = Containerd::start("");
    let image = format!("{a}/app:soci");
    ctd.ctr_ok(&[
        "images",
        "pull",
        "--plain-http",
        "--platform",
        "linux/amd64",
        &image,
    ]);
    let out = ctd.ctr_ok(&["run", "--rm", &image, "convert-run"]);
    assert_eq!(out, "hello from a lazy layer\nmode=test\n");
}

#[test]
fn multi_arch_zstd_and_oci_layouts() {
    let reg = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let a = &reg.addr;
    let big = |seed| Layer {
        entries: vec![Entry::File(
            "big.bin".into(),
            random_bytes(11 << 20, seed),
            0o644,
        )],
        compression: Compression::Gzip,
    };
    let small = Layer {
        entries: vec![Entry::File("s.txt".into(), b"small".to_vec(), 0o644)],
        compression: Compression::Gzip,
    };
    let mut w = LayoutWriter::new(&dir.path().join("multi"));
    let amd = w.manifest("amd64", &[small.clone(), big(1)], &["/bin/true"]);
    let arm = w.manifest("arm64", &[small.clone(), big(2)], &["/bin/true"]);
    w.tag_index(&[&amd, &arm], "v1");
    reg.push_layout(&w.dir, "v1", "multi:v1", None);

    soci_ok(&[
        "convert",
        "--plain-http",
        "--all-platforms",
        &format!("docker://{a}/multi:v1"),
        &format!("docker://{a}/multi:all"),
    ]);
    let idx = skopeo_raw(&format!("{a}/multi:all"), None);
    let entries = idx["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 4, "{idx}");
    for arch in ["amd64", "arm64"] {
        let of_arch: Vec<_> = entries
            .iter()
            .filter(|e| e["platform"]["architecture"] == arch)
            .collect();
        assert_eq!(of_arch.len(), 2);
        let img = of_arch
            .iter()
            .find(|e| e.get("artifactType").is_none())
            .unwrap();
        let s = of_arch
            .iter()
            .find(|e| e.get("artifactType").is_some())
            .unwrap();
        assert_eq!(
            s["annotations"]["com.amazon.soci.image-manifest-digest"],
            img["digest"]
        );
    }
    // One platform only: the other keeps its plain entry.
    soci_ok(&[
        "convert",
        "--plain-http",
        "--platform",
        "linux/arm64",
        &format!("docker://{a}/multi:v1"),
        &format!("docker://{a}/multi:arm"),
    ]);
    let idx = skopeo_raw(&format!("{a}/multi:arm"), None);
    let soci_entries: Vec<_> = idx["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e.get("artifactType").is_some())
        .collect();
    assert_eq!(soci_entries.len(), 1);
    assert_eq!(soci_entries[0]["platform"]["architecture"], "arm64");
    let info: Value = serde_json::from_str(&soci_ok(&[
        "index",
        "info",
        "--plain-http",
        "--platform",
        "linux/arm64",
        &format!("{a}/multi:arm"),
    ]))
    .unwrap();
    assert_eq!(info["version"], "v2");

    // zstd layers get no zTOC (with a warning); discovery reports the zstd layer.
    let mut z = LayoutWriter::new(&dir.path().join("zstd"));
    let zl = Layer {
        compression: Compression::Zstd,
        ..big(3)
    };
    let zm = z.manifest("amd64", &[zl, big(4)], &["/bin/true"]);
    z.tag_manifest(&zm, "v1");
    reg.push_layout(&z.dir, "v1", "zstd:v1", None);
    let o = soci(&[
        "convert",
        "--plain-http",
        &format!("docker://{a}/zstd:v1"),
        &format!("docker://{a}/zstd:soci"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("zstd"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = soci(&[
        "index",
        "info",
        "--plain-http",
        "--platform",
        "linux/amd64",
        &format!("{a}/zstd:soci"),
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("zstd-compressed"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Into another repository of the same registry: blobs are mounted; skopeo fetches every
    // blob of the result.
    soci_ok(&[
        "convert",
        "--plain-http",
        "--platform",
        "linux/amd64",
        &format!("docker://{a}/multi:v1"),
        &format!("docker://{a}/other:soci"),
    ]);
    run(Command::new("skopeo").args([
        "copy",
        "--all",
        "--src-tls-verify=false",
        &format!("docker://{a}/other:soci"),
        &format!("oci:{}:x", dir.path().join("check").display()),
    ]))
    .unwrap();

    // A hosts.toml mirror: the name resolves nowhere, the mirror serves it.
    let hosts = dir.path().join("certs.d/registry.invalid");
    fs::create_dir_all(&hosts).unwrap();
    fs::write(hosts.join("hosts.toml"), format!("server = \"https://registry.invalid\"\n[host.\"http://{a}\"]\n  capabilities = [\"pull\", \"resolve\"]\n")).unwrap();
    let info = soci_ok(&[
        "index",
        "info",
        "--hosts-dir",
        dir.path().join("certs.d").to_str().unwrap(),
        "--platform",
        "linux/arm64",
        "registry.invalid/multi:arm",
    ]);
    assert!(info.contains("\"version\": \"v2\""), "{info}");

    // OCI layout to registry: blobs are uploaded (chunked), not mounted.
    soci_ok(&[
        "convert",
        "--plain-http",
        "--all-platforms",
        &format!("oci:{}:v1", w.dir.display()),
        &format!("docker://{a}/fromlayout:soci"),
    ]);
    let idx = skopeo_raw(&format!("{a}/fromlayout:soci"), None);
    assert_eq!(idx["manifests"].as_array().unwrap().len(), 4, "{idx}");
    let amd = idx["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["platform"]["architecture"] == "amd64" && e.get("artifactType").is_none())
        .unwrap();
    let m = skopeo_raw(
        &format!("{a}/fromlayout@{}", amd["digest"].as_str().unwrap()),
        None,
    );
    let big_layer = m["layers"][1]["digest"].as_str().unwrap();
    let data = fs::read(reg.blob_path(big_layer)).unwrap();
    assert_eq!(
        format!("sha256:{}", integration_tests::sha256_hex(&data)),
        big_layer,
        "uploaded layer intact"
    );

    // OCI layout source and target.
    let out_dir = dir.path().join("out");
    soci_ok(&[
        "convert",
        "--all-platforms",
        &format!("oci:{}:v1", w.dir.display()),
        &format!("oci:{}:soci", out_dir.display()),
    ]);
    let index: Value =
        serde_json::from_slice(&fs::read(out_dir.join("index.json")).unwrap()).unwrap();
    let top = &index["manifests"][0];
    assert_eq!(
        top["annotations"]["org.opencontainers.image.ref.name"],
        "soci"
    );
    let hex = &top["digest"].as_str().unwrap()[7..];
    let img_index: Value =
        serde_json::from_slice(&fs::read(out_dir.join("blobs/sha256").join(hex)).unwrap()).unwrap();
    assert_eq!(img_index["manifests"].as_array().unwrap().len(), 4);
    // Every blob the new index references exists in the layout.
    for e in img_index["manifests"].as_array().unwrap() {
        let m: Value = serde_json::from_slice(
            &fs::read(
                out_dir
                    .join("blobs/sha256")
                    .join(&e["digest"].as_str().unwrap()[7..]),
            )
            .unwrap(),
        )
        .unwrap();
        for l in m["layers"].as_array().unwrap() {
            assert!(out_dir
                .join("blobs/sha256")
                .join(&l["digest"].as_str().unwrap()[7..])
                .exists());
        }
    }
}
