//! The FUSE face of a layer: our own small server of the kernel protocol (see [`crate::kernel`]).
//!
//! We speak the protocol ourselves rather than through a FUSE library because a session must
//! be able to *resume*: a later daemon process takes over an already initialised `/dev/fuse`
//! connection (kept open by the fd holder across the restart) and goes on answering requests
//! without an INIT handshake, so running containers keep reading their files.
//!
//! One thread per mount reads requests; metadata is answered from memory on that thread, reads
//! are handed to tokio tasks so the loop never waits on the network.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use tokio::runtime::Handle;
use tracing::{debug, error, info, warn};

use crate::kernel::{self, op, Attr, Reply, Request, Session};
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
struct Channel {
    fd: OwnedFd,
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
struct LayerFs {
    tree: Arc<LayerTree>,
    spans: Arc<SpanManager>,
    rt: Handle,
    ttl: Duration,
    metrics: Arc<FsMetrics>,
    /// Negotiated protocol minor version (0 until INIT).
    minor: AtomicU32,
    /// Whether the kernel can resend requests taken but not answered (set at INIT).
    resend: AtomicBool,
    /// Reads handed to tokio and not answered yet.
    inflight: Arc<AtomicUsize>,
    /// Requests received with the resend bit.
    resent: AtomicUsize,
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
            Err(_) => return error!(len = buf.len(), "malformed FUSE request ignored"),
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
        let inflight = self.inflight.clone();
        inflight.fetch_add(1, Ordering::AcqRel);
        let started = Instant::now();
        self.rt.spawn(async move {
            match spans.read(range).await {
                Ok(data) => {
                    let header = Reply::header(unique, data.len());
                    ch.send_parts(&[std::io::IoSlice::new(&header), std::io::IoSlice::new(&data)]);
                }
                Err(e) => {
                    metrics.read_errors.fetch_add(1, Ordering::Relaxed);
                    error!(ino, offset, error = %e, "read failed: EIO");
                    ch.send(&Reply::error(unique, libc::EIO));
                }
            }
            metrics.observe_read(started.elapsed());
            inflight.fetch_sub(1, Ordering::AcqRel);
        });
        Ok(())
    }
}

/// Reads and dispatches requests until the connection ends or `stop` becomes readable.
fn serve(fs: Arc<LayerFs>, ch: Arc<Channel>, stop: OwnedFd) {
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

/// A served layer mount. Dropping it unmounts; [`MountedLayer::detach`] leaves the mount and
/// its connection to whoever else holds the `/dev/fuse` descriptor.
pub struct MountedLayer {
    fs: Arc<LayerFs>,
    ch: Arc<Channel>,
    mountpoint: PathBuf,
    stop: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl MountedLayer {
    /// The layer's span manager (for background fetch and stats).
    pub fn spans(&self) -> &Arc<SpanManager> {
        &self.fs.spans
    }

    /// The `/dev/fuse` descriptor of the mount (to hand to an fd holder).
    pub fn fuse_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.ch.fd.as_fd()
    }

    /// Negotiated FUSE protocol minor version.
    pub fn proto_minor(&self) -> u32 {
        self.fs.minor.load(Ordering::Acquire)
    }

    /// The connection's protocol state, for the fd holder to give the next daemon.
    pub fn session(&self) -> Session {
        Session {
            minor: self.proto_minor(),
            resend: self.fs.resend.load(Ordering::Acquire),
        }
    }

    /// Requests answered that the kernel had sent again (taken by an earlier daemon).
    pub fn resent_requests(&self) -> usize {
        self.fs.resent.load(Ordering::Relaxed)
    }

    /// Stops reading requests and joins the session thread.
    fn stop_loop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // Closing the write end would also wake the loop; writing is explicit.
            let _ = nix::unistd::write(&stop, &[1]);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Unmounts (lazily if busy) and ends the connection.
    pub fn unmount(mut self) -> std::io::Result<()> {
        self.do_unmount()
    }

    fn do_unmount(&mut self) -> std::io::Result<()> {
        let r = match nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::empty()) {
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
            Err(Errno::EBUSY) => {
                warn!(mountpoint = %self.mountpoint.display(), "layer busy; detaching it");
                nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH)
                    .map_err(std::io::Error::from)
            }
            Err(e) => Err(e.into()),
        };
        self.fs.spans.close();
        self.stop_loop();
        r
    }

    /// Stops serving but leaves the mount in place: answers the reads in flight (waiting at
    /// most `wait`), then lets go of this process's descriptor. Requests that arrive later
    /// wait in the kernel for whoever holds the connection next ([`resume`]).
    pub fn detach(mut self, wait: Duration) {
        self.stop_loop();
        let deadline = Instant::now() + wait;
        while self.fs.inflight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.fs.spans.close();
        // Nothing left to do on drop.
        self.mountpoint = PathBuf::new();
    }
}

impl Drop for MountedLayer {
    fn drop(&mut self) {
        if self.mountpoint.as_os_str().is_empty() {
            return;
        }
        if let Err(e) = self.do_unmount() {
            warn!(mountpoint = %self.mountpoint.display(), error = %e, "unmounting layer failed");
        }
    }
}

/// What serves a layer: its tree, spans and where reads run.
pub struct Served {
    /// Inodes.
    pub tree: Arc<LayerTree>,
    /// Span fetching and caching.
    pub spans: Arc<SpanManager>,
    /// Runtime the read tasks run on.
    pub rt: Handle,
    /// Entry and attribute cache timeout.
    pub ttl: Duration,
    /// Counters.
    pub metrics: Arc<FsMetrics>,
}

fn start(
    served: Served,
    fd: OwnedFd,
    mountpoint: &Path,
    session: Session,
) -> std::io::Result<MountedLayer> {
    let fs = Arc::new(LayerFs {
        tree: served.tree,
        spans: served.spans,
        rt: served.rt,
        ttl: served.ttl,
        metrics: served.metrics,
        minor: AtomicU32::new(session.minor),
        resend: AtomicBool::new(session.resend),
        inflight: Arc::new(AtomicUsize::new(0)),
        resent: AtomicUsize::new(0),
    });
    let ch = Arc::new(Channel { fd });
    let (stop_r, stop_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (fs2, ch2) = (fs.clone(), ch.clone());
    let thread = std::thread::Builder::new()
        .name("soci-fuse".into())
        .spawn(move || serve(fs2, ch2, stop_r))?;
    Ok(MountedLayer {
        fs,
        ch,
        mountpoint: mountpoint.to_path_buf(),
        stop: Some(stop_w),
        thread: Some(thread),
    })
}

/// Mounts a layer at `mountpoint` (read-only, `allow_other`, `default_permissions`, devices
/// and setuid allowed as in an image) and serves it; returns once the kernel's INIT is
/// answered.
pub fn mount(served: Served, mountpoint: &Path) -> std::io::Result<MountedLayer> {
    let fd: OwnedFd = nix::fcntl::open(
        "/dev/fuse",
        OFlag::O_RDWR | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| std::io::Error::other(format!("opening /dev/fuse: {e}")))?;
    let opts = format!(
        "fd={},rootmode=40000,user_id={},group_id={},default_permissions,allow_other",
        fd.as_raw_fd(),
        nix::unistd::geteuid(),
        nix::unistd::getegid()
    );
    nix::mount::mount(
        Some("soci"),
        mountpoint,
        Some("fuse.soci"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(opts.as_str()),
    )?;
    let m = start(served, fd, mountpoint, Session::default())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while m.proto_minor() == 0 {
        if Instant::now() > deadline {
            drop(m);
            return Err(std::io::Error::other("the kernel sent no FUSE INIT"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(m)
}

/// Serves an already mounted and initialised FUSE connection `fd` (protocol state `session`)
/// at `mountpoint`, as taken over from an earlier daemon process.
///
/// The earlier daemon may have died (kill -9) holding requests it had read and not
/// answered: the kernel keeps them as "being processed" forever, their callers wait, and the
/// page cache pages they fill stay locked for every later reader. Once our reader runs we
/// send `FUSE_NOTIFY_RESEND`, which puts them back in the queue (ids marked with
/// [`kernel::UNIQUE_RESEND`]) and we answer them like any request. Without resend support
/// (kernel before 7.40, or a connection set up by a daemon that did not record it) they stay
/// stuck; that is logged once for the mount.
pub fn resume(
    served: Served,
    fd: OwnedFd,
    session: Session,
    mountpoint: &Path,
) -> std::io::Result<MountedLayer> {
    if session.minor < kernel::MIN_MINOR {
        return Err(std::io::Error::other(format!(
            "FUSE protocol 7.{} of the held connection at {} is not supported",
            session.minor,
            mountpoint.display()
        )));
    }
    let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)?;
    nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )?;
    let m = start(served, fd, mountpoint, session)?;
    if session.resend {
        // The reader thread runs: whatever the kernel queues again is read and answered.
        match nix::unistd::write(&m.ch.fd, &kernel::notify_resend()) {
            Ok(_) => info!(
                mountpoint = %mountpoint.display(),
                "asked the kernel to resend FUSE requests the previous daemon left unanswered"
            ),
            Err(e) => warn!(
                mountpoint = %mountpoint.display(),
                error = %e,
                "FUSE_NOTIFY_RESEND refused: reads the previous daemon took may stay blocked"
            ),
        }
    } else {
        warn!(
            mountpoint = %mountpoint.display(),
            minor = session.minor,
            "FUSE connection without resend support (kernel before 7.40, or set up by an older \
             daemon): reads the previous daemon took and did not answer stay blocked until \
             the layer is unmounted"
        );
    }
    Ok(m)
}

#[cfg(test)]
#[path = "fuse_tests.rs"]
mod tests;
