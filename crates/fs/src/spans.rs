//! Span manager: turns uncompressed byte ranges of a layer into verified bytes.
//!
//! A read finds the spans it touches; spans not cached are fetched with one HTTP range request
//! per run of consecutive missing spans, each span's compressed bytes are checked against the
//! zTOC digest (re-fetched on mismatch up to a limit), decompressed, written to the on-disk
//! cache and kept in a memory LRU. A per-span async lock makes concurrent readers of a span
//! share one fetch. Nothing unverified is ever returned.

use std::future::Future;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use soci_ztoc::{SpanId, Spans};

pub use crate::cache::{DiskBudget, MemoryCache};
use tracing::{debug, error, info, warn};

/// Reads byte ranges of the compressed layer blob (an HTTP range reader in production).
pub trait RangeReader: Send + Sync + 'static {
    /// Returns exactly the bytes `range` of the blob.
    fn read_range(
        &self,
        range: Range<u64>,
    ) -> Pin<Box<dyn Future<Output = io::Result<Bytes>> + Send + '_>>;
}

/// Counters shared by all layers (exported as Prometheus metrics).
#[derive(Debug, Default)]
pub struct FsMetrics {
    /// Compressed bytes fetched for reads.
    pub demand_bytes: AtomicU64,
    /// Compressed bytes fetched by the background fetcher.
    pub background_bytes: AtomicU64,
    /// Spans whose digest matched.
    pub spans_verified: AtomicU64,
    /// Spans whose digest did not match.
    pub verify_failures: AtomicU64,
    /// Reads answered with EIO.
    pub read_errors: AtomicU64,
    /// FUSE read latency histogram: counts per bucket of [`LATENCY_BUCKETS_MS`] (+Inf last).
    pub read_latency: [AtomicU64; 9],
    /// Sum of FUSE read latencies in microseconds.
    pub read_latency_sum_us: AtomicU64,
}

/// Upper bounds (ms) of the read latency histogram buckets.
pub const LATENCY_BUCKETS_MS: [f64; 8] = [0.1, 0.5, 1.0, 5.0, 20.0, 100.0, 500.0, 2000.0];

impl FsMetrics {
    /// Records one read latency.
    pub fn observe_read(&self, d: Duration) {
        let ms = d.as_secs_f64() * 1000.0;
        let i = LATENCY_BUCKETS_MS
            .iter()
            .position(|&b| ms <= b)
            .unwrap_or(LATENCY_BUCKETS_MS.len());
        self.read_latency[i].fetch_add(1, Ordering::Relaxed);
        self.read_latency_sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

static NEXT_LAYER_KEY: AtomicU64 = AtomicU64::new(1);

/// Span manager settings.
#[derive(Debug, Clone)]
pub struct SpanConfig {
    /// Directory for this layer's decompressed spans.
    pub cache_dir: PathBuf,
    /// Skip digest checks (`disable_verification`; never recommended).
    pub disable_verification: bool,
    /// Re-fetches after a digest mismatch.
    pub max_verification_retries: u32,
    /// Deadline for one fetch.
    pub fetch_timeout: Duration,
    /// Memory cache shared by all layers.
    pub memory: Arc<MemoryCache>,
    /// Disk budget shared by all layers.
    pub disk: Arc<DiskBudget>,
}

/// Why a span fetch is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// A reader is waiting.
    Demand,
    /// Background fill.
    Background,
}

/// Serves a layer's uncompressed bytes from spans.
pub struct SpanManager {
    layer: String,
    spans: Spans,
    reader: Arc<dyn RangeReader>,
    cfg: SpanConfig,
    metrics: Arc<FsMetrics>,
    /// This layer's key in the shared memory cache.
    key: u64,
    on_disk: Vec<AtomicBool>,
    /// Bytes of this layer's span files counted in the disk budget.
    disk_bytes: AtomicU64,
    locks: Vec<tokio::sync::Mutex<()>>,
    closed: AtomicBool,
    /// When the last demand read started (ms since `born`).
    last_demand_ms: AtomicU64,
    born: std::time::Instant,
}

/// Background fetch pacing.
#[derive(Debug, Clone)]
pub struct BackgroundConfig {
    /// Wait after mount before starting.
    pub delay: Duration,
    /// Pause between span fetches.
    pub period: Duration,
    /// Quiet time after a demand read before background fetching resumes.
    pub yield_to_demand: Duration,
    /// Shared by every layer: bounds background fetches across the daemon.
    pub slots: Arc<tokio::sync::Semaphore>,
}

fn eio(msg: String) -> io::Error {
    io::Error::other(msg)
}

impl SpanManager {
    /// A manager for layer `layer` (its digest, for logs) with span table `spans`.
    pub fn new(
        layer: String,
        spans: Spans,
        reader: Arc<dyn RangeReader>,
        cfg: SpanConfig,
        metrics: Arc<FsMetrics>,
    ) -> io::Result<Self> {
        std::fs::create_dir_all(&cfg.cache_dir)?;
        let n = spans.len();
        let mut found = 0u64;
        let on_disk: Vec<AtomicBool> = (0..n)
            .map(|i| {
                let len = std::fs::metadata(cfg.cache_dir.join(i.to_string())).map(|m| m.len());
                found += len.as_ref().copied().unwrap_or(0);
                AtomicBool::new(len.is_ok())
            })
            .collect();
        cfg.disk.add(found);
        Ok(SpanManager {
            layer,
            spans,
            reader,
            cfg,
            metrics,
            key: NEXT_LAYER_KEY.fetch_add(1, Ordering::Relaxed),
            on_disk,
            disk_bytes: AtomicU64::new(found),
            locks: (0..n).map(|_| tokio::sync::Mutex::new(())).collect(),
            closed: AtomicBool::new(false),
            last_demand_ms: AtomicU64::new(0),
            born: std::time::Instant::now(),
        })
    }

    /// Number of spans.
    pub fn span_count(&self) -> usize {
        self.spans.len()
    }

    /// Spans already fetched.
    pub fn cached_count(&self) -> usize {
        self.on_disk
            .iter()
            .filter(|b| b.load(Ordering::Relaxed))
            .count()
    }

    /// Removes this layer's span files and gives their bytes back to the disk budget.
    pub fn remove_cache(&self) {
        let _ = std::fs::remove_dir_all(&self.cfg.cache_dir);
        for b in &self.on_disk {
            b.store(false, Ordering::Release);
        }
        self.cfg
            .disk
            .release(self.disk_bytes.swap(0, Ordering::AcqRel));
    }

    /// Stops background work (the layer is being unmounted).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.cfg.memory.forget(self.key);
    }

    fn is_cached(&self, id: SpanId) -> bool {
        self.on_disk[id].load(Ordering::Acquire) || self.cfg.memory.contains((self.key, id))
    }

    /// Appends bytes `rel` of span `id` to `out`: from memory, from disk, or fetched again if
    /// it was evicted from memory without being on disk (over the disk budget).
    async fn append_span(&self, id: SpanId, rel: Range<u64>, out: &mut Vec<u8>) -> io::Result<()> {
        for _ in 0..3 {
            if let Some(data) = self.cfg.memory.get((self.key, id)) {
                out.extend_from_slice(&data[rel.start as usize..rel.end as usize]);
                return Ok(());
            }
            match std::fs::File::open(self.cfg.cache_dir.join(id.to_string())) {
                Ok(f) => {
                    let at = out.len();
                    out.resize(at + (rel.end - rel.start) as usize, 0);
                    return f.read_exact_at(&mut out[at..], rel.start);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            self.ensure(id..id + 1, Priority::Demand).await?;
        }
        Err(eio(format!(
            "layer {}: span {id} evicted from memory before it could be read (memory cache too small for the disk budget)",
            self.layer
        )))
    }

    /// Reads uncompressed bytes `range` of the layer.
    pub async fn read(&self, range: Range<u64>) -> io::Result<Vec<u8>> {
        self.last_demand_ms
            .store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
        let ids = self.spans.spans_for(&range);
        self.ensure(ids.clone(), Priority::Demand).await?;
        let mut out = Vec::with_capacity((range.end - range.start) as usize);
        for id in ids {
            let s = self.spans.span(id).map_err(|e| eio(e.to_string()))?;
            let from = range.start.max(s.uncompressed.start);
            let to = range.end.min(s.uncompressed.end);
            if from >= to {
                continue;
            }
            let rel = (from - s.uncompressed.start)..(to - s.uncompressed.start);
            self.append_span(id, rel, &mut out).await?;
        }
        Ok(out)
    }

    /// Makes sure spans `ids` are cached, fetching missing runs.
    pub async fn ensure(&self, ids: Range<SpanId>, prio: Priority) -> io::Result<()> {
        let missing: Vec<SpanId> = ids.filter(|&i| !self.is_cached(i)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        // Lock in ascending order (no deadlock); whoever fetched first filled the cache.
        let mut guards = Vec::with_capacity(missing.len());
        for &id in &missing {
            guards.push(self.locks[id].lock().await);
        }
        let still: Vec<SpanId> = missing
            .into_iter()
            .filter(|&i| !self.is_cached(i))
            .collect();
        let mut start = 0;
        while start < still.len() {
            let mut end = start + 1;
            while end < still.len() && still[end] == still[end - 1] + 1 {
                end += 1;
            }
            self.fetch_run(still[start]..still[end - 1] + 1, prio)
                .await?;
            start = end;
        }
        drop(guards);
        Ok(())
    }

    async fn fetch_run(&self, run: Range<SpanId>, prio: Priority) -> io::Result<()> {
        let first = self.spans.span(run.start).map_err(|e| eio(e.to_string()))?;
        let last = self
            .spans
            .span(run.end - 1)
            .map_err(|e| eio(e.to_string()))?;
        let range = first.compressed.start..last.compressed.end;
        let mut attempt = 0;
        loop {
            let data = match tokio::time::timeout(
                self.cfg.fetch_timeout,
                self.reader.read_range(range.clone()),
            )
            .await
            {
                Ok(Ok(d)) => d,
                // A broken transfer (reset, truncated body) is fetched again like a bad span.
                Ok(Err(e)) if attempt < self.cfg.max_verification_retries => {
                    attempt += 1;
                    warn!(layer = %self.layer, spans = ?run, attempt, error = %e, "span fetch failed; fetching again");
                    continue;
                }
                Ok(Err(e)) => {
                    error!(layer = %self.layer, spans = ?run, error = %e, "span fetch failed");
                    return Err(eio(format!(
                        "layer {}: fetching spans {run:?}: {e}",
                        self.layer
                    )));
                }
                // A stalled registry is not waited for twice: the reader gets EIO now.
                Err(_) => {
                    error!(layer = %self.layer, spans = ?run, timeout = ?self.cfg.fetch_timeout, "span fetch timed out");
                    return Err(eio(format!(
                        "layer {}: fetching spans {run:?} timed out",
                        self.layer
                    )));
                }
            };
            if data.len() as u64 != range.end - range.start {
                return Err(eio(format!(
                    "layer {}: short read of spans {run:?}",
                    self.layer
                )));
            }
            let counter = match prio {
                Priority::Demand => &self.metrics.demand_bytes,
                Priority::Background => &self.metrics.background_bytes,
            };
            counter.fetch_add(data.len() as u64, Ordering::Relaxed);
            match self.verify_and_store(&run, range.start, data).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < self.cfg.max_verification_retries => {
                    attempt += 1;
                    warn!(layer = %self.layer, spans = ?run, attempt, error = %e, "span verification failed; fetching again");
                }
                Err(e) => {
                    error!(layer = %self.layer, spans = ?run, error = %e, "span verification failed; giving up");
                    return Err(e);
                }
            }
        }
    }

    async fn verify_and_store(
        &self,
        run: &Range<SpanId>,
        base: u64,
        data: Bytes,
    ) -> io::Result<()> {
        let spans = self.spans.clone();
        let verify = !self.cfg.disable_verification;
        let run2 = run.clone();
        let layer = self.layer.clone();
        let dir = self.cfg.cache_dir.clone();
        let disk = self.cfg.disk.clone();
        // Verification, decompression and the cache file writes are CPU and blocking I/O work:
        // off the async workers.
        let decoded: Vec<(SpanId, Vec<u8>, bool)> = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for id in run2 {
                let s = spans.span(id).map_err(|e| eio(e.to_string()))?;
                let slice =
                    &data[(s.compressed.start - base) as usize..(s.compressed.end - base) as usize];
                if verify {
                    spans
                        .verify(id, slice)
                        .map_err(|e| eio(format!("layer {layer}: {e}")))?;
                }
                let plain = spans
                    .decompress(id, slice)
                    .map_err(|e| eio(format!("layer {layer}: {e}")))?;
                // Over the disk budget the span is kept in memory only.
                let stored = disk.try_reserve(plain.len() as u64);
                if stored {
                    let tmp = dir.join(format!("{id}.tmp"));
                    let written = std::fs::write(&tmp, &plain)
                        .and_then(|()| std::fs::rename(&tmp, dir.join(id.to_string())));
                    if let Err(e) = written {
                        disk.release(plain.len() as u64);
                        return Err(e);
                    }
                }
                out.push((id, plain, stored));
            }
            Ok::<_, io::Error>(out)
        })
        .await
        .map_err(|e| eio(format!("decompression task: {e}")))?
        .inspect_err(|_| {
            self.metrics.verify_failures.fetch_add(1, Ordering::Relaxed);
        })?;
        for (id, plain, stored) in decoded {
            if stored {
                self.disk_bytes
                    .fetch_add(plain.len() as u64, Ordering::AcqRel);
                self.on_disk[id].store(true, Ordering::Release);
            }
            self.cfg.memory.put((self.key, id), Arc::new(plain));
            // Counted once the span is servable, so the metric never runs ahead of the cache.
            self.metrics.spans_verified.fetch_add(1, Ordering::Relaxed);
        }
        debug!(layer = %self.layer, spans = ?run, "spans fetched and verified");
        Ok(())
    }

    /// Fetches every span not yet cached, one at a time: after `cfg.delay`, pausing
    /// `cfg.period` between spans, holding one of the shared `cfg.slots` per fetch, and backing
    /// off while demand reads are active; until done or closed.
    pub async fn background_fill(self: Arc<Self>, cfg: BackgroundConfig) {
        tokio::time::sleep(cfg.delay).await;
        for id in 0..self.spans.len() {
            loop {
                if self.closed.load(Ordering::Relaxed) {
                    return;
                }
                let since = self.born.elapsed().as_millis() as u64
                    - self.last_demand_ms.load(Ordering::Relaxed);
                let quiet = cfg.yield_to_demand.as_millis() as u64;
                if self.last_demand_ms.load(Ordering::Relaxed) == 0 || since >= quiet {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(quiet - since)).await;
            }
            if self.is_cached(id) {
                continue;
            }
            let want = self
                .spans
                .span(id)
                .map(|s| s.uncompressed.end - s.uncompressed.start);
            if !self.cfg.disk.fits(want.unwrap_or(0)) {
                info!(layer = %self.layer, used = self.cfg.disk.used(), "span disk cache is full; background fetch stops");
                return;
            }
            let Ok(_permit) = cfg.slots.acquire().await else {
                return;
            };
            if let Err(e) = self.ensure(id..id + 1, Priority::Background).await {
                warn!(layer = %self.layer, span = id, error = %e, "background fetch failed; stopping it");
                return;
            }
            drop(_permit);
            tokio::time::sleep(cfg.period).await;
        }
        debug!(layer = %self.layer, "background fetch complete");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::sync::Mutex;

    /// An in-memory blob that records requests and can corrupt the first N responses.
    struct FakeReader {
        blob: Vec<u8>,
        calls: Mutex<Vec<Range<u64>>>,
        corrupt: AtomicU32,
    }

    impl RangeReader for FakeReader {
        fn read_range(
            &self,
            range: Range<u64>,
        ) -> Pin<Box<dyn Future<Output = io::Result<Bytes>> + Send + '_>> {
            Box::pin(async move {
                self.calls.lock().unwrap().push(range.clone());
                tokio::time::sleep(Duration::from_millis(20)).await;
                let mut data = self.blob[range.start as usize..range.end as usize].to_vec();
                if self.corrupt.load(Ordering::SeqCst) > 0 {
                    self.corrupt.fetch_sub(1, Ordering::SeqCst);
                    data[0] ^= 1;
                }
                Ok(Bytes::from(data))
            })
        }
    }

    fn layer() -> (Vec<u8>, soci_ztoc::Ztoc) {
        let mut b = tar::Builder::new(Vec::new());
        let mut x: u32 = 7;
        let data: Vec<u8> = (0..300_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, "f", data.as_slice()).unwrap();
        let blob = b.into_inner().unwrap();
        let opts = soci_ztoc::BuildOptions {
            span_size: 65536,
            ..Default::default()
        };
        let z = soci_ztoc::build(blob.as_slice(), &opts).unwrap();
        (blob, z)
    }

    fn manager(
        corrupt: u32,
        retries: u32,
    ) -> (
        Arc<SpanManager>,
        Arc<FakeReader>,
        Vec<u8>,
        tempfile::TempDir,
    ) {
        manager_with(corrupt, retries, DiskBudget::new(0))
    }

    fn manager_with(
        corrupt: u32,
        retries: u32,
        disk: Arc<DiskBudget>,
    ) -> (
        Arc<SpanManager>,
        Arc<FakeReader>,
        Vec<u8>,
        tempfile::TempDir,
    ) {
        let (blob, z) = layer();
        let reader = Arc::new(FakeReader {
            blob: blob.clone(),
            calls: Mutex::new(Vec::new()),
            corrupt: AtomicU32::new(corrupt),
        });
        let dir = tempfile::tempdir().unwrap();
        let cfg = SpanConfig {
            cache_dir: dir.path().join("c"),
            disable_verification: false,
            max_verification_retries: retries,
            fetch_timeout: Duration::from_secs(5),
            memory: MemoryCache::new(100_000),
            disk,
        };
        let m = SpanManager::new(
            "sha256:test".into(),
            z.spans().unwrap(),
            reader.clone(),
            cfg,
            Arc::new(FsMetrics::default()),
        )
        .unwrap();
        (Arc::new(m), reader, blob, dir)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_readers_share_one_coalesced_fetch() {
        let (m, reader, blob, _d) = manager(0, 0);
        // 512..200_000 touches four 64 KiB spans: one range request for all of them.
        let reads = (0..8).map(|_| {
            let m = m.clone();
            tokio::spawn(async move { m.read(512..200_000).await.unwrap() })
        });
        for r in reads {
            assert_eq!(r.await.unwrap(), &blob[512..200_000]);
        }
        let calls = reader.calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert_eq!(m.cached_count(), 4);
        // Served from the caches afterwards, memory or disk.
        assert_eq!(m.read(100..150_000).await.unwrap(), &blob[100..150_000]);
        assert_eq!(reader.calls.lock().unwrap().len(), 1);
        assert!(
            m.cfg.memory.bytes() <= 100_000,
            "memory cache stays within its budget"
        );
        m.close();
        assert_eq!(
            m.cfg.memory.bytes(),
            0,
            "a closed layer leaves nothing in memory"
        );
    }

    #[tokio::test]
    async fn bad_span_is_refetched_then_eio() {
        let (m, reader, blob, _d) = manager(1, 1);
        assert_eq!(
            m.read(0..1000).await.unwrap(),
            &blob[0..1000],
            "one retry fixes one bad fetch"
        );
        assert_eq!(reader.calls.lock().unwrap().len(), 2);
        let (m, _reader, _blob, _d) = manager(5, 2);
        assert!(m.read(0..1000).await.is_err(), "never unverified bytes");
        assert_eq!(m.cached_count(), 0);
    }

    #[tokio::test]
    async fn background_fill_caches_everything() {
        let (m, reader, blob, _d) = manager(0, 0);
        let slots = Arc::new(tokio::sync::Semaphore::new(1));
        let cfg = BackgroundConfig {
            delay: Duration::ZERO,
            period: Duration::ZERO,
            yield_to_demand: Duration::ZERO,
            slots,
        };
        m.clone().background_fill(cfg).await;
        assert_eq!(m.cached_count(), m.span_count());
        let n = reader.calls.lock().unwrap().len();
        assert_eq!(
            m.read(0..blob.len() as u64 - 2048).await.unwrap().len(),
            blob.len() - 2048
        );
        assert_eq!(
            reader.calls.lock().unwrap().len(),
            n,
            "no fetch after the fill"
        );
    }

    #[tokio::test]
    async fn disk_budget_bounds_the_span_files_and_is_given_back() {
        let one_span = 64 * 1024;
        let disk = DiskBudget::new(2 * one_span);
        let (m, _reader, blob, d) = manager_with(0, 0, disk.clone());
        let all = 0..blob.len() as u64 - 2048;
        assert_eq!(m.read(all.clone()).await.unwrap().len(), all.end as usize);
        assert!(m.cached_count() <= 2 && m.cached_count() >= 1);
        assert!(disk.used() <= 2 * one_span);
        let files: u64 = std::fs::read_dir(d.path().join("c"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert_eq!(files, disk.used());
        // Spans that did not fit are still served (from memory or fetched again).
        assert_eq!(m.read(all.clone()).await.unwrap().len(), all.end as usize);
        // A background fill stops at the budget instead of fetching for nothing.
        let cfg = BackgroundConfig {
            delay: Duration::ZERO,
            period: Duration::ZERO,
            yield_to_demand: Duration::ZERO,
            slots: Arc::new(tokio::sync::Semaphore::new(1)),
        };
        m.clone().background_fill(cfg).await;
        assert!(m.cached_count() < m.span_count());
        m.remove_cache();
        assert_eq!(disk.used(), 0);
        assert_eq!(m.cached_count(), 0);
    }
}
