//! FUSE passthrough (kernel 6.9+, protocol 7.40): once every span of a regular file is local
//! and verified, the daemon writes the file's bytes into a plain file of its own (a *backing
//! file*), registers it with the connection, and answers OPEN with `FOPEN_PASSTHROUGH`: the
//! kernel then reads (and maps) the backing file directly, and reads never reach the daemon.
//! Warm reads cost what they cost on a local filesystem instead of two context switches and
//! a copy per 128 KiB.
//!
//! Why a copy and not the span files: a backing file must hold exactly the file's bytes at
//! the same offsets; span files hold ranges of the uncompressed tar stream (headers included,
//! boundaries anywhere). The copy is made only from verified bytes
//! ([`SpanManager::read_internal`]: not a demand read, so the background fetch does not back
//! off for it and upstream's FUSE read counters do not count it), written to a temp file,
//! synced and renamed, so a file under its final name is always complete; and only once
//! containers read nothing for a second ([`WRITE_WHEN_QUIET`]), so a start never pays for it. It counts in the span disk budget and is removed with the layer. Files are
//! named by their byte range in the uncompressed layer (`<offset>-<size>`), a property of the
//! layer's content, not of how this daemon numbers inodes.
//!
//! The kernel's rules this module keeps (fs/fuse/iomode.c): an inode is either in cached
//! mode (some opens without passthrough) or in passthrough mode (some opens with one backing
//! file), never both; an open that breaks that fails with EIO in the caller. So:
//! - an inode with a backing id is always opened with passthrough, with that same id; ids
//!   are registered once per inode and never closed while the connection lives (the kernel
//!   drops them when it ends), so they never change under an open file;
//! - a new id is registered only when the inode has no cached open (counted from OPEN and
//!   RELEASE, whose `fh` tells the two apart).
//!
//! Across daemon restarts the connection, its ids and its open files live on (the fd holder
//! keeps `/dev/fuse`), so the next daemon must know them: every id is appended to
//! `.ids` before the OPEN reply goes out (a page-cache write, so it survives kill -9), and a
//! graceful stop writes the cached-open counts to `.cached`. A daemon that resumes without
//! `.cached` (the previous one crashed) keeps using the ids it finds but registers no new
//! ones on that connection: it cannot know which inodes have cached opens.
//!
//! Whatever fails (kernel without passthrough, no `CAP_SYS_ADMIN`, `ELOOP` on a stacked
//! daemon root, disk budget, a write error) leaves normal reads in place.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Write};
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;
use tracing::{debug, info, warn};

use crate::cache::SpanCache;
use crate::spans::{FsMetrics, SpanManager};

/// Where a mount keeps its backing files, and the budget they count in.
#[derive(Debug, Clone)]
pub struct PassthroughConfig {
    /// This mount's directory of backing files (created if missing).
    pub dir: PathBuf,
    /// The disk budget the span cache uses (`[blob] disk_cache_mb`).
    pub disk: Arc<SpanCache>,
    /// Ask for passthrough and pass new files through. When false, a connection taken over
    /// from a daemon that had it on still uses the backing ids it registered (the kernel
    /// fails a normal open of an inode in passthrough mode), and nothing else.
    pub enabled: bool,
}

/// Passthrough counters, shared by all layers.
#[derive(Debug, Default)]
pub struct PassthroughMetrics {
    /// Opens answered with a backing file.
    pub opens: AtomicU64,
    /// Backing files written.
    pub files_written: AtomicU64,
    /// Connections on which passthrough turned out unusable (not offered by the kernel, or
    /// refused when registering a backing file).
    pub unavailable: AtomicU64,
}

/// Registers backing files with a connection (`/dev/fuse` in production, a fake in tests).
pub(crate) trait BackingFiles: Send + Sync {
    /// `FUSE_DEV_IOC_BACKING_OPEN` of `file`: its backing id.
    fn open(&self, file: BorrowedFd<'_>) -> Result<u32, Errno>;
    /// `FUSE_DEV_IOC_BACKING_CLOSE`.
    fn close(&self, id: u32) -> Result<(), Errno>;
}

/// `fh` of a passthrough open (cached opens have `fh` 0): RELEASE tells them apart by it.
pub(crate) const PASSTHROUGH_FH: u64 = 1 << 62;
/// Bytes copied per span-manager read while writing a backing file.
const CHUNK: u64 = 1 << 20;
/// Backing files are written only once no container read anything for this long (any
/// layer): a copy pays off on later reads, and made during a start it took CPU and disk from
/// it (file creation and fsync were a third of the daemon's time while a Python start read
/// 300 files).
pub(crate) const WRITE_WHEN_QUIET: std::time::Duration = std::time::Duration::from_secs(1);
/// ... but a layer read at least once a second gets its copies after this long anyway (each
/// copy waits again for a quiet second once it is its turn, within the same bound).
pub(crate) const MAX_WRITE_DELAY: std::time::Duration = std::time::Duration::from_secs(30);
/// Backing files one mount writes at most: each is an inode and a kernel file reference
/// while passed through, so a layer of a million tiny files must not make a million.
pub(crate) const MAX_BACKING_FILES: usize = 16 << 10;

/// What a backing file of `size` bytes costs in the disk budget: whole 4 KiB blocks plus one
/// for its inode and directory entry (a 1-byte file is not 1 byte of disk).
pub(crate) fn disk_cost(size: u64) -> u64 {
    size.div_ceil(4096).saturating_add(1).saturating_mul(4096)
}
const IDS: &str = ".ids";
const CACHED: &str = ".cached";

/// A file's bytes in the uncompressed layer: `(offset, size)`.
pub(crate) type Extent = (u64, u64);

#[derive(Debug, Default)]
struct Table {
    /// Passthrough negotiated and not refused.
    on: bool,
    /// New backing ids may be registered (false after an unclean takeover).
    new_ids: bool,
    /// Backing id of each inode that has one on this connection.
    ids: HashMap<u64, u32>,
    /// Open files without passthrough, per inode.
    cached: HashMap<u64, u32>,
    /// Backing files on disk.
    files: HashSet<Extent>,
    /// Backing files being written, or given up on this mount.
    claimed: HashSet<Extent>,
    /// Append handle of `.ids`.
    log: Option<File>,
}

impl Table {
    fn cached_open(&mut self, ino: u64) {
        *self.cached.entry(ino).or_default() += 1;
    }
}

/// The passthrough state of one mount: its backing files and the connection's ids.
pub struct Passthrough {
    enabled: bool,
    dir: PathBuf,
    disk: Arc<SpanCache>,
    metrics: Arc<FsMetrics>,
    table: Mutex<Table>,
    /// One backing file written at a time per mount.
    writer: tokio::sync::Semaphore,
}

fn file_name((offset, size): Extent) -> String {
    format!("{offset}-{size}")
}

fn parse_name(name: &str) -> Option<Extent> {
    let (o, s) = name.split_once('-')?;
    Some((o.parse().ok()?, s.parse().ok()?))
}

impl Passthrough {
    /// The state of a mount whose backing files live in `cfg.dir`: files left by an earlier
    /// run are kept (and counted in the budget), unfinished ones removed.
    pub(crate) fn new(cfg: PassthroughConfig, metrics: Arc<FsMetrics>) -> io::Result<Passthrough> {
        std::fs::create_dir_all(&cfg.dir)?;
        let mut files = HashSet::new();
        let mut found = 0;
        for e in std::fs::read_dir(&cfg.dir)?.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            match parse_name(&name) {
                // lstat: a symlink planted under a backing file's name is not one.
                Some(x) if e.metadata().is_ok_and(|m| m.is_file() && m.len() == x.1) => {
                    found += disk_cost(x.1);
                    files.insert(x);
                }
                _ if name.ends_with(".tmp") => {
                    let _ = std::fs::remove_file(e.path());
                }
                _ => {}
            }
        }
        cfg.disk.add_disk(found);
        Ok(Passthrough {
            enabled: cfg.enabled,
            dir: cfg.dir,
            disk: cfg.disk,
            metrics,
            table: Mutex::new(Table {
                files,
                ..Default::default()
            }),
            writer: tokio::sync::Semaphore::new(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // Plain data, consistent even if a holder panicked.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether INIT should ask for passthrough.
    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    /// A new connection (INIT): `granted` says whether the kernel agreed to passthrough.
    /// Whatever an earlier connection left (ids, counts) is forgotten.
    pub(crate) fn start(&self, granted: bool) {
        let mut t = self.lock();
        t.on = granted;
        t.new_ids = granted;
        t.ids.clear();
        t.cached.clear();
        let _ = std::fs::remove_file(self.dir.join(CACHED));
        let header = format!("passthrough {}\n", u8::from(granted));
        t.log = match std::fs::write(self.dir.join(IDS), header).and_then(|()| {
            std::fs::OpenOptions::new()
                .append(true)
                .open(self.dir.join(IDS))
        }) {
            Ok(f) => Some(f),
            Err(e) => {
                if granted {
                    warn!(dir = %self.dir.display(), error = %e, "cannot record passthrough ids: passthrough off for this mount");
                }
                t.on = false;
                None
            }
        };
        if !granted && self.enabled {
            self.metrics
                .passthrough
                .unavailable
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A connection taken over from an earlier daemon: its ids from `.ids`, its cached-open
    /// counts from `.cached` (then deleted: they are only true until this daemon answers an
    /// OPEN). Without `.ids` (an older daemon set the connection up), passthrough stays off.
    pub(crate) fn resume(&self) {
        let mut t = self.lock();
        let ids = std::fs::read_to_string(self.dir.join(IDS)).unwrap_or_default();
        let mut lines = ids.lines();
        t.on = lines.next() == Some("passthrough 1");
        t.ids = lines
            .filter_map(|l| {
                let (i, id) = l.split_once(' ')?;
                Some((i.parse().ok()?, id.parse().ok()?))
            })
            .collect();
        let cached = std::fs::read_to_string(self.dir.join(CACHED));
        let _ = std::fs::remove_file(self.dir.join(CACHED));
        t.new_ids = t.on && cached.is_ok() && self.enabled;
        t.cached = cached
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (i, n) = l.split_once(' ')?;
                Some((i.parse().ok()?, n.parse().ok()?))
            })
            .collect();
        t.log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.join(IDS))
            .ok();
        if t.log.is_none() {
            t.new_ids = false;
        }
        if t.on && !t.new_ids && self.enabled {
            info!(dir = %self.dir.display(), ids = t.ids.len(), "resumed a FUSE connection left without its open-file record (the previous daemon stopped uncleanly): files already passed through keep their backing file, others are read normally");
        }
    }

    /// Graceful stop with the connection left to the next daemon: records the cached-open
    /// counts for it.
    pub(crate) fn save(&self) {
        let t = self.lock();
        if !t.on {
            return;
        }
        let mut text = String::new();
        for (ino, n) in &t.cached {
            text.push_str(&format!("{ino} {n}\n"));
        }
        let tmp = self.dir.join(".cached.tmp");
        if let Err(e) =
            std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, self.dir.join(CACHED)))
        {
            warn!(dir = %self.dir.display(), error = %e, "cannot record open files for the next daemon: it will not pass new files through");
        }
    }

    /// Decides how inode `ino` (a regular file at `extent` of the layer) is opened: its
    /// backing id for a passthrough open, or `None` for a normal (cached) one, counted.
    pub(crate) fn open(
        &self,
        ino: u64,
        extent: Extent,
        backing: Option<&dyn BackingFiles>,
    ) -> Option<u32> {
        let mut t = self.lock();
        // Even if passthrough was switched off since: the inode is in passthrough mode.
        if let Some(&id) = t.ids.get(&ino) {
            self.metrics
                .passthrough
                .opens
                .fetch_add(1, Ordering::Relaxed);
            return Some(id);
        }
        let may_register = t.on
            && t.new_ids
            && t.files.contains(&extent)
            && t.cached.get(&ino).copied().unwrap_or(0) == 0;
        let id = match backing {
            Some(b) if may_register => self.register(&mut t, b, ino, extent),
            _ => None,
        };
        match id {
            Some(id) => {
                self.metrics
                    .passthrough
                    .opens
                    .fetch_add(1, Ordering::Relaxed);
                Some(id)
            }
            None => {
                t.cached_open(ino);
                None
            }
        }
    }

    fn register(
        &self,
        t: &mut Table,
        b: &dyn BackingFiles,
        ino: u64,
        extent: Extent,
    ) -> Option<u32> {
        let path = self.dir.join(file_name(extent));
        // Never follows a symlink: the kernel would read whatever it points at.
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)
            .and_then(|f| match f.metadata()?.is_file() {
                true => Ok(f),
                false => Err(io::Error::other("not a regular file")),
            });
        let file = match opened {
            Ok(f) => f,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "backing file unreadable; normal reads");
                t.files.remove(&extent);
                return None;
            }
        };
        let id = match b.open(file.as_fd()) {
            Ok(id) => id,
            Err(e) => {
                if matches!(
                    e,
                    Errno::EPERM | Errno::ENOTTY | Errno::EOPNOTSUPP | Errno::EINVAL | Errno::ELOOP
                ) {
                    info!(dir = %self.dir.display(), error = %e, "FUSE passthrough refused by the kernel; this mount reads normally");
                    t.on = false;
                    self.metrics
                        .passthrough
                        .unavailable
                        .fetch_add(1, Ordering::Relaxed);
                } else {
                    warn!(path = %path.display(), error = %e, "registering a backing file failed; normal reads");
                }
                return None;
            }
        };
        // Recorded before the reply: a daemon that takes the connection over must reuse it.
        let logged = t
            .log
            .as_mut()
            .ok_or_else(|| io::Error::other("no id log"))
            .and_then(|f| f.write_all(format!("{ino} {id}\n").as_bytes()));
        if let Err(e) = logged {
            warn!(dir = %self.dir.display(), error = %e, "cannot record a backing id; normal reads");
            let _ = b.close(id);
            t.new_ids = false;
            return None;
        }
        t.ids.insert(ino, id);
        Some(id)
    }

    /// A RELEASE of `ino` with file handle `fh`.
    pub(crate) fn release(&self, ino: u64, fh: u64) {
        if fh & PASSTHROUGH_FH != 0 {
            return;
        }
        let mut t = self.lock();
        if let Some(n) = t.cached.get_mut(&ino) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                t.cached.remove(&ino);
            }
        }
    }

    /// Whether a backing file for `extent` should be written now (then it is claimed):
    /// passthrough usable, not written or claimed yet, and `local()` says every span is
    /// local.
    pub(crate) fn claim(&self, extent: Extent, local: impl FnOnce() -> bool) -> bool {
        let mut t = self.lock();
        if !t.on
            || !t.new_ids
            || extent.1 == 0
            || t.files.contains(&extent)
            || t.claimed.contains(&extent)
            || t.files.len() + t.claimed.len() >= MAX_BACKING_FILES
            || !local()
        {
            return false;
        }
        t.claimed.insert(extent);
        true
    }

    /// Writes the backing file of `extent` (claimed with [`Passthrough::claim`]) from
    /// verified spans, within the disk budget, once containers read nothing for
    /// [`WRITE_WHEN_QUIET`].
    pub(crate) async fn write(self: Arc<Self>, spans: Arc<SpanManager>, extent: Extent) {
        self.disk
            .wait_quiet(WRITE_WHEN_QUIET, MAX_WRITE_DELAY)
            .await;
        let Ok(_permit) = self.writer.acquire().await else {
            return;
        };
        // Queued behind other copies: a container may have started since.
        self.disk
            .wait_quiet(WRITE_WHEN_QUIET, MAX_WRITE_DELAY)
            .await;
        let range = extent.0..extent.0 + extent.1;
        // Gone, or evicted while waiting: a copy is not worth fetching the spans again.
        if !self.lock().on || !spans.is_local(range.clone()) {
            self.lock().claimed.remove(&extent);
            return;
        }
        let cost = disk_cost(extent.1);
        if !self.disk.try_reserve_disk(cost) {
            debug!(dir = %self.dir.display(), ?extent, "disk budget full: no backing file");
            return;
        }
        match self.copy(&spans, range).await {
            Ok(()) => {
                let mut t = self.lock();
                if !t.on {
                    // The layer went away (or passthrough was refused) while this was written:
                    // `remove_files` no longer counts it.
                    drop(t);
                    let _ = std::fs::remove_file(self.dir.join(file_name(extent)));
                    self.disk.release_disk(cost);
                    return;
                }
                t.claimed.remove(&extent);
                t.files.insert(extent);
                drop(t);
                self.metrics
                    .passthrough
                    .files_written
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.disk.release_disk(cost);
                warn!(dir = %self.dir.display(), ?extent, error = %e, "writing a backing file failed; normal reads for it");
            }
        }
    }

    async fn copy(&self, spans: &SpanManager, range: Range<u64>) -> io::Result<()> {
        let extent = (range.start, range.end - range.start);
        let tmp = self.dir.join(format!("{}.tmp", file_name(extent)));
        let done = self.dir.join(file_name(extent));
        let f = Arc::new(File::create(&tmp)?);
        let copied = async {
            let mut at = range.start;
            while at < range.end {
                let end = (at + CHUNK).min(range.end);
                let data = spans.read_internal(at..end).await?;
                let (f, off) = (f.clone(), at - range.start);
                tokio::task::spawn_blocking(move || f.write_all_at(&data, off))
                    .await
                    .map_err(io::Error::other)??;
                at = end;
            }
            let (f, tmp2, done2) = (f.clone(), tmp.clone(), done.clone());
            tokio::task::spawn_blocking(move || {
                f.set_permissions(std::fs::Permissions::from_mode(0o400))?;
                // Durable before it gets its final name: a file under that name is complete.
                f.sync_all()?;
                std::fs::rename(&tmp2, &done2)
            })
            .await
            .map_err(io::Error::other)?
        }
        .await;
        if copied.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        copied
    }

    /// Backing files on disk.
    pub fn file_count(&self) -> usize {
        self.lock().files.len()
    }

    /// Removes every backing file and gives their bytes back to the budget (the layer is
    /// gone). Files the kernel still has open stay readable until closed.
    pub fn remove_files(&self) {
        let mut t = self.lock();
        let bytes: u64 = t.files.iter().map(|x| disk_cost(x.1)).sum();
        t.files.clear();
        t.on = false;
        let _ = std::fs::remove_dir_all(&self.dir);
        self.disk.release_disk(bytes);
    }
}

#[cfg(test)]
#[path = "passthrough_tests.rs"]
pub(crate) mod tests;
