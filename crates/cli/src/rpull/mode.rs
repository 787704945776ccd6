//! `soci image mode`: how each layer of an image was provided, read from the snapshot labels
//! the snapshotter wrote.

use anyhow::{anyhow, Result};
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::StatSnapshotRequest;
use containerd_client::services::v1::GetImageRequest;
use soci_index::labels as label;
use soci_registry::oci::is_index;
use soci_registry::{ImageIndex, ImageManifest, Platform};

use super::{chain_ids, connect, diff_ids};

pub(super) async fn mode(
    address: &str,
    ns: &str,
    reference: &str,
    snapshotter: &str,
) -> Result<()> {
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
        let entry = soci_index::platform::manifest_for(&idx, &host)
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
        let why = info
            .labels
            .get(label::FALLBACK_REASON)
            .cloned()
            .unwrap_or_default();
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
