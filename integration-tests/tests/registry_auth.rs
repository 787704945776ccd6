//! Registry authentication (htpasswd basic auth, docker config, credential helpers) and
//! tampered blobs, against a real registry.

use std::fs;
use std::process::Command;

use integration_tests::image::{random_bytes, Compression, Entry, Layer, LayoutWriter};
use integration_tests::registry::Registry;
use integration_tests::{bin, require, run};
use serde_json::Value;

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

#[test]
fn basic_auth_and_tampered_blobs() {
    let reg = Registry::start_with_auth(Some(("soci", "s3cret-pw")));
    let dir = tempfile::tempdir().unwrap();
    let a = &reg.addr;
    let layer = Layer {
        entries: vec![Entry::File(
            "big.bin".into(),
            random_bytes(11 << 20, 9),
            0o644,
        )],
        compression: Compression::Gzip,
    };
    let mut w = LayoutWriter::new(&dir.path().join("l"));
    let m = w.manifest("amd64", &[layer], &["/bin/true"]);
    w.tag_manifest(&m, "v1");
    reg.push_layout(&w.dir, "v1", "auth:v1", Some("soci:s3cret-pw"));

    let no_creds = dir.path().join("nocreds");
    fs::create_dir_all(&no_creds).unwrap();
    let o = Command::new(bin("soci"))
        .env("DOCKER_CONFIG", &no_creds)
        .args([
            "convert",
            "--plain-http",
            &format!("docker://{a}/auth:v1"),
            &format!("docker://{a}/auth:soci"),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("authentication") && err.contains(a.as_str()),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");

    let with_creds = dir.path().join("creds");
    fs::create_dir_all(&with_creds).unwrap();
    fs::write(
        with_creds.join("config.json"),
        format!(r#"{{"auths":{{"{a}":{{"auth":"c29jaTpzM2NyZXQtcHc="}}}}}}"#),
    )
    .unwrap();
    let o = Command::new(bin("soci"))
        .env("DOCKER_CONFIG", &with_creds)
        .args([
            "convert",
            "--plain-http",
            &format!("docker://{a}/auth:v1"),
            &format!("docker://{a}/auth:soci"),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let idx = skopeo_raw(&format!("{a}/auth:soci"), Some("soci:s3cret-pw"));
    assert_eq!(idx["manifests"].as_array().unwrap().len(), 2);

    // Credentials from a credential helper (credHelpers), run as `docker-credential-NAME get`.
    let helper_dir = dir.path().join("helper");
    fs::create_dir_all(&helper_dir).unwrap();
    let helper = helper_dir.join("docker-credential-socitest");
    fs::write(&helper, "#!/bin/sh\nread server\necho '{\"ServerURL\":\"'$server'\",\"Username\":\"soci\",\"Secret\":\"s3cret-pw\"}'\n").unwrap();
    fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let helper_cfg = dir.path().join("helpercfg");
    fs::create_dir_all(&helper_cfg).unwrap();
    fs::write(
        helper_cfg.join("config.json"),
        format!(r#"{{"credHelpers":{{"{a}":"socitest"}}}}"#),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        helper_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let o = Command::new(bin("soci"))
        .env("DOCKER_CONFIG", &helper_cfg)
        .env("PATH", &path)
        .args([
            "index",
            "info",
            "--plain-http",
            "--platform",
            "linux/amd64",
            &format!("{a}/auth:soci"),
        ])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "credential helper: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    // A layer tampered with in the registry storage is caught by its digest.
    let layer_digest = m.layers[0].0.clone();
    let path = reg.blob_path(&layer_digest);
    let mut data = fs::read(&path).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0x55;
    fs::write(&path, &data).unwrap();
    let o = Command::new(bin("soci"))
        .env("DOCKER_CONFIG", &with_creds)
        .args([
            "convert",
            "--plain-http",
            &format!("docker://{a}/auth:v1"),
            &format!("docker://{a}/auth:again"),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("digest mismatch") && err.contains(&layer_digest),
        "{err}"
    );
}
