//! From checked demand records to prefetch artifacts.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use soci_index::prefetch::PrefetchArtifact;
use soci_index::record::{recorded_artifact, RecordFile};
use soci_index::ImageStore;
use soci_registry::Descriptor;
use soci_ztoc::Ztoc;

/// A recorded layer, its record checked against the image's zTOC.
pub(super) struct Recorded {
    /// The image layer.
    pub layer: Descriptor,
    /// Its zTOC's descriptor in the SOCI index.
    pub ztoc_desc: Descriptor,
    /// Its zTOC.
    pub ztoc: Ztoc,
    /// The record file.
    pub path: PathBuf,
    /// The record.
    pub record: RecordFile,
    /// The prefetch artifact of the recorded spans (`None`: nothing read).
    pub artifact: Option<PrefetchArtifact>,
}

/// Checks each record against the image's SOCI index and zTOCs and makes the artifacts.
pub(super) async fn artifacts_of(
    store: &ImageStore,
    img: &soci_index::record::BoundImage,
    records: &[(PathBuf, RecordFile)],
) -> Result<Vec<Recorded>> {
    let mut by_layer: BTreeMap<String, &(PathBuf, RecordFile)> = BTreeMap::new();
    for rec in records {
        if let Some(prev) = by_layer.insert(rec.1.layer.clone(), rec) {
            bail!(
                "two records of layer {} since the recording started ({} and {}): another pull of this image ran at the same time; record again",
                rec.1.layer,
                prev.0.display(),
                rec.0.display()
            );
        }
    }
    let mut out = Vec::new();
    let mut any = false;
    for layer in &img.manifest.layers {
        let Some(z) = img.soci.ztoc_for(&layer.digest) else {
            continue;
        };
        let Some((path, rec)) = by_layer.get(layer.digest.as_str()).copied() else {
            eprintln!(
                "soci: layer {}: not mounted lazily afresh in the recording run (pulled in full, or \
                 mounted by another pull meanwhile); no prefetch for it",
                layer.digest
            );
            continue;
        };
        any = true;
        if rec.ztoc != z.digest.as_str() {
            bail!(
                "demand record {}: layer {} was served from zTOC {}, the image's SOCI index has {}: the registry's image differs from {}",
                path.display(),
                layer.digest,
                rec.ztoc,
                z.digest,
                "the one recorded into"
            );
        }
        let bytes = store.get_blob(z).await?;
        let ztoc = Ztoc::from_bytes(&bytes)
            .with_context(|| format!("zTOC {} of layer {}", z.digest, layer.digest))?;
        let spans = ztoc.span_count() as u64;
        if rec.span_count != spans {
            bail!(
                "demand record {}: {} spans, zTOC {} has {spans}",
                path.display(),
                rec.span_count,
                z.digest
            );
        }
        let artifact = recorded_artifact(&rec.spans, layer.digest.as_str())?;
        eprintln!(
            "layer {}: {} of {spans} spans read ({} ranges)",
            layer.digest,
            rec.spans.len(),
            artifact.as_ref().map(|a| a.spans().len()).unwrap_or(0)
        );
        out.push(Recorded {
            layer: layer.clone(),
            ztoc_desc: z.clone(),
            ztoc,
            path: path.clone(),
            record: rec.clone(),
            artifact,
        });
    }
    if !any {
        bail!(
            "no indexed layer of the image was recorded: the records found are of another image (is the registry's image the one in the store?)"
        );
    }
    Ok(out)
}
