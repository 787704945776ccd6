//! Limits of full pulls, with upstream's `[pull_modes.parallel_pull_unpack]` meanings: HTTP
//! requests for layer blobs at once (all images / per image), layers being unpacked at once
//! (all images / per image), and the chunk size for parallel range requests.
//!
//! Why two kinds of permit: a layer streamed straight into its unpacker holds an unpack permit
//! for as long as it downloads, so a layer that cannot get one (upstream's default is one
//! unpack per image) is downloaded to a temp file meanwhile and unpacked when a permit frees
//! up. Downloads thus run as wide as the download limits allow while unpacks stay within
//! theirs, and memory stays at `window x chunk_size` per layer downloading.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::ParallelPullUnpack;

/// Range requests of one layer started ahead of the writer when no download limit is set.
const UNBOUNDED_WINDOW: usize = 16;
/// Most range requests of one layer in flight (memory: this many chunks).
const MAX_WINDOW: usize = 64;
/// Layers of one image downloading at once when no per-image download limit is set.
const UNBOUNDED_LAYERS_PER_IMAGE: usize = 16;

/// A limit from the config: positive numbers bound, anything else is unbounded (upstream
/// documents negative values as unbounded; 0 would block every pull, so it is too).
fn bound(n: i64) -> Option<usize> {
    usize::try_from(n).ok().filter(|&n| n > 0)
}

/// Process-wide limits and counters of full pulls.
pub(crate) struct PullLimits {
    /// Bytes per range request (0: one request per layer).
    pub chunk_size: u64,
    downloads: Option<Arc<Semaphore>>,
    unpacks: Option<Arc<Semaphore>>,
    per_image_downloads: Option<usize>,
    per_image_unpacks: Option<usize>,
    /// What full pulls did (served as metrics).
    pub stats: Arc<PullStats>,
}

/// Counters of full pulls.
#[derive(Default)]
pub struct PullStats {
    /// Range requests made for layer blobs.
    pub range_requests: AtomicU64,
    /// Layers downloaded with one whole-blob request (small, unchunked, or no-range registry).
    pub whole_downloads: AtomicU64,
    /// Layers that waited for an unpack slot in a temp file.
    pub spooled: AtomicU64,
    /// Most chunks one layer held in memory at once.
    pub peak_chunks_buffered: AtomicUsize,
    /// Layers being unpacked now / at most at once.
    pub unpacking: AtomicUsize,
    /// Most layers unpacked at once.
    pub peak_unpacking: AtomicUsize,
}

/// Per-image limits, shared by the layers of one image: every full pull of a layer of the
/// image (ahead of its Prepare or by the Prepare itself) must use the same one, or the
/// per-image bounds do not hold.
pub struct ImageLimits {
    /// Layers of the image downloading at once.
    pub(crate) layers: Arc<Semaphore>,
    downloads: Option<Arc<Semaphore>>,
    unpacks: Option<Arc<Semaphore>>,
}

/// The unpack permits a layer holds while it is unpacked.
pub(crate) struct UnpackSlot {
    _permits: Vec<OwnedSemaphorePermit>,
    stats: Arc<PullStats>,
}

impl Drop for UnpackSlot {
    fn drop(&mut self) {
        self.stats.unpacking.fetch_sub(1, Ordering::Relaxed);
    }
}

impl PullLimits {
    /// Limits from the config (`chunk_size` already validated by [`crate::config::Config::parse`]).
    pub fn new(p: &ParallelPullUnpack) -> PullLimits {
        PullLimits {
            chunk_size: p.chunk_size().unwrap_or(0),
            downloads: bound(p.max_concurrent_downloads).map(|n| Arc::new(Semaphore::new(n))),
            unpacks: bound(p.max_concurrent_unpacks).map(|n| Arc::new(Semaphore::new(n))),
            per_image_downloads: bound(p.max_concurrent_downloads_per_image),
            per_image_unpacks: bound(p.max_concurrent_unpacks_per_image),
            stats: Arc::default(),
        }
    }

    /// Fresh limits for one image.
    pub fn image(&self) -> ImageLimits {
        ImageLimits {
            layers: Arc::new(Semaphore::new(
                self.per_image_downloads
                    .unwrap_or(UNBOUNDED_LAYERS_PER_IMAGE),
            )),
            downloads: self
                .per_image_downloads
                .map(|n| Arc::new(Semaphore::new(n))),
            unpacks: self.per_image_unpacks.map(|n| Arc::new(Semaphore::new(n))),
        }
    }

    /// How one layer of `img` is downloaded: chunk size, window, and the download permits
    /// each request takes.
    pub fn chunked(&self, img: &ImageLimits) -> soci_registry::ChunkedDownload {
        let window = self
            .per_image_downloads
            .or(self
                .downloads
                .as_ref()
                .map(|s| s.available_permits().max(1)))
            .unwrap_or(UNBOUNDED_WINDOW)
            .clamp(1, MAX_WINDOW);
        soci_registry::ChunkedDownload {
            chunk_size: self.chunk_size,
            window,
            limits: self
                .downloads
                .iter()
                .chain(img.downloads.iter())
                .cloned()
                .collect(),
        }
    }

    fn unpack_sems<'a>(&'a self, img: &'a ImageLimits) -> impl Iterator<Item = &'a Arc<Semaphore>> {
        img.unpacks.iter().chain(self.unpacks.iter())
    }

    /// An unpack slot if one is free now.
    pub fn try_unpack(&self, img: &ImageLimits) -> Option<UnpackSlot> {
        let mut held = Vec::new();
        for s in self.unpack_sems(img) {
            held.push(s.clone().try_acquire_owned().ok()?);
        }
        Some(self.slot(held))
    }

    /// Waits for an unpack slot (freed as other layers finish unpacking, each bounded by the
    /// Prepare deadline of whoever waits for it).
    pub async fn unpack(&self, img: &ImageLimits) -> Result<UnpackSlot, super::RemoteError> {
        let mut held = Vec::new();
        for s in self.unpack_sems(img) {
            held.push(s.clone().acquire_owned().await?);
        }
        Ok(self.slot(held))
    }

    fn slot(&self, permits: Vec<OwnedSemaphorePermit>) -> UnpackSlot {
        let now = self.stats.unpacking.fetch_add(1, Ordering::Relaxed) + 1;
        self.stats.peak_unpacking.fetch_max(now, Ordering::Relaxed);
        UnpackSlot {
            _permits: permits,
            stats: self.stats.clone(),
        }
    }

    /// Records what one chunked download did.
    pub fn record(&self, s: &soci_registry::ChunkedStats) {
        let st = &self.stats;
        st.range_requests
            .fetch_add(s.range_requests, Ordering::Relaxed);
        if s.whole {
            st.whole_downloads.fetch_add(1, Ordering::Relaxed);
        }
        st.peak_chunks_buffered
            .fetch_max(s.peak_buffered, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_defaults_bound_unpacks_per_image_only() {
        let l = PullLimits::new(&ParallelPullUnpack::default());
        let img = l.image();
        let c = l.chunked(&img);
        assert_eq!((c.chunk_size, c.window, c.limits.len()), (0, 3, 1));
        let first = l.try_unpack(&img).expect("one unpack per image");
        assert!(
            l.try_unpack(&img).is_none(),
            "default: one unpack per image"
        );
        assert!(l.try_unpack(&l.image()).is_some(), "another image unpacks");
        drop(first);
        assert!(l.try_unpack(&img).is_some());
        assert_eq!(l.stats.peak_unpacking.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn negative_and_zero_are_unbounded() {
        let p = ParallelPullUnpack {
            max_concurrent_downloads_per_image: -1,
            max_concurrent_unpacks_per_image: 0,
            concurrent_download_chunk_size: "1mb".into(),
            ..Default::default()
        };
        let l = PullLimits::new(&p);
        let img = l.image();
        let c = l.chunked(&img);
        assert_eq!((c.chunk_size, c.window, c.limits.len()), (1 << 20, 16, 0));
        let held: Vec<_> = (0..100).filter_map(|_| l.try_unpack(&img)).collect();
        assert_eq!(held.len(), 100);
    }
}
