//! `soci push`: the newest SOCI index manifest v1 of an image (per platform) and its zTOCs,
//! from the local store to the image's registry repository, as upstream.
//!
//! The index has the image manifest as subject. Registries with the OCI referrers API index it
//! on upload; for those without (e.g. distribution 2.8) we maintain the referrers tag
//! `sha256-<manifest hex>` (the OCI 1.1 fallback upstream's oras client also writes), so both
//! upstream's and our snapshotter find it.

use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::Args;
use soci_index::{
    ArtifactsDb, ImageStore, SociIndex, ARTIFACT_TYPE_V1, ARTIFACT_TYPE_V2, EMPTY_CONFIG,
};
use soci_registry::oci::{to_go_json, MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST};
use soci_registry::{Descriptor, Digest, ImageIndex, Reference};

use crate::artifacts::{connect, local_store, location_of, platform_manifests};
use crate::{Globals, RegistryArgs};

#[derive(Args)]
pub struct PushArgs {
    /// Skip TLS verification: only meaningful with --plain-http here (see the error otherwise).
    #[arg(short = 'k', long)]
    skip_verify: bool,
    /// Allow connections using plain HTTP.
    #[arg(long)]
    plain_http: bool,
    /// Registry user[:password] (not supported: use docker's config.json).
    #[arg(short = 'u', long)]
    user: Option<String>,
    /// Custom hosts configuration directory (`<host>/hosts.toml`); comma-separated list
    /// accepted as nerdctl passes it (the first existing directory is used).
    #[arg(long)]
    hosts_dir: Option<String>,
    /// Snapshotter name (accepted for compatibility; unused by push).
    #[arg(long, env = "CONTAINERD_SNAPSHOTTER")]
    snapshotter: Option<String>,
    /// Platform to push (os/arch[/variant]); repeatable. Default: the host's.
    #[arg(short = 'p', long)]
    platform: Vec<String>,
    /// Push the indexes of every platform.
    #[arg(long)]
    all_platforms: bool,
    /// When the registry already has a SOCI index for the manifest: warn (push anyway), skip,
    /// or allow (push without checking).
    #[arg(long, default_value = "warn", value_parser = ["warn", "skip", "allow"])]
    existing_index: String,
    /// zTOC blobs uploaded at once (0 is taken as 1). Default 3, as upstream.
    #[arg(long, default_value_t = 3)]
    max_concurrent_uploads: u64,
    /// Quiet mode: print only the pushed index digests.
    #[arg(short = 'q', long)]
    quiet: bool,
    /// Image name in containerd's store (its registry repository is the destination).
    image_ref: String,
}

pub async fn push(a: PushArgs, g: &Globals) -> Result<()> {
    if a.user.is_some() {
        bail!("--user is not supported by soci-rs: put the credentials in docker's config.json ($DOCKER_CONFIG)");
    }
    if a.skip_verify && !a.plain_http {
        bail!("--skip-verify is not supported by soci-rs over TLS: use --plain-http for an HTTP registry, or trust its CA in the hosts directory");
    }
    let hosts_dir = a
        .hosts_dir
        .as_deref()
        .map(|s| {
            s.split(',')
                .map(std::path::PathBuf::from)
                .find(|p| p.is_dir())
                .unwrap_or_else(|| s.split(',').next().unwrap_or(s).into())
        })
        .unwrap_or_else(|| "/etc/containerd/certs.d".into());
    let client = RegistryArgs {
        plain_http: a.plain_http,
        hosts_dir,
    }
    .client()?;
    let reference = Reference::parse(&a.image_ref).map_err(anyhow::Error::msg)?;
    let repo = reference.repository.clone();
    let c = Arc::new(connect(g).await?);
    let target = c.image_target(&a.image_ref).await?.ok_or_else(|| {
        anyhow!(
            "image {:?} not found in containerd namespace {:?}",
            a.image_ref,
            g.namespace
        )
    })?;
    let ctd_store = ImageStore::Containerd(c.clone());
    let local = local_store(g, Some(c)).await?;
    let location = location_of(&local);
    let db = ArtifactsDb::open(&g.root)?;
    let say = |s: String| {
        if !a.quiet {
            println!("{s}");
        }
    };
    let mut to_push = Vec::new();
    for (platform, mdesc) in
        platform_manifests(&ctd_store, &target, &a.platform, a.all_platforms).await?
    {
        let for_manifest: Vec<_> = db
            .indexes()
            .filter(|i| i.original_digest == mdesc.digest.as_str() && i.location == location)
            .collect();
        if for_manifest
            .iter()
            .any(|i| i.artifact_type == ARTIFACT_TYPE_V2)
        {
            println!("[WARN] Skipping SOCI index manifest v2. You should push the whole image with higher level tools like finch or nerdctl.");
        }
        let newest = for_manifest
            .into_iter()
            .filter(|i| i.artifact_type == ARTIFACT_TYPE_V1)
            .max_by_key(|i| i.created_at)
            .ok_or_else(|| {
                anyhow!("could not find any soci index manifest v1 to push for platform {platform} (run `soci create` first)")
            })?;
        to_push.push((mdesc, newest.digest.clone()));
    }
    for (mdesc, index_digest) in to_push {
        if a.existing_index != "allow" {
            say("checking if a soci index already exists in remote repository...".into());
            let existing = client
                .referrers(&repo, &mdesc.digest, ARTIFACT_TYPE_V1)
                .await
                .with_context(|| format!("listing referrers of {}", mdesc.digest))?
                .map(|i| i.manifests)
                .unwrap_or_default();
            if !existing.is_empty() {
                let found = if existing.len() > 1 {
                    "multiple soci indices found in remote repository".to_string()
                } else {
                    format!(
                        "soci index found in remote repository with digest: {}",
                        existing[0].digest
                    )
                };
                if a.existing_index == "skip" {
                    say(format!(
                        "{found}: skipping pushing artifacts for image manifest: {}",
                        mdesc.digest
                    ));
                    continue;
                }
                println!("[WARN] {found}: pushing index anyway");
            }
        }
        let d = Digest::parse(&index_digest)
            .ok_or_else(|| anyhow!("bad digest {index_digest} in the artifacts database"))?;
        if a.quiet {
            println!("{d}");
        } else {
            println!("pushing soci index with digest: {d}");
        }
        let (desc, bytes) = local.get_manifest(d.as_str()).await?;
        let idx = SociIndex::parse(&bytes).map_err(|e| anyhow!("SOCI index {d}: {e}"))?;
        // zTOCs: up to --max-concurrent-uploads at once, as upstream (oras Copy concurrency).
        let (cl, st, rp, say) = (&client, &local, &repo, &say);
        bounded(&idx.ztocs, a.max_concurrent_uploads, |z| async move {
            if cl.blob_size(rp, &z.digest).await?.is_some() {
                say(format!("skipped artifact with digest: {}", z.digest));
                return Ok(());
            }
            say(format!("pushing artifact with digest: {}", z.digest));
            let data = st.get_blob(z).await?;
            cl.push_blob(rp, &z.digest, data).await?;
            say(format!(
                "successfully pushed artifact with digest: {}",
                z.digest
            ));
            Ok(())
        })
        .await?;
        client
            .push_blob(
                &repo,
                &Digest::of(EMPTY_CONFIG),
                Bytes::from_static(EMPTY_CONFIG),
            )
            .await?;
        client
            .put_manifest(&repo, d.as_str(), MEDIA_TYPE_OCI_MANIFEST, bytes.clone())
            .await?;
        say(format!("successfully pushed artifact with digest: {d}"));
        // Referrers: done by the registry if it has the API, else the tag fallback.
        let listed = client
            .referrers(&repo, &mdesc.digest, ARTIFACT_TYPE_V1)
            .await?
            .is_some_and(|i| i.manifests.iter().any(|m| m.digest == d));
        if !listed {
            let tag = format!("sha256-{}", mdesc.digest.hex());
            let mut refs: ImageIndex = match client.get_manifest(&repo, &tag).await {
                Ok((_, b)) => serde_json::from_slice(&b)
                    .with_context(|| format!("referrers tag {tag} holds no image index"))?,
                Err(e) if e.is_not_found() => ImageIndex {
                    schema_version: 2,
                    media_type: Some(MEDIA_TYPE_OCI_INDEX.into()),
                    artifact_type: None,
                    manifests: Vec::new(),
                    subject: None,
                    annotations: Default::default(),
                },
                Err(e) => return Err(e.into()),
            };
            let mut entry = Descriptor::new(MEDIA_TYPE_OCI_MANIFEST, d.clone(), desc.size);
            entry.artifact_type = Some(ARTIFACT_TYPE_V1.into());
            entry.annotations = idx.annotations.clone();
            refs.manifests.retain(|m| m.digest != d);
            refs.manifests.push(entry);
            client
                .put_manifest(
                    &repo,
                    &tag,
                    MEDIA_TYPE_OCI_INDEX,
                    Bytes::from(to_go_json(&refs)),
                )
                .await?;
        }
    }
    Ok(())
}

/// Runs `f` on every item, at most `limit` (at least 1) at a time; the first error wins.
async fn bounded<'a, T, F, Fut>(items: &'a [T], limit: u64, f: F) -> Result<()>
where
    F: Fn(&'a T) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    use futures_util::stream::{self, StreamExt, TryStreamExt};
    let limit = usize::try_from(limit).unwrap_or(usize::MAX).max(1);
    stream::iter(items.iter().map(f))
        .buffer_unordered(limit)
        .try_collect::<Vec<()>>()
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn uploads_run_concurrently_within_the_limit() {
        for (limit, want) in [(3u64, 3usize), (1, 1), (0, 1), (10, 8)] {
            let (now, peak, done) = (
                AtomicUsize::new(0),
                AtomicUsize::new(0),
                AtomicUsize::new(0),
            );
            let items: Vec<u32> = (0..8).collect();
            bounded(&items, limit, |_| async {
                let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                done.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
            .await
            .unwrap();
            assert_eq!(done.load(Ordering::SeqCst), 8);
            assert_eq!(peak.load(Ordering::SeqCst), want, "limit {limit}");
        }
        let items = [1, 2, 3];
        let r = bounded(&items, 2, |i| async move {
            if *i == 2 {
                anyhow::bail!("upload {i} failed")
            }
            Ok(())
        })
        .await;
        assert!(r.unwrap_err().to_string().contains("upload 2 failed"));
    }
}
