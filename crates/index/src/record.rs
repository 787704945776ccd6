//! Prefetch recorded from a real run (`soci prefetch record`): the daemon's per-layer demand
//! records in, prefetch artifacts of a new SOCI index v2 for the same image out.
//!
//! Why a new index and not new layers: the layers, and so their zTOCs, are unchanged; only
//! the list of spans to fetch before the container starts is new. The new SOCI index lists
//! the same zTOC descriptors (reused by digest) followed by one prefetch artifact per layer
//! the run read (upstream's format, [`crate::prefetch`]), and is bound to the image exactly as
//! `soci convert` binds: the image manifest's `com.amazon.soci.index-digest` annotation, and
//! the image index's SOCI entry. Layers and zTOCs are never rewritten.
//!
//! The record files are the daemon's ([`RecordFile`], one per lazily mounted layer under
//! `<daemon root>/record/`). They are read back with bounded sizes and every span id checked
//! against the layer's zTOC, so a damaged or planted file is refused, not written into an
//! artifact.
//!
//! Next to each record the daemon appends the uncompressed byte ranges the reads asked for
//! (`<snapshot>.ranges`, [`RecordedRanges`]); `soci prefetch record` rebuilds the zTOC of a
//! recorded gzip layer with extra checkpoints around them, so the prefetch fetches small
//! spans. Then the new SOCI index names that new zTOC instead of the old one (the layer is
//! still never rewritten).

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use soci_registry::oci::{is_index, is_manifest, to_go_json, MEDIA_TYPE_OCI_MANIFEST};
use soci_registry::{Descriptor, Digest, ImageIndex, ImageManifest, Platform};

use crate::convert::{ConvertError, ConvertReport, PlatformReport};
use crate::prefetch::{PrefetchArtifact, PrefetchSpan, MAX_PREFETCH_RANGES, MEDIA_TYPE_PREFETCH};
use crate::soci::*;
use crate::store::ImageStore;

/// Version of the record file the daemon writes.
pub const RECORD_VERSION: u32 = 1;
/// Directory of the record files under the daemon root.
pub const RECORD_DIR: &str = "record";
/// Largest record file read (a layer of 1 M spans fits with room to spare).
pub const MAX_RECORD_BYTES: u64 = 16 << 20;
/// Most spans a record may list (bounds the memory of a planted file before its zTOC check).
pub const MAX_RECORD_SPANS: u64 = 1 << 20;
/// Extension of the byte-range file next to a record (`<snapshot>.ranges`).
pub const RANGES_EXTENSION: &str = "ranges";
/// Most lines a byte-range file may hold (the daemon writes at most 65536 reads and one
/// `overflow` line).
pub const MAX_RECORD_RANGES: usize = (1 << 16) + 1;

/// One lazily mounted layer's demand record, as the daemon writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordFile {
    /// [`RECORD_VERSION`].
    pub version: u32,
    /// The daemon's snapshot id of the mount.
    pub snapshot: u64,
    /// Image reference the layer was pulled as.
    pub image: String,
    /// Image manifest digest.
    pub manifest: String,
    /// Layer digest.
    pub layer: String,
    /// zTOC digest.
    pub ztoc: String,
    /// When the layer was mounted (ms since the Unix epoch).
    pub mounted_unix_ms: u64,
    /// Spans of the layer's zTOC.
    pub span_count: u64,
    /// Uncompressed bytes the zTOC's spans cover (0 in records without byte ranges).
    #[serde(default)]
    pub uncompressed_size: u64,
    /// Span ids the container's reads touched, in first-access order, each once.
    pub spans: Vec<u64>,
    /// The byte ranges read, from the file next to the record (not part of the JSON; see
    /// [`RecordFile::set_ranges`]).
    #[serde(skip)]
    pub ranges: Option<RecordedRanges>,
}

/// A record or recorded index that cannot be used; each names the file or artifact.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// A record file is malformed, oversized or inconsistent.
    #[error("demand record {file}: {reason}")]
    BadRecord {
        /// Record file path.
        file: String,
        /// Why.
        reason: String,
    },
    /// The image is not a SOCI-enabled (v2) image, or its artifacts are inconsistent.
    #[error(transparent)]
    Image(#[from] ConvertError),
}

impl RecordFile {
    /// Parses record `file` (its path, for errors): bounded size, known version, at most
    /// [`MAX_RECORD_SPANS`] spans, each below `span_count` and listed once.
    pub fn parse(bytes: &[u8], file: &str) -> Result<RecordFile, RecordError> {
        let bad = |reason: String| RecordError::BadRecord {
            file: file.into(),
            reason,
        };
        if bytes.len() as u64 > MAX_RECORD_BYTES {
            return Err(bad(format!(
                "{} bytes, limit {MAX_RECORD_BYTES}",
                bytes.len()
            )));
        }
        let r: RecordFile =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        if r.version != RECORD_VERSION {
            return Err(bad(format!("unsupported version {}", r.version)));
        }
        if r.span_count > MAX_RECORD_SPANS || r.spans.len() as u64 > r.span_count {
            return Err(bad(format!(
                "{} spans listed for a layer of {} spans (limit {MAX_RECORD_SPANS})",
                r.spans.len(),
                r.span_count
            )));
        }
        let mut seen = vec![false; r.span_count as usize];
        for &s in &r.spans {
            match seen.get_mut(s as usize) {
                Some(b) if !*b => *b = true,
                Some(_) => return Err(bad(format!("span {s} listed twice"))),
                None => {
                    return Err(bad(format!(
                        "span {s} is outside the layer ({} spans)",
                        r.span_count
                    )))
                }
            }
        }
        Ok(r)
    }
}

impl RecordFile {
    /// Parses the byte-range file next to this record (`file`, for errors) against the
    /// record's `uncompressed_size` and keeps it in [`RecordFile::ranges`].
    pub fn set_ranges(&mut self, bytes: &[u8], file: &str) -> Result<(), RecordError> {
        self.ranges = Some(RecordedRanges::parse(bytes, file, self.uncompressed_size)?);
        Ok(())
    }
}

/// The byte ranges of a record (`<snapshot>.ranges`), in read order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordedRanges {
    /// Uncompressed byte ranges of the layer, each a read that added bytes, in read order.
    pub ranges: Vec<std::ops::Range<u64>>,
    /// False when the daemon stopped listing (`overflow`): the ranges miss later reads.
    pub complete: bool,
}

impl RecordedRanges {
    /// Parses byte-range file `file` (its path, for errors) of a layer whose spans cover
    /// `uncompressed_size` bytes: bounded size and line count, every range non-empty and
    /// inside the layer; anything else is refused.
    pub fn parse(
        bytes: &[u8],
        file: &str,
        uncompressed_size: u64,
    ) -> Result<RecordedRanges, RecordError> {
        let bad = |reason: String| RecordError::BadRecord {
            file: file.into(),
            reason,
        };
        if bytes.len() as u64 > MAX_RECORD_BYTES {
            return Err(bad(format!(
                "{} bytes, limit {MAX_RECORD_BYTES}",
                bytes.len()
            )));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8".into()))?;
        if !text.is_empty() && !text.ends_with('\n') {
            return Err(bad("the last line is cut short".into()));
        }
        let mut out = RecordedRanges {
            ranges: Vec::new(),
            complete: true,
        };
        for (n, line) in text.lines().enumerate() {
            if n >= MAX_RECORD_RANGES {
                return Err(bad(format!("more than {MAX_RECORD_RANGES} lines")));
            }
            if !out.complete {
                return Err(bad(format!("line {}: after `overflow`", n + 1)));
            }
            if line == "overflow" {
                out.complete = false;
                continue;
            }
            let mut it = line.split(' ');
            let (Some(a), Some(b), None) = (it.next(), it.next(), it.next()) else {
                return Err(bad(format!("line {}: not `START END`", n + 1)));
            };
            let (Ok(a), Ok(b)) = (a.parse::<u64>(), b.parse::<u64>()) else {
                return Err(bad(format!("line {}: not `START END`", n + 1)));
            };
            if a >= b || b > uncompressed_size {
                return Err(bad(format!(
                    "line {}: bytes {a}..{b} are not a range of the layer ({uncompressed_size} bytes)",
                    n + 1
                )));
            }
            out.ranges.push(a..b);
        }
        Ok(out)
    }
}

/// The prefetch artifact of a first-access list: the spans as sorted, merged ranges (as
/// upstream writes them), each range's `priority` the first-access rank of its earliest-read
/// span (upstream's "lower first"; the first range read gets 0, which JSON omits). `None` when
/// nothing was read; an error when the ranges exceed what a reader accepts.
pub fn recorded_artifact(
    order: &[u64],
    layer: &str,
) -> Result<Option<PrefetchArtifact>, RecordError> {
    let mut ranked: Vec<(u64, i64)> = order
        .iter()
        .enumerate()
        .map(|(rank, &s)| (s, rank as i64))
        .collect();
    ranked.sort_unstable();
    let mut ranges: Vec<PrefetchSpan> = Vec::new();
    for (s, rank) in ranked {
        let s = i32::try_from(s).map_err(|_| RecordError::BadRecord {
            file: layer.into(),
            reason: format!("span id {s} does not fit the prefetch format"),
        })?;
        match ranges.last_mut() {
            Some(r) if r.end_span as i64 + 1 >= s as i64 => {
                r.end_span = r.end_span.max(s);
                r.priority = r.priority.min(rank);
            }
            _ => ranges.push(PrefetchSpan {
                start_span: s,
                end_span: s,
                priority: rank,
            }),
        }
    }
    if ranges.is_empty() {
        return Ok(None);
    }
    if ranges.len() > MAX_PREFETCH_RANGES {
        return Err(RecordError::BadRecord {
            file: layer.into(),
            reason: format!(
                "{} span ranges, more than a prefetch artifact may hold ({MAX_PREFETCH_RANGES})",
                ranges.len()
            ),
        });
    }
    // Priorities as dense ranks (0, 1, 2 ...) in first-access order of the ranges.
    let mut by_first: Vec<usize> = (0..ranges.len()).collect();
    by_first.sort_by_key(|&i| ranges[i].priority);
    for (rank, i) in by_first.into_iter().enumerate() {
        ranges[i].priority = rank as i64;
    }
    Ok(Some(PrefetchArtifact {
        version: crate::prefetch::PREFETCH_VERSION.into(),
        prefetch_spans: Some(ranges),
    }))
}

fn image_err(msg: String) -> RecordError {
    RecordError::Image(ConvertError::Image(msg))
}

/// The SOCI-enabled image `object` of `store` for `platform`: its image index, the position
/// of the image manifest's entry, the manifest and the SOCI index v2 bound to it.
pub struct BoundImage {
    /// The image index.
    pub index: ImageIndex,
    /// Index of the image manifest's entry in `index.manifests`.
    pub entry: usize,
    /// The image manifest.
    pub manifest: ImageManifest,
    /// The SOCI index's digest.
    pub soci_digest: Digest,
    /// The SOCI index.
    pub soci: SociIndex,
}

/// Reads the SOCI-enabled image `object` of `store` for `platform` (as `soci convert` wrote
/// it: an image index whose manifest names a SOCI index v2).
pub async fn bound_image(
    store: &ImageStore,
    object: &str,
    platform: &Platform,
) -> Result<BoundImage, RecordError> {
    let (root_desc, root) = store
        .get_manifest(object)
        .await
        .map_err(ConvertError::from)?;
    if !is_index(&root_desc.media_type) {
        return Err(image_err(format!(
            "{object} is a single image manifest, not a SOCI-enabled image: run `soci convert` first"
        )));
    }
    let index: ImageIndex = serde_json::from_slice(&root)
        .map_err(|e| image_err(format!("image index {}: {e}", root_desc.digest)))?;
    let entry = index
        .manifests
        .iter()
        .position(|d| {
            is_manifest(&d.media_type)
                && d.artifact_type.is_none()
                && !d.annotations.contains_key(ANNOTATION_IMAGE_MANIFEST_DIGEST)
                && d.platform.as_ref().is_none_or(|p| platform.matches(p))
        })
        .ok_or_else(|| image_err(format!("{object} has no image manifest for {platform}")))?;
    let mdigest = index.manifests[entry].digest.clone();
    let (_, mbytes) = store
        .get_manifest(mdigest.as_str())
        .await
        .map_err(ConvertError::from)?;
    let manifest: ImageManifest = serde_json::from_slice(&mbytes)
        .map_err(|e| image_err(format!("image manifest {mdigest}: {e}")))?;
    let soci_digest = manifest
        .annotations
        .get(ANNOTATION_INDEX_DIGEST)
        .and_then(|d| Digest::parse(d))
        .ok_or_else(|| {
            image_err(format!(
                "image manifest {mdigest} of {object} names no SOCI index ({ANNOTATION_INDEX_DIGEST}): run `soci convert` first"
            ))
        })?;
    let (_, sbytes) = store
        .get_manifest(soci_digest.as_str())
        .await
        .map_err(ConvertError::from)?;
    let soci = SociIndex::parse(&sbytes)
        .map_err(|e| image_err(format!("SOCI index {soci_digest}: {e}")))?;
    if soci.version != SociVersion::V2 {
        return Err(image_err(format!("SOCI index {soci_digest} is not v2")));
    }
    Ok(BoundImage {
        index,
        entry,
        manifest,
        soci_digest,
        soci,
    })
}

/// Writes a new SOCI index v2 for `img` (its zTOCs, except those of `ztocs`: layer digest ->
/// descriptor of a refined zTOC already in `store`; `artifacts` by layer digest as its
/// prefetch artifacts, earlier prefetch artifacts dropped), binds it as `soci convert` does
/// and tags the new image index `dst_tag` in `store`.
pub async fn rebind(
    store: &ImageStore,
    img: BoundImage,
    artifacts: &BTreeMap<Digest, PrefetchArtifact>,
    ztocs: &BTreeMap<Digest, Descriptor>,
    dst_tag: &str,
) -> Result<ConvertReport, RecordError> {
    let BoundImage {
        mut index,
        entry,
        mut manifest,
        soci,
        ..
    } = img;
    let mut layers: Vec<Descriptor> = soci
        .ztocs
        .iter()
        .filter(|d| d.media_type != MEDIA_TYPE_PREFETCH)
        .map(|d| {
            d.annotations
                .get(ANNOTATION_LAYER_DIGEST)
                .and_then(|l| Digest::parse(l))
                .and_then(|l| ztocs.get(&l))
                .unwrap_or(d)
                .clone()
        })
        .collect();
    for l in ztocs.keys() {
        if soci.ztoc_for(l).is_none() {
            return Err(image_err(format!(
                "layer {l} has no zTOC in the SOCI index: no refined zTOC for it"
            )));
        }
    }
    let n_ztocs = layers.len();
    for l in &manifest.layers {
        let Some(a) = artifacts.get(&l.digest) else {
            continue;
        };
        if soci.ztoc_for(&l.digest).is_none() {
            return Err(image_err(format!(
                "layer {} has no zTOC in the SOCI index: no prefetch artifact for it",
                l.digest
            )));
        }
        let (desc, bytes) = a.descriptor(&l.digest);
        store
            .put_blob(&desc.digest, Bytes::from(bytes))
            .await
            .map_err(ConvertError::from)?;
        layers.push(desc);
    }
    let build_tool = soci
        .annotations
        .get(ANNOTATION_BUILD_TOOL)
        .cloned()
        .unwrap_or_else(|| soci_ztoc::DEFAULT_BUILD_TOOL_IDENTIFIER.into());
    let sindex = SociIndex::new(SociVersion::V2, layers, None, &build_tool);
    store
        .put_blob(&Digest::of(EMPTY_CONFIG), Bytes::from_static(EMPTY_CONFIG))
        .await
        .map_err(ConvertError::from)?;
    let sbytes = Bytes::from(sindex.to_json());
    let ssize = sbytes.len() as u64;
    let sdigest = store
        .put_manifest(None, MEDIA_TYPE_OCI_MANIFEST, sbytes)
        .await
        .map_err(ConvertError::from)?;
    manifest
        .annotations
        .insert(ANNOTATION_INDEX_DIGEST.into(), sdigest.to_string());
    let mbytes = Bytes::from(to_go_json(&manifest));
    let msize = mbytes.len() as u64;
    let mdigest = store
        .put_manifest(None, MEDIA_TYPE_OCI_MANIFEST, mbytes)
        .await
        .map_err(ConvertError::from)?;
    let old = index.manifests[entry].clone();
    let platform = old.platform.clone().unwrap_or_else(Platform::host);
    let mut new_entry = Descriptor::new(MEDIA_TYPE_OCI_MANIFEST, mdigest.clone(), msize);
    new_entry.platform = old.platform.clone();
    new_entry.annotations = manifest.annotations.clone();
    index.manifests[entry] = new_entry;
    let mut soci_entry = Descriptor::new(MEDIA_TYPE_OCI_MANIFEST, sdigest.clone(), ssize);
    soci_entry.platform = Some(platform.clone());
    soci_entry.artifact_type = Some(ARTIFACT_TYPE_V2.into());
    soci_entry
        .annotations
        .insert(ANNOTATION_IMAGE_MANIFEST_DIGEST.into(), mdigest.to_string());
    // The SOCI entry of the old manifest is replaced where it stood, else appended.
    let pos = index.manifests.iter().position(|d| {
        d.annotations
            .get(ANNOTATION_IMAGE_MANIFEST_DIGEST)
            .map(String::as_str)
            == Some(old.digest.as_str())
    });
    match pos {
        Some(p) => index.manifests[p] = soci_entry,
        None => index.manifests.push(soci_entry),
    }
    let body = Bytes::from(to_go_json(&index));
    let digest = store
        .put_manifest(
            Some(dst_tag),
            soci_registry::oci::MEDIA_TYPE_OCI_INDEX,
            body,
        )
        .await
        .map_err(ConvertError::from)?;
    Ok(ConvertReport {
        index: digest,
        platforms: vec![PlatformReport {
            platform,
            manifest: mdigest,
            soci_index: Some(sdigest),
            ztocs: n_ztocs,
            skipped: Vec::new(),
        }],
    })
}

#[cfg(test)]
#[path = "record_tests.rs"]
mod tests;
