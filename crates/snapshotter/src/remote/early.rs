//! Prefetch started at discovery, ahead of each layer's mount.
//!
//! Why: containerd prepares the layers of an image one after another, so a layer's prefetch
//! used to start only at its own Prepare, after every layer below it was mounted and had
//! prefetched (the runtime benchmark's waterfall: layer 2's prefetch at 541-964 ms, after layer
//! 1's at 186-530 ms, although layer 2's zTOC was there at 76 ms). Now, when discovery has a
//! layer's zTOC, the compressed bytes of exactly the range requests that layer's prefetch will
//! make ([`soci_fs::plan_prefetch`] over a fresh layer) are fetched at once and held; the
//! mount's prefetch then reads those ranges from here instead of the registry. Nothing is
//! trusted early: the bytes are verified span by span when the mount's prefetch decodes them,
//! as any fetched bytes. Bounded: at most [`MAX_EARLY_BYTES`] held daemon-wide, each range
//! dropped [`EARLY_TTL`] after it arrived if no mount took it; a range is handed out once.
//!
//! One plan per prefetch artifact ([`EarlyBytes::plans`]): the artifact is fetched once, and whichever of
//! discovery and the mount gets there first decides. If discovery does, the ranges it fetches
//! exist before the mount sees the plan (so the mount never fetches them again); if the mount
//! does, nothing is fetched early.

use std::ops::{Range, RangeInclusive};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use soci_index::SociImage;
use soci_registry::{Client, Descriptor, Digest, Repository};
use soci_ztoc::{SpanId, Spans};
use tokio::time::Instant;

use super::singleflight::SingleFlight;
use super::Remote;

/// Compressed bytes held for mounts to come, all layers.
pub const MAX_EARLY_BYTES: u64 = 256 << 20;
/// How long fetched bytes wait for their mount.
pub const EARLY_TTL: Duration = Duration::from_secs(60);
/// Range requests one layer's early prefetch runs at once (as the mount's).
const REQUESTS_PER_LAYER: usize = 4;

type Key = (Digest, u64, u64);
/// A range's bytes once fetched (`None` while in flight).
type Slot = tokio::sync::watch::Receiver<Option<Result<Bytes, String>>>;
/// A layer's prefetch plan: the span ranges its artifact names.
pub(super) type Plan = Result<Arc<Vec<RangeInclusive<SpanId>>>, String>;

/// Bytes fetched ahead of mounts, and the per-layer plans.
#[derive(Default)]
pub(super) struct EarlyBytes {
    ranges: std::sync::Mutex<std::collections::HashMap<Key, Slot>>,
    /// Prefetch plans by artifact digest (span ids belong to the zTOC the artifact was made for).
    pub(super) plans: SingleFlight<Digest, Plan>,
    held: AtomicU64,
}

impl EarlyBytes {
    /// The bytes fetched ahead for exactly `range` of `layer`, if any (waits for a fetch in
    /// flight until `deadline`). Handed out once: a later read fetches normally.
    pub(super) async fn take(
        &self,
        layer: &Digest,
        range: &Range<u64>,
        deadline: Instant,
    ) -> Option<Bytes> {
        let key = (layer.clone(), range.start, range.end);
        let mut slot = self.lock().remove(&key)?;
        let got = tokio::time::timeout_at(deadline, slot.wait_for(Option::is_some))
            .await
            .ok()?
            .ok()?;
        match &*got {
            Some(Ok(b)) => Some(b.clone()),
            _ => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<Key, Slot>> {
        // Plain data: consistent even if a holder panicked.
        self.ranges.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Remote {
    /// The prefetch plan of `layer` (its artifact's span ranges), fetched once. With `early`
    /// (the layer's spans, at discovery) and this call making the plan, the plan's range
    /// requests are started before it is published.
    pub(super) async fn prefetch_plan(
        &self,
        img: &SociImage,
        desc: &Descriptor,
        layer: &Descriptor,
        span_count: usize,
        early: Option<&Spans>,
    ) -> Plan {
        self.early
            .plans
            .run(&desc.digest, async {
                let artifact = img
                    .fetch_prefetch(&self.client, desc, &layer.digest, span_count)
                    .await
                    .map_err(|e| e.to_string())?;
                let ranges = Arc::new(artifact.span_ranges());
                if let Some(spans) = early {
                    let timeout = Duration::from_secs(self.cfg.prefetch.timeout_sec.max(1));
                    fetch_early(
                        &self.client,
                        &self.early,
                        &img.reference.repository,
                        layer,
                        spans,
                        &ranges,
                        Instant::now() + timeout,
                    );
                }
                Ok(ranges)
            })
            .await
    }

    /// Starts a layer's prefetch while its zTOC is at hand (called at discovery).
    pub(super) async fn prefetch_early(&self, img: &SociImage, layer: &Descriptor, spans: &Spans) {
        if !self.cfg.prefetch.enable {
            return;
        }
        let Some(desc) = img.index.prefetch_for(&layer.digest).cloned() else {
            return;
        };
        // Problems are reported by the mount's prefetch, which uses the same plan.
        let _ = self
            .prefetch_plan(img, &desc, layer, spans.len(), Some(spans))
            .await;
    }
}

/// Spawns the range requests of `ranges` for a fresh layer, within the byte bound.
fn fetch_early(
    client: &Arc<Client>,
    early: &Arc<EarlyBytes>,
    repo: &Repository,
    layer: &Descriptor,
    spans: &Spans,
    ranges: &[RangeInclusive<SpanId>],
    deadline: Instant,
) {
    let (runs, _) = soci_fs::plan_prefetch(spans, ranges, |_| false);
    let slots = Arc::new(tokio::sync::Semaphore::new(REQUESTS_PER_LAYER));
    for run in runs {
        let Ok(run) = spans.run(run) else { continue };
        let range = run.compressed;
        let len = range.end - range.start;
        if early.held.fetch_add(len, Ordering::Relaxed) + len > MAX_EARLY_BYTES {
            early.held.fetch_sub(len, Ordering::Relaxed);
            break;
        }
        let key = (layer.digest.clone(), range.start, range.end);
        let (tx, rx) = tokio::sync::watch::channel(None);
        {
            let mut m = early.lock();
            if m.contains_key(&key) {
                drop(m);
                early.held.fetch_sub(len, Ordering::Relaxed);
                continue;
            }
            m.insert(key.clone(), rx);
        }
        let (client, early, slots, repo) =
            (client.clone(), early.clone(), slots.clone(), repo.clone());
        tokio::spawn(async move {
            let got = {
                let _slot = slots.acquire().await;
                client
                    .get_blob_range_until(&repo, &key.0, range, Some(deadline))
                    .await
                    .map_err(|e| e.to_string())
            };
            // Nobody waiting (taken and given up, or never taken): nothing to keep.
            if tx.send(Some(got)).is_err() {
                early.held.fetch_sub(len, Ordering::Relaxed);
                return;
            }
            // Kept until the mount has taken them (its receiver dropped) or the TTL.
            tokio::select! {
                _ = tokio::time::sleep(EARLY_TTL) => {}
                _ = tx.closed() => {}
            }
            early.lock().remove(&key);
            drop(tx);
            early.held.fetch_sub(len, Ordering::Relaxed);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_fetched_ahead_are_handed_out_once_and_waited_for_in_flight() {
        let early = EarlyBytes::default();
        let layer = Digest::of(b"layer");
        let (tx, rx) = tokio::sync::watch::channel(None);
        early.lock().insert((layer.clone(), 10, 20), rx);
        let deadline = Instant::now() + Duration::from_secs(5);
        // In flight (the fetch has not even started): the taker waits for it.
        let fill = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.send(Some(Ok(Bytes::from_static(b"0123456789"))))
                .unwrap();
            tx
        });
        let got = early.take(&layer, &(10..20), deadline).await;
        drop(fill.await.unwrap());
        assert_eq!(got.as_deref(), Some(&b"0123456789"[..]));
        // Once only, and only the exact range.
        assert_eq!(early.take(&layer, &(10..20), deadline).await, None);
        assert_eq!(early.take(&layer, &(10..19), deadline).await, None);
        // A failed early fetch: the caller fetches itself.
        let (tx, rx) = tokio::sync::watch::channel(None);
        early.lock().insert((layer.clone(), 0, 5), rx);
        tx.send(Some(Err("registry said no".into()))).unwrap();
        assert_eq!(early.take(&layer, &(0..5), deadline).await, None);
    }
}
