//! `soci convert` and `soci index info|list`.

use std::io::IsTerminal;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use soci_index::{
    convert as convert_image, discover, ConvertOptions, DiscoverOptions, ImageLocation, ImageStore,
    PlatformSelection, ANNOTATION_IMAGE_MANIFEST_DIGEST, ARTIFACT_TYPE_V2, DEFAULT_MIN_LAYER_SIZE,
};
use soci_registry::oci::is_index;
use soci_registry::{ImageIndex, Platform, Reference};

use crate::RegistryArgs;

#[derive(Args)]
pub struct ConvertArgs {
    /// Platform to convert (os/arch[/variant]); repeatable. Default: the host's.
    #[arg(long, conflicts_with = "all_platforms")]
    platform: Vec<String>,
    /// Convert every platform of a multi-platform image.
    #[arg(long)]
    all_platforms: bool,
    /// Span size in uncompressed bytes.
    #[arg(long, default_value_t = soci_ztoc::DEFAULT_SPAN_SIZE)]
    span_size: u64,
    /// Layers smaller than this (compressed bytes) get no zTOC.
    #[arg(long, default_value_t = DEFAULT_MIN_LAYER_SIZE)]
    min_layer_size: u64,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Source image: registry reference or oci:DIR[:TAG].
    src: String,
    /// Destination image: registry reference or oci:DIR[:TAG].
    dst: String,
}

pub async fn convert(a: ConvertArgs) -> Result<()> {
    let client = a.registry.client()?;
    let src_loc = ImageLocation::parse(&a.src)?;
    let dst_loc = ImageLocation::parse(&a.dst)?;
    let dst_tag = match &dst_loc {
        ImageLocation::Layout { tag, .. } => tag.clone(),
        ImageLocation::Registry(r) => {
            if r.digest.is_some() {
                bail!("destination {} must be a tag, not a digest", a.dst);
            }
            r.tag.clone().unwrap_or_else(|| "latest".into())
        }
    };
    let platforms = if a.all_platforms {
        PlatformSelection::All
    } else if a.platform.is_empty() {
        PlatformSelection::Host
    } else {
        PlatformSelection::Some(
            a.platform
                .iter()
                .map(|p| Platform::parse(p).with_context(|| format!("invalid platform {p:?}")))
                .collect::<Result<_>>()?,
        )
    };
    let opts = ConvertOptions {
        span_size: a.span_size,
        min_layer_size: a.min_layer_size,
        platforms,
        ..Default::default()
    };
    let src = ImageStore::open(&src_loc, client.clone());
    let dst = ImageStore::open(&dst_loc, client);
    let tty = std::io::stderr().is_terminal();
    let progress = move |line: &str| {
        if tty {
            eprintln!("{line}");
        }
    };
    let report = convert_image(&src, &src_loc.object(), &dst, &dst_tag, &opts, &progress)
        .await
        .with_context(|| format!("converting {} to {}", a.src, a.dst))?;
    for p in &report.platforms {
        for (layer, why) in &p.skipped {
            eprintln!("{}: layer {layer} skipped: {why}", p.platform);
        }
        let idx = p
            .soci_index
            .as_ref()
            .map(|d| d.to_string())
            .unwrap_or_else(|| "none".into());
        eprintln!(
            "{}: manifest {} soci index {idx} ({} zTOCs)",
            p.platform, p.manifest, p.ztocs
        );
    }
    println!("{}", report.index);
    Ok(())
}

#[derive(Subcommand)]
pub enum IndexCommand {
    /// Show the SOCI index of an image and a summary of each layer's zTOC (JSON).
    Info {
        /// Image reference.
        reference: String,
        /// Platform (default: the host's).
        #[arg(long)]
        platform: Option<String>,
        /// Also accept SOCI v1 indexes.
        #[arg(long)]
        allow_v1: bool,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// List the SOCI index entries of an image index.
    List {
        /// Image reference.
        reference: String,
        #[command(flatten)]
        registry: RegistryArgs,
    },
}

pub async fn index(c: IndexCommand) -> Result<()> {
    match c {
        IndexCommand::Info {
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
        IndexCommand::List {
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
