//! `soci image rpull` and `soci image mode`: pull through containerd so that the soci
//! snapshotter provides the layers (lazily where a SOCI index allows), and show how an image's
//! layers were provided.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{PrepareSnapshotRequest, RemoveSnapshotRequest};
use containerd_client::services::v1::{
    content_client::ContentClient, images_client::ImagesClient, leases_client::LeasesClient,
    CreateImageRequest, CreateRequest, DeleteRequest, Image, ReadContentRequest,
    UpdateImageRequest, WriteAction, WriteContentRequest,
};
use containerd_client::types::Descriptor as CtdDescriptor;
use sha2::{Digest as _, Sha256};
use soci_index::labels as label;
use soci_registry::oci::is_index;
use soci_registry::{ImageIndex, ImageManifest, Platform, Reference};
use tonic::transport::Channel;
use tonic::{Code, Request};

use crate::RegistryArgs;

mod handback;
mod mode;

use handback::HandedBack;
use mode::mode;

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
        let entry = soci_index::platform::manifest_for(&idx, &host)
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
            (label::IMAGE_REF.to_string(), r.to_string()),
            (label::MANIFEST_DIGEST.to_string(), mdesc.digest.to_string()),
            (label::LAYER_DIGEST.to_string(), layer.digest.to_string()),
            (label::IMAGE_LAYERS.to_string(), layer_list[i..].join(",")),
        ]);
        if let Some(d) = index_digest {
            labels.insert(label::SOCI_INDEX_DIGEST.to_string(), d.to_string());
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

fn rfc3339_in(secs: u64) -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + secs;
    soci_ztoc::format_mod_time(t as i64, 0)
}
