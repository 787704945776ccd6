//! The FUSE face of a layer: our own small server of the kernel protocol (see [`crate::kernel`]).
//!
//! We speak the protocol ourselves rather than through a FUSE library because a session must
//! be able to *resume*: a later daemon process takes over an already initialised `/dev/fuse`
//! connection (kept open by the fd holder across the restart) and goes on answering requests
//! without an INIT handshake, so running containers keep reading their files.
//!
//! One thread per mount reads requests; metadata is answered from memory on that thread, reads
//! are handed to tokio tasks so the loop never waits on the network. Mounting, resuming and
//! stopping a session are in [`crate::mount`].

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use tokio::runtime::Handle;
use tracing::{debug, error, warn};

use crate::kernel::{self, op, Attr, Reply, Request};
use crate::spans::{FsMetrics, SpanManager};
use crate::tree::{LayerTree, Node, NodeKind};

/// Largest read we let the kernel ask for (with `FUSE_MAX_PAGES`).
const MAX_PAGES: u16 = 256;
/// `max_write` we announce; the request buffer must hold it plus headers.
const MAX_WRITE: u32 = 128 * 1024;
const BUF_SIZE: usize = MAX_WRITE as usize + 4096;
/// What we ask of the kernel at INIT.
const INIT_WANTS: kernel::InitWants = kernel::InitWants {
    flags: kernel::init::ASYNC_READ
        | kernel::init::DO_READDIRPLUS
        | kernel::init::READDIRPLUS_AUTO
        | kernel::init::PARALLEL_DIROPS
        | kernel::init::MAX_PAGES
        | kernel::init::CACHE_SYMLINKS,
    max_background: 16,
    congestion_threshold: 12,
    max_write: MAX_WRITE,
    max_pages: MAX_PAGES,
};

/// The `/dev/fuse` connection of one mount; replies are written here from any thread.
pub(crate) struct Channel {
    pub(crate) fd: OwnedFd,
}

impl Channel {
    fn send(&self, reply: &[u8]) {
        self.send_parts(&[std::io::IoSlice::new(reply)]);
    }

    /// Writes one reply made of several parts (the kernel takes a reply in one write).
    fn send_parts(&self, parts: &[std::io::IoSlice<'_>]) {
        match nix::sys::uio::writev(&self.fd, parts) {
            Ok(_) => {}
            // The request was interrupted, or the filesystem is gone: nobody waits any more.
            Err(Errno::ENOENT) | Err(Errno::ENODEV) => {}
            Err(e) => warn!(error = %e, "FUSE reply not delivered"),
        }
    }
}

/// A layer filesystem: answers FUSE requests from the tree and the span manager.
pub(crate) struct LayerFs {
    pub(crate) tree: Arc<LayerTree>,
    pub(crate) spans: Arc<SpanManager>,
    pub(crate) rt: Handle,
    pub(crate) ttl: Duration,
    pub(crate) metrics: Arc<FsMetrics>,
    /// Negotiated protocol minor version (0 until INIT).
    pub(crate) minor: AtomicU32,
    /// Whether the kernel can resend requests taken but not answered (set at INIT).
    pub(crate) resend: AtomicBool,
    /// Reads handed to tokio and not answered yet.
    pub(crate) inflight: Arc<AtomicUsize>,
    /// Requests received with the resend bit.
    pub(crate) resent: AtomicUsize,
}

fn mode(n: &Node) -> u32 {
    let t = match n.kind {
        NodeKind::Dir => libc::S_IFDIR,
        NodeKind::File => libc::S_IFREG,
        NodeKind::Symlink => libc::S_IFLNK,
        NodeKind::Char => libc::S_IFCHR,
        NodeKind::Block => libc::S_IFBLK,
        NodeKind::Fifo => libc::S_IFIFO,
    };
    t | u32::from(n.perm)
}

fn attr(ino: u64, n: &Node) -> Attr {
    Attr {
        ino,
        size: n.size,
        blocks: n.size.div_ceil(512),
        time: n.mtime,
        mode: mode(n),
        nlink: n.nlink,
        uid: n.uid,
        gid: n.gid,
        rdev: n.rdev,
    }
}

/// Answer to a GETXATTR/LISTXATTR of `data` for a caller buffer of `size`.
fn xattr_reply(unique: u64, data: &[u8], size: u32) -> Vec<u8> {
    if size == 0 {
        let mut r = Reply::ok(unique);
        r.u32(data.len() as u32).u32(0);
        r.finish()
    } else if data.len() > size as usize {
        Reply::error(unique, libc::ERANGE)
    } else {
        let mut r = Reply::ok(unique);
        r.bytes(data);
        r.finish()
    }
}

impl LayerFs {
    /// Handles one request; replies through `ch` now or from a read task.
    fn dispatch(&self, buf: &[u8], ch: &Arc<Channel>) {
        let req = match Request::parse(buf) {
            Ok(r) => r,
            Err(_) => {
                error!(len = buf.len(), "malformed FUSE request: EIO");
                // Answer it if its id can be read, so its caller does not wait forever.
                if let Some(unique) = buf.get(8..16).and_then(|b| b.try_into().ok()) {
                    ch.send(&Reply::error(u64::from_le_bytes(unique), libc::EIO));
                }
                return;
            }
        };
        let unique = req.header.unique;
        if req.header.is_resend() {
            self.resent.fetch_add(1, Ordering::Relaxed);
            debug!(
                unique,
                opcode = req.header.opcode,
                "answering a request the kernel sent again (an earlier daemon took it)"
            );
        }
        let reply = match self.answer(&req, ch) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(errno) => Reply::error(unique, errno),
        };
        ch.send(&reply);
    }

    /// The reply to `req`, `None` if there is none now (no reply expected, or a read task
    /// answers later), or an errno.
    fn answer(&self, req: &Request, ch: &Arc<Channel>) -> Result<Option<Vec<u8>>, i32> {
        let h = req.header;
        let bad = |_| libc::EINVAL;
        let node = |ino: u64| self.tree.get(ino).ok_or(libc::ENOENT);
        let mut r = Reply::ok(h.unique);
        match h.opcode {
            op::INIT => return self.init(req).map(Some),
            op::LOOKUP => {
                let name = req.name().map_err(bad)?;
                let ino = self.tree.lookup(h.nodeid, name).ok_or(libc::ENOENT)?;
                r.entry(&attr(ino, node(ino)?), self.ttl);
            }
            op::GETATTR => {
                r.attr_out(&attr(h.nodeid, node(h.nodeid)?), self.ttl);
            }
            op::READLINK => {
                let n = node(h.nodeid)?;
                if n.kind != NodeKind::Symlink {
                    return Err(libc::EINVAL);
                }
                r.bytes(&n.link);
            }
            op::OPEN => {
                // Layer contents never change: let the kernel keep its page cache.
                let flags = match node(h.nodeid)?.kind {
                    NodeKind::File => kernel::FOPEN_KEEP_CACHE,
                    NodeKind::Dir => return Err(libc::EISDIR),
                    _ => 0,
                };
                r.u64(0).u32(flags).u32(0);
            }
            op::OPENDIR => {
                if node(h.nodeid)?.kind != NodeKind::Dir {
                    return Err(libc::ENOTDIR);
                }
                r.u64(0)
                    .u32(kernel::FOPEN_KEEP_CACHE | kernel::FOPEN_CACHE_DIR)
                    .u32(0);
            }
            op::READ => {
                let (offset, size) = req.read_args().map_err(bad)?;
                self.read(h.unique, h.nodeid, offset, size, ch)?;
                return Ok(None);
            }
            op::READDIR | op::READDIRPLUS => {
                let (offset, size) = req.read_args().map_err(bad)?;
                let n = node(h.nodeid)?;
                if n.kind != NodeKind::Dir {
                    return Err(libc::ENOTDIR);
                }
                let max = size as usize;
                let dots = [(h.nodeid, &b"."[..]), (n.parent, &b".."[..])];
                let children = n.children.iter().map(|(name, &c)| (c, name.as_slice()));
                for (i, (child, name)) in dots
                    .into_iter()
                    .chain(children)
                    .enumerate()
                    .skip(offset as usize)
                {
                    let Some(cn) = self.tree.get(child) else {
                        continue;
                    };
                    let a = attr(child, cn);
                    let off = (i + 1) as u64;
                    let fits = if h.opcode == op::READDIRPLUS {
                        r.direntplus(max, &a, off, name, self.ttl)
                    } else {
                        r.dirent(max, child, off, (a.mode & libc::S_IFMT) >> 12, name)
                    };
                    if !fits {
                        break;
                    }
                }
            }
            op::GETXATTR => {
                let (size, rest) = req.xattr_args().map_err(bad)?;
                let name = kernel::cstr(rest).map_err(bad)?;
                let v = node(h.nodeid)?.xattrs.get(name).ok_or(libc::ENODATA)?;
                return Ok(Some(xattr_reply(h.unique, v, size)));
            }
            op::LISTXATTR => {
                let (size, _) = req.xattr_args().map_err(bad)?;
                let mut list = Vec::new();
                for k in node(h.nodeid)?.xattrs.keys() {
                    list.extend_from_slice(k);
                    list.push(0);
                }
                return Ok(Some(xattr_reply(h.unique, &list, size)));
            }
            op::STATFS => {
                let blocks = self.tree.total_file_bytes.div_ceil(4096);
                r.u64(blocks)
                    .u64(0)
                    .u64(0)
                    .u64(self.tree.len() as u64)
                    .u64(0);
                r.u32(4096).u32(255).u32(4096).u32(0);
                r.bytes(&[0; 24]);
            }
            op::RELEASE | op::RELEASEDIR | op::FLUSH | op::DESTROY => {}
            // No reply expected; the tree is static, so lookup counts do not matter.
            op::FORGET | op::BATCH_FORGET | op::INTERRUPT => return Ok(None),
            _ => return Err(libc::ENOSYS),
        }
        Ok(Some(r.finish()))
    }

    fn init(&self, req: &Request) -> Result<Vec<u8>, i32> {
        let init = req.init_args().map_err(|_| libc::EINVAL)?;
        let (out, session) = init.negotiate(&INIT_WANTS).map_err(|v| {
            error!(
                major = v.major,
                minor = v.minor,
                "unsupported FUSE protocol version"
            );
            libc::EPROTO
        })?;
        let mut r = Reply::ok(req.header.unique);
        out.encode(&mut r);
        self.resend.store(session.resend, Ordering::Release);
        self.minor.store(session.minor, Ordering::Release);
        debug!(
            kernel_minor = init.minor,
            minor = session.minor,
            resend = session.resend,
            flags = out.flags,
            "FUSE session initialised"
        );
        Ok(r.finish())
    }

    fn read(
        &self,
        unique: u64,
        ino: u64,
        offset: u64,
        size: u32,
        ch: &Arc<Channel>,
    ) -> Result<(), i32> {
        let n = self.tree.get(ino).ok_or(libc::ENOENT)?;
        if n.kind != NodeKind::File {
            return Err(libc::EINVAL);
        }
        if offset >= n.size || size == 0 {
            ch.send(&Reply::ok(unique).finish());
            return Ok(());
        }
        let len = u64::from(size).min(n.size - offset);
        let range = n.offset + offset..n.offset + offset + len;
        let (spans, metrics, ch) = (self.spans.clone(), self.metrics.clone(), ch.clone());
        let inflight = InFlight::new(self.inflight.clone());
        let started = Instant::now();
        self.rt.spawn(async move {
            let _inflight = inflight;
            // Its own task, so that a panic still gets an answer: a READ left unanswered
            // blocks its caller and every reader of the page it fills.
            match tokio::spawn(async move { spans.read(range).await }).await {
                Ok(Ok(data)) => {
                    let header = Reply::header(unique, data.len());
                    ch.send_parts(&[std::io::IoSlice::new(&header), std::io::IoSlice::new(&data)]);
                }
                Ok(Err(e)) => {
                    metrics.read_errors.fetch_add(1, Ordering::Relaxed);
                    error!(ino, offset, error = %e, "read failed: EIO");
                    ch.send(&Reply::error(unique, libc::EIO));
                }
                // Cancelled: the runtime is shutting down; the kernel keeps the request for
                // the next daemon (FUSE_NOTIFY_RESEND).
                Err(e) if e.is_cancelled() => return,
                Err(e) => {
                    metrics.read_errors.fetch_add(1, Ordering::Relaxed);
                    error!(ino, offset, error = %e, "read task panicked: EIO");
                    ch.send(&Reply::error(unique, libc::EIO));
                }
            }
            metrics.observe_read(started.elapsed());
        });
        Ok(())
    }
}

/// One read handed to a task, counted until the task ends (however it ends).
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(count: Arc<AtomicUsize>) -> InFlight {
        count.fetch_add(1, Ordering::AcqRel);
        InFlight(count)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Reads and dispatches requests until the connection ends or `stop` becomes readable.
pub(crate) fn serve(fs: Arc<LayerFs>, ch: Arc<Channel>, stop: OwnedFd) {
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let mut fds = [
            PollFd::new(ch.fd.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return error!(error = %e, "poll on /dev/fuse failed"),
        }
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            return;
        }
        let rev = fds[0].revents().unwrap_or(PollFlags::empty());
        if !rev.contains(PollFlags::POLLIN) && !rev.is_empty() {
            return debug!(?rev, "FUSE connection closed");
        }
        match nix::unistd::read(&ch.fd, &mut buf) {
            Ok(n) => fs.dispatch(&buf[..n], &ch),
            Err(Errno::ENOENT) | Err(Errno::EINTR) | Err(Errno::EAGAIN) => continue,
            Err(Errno::ENODEV) => return debug!("FUSE filesystem unmounted"),
            Err(e) => return error!(error = %e, "reading /dev/fuse failed"),
        }
    }
}

#[cfg(test)]
#[path = "fuse_tests.rs"]
mod tests;
