//! The soci-snapshotter-grpc daemon under test, in its own root and socket.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::bin;
use crate::containerd::unmount_under;

/// A running daemon; killed and its mounts removed on drop.
pub struct SociDaemon {
    child: Option<Child>,
    /// State directory.
    pub root: PathBuf,
    /// gRPC socket.
    pub socket: PathBuf,
    /// Extra config file contents.
    config: PathBuf,
    /// Log file (stderr of every run, appended).
    pub log: PathBuf,
}

impl SociDaemon {
    /// Starts a daemon with state under `dir` and `config` as its TOML config.
    pub fn start(dir: &Path, config: &str) -> SociDaemon {
        fs::create_dir_all(dir).unwrap();
        let cfg = dir.join("config.toml");
        fs::write(&cfg, config).unwrap();
        let mut d = SociDaemon {
            child: None,
            root: dir.join("root"),
            socket: dir.join("soci.sock"),
            config: cfg,
            log: dir.join("daemon.log"),
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(bin("soci-snapshotter-grpc"))
            .arg("--root")
            .arg(&self.root)
            .arg("--address")
            .arg(&self.socket)
            .arg("--config")
            .arg(&self.config)
            .arg("--log-level")
            .arg("debug")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start soci-snapshotter-grpc");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!(
                        "daemon exited with {status}: {}",
                        fs::read_to_string(&self.log).unwrap_or_default()
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not listen: {}",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        unsafe_kill(c.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return s.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again with the same root, socket and config.
    pub fn restart(&mut self) {
        self.spawn();
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn unsafe_kill(pid: u32, sig: i32) {
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

impl Drop for SociDaemon {
    fn drop(&mut self) {
        self.kill9();
        unmount_under(&self.root);
    }
}
