//! `soci convert`: an image in, the same image plus SOCI index v2 artifacts bound by an image
//! index out.

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;
use soci_registry::oci::{
    is_index, is_manifest, layer_compression, to_go_json, LayerCompression, MEDIA_TYPE_OCI_CONFIG,
    MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST,
};
use soci_registry::{Descriptor, Digest, ImageIndex, ImageManifest, Platform};
use soci_ztoc::{BuildOptions, CompressionAlgorithm};
use tracing::{info, warn};

use crate::soci::*;
use crate::store::{ImageStore, StoreError};

/// Which platforms of an image index to convert.
#[derive(Debug, Clone)]
pub enum PlatformSelection {
    /// The host's platform.
    Host,
    /// These platforms.
    Some(Vec<Platform>),
    /// Every platform.
    All,
}

/// Conversion settings.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Span size (uncompressed bytes).
    pub span_size: u64,
    /// Layers smaller than this (compressed) get no zTOC.
    pub min_layer_size: u64,
    /// Platforms to convert.
    pub platforms: PlatformSelection,
    /// Build tool identifier written in zTOCs and indexes.
    pub build_tool_identifier: String,
    /// zTOCs built before, by layer digest; reused unless `force` (upstream's `--force`).
    pub existing_ztocs: BTreeMap<Digest, Descriptor>,
    /// Rebuild zTOCs even when `existing_ztocs` has one.
    pub force: bool,
    /// Annotate gzip zTOC descriptors with their checkpoint index
    /// ([`crate::ANNOTATION_CHECKPOINT_INDEX`], soci-rs's own) so the daemon can fetch a zTOC
    /// without its windows. Default true; false leaves it out (only upstream's format).
    pub checkpoint_index: bool,
    /// Files whose spans the snapshotter fetches before a lazy mount is ready: written as
    /// prefetch artifacts (see [`crate::prefetch`]). Default none.
    pub prefetch_files: Vec<String>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            span_size: soci_ztoc::DEFAULT_SPAN_SIZE,
            min_layer_size: DEFAULT_MIN_LAYER_SIZE,
            platforms: PlatformSelection::Host,
            build_tool_identifier: soci_ztoc::DEFAULT_BUILD_TOOL_IDENTIFIER.into(),
            existing_ztocs: BTreeMap::new(),
            force: false,
            checkpoint_index: true,
            prefetch_files: Vec::new(),
        }
    }
}

/// What happened to one platform.
#[derive(Debug, Clone)]
pub struct PlatformReport {
    /// Platform.
    pub platform: Platform,
    /// New image manifest digest (with the index annotation).
    pub manifest: Digest,
    /// SOCI index manifest digest (None when no layer got a zTOC).
    pub soci_index: Option<Digest>,
    /// Layers indexed.
    pub ztocs: usize,
    /// Layers skipped and why.
    pub skipped: Vec<(Digest, String)>,
}

/// Result of a conversion.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    /// Digest of the new image index.
    pub index: Digest,
    /// Per converted platform.
    pub platforms: Vec<PlatformReport>,
}

/// Conversion failure.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// Reading or writing an image.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Invalid source image.
    #[error("{0}")]
    Image(String),
    /// Building a zTOC failed.
    #[error("building zTOC of layer {layer}: {source}")]
    Ztoc {
        /// Layer digest.
        layer: Digest,
        /// Cause.
        #[source]
        source: soci_ztoc::ZtocError,
    },
}

fn is_soci_entry(d: &Descriptor) -> bool {
    d.artifact_type.as_deref() == Some(ARTIFACT_TYPE_V2)
        || d.annotations.contains_key(ANNOTATION_IMAGE_MANIFEST_DIGEST)
}

fn wanted(sel: &PlatformSelection, p: &Platform) -> bool {
    match sel {
        PlatformSelection::All => true,
        PlatformSelection::Host => Platform::host().matches(p),
        PlatformSelection::Some(list) => list.iter().any(|w| w.matches(p)),
    }
}

/// Converts the image `src_object` of `src` into a SOCI-enabled image tagged `dst_tag` in `dst`.
/// `progress` receives one line per step (for a terminal).
pub async fn convert(
    src: &ImageStore,
    src_object: &str,
    dst: &ImageStore,
    dst_tag: &str,
    opts: &ConvertOptions,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<ConvertReport, ConvertError> {
    let tmp = tempfile::tempdir().map_err(|e| ConvertError::Image(format!("temp dir: {e}")))?;
    let (root_desc, root) = src.get_manifest(src_object).await?;
    let mut index: ImageIndex = if is_index(&root_desc.media_type) {
        serde_json::from_slice(&root)
            .map_err(|e| ConvertError::Image(format!("image index {}: {e}", root_desc.digest)))?
    } else if is_manifest(&root_desc.media_type) {
        let m: ImageManifest = serde_json::from_slice(&root).map_err(|e| {
            ConvertError::Image(format!("image manifest {}: {e}", root_desc.digest))
        })?;
        let cfg = src.get_blob(&m.config).await?;
        #[derive(serde::Deserialize)]
        struct Cfg {
            architecture: String,
            os: String,
            variant: Option<String>,
        }
        let c: Cfg = serde_json::from_slice(&cfg)
            .map_err(|e| ConvertError::Image(format!("image config {}: {e}", m.config.digest)))?;
        let mut d = root_desc.clone();
        d.platform = Some(Platform {
            architecture: c.architecture,
            os: c.os,
            variant: c.variant,
            ..Default::default()
        });
        let platform = d.platform.clone().expect("set above");
        let platforms = match &opts.platforms {
            PlatformSelection::Host => PlatformSelection::Some(vec![platform]),
            other => other.clone(),
        };
        let opts = ConvertOptions {
            platforms,
            ..opts.clone()
        };
        let idx = ImageIndex {
            schema_version: 2,
            media_type: Some(MEDIA_TYPE_OCI_INDEX.into()),
            artifact_type: None,
            manifests: vec![d],
            subject: None,
            annotations: BTreeMap::new(),
        };
        return convert_index(src, dst, dst_tag, &opts, progress, idx, tmp.path()).await;
    } else {
        return Err(ConvertError::Image(format!(
            "{src_object}: unsupported media type {}",
            root_desc.media_type
        )));
    };
    index.media_type = Some(MEDIA_TYPE_OCI_INDEX.into());
    convert_index(src, dst, dst_tag, opts, progress, index, tmp.path()).await
}

async fn convert_index(
    src: &ImageStore,
    dst: &ImageStore,
    dst_tag: &str,
    opts: &ConvertOptions,
    progress: &(dyn Fn(&str) + Sync),
    mut index: ImageIndex,
    tmp: &Path,
) -> Result<ConvertReport, ConvertError> {
    let selected: Vec<usize> = index
        .manifests
        .iter()
        .enumerate()
        .filter(|(_, d)| !is_soci_entry(d) && is_manifest(&d.media_type))
        .filter(|(_, d)| {
            d.platform
                .as_ref()
                .is_some_and(|p| wanted(&opts.platforms, p))
        })
        .map(|(i, _)| i)
        .collect();
    if selected.is_empty() {
        return Err(ConvertError::Image(
            "no image manifest matches the requested platforms".into(),
        ));
    }
    let selected_platforms: Vec<Platform> = selected
        .iter()
        .filter_map(|&i| index.manifests[i].platform.clone())
        .collect();
    // Old SOCI entries of converted platforms are replaced; others are kept.
    let mut reports = Vec::new();
    let mut new_soci_entries = Vec::new();
    let mut written = std::collections::HashSet::new();
    for &i in &selected {
        let entry = index.manifests[i].clone();
        let platform = entry
            .platform
            .clone()
            .expect("selected entries have a platform");
        progress(&format!("converting {platform} manifest {}", entry.digest));
        let (new_entry, soci_entry, report) =
            convert_manifest(src, dst, opts, progress, &entry, &platform, tmp).await?;
        written.insert(new_entry.digest.clone());
        written.extend(soci_entry.iter().map(|d| d.digest.clone()));
        index.manifests[i] = new_entry;
        new_soci_entries.extend(soci_entry);
        reports.push(report);
    }
    index.manifests.retain(|d| {
        !(is_soci_entry(d)
            && d.platform
                .as_ref()
                .is_some_and(|p| selected_platforms.iter().any(|s| s.matches(p))))
    });
    index.manifests.extend(new_soci_entries);
    if reports.iter().all(|r| r.soci_index.is_none()) {
        return Err(ConvertError::Image(
            "no zTOCs created: every layer was skipped (below --min-layer-size, zstd or unsupported)".into(),
        ));
    }
    // Entries of platforms not converted must exist in the destination too.
    if !dst.same_as(src) {
        // Converted manifests and SOCI indexes were written to dst already.
        for d in index
            .manifests
            .iter()
            .filter(|d| is_manifest(&d.media_type) && !written.contains(&d.digest))
        {
            copy_manifest(src, dst, d, tmp).await?;
        }
    }
    let body = Bytes::from(to_go_json(&index));
    let digest = dst
        .put_manifest(Some(dst_tag), MEDIA_TYPE_OCI_INDEX, body)
        .await?;
    info!(index = %digest, tag = dst_tag, "pushed SOCI-enabled image index");
    Ok(ConvertReport {
        index: digest,
        platforms: reports,
    })
}

/// Copies a manifest and everything it references, unless already present.
async fn copy_manifest(
    src: &ImageStore,
    dst: &ImageStore,
    d: &Descriptor,
    tmp: &Path,
) -> Result<(), ConvertError> {
    let (_, bytes) = src.get_manifest(d.digest.as_str()).await?;
    let m: ImageManifest = serde_json::from_slice(&bytes)
        .map_err(|e| ConvertError::Image(format!("manifest {}: {e}", d.digest)))?;
    dst.copy_blob_from(src, &m.config, tmp).await?;
    for l in &m.layers {
        dst.copy_blob_from(src, l, tmp).await?;
    }
    dst.put_manifest(None, &d.media_type, bytes).await?;
    Ok(())
}

async fn convert_manifest(
    src: &ImageStore,
    dst: &ImageStore,
    opts: &ConvertOptions,
    progress: &(dyn Fn(&str) + Sync),
    entry: &Descriptor,
    platform: &Platform,
    tmp: &Path,
) -> Result<(Descriptor, Option<Descriptor>, PlatformReport), ConvertError> {
    let (_, bytes) = src.get_manifest(entry.digest.as_str()).await?;
    let mut manifest: ImageManifest = serde_json::from_slice(&bytes)
        .map_err(|e| ConvertError::Image(format!("manifest {}: {e}", entry.digest)))?;
    manifest.annotations.remove(ANNOTATION_INDEX_DIGEST);
    dst.copy_blob_from(src, &manifest.config, tmp).await?;

    for layer in &manifest.layers {
        dst.copy_blob_from(src, layer, tmp).await?;
    }
    let (mut ztocs, skipped, built) =
        index_layers(src, dst, &manifest.layers, opts, progress, tmp).await?;

    let n_ztocs = ztocs.len();
    ztocs.extend(
        crate::prefetch::write_artifacts(dst, &built, &opts.prefetch_files, progress).await?,
    );
    let mut soci_entry = None;
    let mut soci_digest = None;
    if n_ztocs > 0 {
        let sindex = SociIndex::new(SociVersion::V2, ztocs, None, &opts.build_tool_identifier);
        dst.put_blob(&Digest::of(EMPTY_CONFIG), Bytes::from_static(EMPTY_CONFIG))
            .await?;
        let sbytes = Bytes::from(sindex.to_json());
        let ssize = sbytes.len() as u64;
        let sdigest = dst
            .put_manifest(None, MEDIA_TYPE_OCI_MANIFEST, sbytes)
            .await?;
        manifest
            .annotations
            .insert(ANNOTATION_INDEX_DIGEST.into(), sdigest.to_string());
        let mut d = Descriptor::new(MEDIA_TYPE_OCI_MANIFEST, sdigest.clone(), ssize);
        d.platform = Some(platform.clone());
        d.artifact_type = Some(ARTIFACT_TYPE_V2.into());
        soci_entry = Some(d);
        soci_digest = Some(sdigest);
    } else {
        warn!(%platform, "no layer of this platform got a zTOC; no SOCI index for it");
    }
    manifest.media_type = Some(MEDIA_TYPE_OCI_MANIFEST.into());
    manifest.config.media_type = MEDIA_TYPE_OCI_CONFIG.into();
    let mbytes = Bytes::from(to_go_json(&manifest));
    let msize = mbytes.len() as u64;
    let mdigest = dst
        .put_manifest(None, MEDIA_TYPE_OCI_MANIFEST, mbytes)
        .await?;
    let mut new_entry = Descriptor::new(MEDIA_TYPE_OCI_MANIFEST, mdigest.clone(), msize);
    new_entry.platform = entry.platform.clone();
    new_entry.annotations = manifest.annotations.clone();
    if let Some(s) = soci_entry.as_mut() {
        s.annotations
            .insert(ANNOTATION_IMAGE_MANIFEST_DIGEST.into(), mdigest.to_string());
    }
    let report = PlatformReport {
        platform: platform.clone(),
        manifest: mdigest,
        soci_index: soci_digest,
        ztocs: n_ztocs,
        skipped,
    };
    Ok((new_entry, soci_entry, report))
}

/// What [`index_layers`] made: zTOC descriptors, layers skipped (with why), and the zTOCs
/// themselves by layer when `prefetch_files` asks for prefetch artifacts (empty otherwise).
pub type IndexedLayers = (
    Vec<Descriptor>,
    Vec<(Digest, String)>,
    Vec<(Digest, soci_ztoc::Ztoc)>,
);

/// Builds the zTOC of each eligible layer of `layers` (read from `src`) and stores it in `dst`.
/// Returns the zTOC descriptors (image layer order), the skipped layers with the reason, and
/// the zTOCs when prefetch artifacts are to be written.
pub async fn index_layers(
    src: &ImageStore,
    dst: &ImageStore,
    layers: &[Descriptor],
    opts: &ConvertOptions,
    progress: &(dyn Fn(&str) + Sync),
    tmp: &Path,
) -> Result<IndexedLayers, ConvertError> {
    let mut ztocs = Vec::new();
    let mut skipped = Vec::new();
    let mut built = Vec::new(); // (layer, zTOC), kept only for prefetch artifacts
    for layer in layers {
        let algorithm = match layer_compression(&layer.media_type) {
            LayerCompression::Gzip => CompressionAlgorithm::Gzip,
            LayerCompression::Uncompressed => CompressionAlgorithm::Uncompressed,
            LayerCompression::Zstd => {
                warn!(layer = %layer.digest, "zstd layer: no zTOC (images with zstd layers are pulled in full)");
                skipped.push((layer.digest.clone(), "zstd layer".into()));
                continue;
            }
            LayerCompression::Unknown => {
                skipped.push((
                    layer.digest.clone(),
                    format!("unsupported media type {}", layer.media_type),
                ));
                continue;
            }
        };
        if layer.size < opts.min_layer_size {
            skipped.push((
                layer.digest.clone(),
                format!("size {} below minimum {}", layer.size, opts.min_layer_size),
            ));
            continue;
        }
        if !opts.force {
            if let Some(z) = opts.existing_ztocs.get(&layer.digest) {
                if dst.has_blob(&z.digest).await? {
                    progress(&format!(
                        "  layer {}: reusing zTOC {} (--force rebuilds)",
                        layer.digest, z.digest
                    ));
                    let mut z = z.clone();
                    if !opts.checkpoint_index {
                        z.annotations.remove(ANNOTATION_CHECKPOINT_INDEX);
                    }
                    ztocs.push(z.clone());
                    if !opts.prefetch_files.is_empty() {
                        let bytes = dst.get_blob(&z).await?;
                        let parsed = soci_ztoc::Ztoc::from_bytes(&bytes).map_err(|source| {
                            ConvertError::Ztoc {
                                layer: layer.digest.clone(),
                                source,
                            }
                        })?;
                        built.push((layer.digest.clone(), parsed));
                    }
                    continue;
                }
            }
        }
        let file = tempfile::NamedTempFile::new_in(tmp)
            .map_err(|e| ConvertError::Image(format!("temp file: {e}")))?;
        src.get_blob_to_file(layer, file.path()).await?;
        let build_opts = BuildOptions {
            span_size: opts.span_size,
            build_tool_identifier: opts.build_tool_identifier.clone(),
            algorithm: Some(algorithm),
        };
        let path = file.path().to_path_buf();
        let z = tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(&path)?;
            soci_ztoc::build(f, &build_opts)
        })
        .await
        .map_err(|e| ConvertError::Image(format!("zTOC build task: {e}")))?
        .map_err(|source| ConvertError::Ztoc {
            layer: layer.digest.clone(),
            source,
        })?;
        let zbytes = z.to_bytes();
        let zdigest = Digest::of(&zbytes);
        progress(&format!(
            "  layer {} ({} bytes): zTOC {} with {} entries, {} spans",
            layer.digest,
            layer.size,
            zdigest,
            z.entries.len(),
            z.span_count()
        ));
        let mut zdesc = ztoc_descriptor(
            zdigest.clone(),
            zbytes.len() as u64,
            layer,
            opts.span_size,
            z.has_xattrs(),
        );
        if opts.checkpoint_index {
            annotate_checkpoint_index(&mut zdesc, &zbytes).map_err(|source| {
                ConvertError::Ztoc {
                    layer: layer.digest.clone(),
                    source,
                }
            })?;
        }
        dst.put_blob(&zdigest, Bytes::from(zbytes)).await?;
        ztocs.push(zdesc);
        if !opts.prefetch_files.is_empty() {
            built.push((layer.digest.clone(), z));
        }
    }
    Ok((ztocs, skipped, built))
}
