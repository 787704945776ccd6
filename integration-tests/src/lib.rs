//! Shared harness for tests against real components (GNU tar, gzip, registry, containerd,
//! FUSE). Tests fail with a clear message when a prerequisite is missing; they never skip.

pub mod containerd;
pub mod cri;
pub mod daemon;
pub mod fault_proxy;
pub mod gate;
pub mod image;
pub mod registry;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

/// Directory holding the workspace's built binaries for the profile of the running test.
fn bin_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test>  ->  target/<profile>
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .to_path_buf();
        let release = dir.ends_with("release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--workspace", "--bins", "--quiet"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build for the binaries");
        assert!(
            status.success(),
            "cargo build of the workspace binaries failed"
        );
        dir
    })
}

/// Path of a workspace binary (built on first use).
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "binary {} not found after build", p.display());
    p
}

/// Fails unless `cmd` is on PATH, naming the package that provides it.
pub fn require(cmd: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "prerequisite `{cmd}` is missing: install Debian package `{package}` (scripts/install-deps.sh)"
    );
}

/// Runs a command and returns its output; fails with stderr if it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// sha256 of bytes as hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// The daemon's `/metrics` answer (headers and Prometheus text) from `addr`, read within 10 s.
pub fn get_metrics(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)
        .unwrap_or_else(|e| panic!("metrics endpoint {addr}: {e}"));
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Counter `name` (no labels) of the daemon serving metrics at `addr`; 0 when absent.
pub fn counter(addr: &str, name: &str) -> u64 {
    metric_value(&get_metrics(addr), name).unwrap_or(0)
}

/// The value of metric `name` (a line `name VALUE`, no labels) in a Prometheus text page.
pub fn metric_value(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
