//! `soci index info|list|rm` over the local artifacts database and content store, as upstream.
//! Given an image reference instead (our extension, which upstream rejects), `info` and `list`
//! read the registry.

use std::io::Write;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use clap::Subcommand;
use soci_index::{ArtifactKind, ArtifactsDb, ImageStore, ARTIFACT_TYPE_V1, ARTIFACT_TYPE_V2};
use soci_registry::{Descriptor, Digest, Platform};

use crate::artifacts::{connect, local_store, location_of, platform_manifests};
use crate::image_cmd::{registry_index, RegistryIndex};
use crate::{Globals, RegistryArgs};

#[derive(Subcommand)]
pub enum IndexCommand {
    /// Show a SOCI index of the local store by digest (pretty JSON); given an image reference,
    /// show the SOCI index an image has in its registry and its zTOCs.
    Info {
        /// Index digest (local store) or image reference (registry).
        target: String,
        /// Registry mode: platform (default: the host's).
        #[arg(long)]
        platform: Option<String>,
        /// Registry mode: also accept SOCI v1 indexes.
        #[arg(long)]
        allow_v1: bool,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// List the indexes of the local store; given an image reference, list the SOCI v2 entries
    /// of its image index in the registry.
    #[command(alias = "ls")]
    List {
        /// Only indexes of this image (name in containerd).
        #[arg(long = "ref")]
        image: Option<String>,
        /// Only display the index digests.
        #[arg(short = 'q', long)]
        quiet: bool,
        /// Only indexes for this platform; repeatable.
        #[arg(short = 'p', long)]
        platform: Vec<String>,
        /// Registry mode: image reference.
        reference: Option<String>,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Remove indexes from the artifacts database and the content store.
    #[command(name = "remove", alias = "rm")]
    Rm {
        /// Only remove the indexes of this image (name in containerd).
        #[arg(long = "ref")]
        image: Option<String>,
        /// Index digests.
        digests: Vec<String>,
    },
}

fn version_of(artifact_type: &str) -> &'static str {
    match artifact_type {
        ARTIFACT_TYPE_V1 => "v1",
        ARTIFACT_TYPE_V2 => "v2",
        _ => "",
    }
}

fn age(created: u64) -> String {
    if created == 0 {
        return "n/a".into();
    }
    format!("{}s ago", soci_index::now_secs().saturating_sub(created))
}

pub async fn index(c: IndexCommand, g: &Globals) -> Result<()> {
    match c {
        IndexCommand::Info {
            target,
            platform,
            allow_v1,
            registry,
        } => match Digest::parse(&target) {
            Some(d) => info(g, &d).await,
            None => {
                registry_index(RegistryIndex::Info {
                    reference: target,
                    platform,
                    allow_v1,
                    registry,
                })
                .await
            }
        },
        IndexCommand::List {
            image,
            quiet,
            platform,
            reference: Some(reference),
            registry,
        } => {
            if image.is_some() || quiet || !platform.is_empty() {
                bail!("`soci index list REFERENCE` (registry mode) takes no --ref/-q/-p; without REFERENCE it lists the local store");
            }
            registry_index(RegistryIndex::List {
                reference,
                registry,
            })
            .await
        }
        IndexCommand::List {
            image,
            quiet,
            platform,
            reference: None,
            ..
        } => list(g, image, quiet, platform).await,
        IndexCommand::Rm { image, digests } => rm(g, image, digests).await,
    }
}

async fn info(g: &Globals, d: &Digest) -> Result<()> {
    let db = ArtifactsDb::open(&g.root)?;
    let entry = db
        .get(d.as_str())
        .ok_or_else(|| anyhow!("{d}: not in the artifacts database (try `soci rebuild-db`)"))?;
    if entry.kind == ArtifactKind::Ztoc {
        bail!("the provided digest is of ztoc not SOCI index. Use \"soci ztoc info\" command to get detailed info of ztoc");
    }
    let store = local_store(g, None).await?;
    let bytes = store
        .get_blob(&Descriptor::new("", d.clone(), entry.size))
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&bytes)?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

async fn list(
    g: &Globals,
    image: Option<String>,
    quiet: bool,
    platform: Vec<String>,
) -> Result<()> {
    let db = ArtifactsDb::open(&g.root)?;
    let wanted: Vec<Platform> = platform
        .iter()
        .map(|p| Platform::parse(p).ok_or_else(|| anyhow!("invalid platform {p:?}")))
        .collect::<Result<_>>()?;
    let mut manifests: Option<Vec<String>> = None;
    // containerd names the images (IMAGE REF column); listing works without it.
    let ctd = connect(g).await.ok().map(Arc::new);
    if let Some(name) = &image {
        let c = ctd
            .clone()
            .ok_or_else(|| anyhow!("cannot connect to containerd at {}", g.address))?;
        let target = c.image_target(name).await?.ok_or_else(|| {
            anyhow!(
                "image {name:?} not found in containerd namespace {:?}",
                g.namespace
            )
        })?;
        let all = wanted.is_empty();
        let found = platform_manifests(&ImageStore::Containerd(c), &target, &platform, all).await?;
        manifests = Some(
            found
                .into_iter()
                .map(|(_, d)| d.digest.to_string())
                .collect(),
        );
    }
    let mut rows: Vec<_> = db
        .indexes()
        .filter(|e| match &manifests {
            Some(m) => m.contains(&e.original_digest),
            None => {
                wanted.is_empty()
                    || Platform::parse(&e.platform)
                        .is_some_and(|p| wanted.iter().any(|w| w.matches(&p)))
            }
        })
        .cloned()
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.created_at));
    let mut out = std::io::stdout().lock();
    if quiet {
        for r in &rows {
            writeln!(out, "{}", r.digest)?;
        }
        return Ok(());
    }
    let mut table = vec![[
        "DIGEST".to_string(),
        "SIZE".into(),
        "IMAGE REF".into(),
        "PLATFORM".into(),
        "MEDIA TYPE".into(),
        "MANIFEST VERSION".into(),
        "CREATED".into(),
    ]];
    for r in &rows {
        let mut names = Vec::new();
        if let (Some(c), false) = (&ctd, r.image_digest.is_empty()) {
            names = c
                .images_with_target(&r.image_digest)
                .await
                .unwrap_or_default();
        }
        if names.is_empty() {
            names.push(String::new());
        }
        for n in names {
            table.push([
                r.digest.clone(),
                r.size.to_string(),
                n,
                r.platform.clone(),
                r.media_type.clone(),
                version_of(&r.artifact_type).into(),
                age(r.created_at),
            ]);
        }
    }
    print_table(&mut out, &table)
}

/// Left-aligned columns separated by four spaces (upstream uses a tabwriter).
pub fn print_table<const N: usize>(out: &mut dyn Write, rows: &[[String; N]]) -> Result<()> {
    let mut widths = [0usize; N];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    for r in rows {
        let mut line = String::new();
        for (c, w) in r.iter().zip(widths) {
            line.push_str(&format!("{c:<w$}    "));
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

async fn rm(g: &Globals, image: Option<String>, digests: Vec<String>) -> Result<()> {
    if image.is_some() && !digests.is_empty() {
        bail!("please provide either index digests or image ref, but not both");
    }
    let store = local_store(g, None).await?;
    let location = location_of(&store);
    let mut db = ArtifactsDb::open(&g.root)?;
    let targets: Vec<String> = match image {
        Some(name) => {
            let c = connect(g).await?;
            let t = c.image_target(&name).await?.ok_or_else(|| {
                anyhow!(
                    "image {name:?} not found in containerd namespace {:?}",
                    g.namespace
                )
            })?;
            db.indexes()
                .filter(|e| e.image_digest == t.digest.as_str())
                .map(|e| e.digest.clone())
                .collect()
        }
        None => digests,
    };
    for t in targets {
        let d = Digest::parse(&t).ok_or_else(|| anyhow!("invalid digest {t:?}"))?;
        let (entry, orphans) = db
            .remove_index(d.as_str())
            .ok_or_else(|| anyhow!("{d}: no such SOCI index in the artifacts database"))?;
        if entry.location == location {
            store.delete_blob(&d).await?;
            // The soci store has no GC: delete zTOCs no other index uses.
            if matches!(store, ImageStore::Layout { .. }) {
                for z in orphans.iter().filter_map(|z| Digest::parse(z)) {
                    store.delete_blob(&z).await?;
                }
            }
        }
    }
    db.save()?;
    Ok(())
}
