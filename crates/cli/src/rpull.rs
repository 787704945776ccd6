//! `soci image rpull` and `soci image mode`: pull through containerd so that the soci
//! snapshotter provides the layers (lazily where a SOCI index allows), and show how an image's
//! layers were provided.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    content_client::ContentClient, images_client::ImagesClient, leases_client::LeasesClient,
    CreateImageRequest, CreateRequest, DeleteRequest, GetImageRequest, Image, ReadContentRequest,
    UpdateImageRequest, WriteAction, WriteContentRequest,
};
use containerd_client::services::v1::{diff_client::DiffClient, ApplyRequest, InfoRequest};
use containerd_client::types::Descriptor as CtdDescriptor;
use sha2::{Digest as _, Sha256};
use soci_index::labels as label;
use soci_registry::oci::{is_index, is_manifest};
use soci_registry::{ImageIndex, ImageManifest, Platform, Reference};
use tonic::transport::Channel;
use tonic::{Code, Request};

use crate::RegistryArgs;

/// Layer bytes per Content.Write message.
const WRITE_CHUNK: usize = 1 << 20;
/// Bound on fetching one handed-back layer from the registry.
const LAYER_FETCH_DEADLINE: std::time::Duration = std::time::Duration::from_secs(3600);

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Pull an image with the soci snapshotter: layers with a zTOC are mounted lazily.
    Rpull {
        /// Image reference.
        reference: String,
        /// Snapshotter name in containerd.
        #[arg(long, default_value = "soci")]
        snapshotter: String,
        /// Use this SOCI index (its manifest digest) instead of discovery (as nerdctl's flag).
        #[arg(long)]
        soci_index_digest: Option<String>,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Show how each layer of a pulled image is provided: lazily (soci) or by full pull.
    Mode {
        /// Image name in containerd.
        reference: String,
        /// Snapshotter name in containerd.
        #[arg(long, default_value = "soci")]
        snapshotter: String,
    },
}

struct Ctd {
    ns: String,
    lease: Option<String>,
    channel: Channel,
}

impl Ctd {
    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        let md = r.metadata_mut();
        if let Ok(v) = self.ns.parse() {
            md.insert("containerd-namespace", v);
        }
        if let Some(l) = &self.lease {
            if let Ok(v) = l.parse() {
                md.insert("containerd-lease", v);
            }
        }
        r
    }

    async fn write_blob(
        &self,
        digest: &str,
        media_type: &str,
        data: Vec<u8>,
        labels: HashMap<String, String>,
    ) -> Result<CtdDescriptor> {
        let size = data.len() as i64;
        let msg = WriteContentRequest {
            action: WriteAction::Commit as i32,
            r#ref: format!("soci-rpull-{digest}"),
            total: size,
            expected: digest.to_string(),
            offset: 0,
            data,
            labels: labels.clone(),
        };
        let mut content = ContentClient::new(self.channel.clone());
        match content.write(self.req(tokio_stream::iter(vec![msg]))).await {
            Ok(resp) => {
                let mut s = resp.into_inner();
                while s
                    .message()
                    .await
                    .map_err(|e| anyhow!("writing {digest} to containerd: {e}"))?
                    .is_some()
                {}
            }
            Err(e) if e.code() == Code::AlreadyExists => {
                let info = containerd_client::services::v1::Info {
                    digest: digest.into(),
                    labels: labels.clone(),
                    ..Default::default()
                };
                let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
                let upd = containerd_client::services::v1::UpdateRequest {
                    info: Some(info),
                    update_mask: Some(prost_types::FieldMask { paths }),
                };
                content
                    .update(self.req(upd))
                    .await
                    .map_err(|e| anyhow!("labelling {digest} in containerd: {e}"))?;
            }
            Err(e) => bail!("writing {digest} to containerd: {e}"),
        }
        Ok(CtdDescriptor {
            media_type: media_type.into(),
            digest: digest.into(),
            size,
            annotations: HashMap::new(),
        })
    }

    async fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let mut content = ContentClient::new(self.channel.clone());
        let mut s = content
            .read(self.req(ReadContentRequest {
                digest: digest.into(),
                offset: 0,
                size: 0,
            }))
            .await
            .map_err(|e| anyhow!("reading {digest} from containerd: {e}"))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(m) = s.message().await? {
            out.extend(m.data);
            if out.len() > 16 << 20 {
                bail!("{digest} is too large for a manifest");
            }
        }
        Ok(out)
    }
}

/// Chain ids of a layer stack from its diff ids.
fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{prev} {d}")))
            ),
        };
        out.push(next);
    }
    out
}

fn diff_ids(config: &[u8]) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct RootFs {
        diff_ids: Vec<String>,
    }
    #[derive(serde::Deserialize)]
    struct Cfg {
        rootfs: RootFs,
    }
    let c: Cfg = serde_json::from_slice(config).context("image config has no rootfs.diff_ids")?;
    Ok(c.rootfs.diff_ids)
}

async fn connect(address: &str, ns: &str) -> Result<Ctd> {
    let channel = containerd_client::connect(address)
        .await
        .with_context(|| format!("connecting to containerd at {address}"))?;
    Ok(Ctd {
        ns: ns.into(),
        lease: None,
        channel,
    })
}

pub async fn run(cmd: ImageCommand, address: &str, ns: &str) -> Result<()> {
    match cmd {
        ImageCommand::Rpull {
            reference,
            snapshotter,
            soci_index_digest,
            registry,
        } => {
            let index = soci_index_digest.as_deref();
            rpull(address, ns, &reference, &snapshotter, index, &registry).await
        }
        ImageCommand::Mode {
            reference,
            snapshotter,
        } => mode(address, ns, &reference, &snapshotter).await,
    }
}

async fn rpull(
    address: &str,
    ns: &str,
    reference: &str,
    snapshotter: &str,
    index_digest: Option<&str>,
    registry: &RegistryArgs,
) -> Result<()> {
    let client = registry.client()?;
    let r = Reference::parse(reference).map_err(anyhow::Error::msg)?;
    let repo = &r.repository;
    let (root, root_bytes) = client.get_manifest(repo, &r.object()).await?;
    let host = Platform::host();
    let (mdesc, mbytes) = if is_index(&root.media_type) {
        let idx: ImageIndex = serde_json::from_slice(&root_bytes).context("image index")?;
        let entry = idx
            .manifests
            .iter()
            .filter(|d| d.artifact_type.is_none() && is_manifest(&d.media_type))
            .find(|d| d.platform.as_ref().is_none_or(|p| p.matches(&host)))
            .ok_or_else(|| anyhow!("{reference} has no manifest for {host}"))?;
        client.get_manifest(repo, entry.digest.as_str()).await?
    } else {
        (root.clone(), root_bytes.clone())
    };
    let manifest: ImageManifest = serde_json::from_slice(&mbytes).context("image manifest")?;
    let config = client.get_blob(repo, &manifest.config).await?;
    let chains = chain_ids(&diff_ids(&config)?);
    if chains.len() != manifest.layers.len() {
        bail!(
            "{reference}: {} layers but {} diff ids",
            manifest.layers.len(),
            chains.len()
        );
    }
    let top = chains
        .last()
        .cloned()
        .ok_or_else(|| anyhow!("{reference} has no layers"))?;

    let mut ctd = connect(address, ns).await?;
    let lease_id = format!(
        "soci-rpull-{}",
        SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos()
    );
    let mut leases = LeasesClient::new(ctd.channel.clone());
    let expire = HashMap::from([("containerd.io/gc.expire".to_string(), rfc3339_in(3600))]);
    leases
        .create(ctd.req(CreateRequest {
            id: lease_id.clone(),
            labels: expire,
        }))
        .await
        .map_err(|e| anyhow!("creating lease: {e}"))?;
    ctd.lease = Some(lease_id.clone());
    let result = pull_with_lease(
        &ctd,
        &client,
        reference,
        snapshotter,
        &r,
        &root,
        &root_bytes,
        &mdesc,
        &mbytes,
        &manifest,
        &config,
        &chains,
        &top,
        index_digest,
    )
    .await;
    ctd.lease = None;
    let _ = leases
        .delete(ctd.req(DeleteRequest {
            id: lease_id,
            sync: false,
        }))
        .await;
    result?;
    mode(address, ns, reference, snapshotter).await
}

#[allow(clippy::too_many_arguments)]
async fn pull_with_lease(
    ctd: &Ctd,
    client: &soci_registry::Client,
    reference: &str,
    snapshotter: &str,
    r: &Reference,
    root: &soci_registry::Descriptor,
    root_bytes: &[u8],
    mdesc: &soci_registry::Descriptor,
    mbytes: &[u8],
    manifest: &ImageManifest,
    config: &[u8],
    chains: &[String],
    top: &str,
    index_digest: Option<&str>,
) -> Result<()> {
    // Content: config (keeps the snapshot chain alive), manifest, index.
    let gc_snap = HashMap::from([(
        format!("containerd.io/gc.ref.snapshot.{snapshotter}"),
        top.to_string(),
    )]);
    ctd.write_blob(
        manifest.config.digest.as_str(),
        &manifest.config.media_type,
        config.to_vec(),
        gc_snap,
    )
    .await?;
    let mut mlabels = HashMap::from([(
        "containerd.io/gc.ref.content.config".to_string(),
        manifest.config.digest.to_string(),
    )]);
    // As containerd's own pull: the manifest keeps its layers' blobs (those handed back to
    // containerd are written to its content store).
    for (i, l) in manifest.layers.iter().enumerate() {
        mlabels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            l.digest.to_string(),
        );
    }
    mlabels.insert(
        format!("containerd.io/gc.ref.snapshot.{snapshotter}"),
        top.to_string(),
    );
    let mtarget = ctd
        .write_blob(
            mdesc.digest.as_str(),
            &mdesc.media_type,
            mbytes.to_vec(),
            mlabels,
        )
        .await?;
    let target = if root.digest != mdesc.digest {
        let ilabels = HashMap::from([(
            "containerd.io/gc.ref.content.m.0".to_string(),
            mdesc.digest.to_string(),
        )]);
        ctd.write_blob(
            root.digest.as_str(),
            &root.media_type,
            root_bytes.to_vec(),
            ilabels,
        )
        .await?
    } else {
        mtarget
    };

    // Layers: the snapshotter provides each one and answers AlreadyExists, or hands it back
    // (answers with mounts): then it is pulled and applied here, as containerd's unpacker does.
    let diff_ids = diff_ids(config)?;
    let mut snaps = SnapshotsClient::new(ctd.channel.clone());
    let layer_list: Vec<String> = manifest
        .layers
        .iter()
        .map(|l| l.digest.to_string())
        .collect();
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    for (i, (layer, chain)) in manifest.layers.iter().zip(chains).enumerate() {
        let mut labels = HashMap::from([
            (label::TARGET.to_string(), chain.clone()),
            (
                label::IMAGE_REF.to_string(),
                r.to_string(),
            ),
            (
                label::MANIFEST_DIGEST.to_string(),
                mdesc.digest.to_string(),
            ),
            (
                label::LAYER_DIGEST.to_string(),
                layer.digest.to_string(),
            ),
            (
                label::IMAGE_LAYERS.to_string(),
                layer_list[i..].join(","),
            ),
        ]);
        if let Some(d) = index_digest {
            labels.insert(
                label::SOCI_INDEX_DIGEST.to_string(),
                d.to_string(),
            );
        }
        let key = format!("extract-{stamp}-{i} {chain}");
        let parent = if i == 0 {
            String::new()
        } else {
            chains[i - 1].clone()
        };
        let req = PrepareSnapshotRequest {
            snapshotter: snapshotter.into(),
            key: key.clone(),
            parent,
            labels,
        };
        match snaps.prepare(ctd.req(req)).await {
            Err(e) if e.code() == Code::AlreadyExists => {}
            Ok(resp) => {
                let mounts = resp.into_inner().mounts;
                let handed = HandedBack {
                    client,
                    repo: &r.repository,
                    layer,
                    diff_id: &diff_ids[i],
                    snapshotter,
                    key: &key,
                    chain,
                };
                if let Err(e) = handed.pull_and_apply(ctd, mounts).await {
                    let _ = snaps
                        .remove(ctd.req(RemoveSnapshotRequest {
                            snapshotter: snapshotter.into(),
                            key,
                        }))
                        .await;
                    return Err(e.context(format!(
                        "layer {} of {reference} (handed back by snapshotter {snapshotter:?})",
                        layer.digest
                    )));
                }
            }
            Err(e) => bail!("layer {} of {reference}: {}", layer.digest, e.message()),
        }
    }

    // The image record.
    let image = Image {
        name: reference.to_string(),
        labels: HashMap::new(),
        target: Some(target),
        created_at: None,
        updated_at: None,
    };
    let mut images = ImagesClient::new(ctd.channel.clone());
    match images
        .create(ctd.req(CreateImageRequest {
            image: Some(image.clone()),
            source_date_epoch: None,
        }))
        .await
    {
        Ok(_) => {}
        Err(e) if e.code() == Code::AlreadyExists => {
            images
                .update(ctd.req(UpdateImageRequest {
                    image: Some(image),
                    update_mask: None,
                    source_date_epoch: None,
                }))
                .await
                .map_err(|e| anyhow!("updating image {reference}: {e}"))?;
        }
        Err(e) => bail!("creating image {reference}: {e}"),
    }
    Ok(())
}

/// A layer the snapshotter handed back (answered Prepare with mounts): pulled and applied
/// here the way containerd's unpacker does it.
struct HandedBack<'a> {
    client: &'a soci_registry::Client,
    repo: &'a soci_registry::Repository,
    layer: &'a soci_registry::Descriptor,
    diff_id: &'a str,
    snapshotter: &'a str,
    key: &'a str,
    chain: &'a str,
}

impl HandedBack<'_> {
    /// Ensures the layer blob is in containerd's content store, applies it onto `mounts` with
    /// containerd's Diff service (checking the result against the config's diff id) and
    /// commits the active snapshot under the chain id.
    async fn pull_and_apply(
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

fn rfc3339_in(secs: u64) -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + secs;
    soci_ztoc::format_mod_time(t as i64, 0)
}

async fn mode(address: &str, ns: &str, reference: &str, snapshotter: &str) -> Result<()> {
    let ctd = connect(address, ns).await?;
    let mut images = ImagesClient::new(ctd.channel.clone());
    let img = images
        .get(ctd.req(GetImageRequest {
            name: reference.into(),
        }))
        .await
        .map_err(|e| anyhow!("image {reference}: {}", e.message()))?
        .into_inner()
        .image
        .and_then(|i| i.target)
        .ok_or_else(|| anyhow!("image {reference} has no target"))?;
    let mut bytes = ctd.read_blob(&img.digest).await?;
    if is_index(&img.media_type) {
        let idx: ImageIndex = serde_json::from_slice(&bytes)?;
        let host = Platform::host();
        let entry = idx
            .manifests
            .iter()
            .filter(|d| d.artifact_type.is_none() && is_manifest(&d.media_type))
            .find(|d| d.platform.as_ref().is_none_or(|p| p.matches(&host)))
            .ok_or_else(|| anyhow!("{reference} has no manifest for {host}"))?;
        bytes = ctd.read_blob(entry.digest.as_str()).await?;
    }
    let manifest: ImageManifest = serde_json::from_slice(&bytes)?;
    let config = ctd.read_blob(manifest.config.digest.as_str()).await?;
    let chains = chain_ids(&diff_ids(&config)?);
    let mut snaps = SnapshotsClient::new(ctd.channel.clone());
    let (mut lazy, mut broken, mut handed, mut reasons) = (0, 0, 0, Vec::new());
    for (layer, chain) in manifest.layers.iter().zip(&chains) {
        let info = snaps
            .stat(ctd.req(StatSnapshotRequest {
                snapshotter: snapshotter.into(),
                key: chain.clone(),
            }))
            .await
            .map_err(|e| {
                anyhow!(
                    "layer {} ({chain}) is not unpacked in snapshotter {snapshotter}: {}",
                    layer.digest,
                    e.message()
                )
            })?
            .into_inner()
            .info
            .unwrap_or_default();
        let m = info
            .labels
            .get(label::MODE)
            .cloned()
            .unwrap_or_else(|| "overlayfs".into());
        let why = info.labels.get(label::FALLBACK_REASON).cloned().unwrap_or_default();
        if let Some(b) = info.labels.get(label::BROKEN) {
            broken += 1;
            println!(
                "layer {} {:>10} bytes  {m} BROKEN (not served: {b})",
                layer.digest, layer.size
            );
            continue;
        }
        if let Some(cause) = why.strip_prefix(label::HANDED_BACK) {
            handed += 1;
            println!(
                "layer {} {:>10} bytes  handed back to containerd ({cause})",
                layer.digest, layer.size
            );
            continue;
        }
        if m == label::MODE_LAZY {
            lazy += 1;
        } else if !why.is_empty() && !reasons.contains(&why) {
            reasons.push(why.clone());
        }
        println!(
            "layer {} {:>10} bytes  {m}{}",
            layer.digest,
            layer.size,
            if why.is_empty() {
                String::new()
            } else {
                format!(" ({why})")
            }
        );
    }
    if handed > 0 {
        println!(
            "handed back: {handed} of {} layers pulled by containerd itself (the snapshotter \
             did not provide them)",
            manifest.layers.len()
        );
    }
    if broken > 0 {
        println!(
            "snapshotter: soci (BROKEN: {broken} lazy layer(s) not served; containers cannot start \
             until they are restored, retried in the background; lazy: {lazy} of {} layers)",
            manifest.layers.len()
        );
    } else if lazy > 0 {
        println!(
            "snapshotter: soci (lazy: {lazy} of {} layers)",
            manifest.layers.len()
        );
    } else {
        println!(
            "snapshotter: overlayfs (full pull{})",
            if reasons.is_empty() {
                String::new()
            } else {
                format!(": {}", reasons.join(", "))
            }
        );
    }
    Ok(())
}
