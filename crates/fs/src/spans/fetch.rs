//! The middle of the read pipeline: find which spans are held, lock the missing ones (one
//! fetch per span for concurrent readers), fetch each run of consecutive missing spans with
//! one range request, verify and decompress them (soci-ztoc's
//! [`soci_ztoc::Spans::decode_span`]) off the async workers, store them and hand the bytes
//! back.
//!
//! Retries: the registry client owns transport retries (within the deadline given to
//! [`super::RangeReader::read_range`]); here only a digest mismatch is fetched again, from the
//! bad span on, up to `max_verification_retries`. Bad bytes are never stored or returned.

use std::io;
use std::ops::Range;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use soci_ztoc::{DecodeError, SpanId, SpanRun};
use tokio::time::Instant;
use tracing::{debug, error, warn, Instrument};

use super::negative::Standing;
use super::{eio, Priority, SpanManager};
use crate::cache::Held;

/// What the caller of [`SpanManager::gather`] needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Want {
    /// The bytes of every span.
    Bytes,
    /// Every span local; no bytes.
    Local,
    /// Spans local, skipping those another task is fetching now (read-ahead).
    LocalSkipBusy,
}

/// A span of a run that could not be made servable.
pub(super) struct Failure {
    id: SpanId,
    error: io::Error,
    kind: FailureKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailureKind {
    /// Digest mismatch (or unverified bytes that do not decompress): fetch again.
    BadBytes,
    /// Verified bytes that do not decode, or bytes that do not cover the span.
    Unusable,
}

/// Spans decoded by one run, and the failure that stopped it (if any).
type Decoded = (Vec<Bytes>, Option<Failure>);

impl SpanManager {
    pub(super) fn refuse_poisoned(&self, ids: &[SpanId]) -> io::Result<()> {
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

    /// Spans `ids` made local by `deadline`; with [`Want::Bytes`] every entry holds its span's
    /// bytes, else entries may be `None`.
    pub(super) async fn gather(
        &self,
        ids: Range<SpanId>,
        prio: Priority,
        deadline: Instant,
        want: Want,
    ) -> io::Result<Vec<Option<Bytes>>> {
        let layer_err = |e: io::Error| eio(format!("layer {}: span cache: {e}", self.layer));
        if ids.end > self.spans.len() {
            return Err(eio(format!(
                "layer {}: spans {ids:?} of {}",
                self.layer,
                self.spans.len()
            )));
        }
        self.cache.ready().await.map_err(layer_err)?;
        let bytes = want == Want::Bytes;
        let base = ids.start;
        let list: Vec<SpanId> = ids.collect();
        let mut out: Vec<Option<Bytes>> = vec![None; list.len()];
        let held = self.cache.lookup(&list, bytes).await.map_err(layer_err)?;
        let missing = self.take_held(&list, held, &mut out, base);
        if missing.is_empty() {
            return Ok(out);
        }
        self.refuse_poisoned(&missing)?;
        // Lock in ascending order (no deadlock); whoever fetched first stored the spans.
        let mut guards = Vec::with_capacity(missing.len());
        let mut locked = Vec::with_capacity(missing.len());
        for &id in &missing {
            if want == Want::LocalSkipBusy {
                if let Ok(g) = self.locks[id].try_lock() {
                    guards.push(g);
                    locked.push(id);
                }
                continue;
            }
            match tokio::time::timeout_at(deadline, self.locks[id].lock()).await {
                Ok(g) => {
                    guards.push(g);
                    locked.push(id);
                }
                Err(_) => {
                    return Err(eio(format!(
                    "layer {}: span {id}: timed out after {:?} (waiting for another fetch of it)",
                    self.layer, self.cfg.fetch_timeout
                )))
                }
            }
        }
        let held = self.cache.lookup(&locked, bytes).await.map_err(layer_err)?;
        let still = self.take_held(&locked, held, &mut out, base);
        self.refuse_poisoned(&still)?;
        let runs = self
            .spans
            .runs_of(&still)
            .map_err(|e| eio(format!("layer {}: {e}", self.layer)))?;
        for run in runs {
            let got = self.fetch_run(run.clone(), prio, deadline).await?;
            for (id, b) in run.spans.zip(got) {
                out[id - base] = Some(b);
            }
        }
        drop(guards);
        Ok(out)
    }

    /// Moves the bytes found into `out`; returns the ids not held.
    fn take_held(
        &self,
        ids: &[SpanId],
        held: Vec<Held>,
        out: &mut [Option<Bytes>],
        base: SpanId,
    ) -> Vec<SpanId> {
        let mut missing = Vec::new();
        for (&id, h) in ids.iter().zip(held) {
            match h {
                Held::Bytes(b) => out[id - base] = Some(b),
                Held::Local => {}
                Held::Missing => missing.push(id),
            }
        }
        missing
    }

    /// Fetches, verifies and stores one run of spans; returns their bytes in order.
    async fn fetch_run(
        &self,
        run: SpanRun,
        prio: Priority,
        deadline: Instant,
    ) -> io::Result<Vec<Bytes>> {
        if self.reader.whole_only() {
            return self.spans_from_whole(run.spans, prio, deadline).await;
        }
        // A span whose refusal just expired gets one try, not a round of retries.
        let retries = if run
            .spans
            .clone()
            .any(|i| self.negative.standing(i) == Standing::Probation)
        {
            0
        } else {
            self.cfg.max_verification_retries
        };
        let mut got = Vec::with_capacity(run.spans.len());
        let mut todo = run;
        let mut attempt = 0;
        loop {
            let span = tracing::debug_span!(
                "span_fetch",
                layer = %self.layer,
                span = todo.spans.start,
                spans = ?todo.spans,
                bytes = todo.compressed.end - todo.compressed.start,
                attempt
            );
            // The windows those spans decompress from, if the zTOC came without them, are
            // fetched alongside their bytes (no round trip added).
            let (data, windows) = tokio::join!(
                self.fetch_bytes(&todo, prio, deadline).instrument(span),
                self.ensure_windows(todo.spans.clone(), prio, deadline)
            );
            windows?;
            let data = data?;
            let (decoded, failure) = self
                .decode_store(todo.spans.clone(), todo.compressed.start, data, prio)
                .await?;
            got.extend(decoded);
            let Some(f) = failure else {
                debug!(layer = %self.layer, spans = ?todo.spans, "spans fetched and verified");
                return Ok(got);
            };
            if f.kind == FailureKind::BadBytes {
                if let Ok(bad) = self.spans.span(f.id) {
                    self.reader.discard(bad.compressed);
                }
            }
            if f.kind == FailureKind::BadBytes && attempt < retries && Instant::now() < deadline {
                attempt += 1;
                self.metrics.verify_failures.fetch_add(1, Ordering::Relaxed);
                warn!(layer = %self.layer, span = f.id, attempt, error = %f.error, "span verification failed; fetching again");
                todo = self
                    .spans
                    .run(f.id..todo.spans.end)
                    .map_err(|e| eio(format!("layer {}: {e}", self.layer)))?;
                continue;
            }
            error!(layer = %self.layer, span = f.id, error = %f.error, "span verification failed; giving up");
            return Err(self.settle(f));
        }
    }

    /// Counts and remembers a span that could not be made servable; the error to return.
    pub(super) fn settle(&self, f: Failure) -> io::Error {
        if f.kind == FailureKind::BadBytes {
            self.metrics.verify_failures.fetch_add(1, Ordering::Relaxed);
        }
        self.negative.poison(f.id);
        f.error
    }

    /// Remembers briefly that fetching `ids` failed, for the kernel's immediate retry of a
    /// demand read. A background fetch's failure (read-ahead, prefetch, fill) is not
    /// remembered: a read waiting for that fetch then makes its own attempt.
    fn memo_fetch_failure(&self, ids: Range<SpanId>, prio: Priority) {
        if prio == Priority::Demand {
            ids.for_each(|i| self.negative.fetch_failed(i));
        }
    }

    /// The compressed bytes of `run`, within `deadline` (the client retries transport
    /// failures inside it); a failure is remembered briefly for the kernel's retry.
    async fn fetch_bytes(
        &self,
        run: &SpanRun,
        prio: Priority,
        deadline: Instant,
    ) -> io::Result<Bytes> {
        let range = run.compressed.clone();
        let get = crate::metrics::RegistryGet::start(&self.metrics.upstream, &self.layer, prio);
        let fetched =
            tokio::time::timeout_at(deadline, self.reader.read_range(range.clone(), deadline))
                .await;
        drop(get);
        let spans = &run.spans;
        let failed = |msg: String| {
            self.memo_fetch_failure(spans.clone(), prio);
            error!(layer = %self.layer, spans = ?spans, error = %msg, "span fetch failed");
            eio(format!(
                "layer {}: fetching spans {spans:?}: {msg}",
                self.layer
            ))
        };
        let data = match fetched {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => return Err(failed(e.to_string())),
            Err(_) => {
                return Err(failed(format!(
                    "timed out after {:?}",
                    self.cfg.fetch_timeout
                )))
            }
        };
        if data.len() as u64 != range.end - range.start {
            return Err(failed(format!(
                "got {} of {} bytes",
                data.len(),
                range.end - range.start
            )));
        }
        self.ranges_work.store(true, Ordering::Relaxed);
        let counter = match prio {
            Priority::Demand => &self.metrics.demand_bytes,
            Priority::Background => &self.metrics.background_bytes,
        };
        counter.fetch_add(data.len() as u64, Ordering::Relaxed);
        self.metrics
            .upstream
            .add_fetched(&self.layer, data.len() as u64);
        Ok(data)
    }

    /// Fetches and verifies the checkpoint records spans `ids` need, if the zTOC was fetched
    /// without them and they are not loaded yet (one range request of the zTOC blob; records
    /// that fail verification are fetched again as spans are, `max_verification_retries`).
    pub(super) async fn ensure_windows(
        &self,
        ids: Range<SpanId>,
        prio: Priority,
        deadline: Instant,
    ) -> io::Result<()> {
        // A source that ignores ranges answers each request with the blob from its start: one
        // request for every record then, not one per span.
        let ids = if self.reader.whole_only() && self.spans.windows_missing(ids.clone()).is_some() {
            0..self.spans.len()
        } else {
            ids
        };
        let mut attempt = 0;
        loop {
            let Some(range) = self.spans.windows_missing(ids.clone()) else {
                return Ok(());
            };
            let data = self
                .fetch_records(&ids, range.clone(), prio, deadline)
                .await?;
            let spans = self.spans.clone();
            let loaded =
                tokio::task::spawn_blocking(move || spans.load_windows(range.start, &data))
                    .await
                    .map_err(|e| {
                        eio(format!(
                            "layer {}: checkpoint records task: {e}",
                            self.layer
                        ))
                    })?;
            let Err(e) = loaded else { return Ok(()) };
            // Bytes that do not match the index are never used.
            self.metrics.verify_failures.fetch_add(1, Ordering::Relaxed);
            if attempt < self.cfg.max_verification_retries && Instant::now() < deadline {
                attempt += 1;
                warn!(layer = %self.layer, spans = ?ids, attempt, error = %e, "checkpoint records failed verification; fetching again");
                continue;
            }
            // Only spans whose own record failed (the others' records were kept).
            ids.clone()
                .filter(|&i| self.spans.windows_missing(i..i + 1).is_some())
                .for_each(|i| self.negative.poison(i));
            error!(layer = %self.layer, spans = ?ids, error = %e, "checkpoint records failed verification; giving up");
            return Err(eio(format!(
                "layer {}: checkpoint records fetched from its zTOC failed verification: {e}",
                self.layer
            )));
        }
    }

    /// Bytes `range` of the zTOC blob (records of spans `ids`), within `deadline`.
    async fn fetch_records(
        &self,
        ids: &Range<SpanId>,
        range: Range<u64>,
        prio: Priority,
        deadline: Instant,
    ) -> io::Result<Bytes> {
        let want = range.end - range.start;
        let failed = |msg: String| {
            self.memo_fetch_failure(ids.clone(), prio);
            error!(layer = %self.layer, spans = ?ids, error = %msg, "checkpoint records fetch failed");
            eio(format!(
                "layer {}: fetching the checkpoint records of spans {ids:?} from its zTOC: {msg}",
                self.layer
            ))
        };
        let fetched = tokio::time::timeout_at(
            deadline,
            self.reader.read_ztoc_range(range, deadline),
        )
        .instrument(
            tracing::debug_span!("windows_fetch", layer = %self.layer, spans = ?ids, bytes = want),
        )
        .await;
        let data = match fetched {
            Ok(Ok(d)) if d.len() as u64 == want => d,
            Ok(Ok(d)) => return Err(failed(format!("got {} of {want} bytes", d.len()))),
            Ok(Err(e)) => return Err(failed(e.to_string())),
            Err(_) => {
                return Err(failed(format!(
                    "timed out after {:?}",
                    self.cfg.fetch_timeout
                )))
            }
        };
        // Counted with the bytes fetched for reads (not in the layer's own fetched size).
        let counter = match prio {
            Priority::Demand => &self.metrics.demand_bytes,
            Priority::Background => &self.metrics.background_bytes,
        };
        counter.fetch_add(want, Ordering::Relaxed);
        Ok(data)
    }

    /// Verifies, decompresses and stores spans `ids` from `data` (blob bytes from offset
    /// `base`) on the blocking pool, in order, stopping at the first that fails. Spans before
    /// it are stored and returned. Their windows must be loaded ([`Self::ensure_windows`]).
    pub(super) async fn decode_store(
        &self,
        ids: Range<SpanId>,
        base: u64,
        data: Bytes,
        prio: Priority,
    ) -> io::Result<Decoded> {
        let deadline = Instant::now() + self.cfg.fetch_timeout;
        let slot = self
            .cache
            .decode_slot(ids.clone(), deadline)
            .await
            .map_err(|e| eio(format!("layer {}: {e}", self.layer)))?;
        let spans = self.spans.clone();
        let verify = !self.cfg.disable_verification;
        let cache = self.cache.clone();
        let layer = self.layer.clone();
        type Plain = Vec<(SpanId, Vec<u8>, bool)>;
        let (plain, failure): (Plain, Option<Failure>) = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for id in ids {
                match spans.decode_span(id, &data, base, verify) {
                    Ok(plain) => {
                        // A span that cannot be written is served from memory.
                        let on_disk = cache.write_blocking(id, &plain).unwrap_or_else(|e| {
                            warn!(layer, span = id, error = %e, "span not kept on disk");
                            false
                        });
                        out.push((id, plain, on_disk));
                    }
                    Err(e) => {
                        let kind = match &e {
                            DecodeError::BadBytes(_) => FailureKind::BadBytes,
                            DecodeError::Unusable(_) => FailureKind::Unusable,
                        };
                        let error = eio(format!("layer {layer}: {}", e.into_inner()));
                        return (out, Some(Failure { id, error, kind }));
                    }
                }
            }
            (out, None)
        })
        .await
        .map_err(|e| eio(format!("layer {}: decompression task: {e}", self.layer)))?;
        let mut bufs = Vec::with_capacity(plain.len());
        for (id, plain, on_disk) in plain {
            bufs.push(self.cache.store(id, plain, on_disk));
            self.negative.clear(id);
            // Counted once the span is servable, so the metric never runs ahead of the cache.
            self.metrics.spans_verified.fetch_add(1, Ordering::Relaxed);
            crate::metrics::count_span(&self.metrics.upstream, &self.layer, prio);
        }
        drop(slot);
        Ok((bufs, failure))
    }

    /// Spans `ids` from the whole-blob fetch (sources without range support).
    async fn spans_from_whole(
        &self,
        ids: Range<SpanId>,
        prio: Priority,
        deadline: Instant,
    ) -> io::Result<Vec<Bytes>> {
        self.wait_for_whole(ids.clone(), prio, deadline).await?;
        let list: Vec<SpanId> = ids.collect();
        let held = self
            .cache
            .lookup(&list, true)
            .await
            .map_err(|e| eio(format!("layer {}: span cache: {e}", self.layer)))?;
        held.into_iter()
            .zip(&list)
            .map(|(h, id)| match h {
                Held::Bytes(b) => Ok(b),
                _ => Err(eio(format!(
                    "layer {}: span {id} from the whole blob was evicted before use (memory cache smaller than a span, disk budget full)",
                    self.layer
                ))),
            })
            .collect()
    }
}
