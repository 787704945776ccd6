//! The soci-snapshotter-grpc daemon under test, in its own root and socket.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::bin;
use crate::containerd::{kill_processes_mentioning, unmount_under};

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
    /// Listening socket held by the test, as systemd would (socket activation).
    activation: Option<std::os::unix::net::UnixListener>,
    /// Environment changes for every run (`None`: variable removed).
    env: Vec<(String, Option<String>)>,
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
            activation: None,
            env: Vec::new(),
        };
        d.spawn();
        d
    }

    /// Like [`Self::start`], with environment changes for every run of the daemon
    /// (`(name, None)` removes the variable), e.g. its `HOME`.
    pub fn start_with_env(dir: &Path, config: &str, env: &[(&str, Option<&str>)]) -> SociDaemon {
        fs::create_dir_all(dir).unwrap();
        let cfg = dir.join("config.toml");
        fs::write(&cfg, config).unwrap();
        let mut d = SociDaemon {
            child: None,
            root: dir.join("root"),
            socket: dir.join("soci.sock"),
            config: cfg,
            log: dir.join("daemon.log"),
            activation: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
                .collect(),
        };
        d.spawn();
        d
    }

    /// Like [`Self::start`], but the test binds the socket and passes it to every run of the
    /// daemon as fd 3 with `LISTEN_FDS`/`LISTEN_PID` (systemd socket activation).
    pub fn start_activated(dir: &Path, config: &str) -> SociDaemon {
        fs::create_dir_all(dir).unwrap();
        let cfg = dir.join("config.toml");
        fs::write(&cfg, config).unwrap();
        let socket = dir.join("soci.sock");
        let listener =
            std::os::unix::net::UnixListener::bind(&socket).expect("bind activation socket");
        let mut d = SociDaemon {
            child: None,
            root: dir.join("root"),
            socket,
            config: cfg,
            log: dir.join("daemon.log"),
            activation: Some(listener),
            env: Vec::new(),
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let serving_before = self
            .log_text()
            .matches("soci-snapshotter-grpc serving")
            .count();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = match &self.activation {
            None => Command::new(bin("soci-snapshotter-grpc")),
            Some(l) => {
                use std::os::fd::AsRawFd;
                use std::os::unix::process::CommandExt;
                let fd = l.as_raw_fd();
                // `exec` keeps the shell's pid, so LISTEN_PID=$$ names the daemon.
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"")
                    .arg(bin("soci-snapshotter-grpc"));
                // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
                unsafe {
                    c.pre_exec(move || {
                        if fd == 3 {
                            let flags = libc::fcntl(3, libc::F_GETFD);
                            libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                        } else if libc::dup2(fd, 3) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                c
            }
        };
        for (k, v) in &self.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let child = cmd
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
        let ready = |d: &SociDaemon| {
            if d.activation.is_some() {
                d.log_text()
                    .matches("soci-snapshotter-grpc serving")
                    .count()
                    > serving_before
            } else {
                std::os::unix::net::UnixStream::connect(&d.socket).is_ok()
            }
        };
        while !ready(self) {
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

    /// Prefetches of `layer` the daemon reported complete ("prefetched" lines).
    pub fn prefetches_done(&self, layer: &str) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains("prefetched") && l.contains(layer))
            .count()
    }

    /// Waits (up to 60 s) until more than `before` prefetches of `layer` are complete: a
    /// layer's mount does not wait for its prefetch.
    pub fn wait_prefetched(&self, layer: &str, before: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while self.prefetches_done(layer) <= before {
            assert!(
                std::time::Instant::now() < deadline,
                "no prefetch of {layer} completed within 60 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
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
        // The fd holder (its own process group) keeps lazy mounts alive across restarts.
        kill_processes_mentioning(&self.root.to_string_lossy());
        unmount_under(&self.root);
    }
}
