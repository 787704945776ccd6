//! Registry credentials on Kubernetes nodes: the kubelet's PullImage credentials reach the
//! snapshotter through its CRI image service proxy (`[cri_keychain]`), survive a daemon
//! restart, are replaced and dropped as images come and go; and docker config credentials
//! written after the daemon started are used without a restart.
//!
//! Each test drives containerd's CRI plugin as the kubelet does, with the image socket pointed
//! at the daemon (`--image-service-endpoint`), against a registry that requires htpasswd
//! basic auth. The sandbox image comes from a second, anonymous registry.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use integration_tests::containerd::Containerd;
use integration_tests::cri::{self, v1::AuthConfig, Cri, CriOptions};
use integration_tests::daemon::SociDaemon;
use integration_tests::image::{
    busybox_layer, random_bytes, Compression, Entry, Layer, LayoutWriter,
};
use integration_tests::registry::Registry;
use integration_tests::{bin, run};

const USER: &str = "cri-user";
const PASS: &str = "cri-s3cret-pw";
/// base64("cri-user:cri-s3cret-pw")
const AUTH_B64: &str = "Y3JpLXVzZXI6Y3JpLXMzY3JldC1wdw==";
const HELLO: &str = "hello from a private lazy pod\n";
/// The data layer alone (random, incompressible).
const IMAGE_BYTES: u64 = 80 << 20;

struct World {
    tmp: tempfile::TempDir,
    reg: Registry,
    _pause_reg: Registry,
    pause: String,
    certs: PathBuf,
    /// The converted private image (`ADDR/NAME:soci`).
    image: String,
}

fn auth() -> AuthConfig {
    AuthConfig {
        username: USER.into(),
        password: PASS.into(),
        ..Default::default()
    }
}

/// A private registry holding a converted busybox image `name` whose data layer is 80 MiB of
/// random files and a small `/data/hello`, and an anonymous one with the sandbox image.
fn world(name: &str) -> World {
    let reg = Registry::start_with_auth(Some((USER, PASS)));
    let pause_reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("soci-cri-keychain")
        .tempdir_in("/tmp")
        .unwrap();
    let mut data = vec![Entry::Dir("data/".into())];
    for i in 0..10u64 {
        data.push(Entry::File(
            format!("data/big{i}"),
            random_bytes(8 << 20, 900 + i),
            0o644,
        ));
    }
    data.push(Entry::File(
        "data/hello".into(),
        HELLO.as_bytes().to_vec(),
        0o644,
    ));
    let layers = [
        busybox_layer(),
        Layer {
            entries: data,
            compression: Compression::Gzip,
        },
    ];
    let mut w = LayoutWriter::new(&tmp.path().join(name));
    let m = w.manifest("amd64", &layers, &["/bin/cat", "/data/hello"]);
    w.tag_manifest(&m, "v1");
    reg.push_layout(
        &w.dir,
        "v1",
        &format!("{name}:v1"),
        Some(&format!("{USER}:{PASS}")),
    );
    // The soci CLI converts with its own docker config; the daemon never sees this one.
    let cli_cfg = tmp.path().join("cli-docker-config");
    fs::create_dir_all(&cli_cfg).unwrap();
    fs::write(
        cli_cfg.join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{AUTH_B64}"}}}}}}"#, reg.addr),
    )
    .unwrap();
    let repo = format!("{}/{name}", reg.addr);
    run(Command::new(bin("soci"))
        .env("DOCKER_CONFIG", &cli_cfg)
        .args([
            "convert",
            "--plain-http",
            &format!("docker://{repo}:v1"),
            &format!("docker://{repo}:soci"),
        ]))
    .unwrap();
    let pause = cri::push_pause_image(&pause_reg, tmp.path(), "cri-pause");
    let certs = tmp.path().join("certs.d");
    cri::write_plain_http_hosts(&certs, &reg.addr);
    cri::write_plain_http_hosts(&certs, &pause_reg.addr);
    World {
        image: format!("{repo}:soci"),
        tmp,
        reg,
        _pause_reg: pause_reg,
        pause,
        certs,
    }
}

/// containerd's CRI socket as the daemon's `image_service_path` names it: a symlink made once
/// containerd runs (the daemon must start first, and connects to containerd on first use).
fn backend_link(w: &World) -> PathBuf {
    w.tmp.path().join("containerd-cri.sock")
}

fn keychain_config(w: &World) -> String {
    format!(
        "[background_fetch]\nsilence_period_msec = 600000\n[cri_keychain]\nenable_keychain = true\nimage_service_path = \"{}\"\n",
        backend_link(w).display()
    )
}

/// Starts containerd for `daemon` and a CRI client whose ImageService is the daemon's socket
/// (the kubelet's `--image-service-endpoint`); `via_proxy = false` talks to containerd only.
fn containerd_and_client(w: &World, daemon: &SociDaemon, via_proxy: bool) -> (Containerd, Cri) {
    let ctd = cri::start_containerd(&CriOptions {
        soci_socket: &daemon.socket,
        certs_dir: &w.certs,
        sandbox_image: &w.pause,
        extra: "",
    });
    let _ = fs::remove_file(backend_link(w));
    std::os::unix::fs::symlink(&ctd.socket, backend_link(w)).unwrap();
    let image_socket = if via_proxy {
        &daemon.socket
    } else {
        &ctd.socket
    };
    let client = Cri::connect(&ctd.socket, image_socket, &w.tmp.path().join("logs")).unwrap();
    (ctd, client)
}

/// Runs the image's container (`cat /data/hello`) and checks it read its file lazily.
fn run_lazily(w: &World, client: &Cri, daemon: &SociDaemon, pod: &str, before: u64) {
    let out = client
        .run(pod, &w.image, &[], Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log_text()));
    assert_eq!(
        (out.code, out.log.as_str()),
        (0, HELLO),
        "{}",
        daemon.log_text()
    );
    let served = w.reg.blob_bytes_served() - before;
    assert!(
        served * 10 < IMAGE_BYTES,
        "registry served {served} bytes for a lazy pull of a {IMAGE_BYTES}-byte image\n{}",
        daemon.log_text()
    );
}

fn assert_no_secret_logged(daemon: &SociDaemon) {
    let log = daemon.log_text();
    for s in [PASS, AUTH_B64] {
        assert!(!log.contains(s), "daemon log holds a secret");
    }
}

fn credentials_file(daemon: &SociDaemon) -> PathBuf {
    daemon.root.join("cri-credentials.json")
}

#[test]
fn cri_pull_credentials_reach_the_snapshotter_and_the_image_loads_lazily() {
    let w = world("cri-private");
    let daemon = SociDaemon::start(&w.tmp.path().join("d"), &keychain_config(&w));
    let (_ctd, client) = containerd_and_client(&w, &daemon, true);
    let before = w.reg.blob_bytes_served();
    client.pull(&w.image, Some(auth())).unwrap();
    run_lazily(&w, &client, &daemon, "cri-keychain-lazy", before);
    assert_no_secret_logged(&daemon);
    let file = credentials_file(&daemon);
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", file.display());
}

#[test]
fn cri_credentials_survive_a_daemon_restart_between_pull_and_first_read() {
    let w = world("cri-restart");
    let mut daemon = SociDaemon::start(&w.tmp.path().join("d"), &keychain_config(&w));
    let (_ctd, client) = containerd_and_client(&w, &daemon, true);
    let before = w.reg.blob_bytes_served();
    client.pull(&w.image, Some(auth())).unwrap();
    // The pod starts now (containerd's connection to the snapshotter breaks with the restart,
    // so nothing new is prepared after it) and waits for a local HTTP answer before its first
    // read of the lazy layer.
    let gate = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = gate.local_addr().unwrap().port();
    let script =
        format!("/bin/busybox wget -q -O /dev/null http://127.0.0.1:{port}/ ; cat /data/hello");
    let image = w.image.clone();
    let pod = std::thread::spawn(move || {
        client.run(
            "cri-keychain-restart",
            &image,
            &["/bin/sh", "-c", &script],
            Duration::from_secs(240),
        )
    });
    gate.set_nonblocking(true).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut conn = loop {
        match gate.accept() {
            Ok((c, _)) => break c,
            Err(_) if std::time::Instant::now() < deadline && !pod.is_finished() => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!(
                "the pod never asked: {e}; {:?}\n{}",
                pod.is_finished().then(|| pod.join()),
                daemon.log_text()
            ),
        }
    };
    // A crash before the pod reads anything: the new daemon must still reach the registry.
    daemon.kill9();
    daemon.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !daemon.log_text().contains("lazy layer restored") {
        assert!(
            std::time::Instant::now() < deadline,
            "lazy layer not restored: {}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    use std::io::Write;
    conn.set_nonblocking(false).unwrap();
    conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
        .unwrap();
    drop(conn);
    let out = pod
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log_text()));
    assert_eq!(
        (out.code, out.log.as_str()),
        (0, HELLO),
        "{}",
        daemon.log_text()
    );
    let served = w.reg.blob_bytes_served() - before;
    assert!(served * 10 < IMAGE_BYTES, "registry served {served} bytes");
    assert!(
        daemon
            .log_text()
            .contains("CRI credentials of earlier pulls restored"),
        "{}",
        daemon.log_text()
    );
    assert_no_secret_logged(&daemon);
}

#[test]
fn cri_wrong_credentials_fail_naming_the_registry_and_remove_image_drops_them() {
    let w = world("cri-wrong");
    let daemon = SociDaemon::start(&w.tmp.path().join("d"), &keychain_config(&w));
    let (_ctd, client) = containerd_and_client(&w, &daemon, true);
    let wrong = AuthConfig {
        username: USER.into(),
        password: "cri-wrong-pw".into(),
        ..Default::default()
    };
    let err = format!("{:#}", client.pull(&w.image, Some(wrong)).unwrap_err());
    assert!(
        err.contains(&w.reg.addr) && err.contains("rejected the credentials"),
        "{err}"
    );
    assert!(!err.contains("cri-wrong-pw"), "{err}");
    let file = credentials_file(&daemon);
    let text = fs::read_to_string(&file).unwrap_or_default();
    assert!(
        !text.contains("cri-wrong-pw"),
        "rejected credentials kept: {text}"
    );

    // The right ones: kept for the image until the image is removed.
    client.pull(&w.image, Some(auth())).unwrap();
    let text = fs::read_to_string(&file).unwrap();
    assert!(text.contains(&w.image), "{text}");
    client.remove_image(&w.image).unwrap();
    let text = fs::read_to_string(&file).unwrap();
    assert!(!text.contains(&w.image) && !text.contains(PASS), "{text}");
    assert_no_secret_logged(&daemon);
}

#[test]
fn cri_docker_config_written_after_daemon_start_is_used_without_restart() {
    let w = world("cri-dockercfg");
    let home = w.tmp.path().join("home");
    fs::create_dir_all(&home).unwrap();
    let home_s = home.to_str().unwrap();
    // No CRI keychain: only the daemon's own docker config, under its HOME.
    let daemon = SociDaemon::start_with_env(
        &w.tmp.path().join("d"),
        "[background_fetch]\nsilence_period_msec = 600000\n",
        &[("HOME", Some(home_s)), ("DOCKER_CONFIG", None)],
    );
    // `docker login` after the daemon started.
    write_docker_login(&home, &w.reg.addr);
    let (_ctd, client) = containerd_and_client(&w, &daemon, false);
    let before = w.reg.blob_bytes_served();
    // containerd gets the credentials from the request; the daemon only from config.json.
    client.pull(&w.image, Some(auth())).unwrap();
    run_lazily(&w, &client, &daemon, "cri-keychain-dockercfg", before);
}

fn write_docker_login(home: &Path, addr: &str) {
    let d = home.join(".docker");
    fs::create_dir_all(&d).unwrap();
    fs::write(
        d.join("config.json"),
        format!(r#"{{"auths":{{"{addr}":{{"auth":"{AUTH_B64}"}}}}}}"#),
    )
    .unwrap();
}

#[test]
fn cri_expired_credentials_answered_403_without_challenge_get_fresh_authentication() {
    use integration_tests::fault_proxy::{Fault, FaultProxy};
    use soci_registry::auth::DockerConfig;
    use soci_registry::{Client, ClientOptions, Digest, HostsConfig, Reference};

    // A small private image is enough: this is about the client's answer to the 403.
    let reg = Registry::start_with_auth(Some((USER, PASS)));
    let tmp = tempfile::tempdir().unwrap();
    let mut lw = LayoutWriter::new(&tmp.path().join("l"));
    let layer = Layer {
        entries: vec![Entry::File("f".into(), random_bytes(1 << 20, 77), 0o644)],
        compression: Compression::Gzip,
    };
    let m = lw.manifest("amd64", &[layer], &["/f"]);
    lw.tag_manifest(&m, "v1");
    reg.push_layout(
        &lw.dir,
        "v1",
        "cri-forbidden:v1",
        Some(&format!("{USER}:{PASS}")),
    );
    let proxy = FaultProxy::start(&reg.addr);
    let home = tmp.path().join("home");
    write_docker_login(&home, &proxy.addr);
    let creds = DockerConfig::load(&home.join(".docker/config.json")).unwrap();
    let c = Client::with_credentials(
        ClientOptions {
            hosts: HostsConfig {
                plain_http_hosts: vec![proxy.addr.clone()],
                ..Default::default()
            },
            ..Default::default()
        },
        creds,
    )
    .unwrap();
    let r = Reference::parse(&format!("{}/cri-forbidden:v1", proxy.addr)).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (_, m) = c.get_manifest(&r.repository, "v1").await.unwrap();
        let m: serde_json::Value = serde_json::from_slice(&m).unwrap();
        let layer = Digest::parse(m["layers"][0]["digest"].as_str().unwrap()).unwrap();
        c.get_blob_range(&r.repository, &layer, 0..4096)
            .await
            .unwrap();
        // The registry now calls the cached credentials expired: 403, no challenge.
        proxy.inject(Fault::ForbiddenIfAuthorized, 1);
        let b = c
            .get_blob_range(&r.repository, &layer, 4096..8192)
            .await
            .unwrap_or_else(|e| panic!("no fresh authentication after a 403: {e}"));
        assert_eq!(b.len(), 4096);
        assert_eq!(proxy.applied(), 1);
    });
}
