//! Background fill of a layer's spans: paced, bounded by a daemon-wide semaphore and the disk
//! budget, and yielding to demand reads.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use super::{Priority, SpanManager};

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

impl SpanManager {
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
                // A demand read may stamp a later time than this elapsed() (a race).
                let since = (self.born.elapsed().as_millis() as u64)
                    .saturating_sub(self.last_demand_ms.load(Ordering::Relaxed));
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
            if !self.cfg.cache.disk_fits(want.unwrap_or(0)) {
                info!(layer = %self.layer, used = self.cfg.cache.disk_bytes(), "span disk cache is full; background fetch stops");
                return;
            }
            let Ok(_permit) = cfg.slots.acquire().await else {
                return;
            };
            if let Err(e) = self.ensure(id..id + 1, Priority::Background).await {
                self.metrics.upstream.inc(
                    crate::metrics::op::BACKGROUND_SPAN_FETCH_FAILURE_COUNT,
                    &self.layer,
                );
                warn!(layer = %self.layer, span = id, error = %e, "background fetch failed; stopping it");
                return;
            }
            drop(_permit);
            tokio::time::sleep(cfg.period).await;
        }
        debug!(layer = %self.layer, "background fetch complete");
    }
}
