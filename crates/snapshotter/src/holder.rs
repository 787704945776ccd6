//! The FUSE fd holder: a tiny process that keeps the `/dev/fuse` descriptors of lazy layers
//! open while the daemon restarts, so their mounts stay alive and the next daemon resumes
//! serving them (running containers only see a pause, not an error).
//!
//! The daemon starts it (`soci-snapshotter-grpc fd-holder`, its own process group so a kill of
//! the daemon does not reach it) and talks to it over a `SOCK_SEQPACKET` unix socket, one
//! message per packet, descriptors passed with `SCM_RIGHTS`:
//!
//! | daemon sends                      | holder answers                                  |
//! |-----------------------------------|-------------------------------------------------|
//! | `HELLO`                           | `HELLO 2` (protocol 2; an older holder: `ERR …`)|
//! | `PUT <id> <minor> <resend>` + fd  | `OK`                                            |
//! | `DEL <id>`                        | `OK` (the descriptor is closed)                 |
//! | `LIST`                            | one `FD <id> <minor> <resend>` + fd per held    |
//! |                                   | mount, then `END`                               |
//!
//! `<minor>` is the FUSE protocol minor of the connection, `<resend>` 1 if the kernel can
//! resend requests a dead daemon took (`FUSE_HAS_RESEND`), else 0: the next daemon needs both
//! to resume without an INIT. Protocol 1 (holders and daemons before `HELLO`) had no
//! `<resend>` word; each side still speaks it to a peer that did not say `HELLO 2`, and such
//! records mean "no resend".
//!
//! When the daemon's connection ends the holder waits `timeout` for a new daemon; if none
//! comes it closes every descriptor (the kernel then aborts those FUSE connections, so readers
//! get an error instead of waiting forever) and exits. It also exits when it holds nothing.

use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};

const MAX_MSG: usize = 256;
/// Holder protocol version with the `<resend>` word.
const PROTOCOL: u32 = 2;

/// What the holder keeps about one connection besides its descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record {
    minor: u32,
    resend: bool,
}

fn parse_resend(w: &str) -> Option<bool> {
    match w {
        "0" => Some(false),
        "1" => Some(true),
        _ => None,
    }
}

/// Errors talking to the holder.
#[derive(Debug, thiserror::Error)]
pub enum HolderError {
    /// A system call failed.
    #[error("fd holder {0}: {1}")]
    Sys(&'static str, Errno),
    /// The holder answered something unexpected.
    #[error("fd holder protocol: {0}")]
    Protocol(String),
    /// The holder could not be started.
    #[error("starting the fd holder: {0}")]
    Spawn(std::io::Error),
}

fn seqpacket() -> Result<OwnedFd, HolderError> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| HolderError::Sys("socket", e))
}

fn send(fd: RawFd, msg: &str, pass: Option<RawFd>) -> Result<(), HolderError> {
    let iov = [IoSlice::new(msg.as_bytes())];
    let fds;
    let cmsgs: &[ControlMessage] = match pass {
        Some(f) => {
            fds = [f];
            &[ControlMessage::ScmRights(&fds)]
        }
        None => &[],
    };
    socket::sendmsg::<()>(fd, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(|e| HolderError::Sys("send", e))?;
    Ok(())
}

/// One message and the descriptors that came with it; `None` at end of connection.
fn recv(fd: RawFd) -> Result<Option<(String, Vec<OwnedFd>)>, HolderError> {
    let mut buf = [0u8; MAX_MSG];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = socket::recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(|e| HolderError::Sys("recv", e))?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(|e| HolderError::Sys("recv", e))? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for r in raw {
                // SAFETY: SCM_RIGHTS just installed `r` in this process; nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(r) });
            }
        }
    }
    let n = msg.bytes;
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    Ok(Some((text, fds)))
}

/// Runs the holder on `socket_path` (the `fd-holder` subcommand). Returns when it exits.
pub fn run(socket_path: &Path, timeout: Duration) -> Result<(), HolderError> {
    let _ = std::fs::remove_file(socket_path);
    let listener = seqpacket()?;
    let addr = UnixAddr::new(socket_path).map_err(|e| HolderError::Sys("address", e))?;
    socket::bind(listener.as_raw_fd(), &addr).map_err(|e| HolderError::Sys("bind", e))?;
    let _ = std::fs::set_permissions(
        socket_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    );
    socket::listen(&listener, Backlog::new(4).expect("backlog"))
        .map_err(|e| HolderError::Sys("listen", e))?;
    let mut held: BTreeMap<String, (Record, OwnedFd)> = BTreeMap::new();
    let mut first = true;
    loop {
        // Wait for a daemon: the first one at once (it started us), later ones for `timeout`.
        let wait = if first {
            Duration::from_secs(10)
        } else {
            timeout
        };
        let deadline = Instant::now() + wait;
        let conn = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = PollTimeout::try_from(left.as_millis().min(60_000) as i32)
                .unwrap_or(PollTimeout::ZERO);
            let mut p = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
            match nix::poll::poll(&mut p, ms) {
                Ok(0) if Instant::now() >= deadline => break None,
                Ok(0) | Err(Errno::EINTR) => continue,
                Ok(_) => {}
                Err(e) => return Err(HolderError::Sys("poll", e)),
            }
            match socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                // SAFETY: accept4 returned a new descriptor that only we own.
                Ok(fd) => break Some(unsafe { OwnedFd::from_raw_fd(fd) }),
                Err(Errno::EINTR) | Err(Errno::EAGAIN) => continue,
                Err(e) => return Err(HolderError::Sys("accept", e)),
            }
        };
        first = false;
        let Some(conn) = conn else {
            if !held.is_empty() {
                eprintln!(
                    "soci fd-holder: no daemon came back within {timeout:?}; releasing {} FUSE connection(s)",
                    held.len()
                );
            }
            break;
        };
        serve_daemon(conn.as_raw_fd(), &mut held);
        if held.is_empty() {
            break;
        }
    }
    let _ = std::fs::remove_file(socket_path);
    Ok(())
}

/// Answers one daemon until its connection ends.
fn serve_daemon(conn: RawFd, held: &mut BTreeMap<String, (Record, OwnedFd)>) {
    // Whether this daemon said HELLO (else it speaks protocol 1: no `<resend>` word).
    let mut v2 = false;
    loop {
        let (msg, mut fds) = match recv(conn) {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => return eprintln!("soci fd-holder: {e}"),
        };
        let words: Vec<&str> = msg.split_whitespace().collect();
        let mut put = |id: &str, minor: &str, resend: Option<&str>| {
            let resend = resend.map_or(Some(false), parse_resend);
            match (minor.parse::<u32>(), resend, fds.pop()) {
                (Ok(minor), Some(resend), Some(fd)) => {
                    held.insert(id.to_string(), (Record { minor, resend }, fd));
                    Ok(())
                }
                _ => send(conn, "ERR bad PUT", None),
            }
        };
        let reply = match words.as_slice() {
            ["HELLO"] => {
                v2 = true;
                send(conn, &format!("HELLO {PROTOCOL}"), None)
            }
            ["PUT", id, minor] => put(id, minor, None),
            ["PUT", id, minor, resend] => put(id, minor, Some(resend)),
            ["DEL", id] => {
                held.remove(*id);
                Ok(())
            }
            ["LIST"] => held
                .iter()
                .try_for_each(|(id, (r, fd))| {
                    let msg = if v2 {
                        format!("FD {id} {} {}", r.minor, u8::from(r.resend))
                    } else {
                        format!("FD {id} {}", r.minor)
                    };
                    send(conn, &msg, Some(fd.as_raw_fd()))
                })
                .and_then(|()| send(conn, "END", None)),
            _ => send(conn, "ERR unknown request", None),
        };
        let reply = reply.and_then(|()| match words.first() {
            Some(&"PUT") | Some(&"DEL") => send(conn, "OK", None),
            _ => Ok(()),
        });
        if let Err(e) = reply {
            return eprintln!("soci fd-holder: {e}");
        }
    }
}

/// The daemon's connection to its holder.
pub struct HolderClient {
    conn: OwnedFd,
    path: PathBuf,
    /// The holder speaks protocol 2 (records whether the kernel can resend).
    v2: bool,
}

/// A held mount, as listed by the holder.
pub struct Held {
    /// FUSE protocol minor version of the connection.
    pub minor: u32,
    /// Whether the kernel can resend requests a dead daemon took (false when a protocol 1
    /// holder or daemon kept the connection: unknown, so not relied on).
    pub resend: bool,
    /// The `/dev/fuse` descriptor.
    pub fd: OwnedFd,
}

impl HolderClient {
    /// Connects to the holder at `path`, starting one (`exe fd-holder ...`) if none listens.
    pub fn connect_or_spawn(
        path: &Path,
        exe: &Path,
        timeout: Duration,
    ) -> Result<HolderClient, HolderError> {
        if let Ok(c) = Self::connect(path) {
            return Ok(c);
        }
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("fd-holder")
            .arg("--socket")
            .arg(path)
            .arg("--timeout-sec")
            .arg(timeout.as_secs().to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        // Its own process group: signals for the daemon's group do not reach it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().map_err(HolderError::Spawn)?;
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match Self::connect(path) {
                Ok(c) => {
                    // Reap it in the background so it never lingers as a zombie of ours.
                    std::thread::spawn(move || child.wait());
                    return Ok(c);
                }
                Err(e) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(e);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    fn connect(path: &Path) -> Result<HolderClient, HolderError> {
        let fd = seqpacket()?;
        let addr = UnixAddr::new(path).map_err(|e| HolderError::Sys("address", e))?;
        socket::connect(fd.as_raw_fd(), &addr).map_err(|e| HolderError::Sys("connect", e))?;
        // Bounded waits: the daemon never hangs on its holder.
        let t = nix::sys::time::TimeVal::new(5, 0);
        socket::setsockopt(&fd, socket::sockopt::ReceiveTimeout, &t)
            .map_err(|e| HolderError::Sys("setsockopt", e))?;
        socket::setsockopt(&fd, socket::sockopt::SendTimeout, &t)
            .map_err(|e| HolderError::Sys("setsockopt", e))?;
        let mut c = HolderClient {
            conn: fd,
            path: path.to_path_buf(),
            v2: false,
        };
        send(c.conn.as_raw_fd(), "HELLO", None)?;
        c.v2 = match recv(c.conn.as_raw_fd())? {
            Some((m, _)) if m == format!("HELLO {PROTOCOL}") => true,
            // A holder started by an earlier version: it keeps no resend flag.
            Some((m, _)) if m.starts_with("ERR") => false,
            other => {
                return Err(HolderError::Protocol(format!(
                    "{}: expected HELLO, got {:?}",
                    path.display(),
                    other.map(|o| o.0)
                )))
            }
        };
        Ok(c)
    }

    fn expect_ok(&self) -> Result<(), HolderError> {
        match recv(self.conn.as_raw_fd())? {
            Some((m, _)) if m == "OK" => Ok(()),
            other => Err(HolderError::Protocol(format!(
                "{}: expected OK, got {:?}",
                self.path.display(),
                other.map(|o| o.0)
            ))),
        }
    }

    /// Hands the holder a copy of mount `id`'s descriptor and its protocol state.
    pub fn put(
        &self,
        id: u64,
        session: soci_fs::Session,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), HolderError> {
        let msg = if self.v2 {
            format!("PUT {id} {} {}", session.minor, u8::from(session.resend))
        } else {
            format!("PUT {id} {}", session.minor)
        };
        send(self.conn.as_raw_fd(), &msg, Some(fd.as_raw_fd()))?;
        self.expect_ok()
    }

    /// Makes the holder close mount `id`'s descriptor.
    pub fn del(&self, id: u64) -> Result<(), HolderError> {
        send(self.conn.as_raw_fd(), &format!("DEL {id}"), None)?;
        self.expect_ok()
    }

    /// Every held mount, by id (copies of the descriptors; the holder keeps its own).
    pub fn list(&self) -> Result<BTreeMap<u64, Held>, HolderError> {
        send(self.conn.as_raw_fd(), "LIST", None)?;
        let mut out = BTreeMap::new();
        loop {
            let Some((msg, mut fds)) = recv(self.conn.as_raw_fd())? else {
                return Err(HolderError::Protocol(
                    "connection closed during LIST".into(),
                ));
            };
            let words: Vec<&str> = msg.split_whitespace().collect();
            match (words.as_slice(), fds.pop()) {
                (["END"], _) => return Ok(out),
                (["FD", id, minor, rest @ ..], Some(fd)) if rest.len() <= 1 => {
                    let resend = rest.first().map_or(Some(false), |w| parse_resend(w));
                    let (Ok(id), Ok(minor), Some(resend)) = (id.parse(), minor.parse(), resend)
                    else {
                        return Err(HolderError::Protocol(format!("bad entry {msg:?}")));
                    };
                    out.insert(id, Held { minor, resend, fd });
                }
                _ => return Err(HolderError::Protocol(format!("unexpected {msg:?}"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_descriptors_across_clients_and_exits_when_empty() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("h.sock");
        let s2 = sock.clone();
        let holder = std::thread::spawn(move || run(&s2, Duration::from_secs(2)));
        let deadline = Instant::now() + Duration::from_secs(3);
        let c = loop {
            match HolderClient::connect(&sock) {
                Ok(c) => break c,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => panic!("{e}"),
            }
        };
        // Any descriptor will do: a pipe whose write end we keep, to see the copy is live.
        let (r, w) = nix::unistd::pipe().unwrap();
        let session = soci_fs::Session {
            minor: 40,
            resend: true,
        };
        c.put(7, session, r.as_fd()).unwrap();
        drop(r);
        drop(c);

        // A later "daemon" gets a working copy back.
        let c = HolderClient::connect(&sock).unwrap();
        let held = c.list().unwrap();
        assert_eq!(held.keys().copied().collect::<Vec<_>>(), vec![7]);
        assert_eq!((held[&7].minor, held[&7].resend), (40, true));
        nix::unistd::write(&w, b"x").unwrap();
        let mut b = [0u8; 1];
        assert_eq!(nix::unistd::read(&held[&7].fd, &mut b).unwrap(), 1);
        assert_eq!(&b, b"x");

        c.del(7).unwrap();
        assert!(c.list().unwrap().is_empty());
        drop(c);
        // Holding nothing, it exits when the daemon goes.
        holder.join().unwrap().unwrap();
        assert!(!sock.exists());
    }

    /// A daemon of the previous version (no HELLO, no `<resend>` word) and a current one
    /// use a holder in turn: each gets the records in its own format; old records mean no
    /// resend.
    #[test]
    fn speaks_protocol_1_to_older_daemons() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("h.sock");
        let s2 = sock.clone();
        let holder = std::thread::spawn(move || run(&s2, Duration::from_secs(2)));
        let addr = UnixAddr::new(&sock).unwrap();
        let old_daemon = || {
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                let fd = seqpacket().unwrap();
                match socket::connect(fd.as_raw_fd(), &addr) {
                    Ok(()) => break fd,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        };
        let (r, _w) = nix::unistd::pipe().unwrap();
        let old = old_daemon();
        send(old.as_raw_fd(), "PUT 3 31", Some(r.as_raw_fd())).unwrap();
        assert_eq!(recv(old.as_raw_fd()).unwrap().unwrap().0, "OK");
        drop(old);

        let c = HolderClient::connect(&sock).unwrap();
        assert!(c.v2);
        let held = c.list().unwrap();
        assert_eq!((held[&3].minor, held[&3].resend), (31, false));
        let session = soci_fs::Session {
            minor: 40,
            resend: true,
        };
        c.put(4, session, r.as_fd()).unwrap();
        drop(c);

        let old = old_daemon();
        send(old.as_raw_fd(), "LIST", None).unwrap();
        let lines: Vec<String> = std::iter::from_fn(|| recv(old.as_raw_fd()).unwrap().map(|m| m.0))
            .take_while(|m| m != "END")
            .collect();
        assert_eq!(lines, vec!["FD 3 31".to_string(), "FD 4 40".to_string()]);
        send(old.as_raw_fd(), "DEL 3", None).unwrap();
        send(old.as_raw_fd(), "DEL 4", None).unwrap();
        drop(old);
        holder.join().unwrap().unwrap();
    }
}
