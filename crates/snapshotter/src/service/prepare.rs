//! Prepare of a remote layer: plan it, provide it (lazily over FUSE or unpacked here), commit
//! it under the target name, or hand it back to containerd (see `handback.rs`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use soci_index::labels as label;
use tonic::Status;
use tracing::{info, warn};

use super::handback::Cause;
use super::{labels, Service};
use crate::overlay::disk_usage;
use crate::remote::{LayerPlan, Remote, RemoteError};
use crate::store::{Kind, Usage};

impl Service {
    /// Prepare with remote-snapshot labels: provide the layer here (lazily over FUSE, or
    /// downloaded and unpacked) and commit it as the target: then the answer is an
    /// AlreadyExists status, so containerd skips the download. If the daemon cannot provide
    /// it, the layer is handed back ([`handback`]): the answer is an ordinary active
    /// snapshot's mounts and containerd pulls the layer itself. Only failures containerd
    /// cannot recover from either are errors.
    pub(super) async fn prepare_remote(
        &self,
        remote: Arc<Remote>,
        key: String,
        parent: String,
        l: HashMap<String, String>,
    ) -> Result<Vec<crate::proto::types::Mount>, Status> {
        let labels = labels(l);
        let target = labels.get(label::TARGET).cloned().unwrap_or_default();
        let exists =
            || Status::already_exists(format!("target snapshot {target:?} already exists"));
        let t = target.clone();
        if let Ok(s) = self.blocking(move |s| s.store.get(&t)).await {
            if s.kind == Kind::Committed {
                if let Some(l) = labels.get(label::LAYER_DIGEST) {
                    remote.full.discard(l);
                }
                // An existing lazy layer counts only while it is served (or restored now).
                self.inner.ensure_chain_served(&target).await?;
                return Err(exists());
            }
        }
        // Every wait on registries below ends by this deadline.
        let budget = remote.prepare_deadline();
        let deadline = tokio::time::Instant::now() + budget;
        let plan = match tokio::time::timeout_at(deadline, remote.plan(&labels)).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                let cause = Cause::classify(&e, Cause::Registry);
                let detail = format!("layer for {target}: {e}");
                return self
                    .hand_back(&remote, key, parent, labels, cause, None, &detail)
                    .await;
            }
            Err(_) => {
                let detail = format!("layer for {target}: {}", RemoteError::Deadline(budget));
                return self
                    .hand_back(&remote, key, parent, labels, Cause::Deadline, None, &detail)
                    .await;
            }
        };
        if let LayerPlan::Full { reason, .. } = &plan {
            if remote.full.go_to_containerd() {
                // Upstream's meaning of `experimental_parallel_pull_as_fallback = false`.
                let why = reason
                    .as_ref()
                    .map(|r| r.label())
                    .unwrap_or("layer_without_ztoc");
                let detail = format!(
                    "layer for {target}: not lazy ({why}); \
                     experimental_parallel_pull_as_fallback = false"
                );
                return self
                    .hand_back(
                        &remote,
                        key,
                        parent,
                        labels,
                        Cause::ContainerdPulls,
                        Some(why),
                        &detail,
                    )
                    .await;
            }
        }
        let (k, p, l) = (key.clone(), parent.clone(), labels.clone());
        let snap = self
            .blocking(move |s| {
                let parent = (!p.is_empty()).then_some(p.as_str());
                s.create_record(&k, parent, Kind::Active, l)
            })
            .await?;
        let fs_dir = self.inner.layout.fs(snap.id);
        let mut extra = BTreeMap::new();
        let provide = async {
            match plan {
                LayerPlan::Lazy { image, ztoc, layer } => {
                    match remote
                        .mount_lazy(snap.id, &fs_dir, &image, &ztoc, &layer)
                        .await
                    {
                        Ok(()) => {
                            extra.insert(label::REMOTE.to_string(), "soci".to_string());
                            extra.insert(label::MODE.to_string(), label::MODE_LAZY.to_string());
                            extra.insert(label::ZTOC_DIGEST.to_string(), ztoc.digest.to_string());
                            Ok(())
                        }
                        Err(e) => {
                            warn!(layer = %layer.digest, error = %e, "lazy mount failed; pulling the layer in full");
                            remote.release(snap.id);
                            extra.insert(label::MODE.to_string(), label::MODE_FULL.to_string());
                            extra.insert(
                                label::FALLBACK_REASON.to_string(),
                                "lazy_mount_failed".to_string(),
                            );
                            remote
                                .full
                                .unpack_full(
                                    &fs_dir,
                                    &image.reference.repository,
                                    &layer,
                                    &remote.full.lone_layer_limits(),
                                )
                                .await
                        }
                    }
                }
                LayerPlan::Full {
                    repo,
                    layer,
                    reason,
                    limits,
                } => {
                    extra.insert(label::MODE.to_string(), label::MODE_FULL.to_string());
                    let why = reason
                        .map(|r| r.label().to_string())
                        .unwrap_or_else(|| remote.full.reason().to_string());
                    extra.insert(label::FALLBACK_REASON.to_string(), why);
                    remote
                        .full
                        .unpack_full(&fs_dir, &repo, &layer, &limits)
                        .await
                }
            }
        };
        let result = match tokio::time::timeout_at(deadline, provide).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err((Cause::classify(&e, Cause::FullPull), e)),
            Err(_) => Err((Cause::Deadline, RemoteError::Deadline(budget))),
        };
        let lazy = extra.get(label::MODE).map(String::as_str) == Some(label::MODE_LAZY);
        let after = extra.get(label::FALLBACK_REASON).cloned();
        let mut committed_labels = labels.clone();
        committed_labels.extend(extra);
        let (k, t) = (key.clone(), target.clone());
        let commit = match &result {
            Ok(()) => {
                self.blocking(move |s| {
                    let usage = if lazy {
                        Usage::default()
                    } else {
                        disk_usage(&s.layout.fs(snap.id))?
                    };
                    s.store.commit(&k, &t, committed_labels, usage).map(|_| ())
                })
                .await
            }
            Err(_) => Ok(()),
        };
        if result.is_err() || commit.is_err() {
            // Undo: nothing half-made stays behind (lazy mount, record, unpacked files).
            remote.release(snap.id);
            let k = key.clone();
            let _ = self.blocking(move |s| s.remove(&k)).await;
        }
        match (result, commit) {
            (Ok(()), Ok(())) => {
                info!(target = %target, lazy, "remote snapshot ready");
                Err(exists())
            }
            (Ok(()), Err(e)) if e.code() == tonic::Code::AlreadyExists => Err(exists()),
            (Ok(()), Err(e)) => Err(e),
            // A full disk: containerd cannot do better (ResourceExhausted).
            (Err((_, e)), _) if e.is_no_space() => Err(e.status(&target)),
            (Err((cause, e)), _) => {
                let detail = format!("layer for {target}: {e}");
                self.hand_back(
                    &remote,
                    key,
                    parent,
                    labels,
                    cause,
                    after.as_deref(),
                    &detail,
                )
                .await
            }
        }
    }
}
