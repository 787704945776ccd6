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
//! dropped [`EARLY_TTL`] after it arrived if no mount took it, or when the layer's mount-time
//! prefetch ended; a range is handed out once, and reads of parts of it (the container's, while
//! the prefetch still runs) get slices of it.
//!
//! One plan per prefetch artifact ([`EarlyBytes::plans`]): the artifact is fetched once, and whichever of
//! discovery and the mount gets there first decides. If discovery does, the ranges it fetches
//! exist before the mount sees the plan (so the mount never fetches them again); if the mount
//! does, nothing is fetched early.

use std::collections::{BTreeMap, HashMap};
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
/// A read waiting for its part of a range fetched ahead gives up (and fetches for itself)
/// after this long without new bytes.
pub const STALLED: Duration = Duration::from_secs(2);
/// Range requests one layer's early prefetch runs at once (as the mount's).
const REQUESTS_PER_LAYER: usize = 4;

type Key = (Digest, u64, u64);

/// How far a range fetched ahead got.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// Bytes from the range's start that arrived.
    received: u64,
    /// Set when the fetch ended (`Err`: the rest will not come).
    ended: Option<Result<(), String>>,
}

/// A range being fetched ahead: the bytes so far, and a wait for more.
#[derive(Clone)]
struct Slot {
    data: Arc<std::sync::Mutex<Vec<u8>>>,
    progress: tokio::sync::watch::Receiver<Progress>,
    /// The fetch's own deadline: nobody waits for it longer (a stalled early fetch must not
    /// hold a container's read past the point where it could still fetch for itself).
    until: Instant,
}

/// The fetching end of a [`Slot`].
struct Filler {
    data: Arc<std::sync::Mutex<Vec<u8>>>,
    progress: tokio::sync::watch::Sender<Progress>,
}

impl Filler {
    fn new(until: Instant) -> (Filler, Slot) {
        let data = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::watch::channel(Progress::default());
        let slot = Slot {
            data: data.clone(),
            progress: rx,
            until,
        };
        (Filler { data, progress: tx }, slot)
    }

    /// Bytes at offset `at` of the range arrived (a retry starts again from 0: only bytes past
    /// those held count).
    fn arrived(&self, at: u64, part: &[u8]) {
        if self.progress.borrow().ended.is_some() {
            return;
        }
        let mut d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let have = d.len() as u64;
        let end = at + part.len() as u64;
        if at > have {
            return;
        }
        // A retry's bytes must be the ones already held: else nothing here is kept for use.
        let overlap = (have.min(end) - at) as usize;
        if d[at as usize..at as usize + overlap] != part[..overlap] {
            drop(d);
            self.end(Err("the registry sent different bytes on a retry".into()));
            return;
        }
        if end <= have {
            return;
        }
        d.extend_from_slice(&part[overlap..]);
        let n = d.len() as u64;
        drop(d);
        self.progress.send_modify(|p| p.received = n);
    }

    fn end(&self, outcome: Result<(), String>) {
        self.progress.send_modify(|p| {
            // The first outcome stands (a retry that changed bytes, then the fetch's own end).
            if p.ended.is_none() {
                p.ended = Some(outcome);
            }
        });
    }
}

impl Slot {
    /// Bytes `from..to` of the range once they arrived (waits until `deadline`, and no longer
    /// than [`STALLED`] without new bytes); `None` if the fetch ended (or stalled) without
    /// them: the caller then fetches for itself.
    async fn read(&mut self, from: u64, to: u64, deadline: Instant) -> Option<Bytes> {
        let until = deadline.min(self.until);
        loop {
            {
                let p = self.progress.borrow_and_update();
                if p.received >= to {
                    break;
                }
                if p.ended.is_some() {
                    return None;
                }
            }
            let wake = until.min(Instant::now() + STALLED);
            match tokio::time::timeout_at(wake, self.progress.changed()).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
        let d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let (from, to) = (usize::try_from(from).ok()?, usize::try_from(to).ok()?);
        d.get(from..to).map(Bytes::copy_from_slice)
    }

    /// Waits until every byte arrived or the fetch ended, until `deadline`.
    async fn settled(&mut self, deadline: Instant) {
        let until = deadline.min(self.until);
        let _ = tokio::time::timeout_at(until, self.progress.wait_for(|p| p.ended.is_some())).await;
    }
}

/// A layer's prefetch plan: the span ranges its artifact names.
pub(super) type Plan = Result<Arc<Vec<RangeInclusive<SpanId>>>, String>;

/// The ranges fetched ahead, by layer and then by (start, end): a read looks only at its own
/// layer's ranges and finds the one holding it by its start. A layer's ranges are the disjoint
/// runs of one prefetch plan; should two plans overlap, a read may miss a range that holds it
/// and fetch for itself, never get wrong bytes.
#[derive(Default)]
struct Held(HashMap<Digest, BTreeMap<(u64, u64), Slot>>);

impl Held {
    fn insert(&mut self, (layer, start, end): Key, slot: Slot) {
        self.0.entry(layer).or_default().insert((start, end), slot);
    }

    fn get(&self, (layer, start, end): &Key) -> Option<&Slot> {
        self.0.get(layer)?.get(&(*start, *end))
    }

    fn contains_key(&self, key: &Key) -> bool {
        self.get(key).is_some()
    }

    fn remove(&mut self, (layer, start, end): &Key) -> Option<Slot> {
        let ranges = self.0.get_mut(layer)?;
        let slot = ranges.remove(&(*start, *end));
        if ranges.is_empty() {
            self.0.remove(layer);
        }
        slot
    }

    /// The range of `layer` that holds all of `range`, if any.
    fn containing(&self, layer: &Digest, range: &Range<u64>) -> Option<(Key, Slot)> {
        let ((start, end), slot) = self
            .0
            .get(layer)?
            .range(..=(range.start, u64::MAX))
            .next_back()?;
        (range.end <= *end).then(|| ((layer.clone(), *start, *end), slot.clone()))
    }

    /// Drops the ranges of `layer` overlapping `range` (all of them without one).
    fn drop_ranges(&mut self, layer: &Digest, range: Option<&Range<u64>>) {
        let Some(ranges) = self.0.get_mut(layer) else {
            return;
        };
        match range {
            Some(r) => ranges.retain(|(start, end), _| *end <= r.start || r.end <= *start),
            None => ranges.clear(),
        }
        if ranges.is_empty() {
            self.0.remove(layer);
        }
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    #[cfg(test)]
    fn keys(&self) -> impl Iterator<Item = Key> + '_ {
        self.0
            .iter()
            .flat_map(|(l, r)| r.keys().map(move |(s, e)| (l.clone(), *s, *e)))
    }
}

/// Bytes fetched ahead of mounts, and the per-layer plans.
#[derive(Default)]
pub(super) struct EarlyBytes {
    ranges: std::sync::Mutex<Held>,
    /// Prefetch plans by artifact digest (span ids belong to the zTOC the artifact was made
    /// for), each kept [`EARLY_TTL`] (the discovery and mounts of one pull share it; a later
    /// pull fetches the small artifact again).
    pub(super) plans: SingleFlight<Digest, Plan>,
    held: AtomicU64,
}

impl EarlyBytes {
    /// The bytes fetched ahead for `range` of `layer`, if a range fetched ahead holds it
    /// (waits for them until `deadline`). A range asked for exactly is handed out (the mount's
    /// prefetch, which made the same plan); a part of one is copied out of it as soon as it
    /// arrived (a read while the prefetch runs), and the range stays for the prefetch.
    pub(super) async fn take(
        &self,
        layer: &Digest,
        range: &Range<u64>,
        deadline: Instant,
    ) -> Option<Bytes> {
        let (key, mut slot) = self.find(layer, range, true)?;
        // A part arrives as soon as its bytes did: a read need not wait for the whole range.
        slot.read(range.start - key.1, range.end - key.1, deadline)
            .await
    }

    /// Waits until a range fetched ahead that holds `range` is complete or failed (at once if
    /// there is none): a prefetch waits here before it locks the spans it will read from it,
    /// so that the container's reads of those spans take their parts as they arrive.
    pub(super) async fn settled(&self, layer: &Digest, range: &Range<u64>, deadline: Instant) {
        if let Some((_, mut slot)) = self.find(layer, range, false) {
            slot.settled(deadline).await;
        }
    }

    /// The range fetched ahead holding `range` of `layer`: exactly `range` (removed when
    /// `take_exact`), else one containing it.
    fn find(&self, layer: &Digest, range: &Range<u64>, take_exact: bool) -> Option<(Key, Slot)> {
        let exact = (layer.clone(), range.start, range.end);
        let mut m = self.lock();
        if take_exact {
            if let Some(slot) = m.remove(&exact) {
                return Some((exact, slot));
            }
        }
        m.containing(layer, range)
    }

    /// Forgets ranges of `layer` overlapping `range` (bytes from there failed verification).
    pub(super) fn discard(&self, layer: &Digest, range: &Range<u64>) {
        self.lock().drop_ranges(layer, Some(range));
    }

    /// Drops what was fetched ahead for `layer` and not taken (its mount's prefetch is over).
    pub(super) fn release_layer(&self, layer: &Digest) {
        self.lock().drop_ranges(layer, None);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
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
                let (held, digest) = (self.early.clone(), desc.digest.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(EARLY_TTL).await;
                    held.plans.remove(&digest);
                });
                if let Some(spans) = early {
                    let timeout = Duration::from_secs(self.cfg.prefetch.timeout_sec.max(1));
                    fetch_early(
                        &self.client,
                        &self.early,
                        img,
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

/// Records closer than this are fetched in one request (the bytes between are fetched too).
const WINDOW_GAP: u64 = 4 * 32785;

/// Spawns the fetch of the checkpoint records the planned runs decompress from, when the zTOC
/// came without them: verified into `spans`, whose windows the mount shares, so its prefetch
/// finds them there. Best effort: a failure leaves the mount to fetch them itself.
fn fetch_windows_early(
    client: &Arc<Client>,
    repo: &Repository,
    ztoc: &Descriptor,
    spans: &Spans,
    runs: &[Range<SpanId>],
    deadline: Instant,
) {
    let mut merged: Vec<Range<u64>> = Vec::new();
    for r in runs
        .iter()
        .filter_map(|run| spans.windows_missing(run.clone()))
    {
        match merged.last_mut() {
            Some(last) if r.start >= last.end && r.start - last.end <= WINDOW_GAP => {
                last.end = r.end
            }
            _ => merged.push(r),
        }
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(REQUESTS_PER_LAYER));
    for range in merged {
        let (client, repo, digest, spans, slots) = (
            client.clone(),
            repo.clone(),
            ztoc.digest.clone(),
            spans.clone(),
            slots.clone(),
        );
        tokio::spawn(async move {
            let _slot = slots.acquire().await;
            let fetched = client
                .get_blob_range_until(&repo, &digest, range.clone(), Some(deadline))
                .await;
            drop(_slot);
            let start = range.start;
            let got = match fetched {
                Ok(data) => tokio::task::spawn_blocking(move || spans.load_windows(start, &data))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map(drop).map_err(|e| e.to_string())),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = got {
                tracing::debug!(ztoc = %digest, ?range, error = %e, "early checkpoint records: left to the mount");
            }
        });
    }
}

/// Spawns the range requests of `ranges` for a fresh layer, within the byte bound (and of the
/// checkpoint records they need, when the layer's zTOC came without them).
fn fetch_early(
    client: &Arc<Client>,
    early: &Arc<EarlyBytes>,
    img: &SociImage,
    layer: &Descriptor,
    spans: &Spans,
    ranges: &[RangeInclusive<SpanId>],
    deadline: Instant,
) {
    let repo = &img.reference.repository;
    let (runs, _) = soci_fs::plan_prefetch(spans, ranges, |_| false);
    if let Some(ztoc) = img.index.ztoc_for(&layer.digest) {
        fetch_windows_early(client, repo, ztoc, spans, &runs, deadline);
    }
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
        let (filler, slot) = Filler::new(deadline);
        {
            let mut m = early.lock();
            if m.contains_key(&key) {
                drop(m);
                early.held.fetch_sub(len, Ordering::Relaxed);
                continue;
            }
            m.insert(key.clone(), slot);
        }
        let (client, early, slots, repo) =
            (client.clone(), early.clone(), slots.clone(), repo.clone());
        tokio::spawn(async move {
            let got = {
                let _slot = slots.acquire().await;
                client
                    .get_blob_range_streamed(&repo, &key.0, range, Some(deadline), &|at, part| {
                        filler.arrived(at, part)
                    })
                    .await
                    .map_err(|e| e.to_string())
            };
            filler.end(got);
            // Kept until nobody holds them (the mount's prefetch took them, or its end
            // released the layer's ranges) or the TTL.
            if filler.progress.receiver_count() > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(EARLY_TTL) => {}
                    _ = filler.progress.closed() => {}
                }
            }
            {
                // Only this fetch's slot: the key may hold a newer fetch of the same bytes.
                let mut m = early.lock();
                if m.get(&key)
                    .is_some_and(|s| Arc::ptr_eq(&s.data, &filler.data))
                {
                    m.remove(&key);
                }
            }
            drop(filler);
            early.held.fetch_sub(len, Ordering::Relaxed);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_finds_the_range_of_its_own_layer_that_holds_it() {
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let mut held = Held::default();
        let until = Instant::now() + Duration::from_secs(5);
        for (l, s, e) in [(&a, 0, 10), (&a, 10, 20), (&a, 30, 40), (&b, 0, 100)] {
            held.insert((l.clone(), s, e), Filler::new(until).1);
        }
        let found = |l: &Digest, r: Range<u64>| held.containing(l, &r).map(|(k, _)| (k.1, k.2));
        assert_eq!(found(&a, 12..18), Some((10, 20)));
        assert_eq!(found(&a, 30..40), Some((30, 40)));
        assert_eq!(found(&a, 5..15), None, "across two ranges");
        assert_eq!(found(&a, 20..25), None, "in a gap");
        assert_eq!(found(&a, 35..45), None, "past the end");
        assert_eq!(found(&b, 50..60), Some((0, 100)));
        held.drop_ranges(&a, Some(&(15..31)));
        let mut left: Vec<(u64, u64)> = held.keys().map(|k| (k.1, k.2)).collect();
        left.sort();
        assert_eq!(left, vec![(0, 10), (0, 100)]);
        held.drop_ranges(&b, None);
        assert!(held.remove(&(a.clone(), 0, 10)).is_some());
        assert!(held.is_empty());
    }

    #[tokio::test]
    async fn bytes_fetched_ahead_are_handed_out_once_and_waited_for_in_flight() {
        let early = EarlyBytes::default();
        let layer = Digest::of(b"layer");
        let (filler, slot) = Filler::new(Instant::now() + Duration::from_secs(5));
        early.lock().insert((layer.clone(), 10, 20), slot);
        let deadline = Instant::now() + Duration::from_secs(5);
        // In flight (the fetch has not even started): the taker waits for it.
        let fill = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            filler.arrived(0, b"0123456789");
            filler.end(Ok(()));
            filler
        });
        let got = early.take(&layer, &(10..20), deadline).await;
        drop(fill.await.unwrap());
        assert_eq!(got.as_deref(), Some(&b"0123456789"[..]));
        // Once only: after the exact range went, neither it nor a part of it is there.
        assert_eq!(early.take(&layer, &(10..20), deadline).await, None);
        assert_eq!(early.take(&layer, &(10..19), deadline).await, None);
        // A failed early fetch: the caller fetches itself.
        let (filler, slot) = Filler::new(Instant::now() + Duration::from_secs(5));
        early.lock().insert((layer.clone(), 0, 5), slot);
        filler.end(Err("registry said no".into()));
        assert_eq!(early.take(&layer, &(0..5), deadline).await, None);
    }

    #[tokio::test]
    async fn a_read_inside_a_range_fetched_ahead_gets_its_part_as_soon_as_it_arrived() {
        let early = Arc::new(EarlyBytes::default());
        let (layer, other) = (Digest::of(b"layer"), Digest::of(b"other"));
        let (filler, slot) = Filler::new(Instant::now() + Duration::from_secs(5));
        early.lock().insert((layer.clone(), 100, 110), slot);
        let deadline = Instant::now() + Duration::from_secs(5);
        // The first half arrives; the rest does not yet.
        filler.arrived(0, b"abcde");
        let got = early.take(&layer, &(101..104), deadline).await;
        assert_eq!(got.as_deref(), Some(&b"bcd"[..]));
        // A part past what arrived waits for it; so does a prefetch waiting for the range.
        let (e2, l2) = (early.clone(), layer.clone());
        let later = tokio::spawn(async move { e2.take(&l2, &(103..108), deadline).await });
        let (e3, l3) = (early.clone(), layer.clone());
        let settled = tokio::spawn(async move { e3.settled(&l3, &(100..110), deadline).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!later.is_finished() && !settled.is_finished());
        // A retry resends from the start: only the new bytes count.
        filler.arrived(0, b"abcdefg");
        filler.arrived(7, b"hij");
        assert_eq!(later.await.unwrap().as_deref(), Some(&b"defgh"[..]));
        assert!(!settled.is_finished(), "not ended yet");
        filler.end(Ok(()));
        settled.await.unwrap();
        // Not past its ends, not another layer's.
        assert_eq!(early.take(&layer, &(95..105), deadline).await, None);
        assert_eq!(early.take(&layer, &(105..111), deadline).await, None);
        assert_eq!(early.take(&other, &(103..106), deadline).await, None);
        // Still there for the prefetch that asks for all of it.
        let all = early.take(&layer, &(100..110), deadline).await;
        assert_eq!(all.as_deref(), Some(&b"abcdefghij"[..]));
        // A fetch that failed half-way still serves what arrived, and nothing past it.
        let (f2, slot) = Filler::new(Instant::now() + Duration::from_secs(5));
        early.lock().insert((layer.clone(), 0, 10), slot);
        f2.arrived(0, b"short");
        f2.end(Err("reset".into()));
        assert_eq!(
            early.take(&layer, &(1..4), deadline).await.as_deref(),
            Some(&b"hor"[..])
        );
        assert_eq!(early.take(&layer, &(2..7), deadline).await, None);
        // The layer's mount-time prefetch is over: nothing of it is kept.
        early.release_layer(&layer);
        assert!(early.lock().is_empty());
        assert!(filler.progress.is_closed() && f2.progress.is_closed());
    }

    #[tokio::test]
    async fn a_stalled_fetch_ahead_holds_a_read_no_longer_than_its_own_deadline() {
        let early = EarlyBytes::default();
        let layer = Digest::of(b"layer");
        let (_filler, slot) = Filler::new(Instant::now() + Duration::from_millis(200));
        early.lock().insert((layer.clone(), 0, 100), slot);
        let t = Instant::now();
        let deadline = t + Duration::from_secs(30);
        assert_eq!(early.take(&layer, &(10..20), deadline).await, None);
        early.settled(&layer, &(0..100), deadline).await;
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn a_read_gives_up_on_a_range_that_stopped_arriving_and_bad_bytes_are_forgotten() {
        let early = EarlyBytes::default();
        let layer = Digest::of(b"layer");
        let deadline = Instant::now() + Duration::from_secs(30);
        let (filler, slot) = Filler::new(deadline);
        early.lock().insert((layer.clone(), 0, 100), slot);
        filler.arrived(0, b"0123456789");
        // What arrived is served; past it, a stall ends the wait after STALLED, not at the
        // fetch's or the read's deadline.
        assert_eq!(
            early.take(&layer, &(2..5), deadline).await.as_deref(),
            Some(&b"234"[..])
        );
        let t = Instant::now();
        assert_eq!(early.take(&layer, &(5..20), deadline).await, None);
        assert!(
            t.elapsed() >= STALLED && t.elapsed() < STALLED * 2,
            "{:?}",
            t.elapsed()
        );
        // A retry that sends other bytes ends the fetch: nothing more is taken from it.
        filler.arrived(0, b"0123X56789abc");
        assert_eq!(early.take(&layer, &(8..12), deadline).await, None);
        // Bytes that failed verification: the ranges overlapping them are forgotten.
        let (_f2, s2) = Filler::new(deadline);
        let (_f3, s3) = Filler::new(deadline);
        early.lock().insert((layer.clone(), 100, 200), s2);
        early.lock().insert((layer.clone(), 200, 300), s3);
        early.discard(&layer, &(150..160));
        let mut left: Vec<u64> = early.lock().keys().map(|k| k.1).collect();
        left.sort();
        assert_eq!(left, vec![0, 200]);
    }
}
