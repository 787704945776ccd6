//! `soci index info|list` against a registry (our extension: given an image reference rather
//! than a digest of the local store).

use anyhow::{bail, Context, Result};
use serde_json::json;
use soci_index::{discover, DiscoverOptions, ANNOTATION_IMAGE_MANIFEST_DIGEST, ARTIFACT_TYPE_V2};
use soci_registry::oci::is_index;
use soci_registry::{ImageIndex, Platform, Reference};

use crate::RegistryArgs;

/// Registry modes of `soci index info|list` (given an image reference, not a digest).
pub enum RegistryIndex {
    /// Show the SOCI index of an image.
    Info {
        reference: String,
        platform: Option<String>,
        allow_v1: bool,
        registry: RegistryArgs,
    },
    /// List SOCI v2 entries of an image index.
    List {
        reference: String,
        registry: RegistryArgs,
    },
}

pub async fn registry_index(c: RegistryIndex) -> Result<()> {
    match c {
        RegistryIndex::Info {
            reference,
            platform,
            allow_v1,
            registry,
        } => {
            let client = registry.client()?;
            let r = Reference::parse(&reference).map_err(anyhow::Error::msg)?;
            let platform = match platform {
                Some(p) => {
                    Platform::parse(&p).with_context(|| format!("invalid platform {p:?}"))?
                }
                None => Platform::host(),
            };
            let img = discover(
                &client,
                &r,
                &DiscoverOptions {
                    platform,
                    allow_v1,
                    index_digest: None,
                },
            )
            .await
            .with_context(|| format!("image {reference}"))?;
            let mut layers = Vec::new();
            for (layer, ztoc) in img.layer_ztocs() {
                let summary = match &ztoc {
                    Some(zd) => {
                        let z = img.fetch_ztoc(&client, zd, &layer).await?;
                        json!({
                            "ztoc": zd.digest.to_string(),
                            "ztoc_size": zd.size,
                            "entries": z.entries.len(),
                            "spans": z.span_count(),
                            "compression": z.compression.algorithm.as_str(),
                            "uncompressed_size": z.uncompressed_archive_size,
                        })
                    }
                    None => serde_json::Value::Null,
                };
                layers.push(json!({
                    "digest": layer.digest.to_string(),
                    "mediaType": layer.media_type,
                    "size": layer.size,
                    "ztoc": summary,
                }));
            }
            let out = json!({
                "manifest": img.manifest_desc.digest.to_string(),
                "soci_index": img.index_desc.digest.to_string(),
                "version": format!("{:?}", img.index.version).to_lowercase(),
                "index": serde_json::from_slice::<serde_json::Value>(&img.index.to_json())?,
                "layers": layers,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        RegistryIndex::List {
            reference,
            registry,
        } => {
            let client = registry.client()?;
            let r = Reference::parse(&reference).map_err(anyhow::Error::msg)?;
            let (desc, bytes) = client.get_manifest(&r.repository, &r.object()).await?;
            if !is_index(&desc.media_type) {
                bail!("{reference} is a single manifest, not an image index: it has no SOCI v2 binding");
            }
            let idx: ImageIndex = serde_json::from_slice(&bytes)?;
            println!("{:<20} {:<72} IMAGE MANIFEST", "PLATFORM", "SOCI INDEX");
            for d in idx
                .manifests
                .iter()
                .filter(|d| d.artifact_type.as_deref() == Some(ARTIFACT_TYPE_V2))
            {
                let p = d
                    .platform
                    .as_ref()
                    .map(|p| p.to_string())
                    .unwrap_or_default();
                let m = d
                    .annotations
                    .get(ANNOTATION_IMAGE_MANIFEST_DIGEST)
                    .map(String::as_str)
                    .unwrap_or("?");
                println!("{p:<20} {:<72} {m}", d.digest.to_string());
            }
            Ok(())
        }
    }
}
