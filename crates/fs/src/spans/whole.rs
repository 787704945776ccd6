//! Whole-blob mode of the span manager, for sources without range support: one task per
//! layer streams the blob once and verifies and caches span by span as the bytes pass, and
//! reads wait for their spans (a demand read until its deadline).

use std::io;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use soci_ztoc::SpanId;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{eio, Priority, SpanManager};

/// The whole-blob fetch of a layer: at most one at a time.
#[derive(Debug, Default)]
pub(super) struct WholeState {
    running: bool,
    /// Fetches started so far.
    started: u64,
    /// Fetches ended so far, and why the last one failed.
    ended: u64,
    last_error: Option<String>,
}

impl SpanManager {
    /// Starts the whole-blob fetch if none is running; returns its number.
    pub(super) fn start_whole(&self, prio: Priority) -> u64 {
        let mut st = self.whole.lock().unwrap_or_else(|e| e.into_inner());
        if !st.running {
            if let Some(me) = self.me.upgrade() {
                st.running = true;
                st.started += 1;
                tokio::spawn(me.fetch_whole(prio));
            }
        }
        st.started
    }

    /// Waits for the whole-blob fetch to store spans `run` (a demand read until its
    /// deadline; the fetch itself goes on for later reads).
    pub(super) async fn wait_for_whole(
        &self,
        run: Range<SpanId>,
        prio: Priority,
        deadline: Instant,
    ) -> io::Result<()> {
        let mut rx = self.progress.subscribe();
        let fetch = self.start_whole(prio);
        loop {
            rx.borrow_and_update();
            if run.clone().all(|i| self.is_cached(i)) {
                return Ok(());
            }
            self.refuse_poisoned(&run.clone().collect::<Vec<_>>())?;
            {
                let st = self.whole.lock().unwrap_or_else(|e| e.into_inner());
                if st.ended >= fetch {
                    return Err(eio(format!(
                        "layer {}: whole-blob fetch ended without spans {run:?}: {}",
                        self.layer,
                        st.last_error.as_deref().unwrap_or("no error")
                    )));
                }
            }
            let changed = rx.changed();
            let waited = match prio {
                Priority::Demand => tokio::time::timeout_at(deadline, changed).await,
                Priority::Background => Ok(changed.await),
            };
            if waited.is_err() {
                return Err(eio(format!(
                    "layer {}: spans {run:?} not yet fetched after {:?} (the registry serves whole blobs only; the fetch goes on)",
                    self.layer, self.cfg.fetch_timeout
                )));
            }
        }
    }

    /// Reads the whole blob once, verifying and caching each span as its bytes pass; spans
    /// already cached are skipped. Memory held: one span plus one chunk.
    async fn fetch_whole(self: Arc<Self>, prio: Priority) {
        let (tx, mut rx) = mpsc::channel::<Bytes>(16);
        let reader = self.reader.clone();
        let fetch = tokio::spawn(async move { reader.read_whole(tx).await });
        let mut buf: Vec<u8> = Vec::new();
        let mut base = 0u64;
        let mut ended = false;
        let mut error = None;
        info!(layer = %self.layer, "fetching the whole layer blob (registry without range support)");
        for id in 0..self.spans.len() {
            if self.closed.load(Ordering::Relaxed) {
                break;
            }
            let s = match self.spans.span(id) {
                Ok(s) => s,
                Err(e) => {
                    error = Some(e.to_string());
                    break;
                }
            };
            // Drop what lies before this span, then take bytes up to its end.
            while base < s.compressed.start && !ended {
                if buf.is_empty() {
                    match rx.recv().await {
                        Some(c) => buf.extend_from_slice(&c),
                        None => ended = true,
                    }
                    continue;
                }
                let k = (s.compressed.start - base).min(buf.len() as u64);
                buf.drain(..k as usize);
                base += k;
            }
            while base + (buf.len() as u64) < s.compressed.end && !ended {
                match rx.recv().await {
                    Some(c) => buf.extend_from_slice(&c),
                    None => ended = true,
                }
            }
            if base != s.compressed.start || base + (buf.len() as u64) < s.compressed.end {
                break;
            }
            if !self.is_cached(id) {
                let len = (s.compressed.end - s.compressed.start) as usize;
                let data = Bytes::copy_from_slice(&buf[..len]);
                let deadline = Instant::now() + self.cfg.fetch_timeout;
                let decoded = match self.ensure_windows(id..id + 1, prio, deadline).await {
                    Ok(()) => self.decode_store(id..id + 1, base, data, prio).await,
                    Err(e) => Err(e),
                };
                match decoded {
                    Ok((_, None)) => {}
                    Ok((_, Some(f))) => {
                        let e = self.settle(f);
                        warn!(layer = %self.layer, span = id, error = %e, "span from the whole blob failed");
                    }
                    Err(e) => {
                        warn!(layer = %self.layer, span = id, error = %e, "span from the whole blob failed");
                    }
                }
            }
            self.progress.send_modify(|g| *g += 1);
        }
        drop(rx);
        let fetched = fetch.await;
        if error.is_none() {
            error = match fetched {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(format!("fetch task: {e}")),
            };
        }
        if let Some(e) = &error {
            warn!(layer = %self.layer, error = %e, "whole-blob fetch failed");
        }
        let mut st = self.whole.lock().unwrap_or_else(|e| e.into_inner());
        st.running = false;
        st.ended = st.started;
        st.last_error = error;
        drop(st);
        self.progress.send_modify(|g| *g += 1);
    }
}
