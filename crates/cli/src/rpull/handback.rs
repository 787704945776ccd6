//! The hand-back apply path of `soci image rpull`: a layer the snapshotter answered with
//! mounts (handed back, see the daemon's `service/handback.rs`) is pulled and applied here the
//! way containerd's own unpacker does it.
//!
//! Why apart: it is the one place the CLI writes into containerd's content store and runs the
//! Diff service; the rest of rpull only drives Prepare/Commit.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context, Result};
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{CommitSnapshotRequest, RemoveSnapshotRequest};
use containerd_client::services::v1::{
    content_client::ContentClient, WriteAction, WriteContentRequest,
};
use containerd_client::services::v1::{diff_client::DiffClient, ApplyRequest, InfoRequest};
use containerd_client::types::Descriptor as CtdDescriptor;
use tonic::Code;

use super::Ctd;

/// Layer bytes per Content.Write message.
const WRITE_CHUNK: usize = 1 << 20;
/// Bound on fetching one handed-back layer from the registry.
const LAYER_FETCH_DEADLINE: std::time::Duration = std::time::Duration::from_secs(3600);

/// A layer the snapshotter handed back (answered Prepare with mounts): pulled and applied
/// here the way containerd's unpacker does it.
pub(super) struct HandedBack<'a> {
    pub(super) client: &'a soci_registry::Client,
    pub(super) repo: &'a soci_registry::Repository,
    pub(super) layer: &'a soci_registry::Descriptor,
    pub(super) diff_id: &'a str,
    pub(super) snapshotter: &'a str,
    pub(super) key: &'a str,
    pub(super) chain: &'a str,
}

impl HandedBack<'_> {
    /// Ensures the layer blob is in containerd's content store, applies it onto `mounts` with
    /// containerd's Diff service (checking the result against the config's diff id) and
    /// commits the active snapshot under the chain id.
    pub(super) async fn pull_and_apply(
        &self,
        ctd: &Ctd,
        mounts: Vec<containerd_client::types::Mount>,
    ) -> Result<()> {
        self.ensure_content(ctd).await?;
        let mut diff = DiffClient::new(ctd.channel.clone());
        let desc = CtdDescriptor {
            media_type: self.layer.media_type.clone(),
            digest: self.layer.digest.to_string(),
            size: self.layer.size as i64,
            annotations: HashMap::new(),
        };
        let applied = diff
            .apply(ctd.req(ApplyRequest {
                diff: Some(desc),
                mounts,
                payloads: HashMap::new(),
                sync_fs: false,
            }))
            .await
            .map_err(|e| {
                anyhow!(
                    "applying layer with containerd's diff service: {}",
                    e.message()
                )
            })?
            .into_inner()
            .applied
            .unwrap_or_default();
        if applied.digest != self.diff_id {
            bail!(
                "applied layer has diff id {}, the image config says {}",
                applied.digest,
                self.diff_id
            );
        }
        let mut snaps = SnapshotsClient::new(ctd.channel.clone());
        match snaps
            .commit(ctd.req(CommitSnapshotRequest {
                snapshotter: self.snapshotter.into(),
                name: self.chain.into(),
                key: self.key.into(),
                labels: HashMap::new(),
            }))
            .await
        {
            Ok(_) => Ok(()),
            // Another pull committed the same layer meanwhile.
            Err(e) if e.code() == Code::AlreadyExists => {
                let _ = snaps
                    .remove(ctd.req(RemoveSnapshotRequest {
                        snapshotter: self.snapshotter.into(),
                        key: self.key.into(),
                    }))
                    .await;
                Ok(())
            }
            Err(e) => bail!("committing snapshot {}: {}", self.chain, e.message()),
        }
    }

    /// Writes the layer blob into containerd's content store (streamed from the registry with
    /// this command's own credentials; containerd checks the digest) unless it is there.
    async fn ensure_content(&self, ctd: &Ctd) -> Result<()> {
        let digest = self.layer.digest.to_string();
        let mut content = ContentClient::new(ctd.channel.clone());
        if content
            .info(ctd.req(InfoRequest {
                digest: digest.clone(),
            }))
            .await
            .is_ok()
        {
            return Ok(());
        }
        let mut labels = HashMap::from([(
            "containerd.io/uncompressed".to_string(),
            self.diff_id.to_string(),
        )]);
        labels.insert(
            format!("containerd.io/distribution.source.{}", self.repo.registry),
            self.repo.name.clone(),
        );
        let total = self.layer.size as i64;
        let msg = |action: WriteAction, offset: i64, data: Vec<u8>| WriteContentRequest {
            action: action as i32,
            r#ref: format!("soci-rpull-layer-{digest}"),
            total,
            expected: digest.clone(),
            offset,
            data,
            labels: if action == WriteAction::Commit {
                labels.clone()
            } else {
                HashMap::new()
            },
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteContentRequest>(4);
        let produce = async {
            // The sender lives in this future: when the fetch fails, dropping it ends the
            // request stream, so containerd's Write (and `consume`) end too instead of waiting.
            let tx = tx;
            let deadline = tokio::time::Instant::now() + LAYER_FETCH_DEADLINE;
            let mut blob = self
                .client
                .open_blob(self.repo, self.layer, Some(deadline))
                .await?;
            let (mut offset, mut buf) = (0i64, Vec::with_capacity(WRITE_CHUNK));
            while let Some(chunk) = blob.chunk().await? {
                buf.extend_from_slice(&chunk);
                if buf.len() >= WRITE_CHUNK {
                    let n = buf.len() as i64;
                    let data = std::mem::replace(&mut buf, Vec::with_capacity(WRITE_CHUNK));
                    if tx
                        .send(msg(WriteAction::Write, offset, data))
                        .await
                        .is_err()
                    {
                        bail!("containerd ended the write of {digest}");
                    }
                    offset += n;
                }
            }
            let n = buf.len() as i64;
            if tx
                .send(msg(WriteAction::Commit, offset, buf))
                .await
                .is_err()
            {
                bail!("containerd ended the write of {digest}");
            }
            if offset + n != total {
                bail!(
                    "layer {digest}: {} bytes, descriptor says {total}",
                    offset + n
                );
            }
            Ok(())
        };
        let consume = async {
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
            let mut s = match content.write(ctd.req(stream)).await {
                Ok(r) => r.into_inner(),
                Err(e) if e.code() == Code::AlreadyExists => return Ok(()),
                Err(e) => bail!("writing {digest} to containerd: {}", e.message()),
            };
            loop {
                match s.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => return Ok(()),
                    Err(e) if e.code() == Code::AlreadyExists => return Ok(()),
                    Err(e) => bail!("writing {digest} to containerd: {}", e.message()),
                }
            }
        };
        let (produced, consumed) = tokio::join!(produce, consume);
        consumed?;
        produced.with_context(|| format!("fetching layer {digest} from the registry"))
    }
}
