//! A real OCI registry (Debian's `docker-registry`, CNCF distribution) on 127.0.0.1.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{require, run};

/// A running registry; stopped on drop.
pub struct Registry {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// Storage root (for tampering with blobs in tests).
    pub storage: PathBuf,
    /// Access log.
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

impl Registry {
    /// Starts an anonymous registry.
    pub fn start() -> Registry {
        Self::start_with_auth(None)
    }

    /// Starts a registry; with `Some((user, password))` it requires htpasswd basic auth.
    pub fn start_with_auth(auth: Option<(&str, &str)>) -> Registry {
        require("docker-registry", "docker-registry");
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = dir.path().join("storage");
        fs::create_dir_all(&storage).unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            storage.display()
        );
        if let Some((user, pass)) = auth {
            require("htpasswd", "apache2-utils");
            let out = run(Command::new("htpasswd").args(["-Bbn", user, pass])).unwrap();
            let file = dir.path().join("htpasswd");
            fs::write(&file, out.stdout).unwrap();
            cfg.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: soci-test\n    path: {}\n",
                file.display()
            ));
        }
        let cfg_path = dir.path().join("config.yml");
        fs::write(&cfg_path, cfg).unwrap();
        let log = dir.path().join("registry.log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg_path)
            .stdout(Stdio::from(fs::File::create(&log).unwrap()))
            .stderr(Stdio::from(
                fs::File::create(dir.path().join("registry.err")).unwrap(),
            ))
            .spawn()
            .expect("start docker-registry");
        let r = Registry {
            child,
            addr,
            storage,
            log,
            _dir: dir,
        };
        r.wait_ready();
        r
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(&self.addr).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("registry on {} did not start", self.addr);
    }

    /// Pushes an OCI layout (`oci:DIR:TAG`) to `REPO:TAG` with skopeo (all platforms).
    pub fn push_layout(&self, layout: &Path, tag: &str, repo_tag: &str, creds: Option<&str>) {
        require("skopeo", "skopeo");
        let mut cmd = Command::new("skopeo");
        cmd.args([
            "copy",
            "--all",
            "--dest-tls-verify=false",
            "--preserve-digests",
        ]);
        if let Some(c) = creds {
            cmd.arg(format!("--dest-creds={c}"));
        }
        cmd.arg(format!("oci:{}:{tag}", layout.display()));
        cmd.arg(format!("docker://{}/{repo_tag}", self.addr));
        run(&mut cmd).expect("skopeo copy");
    }

    /// Path of a blob's data file in the registry storage.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Body sizes of the successful GETs of blobs whose access-log line `pick`s, in order.
    fn served(&self, pick: impl Fn(&str) -> bool) -> Vec<u64> {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("\"GET /v2/") && pick(l))
            .filter_map(|l| {
                let mut it = l.split("HTTP/1.1\" ").nth(1)?.split_whitespace();
                let status: u16 = it.next()?.parse().ok()?;
                let bytes: u64 = it.next()?.parse().ok()?;
                (status == 200 || status == 206).then_some(bytes)
            })
            .collect()
    }

    /// Total body bytes of successful blob GETs in the access log so far.
    pub fn blob_bytes_served(&self) -> u64 {
        self.served(|l| l.contains("/blobs/sha256:")).iter().sum()
    }

    /// Body sizes of the successful GETs of blob `digest` so far, in order.
    pub fn blob_gets(&self, digest: &str) -> Vec<u64> {
        let needle = format!("/blobs/{digest} ");
        self.served(|l| l.contains(&needle))
    }

    /// [`Registry::blob_gets`] once the access log stopped growing for them (a response's
    /// line is written just after its last byte went out).
    pub fn blob_gets_settled(&self, digest: &str) -> Vec<u64> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut last = self.blob_gets(digest);
        loop {
            std::thread::sleep(std::time::Duration::from_millis(300));
            let now = self.blob_gets(digest);
            if now == last || std::time::Instant::now() > deadline {
                return now;
            }
            last = now;
        }
    }

    /// A registry client for this registry (plain HTTP).
    pub fn client(&self) -> soci_registry::Client {
        soci_registry::Client::new(soci_registry::ClientOptions {
            hosts: soci_registry::HostsConfig {
                plain_http_hosts: vec![self.addr.clone()],
                ..Default::default()
            },
            ..Default::default()
        })
        .expect("registry client")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
