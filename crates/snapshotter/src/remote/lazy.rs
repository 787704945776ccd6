//! Lazy layers: FUSE mounts served from a prepared zTOC, the fd holder that keeps them alive
//! across daemon restarts, span-cache budgets and background fetch.
//!
//! Why apart from the resolver: everything here has a side effect on the host (mounts,
//! descriptors handed to the holder, span files on disk), and the resolver has none.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use soci_fs::{RangeReader, SpanConfig, SpanManager};
use soci_index::SociImage;
use soci_registry::{Client, Descriptor, Repository};
use tracing::{info, warn, Instrument};

use super::mounter::{LazyMount, Mounter};
use super::resolver::PreparedLayer;
use super::{Remote, RemoteError, Result};
use crate::holder::{Held, HolderClient};

/// Range reads of a layer blob from the registry (or whole reads, if it ignores ranges).
struct RegistryReader {
    client: Arc<Client>,
    /// Prefetch ranges fetched at discovery (see `early.rs`).
    early: Arc<super::early::EarlyBytes>,
    repo: Repository,
    layer: Descriptor,
    /// The layer's zTOC (its checkpoint records, when the mount fetched it without them).
    ztoc: Descriptor,
}

impl RangeReader for RegistryReader {
    fn read_range(
        &self,
        range: Range<u64>,
        deadline: tokio::time::Instant,
    ) -> soci_fs::ReadFuture<'_, Bytes> {
        Box::pin(async move {
            if let Some(b) = self.early.take(&self.layer.digest, &range, deadline).await {
                return Ok(b);
            }
            self.client
                .get_blob_range_until(&self.repo, &self.layer.digest, range, Some(deadline))
                .await
                .map_err(io::Error::other)
        })
    }

    fn settled(
        &self,
        range: Range<u64>,
        deadline: tokio::time::Instant,
    ) -> soci_fs::ReadFuture<'_, ()> {
        Box::pin(async move {
            self.early
                .settled(&self.layer.digest, &range, deadline)
                .await;
            Ok(())
        })
    }

    fn discard(&self, range: Range<u64>) {
        self.early.discard(&self.layer.digest, &range);
    }

    fn read_ztoc_range(
        &self,
        range: Range<u64>,
        deadline: tokio::time::Instant,
    ) -> soci_fs::ReadFuture<'_, Bytes> {
        Box::pin(async move {
            self.client
                .get_blob_range_until(&self.repo, &self.ztoc.digest, range, Some(deadline))
                .await
                .map_err(io::Error::other)
        })
    }

    fn whole_only(&self) -> bool {
        !self.client.supports_ranges(&self.repo.registry)
    }

    fn read_whole(&self, tx: tokio::sync::mpsc::Sender<Bytes>) -> soci_fs::ReadFuture<'_, ()> {
        Box::pin(async move {
            let mut blob = self
                .client
                .open_blob(&self.repo, &self.layer, None)
                .await
                .map_err(io::Error::other)?;
            while let Some(chunk) = blob.chunk().await.map_err(io::Error::other)? {
                if tx.send(chunk).await.is_err() {
                    break;
                }
            }
            Ok(())
        })
    }
}

/// The lazy layers' state: their mounts and what keeps them alive and bounded.
pub(super) struct LazyState {
    /// Span cache directories, one per snapshot id.
    pub(super) cache_root: PathBuf,
    /// Mounted lazy layers by snapshot id.
    pub(super) mounts: Mutex<HashMap<u64, Box<dyn LazyMount>>>,
    /// Makes and clears the mounts (the kernel's FUSE in production).
    pub(super) mounter: Arc<dyn Mounter>,
    /// The fd holder keeping lazy mounts alive across restarts (if enabled and reachable).
    pub(super) holder: Mutex<Option<HolderClient>>,
    /// The holder's socket.
    pub(super) holder_path: PathBuf,
    /// Mounts an earlier daemon left to the holder, not resumed yet.
    pub(super) held: Mutex<BTreeMap<u64, Held>>,
    /// Shared bound on background span fetches.
    pub(super) background_slots: Arc<tokio::sync::Semaphore>,
}

impl Remote {
    /// Mounts a layer lazily at `fs_dir` for snapshot `id` (see `observe.rs`).
    pub(super) async fn mount_lazy_uncounted(
        &self,
        id: u64,
        fs_dir: &Path,
        img: &SociImage,
        ztoc: &Descriptor,
        layer: &Descriptor,
    ) -> Result<()> {
        let PreparedLayer { spans, tree } = self.prepare_layer(img, ztoc, layer).await?;
        // Mounted layers keep their own copy; the prepared one is not needed any more.
        self.resolver
            .prepared
            .remove(&super::resolver::prepared_key(ztoc));
        let reader = Arc::new(RegistryReader {
            client: self.client.clone(),
            early: self.early.clone(),
            repo: img.reference.repository.clone(),
            layer: layer.clone(),
            ztoc: ztoc.clone(),
        });
        let cfg = SpanConfig {
            cache_dir: self.lazy.cache_root.join(id.to_string()),
            disable_verification: self.cfg.disable_verification,
            max_verification_retries: self.cfg.blob.max_span_verification_retries,
            fetch_timeout: Duration::from_secs(self.cfg.blob.fetching_timeout_sec.max(1)),
            poisoned_ttl: soci_fs::POISONED_SPAN_TTL,
            cache: self.cache.clone(),
            read_ahead_spans: self.cfg.blob.read_ahead_spans,
        };
        let mgr = SpanManager::new(
            layer.digest.to_string(),
            spans,
            reader,
            cfg,
            self.metrics.clone(),
        )
        .map_err(|e| RemoteError::Ztoc(e.to_string()))?;
        super::record::start(&self.lazy.cache_root, id, img, ztoc, layer, &mgr);
        self.prefetch_layer(img, layer, &mgr).await;
        let served = soci_fs::Served {
            tree,
            spans: mgr.clone(),
            rt: tokio::runtime::Handle::current(),
            timeouts: self.cfg.fuse.cache_timeouts(),
            metrics: self.metrics.clone(),
            // Also when off: a connection taken over from a daemon that had it on keeps the
            // backing files its open inodes use.
            passthrough: Some(soci_fs::PassthroughConfig {
                dir: self.passthrough_dir(id),
                disk: self.cache.clone(),
                enabled: self.cfg.fuse.passthrough,
            }),
        };
        let dir = fs_dir.to_path_buf();
        let held = self.lazy.held.lock().expect("held").remove(&id);
        let resumed = held.is_some();
        let mounter = self.lazy.mounter.clone();
        let span = tracing::Span::current();
        let mounted = tokio::task::spawn_blocking(move || {
            span.in_scope(|| mounter.mount(served, &dir, held))
        })
        .await?
        .map_err(|e| RemoteError::Mount {
            path: fs_dir.to_path_buf(),
            source: Arc::new(e),
        })?;
        if resumed {
            info!(id, mountpoint = %fs_dir.display(), "serving the mount kept by the fd holder again");
        } else {
            self.hold(id, mounted.as_ref());
        }
        if !self.cfg.background_fetch.disable {
            let bg = &self.cfg.background_fetch;
            let silence = Duration::from_millis(bg.silence_period_msec);
            // No parent: it outlives the Prepare.
            let span =
                tracing::debug_span!(parent: None, "background_fetch", layer = %layer.digest);
            let fill = mgr.background_fill(soci_fs::BackgroundConfig {
                delay: silence,
                period: Duration::from_millis(bg.fetch_period_msec),
                yield_to_demand: silence,
                slots: self.lazy.background_slots.clone(),
            });
            // Then every file the layer now holds whole gets a passthrough backing file.
            let backing_files = mounted.materialize_local_files();
            tokio::spawn(
                async move {
                    fill.await;
                    backing_files.await;
                }
                .instrument(span),
            );
        }
        self.lazy.mounts.lock().expect("mounts").insert(id, mounted);
        self.layers_lazy
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Connects to the fd holder (starting it if needed) and takes the list of mounts an
    /// earlier daemon left with it. Without a holder, lazy layers are simply mounted again.
    pub fn connect_holder(&self) {
        if !self.cfg.fuse.keep_mounts_across_restart {
            return;
        }
        match self.start_holder().and_then(|c| Ok((c.list()?, c))) {
            Ok((held, c)) => {
                if !held.is_empty() {
                    info!(
                        mounts = held.len(),
                        "fd holder kept lazy mounts from the last run"
                    );
                }
                *self.lazy.held.lock().expect("held") = held;
                *self.lazy.holder.lock().expect("holder") = Some(c);
            }
            Err(e) => warn!(error = %e, "no fd holder: lazy mounts will not survive a restart"),
        }
    }

    /// Connects to the fd holder, starting one (this executable, `fd-holder`) if none listens.
    fn start_holder(&self) -> Result<HolderClient, crate::holder::HolderError> {
        let exe = std::env::current_exe().map_err(crate::holder::HolderError::Spawn)?;
        let timeout = Duration::from_secs(self.cfg.fuse.holder_timeout_sec.max(1));
        HolderClient::connect_or_spawn(&self.lazy.holder_path, &exe, timeout)
    }

    /// Whether an earlier daemon left mount `id` with the holder (to be resumed).
    pub fn is_held(&self, id: u64) -> bool {
        self.lazy.held.lock().expect("held").contains_key(&id)
    }

    /// Gives up mount `id` (left by an earlier daemon, or half set up): the holder closes its
    /// descriptor, ending the connection, and the mount point is detached.
    pub fn drop_held(&self, id: u64, fs_dir: &Path) {
        self.lazy.held.lock().expect("held").remove(&id);
        self.unhold(id);
        self.lazy.mounter.detach_stale(fs_dir);
    }

    /// Held mounts no snapshot claimed after the restore pass: their connections end.
    pub fn drop_unclaimed_held(&self) {
        let left: Vec<u64> = std::mem::take(&mut *self.lazy.held.lock().expect("held"))
            .into_keys()
            .collect();
        for id in left {
            warn!(id, "fd holder kept a mount no snapshot claims; released");
            self.unhold(id);
        }
    }

    fn hold(&self, id: u64, m: &dyn LazyMount) {
        let mut guard = self.lazy.holder.lock().expect("holder");
        let Some(c) = guard.as_ref() else { return };
        let Some(fd) = m.fuse_fd() else { return };
        if let Err(e) = c.put(id, m.session(), fd) {
            // The holder may have exited (it does when it holds nothing): start a new one.
            let retry = self
                .start_holder()
                .and_then(|c| c.put(id, m.session(), fd).map(|()| c));
            match retry {
                Ok(c) => *guard = Some(c),
                Err(e2) => {
                    warn!(id, error = %e, retry = %e2, "fd holder unavailable: this mount will not survive a restart");
                    *guard = None;
                }
            }
        }
    }

    pub(super) fn unhold(&self, id: u64) {
        if let Some(c) = self.lazy.holder.lock().expect("holder").as_ref() {
            if let Err(e) = c.del(id) {
                warn!(id, error = %e, "fd holder did not release a mount");
            }
        }
    }

    /// Directory of the passthrough backing files of snapshot `id`'s lazy layer.
    fn passthrough_dir(&self, id: u64) -> PathBuf {
        self.lazy
            .cache_root
            .join("passthrough")
            .join(id.to_string())
    }

    /// Unmounts the lazy layer of snapshot `id` (if any) and drops its span cache.
    pub fn release(&self, id: u64) {
        self.metrics.upstream.unmounted(&id.to_string());
        self.forget_health(id);
        self.unhold(id);
        if let Some(m) = self.lazy.mounts.lock().expect("mounts").remove(&id) {
            let spans = m.spans().clone();
            let backing = m.passthrough();
            if let Err(e) = m.unmount() {
                warn!(id, error = %e, "unmounting lazy layer failed");
            }
            spans.remove_cache();
            if let Some(p) = backing {
                p.remove_files();
            }
        }
        let _ = std::fs::remove_dir_all(self.lazy.cache_root.join(id.to_string()));
        let _ = std::fs::remove_dir_all(self.passthrough_dir(id));
        super::record::forget(&self.lazy.cache_root, id);
    }

    /// Removes the span caches and passthrough directories of snapshots not in `live` and not
    /// mounted: what a crash between a snapshot's removal and [`Remote::release`] left behind
    /// (disk the budget no longer counts). Returns how many went. Demand records are left:
    /// small, and `soci prefetch record` skips the ones it cannot use.
    pub fn remove_orphan_caches(&self, live: &std::collections::HashSet<u64>) -> usize {
        let mut removed = 0;
        let root = &self.lazy.cache_root;
        for dir in [root.clone(), root.join("passthrough")] {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                // Only `<id>` directories (not `passthrough` itself, nor symlinks: never followed).
                let Some(id) = e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) else {
                    continue;
                };
                let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
                if !is_dir || live.contains(&id) || self.is_mounted(id) {
                    continue;
                }
                match std::fs::remove_dir_all(e.path()) {
                    Ok(()) => removed += 1,
                    Err(err) => {
                        warn!(path = %e.path().display(), error = %err, "cannot remove an orphan layer cache")
                    }
                }
            }
        }
        removed
    }

    /// Whether snapshot `id` is a mounted lazy layer.
    pub fn is_mounted(&self, id: u64) -> bool {
        self.lazy.mounts.lock().expect("mounts").contains_key(&id)
    }

    /// Shutdown: with a holder, stops serving every lazy layer but leaves them mounted for
    /// the next daemon (reads in flight are answered first, within `wait`); without one,
    /// unmounts them.
    pub fn shutdown(&self, wait: Duration) {
        if self.lazy.holder.lock().expect("holder").is_none() {
            return self.unmount_all();
        }
        let all: Vec<(u64, Box<dyn LazyMount>)> =
            self.lazy.mounts.lock().expect("mounts").drain().collect();
        let n = all.len();
        for (_, m) in all {
            m.detach(wait);
        }
        if n > 0 {
            info!(
                mounts = n,
                "lazy layers left mounted for the next daemon (fd holder)"
            );
        }
    }

    /// Unmounts every lazy layer.
    pub fn unmount_all(&self) {
        let all: Vec<(u64, Box<dyn LazyMount>)> =
            self.lazy.mounts.lock().expect("mounts").drain().collect();
        for (id, m) in all {
            if let Err(e) = m.unmount() {
                warn!(id, error = %e, "unmounting lazy layer failed");
            }
        }
    }

    /// Span cache size on disk for snapshot `id`.
    pub fn cached_spans(&self, id: u64) -> Option<(usize, usize)> {
        self.lazy
            .mounts
            .lock()
            .expect("mounts")
            .get(&id)
            .map(|m| (m.spans().cached_count(), m.spans().span_count()))
    }
}
