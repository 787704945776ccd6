//! The passthrough table: which opens get a backing file, and what a daemon that takes a
//! connection over inherits. A fake stands in for the kernel's backing-file ioctls.

use super::*;

/// Hands out ids 1, 2, … or fails with `fail`; records every call.
#[derive(Default)]
pub(crate) struct FakeBacking {
    pub(crate) opened: Mutex<Vec<u32>>,
    pub(crate) closed: Mutex<Vec<u32>>,
    pub(crate) fail: Mutex<Option<Errno>>,
}

impl BackingFiles for FakeBacking {
    fn open(&self, _file: BorrowedFd<'_>) -> Result<u32, Errno> {
        if let Some(e) = *self.fail.lock().unwrap() {
            return Err(e);
        }
        let mut o = self.opened.lock().unwrap();
        let id = o.len() as u32 + 1;
        o.push(id);
        Ok(id)
    }

    fn close(&self, id: u32) -> Result<(), Errno> {
        self.closed.lock().unwrap().push(id);
        Ok(())
    }
}

/// A mount directory with backing files for extents (0, 5) and (100, 3).
fn setup() -> (tempfile::TempDir, PassthroughConfig, Arc<FsMetrics>) {
    let dir = tempfile::tempdir().unwrap();
    let pt = dir.path().join("pt");
    std::fs::create_dir_all(&pt).unwrap();
    std::fs::write(pt.join("0-5"), b"hello").unwrap();
    std::fs::write(pt.join("100-3"), b"abc").unwrap();
    // Unfinished: removed; wrong size: ignored.
    std::fs::write(pt.join("7-9.tmp"), b"x").unwrap();
    std::fs::write(pt.join("50-10"), b"short").unwrap();
    let cfg = PassthroughConfig {
        dir: pt,
        disk: crate::cache::SpanCache::new(0, 0),
        enabled: true,
    };
    (dir, cfg, Arc::new(FsMetrics::default()))
}

const A: Extent = (0, 5);
const B: Extent = (100, 3);

#[test]
fn backing_ids_only_for_whole_files_without_cached_opens() {
    let (_d, cfg, m) = setup();
    let p = Passthrough::new(cfg.clone(), m.clone()).unwrap();
    assert_eq!(p.file_count(), 2);
    assert_eq!(
        cfg.disk.disk_bytes(),
        disk_cost(5) + disk_cost(3),
        "found files count in the budget, in blocks"
    );
    assert!(!cfg.dir.join("7-9.tmp").exists());
    let k = FakeBacking::default();
    p.start(true);

    // A file with no backing file: a cached open.
    assert_eq!(p.open(3, (200, 10), Some(&k)), None);
    // Inode 5 (extent A) opened cached first, then A is whole: still cached while that open
    // lives, or the kernel would fail the open (inode in cached mode).
    p.lock().files.remove(&A);
    assert_eq!(p.open(5, A, Some(&k)), None);
    p.lock().files.insert(A);
    assert_eq!(p.open(5, A, Some(&k)), None);
    p.release(5, 0);
    assert_eq!(p.open(5, A, Some(&k)), None, "one cached open left");
    p.release(5, 0);
    p.release(5, 0);
    // No cached open: a backing id, registered once and kept for every later open.
    assert_eq!(p.open(5, A, Some(&k)), Some(1));
    assert_eq!(p.open(5, A, Some(&k)), Some(1));
    p.release(5, PASSTHROUGH_FH | 1);
    p.release(5, PASSTHROUGH_FH | 1);
    assert_eq!(p.open(5, A, Some(&k)), Some(1));
    assert_eq!(*k.opened.lock().unwrap(), [1]);
    assert!(
        k.closed.lock().unwrap().is_empty(),
        "ids live as long as the connection"
    );
    // Another inode gets its own id; without the connection (not serving yet) none.
    assert_eq!(p.open(6, B, None), None);
    p.release(6, 0);
    assert_eq!(p.open(6, B, Some(&k)), Some(2));
    assert_eq!(m.passthrough.opens.load(Ordering::Relaxed), 4);
    let log = std::fs::read_to_string(cfg.dir.join(IDS)).unwrap();
    assert_eq!(log, "passthrough 1\n5 1\n6 2\n");

    // A new connection (INIT) forgets the old ids.
    p.start(true);
    assert_eq!(p.open(5, A, Some(&k)), Some(3));
}

#[test]
fn a_taken_over_connection_keeps_ids_and_counts() {
    let (_d, cfg, m) = setup();
    let k = FakeBacking::default();
    let p = Passthrough::new(cfg.clone(), m.clone()).unwrap();
    p.start(true);
    assert_eq!(p.open(5, A, Some(&k)), Some(1));
    assert_eq!(p.open(6, (300, 1), Some(&k)), None); // cached, not whole
    p.save();
    drop(p);

    // Graceful: ids and cached counts carry over.
    let p = Passthrough::new(cfg.clone(), m.clone()).unwrap();
    p.resume();
    assert!(!cfg.dir.join(CACHED).exists(), "used once");
    assert_eq!(
        p.open(5, A, Some(&k)),
        Some(1),
        "same id, no new registration"
    );
    assert_eq!(k.opened.lock().unwrap().len(), 1);
    p.lock().files.insert((300, 1));
    assert_eq!(
        p.open(6, (300, 1), Some(&k)),
        None,
        "the old cached open lives"
    );
    p.release(6, 0);
    p.release(6, 0);
    assert_eq!(
        p.open(7, B, Some(&k)),
        Some(2),
        "new ids on a resumed connection"
    );
    drop(p);

    // Unclean (no `.cached`): known ids still used, no new ones.
    let p = Passthrough::new(cfg.clone(), m.clone()).unwrap();
    p.resume();
    assert_eq!(p.open(5, A, Some(&k)), Some(1));
    assert_eq!(p.open(7, B, Some(&k)), Some(2));
    assert_eq!(p.open(6, (300, 1), Some(&k)), None);
    assert!(
        !p.claim((400, 4), || true),
        "no backing files written either"
    );
    assert_eq!(k.opened.lock().unwrap().len(), 2);

    // A connection set up without passthrough: nothing.
    p.start(false);
    let p = Passthrough::new(cfg, m).unwrap();
    p.resume();
    assert_eq!(p.open(5, A, Some(&k)), None);
}

#[test]
fn refusal_by_the_kernel_turns_it_off_once() {
    for errno in [Errno::EPERM, Errno::ENOTTY, Errno::EOPNOTSUPP, Errno::ELOOP] {
        let (_d, cfg, m) = setup();
        let p = Passthrough::new(cfg, m.clone()).unwrap();
        let k = FakeBacking::default();
        *k.fail.lock().unwrap() = Some(errno);
        p.start(true);
        assert_eq!(p.open(5, A, Some(&k)), None);
        assert_eq!(m.passthrough.unavailable.load(Ordering::Relaxed), 1);
        *k.fail.lock().unwrap() = None;
        assert_eq!(
            p.open(6, B, Some(&k)),
            None,
            "{errno}: off for the connection"
        );
        assert!(k.opened.lock().unwrap().is_empty());
    }
    // A transient failure (EBADF, ENOMEM): this open is cached, later ones try again.
    let (_d, cfg, m) = setup();
    let p = Passthrough::new(cfg, m.clone()).unwrap();
    let k = FakeBacking::default();
    *k.fail.lock().unwrap() = Some(Errno::ENOMEM);
    p.start(true);
    assert_eq!(p.open(5, A, Some(&k)), None);
    p.release(5, 0);
    *k.fail.lock().unwrap() = None;
    assert_eq!(p.open(5, A, Some(&k)), Some(1));
    assert_eq!(m.passthrough.unavailable.load(Ordering::Relaxed), 0);
    // Not offered at INIT: counted, never asked.
    p.start(false);
    assert_eq!(m.passthrough.unavailable.load(Ordering::Relaxed), 1);
    assert_eq!(p.open(9, B, Some(&k)), None);
}

#[test]
fn switched_off_a_taken_over_connection_keeps_its_ids_only() {
    let (_d, cfg, m) = setup();
    let k = FakeBacking::default();
    let p = Passthrough::new(cfg.clone(), m.clone()).unwrap();
    p.start(true);
    assert_eq!(p.open(5, A, Some(&k)), Some(1));
    p.save();
    let off = PassthroughConfig {
        enabled: false,
        ..cfg
    };
    let p = Passthrough::new(off, m.clone()).unwrap();
    assert!(!p.enabled());
    p.resume();
    assert_eq!(
        p.open(5, A, Some(&k)),
        Some(1),
        "inode 5 is in passthrough mode"
    );
    assert_eq!(p.open(6, B, Some(&k)), None);
    assert!(!p.claim((400, 4), || true));
    p.start(false);
    assert_eq!(
        m.passthrough.unavailable.load(Ordering::Relaxed),
        0,
        "off is not a failure"
    );
}

#[test]
fn removing_gives_the_budget_back() {
    let (_d, cfg, m) = setup();
    let p = Passthrough::new(cfg.clone(), m).unwrap();
    assert_eq!(cfg.disk.disk_bytes(), 2 * 8192);
    p.remove_files();
    assert_eq!(cfg.disk.disk_bytes(), 0);
    assert!(!cfg.dir.exists());
    assert_eq!(p.file_count(), 0);
}

#[test]
fn a_symlink_under_a_backing_files_name_is_never_passed_through() {
    let (d, cfg, m) = setup();
    let host = d.path().join("host-secret");
    std::fs::write(&host, b"host!").unwrap();
    std::fs::remove_file(cfg.dir.join("0-5")).unwrap();
    std::os::unix::fs::symlink(&host, cfg.dir.join("0-5")).unwrap();
    let p = Passthrough::new(cfg.clone(), m).unwrap();
    assert_eq!(p.file_count(), 1, "the symlink is not a backing file");
    // Even if it were taken for one (planted after the scan): the open refuses it.
    p.lock().files.insert(A);
    let k = FakeBacking::default();
    p.start(true);
    assert_eq!(p.open(5, A, Some(&k)), None);
}

#[test]
fn tiny_files_cost_whole_blocks_and_a_mount_makes_a_bounded_number() {
    assert_eq!(disk_cost(0), 4096);
    assert_eq!(disk_cost(1), 8192);
    assert_eq!(disk_cost(4096), 8192);
    let (_d, cfg, m) = setup();
    let p = Passthrough::new(cfg, m).unwrap();
    p.start(true);
    for i in 0..MAX_BACKING_FILES as u64 {
        if !p.claim((1000 + i, 1), || true) {
            assert_eq!(i as usize + p.file_count(), MAX_BACKING_FILES);
            return;
        }
    }
    panic!("claimed {MAX_BACKING_FILES} files on top of the existing ones");
}
