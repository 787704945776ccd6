//! The FUSE face of a layer. Metadata is answered from memory on the session thread; reads
//! are handed to tokio tasks so the session loop never waits on the network.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyXattr, Request,
};
use tokio::runtime::Handle;

use crate::spans::{FsMetrics, SpanManager};
use crate::tree::{LayerTree, Node, NodeKind};

/// A mounted-to-be layer filesystem.
pub struct LayerFs {
    tree: Arc<LayerTree>,
    spans: Arc<SpanManager>,
    rt: Handle,
    ttl: Duration,
    metrics: Arc<FsMetrics>,
}

impl LayerFs {
    /// A filesystem over `tree` whose reads go through `spans` on runtime `rt`.
    pub fn new(
        tree: Arc<LayerTree>,
        spans: Arc<SpanManager>,
        rt: Handle,
        ttl: Duration,
        metrics: Arc<FsMetrics>,
    ) -> Self {
        LayerFs {
            tree,
            spans,
            rt,
            ttl,
            metrics,
        }
    }
}

fn time(t: (i64, u32)) -> SystemTime {
    if t.0 >= 0 {
        UNIX_EPOCH + Duration::new(t.0 as u64, t.1)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.0.unsigned_abs()) + Duration::from_nanos(u64::from(t.1))
    }
}

fn kind(k: NodeKind) -> FileType {
    match k {
        NodeKind::Dir => FileType::Directory,
        NodeKind::File => FileType::RegularFile,
        NodeKind::Symlink => FileType::Symlink,
        NodeKind::Char => FileType::CharDevice,
        NodeKind::Block => FileType::BlockDevice,
        NodeKind::Fifo => FileType::NamedPipe,
    }
}

fn attr(ino: u64, n: &Node) -> FileAttr {
    let t = time(n.mtime);
    FileAttr {
        ino: INodeNo(ino),
        size: n.size,
        blocks: n.size.div_ceil(512),
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: kind(n.kind),
        perm: n.perm,
        nlink: n.nlink,
        uid: n.uid,
        gid: n.gid,
        rdev: n.rdev,
        blksize: 4096,
        flags: 0,
    }
}

fn xattr_reply(reply: ReplyXattr, data: &[u8], size: u32) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if data.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

impl Filesystem for LayerFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self
            .tree
            .lookup(parent.0, name.as_bytes())
            .and_then(|i| Some((i, self.tree.get(i)?)))
        {
            Some((ino, n)) => reply.entry(&self.ttl, &attr(ino, n), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.tree.get(ino.0) {
            Some(n) => reply.attr(&self.ttl, &attr(ino.0, n)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.tree.get(ino.0) {
            Some(n) if n.kind == NodeKind::Symlink => reply.data(&n.link),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.tree.get(ino.0) {
            // Layer contents never change: let the kernel keep its page cache.
            Some(n) if n.kind == NodeKind::File => {
                reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
            }
            Some(n) if n.kind == NodeKind::Dir => reply.error(Errno::EISDIR),
            Some(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(n) = self.tree.get(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if n.kind != NodeKind::File {
            return reply.error(Errno::EINVAL);
        }
        if offset >= n.size || size == 0 {
            return reply.data(&[]);
        }
        let len = u64::from(size).min(n.size - offset);
        let range = n.offset + offset..n.offset + offset + len;
        let spans = self.spans.clone();
        let metrics = self.metrics.clone();
        let started = Instant::now();
        self.rt.spawn(async move {
            match spans.read(range).await {
                Ok(data) => reply.data(&data),
                Err(e) => {
                    metrics
                        .read_errors
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::error!(ino = ino.0, offset, error = %e, "read failed: EIO");
                    reply.error(Errno::EIO)
                }
            }
            metrics.observe_read(started.elapsed());
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(n) = self.tree.get(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if n.kind != NodeKind::Dir {
            return reply.error(Errno::ENOTDIR);
        }
        let dots = [
            (ino.0, FileType::Directory, &b"."[..]),
            (n.parent, FileType::Directory, &b".."[..]),
        ];
        let children = n
            .children
            .iter()
            .filter_map(|(name, &c)| Some((c, kind(self.tree.get(c)?.kind), name.as_slice())));
        for (i, (child, ft, name)) in dots
            .into_iter()
            .chain(children)
            .enumerate()
            .skip(offset as usize)
        {
            if reply.add(INodeNo(child), (i + 1) as u64, ft, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let Some(n) = self.tree.get(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if n.kind != NodeKind::Dir {
            return reply.error(Errno::ENOTDIR);
        }
        let dots = [(ino.0, &b"."[..]), (n.parent, &b".."[..])];
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
            if reply.add(
                INodeNo(child),
                (i + 1) as u64,
                OsStr::from_bytes(name),
                &self.ttl,
                &attr(child, cn),
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.tree.get(ino.0) {
            Some(n) => match n.xattrs.get(name.as_bytes()) {
                Some(v) => xattr_reply(reply, v, size),
                None => reply.error(Errno::ENODATA),
            },
            None => reply.error(Errno::ENOENT),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.tree.get(ino.0) {
            Some(n) => {
                let mut buf = Vec::new();
                for k in n.xattrs.keys() {
                    buf.extend_from_slice(k);
                    buf.push(0);
                }
                xattr_reply(reply, &buf, size)
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.tree.total_file_bytes.div_ceil(4096);
        reply.statfs(blocks, 0, 0, self.tree.len() as u64, 0, 4096, 255, 4096);
    }
}
