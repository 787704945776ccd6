//! Refining a recorded gzip layer's zTOC: the same TOC, with extra checkpoints around the
//! uncompressed bytes the recording run read (soci-ztoc's `plan_cuts`), so the prefetch of
//! the new SOCI index fetches small spans holding little more than those bytes instead of
//! whole 4 MiB spans.
//!
//! Why this is safe to hand to any reader: span boundaries are only the checkpoint list, and
//! readers (upstream's included) look spans up by searching the checkpoints' offsets. The
//! layer blob is downloaded once, digest-verified, into a temp file (memory stays bounded)
//! and scanned twice (plan, then build); the new zTOC keeps the old one's TOC, version, build
//! tool and span size, and is checked to describe the same layer before it is pushed. Layers
//! that cannot be refined (uncompressed tar, whose spans the format fixes; no byte ranges in
//! the record; a record that overflowed; a plan without cuts) keep their zTOC.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use soci_index::prefetch::PrefetchArtifact;
use soci_index::record::{recorded_artifact, RecordedRanges, RANGES_EXTENSION};
use soci_index::ImageStore;
use soci_registry::{Descriptor, Digest};
use soci_ztoc::{
    build_with_checkpoints, plan_cuts, BuildOptions, CompressionAlgorithm, CutPolicy,
    GzipCheckpoints, Ztoc,
};

use super::artifacts_of::Recorded;

/// A refined zTOC, pushed, and its prefetch artifact.
pub(super) struct Refined {
    /// The new zTOC's descriptor (the old one's annotations).
    pub ztoc_desc: Descriptor,
    /// The prefetch artifact in the new zTOC's span ids.
    pub artifact: Option<PrefetchArtifact>,
}

/// The byte ranges recorded with `rec`, checked against its zTOC; `None` (with a note) when
/// there are none to use.
fn ranges_of(rec: &Recorded, covered: u64) -> Result<Option<&RecordedRanges>> {
    let Some(ranges) = rec.record.ranges.as_ref() else {
        eprintln!(
            "soci: layer {}: the record has no byte ranges ({} has no .{RANGES_EXTENSION} file): zTOC kept",
            rec.layer.digest,
            rec.path.display()
        );
        return Ok(None);
    };
    if rec.record.uncompressed_size != covered {
        bail!(
            "demand record {}: layer of {} uncompressed bytes, zTOC {} covers {covered}",
            rec.path.display(),
            rec.record.uncompressed_size,
            rec.ztoc_desc.digest
        );
    }
    if !ranges.complete {
        eprintln!(
            "soci: layer {}: the run read from too many places to list ({}): zTOC kept",
            rec.layer.digest,
            rec.path.display()
        );
        return Ok(None);
    }
    Ok((!ranges.ranges.is_empty()).then_some(ranges))
}

/// Refines `rec`'s zTOC around its recorded byte ranges and pushes it to `store`; `None` when
/// the layer keeps its zTOC (said why on stderr).
pub(super) async fn refine_layer(
    store: &ImageStore,
    rec: &Recorded,
    policy: &CutPolicy,
    tmp: &Path,
) -> Result<Option<Refined>> {
    let layer = &rec.layer.digest;
    let old = &rec.ztoc;
    if old.compression.algorithm != CompressionAlgorithm::Gzip {
        eprintln!("soci: layer {layer}: not gzip (its spans are fixed by the format): zTOC kept");
        return Ok(None);
    }
    let spans = old
        .spans()
        .with_context(|| format!("zTOC {} of layer {layer}", rec.ztoc_desc.digest))?;
    let Some(ranges) = ranges_of(rec, spans.uncompressed_size())? else {
        return Ok(None);
    };
    let span_size = GzipCheckpoints::parse(old.compression.checkpoints.clone())
        .ok()
        .and_then(|c| u64::try_from(c.span_size()).ok())
        .filter(|&s| s > 0)
        .with_context(|| format!("zTOC {}: no usable span size", rec.ztoc_desc.digest))?;

    let file = tempfile::NamedTempFile::new_in(tmp).context("temp file for the layer blob")?;
    store
        .get_blob_to_file(&rec.layer, file.path())
        .await
        .with_context(|| format!("downloading layer {layer}"))?;
    let path = file.path().to_path_buf();
    let (policy, hot) = (policy.clone(), ranges.ranges.clone());
    let opts = BuildOptions {
        span_size,
        build_tool_identifier: old.build_tool_identifier.clone(),
        algorithm: Some(CompressionAlgorithm::Gzip),
    };
    let (plan, built) = tokio::task::spawn_blocking(move || {
        let open = || std::fs::File::open(&path);
        let plan = plan_cuts(open()?, span_size, &hot, &policy)?;
        if plan.checkpoints.is_empty() {
            return Ok::<_, anyhow::Error>((plan, None));
        }
        let z = build_with_checkpoints(open()?, &opts, &plan.checkpoints)?;
        Ok((plan, Some(z)))
    })
    .await
    .context("refining task")?
    .with_context(|| format!("refining the zTOC of layer {layer}"))?;
    drop(file);
    let Some(built) = built else {
        eprintln!("soci: layer {layer}: no cut pays for itself: zTOC kept");
        return Ok(None);
    };
    if built.entries != old.entries
        || built.uncompressed_archive_size != old.uncompressed_archive_size
        || built.compressed_archive_size != old.compressed_archive_size
    {
        eprintln!(
            "soci: layer {layer}: its zTOC {} does not list the layer as soci-rs reads it: zTOC kept",
            rec.ztoc_desc.digest
        );
        return Ok(None);
    }
    // The old zTOC with the new checkpoints: TOC, version and build tool unchanged.
    let refined = Ztoc {
        compression: built.compression,
        ..old.clone()
    };
    let new_spans = refined
        .spans()
        .with_context(|| format!("refined zTOC of layer {layer}"))?;
    let bytes = refined.to_bytes();
    let digest = Digest::of(&bytes);
    let mut desc = rec.ztoc_desc.clone();
    desc.digest = digest.clone();
    desc.size = bytes.len() as u64;
    soci_index::annotate_checkpoint_index(&mut desc, &bytes)
        .with_context(|| format!("refined zTOC of layer {layer}"))?;

    // Prefetch: the new spans holding the bytes read, in first-read order.
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    for r in &ranges.ranges {
        for id in new_spans.spans_for(r) {
            if seen.insert(id) {
                order.push(id as u64);
            }
        }
    }
    let artifact = recorded_artifact(&order, layer.as_str())?;
    let compressed = |s: &soci_ztoc::Spans, ids: &mut dyn Iterator<Item = usize>| -> u64 {
        ids.filter_map(|id| s.span(id).ok())
            .map(|s| s.compressed.end - s.compressed.start)
            .sum()
    };
    let before = compressed(&spans, &mut rec.record.spans.iter().map(|&i| i as usize));
    let after = compressed(&new_spans, &mut seen.iter().copied());
    eprintln!(
        "layer {layer}: zTOC refined: {} -> {} checkpoints ({} regular, {} hot segments), zTOC {} -> {} bytes ({}); \
         prefetch {} spans, {} -> {} compressed bytes",
        old.span_count(),
        refined.span_count(),
        plan.regular,
        plan.hot.len(),
        rec.ztoc_desc.size,
        desc.size,
        digest,
        order.len(),
        before,
        after
    );
    store
        .put_blob(&digest, Bytes::from(bytes))
        .await
        .with_context(|| format!("storing refined zTOC {digest} of layer {layer}"))?;
    Ok(Some(Refined {
        ztoc_desc: desc,
        artifact,
    }))
}
