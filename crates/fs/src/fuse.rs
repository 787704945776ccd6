//! The FUSE face of a layer: our own small server of the kernel protocol (see
//! [`crate::kernel`] for the wire format and why no FUSE library is used).
//!
//! [`LayerFs::dispatch`] decodes one request and calls the handler of its opcode; handlers
//! answer from the in-memory tree, or hand a READ to a tokio task that answers later, so the
//! reader thread never waits on the network. Every answer goes through a [`ReplySink`]: the
//! `/dev/fuse` [`Channel`] in production, a buffer in the tests. Mounting, resuming and
//! stopping a session are in [`crate::mount`].

use std::io::IoSlice;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;

use tokio::runtime::Handle;
use tracing::{debug, error, info, warn, Instrument};
use zerocopy::IntoBytes;

use crate::kernel::abi::{
    fuse_attr_out, fuse_dirent, fuse_entry_out, fuse_init_in, fuse_kstatfs, fuse_open_out,
    fuse_read_in, fuse_statfs_out,
};
use crate::kernel::{self, op, out_header, DirBuf, Operation, Reply, ReplySink, Request, Session};
use crate::metrics::{count_fuse_failure, FuseOp};
use crate::mount::{CacheTimeouts, Served};
use crate::passthrough::{BackingFiles, Passthrough, PASSTHROUGH_FH};
use crate::spans::{FsMetrics, SpanManager};
use crate::tree::{LayerTree, Node, NodeKind};

mod attrs;
mod backing;
mod channel;
mod state;
use attrs::{attr, xattr_reply};
pub(crate) use channel::{serve, Channel};
pub(crate) use state::{InFlight, SessionState};

/// Largest read we let the kernel ask for (with `FUSE_MAX_PAGES`).
const MAX_PAGES: u16 = 256;
/// `max_write` we announce; the request buffer must hold it plus headers.
pub const MAX_WRITE: u32 = 128 * 1024;
pub(crate) const BUF_SIZE: usize = MAX_WRITE as usize + 4096;
/// What we ask of the kernel at INIT (plus `FUSE_PASSTHROUGH` in `flags2` when the mount
/// has passthrough configured).
pub const INIT_WANTS: kernel::InitWants = kernel::InitWants {
    flags: kernel::init::ASYNC_READ
        | kernel::init::DO_READDIRPLUS
        | kernel::init::READDIRPLUS_AUTO
        | kernel::init::PARALLEL_DIROPS
        | kernel::init::MAX_PAGES
        | kernel::init::CACHE_SYMLINKS,
    flags2: 0,
    max_background: 16,
    congestion_threshold: 12,
    max_write: MAX_WRITE,
    max_pages: MAX_PAGES,
};

/// Sends one finished reply.
fn send(sink: &dyn ReplySink, reply: &[u8]) {
    sink.send(&[IoSlice::new(reply)]);
}

/// What a handler did with its request.
enum Answer {
    /// This reply, to be sent now.
    Now(Vec<u8>),
    /// A task answers later (READ), or the kernel expects no answer (FORGET, INTERRUPT).
    Nothing,
}

type Handled = Result<Answer, i32>;

/// A layer filesystem: answers FUSE requests from the tree and the span manager.
pub struct LayerFs {
    pub(crate) tree: Arc<LayerTree>,
    pub(crate) spans: Arc<SpanManager>,
    rt: Handle,
    pub(crate) timeouts: CacheTimeouts,
    metrics: Arc<FsMetrics>,
    /// Negotiated protocol state, and a wait for the INIT that sets it.
    pub(crate) session: SessionState,
    /// Reads handed to tokio and not answered yet.
    pub(crate) inflight: Arc<InFlight>,
    /// Requests received with the resend bit.
    pub(crate) resent: AtomicUsize,
    /// Passthrough state, if configured ([`crate::passthrough`]).
    pub(crate) passthrough: Option<Arc<Passthrough>>,
    /// Where backing files are registered: the connection, once serving (weak: the mount,
    /// not this filesystem, owns the descriptor).
    pub(crate) backing: OnceLock<Weak<dyn BackingFiles>>,
}

impl LayerFs {
    /// A filesystem serving `served` on a connection in state `session` (default: waiting
    /// for INIT).
    pub fn new(served: Served, session: Session) -> LayerFs {
        let passthrough = served.passthrough.and_then(|cfg| {
            let dir = cfg.dir.clone();
            match Passthrough::new(cfg, served.metrics.clone()) {
                Ok(p) => Some(Arc::new(p)),
                Err(e) => {
                    warn!(dir = %dir.display(), error = %e, "no passthrough directory: normal reads");
                    None
                }
            }
        });
        LayerFs {
            tree: served.tree,
            spans: served.spans,
            rt: served.rt,
            timeouts: served.timeouts,
            metrics: served.metrics,
            session: SessionState::new(session),
            inflight: Arc::new(InFlight::default()),
            resent: AtomicUsize::new(0),
            passthrough,
            backing: OnceLock::new(),
        }
    }

    /// Handles one request as read from `/dev/fuse`; replies through `sink` now, or from a
    /// read task later. Requests that expect no reply get none.
    pub fn dispatch(&self, buf: &[u8], sink: &Arc<dyn ReplySink>) {
        let req = match Request::parse(buf) {
            Ok(r) => r,
            Err(_) => return self.malformed(buf, &**sink),
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
        let expects_reply = req.op.expects_reply();
        match self.handle(&req, sink) {
            Ok(Answer::Now(reply)) => send(&**sink, &reply),
            Ok(Answer::Nothing) => {}
            Err(errno) => {
                self.count_failure(&req, errno);
                if expects_reply {
                    send(&**sink, &Reply::error(unique, errno))
                }
            }
        }
    }

    /// Counts an internal failure (EIO, or an inode the tree does not have) under upstream's
    /// `fuse_*_failure_count` names; ordinary answers (no such name, not a directory) are not
    /// failures, as upstream.
    fn count_failure(&self, req: &Request, errno: i32) {
        if errno == libc::ENOSYS || errno != libc::EIO && self.tree.get(req.header.nodeid).is_some()
        {
            return;
        }
        let what = match &req.op {
            Operation::Getattr { arg } => FuseOp::Getattr {
                with_handle: arg.getattr_flags & kernel::FUSE_GETATTR_FH != 0,
            },
            Operation::Listxattr { .. } => FuseOp::Listxattr,
            Operation::Lookup { .. } => FuseOp::Lookup,
            Operation::Open { .. } => FuseOp::Open,
            Operation::Readdir { .. } | Operation::Readdirplus { .. } => FuseOp::Readdir,
            Operation::Read { .. } => FuseOp::Read,
            Operation::Init { .. } | Operation::Forget { .. } | Operation::BatchForget { .. } => {
                return
            }
            _ => FuseOp::Other,
        };
        count_fuse_failure(&self.metrics.upstream, self.spans.layer(), what);
    }

    /// A request that cannot be decoded is answered EIO if its id can be read and its opcode
    /// expects a reply, so its caller does not wait forever.
    fn malformed(&self, buf: &[u8], sink: &dyn ReplySink) {
        error!(len = buf.len(), "malformed FUSE request: EIO");
        let word = |at: usize| buf.get(at..at + 4).and_then(|b| b.try_into().ok());
        let opcode = word(4).map(u32::from_ne_bytes);
        if matches!(
            opcode,
            Some(op::FORGET | op::BATCH_FORGET | op::INTERRUPT) | None
        ) {
            return;
        }
        if let Some(unique) = buf.get(8..16).and_then(|b| b.try_into().ok()) {
            send(sink, &Reply::error(u64::from_ne_bytes(unique), libc::EIO));
        }
    }

    /// One handler per opcode.
    fn handle(&self, req: &Request, sink: &Arc<dyn ReplySink>) -> Handled {
        let (unique, ino) = (req.header.unique, req.header.nodeid);
        let done = |r: Reply| Ok(Answer::Now(r.finish()));
        match &req.op {
            Operation::Init { arg } => self.init(unique, arg),
            Operation::Lookup { name } => self.lookup(unique, ino, name),
            Operation::Getattr { .. } => self.getattr(unique, ino),
            Operation::Readlink => self.readlink(unique, ino),
            Operation::Open { .. } => self.open(unique, ino),
            Operation::Opendir { .. } => self.opendir(unique, ino),
            Operation::Read { arg } => self.read(unique, ino, arg, sink),
            Operation::Readdir { arg } => self.readdir(unique, ino, arg, false),
            Operation::Readdirplus { arg } => self.readdir(unique, ino, arg, true),
            Operation::Getxattr { arg, name } => {
                let v = self.node(ino)?.xattrs.get(*name).ok_or(libc::ENODATA)?;
                xattr_reply(unique, v, arg.size)
            }
            Operation::Listxattr { arg } => {
                let mut list = Vec::new();
                for k in self.node(ino)?.xattrs.keys() {
                    list.extend_from_slice(k);
                    list.push(0);
                }
                xattr_reply(unique, &list, arg.size)
            }
            Operation::Statfs => self.statfs(unique),
            Operation::Release { arg } => {
                if let Some(p) = &self.passthrough {
                    p.release(ino, arg.fh);
                    self.materialize_if_local(ino);
                }
                done(Reply::ok(unique))
            }
            Operation::Releasedir { .. } | Operation::Flush { .. } | Operation::Destroy => {
                done(Reply::ok(unique))
            }
            // No reply expected; the tree is static, so lookup counts do not matter.
            Operation::Forget { .. }
            | Operation::BatchForget { .. }
            | Operation::Interrupt { .. } => Ok(Answer::Nothing),
            Operation::Unknown { .. } => Err(libc::ENOSYS),
        }
    }

    fn node(&self, ino: u64) -> Result<&Node, i32> {
        self.tree.get(ino).ok_or(libc::ENOENT)
    }

    fn entry_out(&self, ino: u64, n: &Node) -> fuse_entry_out {
        fuse_entry_out {
            nodeid: ino,
            generation: 0,
            entry_valid: self.timeouts.entry.as_secs(),
            attr_valid: self.timeouts.attr.as_secs(),
            entry_valid_nsec: self.timeouts.entry.subsec_nanos(),
            attr_valid_nsec: self.timeouts.attr.subsec_nanos(),
            attr: attr(ino, n),
        }
    }

    fn init(&self, unique: u64, arg: &fuse_init_in) -> Handled {
        let wants = kernel::InitWants {
            flags2: match &self.passthrough {
                Some(p) if p.enabled() => kernel::init2::PASSTHROUGH,
                _ => 0,
            },
            ..INIT_WANTS
        };
        let (out, session) = kernel::negotiate(arg, &wants).map_err(|v| {
            error!(
                major = v.major,
                minor = v.minor,
                "unsupported FUSE protocol version"
            );
            libc::EPROTO
        })?;
        debug!(
            kernel_minor = arg.minor,
            minor = session.minor,
            resend = session.resend,
            flags = out.flags,
            "FUSE session initialised"
        );
        if let Some(p) = &self.passthrough {
            let granted = out.flags2 & kernel::init2::PASSTHROUGH != 0;
            if !granted && p.enabled() {
                info!(
                    kernel_minor = arg.minor,
                    "the kernel offers no FUSE passthrough (needs 6.9+): normal reads"
                );
            }
            p.start(granted);
        }
        let reply = Reply::with(unique, &out).finish();
        // Recorded before the reply goes out: whoever waits for INIT sees the session.
        self.session.set(session);
        Ok(Answer::Now(reply))
    }

    fn lookup(&self, unique: u64, parent: u64, name: &[u8]) -> Handled {
        let p = self.node(parent)?;
        if p.kind != NodeKind::Dir {
            return Err(libc::ENOTDIR);
        }
        let Some(ino) = p.children.get(name) else {
            let neg = self.timeouts.negative;
            if neg.is_zero() {
                return Err(libc::ENOENT);
            }
            // Node id 0: "no such name", which the kernel caches for entry_valid.
            let out = fuse_entry_out {
                entry_valid: neg.as_secs(),
                entry_valid_nsec: neg.subsec_nanos(),
                ..Default::default()
            };
            return Ok(Answer::Now(Reply::with(unique, &out).finish()));
        };
        let out = self.entry_out(ino, self.node(ino)?);
        Ok(Answer::Now(Reply::with(unique, &out).finish()))
    }

    fn getattr(&self, unique: u64, ino: u64) -> Handled {
        let out = fuse_attr_out {
            attr_valid: self.timeouts.attr.as_secs(),
            attr_valid_nsec: self.timeouts.attr.subsec_nanos(),
            dummy: 0,
            attr: attr(ino, self.node(ino)?),
        };
        Ok(Answer::Now(Reply::with(unique, &out).finish()))
    }

    fn readlink(&self, unique: u64, ino: u64) -> Handled {
        let n = self.node(ino)?;
        if n.kind != NodeKind::Symlink {
            return Err(libc::EINVAL);
        }
        let mut r = Reply::ok(unique);
        r.bytes(&n.link);
        Ok(Answer::Now(r.finish()))
    }

    fn open(&self, unique: u64, ino: u64) -> Handled {
        let n = self.node(ino)?;
        if let (NodeKind::File, Some(p)) = (n.kind, &self.passthrough) {
            let backing = self.backing.get().and_then(Weak::upgrade);
            if let Some(id) = p.open(ino, (n.offset, n.size), backing.as_deref()) {
                // Its reads will not reach us: the demand record gets the whole file now.
                self.spans.note_demand(&(n.offset..n.offset + n.size));
                // Not KEEP_CACHE: the kernel refuses it with passthrough. NOFLUSH: reads
                // do not need the daemon, closes should not either.
                let out = fuse_open_out {
                    fh: PASSTHROUGH_FH | u64::from(id),
                    open_flags: kernel::FOPEN_PASSTHROUGH | kernel::FOPEN_NOFLUSH,
                    backing_id: id as i32,
                };
                return Ok(Answer::Now(Reply::with(unique, &out).finish()));
            }
            self.materialize_if_local(ino);
        }
        // Layer contents never change: let the kernel keep its page cache.
        let open_flags = match n.kind {
            NodeKind::File => kernel::FOPEN_KEEP_CACHE,
            NodeKind::Dir => return Err(libc::EISDIR),
            _ => 0,
        };
        let out = fuse_open_out {
            open_flags,
            ..Default::default()
        };
        Ok(Answer::Now(Reply::with(unique, &out).finish()))
    }

    fn opendir(&self, unique: u64, ino: u64) -> Handled {
        if self.node(ino)?.kind != NodeKind::Dir {
            return Err(libc::ENOTDIR);
        }
        let out = fuse_open_out {
            open_flags: kernel::FOPEN_KEEP_CACHE | kernel::FOPEN_CACHE_DIR,
            ..Default::default()
        };
        Ok(Answer::Now(Reply::with(unique, &out).finish()))
    }

    /// READDIR(PLUS): entry `i` of `.`, `..`, then the children in name order carries offset
    /// `i + 1`; a request at offset `o` starts at entry `o`, found by index (the tree's
    /// [`crate::Children`] is a sorted slice), not by walking the entries before it.
    fn readdir(&self, unique: u64, ino: u64, arg: &fuse_read_in, plus: bool) -> Handled {
        let n = self.node(ino)?;
        if n.kind != NodeKind::Dir {
            return Err(libc::ENOTDIR);
        }
        let mut buf = DirBuf::new(unique, arg.size as usize);
        // Offsets past the end (the kernel passes back what we gave, but a fuzzer need not)
        // list nothing; below the end, entry numbers cannot overflow.
        let start = match usize::try_from(arg.offset) {
            Ok(s) if s < 2 + n.children.len() => s,
            _ => return Ok(Answer::Now(buf.finish())),
        };
        let dots = [(&b"."[..], ino), (&b".."[..], n.parent)];
        let entries = dots
            .into_iter()
            .skip(start)
            .chain(n.children.from_index(start.saturating_sub(2)));
        for (i, (name, child)) in (start..).zip(entries) {
            let Some(cn) = self.tree.get(child) else {
                continue;
            };
            let a = attr(child, cn);
            let d = fuse_dirent {
                ino: child,
                off: i as u64 + 1,
                namelen: 0,
                r#type: (a.mode & libc::S_IFMT) >> 12,
            };
            let fits = if plus {
                buf.direntplus(self.entry_out(child, cn), d, name)
            } else {
                buf.dirent(d, name)
            };
            if !fits {
                break;
            }
        }
        Ok(Answer::Now(buf.finish()))
    }

    fn statfs(&self, unique: u64) -> Handled {
        let out = fuse_statfs_out {
            st: fuse_kstatfs {
                blocks: self.tree.total_file_bytes.div_ceil(4096),
                files: self.tree.len() as u64,
                bsize: 4096,
                namelen: 255,
                frsize: 4096,
                ..Default::default()
            },
        };
        Ok(Answer::Now(Reply::with(unique, &out).finish()))
    }

    fn read(
        &self,
        unique: u64,
        ino: u64,
        arg: &fuse_read_in,
        sink: &Arc<dyn ReplySink>,
    ) -> Handled {
        let n = self.node(ino)?;
        match n.kind {
            NodeKind::File => {}
            NodeKind::Dir => return Err(libc::EISDIR),
            _ => return Err(libc::EINVAL),
        }
        let (offset, size) = (arg.offset, arg.size);
        if offset >= n.size || size == 0 {
            return Ok(Answer::Now(Reply::ok(unique).finish()));
        }
        let len = u64::from(size).min(n.size - offset);
        let range = n.offset + offset..n.offset + offset + len;
        self.spans.note_demand(&range);
        let file = n.offset..n.offset + n.size;
        let (spans, metrics, sink) = (self.spans.clone(), self.metrics.clone(), sink.clone());
        let inflight = self.inflight.enter();
        let started = Instant::now();
        self.rt.spawn(async move {
            let _inflight = inflight;
            // Its own task, so that a panic still gets an answer: a READ left unanswered
            // blocks its caller and every reader of the page it fills.
            let span = tracing::debug_span!("fuse_read", ino, offset, len);
            match tokio::spawn(
                async move { spans.read_in_file(range, file).await }.instrument(span),
            )
            .await
            {
                Ok(Ok(data)) => {
                    let header = out_header(unique, 0, data.len());
                    sink.send(&[IoSlice::new(header.as_bytes()), IoSlice::new(&data)]);
                }
                Ok(Err(e)) => {
                    metrics.read_errors.fetch_add(1, Ordering::Relaxed);
                    error!(ino, offset, error = %e, "read failed: EIO");
                    send(&*sink, &Reply::error(unique, libc::EIO));
                }
                // Cancelled: the runtime is shutting down; the kernel keeps the request for
                // the next daemon (FUSE_NOTIFY_RESEND).
                Err(e) if e.is_cancelled() => return,
                Err(e) => {
                    metrics.read_errors.fetch_add(1, Ordering::Relaxed);
                    error!(ino, offset, error = %e, "read task panicked: EIO");
                    send(&*sink, &Reply::error(unique, libc::EIO));
                }
            }
            metrics.observe_read(started.elapsed());
        });
        Ok(Answer::Nothing)
    }
}

#[cfg(test)]
#[path = "fuse_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "fuse_ops_tests.rs"]
mod ops_tests;

#[cfg(test)]
#[path = "fuse_passthrough_tests.rs"]
mod passthrough_tests;
