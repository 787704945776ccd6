//! Prefetch at mount time: when the SOCI index lists a prefetch artifact for a lazy layer
//! (ours or upstream's; `[prefetch] enable`), its spans are fetched as the layer is mounted,
//! so the container's first reads of the named files do not wait on a round trip each.
//! Best effort and bounded: whatever goes wrong (artifact missing, malformed, span ids past
//! the zTOC, registry errors, `timeout_sec`) costs at most the timeout and one warning; the
//! mount always goes ahead.
//!
//! Unlike upstream, the mount does not wait for the prefetch to finish (upstream's Prepare
//! returns after it): the container starts while the bytes arrive, and a read of a span the
//! prefetch is fetching waits for that fetch (the span manager's per-span locks, and
//! `early.rs` for ranges discovery asked for) instead of asking the registry again. Measured
//! on the runtime benchmark: the start no longer pays for the transfer and the container's
//! own start-up one after the other.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use soci_fs::SpanManager;
use soci_index::SociImage;
use soci_registry::Descriptor;
use tokio::time::Instant;
use tracing::{info, warn, Instrument};

use super::Remote;
use crate::config::PrefetchConfig;

/// Range requests one layer's prefetch runs at once.
const REQUESTS_PER_LAYER: usize = 4;

/// Prefetch counters (exported as metrics) and the daemon-wide bound on prefetching layers.
#[derive(Debug, Default)]
pub struct PrefetchState {
    slots: Option<Arc<tokio::sync::Semaphore>>,
    /// Layers whose prefetch ran (fully or not).
    pub layers: AtomicU64,
    /// Spans fetched by prefetch.
    pub spans: AtomicU64,
    /// Compressed bytes fetched by prefetch.
    pub bytes: AtomicU64,
    /// Range requests made by prefetch.
    pub requests: AtomicU64,
    /// Prefetches that did not complete (bad artifact, fetch error, timeout).
    pub failures: AtomicU64,
}

impl PrefetchState {
    /// State for `cfg` (`max_concurrency` 0 or negative: no limit, as upstream).
    pub fn new(cfg: &PrefetchConfig) -> PrefetchState {
        PrefetchState {
            slots: (cfg.max_concurrency > 0).then(|| {
                Arc::new(tokio::sync::Semaphore::new(
                    cfg.max_concurrency.min(1 << 20) as usize,
                ))
            }),
            ..Default::default()
        }
    }
}

impl Remote {
    /// Starts prefetching `layer`'s spans named by its prefetch artifact, if prefetch is
    /// enabled and the index lists one, and returns once the plan is known (usually at once:
    /// discovery made it). The fetches go on after the mount: a read of a span they fetch waits
    /// for them instead of fetching again. Never fails; logs once per layer when the prefetch
    /// does not complete.
    #[tracing::instrument(level = "debug", name = "prefetch", skip_all, fields(layer = %layer.digest))]
    pub(super) async fn prefetch_layer(
        &self,
        img: &SociImage,
        layer: &Descriptor,
        mgr: &Arc<SpanManager>,
    ) {
        if !self.cfg.prefetch.enable {
            return;
        }
        let Some(desc) = img.index.prefetch_for(&layer.digest).cloned() else {
            return;
        };
        let started = Instant::now();
        let deadline = started + Duration::from_secs(self.cfg.prefetch.timeout_sec.max(1));
        let st = self.prefetch.clone();
        st.layers.fetch_add(1, Ordering::Relaxed);
        // The plan discovery may have made already, its ranges fetched meanwhile.
        let plan = tokio::time::timeout_at(
            deadline,
            self.prefetch_plan(img, &desc, layer, mgr.span_count(), None),
        )
        .await;
        let ranges = match plan {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return report_failure(&st, layer, &desc, &e),
            Err(_) => return report_failure(&st, layer, &desc, "timed out"),
        };
        // Planned (and its spans marked) now, before any read of the container's.
        let fetch = mgr.prefetch(&ranges, REQUESTS_PER_LAYER, deadline);
        let (layer, early) = (layer.clone(), self.early.clone());
        // No parent: it outlives the Prepare.
        let span = tracing::debug_span!(parent: None, "prefetch_fetch", layer = %layer.digest);
        tokio::spawn(
            async move {
                let work = async {
                    let _permit = match &st.slots {
                        Some(s) => Some(s.acquire().await.map_err(|e| e.to_string())?),
                        None => None,
                    };
                    Ok::<_, String>(fetch.await)
                };
                // The span fetches end by `deadline` themselves; the margin lets them report.
                let outcome = tokio::time::timeout_at(deadline + Duration::from_secs(2), work).await;
                // Whatever discovery fetched for this layer and nobody took is not needed now.
                early.release_layer(&layer.digest);
                let problem = match outcome {
                    Err(_) => Some("timed out".to_string()),
                    Ok(Err(e)) => Some(e),
                    Ok(Ok(r)) => {
                        st.spans.fetch_add(r.spans, Ordering::Relaxed);
                        st.bytes.fetch_add(r.bytes, Ordering::Relaxed);
                        st.requests.fetch_add(r.requests, Ordering::Relaxed);
                        match (r.error, r.timed_out) {
                            (None, false) => {
                                info!(layer = %layer.digest, artifact = %desc.digest, spans = r.spans, cached = r.cached, bytes = r.bytes, requests = r.requests, elapsed = ?started.elapsed(), "prefetched");
                                None
                            }
                            (e, t) => Some(format!(
                                "{} spans fetched in {:?}{}{}",
                                r.spans,
                                started.elapsed(),
                                e.map(|e| format!("; {e}")).unwrap_or_default(),
                                if t { "; timed out" } else { "" }
                            )),
                        }
                    }
                };
                if let Some(p) = problem {
                    report_failure(&st, &layer, &desc, &p);
                }
            }
            .instrument(span),
        );
    }
}

fn report_failure(st: &PrefetchState, layer: &Descriptor, desc: &Descriptor, problem: &str) {
    st.failures.fetch_add(1, Ordering::Relaxed);
    warn!(layer = %layer.digest, artifact = %desc.digest, problem = %problem, "prefetch incomplete; the layer is read on demand");
}
