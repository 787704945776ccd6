//! Span manager: turns uncompressed byte ranges of a layer into verified bytes.
//!
//! A read finds the spans it touches; spans not cached are fetched with one HTTP range request
//! per run of consecutive missing spans, each span's compressed bytes are checked against the
//! zTOC digest (re-fetched on mismatch up to a limit), decompressed, written to the on-disk
//! cache and kept in a memory LRU. A per-span async lock makes concurrent readers of a span
//! share one fetch. Nothing unverified is ever returned.
//!
//! Failure rules, so a hostile or broken registry costs bounded time and never wrong bytes:
//! - one deadline per read (`fetch_timeout`): waiting for another reader's fetch, every
//!   attempt and the registry client's own retries all fit inside it;
//! - transport failures are retried by the registry client only; here only digest
//!   mismatches are fetched again (up to `max_verification_retries`);
//! - a span that still fails verification is refused at once for `poisoned_ttl`, then gets
//!   one fresh try; a failed fetch is shared only with reads arriving within
//!   [`crate::cache::FAILED_FETCH_MEMO`] (the kernel's immediate retry of the same page);
//! - a read the spans cannot fully cover (a zTOC entry past the end of the layer) is EIO,
//!   never short data;
//! - a source without range support ([`RangeReader::whole_only`]) is read whole, once per
//!   layer, by one task that verifies and caches span by span as the bytes stream past.

use std::future::Future;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use soci_ztoc::{SpanId, Spans};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

pub use crate::cache::{DiskBudget, MemoryCache, POISONED_SPAN_TTL};
use crate::cache::{NegativeCache, Standing};
use tracing::{debug, error, warn};

/// A boxed future borrowing the reader.
pub type ReadFuture<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'a>>;

/// Reads byte ranges of the compressed layer blob (an HTTP range reader in production).
pub trait RangeReader: Send + Sync + 'static {
    /// Returns exactly the bytes `range` of the blob, within `deadline` (retries included).
    fn read_range(&self, range: Range<u64>, deadline: Instant) -> ReadFuture<'_, Bytes>;

    /// Whether the source was found not to support ranges: the blob is then read whole.
    fn whole_only(&self) -> bool {
        false
    }

    /// Sends the whole blob, in order, into `tx` (bounded by the blob's descriptor size).
    fn read_whole(&self, tx: mpsc::Sender<Bytes>) -> ReadFuture<'_, ()> {
        drop(tx);
        Box::pin(async {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "whole-blob reads not supported",
            ))
        })
    }
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
    /// Upstream soci-snapshotter's per-layer families.
    pub upstream: crate::metrics::UpstreamMetrics,
    /// FUSE passthrough.
    pub passthrough: crate::passthrough::PassthroughMetrics,
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
    /// Deadline for one read: lock waits, fetch attempts and client retries included.
    pub fetch_timeout: Duration,
    /// How long a span that failed verification is refused before one fresh try
    /// (default [`POISONED_SPAN_TTL`]).
    pub poisoned_ttl: Duration,
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
    /// Spans that recently failed verification.
    negative: NegativeCache,
    /// The whole-blob fetch (sources without range support).
    whole: Mutex<WholeState>,
    /// Bumped whenever the whole-blob fetch stores a span or ends.
    progress: watch::Sender<u64>,
    /// This manager, for tasks that outlive a read.
    me: Weak<SpanManager>,
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
    ) -> io::Result<Arc<Self>> {
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
        let negative = NegativeCache::new(cfg.poisoned_ttl);
        Ok(Arc::new_cyclic(|me| SpanManager {
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
            negative,
            whole: Mutex::new(WholeState::default()),
            progress: watch::channel(0).0,
            me: me.clone(),
        }))
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

    /// Whether every span holding uncompressed bytes `range` is local (verified, in memory or
    /// on disk), so that [`SpanManager::read`] of it fetches nothing.
    pub fn is_local(&self, range: Range<u64>) -> bool {
        range.end <= self.spans.uncompressed_size()
            && self.spans.spans_for(&range).all(|id| self.is_cached(id))
    }

    fn is_cached(&self, id: SpanId) -> bool {
        self.on_disk[id].load(Ordering::Acquire) || self.cfg.memory.contains((self.key, id))
    }

    /// Appends bytes `rel` of span `id` to `out`: from memory, from disk, or fetched again if
    /// it was evicted from memory without being on disk (over the disk budget).
    async fn append_span(
        &self,
        id: SpanId,
        rel: Range<u64>,
        out: &mut Vec<u8>,
        deadline: Instant,
    ) -> io::Result<()> {
        for _ in 0..3 {
            if let Some(data) = self.cfg.memory.get((self.key, id)) {
                let part = data
                    .get(rel.start as usize..rel.end as usize)
                    .ok_or_else(|| {
                        eio(format!(
                            "layer {}: span {id} holds {} bytes, bytes {rel:?} wanted",
                            self.layer,
                            data.len()
                        ))
                    })?;
                out.extend_from_slice(part);
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
            self.ensure_until(id..id + 1, Priority::Demand, deadline)
                .await?;
        }
        Err(eio(format!(
            "layer {}: span {id} evicted from memory before it could be read (memory cache too small for the disk budget)",
            self.layer
        )))
    }

    /// Reads uncompressed bytes `range` of the layer: all of them within `fetch_timeout`,
    /// or EIO (never fewer bytes). Counted as a synchronous (FUSE) read in upstream's metrics.
    pub async fn read(&self, range: Range<u64>) -> io::Result<Vec<u8>> {
        let started = Instant::now();
        let r = self.read_uncounted(range).await;
        crate::metrics::count_read(&self.metrics.upstream, &self.layer, started, &r);
        r
    }

    async fn read_uncounted(&self, range: Range<u64>) -> io::Result<Vec<u8>> {
        let deadline = Instant::now() + self.cfg.fetch_timeout;
        self.last_demand_ms
            .store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
        let size = self.spans.uncompressed_size();
        if range.start > range.end || range.end > size {
            return Err(eio(format!(
                "layer {}: bytes {range:?} are past the end of the layer ({size} bytes): the zTOC entry points outside the archive",
                self.layer
            )));
        }
        let want = range.end - range.start;
        let ids = self.spans.spans_for(&range);
        self.ensure_until(ids.clone(), Priority::Demand, deadline)
            .await?;
        let mut out = Vec::with_capacity(want.min(1 << 20) as usize);
        for id in ids {
            let s = self.spans.span(id).map_err(|e| eio(e.to_string()))?;
            let from = range.start.max(s.uncompressed.start);
            let to = range.end.min(s.uncompressed.end);
            if from >= to {
                continue;
            }
            let rel = (from - s.uncompressed.start)..(to - s.uncompressed.start);
            self.append_span(id, rel, &mut out, deadline).await?;
        }
        if out.len() as u64 != want {
            return Err(eio(format!(
                "layer {}: the spans cover {} of the {want} bytes {range:?}",
                self.layer,
                out.len()
            )));
        }
        Ok(out)
    }

    /// Makes sure spans `ids` are cached, fetching missing runs, within `fetch_timeout`.
    pub async fn ensure(&self, ids: Range<SpanId>, prio: Priority) -> io::Result<()> {
        self.ensure_until(ids, prio, Instant::now() + self.cfg.fetch_timeout)
            .await
    }

    fn refuse_poisoned(&self, ids: &[SpanId]) -> io::Result<()> {
        if let Some(id) = ids.iter().find(|&&i| self.negative.failed_just_now(i)) {
            return Err(eio(format!(
                "layer {}: fetching span {id} failed less than {:?} ago",
                self.layer,
                crate::cache::FAILED_FETCH_MEMO
            )));
        }
        match ids
            .iter()
            .find(|&&i| self.negative.standing(i) == Standing::Poisoned)
        {
            Some(id) => Err(eio(format!(
                "layer {}: span {id} failed verification less than {:?} ago; not fetched again yet",
                self.layer, self.cfg.poisoned_ttl
            ))),
            None => Ok(()),
        }
    }

    /// [`SpanManager::ensure`] with the caller's deadline, which also bounds the wait for
    /// another reader's fetch of the same spans.
    pub async fn ensure_until(
        &self,
        ids: Range<SpanId>,
        prio: Priority,
        deadline: Instant,
    ) -> io::Result<()> {
        let missing: Vec<SpanId> = ids.filter(|&i| !self.is_cached(i)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        self.refuse_poisoned(&missing)?;
        // Lock in ascending order (no deadlock); whoever fetched first filled the cache.
        let mut guards = Vec::with_capacity(missing.len());
        for &id in &missing {
            match tokio::time::timeout_at(deadline, self.locks[id].lock()).await {
                Ok(g) => guards.push(g),
                Err(_) => {
                    return Err(eio(format!(
                    "layer {}: span {id}: timed out after {:?} (waiting for another fetch of it)",
                    self.layer, self.cfg.fetch_timeout
                )))
                }
            }
        }
        let still: Vec<SpanId> = missing
            .into_iter()
            .filter(|&i| !self.is_cached(i))
            .collect();
        self.refuse_poisoned(&still)?;
        let mut start = 0;
        while start < still.len() {
            let mut end = start + 1;
            while end < still.len() && still[end] == still[end - 1] + 1 {
                end += 1;
            }
            self.fetch_run(still[start]..still[end - 1] + 1, prio, deadline)
                .await?;
            start = end;
        }
        drop(guards);
        Ok(())
    }

    async fn fetch_run(
        &self,
        run: Range<SpanId>,
        prio: Priority,
        deadline: Instant,
    ) -> io::Result<()> {
        if self.reader.whole_only() {
            return self.wait_for_whole(run, prio, deadline).await;
        }
        let first = self.spans.span(run.start).map_err(|e| eio(e.to_string()))?;
        let last = self
            .spans
            .span(run.end - 1)
            .map_err(|e| eio(e.to_string()))?;
        let range = first.compressed.start..last.compressed.end;
        // A span whose refusal just expired gets one try, not a round of retries.
        let retries = if run
            .clone()
            .any(|i| self.negative.standing(i) == Standing::Probation)
        {
            0
        } else {
            self.cfg.max_verification_retries
        };
        let mut attempt = 0;
        loop {
            let get = crate::metrics::RegistryGet::start(&self.metrics.upstream, &self.layer, prio);
            // Transport retries happen inside the reader, within the same deadline.
            let data = match tokio::time::timeout_at(
                deadline,
                self.reader.read_range(range.clone(), deadline),
            )
            .await
            {
                Ok(Ok(d)) => d,
                Ok(Err(e)) => {
                    run.clone().for_each(|i| self.negative.fetch_failed(i));
                    error!(layer = %self.layer, spans = ?run, error = %e, "span fetch failed");
                    return Err(eio(format!(
                        "layer {}: fetching spans {run:?}: {e}",
                        self.layer
                    )));
                }
                Err(_) => {
                    run.clone().for_each(|i| self.negative.fetch_failed(i));
                    error!(layer = %self.layer, spans = ?run, timeout = ?self.cfg.fetch_timeout, "span fetch timed out");
                    return Err(eio(format!(
                        "layer {}: fetching spans {run:?} timed out after {:?}",
                        self.layer, self.cfg.fetch_timeout
                    )));
                }
            };
            drop(get);
            if data.len() as u64 != range.end - range.start {
                return Err(eio(format!(
                    "layer {}: spans {run:?}: got {} of {} bytes",
                    self.layer,
                    data.len(),
                    range.end - range.start
                )));
            }
            match self.verify_and_store(&run, range.start, data, prio).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < retries && Instant::now() < deadline => {
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

    /// Verifies, decompresses and caches the spans of `run` from their compressed bytes
    /// (starting at blob offset `base`). Spans before a bad one are kept; the bad one is
    /// refused for a while if its digest or its decompression failed.
    async fn verify_and_store(
        &self,
        run: &Range<SpanId>,
        base: u64,
        data: Bytes,
        prio: Priority,
    ) -> io::Result<()> {
        let counter = match prio {
            Priority::Demand => &self.metrics.demand_bytes,
            Priority::Background => &self.metrics.background_bytes,
        };
        counter.fetch_add(data.len() as u64, Ordering::Relaxed);
        self.metrics
            .upstream
            .add_fetched(&self.layer, data.len() as u64);
        let spans = self.spans.clone();
        let verify = !self.cfg.disable_verification;
        let run2 = run.clone();
        let layer = self.layer.clone();
        let dir = self.cfg.cache_dir.clone();
        let disk = self.cfg.disk.clone();
        // Verification, decompression and the cache file writes are CPU and blocking I/O work:
        // off the async workers.
        type Failure = (SpanId, io::Error, bool);
        type Decoded = Vec<(SpanId, Vec<u8>, bool)>;
        let (decoded, failure): (Decoded, Option<Failure>) =
            tokio::task::spawn_blocking(move || {
                let mut out = Vec::new();
                for id in run2 {
                    match decode_one(&spans, id, &data, base, verify, &layer) {
                        Ok(plain) => {
                            // Over the disk budget the span is kept in memory only.
                            let stored = disk.try_reserve(plain.len() as u64);
                            if stored {
                                let tmp = dir.join(format!("{id}.tmp"));
                                let written = std::fs::write(&tmp, &plain)
                                    .and_then(|()| std::fs::rename(&tmp, dir.join(id.to_string())));
                                if let Err(e) = written {
                                    disk.release(plain.len() as u64);
                                    return (out, Some((id, e, false)));
                                }
                            }
                            out.push((id, plain, stored));
                        }
                        Err(e) => return (out, Some((id, e, true))),
                    }
                }
                (out, None)
            })
            .await
            .map_err(|e| eio(format!("decompression task: {e}")))?;
        for (id, plain, stored) in decoded {
            if stored {
                self.disk_bytes
                    .fetch_add(plain.len() as u64, Ordering::AcqRel);
                self.on_disk[id].store(true, Ordering::Release);
            }
            self.cfg.memory.put((self.key, id), Arc::new(plain));
            self.negative.clear(id);
            // Counted once the span is servable, so the metric never runs ahead of the cache.
            self.metrics.spans_verified.fetch_add(1, Ordering::Relaxed);
            crate::metrics::count_span(&self.metrics.upstream, &self.layer, prio);
        }
        if let Some((id, e, bad_bytes)) = failure {
            if bad_bytes {
                self.metrics.verify_failures.fetch_add(1, Ordering::Relaxed);
                self.negative.poison(id);
            }
            return Err(e);
        }
        debug!(layer = %self.layer, spans = ?run, "spans fetched and verified");
        Ok(())
    }
}

/// Verifies and decompresses span `id` out of `data` (blob bytes from offset `base`).
fn decode_one(
    spans: &Spans,
    id: SpanId,
    data: &[u8],
    base: u64,
    verify: bool,
    layer: &str,
) -> io::Result<Vec<u8>> {
    let s = spans.span(id).map_err(|e| eio(e.to_string()))?;
    let slice = s
        .compressed
        .start
        .checked_sub(base)
        .zip(s.compressed.end.checked_sub(base))
        .and_then(|(a, b)| data.get(a as usize..b as usize))
        .ok_or_else(|| {
            eio(format!(
                "layer {layer}: span {id} is outside the fetched bytes"
            ))
        })?;
    if verify {
        spans
            .verify(id, slice)
            .map_err(|e| eio(format!("layer {layer}: {e}")))?;
    }
    let plain = spans
        .decompress(id, slice)
        .map_err(|e| eio(format!("layer {layer}: {e}")))?;
    let want = s.uncompressed.end - s.uncompressed.start;
    if plain.len() as u64 != want {
        return Err(eio(format!(
            "layer {layer}: span {id} decompressed to {} bytes, {want} expected",
            plain.len()
        )));
    }
    Ok(plain)
}

mod background;
mod prefetch;
mod whole;
pub use background::BackgroundConfig;
pub use prefetch::{PrefetchReport, MAX_PREFETCH_REQUEST_BYTES};
use whole::WholeState;

#[cfg(test)]
#[path = "spans_tests.rs"]
mod tests;
