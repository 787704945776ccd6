//! The daemon as a service manager and an upstream user see it: `Type=notify` readiness,
//! `--address fd://` socket activation, `SOCI_SNAPSHOTTER_*` environment, upstream's shipped
//! config file (loads, and every key soci-rs ignores is named in a warning), `config dump`.

use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::bin;

const UPSTREAM_CONFIG: &str =
    include_str!("../../crates/snapshotter/testdata/upstream-config.toml");

/// Waits for one datagram (bounded).
fn recv_state(sock: &UnixDatagram, within: Duration) -> String {
    sock.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 256];
    let n = sock
        .recv(&mut buf)
        .expect("no notification from the daemon in time");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn notify_ready_with_socket_activation_and_upstream_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, UPSTREAM_CONFIG).unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let sock_path = dir.path().join("soci.sock");
    let listener = UnixListener::bind(&sock_path).unwrap();
    let log_path = dir.path().join("daemon.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let root = dir.path().join("root");

    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"")
        .arg(bin("soci-snapshotter-grpc"))
        .args(["--address", "fd://", "--config"])
        .arg(&cfg)
        .env("SOCI_SNAPSHOTTER_ROOT", &root)
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log));
    {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let fd = listener.as_raw_fd();
        // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if fd == 3 {
                    let flags = libc::fcntl(3, libc::F_GETFD);
                    libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                } else if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().expect("start soci-snapshotter-grpc");
    let state = recv_state(&notify, Duration::from_secs(20));
    let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();
    assert_eq!(state, "READY=1", "log: {}", log_text());
    assert!(
        UnixStream::connect(&sock_path).is_ok(),
        "the passed socket is served once READY=1 is sent"
    );
    assert!(
        root.is_dir(),
        "SOCI_SNAPSHOTTER_ROOT names the state directory"
    );
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(recv_state(&notify, Duration::from_secs(20)), "STOPPING=1");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "daemon did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status}: {}", log_text());
    let log = log_text();
    for key in [
        "http",
        "directory_cache",
        "fuse.log_fuse_operations",
        "kubeconfig_keychain",
    ] {
        let want = format!("config key `{key}` is not supported by soci-rs and is ignored");
        assert_eq!(
            log.matches(&want).count(),
            1,
            "one warning for {key}: {log}"
        );
    }
    assert!(
        !log.contains("`metrics_address`"),
        "metrics_address is supported ('' = off)"
    );
}

#[test]
fn address_fd_without_a_passed_socket_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, "").unwrap();
    let o = Command::new(bin("soci-snapshotter-grpc"))
        .args(["--address", "fd://", "--root"])
        .arg(dir.path().join("root"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("fd://") && err.contains("LISTEN_FDS"), "{err}");
}

#[test]
fn config_dump_and_default() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        "metrics_address = \"127.0.0.1:9999\"\n[blob]\nfetching_timeout_sec = 7\n",
    )
    .unwrap();
    let o = Command::new(bin("soci-snapshotter-grpc"))
        .args(["config", "dump"])
        .env("SOCI_SNAPSHOTTER_CONFIG", &cfg)
        .env("SOCI_SNAPSHOTTER_ROOT", "/srv/soci-root")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dump = String::from_utf8_lossy(&o.stdout).into_owned();
    let v: toml::Value = toml::from_str(&dump).expect("dump is TOML");
    assert_eq!(v["root_path"].as_str(), Some("/srv/soci-root"));
    assert_eq!(v["metrics_address"].as_str(), Some("127.0.0.1:9999"));
    assert_eq!(v["blob"]["fetching_timeout_sec"].as_integer(), Some(7));
    let o = Command::new(bin("soci-snapshotter-grpc"))
        .args(["config", "default"])
        .output()
        .unwrap();
    assert!(o.status.success());
    let v: toml::Value = toml::from_str(&String::from_utf8_lossy(&o.stdout)).unwrap();
    assert_eq!(v["metrics_address"].as_str(), Some(""));
    assert_eq!(
        v["root_path"].as_str(),
        Some("/var/lib/soci-snapshotter-grpc")
    );
    assert!(
        !Path::new("/srv/soci-root").exists(),
        "dump creates nothing"
    );
}
