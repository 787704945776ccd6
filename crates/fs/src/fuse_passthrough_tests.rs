//! Passthrough through the dispatcher: INIT asks for it, OPEN of a file whose spans are not
//! local is cached, RELEASE of it once they are starts the backing file, the next OPEN is a
//! passthrough open with exactly the flags the kernel accepts.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use zerocopy::{FromBytes, IntoBytes};

use super::ops_tests::{fixture, VecSink};
use super::LayerFs;
use crate::cache::SpanCache;
use crate::kernel::abi::*;
use crate::kernel::test_util::request;
use crate::kernel::{
    init, init2, op, ReplySink, Session, FOPEN_KEEP_CACHE, FOPEN_NOFLUSH, FOPEN_PASSTHROUGH,
};
use crate::mount::Served;
use crate::passthrough::tests::FakeBacking;
use crate::passthrough::{BackingFiles, PassthroughConfig, PASSTHROUGH_FH};
use crate::tree::ROOT_INO;

struct Env {
    fs: LayerFs,
    sink: Arc<VecSink>,
    data: Vec<u8>,
    backing: Arc<dyn BackingFiles>,
    budget: Arc<SpanCache>,
    dir: tempfile::TempDir,
    _rt: tokio::runtime::Runtime,
}

impl Env {
    fn new() -> Env {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (plain, data) = fixture(&rt, dir.path());
        let budget = SpanCache::new(0, 0);
        let served = Served {
            tree: plain.tree.clone(),
            spans: plain.spans.clone(),
            rt: rt.handle().clone(),
            timeouts: crate::CacheTimeouts::all(Duration::from_secs(1)),
            // The span manager's counters (upstream's families are counted there).
            metrics: plain.metrics.clone(),
            passthrough: Some(PassthroughConfig {
                dir: dir.path().join("pt"),
                disk: budget.clone(),
                enabled: true,
            }),
        };
        let fs = LayerFs::new(served, Session::default());
        let backing: Arc<dyn BackingFiles> = Arc::new(FakeBacking::default());
        let _ = fs.backing.set(Arc::downgrade(&backing));
        Env {
            fs,
            sink: Arc::new(VecSink::default()),
            data,
            backing,
            budget,
            dir,
            _rt: rt,
        }
    }

    /// One request answered now (not READ); its payload.
    fn ok(&self, opcode: u32, nodeid: u64, args: &[u8]) -> Vec<u8> {
        let sink: Arc<dyn ReplySink> = self.sink.clone();
        self.fs.dispatch(&request(opcode, 9, nodeid, args), &sink);
        let wait = usize::from(opcode == op::READ);
        let mut r = self.sink.take(wait);
        let r = r.pop().expect("a reply");
        let (h, p) = fuse_out_header::read_from_prefix(&r).unwrap();
        assert_eq!(h.error, 0, "opcode {opcode}");
        p.to_vec()
    }

    fn init(&self, flags2: u32) -> fuse_init_out {
        let arg = fuse_init_in {
            major: 7,
            minor: 45,
            max_readahead: 65536,
            flags: u32::MAX,
            flags2,
            unused: [0; 11],
        };
        fuse_init_out::read_from_bytes(&self.ok(op::INIT, 0, arg.as_bytes())).unwrap()
    }

    fn open(&self, ino: u64) -> fuse_open_out {
        fuse_open_out::read_from_bytes(&self.ok(op::OPEN, ino, &[0; 8])).unwrap()
    }

    fn release(&self, ino: u64, fh: u64) {
        let arg = fuse_release_in {
            fh,
            ..Default::default()
        };
        self.ok(op::RELEASE, ino, arg.as_bytes());
    }
}

#[test]
fn backing_files_are_written_only_once_containers_stop_reading() {
    let e = Env::new();
    e.init(init2::PASSTHROUGH | init2::HAS_RESEND);
    let f = e.fs.tree.lookup(ROOT_INO, b"f").unwrap();
    e.open(f);
    let read = fuse_read_in {
        offset: 0,
        size: 131072,
        ..Default::default()
    };
    assert_eq!(e.ok(op::READ, f, read.as_bytes()), e.data);
    // Some container (any layer) keeps reading: the copy waits.
    e.budget.stamp_demand();
    e.release(f, 0);
    let p = e.fs.passthrough.clone().unwrap();
    let busy_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < busy_until {
        e.budget.stamp_demand();
        assert_eq!(
            p.file_count(),
            0,
            "a backing file written while reads go on"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let quiet_from = Instant::now();
    let deadline = quiet_from + Duration::from_secs(5);
    while p.file_count() == 0 {
        assert!(
            Instant::now() < deadline,
            "no backing file once reads stopped"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let waited = quiet_from.elapsed();
    assert!(
        waited + Duration::from_millis(150) >= crate::passthrough::WRITE_WHEN_QUIET,
        "written {waited:?} after the last read"
    );
}

#[test]
fn whole_files_are_opened_with_their_backing_file() {
    let e = Env::new();
    let out = e.init(init2::PASSTHROUGH | init2::HAS_RESEND);
    assert_eq!(out.flags2, init2::PASSTHROUGH);
    assert_eq!(out.max_stack_depth, 1, "overlayfs must stack on the mount");
    assert_ne!(out.flags & init::INIT_EXT, 0);
    let f = e.fs.tree.lookup(ROOT_INO, b"f").unwrap();

    // Not local yet: a cached open, as before.
    let o = e.open(f);
    assert_eq!((o.open_flags, o.backing_id, o.fh), (FOPEN_KEEP_CACHE, 0, 0));
    let read = fuse_read_in {
        offset: 0,
        size: 131072,
        ..Default::default()
    };
    assert_eq!(e.ok(op::READ, f, read.as_bytes()), e.data);
    // Closing it, with every span now local, writes the backing file.
    e.release(f, 0);
    let p = e.fs.passthrough.clone().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.file_count() == 0 {
        assert!(Instant::now() < deadline, "no backing file written");
        std::thread::sleep(Duration::from_millis(5));
    }
    let n = e.fs.tree.get(f).unwrap();
    let file = e
        .dir
        .path()
        .join("pt")
        .join(format!("{}-{}", n.offset, n.size));
    assert_eq!(
        std::fs::read(&file).unwrap(),
        e.data,
        "exactly the file's bytes"
    );
    assert_eq!(
        e.budget.disk_bytes(),
        crate::passthrough::disk_cost(e.data.len() as u64),
        "counted in the disk budget"
    );

    // Now: passthrough and no FLUSH, nothing else (the kernel refuses KEEP_CACHE with it).
    let o = e.open(f);
    assert_eq!(o.open_flags, FOPEN_PASSTHROUGH | FOPEN_NOFLUSH);
    assert_eq!(o.backing_id, 1);
    assert_eq!(o.fh, PASSTHROUGH_FH | 1);
    let o2 = e.open(f);
    assert_eq!(o2.backing_id, 1, "one backing file per inode");
    e.release(f, o.fh);
    e.release(f, o2.fh);
    assert_eq!(
        e.fs.metrics
            .passthrough
            .opens
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    // Directories and symlinks are untouched.
    let l = e.fs.tree.lookup(ROOT_INO, b"l").unwrap();
    assert_eq!(e.open(l).open_flags, 0);
    drop(e.backing);
}

#[test]
fn a_kernel_without_passthrough_gets_normal_opens() {
    let e = Env::new();
    let out = e.init(init2::HAS_RESEND);
    assert_eq!((out.flags2, out.max_stack_depth), (0, 0));
    let f = e.fs.tree.lookup(ROOT_INO, b"f").unwrap();
    let read = fuse_read_in {
        offset: 0,
        size: 131072,
        ..Default::default()
    };
    e.open(f);
    e.ok(op::READ, f, read.as_bytes());
    e.release(f, 0);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        e.fs.passthrough.as_ref().unwrap().file_count(),
        0,
        "no copy made"
    );
    assert_eq!(e.open(f).open_flags, FOPEN_KEEP_CACHE);
    assert_eq!(
        e.fs.metrics
            .passthrough
            .unavailable
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // Without the connection gone, still nothing; the weak handle does not keep it alive.
    let w: Weak<dyn BackingFiles> = Arc::downgrade(&e.backing);
    drop(e.backing);
    assert!(w.upgrade().is_none());
}

impl Env {
    /// Waits (bounded) until `n` backing files are written.
    fn wait_files(&self, n: usize) {
        let p = self.fs.passthrough.clone().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while p.file_count() < n {
            assert!(Instant::now() < deadline, "no backing file written");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Upstream's `synchronous_read_count` of the fixture layer (0 if never counted).
    fn synchronous_reads(&self) -> u64 {
        let mut o = String::new();
        self.fs.metrics.upstream.render(&mut o);
        let key = "soci_fs_operation_count{layer=\"sha256:fixture\",operation_type=\"synchronous_read_count\"} ";
        o.lines()
            .find_map(|l| l.strip_prefix(key))
            .map_or(0, |n| n.parse().unwrap())
    }
}

/// A passthrough open's reads never reach the daemon, so the open itself is what the demand
/// record (`soci prefetch record`) gets: the whole file's spans.
#[test]
fn a_passthrough_open_is_recorded_as_demand() {
    let e = Env::new();
    e.init(init2::PASSTHROUGH);
    let f = e.fs.tree.lookup(ROOT_INO, b"f").unwrap();
    // The file became local and got its backing file before recording started (a daemon
    // that already had it, or an earlier container of the image).
    e.open(f);
    let read = fuse_read_in {
        offset: 0,
        size: 131072,
        ..Default::default()
    };
    e.ok(op::READ, f, read.as_bytes());
    e.release(f, 0);
    e.wait_files(1);
    let spans = e.fs.spans.span_count();
    let record = e.fs.spans.record_demand(std::sync::Arc::new(
        crate::spans::record::DemandRecord::new(spans, None),
    ));
    let o = e.open(f);
    assert_eq!(o.open_flags, FOPEN_PASSTHROUGH | FOPEN_NOFLUSH);
    assert_eq!(spans, 1, "the fixture's layer is one span, holding f");
    assert_eq!(record.order(), vec![0], "the file's spans are recorded");
    // A symlink or directory open records nothing new (and nothing breaks).
    let l = e.fs.tree.lookup(ROOT_INO, b"l").unwrap();
    e.open(l);
    assert_eq!(record.order(), vec![0]);
}

/// Writing a backing file reads verified spans, but not as a demand read: the background
/// fetch must not back off for it, and upstream's FUSE read counters must not count it.
#[test]
fn writing_a_backing_file_is_not_a_demand_read() {
    let e = Env::new();
    e.init(init2::PASSTHROUGH);
    let f = e.fs.tree.lookup(ROOT_INO, b"f").unwrap();
    // Local through the background fetch, not through a read.
    let n = e.fs.spans.span_count();
    e._rt
        .block_on(e.fs.spans.ensure(0..n, crate::spans::Priority::Background))
        .unwrap();
    // An open of a local file starts its backing file.
    let o = e.open(f);
    assert_eq!(o.open_flags, FOPEN_KEEP_CACHE);
    e.wait_files(1);
    assert_eq!(e.fs.spans.last_demand_ms(), 0, "no demand read seen");
    assert_eq!(e.synchronous_reads(), 0, "no FUSE read counted");
    // A real READ still is both.
    let read = fuse_read_in {
        offset: 0,
        size: 4096,
        ..Default::default()
    };
    std::thread::sleep(Duration::from_millis(2));
    e.ok(op::READ, f, read.as_bytes());
    assert_ne!(e.fs.spans.last_demand_ms(), 0);
    assert_eq!(e.synchronous_reads(), 1);
}
