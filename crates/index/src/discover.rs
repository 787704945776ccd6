//! Finding the SOCI index of an image, following the v2 trust chain.
//!
//! image index (by tag or digest) → the platform's image manifest entry → its
//! `com.amazon.soci.index-digest` annotation (on the manifest itself, which is content-addressed)
//! → the SOCI index manifest, fetched by that digest; if the image index also lists the SOCI
//! index, its `com.amazon.soci.image-manifest-digest` must name the same manifest. v1 indexes
//! (referrers API) are used only when allowed. Every failure is a typed [`NoSoci`] reason.

use soci_registry::oci::{is_index, is_manifest, layer_compression, LayerCompression};
use soci_registry::{
    Client, Descriptor, Digest, ImageIndex, ImageManifest, Platform, Reference, RegistryError,
};
use soci_ztoc::{Spans, WindowIndex, Ztoc};

use crate::soci::{
    SociIndex, SociVersion, ANNOTATION_IMAGE_MANIFEST_DIGEST, ANNOTATION_INDEX_DIGEST,
    ARTIFACT_TYPE_V1,
};

/// Connections opened while discovery fetches the manifest (see `Client::warm_connections`).
const WARM_CONNECTIONS: usize = 4;

/// Largest zTOC blob accepted.
pub const MAX_ZTOC_BYTES: u64 = 512 << 20;

/// Why an image has no usable SOCI index (the reason a runtime falls back to a full pull).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoSoci {
    /// No SOCI index is bound to the image.
    #[error("no SOCI index for {0}")]
    NoIndex(String),
    /// Only a v1 index exists and v1 is not enabled.
    #[error("only a SOCI v1 index ({0}) exists and v1 is not enabled")]
    V1Only(String),
    /// The binding does not hold.
    #[error("SOCI index digest mismatch: {0}")]
    DigestMismatch(String),
    /// The image has a zstd layer.
    #[error("layer {0} is zstd-compressed")]
    ZstdLayer(String),
    /// A zTOC named by the index cannot be fetched.
    #[error("zTOC {0} is missing: {1}")]
    MissingZtoc(String, String),
    /// A zTOC is malformed or does not match its layer.
    #[error("zTOC {0} is invalid: {1}")]
    CorruptZtoc(String, String),
    /// The SOCI index manifest is malformed.
    #[error("SOCI index {0} is invalid: {1}")]
    CorruptIndex(String, String),
    /// No manifest for the requested platform.
    #[error("no image manifest for platform {0}")]
    NoPlatform(String),
    /// The registry failed.
    #[error("registry error: {0}")]
    Registry(String),
}

impl NoSoci {
    /// Short label for metrics and snapshot labels.
    pub fn label(&self) -> &'static str {
        match self {
            NoSoci::NoIndex(_) => "no_index",
            NoSoci::V1Only(_) => "v1_only",
            NoSoci::DigestMismatch(_) => "digest_mismatch",
            NoSoci::ZstdLayer(_) => "zstd_layer",
            NoSoci::MissingZtoc(..) => "missing_ztoc",
            NoSoci::CorruptZtoc(..) => "corrupt_ztoc",
            NoSoci::CorruptIndex(..) => "corrupt_index",
            NoSoci::NoPlatform(_) => "no_platform",
            NoSoci::Registry(_) => "registry_error",
        }
    }
}

impl From<RegistryError> for NoSoci {
    fn from(e: RegistryError) -> Self {
        NoSoci::Registry(e.to_string())
    }
}

/// Discovery options.
#[derive(Debug, Clone)]
pub struct DiscoverOptions {
    /// Platform to select from an image index.
    pub platform: Platform,
    /// Use v1 indexes found through the referrers API.
    pub allow_v1: bool,
    /// Use this SOCI index (v1 or v2) instead of discovering one (upstream's
    /// `containerd.io/snapshot/remote/soci.index.digest` label, nerdctl's
    /// `--soci-index-digest`). It must still belong to the image: a subject, if it has one,
    /// is the manifest, and every zTOC is for a layer of the manifest.
    pub index_digest: Option<Digest>,
}

impl Default for DiscoverOptions {
    fn default() -> Self {
        DiscoverOptions {
            platform: Platform::host(),
            allow_v1: false,
            index_digest: None,
        }
    }
}

/// An image with a usable SOCI index.
#[derive(Debug, Clone)]
pub struct SociImage {
    /// Where it was found.
    pub reference: Reference,
    /// The image manifest's descriptor.
    pub manifest_desc: Descriptor,
    /// The image manifest.
    pub manifest: ImageManifest,
    /// The SOCI index manifest's descriptor.
    pub index_desc: Descriptor,
    /// The SOCI index.
    pub index: SociIndex,
}

impl SociImage {
    /// zTOC descriptor for each image layer, in layer order (`None`: layer not indexed).
    pub fn layer_ztocs(&self) -> Vec<(Descriptor, Option<Descriptor>)> {
        self.manifest
            .layers
            .iter()
            .map(|l| (l.clone(), self.index.ztoc_for(&l.digest).cloned()))
            .collect()
    }

    /// Fetches, verifies and parses the zTOC of a layer, checking it belongs to that layer.
    #[tracing::instrument(level = "debug", name = "fetch_ztoc", skip_all, fields(ztoc = %ztoc.digest, layer = %layer.digest, size = ztoc.size))]
    pub async fn fetch_ztoc(
        &self,
        client: &Client,
        ztoc: &Descriptor,
        layer: &Descriptor,
    ) -> Result<Ztoc, NoSoci> {
        if ztoc.size > MAX_ZTOC_BYTES {
            return Err(NoSoci::CorruptZtoc(
                ztoc.digest.to_string(),
                format!("larger than {MAX_ZTOC_BYTES} bytes"),
            ));
        }
        let bytes = client
            .get_blob(&self.reference.repository, ztoc)
            .await
            .map_err(|e| match e {
                RegistryError::NotFound { .. } => {
                    NoSoci::MissingZtoc(ztoc.digest.to_string(), e.to_string())
                }
                RegistryError::DigestMismatch { .. } => {
                    NoSoci::CorruptZtoc(ztoc.digest.to_string(), e.to_string())
                }
                e => NoSoci::Registry(e.to_string()),
            })?;
        let _parse = tracing::debug_span!("ztoc_parse", layer = %layer.digest).entered();
        let z = Ztoc::from_bytes(&bytes)
            .map_err(|e| NoSoci::CorruptZtoc(ztoc.digest.to_string(), e.to_string()))?;
        check_ztoc(&z, ztoc, layer)?;
        z.spans()
            .map_err(|e| NoSoci::CorruptZtoc(ztoc.digest.to_string(), e.to_string()))?;
        Ok(z)
    }

    /// The zTOC of a layer and its span table, for a mount: when the descriptor carries a
    /// checkpoint index ([`crate::ANNOTATION_CHECKPOINT_INDEX`]) and the registry serves
    /// ranges, only the zTOC's skeleton is fetched (two range requests, verified against
    /// the index) and the span table loads each checkpoint's window when a read needs it;
    /// otherwise, or when that fails for any reason, the whole zTOC as [`SociImage::fetch_ztoc`].
    pub async fn fetch_ztoc_for_mount(
        &self,
        client: &Client,
        ztoc: &Descriptor,
        layer: &Descriptor,
    ) -> Result<(Ztoc, Spans), NoSoci> {
        if let Some(idx) = crate::soci::checkpoint_index(ztoc) {
            let split = match idx {
                Ok(idx) if client.supports_ranges(&self.reference.repository.registry) => {
                    self.fetch_skeleton(client, ztoc, layer, &idx).await
                }
                Ok(_) => Err("the registry does not serve ranges".to_string()),
                Err(e) => Err(e),
            };
            match split {
                Ok(got) => return Ok(got),
                Err(e) => tracing::warn!(
                    ztoc = %ztoc.digest, layer = %layer.digest, error = %e,
                    "zTOC without its checkpoint records: unusable, fetching it whole"
                ),
            }
        }
        let z = self.fetch_ztoc(client, ztoc, layer).await?;
        let spans = z
            .spans()
            .map_err(|e| NoSoci::CorruptZtoc(ztoc.digest.to_string(), e.to_string()))?;
        Ok((z, spans))
    }

    #[tracing::instrument(level = "debug", name = "fetch_ztoc", skip_all, fields(ztoc = %ztoc.digest, layer = %layer.digest, size = ztoc.size, records = idx.records.len()))]
    async fn fetch_skeleton(
        &self,
        client: &Client,
        ztoc: &Descriptor,
        layer: &Descriptor,
        idx: &WindowIndex,
    ) -> Result<(Ztoc, Spans), String> {
        if ztoc.size > MAX_ZTOC_BYTES {
            return Err(format!("larger than {MAX_ZTOC_BYTES} bytes"));
        }
        let [head, tail] = idx
            .skeleton_ranges(ztoc.size)
            .ok_or_else(|| format!("its records do not fit the {}-byte zTOC", ztoc.size))?;
        let repo = &self.reference.repository;
        let get = |r: std::ops::Range<u64>| async move {
            if r.is_empty() {
                return Ok(bytes::Bytes::new());
            }
            client.get_blob_range(repo, &ztoc.digest, r).await
        };
        let (h, t) = tokio::try_join!(get(head), get(tail)).map_err(|e| e.to_string())?;
        if !client.supports_ranges(&repo.registry) {
            // Every record would cost a read of the blob up to it.
            return Err("the registry ignores range requests".into());
        }
        let _parse = tracing::debug_span!("ztoc_parse", layer = %layer.digest).entered();
        let z = idx
            .ztoc_from_skeleton(ztoc.size, &h, &t)
            .map_err(|e| e.to_string())?;
        check_ztoc(&z, ztoc, layer).map_err(|e| e.to_string())?;
        let spans = Spans::with_window_index(&z, idx).map_err(|e| e.to_string())?;
        Ok((z, spans))
    }
}

/// Checks a zTOC was built for `layer`.
fn check_ztoc(z: &Ztoc, ztoc: &Descriptor, layer: &Descriptor) -> Result<(), NoSoci> {
    if z.compressed_archive_size != layer.size {
        return Err(NoSoci::CorruptZtoc(
            ztoc.digest.to_string(),
            format!(
                "built for a {}-byte layer, layer {} has {}",
                z.compressed_archive_size, layer.digest, layer.size
            ),
        ));
    }
    Ok(())
}

/// Finds the SOCI index of `reference` for `opts.platform`.
#[tracing::instrument(level = "debug", name = "discover", skip_all, fields(image = %reference))]
pub async fn discover(
    client: &Client,
    reference: &Reference,
    opts: &DiscoverOptions,
) -> Result<SociImage, NoSoci> {
    let repo = &reference.repository;
    // The SOCI index and every zTOC are fetched concurrently right after the manifest: have
    // connections ready for them (handshakes off the critical path).
    client.warm_connections(repo, WARM_CONNECTIONS);
    let (root_desc, root) = client.get_manifest(repo, &reference.object()).await?;
    let mut image_index: Option<ImageIndex> = None;
    let manifest_desc = if is_index(&root_desc.media_type) {
        let idx: ImageIndex = serde_json::from_slice(&root).map_err(|e| {
            NoSoci::Registry(format!(
                "image index {}: invalid JSON: {e}",
                root_desc.digest
            ))
        })?;
        let entry = crate::platform::manifest_for(&idx, &opts.platform)
            .cloned()
            .ok_or_else(|| NoSoci::NoPlatform(opts.platform.to_string()))?;
        image_index = Some(idx);
        entry
    } else if is_manifest(&root_desc.media_type) {
        root_desc.clone()
    } else {
        return Err(NoSoci::Registry(format!(
            "{reference}: unsupported media type {}",
            root_desc.media_type
        )));
    };
    // The image-index entry usually carries the SOCI index digest too: fetch that index while
    // the manifest is fetched (one round trip instead of two), and check it against the
    // manifest's own annotation below.
    let hinted = manifest_desc
        .annotations
        .get(ANNOTATION_INDEX_DIGEST)
        .and_then(|d| Digest::parse(d))
        .filter(|_| image_index.is_some());
    let fetch_hinted = async {
        match &hinted {
            Some(d) => Some(client.get_manifest(repo, d.as_str()).await),
            None => None,
        }
    };
    let fetch_manifest = async {
        if manifest_desc.digest == root_desc.digest {
            Ok((root_desc.clone(), root.clone()))
        } else {
            client
                .get_manifest(repo, manifest_desc.digest.as_str())
                .await
                .map(|(d, b)| {
                    (
                        Descriptor {
                            platform: manifest_desc.platform.clone(),
                            annotations: manifest_desc.annotations.clone(),
                            ..d
                        },
                        b,
                    )
                })
        }
    };
    let (fetched, prefetched_index) = tokio::join!(fetch_manifest, fetch_hinted);
    let (manifest_desc, manifest_bytes) = fetched?;
    let manifest: ImageManifest = serde_json::from_slice(&manifest_bytes).map_err(|e| {
        NoSoci::Registry(format!(
            "image manifest {}: invalid JSON: {e}",
            manifest_desc.digest
        ))
    })?;
    if let Some(l) = manifest
        .layers
        .iter()
        .find(|l| layer_compression(&l.media_type) == LayerCompression::Zstd)
    {
        return Err(NoSoci::ZstdLayer(l.digest.to_string()));
    }

    let bound = manifest.annotations.get(ANNOTATION_INDEX_DIGEST).cloned();
    let (index_digest, version) = match (&opts.index_digest, bound) {
        (Some(d), _) => (d.clone(), None),
        (None, bound) => discover_index(
            client,
            reference,
            &manifest_desc,
            image_index.as_ref(),
            bound,
            opts,
        )
        .await
        .map(|(d, v)| (d, Some(v)))?,
    };

    let index_result = match (hinted, prefetched_index) {
        (Some(h), Some(r)) if h == index_digest => r,
        _ => client.get_manifest(repo, index_digest.as_str()).await,
    };
    let (index_desc, index_bytes) = index_result.map_err(|e| match e {
        RegistryError::NotFound { .. } => NoSoci::NoIndex(format!(
            "SOCI index {index_digest} named by {} is missing",
            manifest_desc.digest
        )),
        RegistryError::DigestMismatch { .. } => NoSoci::DigestMismatch(e.to_string()),
        e => NoSoci::Registry(e.to_string()),
    })?;
    let index = SociIndex::parse(&index_bytes)
        .map_err(|e| NoSoci::CorruptIndex(index_digest.to_string(), e))?;
    if version.is_some_and(|v| index.version != v) {
        return Err(NoSoci::CorruptIndex(
            index_digest.to_string(),
            format!("expected a {:?} index", version.unwrap_or(index.version)),
        ));
    }
    let must_name_manifest = index.version == SociVersion::V1 || index.subject.is_some();
    if must_name_manifest
        && index.subject.as_ref().map(|s| &s.digest) != Some(&manifest_desc.digest)
    {
        return Err(NoSoci::DigestMismatch(format!(
            "SOCI index {index_digest} has another subject than {}",
            manifest_desc.digest
        )));
    }
    for z in &index.ztocs {
        let layer = z
            .annotations
            .get(crate::soci::ANNOTATION_LAYER_DIGEST)
            .map(String::as_str)
            .unwrap_or("");
        if !manifest.layers.iter().any(|l| l.digest.as_str() == layer) {
            return Err(NoSoci::CorruptIndex(
                index_digest.to_string(),
                format!("zTOC {} is for layer {layer}, not in the image", z.digest),
            ));
        }
    }
    Ok(SociImage {
        reference: reference.clone(),
        manifest_desc,
        manifest,
        index_desc,
        index,
    })
}

/// The SOCI index an image names: v2 through its manifest annotation (`bound`), checked
/// against the image-index entry, else v1 through the referrers API.
async fn discover_index(
    client: &Client,
    reference: &Reference,
    manifest_desc: &Descriptor,
    image_index: Option<&ImageIndex>,
    bound: Option<String>,
    opts: &DiscoverOptions,
) -> Result<(Digest, SociVersion), NoSoci> {
    let repo = &reference.repository;
    Ok(match bound {
        Some(d) => {
            let d = Digest::parse(&d).ok_or_else(|| {
                NoSoci::CorruptIndex(
                    d.clone(),
                    format!("invalid {ANNOTATION_INDEX_DIGEST} annotation"),
                )
            })?;
            if let Some(idx) = &image_index {
                for e in idx.manifests.iter().filter(|e| e.digest == d) {
                    let names = e.annotations.get(ANNOTATION_IMAGE_MANIFEST_DIGEST);
                    if names.map(String::as_str) != Some(manifest_desc.digest.as_str()) {
                        return Err(NoSoci::DigestMismatch(format!(
                            "image index entry {d} names manifest {}, expected {}",
                            names.map(String::as_str).unwrap_or("none"),
                            manifest_desc.digest
                        )));
                    }
                }
            }
            (d, SociVersion::V2)
        }
        None => {
            let refs = client
                .referrers(repo, &manifest_desc.digest, ARTIFACT_TYPE_V1)
                .await?;
            match refs.and_then(|r| r.manifests.into_iter().next()) {
                Some(v1) if opts.allow_v1 => (v1.digest, SociVersion::V1),
                Some(v1) => return Err(NoSoci::V1Only(v1.digest.to_string())),
                None => {
                    return Err(NoSoci::NoIndex(format!(
                        "{reference} ({})",
                        manifest_desc.digest
                    )))
                }
            }
        }
    })
}
