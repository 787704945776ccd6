//! Table tests of the dispatcher, one opcode at a time, with replies collected in a buffer
//! sink (no `/dev/fuse`, no root).

use std::future::Future;
use std::io::IoSlice;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;
use zerocopy::{FromBytes, IntoBytes};

use super::{LayerFs, MAX_WRITE};
use crate::kernel::abi::*;
use crate::kernel::test_util::request;
use crate::kernel::{init, op, ReplySink, Session};
use crate::mount::Served;
use crate::spans::{FsMetrics, RangeReader, SpanCache, SpanConfig, SpanManager};
use crate::tree::{LayerTree, ROOT_INO};

/// Replies in the order sent, and a wait for the next one.
#[derive(Default)]
pub(crate) struct VecSink {
    replies: Mutex<Vec<Vec<u8>>>,
    sent: Condvar,
}

impl ReplySink for VecSink {
    fn send(&self, parts: &[IoSlice<'_>]) {
        let msg: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        self.replies.lock().unwrap().push(msg);
        self.sent.notify_all();
    }
}

impl VecSink {
    /// Takes every reply sent so far, waiting up to 5 s until there are `n`.
    pub(crate) fn take(&self, n: usize) -> Vec<Vec<u8>> {
        let g = self.replies.lock().unwrap();
        let (mut g, _) = self
            .sent
            .wait_timeout_while(g, Duration::from_secs(5), |r| r.len() < n)
            .unwrap();
        std::mem::take(&mut *g)
    }
}

struct Blob(Vec<u8>);

impl RangeReader for Blob {
    fn read_range(
        &self,
        range: Range<u64>,
        _deadline: tokio::time::Instant,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Bytes>> + Send + '_>> {
        let data = self.0[range.start as usize..range.end as usize].to_vec();
        Box::pin(async move { Ok(Bytes::from(data)) })
    }
}

/// Names of the entries of directory `d` in the fixture.
pub(crate) fn dir_names() -> Vec<String> {
    (0..40).map(|i| format!("entry-{i:02}")).collect()
}

/// A small layer: `f` (100 kB), `l -> f`, `d/` with 40 files, opaque `o/`, whiteout `gone`.
pub(crate) fn fixture(rt: &tokio::runtime::Runtime, dir: &std::path::Path) -> (LayerFs, Vec<u8>) {
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 13 + i / 7) as u8).collect();
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, typ: tar::EntryType, body: &[u8], link: Option<&str>| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(typ);
        h.set_size(body.len() as u64);
        h.set_mode(if typ == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        b.append_data(&mut h, name, body).unwrap();
    };
    add("f", tar::EntryType::Regular, &data, None);
    add("l", tar::EntryType::Symlink, b"", Some("f"));
    add("d/", tar::EntryType::Directory, b"", None);
    for n in dir_names() {
        add(&format!("d/{n}"), tar::EntryType::Regular, b"x", None);
    }
    add("o/", tar::EntryType::Directory, b"", None);
    add("o/.wh..wh..opq", tar::EntryType::Regular, b"", None);
    add(".wh.gone", tar::EntryType::Regular, b"", None);
    let blob = b.into_inner().unwrap();
    let z = soci_ztoc::build(blob.as_slice(), &soci_ztoc::BuildOptions::default()).unwrap();
    let metrics = Arc::new(FsMetrics::default());
    let cfg = SpanConfig {
        cache_dir: dir.join("cache"),
        disable_verification: false,
        max_verification_retries: 0,
        fetch_timeout: Duration::from_secs(5),
        poisoned_ttl: crate::cache::POISONED_SPAN_TTL,
        cache: SpanCache::new(1 << 20, 0),
        read_ahead_spans: 0,
    };
    let spans = SpanManager::new(
        "sha256:fixture".into(),
        z.spans().unwrap(),
        Arc::new(Blob(blob)),
        cfg,
        metrics.clone(),
    )
    .unwrap();
    let served = Served {
        tree: Arc::new(LayerTree::build(&z).unwrap()),
        spans,
        rt: rt.handle().clone(),
        timeouts: crate::CacheTimeouts {
            entry: Duration::from_secs(3),
            attr: Duration::from_secs(2),
            negative: Duration::ZERO,
        },
        metrics,
        passthrough: None,
    };
    (LayerFs::new(served, Session::default()), data)
}

struct Env {
    fs: LayerFs,
    sink: Arc<VecSink>,
    data: Vec<u8>,
    _rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (fs, data) = fixture(&rt, dir.path());
        Env {
            fs,
            sink: Arc::new(VecSink::default()),
            data,
            _rt: rt,
            _dir: dir,
        }
    }

    fn ino(&self, parent: u64, name: &str) -> u64 {
        self.fs.tree.lookup(parent, name.as_bytes()).unwrap()
    }

    /// Sends one request; its one reply as (error, payload), or None if none came.
    fn call(&self, opcode: u32, nodeid: u64, args: &[u8]) -> Option<(i32, Vec<u8>)> {
        let sink: Arc<dyn ReplySink> = self.sink.clone();
        self.fs.dispatch(&request(opcode, 77, nodeid, args), &sink);
        // Replies are sent before dispatch returns, except READ's (from a task).
        let wait = if opcode == op::READ { 1 } else { 0 };
        let mut r = self.sink.take(wait);
        assert!(r.len() <= 1, "at most one reply per request");
        let r = r.pop()?;
        let (h, payload) = fuse_out_header::read_from_prefix(&r).unwrap();
        assert_eq!(
            (h.len as usize, h.unique),
            (r.len(), 77),
            "header of {opcode}"
        );
        Some((h.error, payload.to_vec()))
    }

    fn ok(&self, opcode: u32, nodeid: u64, args: &[u8]) -> Vec<u8> {
        match self.call(opcode, nodeid, args) {
            Some((0, p)) => p,
            other => panic!("opcode {opcode} on {nodeid}: {other:?}"),
        }
    }

    fn errno(&self, opcode: u32, nodeid: u64, args: &[u8]) -> i32 {
        match self.call(opcode, nodeid, args) {
            Some((e, _)) if e < 0 => -e,
            other => panic!("opcode {opcode} on {nodeid}: expected an error, got {other:?}"),
        }
    }
}

fn read_in(offset: u64, size: u32) -> Vec<u8> {
    fuse_read_in {
        offset,
        size,
        ..Default::default()
    }
    .as_bytes()
    .to_vec()
}

fn xattr_in(size: u32, name: Option<&str>) -> Vec<u8> {
    let mut b = fuse_getxattr_in { size, padding: 0 }.as_bytes().to_vec();
    if let Some(n) = name {
        b.extend_from_slice(n.as_bytes());
        b.push(0);
    }
    b
}

#[test]
fn errors_per_opcode() {
    let e = Env::new();
    let (f, d, l) = (
        e.ino(ROOT_INO, "f"),
        e.ino(ROOT_INO, "d"),
        e.ino(ROOT_INO, "l"),
    );
    let open = fuse_open_in::default();
    let cases: &[(&str, u32, u64, Vec<u8>, i32)] = &[
        (
            "lookup missing",
            op::LOOKUP,
            ROOT_INO,
            b"nope\0".to_vec(),
            libc::ENOENT,
        ),
        (
            "lookup whited out",
            op::LOOKUP,
            ROOT_INO,
            b".wh.gone\0".to_vec(),
            libc::ENOENT,
        ),
        (
            "lookup under a file",
            op::LOOKUP,
            f,
            b"x\0".to_vec(),
            libc::ENOTDIR,
        ),
        (
            "getattr of no inode",
            op::GETATTR,
            9999,
            vec![0; 16],
            libc::ENOENT,
        ),
        (
            "getattr of inode 0",
            op::GETATTR,
            0,
            vec![0; 16],
            libc::ENOENT,
        ),
        ("readlink of a file", op::READLINK, f, vec![], libc::EINVAL),
        (
            "open a directory",
            op::OPEN,
            d,
            open.as_bytes().to_vec(),
            libc::EISDIR,
        ),
        (
            "opendir a file",
            op::OPENDIR,
            f,
            open.as_bytes().to_vec(),
            libc::ENOTDIR,
        ),
        (
            "readdir a file",
            op::READDIR,
            f,
            read_in(0, 4096),
            libc::ENOTDIR,
        ),
        (
            "readdirplus a symlink",
            op::READDIRPLUS,
            l,
            read_in(0, 4096),
            libc::ENOTDIR,
        ),
        (
            "read a directory",
            op::READ,
            d,
            read_in(0, 4096),
            libc::EISDIR,
        ),
        (
            "read a symlink",
            op::READ,
            l,
            read_in(0, 4096),
            libc::EINVAL,
        ),
        (
            "getxattr missing",
            op::GETXATTR,
            f,
            xattr_in(0, Some("user.x")),
            libc::ENODATA,
        ),
        ("unknown opcode", 4242, ROOT_INO, vec![], libc::ENOSYS),
        ("SETATTR (read-only fs)", 4, f, vec![0; 88], libc::ENOSYS),
        ("short read args", op::READ, f, vec![0; 8], libc::EIO),
        (
            "lookup name without NUL",
            op::LOOKUP,
            ROOT_INO,
            b"f".to_vec(),
            libc::EIO,
        ),
    ];
    for (what, opcode, ino, args, errno) in cases {
        assert_eq!(e.errno(*opcode, *ino, args), *errno, "{what}");
    }
}

#[test]
fn missing_names_are_negative_entries_when_a_negative_timeout_is_set() {
    let mut e = Env::new();
    e.fs.timeouts.negative = Duration::from_millis(1500);
    for name in [&b"nope\0"[..], b".wh.gone\0"] {
        let p = e.ok(op::LOOKUP, ROOT_INO, name);
        let entry = fuse_entry_out::read_from_bytes(&p).unwrap();
        assert_eq!(
            (entry.nodeid, entry.entry_valid, entry.entry_valid_nsec),
            (0, 1, 500_000_000),
            "{name:?}"
        );
    }
    // Only a missing name is cached: other lookup errors stay errors.
    let f = e.ino(ROOT_INO, "f");
    assert_eq!(e.errno(op::LOOKUP, f, b"x\0"), libc::ENOTDIR);
    assert_eq!(e.errno(op::LOOKUP, 9999, b"x\0"), libc::ENOENT);
}

#[test]
fn metadata_replies() {
    let e = Env::new();
    let (f, l) = (e.ino(ROOT_INO, "f"), e.ino(ROOT_INO, "l"));
    let p = e.ok(op::LOOKUP, ROOT_INO, b"f\0");
    let entry = fuse_entry_out::read_from_bytes(&p).unwrap();
    assert_eq!(
        (entry.nodeid, entry.entry_valid, entry.attr_valid),
        (f, 3, 2)
    );
    assert_eq!(entry.attr.size, e.data.len() as u64);
    assert_eq!(entry.attr.mode, libc::S_IFREG | 0o644);
    assert_eq!(entry.attr.blksize, 4096);

    let p = e.ok(op::GETATTR, l, &[0; 16]);
    let a = fuse_attr_out::read_from_bytes(&p).unwrap();
    assert_eq!((a.attr.ino, a.attr.mode & libc::S_IFMT), (l, libc::S_IFLNK));
    assert_eq!(e.ok(op::READLINK, l, &[]), b"f");

    let p = e.ok(op::OPEN, f, fuse_open_in::default().as_bytes());
    let o = fuse_open_out::read_from_bytes(&p).unwrap();
    assert_eq!(
        (o.open_flags, o.backing_id),
        (crate::kernel::FOPEN_KEEP_CACHE, 0)
    );

    let p = e.ok(op::STATFS, ROOT_INO, &[]);
    let s = fuse_statfs_out::read_from_bytes(&p).unwrap();
    assert_eq!((s.st.bsize, s.st.namelen), (4096, 255));
    assert_eq!(s.st.files, e.fs.tree.len() as u64);

    for opcode in [op::RELEASE, op::RELEASEDIR, op::FLUSH] {
        assert!(e.ok(opcode, f, &[0; 24]).is_empty(), "{opcode}");
    }
    assert!(e.ok(op::DESTROY, ROOT_INO, &[]).is_empty());
}

#[test]
fn read_ranges() {
    let e = Env::new();
    let f = e.ino(ROOT_INO, "f");
    assert_eq!(e.ok(op::READ, f, &read_in(0, 4096)), &e.data[..4096]);
    assert_eq!(
        e.ok(op::READ, f, &read_in(70_000, 131_072)),
        &e.data[70_000..]
    );
    assert!(
        e.ok(op::READ, f, &read_in(100_000, 4096)).is_empty(),
        "at EOF"
    );
    assert!(
        e.ok(op::READ, f, &read_in(u64::MAX, 4096)).is_empty(),
        "past EOF"
    );
    assert!(e.ok(op::READ, f, &read_in(0, 0)).is_empty(), "size 0");
}

#[test]
fn xattr_size_probe_and_erange() {
    let e = Env::new();
    let o = e.ino(ROOT_INO, "o");
    let opaque = "trusted.overlay.opaque";
    let probe = e.ok(op::GETXATTR, o, &xattr_in(0, Some(opaque)));
    assert_eq!(fuse_getxattr_out::read_from_bytes(&probe).unwrap().size, 1);
    assert_eq!(e.ok(op::GETXATTR, o, &xattr_in(1, Some(opaque))), b"y");
    assert_eq!(e.ok(op::GETXATTR, o, &xattr_in(64, Some(opaque))), b"y");

    let list = format!("{opaque}\0");
    let probe = e.ok(op::LISTXATTR, o, &xattr_in(0, None));
    let need = fuse_getxattr_out::read_from_bytes(&probe).unwrap().size;
    assert_eq!(need as usize, list.len());
    assert_eq!(
        e.errno(op::LISTXATTR, o, &xattr_in(need - 1, None)),
        libc::ERANGE
    );
    assert_eq!(
        e.ok(op::LISTXATTR, o, &xattr_in(need, None)),
        list.as_bytes()
    );
    // No xattrs: the probe says 0 and an empty list fits any buffer.
    let f = e.ino(ROOT_INO, "f");
    let probe = e.ok(op::LISTXATTR, f, &xattr_in(0, None));
    assert_eq!(fuse_getxattr_out::read_from_bytes(&probe).unwrap().size, 0);
    assert!(e.ok(op::LISTXATTR, f, &xattr_in(16, None)).is_empty());
}

/// One READDIR(PLUS) page: (name, offset, ino, type) per entry.
fn parse_dir(p: &[u8], plus: bool) -> Vec<(String, u64, u64, u32)> {
    let mut out = Vec::new();
    let mut rest = p;
    while !rest.is_empty() {
        if plus {
            let (ep, r) = fuse_entry_out::read_from_prefix(rest).unwrap();
            rest = r;
            let (d, _) = fuse_dirent::read_from_prefix(rest).unwrap();
            assert_eq!(ep.nodeid, d.ino, "entry_out and dirent agree");
        }
        let (d, r) = fuse_dirent::read_from_prefix(rest).unwrap();
        let name = String::from_utf8(r[..d.namelen as usize].to_vec()).unwrap();
        let size = fuse_dirent_size(d.namelen as usize) - size_of::<fuse_dirent>();
        assert!(
            r[d.namelen as usize..size].iter().all(|&b| b == 0),
            "zero padding"
        );
        out.push((name, d.off, d.ino, d.r#type));
        rest = &r[size..];
    }
    out
}

#[test]
fn readdir_pages_resume_at_their_offsets() {
    let e = Env::new();
    let d = e.ino(ROOT_INO, "d");
    let mut want = vec![".".to_string(), "..".to_string()];
    want.extend(dir_names());
    for (opcode, plus, page) in [(op::READDIR, false, 200), (op::READDIRPLUS, true, 500)] {
        let mut got = Vec::new();
        let mut offset = 0;
        loop {
            let p = e.ok(opcode, d, &read_in(offset, page));
            assert!(p.len() <= page as usize, "within the caller's size");
            let entries = parse_dir(&p, plus);
            let Some(last) = entries.last() else { break };
            offset = last.1;
            got.extend(entries);
        }
        let names: Vec<_> = got.iter().map(|g| g.0.clone()).collect();
        assert_eq!(names, want, "every entry once, in order ({opcode})");
        for (i, g) in got.iter().enumerate() {
            assert_eq!(g.1, i as u64 + 1, "offset of {}", g.0);
        }
        assert_eq!((got[0].2, got[1].2), (d, ROOT_INO), ". and ..");
        assert_eq!(got[2].2, e.ino(d, "entry-00"));
        assert_eq!(got[2].3, libc::S_IFREG >> 12);
        // Any offset resumes right there, also past the end.
        let p = parse_dir(&e.ok(opcode, d, &read_in(17, 4096)), plus);
        assert_eq!(p[0].0, want[17]);
        assert!(e.ok(opcode, d, &read_in(42, 4096)).is_empty());
        assert!(e.ok(opcode, d, &read_in(u64::MAX, 4096)).is_empty());
        // A page too small for one entry is empty, not an error.
        assert!(e.ok(opcode, d, &read_in(0, 8)).is_empty());
    }
}

#[test]
fn forgets_and_interrupts_get_no_reply() {
    let e = Env::new();
    let f = e.ino(ROOT_INO, "f");
    assert_eq!(
        e.call(op::FORGET, f, fuse_forget_in { nlookup: 1 }.as_bytes()),
        None
    );
    let mut batch = fuse_batch_forget_in { count: 1, dummy: 0 }
        .as_bytes()
        .to_vec();
    batch.extend_from_slice(
        fuse_forget_one {
            nodeid: f,
            nlookup: 2,
        }
        .as_bytes(),
    );
    assert_eq!(e.call(op::BATCH_FORGET, 0, &batch), None);
    assert_eq!(e.call(op::INTERRUPT, 0, &5u64.to_ne_bytes()), None);
    // Not even when malformed.
    assert_eq!(e.call(op::FORGET, f, &[1, 2]), None);
    batch[0] = 9;
    assert_eq!(e.call(op::BATCH_FORGET, 0, &batch), None);
    // The inode is still there: the tree is static.
    assert_eq!(e.call(op::GETATTR, f, &[0; 16]).unwrap().0, 0);
}

#[test]
fn init_negotiation_through_the_dispatcher() {
    let e = Env::new();
    let arg = |minor, flags, flags2| fuse_init_in {
        major: 7,
        minor,
        max_readahead: 65536,
        flags,
        flags2,
        unused: [0; 11],
    };
    // Too old: refused, no session.
    assert_eq!(e.errno(op::INIT, 0, arg(22, 0, 0).as_bytes()), libc::EPROTO);
    assert_eq!(e.fs.session.get(), Session::default());
    // A 6.18 kernel (7.45) offering everything.
    let all = u32::MAX;
    let p = e.ok(op::INIT, 0, arg(45, all, all).as_bytes());
    let out = fuse_init_out::read_from_bytes(&p).unwrap();
    assert_eq!((out.major, out.minor), (7, 40));
    assert_eq!(out.flags, super::INIT_WANTS.flags | init::INIT_EXT);
    assert_eq!(
        (out.max_write, out.max_pages, out.max_readahead),
        (MAX_WRITE, 256, 65536)
    );
    assert_eq!((out.flags2, out.max_stack_depth, out.time_gran), (0, 0, 1));
    assert_eq!(
        e.fs.session.get(),
        Session {
            minor: 40,
            resend: true
        }
    );
    // A 7.31 kernel with the 16-byte struct and only ASYNC_READ.
    let p = e.ok(op::INIT, 0, &arg(31, init::ASYNC_READ, 0).as_bytes()[..16]);
    let out = fuse_init_out::read_from_bytes(&p).unwrap();
    assert_eq!((out.minor, out.flags), (31, init::ASYNC_READ));
    assert_eq!(
        e.fs.session.get(),
        Session {
            minor: 31,
            resend: false
        }
    );
}

#[test]
fn internal_failures_counted_under_upstream_names() {
    let e = Env::new();
    let f = e.ino(ROOT_INO, "f");
    let open = fuse_open_in::default();
    let fh = fuse_getattr_in {
        getattr_flags: crate::kernel::FUSE_GETATTR_FH,
        dummy: 0,
        fh: 1,
    };
    // Ordinary answers: not failures.
    e.errno(op::LOOKUP, ROOT_INO, b"nope\0");
    e.errno(op::OPEN, e.ino(ROOT_INO, "d"), open.as_bytes());
    e.errno(op::READLINK, f, &[]);
    // An inode the tree does not have: internal failures, one per operation.
    e.errno(op::GETATTR, 9999, &[0; 16]);
    e.errno(op::GETATTR, 9999, fh.as_bytes());
    e.errno(op::LOOKUP, 9999, b"x\0");
    e.errno(op::OPEN, 9999, open.as_bytes());
    e.errno(op::READDIR, 9999, &read_in(0, 4096));
    e.errno(op::READDIRPLUS, 9999, &read_in(0, 4096));
    e.errno(op::LISTXATTR, 9999, &xattr_in(0, None));
    e.errno(op::READLINK, 9999, &[]);
    e.errno(op::READ, 9999, &read_in(0, 10));
    let mut o = String::new();
    e.fs.metrics.upstream.render(&mut o);
    let layer = e.fs.spans.layer().to_string();
    let count = |name: &str| {
        let want =
            format!("soci_fs_operation_count{{layer=\"{layer}\",operation_type=\"{name}\"}} ");
        o.lines()
            .find_map(|l| l.strip_prefix(&want))
            .map(|n| n.parse::<u64>().unwrap())
            .unwrap_or(0)
    };
    for (name, n) in [
        ("fuse_node_getattr_failure_count", 1),
        ("fuse_file_getattr_failure_count", 1),
        ("fuse_node_lookup_failure_count", 1),
        ("fuse_node_open_failure_count", 1),
        ("fuse_node_readdir_failure_count", 2),
        ("fuse_node_listxattr_failure_count", 1),
        ("fuse_unknown_operation_failure_count", 1),
        ("fuse_file_read_failure_count", 1),
    ] {
        assert_eq!(count(name), n, "{name}:\n{o}");
    }
}
