//! Span manager: turns uncompressed byte ranges of a layer into verified bytes.
//!
//! The pipeline itself (range -> spans -> runs -> verify -> decompress -> clip) is
//! soci-ztoc's ([`soci_ztoc::ReadPlan`], [`soci_ztoc::Spans::decode_span`]); this module adds
//! what a daemon needs around it: the [`SpanCache`] (memory and disk), one fetch per span for
//! concurrent readers (a per-span async lock), deadlines, negative caching and read-ahead.
//! [`SpanManager::read`] asks [`SpanManager::acquire`] for the spans of a range and gets their
//! verified bytes back, held by reference count: spans evicted meanwhile do not matter, and
//! the bytes are copied once, into the answer. A read whose spans are all held already takes
//! a shorter way (`local.rs`): just the bytes asked for, sliced from memory or read from the
//! span files, never a whole span loaded for a few KiB.
//!
//! Failure rules, so a hostile or broken registry costs bounded time and never wrong bytes:
//! - one deadline per read (`fetch_timeout`): waiting for another reader's fetch, every
//!   attempt and the registry client's own retries all fit inside it;
//! - transport failures are retried by the registry client only; here only digest
//!   mismatches are fetched again (up to `max_verification_retries`, from the bad span on);
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
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use soci_ztoc::{SpanId, Spans};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::Instrument;

use crate::cache::LayerCache;
pub use crate::cache::{SpanCache, FAILED_FETCH_MEMO, POISONED_SPAN_TTL};
use negative::NegativeCache;

/// A boxed future borrowing the reader.
pub type ReadFuture<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'a>>;

/// Reads byte ranges of the compressed layer blob (an HTTP range reader in production).
pub trait RangeReader: Send + Sync + 'static {
    /// Returns exactly the bytes `range` of the blob, within `deadline` (retries included).
    fn read_range(&self, range: Range<u64>, deadline: Instant) -> ReadFuture<'_, Bytes>;

    /// Waits (until `deadline`) for bytes `range` if something is fetching them already (a
    /// prefetch started before the mount); at once otherwise. A prefetch waits here before it
    /// locks the spans it fetches, so a container's read of one of them meanwhile takes its
    /// part as it arrives instead of waiting behind the whole request.
    fn settled(&self, _range: Range<u64>, _deadline: Instant) -> ReadFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    /// Forgets any bytes held for `range` (some of them failed verification): the next read
    /// of it asks the source itself, so a retry never gets the same bad bytes again.
    fn discard(&self, _range: Range<u64>) {}

    /// Returns exactly bytes `range` of the layer's zTOC blob (checkpoint records, when the
    /// zTOC was fetched without them: [`soci_ztoc::Spans::windows_missing`]).
    fn read_ztoc_range(&self, _range: Range<u64>, _deadline: Instant) -> ReadFuture<'_, Bytes> {
        Box::pin(async {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this source has no zTOC to read checkpoint records from",
            ))
        })
    }

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
    /// Span cache shared by all layers.
    pub cache: Arc<SpanCache>,
    /// Spans of the same file fetched ahead of a read, in parallel with it (0: none; see
    /// [`SpanManager::read_in_file`]).
    pub read_ahead_spans: usize,
}

impl SpanConfig {
    /// Settings with the defaults (30 s deadline, no verification retries,
    /// [`DEFAULT_READ_AHEAD_SPANS`]).
    pub fn new(cache_dir: PathBuf, cache: Arc<SpanCache>) -> SpanConfig {
        SpanConfig {
            cache_dir,
            disable_verification: false,
            max_verification_retries: 0,
            fetch_timeout: Duration::from_secs(30),
            poisoned_ttl: POISONED_SPAN_TTL,
            cache,
            read_ahead_spans: DEFAULT_READ_AHEAD_SPANS,
        }
    }
}

/// Why a span fetch is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// A reader is waiting.
    Demand,
    /// Background fill, prefetch and read-ahead.
    Background,
}

/// Serves a layer's uncompressed bytes from spans.
pub struct SpanManager {
    layer: String,
    spans: Spans,
    reader: Arc<dyn RangeReader>,
    cfg: SpanConfig,
    metrics: Arc<FsMetrics>,
    /// This layer's spans in the shared cache.
    cache: Arc<LayerCache>,
    locks: Vec<tokio::sync::Mutex<()>>,
    closed: AtomicBool,
    /// When the last demand read started (ms since `born`).
    last_demand_ms: AtomicU64,
    born: std::time::Instant,
    /// Spans that recently failed verification.
    negative: NegativeCache,
    /// Read-ahead fetches running now (bounded by [`MAX_READ_AHEAD_TASKS`]).
    read_ahead_running: AtomicU64,
    /// A range request of this layer was answered: read-ahead may start (it never probes a
    /// registry that may ignore ranges or be failing).
    ranges_work: AtomicBool,
    /// The whole-blob fetch (sources without range support).
    whole: Mutex<WholeState>,
    /// Bumped whenever the whole-blob fetch stores a span or ends.
    progress: watch::Sender<u64>,
    /// This manager, for tasks that outlive a read.
    me: Weak<SpanManager>,
    /// Demand record (see `record.rs`), when the mount asked for one.
    pub(crate) record: record::RecordSlot,
    /// Spans a prefetch named: reads of them start no read-ahead (see `read_ahead.rs`).
    pub(crate) prefetched: Vec<AtomicBool>,
}

fn eio(msg: String) -> io::Error {
    io::Error::other(msg)
}

impl SpanManager {
    /// The layer's digest (metric labels).
    pub fn layer(&self) -> &str {
        &self.layer
    }

    /// A manager for layer `layer` (its digest, for logs) with span table `spans`. Touches
    /// no disk here: the cache directory is created and scanned on the blocking pool (started
    /// now when called inside a runtime, else by the first read).
    pub fn new(
        layer: String,
        spans: Spans,
        reader: Arc<dyn RangeReader>,
        cfg: SpanConfig,
        metrics: Arc<FsMetrics>,
    ) -> io::Result<Arc<Self>> {
        let n = spans.len();
        let cache = cfg.cache.layer(cfg.cache_dir.clone(), &spans);
        let negative = NegativeCache::new(cfg.poisoned_ttl);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let c = cache.clone();
            rt.spawn(async move {
                if let Err(e) = c.ready().await {
                    tracing::warn!(error = %e, "span cache directory");
                }
            });
        }
        Ok(Arc::new_cyclic(|me| SpanManager {
            layer,
            spans,
            reader,
            cfg,
            metrics,
            cache,
            locks: (0..n).map(|_| tokio::sync::Mutex::new(())).collect(),
            closed: AtomicBool::new(false),
            last_demand_ms: AtomicU64::new(0),
            born: std::time::Instant::now(),
            negative,
            read_ahead_running: AtomicU64::new(0),
            ranges_work: AtomicBool::new(false),
            whole: Mutex::new(WholeState::default()),
            progress: watch::channel(0).0,
            me: me.clone(),
            record: Default::default(),
            prefetched: (0..n).map(|_| AtomicBool::new(false)).collect(),
        }))
    }

    /// Number of spans.
    pub fn span_count(&self) -> usize {
        self.spans.len()
    }

    /// Spans fetched and kept on disk.
    pub fn cached_count(&self) -> usize {
        self.cache.on_disk_count()
    }

    /// Whether every span holding uncompressed bytes `range` is local (memory or disk): a
    /// read of it needs no fetch (unless memory evicts it first).
    pub fn range_is_local(&self, range: Range<u64>) -> bool {
        self.spans
            .plan(range)
            .is_ok_and(|p| p.spans.clone().all(|id| self.is_cached(id)))
    }

    /// Removes this layer's span files and gives their bytes back to the disk budget.
    pub fn remove_cache(&self) {
        self.cache.remove_files();
    }

    /// Stops background work (the layer is being unmounted).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.cache.forget_memory();
    }

    /// Whether every span holding uncompressed bytes `range` is local (verified, in memory or
    /// on disk), so that [`SpanManager::read`] of it fetches nothing.
    pub fn is_local(&self, range: Range<u64>) -> bool {
        range.end <= self.spans.uncompressed_size()
            && self.spans.spans_for(&range).all(|id| self.is_cached(id))
    }

    /// When the last demand read started, in ms since this manager was made (0: none yet).
    #[cfg(test)]
    pub(crate) fn last_demand_ms(&self) -> u64 {
        self.last_demand_ms.load(Ordering::Relaxed)
    }

    fn is_cached(&self, id: SpanId) -> bool {
        self.cache.is_local(id)
    }

    /// Reads uncompressed bytes `range` of the layer: all of them within `fetch_timeout`,
    /// or EIO (never fewer bytes). Counted as a synchronous (FUSE) read in upstream's metrics.
    pub async fn read(&self, range: Range<u64>) -> io::Result<Vec<u8>> {
        let started = Instant::now();
        let span = tracing::debug_span!("span_read", layer = %self.layer, ?range);
        let r = self.read_uncounted(range).instrument(span).await;
        crate::metrics::count_read(&self.metrics.upstream, &self.layer, started, &r);
        r
    }

    async fn read_uncounted(&self, range: Range<u64>) -> io::Result<Vec<u8>> {
        self.last_demand_ms
            .store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.read_as(range, Priority::Demand).await
    }

    /// Reads uncompressed bytes `range` for the daemon's own use (e.g. writing a passthrough
    /// backing file): like [`SpanManager::read`] (verified, all or EIO), but not a demand
    /// read. The background fetch does not back off for it, it is not counted as a FUSE read,
    /// and missing spans are fetched at background priority.
    pub async fn read_internal(&self, range: Range<u64>) -> io::Result<Vec<u8>> {
        let span = tracing::debug_span!("span_read_internal", layer = %self.layer, ?range);
        self.read_as(range, Priority::Background)
            .instrument(span)
            .await
    }

    async fn read_as(&self, range: Range<u64>, prio: Priority) -> io::Result<Vec<u8>> {
        let deadline = Instant::now() + self.cfg.fetch_timeout;
        let plan = self
            .spans
            .plan(range)
            .map_err(|e| eio(format!("layer {}: {e}", self.layer)))?;
        if let Some(data) = self.read_held(&plan.range, plan.spans.clone()).await? {
            return Ok(data);
        }
        let bufs = self.acquire(plan.spans.clone(), prio, deadline).await?;
        plan.assemble(&self.spans, &bufs)
            .map_err(|e| eio(format!("layer {}: {e}", self.layer)))
    }

    /// Makes sure spans `ids` are cached, fetching missing runs, within `fetch_timeout`.
    pub async fn ensure(&self, ids: Range<SpanId>, prio: Priority) -> io::Result<()> {
        self.ensure_until(ids, prio, Instant::now() + self.cfg.fetch_timeout)
            .await
    }

    /// [`SpanManager::ensure`] with the caller's deadline, which also bounds the wait for
    /// another reader's fetch of the same spans.
    pub async fn ensure_until(
        &self,
        ids: Range<SpanId>,
        prio: Priority,
        deadline: Instant,
    ) -> io::Result<()> {
        self.gather(ids, prio, deadline, fetch::Want::Local)
            .await
            .map(drop)
    }

    /// The verified bytes of spans `ids` (each whole, in order), fetching what is not
    /// cached, by `deadline`. The buffers are the caller's: eviction cannot take them.
    pub async fn acquire(
        &self,
        ids: Range<SpanId>,
        prio: Priority,
        deadline: Instant,
    ) -> io::Result<Vec<Bytes>> {
        let n = ids.len();
        let held = self.gather(ids, prio, deadline, fetch::Want::Bytes).await?;
        let bufs: Vec<Bytes> = held.into_iter().flatten().collect();
        if bufs.len() != n {
            return Err(eio(format!(
                "layer {}: {} of {n} spans held after fetching",
                self.layer,
                bufs.len()
            )));
        }
        Ok(bufs)
    }
}

/// Default of [`SpanConfig::read_ahead_spans`].
pub const DEFAULT_READ_AHEAD_SPANS: usize = 4;

mod background;
mod fetch;
mod local;
pub(crate) mod negative;
mod prefetch;
mod read_ahead;
pub(crate) mod record;
mod whole;
pub use background::BackgroundConfig;
pub use prefetch::{plan_prefetch, PrefetchReport, MAX_PREFETCH_REQUEST_BYTES};
pub use read_ahead::{MAX_READ_AHEAD_BYTES, MAX_READ_AHEAD_TASKS};
use whole::WholeState;

#[cfg(test)]
#[path = "spans_tests.rs"]
mod tests;
#[cfg(test)]
#[path = "spans/windows_tests.rs"]
mod windows_tests;
