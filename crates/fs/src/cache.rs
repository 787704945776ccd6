//! The span cache: verified, decompressed spans of every layer, in memory (an LRU bounded by
//! bytes) and on disk (one file per span, bounded by a byte budget).
//!
//! Why one type: memory, disk budget and span files answer one question together ("do we
//! hold span k of layer L, and where?") and must stay consistent (a file counted in the
//! budget exists; a span over the budget lives in memory only). Callers get a narrow API:
//! [`LayerCache::lookup`] hands back the bytes of the spans held, [`LayerCache::store`] keeps
//! freshly verified spans and hands them back. What a caller holds stays valid whatever is
//! evicted meanwhile (buffers are reference counted), so a read never has to look again.
//!
//! Disk I/O never runs on the async workers: reads and the start-up scan go to the blocking
//! pool, at most [`DISK_READS`] reads at once; writes happen in the caller's blocking
//! decompression task ([`LayerCache::write_blocking`]).

use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use lru::LruCache;
use soci_ztoc::{SpanId, Spans};

pub use crate::spans::negative::{FAILED_FETCH_MEMO, POISONED_SPAN_TTL};

type SpanLru = LruCache<(u64, SpanId), Bytes>;

/// Span file reads on the blocking pool at once (all layers).
pub const DISK_READS: usize = 16;

/// Decompressed span bytes being produced at once (all layers), in MiB. A span may claim up
/// to [`soci_ztoc::MAX_SPAN_BYTES`]; without this bound, concurrent reads of a hostile zTOC's
/// huge spans (16 FUSE requests in flight, read-ahead and prefetch beside them) could hold
/// gigabytes before any of it reaches the memory cache's budget.
pub const DECODE_BUDGET_MIB: u32 = 512;

static NEXT_LAYER_KEY: AtomicU64 = AtomicU64::new(1);

/// Verified, decompressed spans of all layers: memory LRU, disk budget and span files.
pub struct SpanCache {
    /// Spans by (layer key, span id), and the bytes they hold.
    memory: Mutex<(SpanLru, usize)>,
    memory_budget: usize,
    disk_limit: u64,
    disk_used: AtomicU64,
    disk_reads: tokio::sync::Semaphore,
    /// [`DECODE_BUDGET_MIB`], as permits of 1 MiB.
    decoding: Arc<tokio::sync::Semaphore>,
    decode_budget_mib: u32,
    /// Bytes being decompressed now, and the most at once (for tests and the curious).
    decoding_now: AtomicU64,
    decoding_peak: AtomicU64,
    /// When the last demand read of any layer started, in ms since `born` (0: none yet).
    last_demand_ms: AtomicU64,
    born: std::time::Instant,
}

/// Room in the decode budget, held while a run of spans is decompressed.
pub(crate) struct DecodeSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    bytes: u64,
    shared: Arc<SpanCache>,
}

impl Drop for DecodeSlot {
    fn drop(&mut self) {
        self.shared
            .decoding_now
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl SpanCache {
    /// A cache of at most `memory_bytes` in memory and `disk_bytes` of span files on disk
    /// (0: no disk limit).
    pub fn new(memory_bytes: usize, disk_bytes: u64) -> Arc<SpanCache> {
        SpanCache::with_decode_budget(memory_bytes, disk_bytes, DECODE_BUDGET_MIB)
    }

    /// As [`SpanCache::new`], with a decode budget of `mib` MiB (at least 1).
    pub(crate) fn with_decode_budget(
        memory_bytes: usize,
        disk_bytes: u64,
        mib: u32,
    ) -> Arc<SpanCache> {
        let mib = mib.max(1);
        Arc::new(SpanCache {
            decoding: Arc::new(tokio::sync::Semaphore::new(mib as usize)),
            decode_budget_mib: mib,
            decoding_now: AtomicU64::new(0),
            decoding_peak: AtomicU64::new(0),
            memory: Mutex::new((LruCache::unbounded(), 0)),
            memory_budget: memory_bytes,
            disk_limit: disk_bytes,
            disk_used: AtomicU64::new(0),
            disk_reads: tokio::sync::Semaphore::new(DISK_READS),
            last_demand_ms: AtomicU64::new(0),
            born: std::time::Instant::now(),
        })
    }

    /// Notes that a container read something (any layer, now).
    pub(crate) fn stamp_demand(&self) {
        let now = (self.born.elapsed().as_millis() as u64).max(1);
        self.last_demand_ms.store(now, Ordering::Relaxed);
    }

    /// Waits until no container read started for `quiet` (any layer), or `max` passed: work
    /// that only pays off later (passthrough copies) waits for it instead of taking CPU and
    /// disk from a start.
    pub(crate) async fn wait_quiet(&self, quiet: std::time::Duration, max: std::time::Duration) {
        let give_up = tokio::time::Instant::now() + max;
        loop {
            let last = self.last_demand_ms.load(Ordering::Relaxed);
            // A read may stamp a later time than this elapsed() (a race): saturating.
            let since = (self.born.elapsed().as_millis() as u64).saturating_sub(last);
            let quiet_ms = quiet.as_millis() as u64;
            if last == 0 || since >= quiet_ms || tokio::time::Instant::now() >= give_up {
                return;
            }
            let wake =
                tokio::time::Instant::now() + std::time::Duration::from_millis(quiet_ms - since);
            tokio::time::sleep_until(wake.min(give_up)).await;
        }
    }

    /// Bytes of spans held in memory (gauge `soci_span_cache_bytes{place="memory"}`).
    pub fn memory_bytes(&self) -> usize {
        self.lock_memory().1
    }

    /// The most span bytes decompressed at once so far (all layers).
    pub fn decoding_peak_bytes(&self) -> u64 {
        self.decoding_peak.load(Ordering::Relaxed)
    }

    /// Bytes of span files on disk (gauge `soci_span_cache_bytes{place="disk"}`).
    pub fn disk_bytes(&self) -> u64 {
        self.disk_used.load(Ordering::Relaxed)
    }

    /// Whether `n` more bytes of span files would fit on disk.
    pub fn disk_fits(&self, n: u64) -> bool {
        self.disk_limit == 0 || self.disk_bytes().saturating_add(n) <= self.disk_limit
    }

    /// The view of one layer whose span files live in `dir`.
    pub(crate) fn layer(self: &Arc<Self>, dir: PathBuf, spans: &Spans) -> Arc<LayerCache> {
        Arc::new(LayerCache {
            shared: self.clone(),
            key: NEXT_LAYER_KEY.fetch_add(1, Ordering::Relaxed),
            dir,
            sizes: (0..spans.len())
                .map(|id| {
                    spans
                        .span(id)
                        .map_or(0, |s| s.uncompressed.end - s.uncompressed.start)
                })
                .collect(),
            on_disk: (0..spans.len()).map(|_| AtomicBool::new(false)).collect(),
            disk_bytes: AtomicU64::new(0),
            scanned: tokio::sync::OnceCell::new(),
        })
    }

    fn lock_memory(&self) -> std::sync::MutexGuard<'_, (SpanLru, usize)> {
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn memory_get(&self, key: (u64, SpanId)) -> Option<Bytes> {
        self.lock_memory().0.get(&key).cloned()
    }

    fn memory_put(&self, key: (u64, SpanId), data: Bytes) {
        if data.len() > self.memory_budget {
            return;
        }
        let mut g = self.lock_memory();
        let (lru, bytes) = &mut *g;
        *bytes += data.len();
        if let Some(old) = lru.put(key, data) {
            *bytes -= old.len();
        }
        while *bytes > self.memory_budget {
            match lru.pop_lru() {
                Some((_, d)) => *bytes -= d.len(),
                None => break,
            }
        }
    }

    /// Takes `n` bytes of the disk budget if they fit (span files, passthrough backing files).
    pub(crate) fn try_reserve_disk(&self, n: u64) -> bool {
        self.disk_used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                let after = u.saturating_add(n);
                (self.disk_limit == 0 || after <= self.disk_limit).then_some(after)
            })
            .is_ok()
    }

    /// Counts `n` bytes already on disk (found at start-up), limit or not.
    pub(crate) fn add_disk(&self, n: u64) {
        self.disk_used.fetch_add(n, Ordering::AcqRel);
    }

    /// Gives back `n` bytes of the disk budget.
    pub(crate) fn release_disk(&self, n: u64) {
        let _ = self
            .disk_used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(n))
            });
    }
}

impl std::fmt::Debug for SpanCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SpanCache(memory {} of {} bytes, disk {} of {} bytes)",
            self.memory_bytes(),
            self.memory_budget,
            self.disk_bytes(),
            self.disk_limit
        )
    }
}

/// One layer's spans in the [`SpanCache`].
pub(crate) struct LayerCache {
    shared: Arc<SpanCache>,
    /// This layer's key in the shared memory LRU.
    key: u64,
    dir: PathBuf,
    /// Uncompressed size of each span (the size of its file).
    sizes: Vec<u64>,
    on_disk: Vec<AtomicBool>,
    /// Bytes of this layer's span files counted in the disk budget.
    disk_bytes: AtomicU64,
    /// The directory exists and files left by an earlier run are counted.
    scanned: tokio::sync::OnceCell<()>,
}

/// Where [`LayerCache::lookup`] found a span.
#[derive(Debug, Clone)]
pub(crate) enum Held {
    /// Its bytes (when asked for).
    Bytes(Bytes),
    /// Held, bytes not read (a caller that only wants the span local).
    Local,
    /// Not held.
    Missing,
}

impl LayerCache {
    /// Creates the directory and counts span files an earlier run left (once; blocking
    /// pool). Files of the wrong size are removed.
    pub(crate) async fn ready(self: &Arc<Self>) -> io::Result<()> {
        let me = self.clone();
        self.scanned
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || me.scan())
                    .await
                    .map_err(|e| io::Error::other(format!("span cache scan task: {e}")))?
            })
            .await
            .map(|_| ())
    }

    fn scan(&self) -> io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let mut found = 0;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<SpanId>().ok())
                .filter(|&id| id < self.sizes.len())
            else {
                let _ = std::fs::remove_file(entry.path());
                continue;
            };
            match entry.metadata() {
                Ok(m) if m.len() == self.sizes[id] => {
                    self.on_disk[id].store(true, Ordering::Release);
                    found += m.len();
                }
                _ => {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        self.shared.disk_used.fetch_add(found, Ordering::AcqRel);
        self.disk_bytes.fetch_add(found, Ordering::AcqRel);
        Ok(())
    }

    /// Whether span `id` is held (memory or disk).
    pub(crate) fn is_local(&self, id: SpanId) -> bool {
        self.on_disk
            .get(id)
            .is_some_and(|b| b.load(Ordering::Acquire))
            || self.shared.lock_memory().0.contains(&(self.key, id))
    }

    /// Spans with a file on disk.
    pub(crate) fn on_disk_count(&self) -> usize {
        self.on_disk
            .iter()
            .filter(|b| b.load(Ordering::Relaxed))
            .count()
    }

    /// What is held of spans `ids`: their bytes when `bytes` (memory first, then the span
    /// file on the blocking pool), else only whether they are held.
    /// Waits (until `deadline`) for room to decompress spans `ids` in the daemon-wide decode
    /// budget; a run larger than the whole budget takes all of it (it still proceeds).
    pub(crate) async fn decode_slot(
        &self,
        ids: std::ops::Range<SpanId>,
        deadline: tokio::time::Instant,
    ) -> io::Result<DecodeSlot> {
        let bytes: u64 = ids.map(|i| self.sizes.get(i).copied().unwrap_or(0)).sum();
        let shared = &self.shared;
        let mib = bytes
            .div_ceil(1 << 20)
            .clamp(1, u64::from(shared.decode_budget_mib)) as u32;
        let permit =
            tokio::time::timeout_at(deadline, shared.decoding.clone().acquire_many_owned(mib))
                .await
                .map_err(|_| io::Error::other("timed out waiting for the span decode budget"))?
                .map_err(|_| io::Error::other("span decode budget closed"))?;
        let now = shared.decoding_now.fetch_add(bytes, Ordering::Relaxed) + bytes;
        shared.decoding_peak.fetch_max(now, Ordering::Relaxed);
        Ok(DecodeSlot {
            _permit: permit,
            bytes,
            shared: shared.clone(),
        })
    }

    pub(crate) async fn lookup(
        self: &Arc<Self>,
        ids: &[SpanId],
        bytes: bool,
    ) -> io::Result<Vec<Held>> {
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            if !bytes {
                out.push(if self.is_local(id) {
                    Held::Local
                } else {
                    Held::Missing
                });
                continue;
            }
            if let Some(b) = self.shared.memory_get((self.key, id)) {
                out.push(Held::Bytes(b));
                continue;
            }
            if !self.on_disk[id].load(Ordering::Acquire) {
                out.push(Held::Missing);
                continue;
            }
            out.push(match self.read_file(id).await? {
                Some(b) => Held::Bytes(b),
                None => Held::Missing,
            });
        }
        Ok(out)
    }

    /// Reads span `id`'s file (blocking pool, bounded); `None` if it is gone.
    async fn read_file(self: &Arc<Self>, id: SpanId) -> io::Result<Option<Bytes>> {
        let _permit = self
            .shared
            .disk_reads
            .acquire()
            .await
            .map_err(|_| io::Error::other("span cache closed"))?;
        let me = self.clone();
        let read = tokio::task::spawn_blocking(move || {
            let path = me.dir.join(id.to_string());
            let f = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            let mut buf = vec![0u8; me.sizes[id] as usize];
            f.read_exact_at(&mut buf, 0)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            Ok(Some(Bytes::from(buf)))
        })
        .await
        .map_err(|e| io::Error::other(format!("span file read task: {e}")))??;
        if let Some(b) = &read {
            self.shared.memory_put((self.key, id), b.clone());
        }
        Ok(read)
    }

    /// Bytes `within` (offsets inside span `id`) if the span is held: a slice of it in memory,
    /// else a positional read of just those bytes from its file (blocking pool, bounded), which
    /// neither loads the whole span nor puts it in memory. `None` if not held (or its file is
    /// gone, or `within` is not inside the span).
    pub(crate) async fn read_slice(
        self: &Arc<Self>,
        id: SpanId,
        within: std::ops::Range<u64>,
    ) -> io::Result<Option<Bytes>> {
        if within.start > within.end || within.end > self.sizes.get(id).copied().unwrap_or(0) {
            return Ok(None);
        }
        let (from, to) = (within.start as usize, within.end as usize);
        if let Some(b) = self.shared.memory_get((self.key, id)) {
            return Ok(b.get(from..to).map(|_| b.slice(from..to)));
        }
        if !self.on_disk[id].load(Ordering::Acquire) {
            return Ok(None);
        }
        let _permit = self
            .shared
            .disk_reads
            .acquire()
            .await
            .map_err(|_| io::Error::other("span cache closed"))?;
        let path = self.dir.join(id.to_string());
        tokio::task::spawn_blocking(move || {
            let f = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            let mut buf = vec![0u8; to - from];
            f.read_exact_at(&mut buf, from as u64)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            Ok(Some(Bytes::from(buf)))
        })
        .await
        .map_err(|e| io::Error::other(format!("span file read task: {e}")))?
    }

    /// Writes span `id`'s file if the disk budget allows (blocking: call from a blocking
    /// task). Returns whether it was written; over the budget the span stays in memory only.
    pub(crate) fn write_blocking(&self, id: SpanId, plain: &[u8]) -> io::Result<bool> {
        let n = plain.len() as u64;
        if !self.shared.try_reserve_disk(n) {
            return Ok(false);
        }
        let tmp = self.dir.join(format!("{id}.tmp"));
        let written = std::fs::write(&tmp, plain)
            .and_then(|()| std::fs::rename(&tmp, self.dir.join(id.to_string())));
        if let Err(e) = written {
            self.shared.release_disk(n);
            return Err(io::Error::new(
                e.kind(),
                format!("span cache file {}: {e}", tmp.display()),
            ));
        }
        Ok(true)
    }

    /// Keeps a verified span (its file, if any, already written by
    /// [`LayerCache::write_blocking`]) and hands its bytes back.
    pub(crate) fn store(&self, id: SpanId, plain: Vec<u8>, on_disk: bool) -> Bytes {
        let b = Bytes::from(plain);
        if on_disk {
            self.disk_bytes.fetch_add(b.len() as u64, Ordering::AcqRel);
            self.on_disk[id].store(true, Ordering::Release);
        }
        self.shared.memory_put((self.key, id), b.clone());
        b
    }

    /// Drops this layer's spans from memory.
    pub(crate) fn forget_memory(&self) {
        let mut g = self.shared.lock_memory();
        let (lru, bytes) = &mut *g;
        let keys: Vec<(u64, SpanId)> = lru
            .iter()
            .filter(|(k, _)| k.0 == self.key)
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            if let Some(d) = lru.pop(&k) {
                *bytes -= d.len();
            }
        }
    }

    /// Removes this layer's span files and gives their bytes back to the disk budget.
    pub(crate) fn remove_files(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        for b in &self.on_disk {
            b.store(false, Ordering::Release);
        }
        self.shared
            .release_disk(self.disk_bytes.swap(0, Ordering::AcqRel));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_budget_bounds_and_releases() {
        let c = SpanCache::new(0, 100);
        assert!(c.try_reserve_disk(60));
        assert!(!c.try_reserve_disk(50));
        assert!(c.disk_fits(40) && !c.disk_fits(41));
        c.release_disk(60);
        assert!(c.try_reserve_disk(100));
        let unlimited = SpanCache::new(0, 0);
        assert!(unlimited.try_reserve_disk(u64::MAX / 2));
    }

    #[test]
    fn memory_is_bounded_by_bytes_and_keeps_what_fits() {
        let c = SpanCache::new(10, 0);
        c.memory_put((1, 0), Bytes::from(vec![0u8; 6]));
        c.memory_put((1, 1), Bytes::from(vec![0u8; 6]));
        assert_eq!(c.memory_bytes(), 6);
        assert!(c.memory_get((1, 0)).is_none() && c.memory_get((1, 1)).is_some());
        c.memory_put((1, 2), Bytes::from(vec![0u8; 11]));
        assert!(
            c.memory_get((1, 2)).is_none(),
            "larger than the budget: not kept"
        );
    }
}
