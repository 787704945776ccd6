//! `soci create` and `soci rebuild-db`, and what the upstream verbs share: the containerd
//! connection, the local artifact store chosen by `--content-store`, platform resolution of an
//! image in containerd, and artifacts database records.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use soci_index::containerd::Containerd;
use soci_index::{
    index_layers, now_secs, ArtifactEntry, ArtifactKind, ArtifactsDb, ConvertOptions,
    ConvertReport, ImageStore, SociIndex, SociVersion, ANNOTATION_LAYER_DIGEST, ARTIFACT_TYPE_V1,
    DEFAULT_MIN_LAYER_SIZE, EMPTY_CONFIG,
};
use soci_registry::oci::{is_index, is_manifest, MEDIA_TYPE_OCI_MANIFEST};
use soci_registry::{Descriptor, Digest, ImageIndex, ImageManifest, Platform};

use crate::Globals;

/// Upstream's image label that keeps a v1 SOCI index from containerd's GC.
pub const LABEL_SOCI_INDEX: &str = "containerd.io/gc.ref.content.soci-index";
/// Build tool written into v1 indexes (upstream's value, which its tools expect).
const BUILD_TOOL: &str = "AWS SOCI CLI v0.2";

/// Upstream's `--optimizations` (only `xattr` exists).
#[derive(Args, Clone, Debug, Default)]
pub struct Optimizations {
    /// Optional optimizations; `xattr` is accepted and always applied here (layers without
    /// xattrs or opaque directories get the disable-xattrs annotation).
    #[arg(long = "optimizations")]
    pub optimizations: Vec<String>,
}

impl Optimizations {
    /// Rejects unknown names, as upstream.
    pub fn check(&self) -> Result<()> {
        for o in &self.optimizations {
            if o != "xattr" {
                bail!("optimization {o:?} is not valid: valid values are [xattr]");
            }
        }
        Ok(())
    }
}

/// Connects to containerd with the global address and namespace.
pub async fn connect(g: &Globals) -> Result<Containerd> {
    Ok(Containerd::connect(&g.address, &g.namespace).await?)
}

/// The store `--content-store` selects.
pub async fn local_store(g: &Globals, ctd: Option<Arc<Containerd>>) -> Result<ImageStore> {
    Ok(match g.content_store.as_str() {
        "soci" => ImageStore::Layout {
            dir: g.root.join("content"),
        },
        _ => ImageStore::Containerd(match ctd {
            Some(c) => c,
            None => Arc::new(connect(g).await?),
        }),
    })
}

/// The database location string of a store.
pub fn location_of(s: &ImageStore) -> String {
    match s {
        ImageStore::Containerd(c) => format!("containerd:{}", c.namespace()),
        _ => "soci".into(),
    }
}

/// zTOCs recorded for `location`, by layer digest (newest wins).
pub fn existing_ztocs(db: &ArtifactsDb, location: &str) -> BTreeMap<Digest, Descriptor> {
    let mut out = BTreeMap::new();
    for z in db.ztocs().filter(|z| z.location == location) {
        if let (Some(layer), Some(d)) =
            (Digest::parse(&z.original_digest), Digest::parse(&z.digest))
        {
            let mut desc = Descriptor::new(z.media_type.clone(), d, z.size);
            desc.annotations = z.annotations.clone();
            out.insert(layer, desc);
        }
    }
    out
}

/// Records a SOCI index (and its zTOCs) read back from `store`.
#[allow(clippy::too_many_arguments)]
pub async fn record_index(
    db: &mut ArtifactsDb,
    store: &ImageStore,
    index_digest: &Digest,
    manifest_digest: &str,
    image_digest: &str,
    platform: &str,
    artifact_type: &str,
) -> Result<()> {
    let (desc, bytes) = store.get_manifest(index_digest.as_str()).await?;
    let idx = SociIndex::parse(&bytes).map_err(|e| anyhow!("SOCI index {index_digest}: {e}"))?;
    let location = location_of(store);
    let now = now_secs();
    for z in &idx.ztocs {
        db.put(ArtifactEntry {
            kind: ArtifactKind::Ztoc,
            digest: z.digest.to_string(),
            size: z.size,
            original_digest: z
                .annotations
                .get(ANNOTATION_LAYER_DIGEST)
                .cloned()
                .unwrap_or_default(),
            image_digest: String::new(),
            platform: platform.into(),
            media_type: z.media_type.clone(),
            artifact_type: String::new(),
            created_at: now,
            location: location.clone(),
            ztocs: Vec::new(),
            annotations: z.annotations.clone(),
        });
    }
    db.put(ArtifactEntry {
        kind: ArtifactKind::Index,
        digest: index_digest.to_string(),
        size: desc.size,
        original_digest: manifest_digest.into(),
        image_digest: image_digest.into(),
        platform: platform.into(),
        media_type: MEDIA_TYPE_OCI_MANIFEST.into(),
        artifact_type: artifact_type.into(),
        created_at: now,
        location,
        ztocs: idx.ztocs.iter().map(|z| z.digest.to_string()).collect(),
        annotations: BTreeMap::new(),
    });
    Ok(())
}

/// Records the v2 indexes of a conversion.
pub async fn record_v2(db: &mut ArtifactsDb, store: &ImageStore, r: &ConvertReport) -> Result<()> {
    for p in &r.platforms {
        if let Some(i) = &p.soci_index {
            record_index(
                db,
                store,
                i,
                p.manifest.as_str(),
                r.index.as_str(),
                &p.platform.to_string(),
                soci_index::ARTIFACT_TYPE_V2,
            )
            .await?;
        }
    }
    Ok(())
}

/// The image manifests of `target` for the requested platforms: (platform, descriptor).
pub async fn platform_manifests(
    store: &ImageStore,
    target: &Descriptor,
    platforms: &[String],
    all: bool,
) -> Result<Vec<(Platform, Descriptor)>> {
    let wanted: Vec<Platform> = platforms
        .iter()
        .map(|p| Platform::parse(p).with_context(|| format!("invalid platform {p:?}")))
        .collect::<Result<_>>()?;
    let bytes = store.get_blob(target).await?;
    let candidates: Vec<(Platform, Descriptor)> = if is_index(&target.media_type) {
        let idx: ImageIndex = serde_json::from_slice(&bytes)
            .with_context(|| format!("image index {}", target.digest))?;
        soci_index::platform::image_entries(&idx)
            .filter_map(|d| d.platform.clone().map(|p| (p, d.clone())))
            .collect()
    } else if is_manifest(&target.media_type) {
        let m: ImageManifest = serde_json::from_slice(&bytes)
            .with_context(|| format!("image manifest {}", target.digest))?;
        let cfg = store.get_blob(&m.config).await?;
        #[derive(serde::Deserialize)]
        struct Cfg {
            architecture: String,
            os: String,
            variant: Option<String>,
        }
        let c: Cfg = serde_json::from_slice(&cfg)
            .with_context(|| format!("image config {}", m.config.digest))?;
        let p = Platform {
            architecture: c.architecture,
            os: c.os,
            variant: c.variant,
            ..Default::default()
        };
        vec![(p, target.clone())]
    } else {
        bail!(
            "{}: unsupported media type {}",
            target.digest,
            target.media_type
        );
    };
    let single = candidates.len() == 1 && !is_index(&target.media_type);
    let want: Vec<Platform> = if all || single && wanted.is_empty() {
        candidates.iter().map(|(p, _)| p.clone()).collect()
    } else if wanted.is_empty() {
        vec![Platform::host()]
    } else {
        wanted
    };
    let mut out = Vec::new();
    for w in &want {
        let found = candidates
            .iter()
            .find(|(p, _)| w.matches(p))
            .ok_or_else(|| anyhow!("image {} has no manifest for platform {w}", target.digest))?;
        if !out
            .iter()
            .any(|(_, d): &(Platform, Descriptor)| d.digest == found.1.digest)
        {
            out.push(found.clone());
        }
    }
    Ok(out)
}

#[derive(Args)]
pub struct CreateArgs {
    /// Platform to index (os/arch[/variant]); repeatable. Default: the host's.
    #[arg(short = 'p', long)]
    platform: Vec<String>,
    /// Index every platform.
    #[arg(long)]
    all_platforms: bool,
    /// Span size in uncompressed bytes.
    #[arg(long, default_value_t = soci_ztoc::DEFAULT_SPAN_SIZE)]
    span_size: u64,
    /// Layers smaller than this (compressed bytes) get no zTOC.
    #[arg(long, default_value_t = DEFAULT_MIN_LAYER_SIZE)]
    min_layer_size: u64,
    #[command(flatten)]
    optimizations: Optimizations,
    /// Leave out the checkpoint index annotation on zTOC descriptors (soci-rs's own: lets the
    /// daemon fetch a zTOC without its checkpoint windows): the SOCI index then carries only
    /// what upstream's format defines; lazy starts fetch whole zTOCs.
    #[arg(long)]
    no_checkpoint_index: bool,
    /// Rebuild zTOCs even if the artifacts database has them.
    #[arg(short = 'f', long)]
    force: bool,
    /// Image name in containerd's store.
    image_ref: String,
}

pub async fn create(a: CreateArgs, g: &Globals) -> Result<()> {
    a.optimizations.check()?;
    let mut c = connect(g).await?;
    c.begin().await?;
    let c = Arc::new(c);
    let result = create_with(&a, g, c.clone()).await;
    let mut end = (*c).clone();
    end.end().await?;
    result
}

async fn create_with(a: &CreateArgs, g: &Globals, c: Arc<Containerd>) -> Result<()> {
    let target = c.image_target(&a.image_ref).await?.ok_or_else(|| {
        anyhow!(
            "image {:?} not found in containerd namespace {:?}",
            a.image_ref,
            g.namespace
        )
    })?;
    let src = ImageStore::Containerd(c.clone());
    let local = local_store(g, Some(c.clone())).await?;
    let location = location_of(&local);
    let mut db = ArtifactsDb::open(&g.root)?;
    let opts = ConvertOptions {
        span_size: a.span_size,
        min_layer_size: a.min_layer_size,
        build_tool_identifier: BUILD_TOOL.into(),
        existing_ztocs: existing_ztocs(&db, &location),
        force: a.force,
        checkpoint_index: !a.no_checkpoint_index,
        ..Default::default()
    };
    let tmp = tempfile::tempdir().context("temp dir")?;
    let progress = |line: &str| tracing::info!("{line}");
    let mut last_index = None;
    for (platform, mdesc) in platform_manifests(&src, &target, &a.platform, a.all_platforms).await?
    {
        let bytes = src.get_blob(&mdesc).await?;
        let m: ImageManifest = serde_json::from_slice(&bytes)
            .with_context(|| format!("image manifest {}", mdesc.digest))?;
        let (ztocs, skipped, _) =
            index_layers(&src, &local, &m.layers, &opts, &progress, tmp.path()).await?;
        for (l, why) in &skipped {
            eprintln!("{platform}: layer {l} skipped: {why}");
        }
        if ztocs.is_empty() {
            bail!("{platform}: no zTOCs created: every layer was skipped (below --min-layer-size, zstd or unsupported)");
        }
        let mut subject =
            Descriptor::new(mdesc.media_type.clone(), mdesc.digest.clone(), mdesc.size);
        subject.platform = None;
        let idx = SociIndex::new(SociVersion::V1, ztocs, Some(subject), BUILD_TOOL);
        local
            .put_blob(
                &Digest::of(EMPTY_CONFIG),
                bytes::Bytes::from_static(EMPTY_CONFIG),
            )
            .await?;
        let digest = local
            .put_manifest(
                None,
                MEDIA_TYPE_OCI_MANIFEST,
                bytes::Bytes::from(idx.to_json()),
            )
            .await?;
        record_index(
            &mut db,
            &local,
            &digest,
            mdesc.digest.as_str(),
            target.digest.as_str(),
            &platform.to_string(),
            ARTIFACT_TYPE_V1,
        )
        .await?;
        eprintln!(
            "{platform}: SOCI index {digest} for manifest {}",
            mdesc.digest
        );
        last_index = Some(digest);
    }
    db.save()?;
    if let Some(d) = last_index {
        // Upstream labels the image so containerd's GC keeps the (last) index.
        let labels = HashMap::from([(LABEL_SOCI_INDEX.to_string(), d.to_string())]);
        c.put_image(&a.image_ref, &target, labels).await?;
    }
    Ok(())
}

/// `soci rebuild-db`: forget entries whose blobs are gone; add SOCI indexes found in the store.
pub async fn rebuild_db(g: &Globals) -> Result<()> {
    let local = local_store(g, None).await?;
    let location = location_of(&local);
    let mut db = ArtifactsDb::open(&g.root)?;
    let blobs: Vec<(Digest, u64)> = match &local {
        ImageStore::Containerd(c) => c.list().await?,
        ImageStore::Layout { dir } => {
            let mut out = Vec::new();
            if let Ok(rd) = std::fs::read_dir(dir.join("blobs/sha256")) {
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().to_string();
                    if let (Some(d), Ok(m)) =
                        (Digest::parse(&format!("sha256:{name}")), e.metadata())
                    {
                        out.push((d, m.len()));
                    }
                }
            }
            out
        }
        ImageStore::Registry { .. } => unreachable!("local stores are never registries"),
    };
    let present: std::collections::HashSet<String> =
        blobs.iter().map(|(d, _)| d.to_string()).collect();
    let before = db.entries.len();
    db.entries
        .retain(|e| e.location != location || present.contains(&e.digest));
    let removed = before - db.entries.len();
    let mut added = 0;
    for (d, size) in &blobs {
        // SOCI indexes are small manifests; skip anything large without reading it.
        if *size > 4 << 20 || db.get(d.as_str()).is_some() {
            continue;
        }
        let Ok((_, bytes)) = local.get_manifest(d.as_str()).await else {
            continue;
        };
        let Ok(idx) = SociIndex::parse(&bytes) else {
            continue;
        };
        let manifest = idx
            .subject
            .as_ref()
            .map(|s| s.digest.to_string())
            .unwrap_or_default();
        let kind = idx.version.artifact_type();
        record_index(&mut db, &local, d, &manifest, "", "", kind).await?;
        added += 1;
    }
    db.save()?;
    eprintln!(
        "artifacts database {}: {added} index(es) added, {removed} stale entr(y/ies) removed",
        g.root.display()
    );
    Ok(())
}
