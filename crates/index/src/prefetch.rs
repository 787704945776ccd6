//! Prefetch artifacts: which spans of a layer to fetch before its lazy mount is ready.
//!
//! Why this exists: a lazily loaded container still waits on the network for the first read of
//! each file it needs at start. An image builder who knows those files names them at build
//! time (`soci convert --prefetch-file`); the snapshotter fetches their spans while the layer is
//! being mounted, in a few merged range requests instead of one round trip per first read.
//!
//! The format is upstream soci-snapshotter's (`soci/prefetch.go`, `docs/prefetch.md`), byte for
//! byte, so each side honours the other's artifacts:
//! - a JSON blob `{"version":"1.0","prefetch_spans":[{"start_span":A,"end_span":B}]}` (Go's
//!   encoding: no spaces, fields in struct order, `priority` omitted when zero), span ranges
//!   inclusive;
//! - listed in the SOCI index manifest's `layers` after the zTOCs, media type
//!   [`MEDIA_TYPE_PREFETCH`], bound to its image layer by the
//!   `com.amazon.soci.image-layer-digest` annotation (its only annotation), one per layer that
//!   has prefetched files, in image layer order.
//!
//! Artifacts come from whoever pushed the image: [`PrefetchArtifact::parse`] bounds the size,
//! the number of ranges and checks every span id against the layer's zTOC span count.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use soci_registry::oci::to_go_json;
use soci_registry::{Client, Descriptor, Digest, RegistryError};
use soci_ztoc::{EntryKind, Ztoc};

use crate::discover::SociImage;
use crate::soci::ANNOTATION_LAYER_DIGEST;

/// Media type of a prefetch artifact in a SOCI index (upstream's `SociPrefetchMediaType`).
pub const MEDIA_TYPE_PREFETCH: &str = "application/vnd.amazon.soci.prefetch.v1+json";
/// The only artifact version upstream writes and reads.
pub const PREFETCH_VERSION: &str = "1.0";
/// Largest prefetch artifact accepted (upstream's for a layer of a few thousand files is a few
/// hundred bytes: ranges are merged before writing).
pub const MAX_PREFETCH_BYTES: u64 = 1 << 20;
/// Most span ranges accepted in one artifact.
pub const MAX_PREFETCH_RANGES: usize = 16_384;

/// A range of spans to prefetch, both ends inclusive (upstream's `PrefetchSpan`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefetchSpan {
    /// First span id.
    pub start_span: i32,
    /// Last span id (inclusive).
    pub end_span: i32,
    /// Reserved by upstream for prioritised prefetch (lower first); omitted when zero.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i64,
}

fn is_zero(p: &i64) -> bool {
    *p == 0
}

/// A prefetch artifact (upstream's `PrefetchArtifact`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefetchArtifact {
    /// Always [`PREFETCH_VERSION`].
    pub version: String,
    /// Span ranges (Go writes `null` for none; refused as empty).
    #[serde(default)]
    pub prefetch_spans: Option<Vec<PrefetchSpan>>,
}

/// A prefetch artifact that cannot be used; every variant names the artifact.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefetchError {
    /// Larger than [`MAX_PREFETCH_BYTES`] or with too many ranges.
    #[error("prefetch artifact {artifact}: too large ({what})")]
    TooLarge {
        /// Artifact digest.
        artifact: String,
        /// What is over which limit.
        what: String,
    },
    /// Not the JSON upstream writes, an unknown version, or no ranges.
    #[error("prefetch artifact {artifact}: {reason}")]
    Invalid {
        /// Artifact digest.
        artifact: String,
        /// Why.
        reason: String,
    },
    /// A span id outside the layer's zTOC.
    #[error("prefetch artifact {artifact}: span range {start}..={end} is outside layer {layer} ({spans} spans)")]
    SpanOutOfRange {
        /// Artifact digest.
        artifact: String,
        /// Layer digest.
        layer: String,
        /// Range start.
        start: i64,
        /// Range end.
        end: i64,
        /// The layer's span count.
        spans: usize,
    },
    /// The registry failed or returned other bytes.
    #[error("prefetch artifact {artifact}: {reason}")]
    Fetch {
        /// Artifact digest.
        artifact: String,
        /// Why.
        reason: String,
    },
}

impl PrefetchArtifact {
    /// An artifact over `ranges` (normalised: sorted, overlapping and adjacent ranges merged,
    /// as upstream's builder writes them).
    pub fn new(ranges: Vec<PrefetchSpan>) -> PrefetchArtifact {
        PrefetchArtifact {
            version: PREFETCH_VERSION.into(),
            prefetch_spans: Some(normalize(ranges)),
        }
    }

    /// The ranges (none for an artifact Go wrote with a nil slice).
    pub fn spans(&self) -> &[PrefetchSpan] {
        self.prefetch_spans.as_deref().unwrap_or(&[])
    }

    /// The JSON bytes, exactly as upstream's `json.Marshal` writes them.
    pub fn to_json(&self) -> Vec<u8> {
        to_go_json(self)
    }

    /// The artifact's descriptor in a SOCI index, bound to `layer`.
    pub fn descriptor(&self, layer: &Digest) -> (Descriptor, Vec<u8>) {
        let bytes = self.to_json();
        let mut d = Descriptor::new(MEDIA_TYPE_PREFETCH, Digest::of(&bytes), bytes.len() as u64);
        d.annotations
            .insert(ANNOTATION_LAYER_DIGEST.into(), layer.to_string());
        (d, bytes)
    }

    /// Parses artifact `artifact` (its digest, for errors) of a layer with `span_count` spans:
    /// bounded size and range count, upstream's version, at least one range, every span id in
    /// `0..span_count` and no range ending before it starts.
    pub fn parse(
        bytes: &[u8],
        artifact: &str,
        layer: &str,
        span_count: usize,
    ) -> Result<PrefetchArtifact, PrefetchError> {
        if bytes.len() as u64 > MAX_PREFETCH_BYTES {
            return Err(PrefetchError::TooLarge {
                artifact: artifact.into(),
                what: format!("{} bytes, limit {MAX_PREFETCH_BYTES}", bytes.len()),
            });
        }
        let invalid = |reason: String| PrefetchError::Invalid {
            artifact: artifact.into(),
            reason,
        };
        let a: PrefetchArtifact =
            serde_json::from_slice(bytes).map_err(|e| invalid(format!("invalid JSON: {e}")))?;
        if a.version != PREFETCH_VERSION {
            return Err(invalid(format!(
                "unsupported version {:?} (expected {PREFETCH_VERSION:?})",
                a.version
            )));
        }
        if a.spans().is_empty() {
            return Err(invalid("no span ranges".into()));
        }
        if a.spans().len() > MAX_PREFETCH_RANGES {
            return Err(PrefetchError::TooLarge {
                artifact: artifact.into(),
                what: format!(
                    "{} span ranges, limit {MAX_PREFETCH_RANGES}",
                    a.spans().len()
                ),
            });
        }
        for s in a.spans() {
            let ok = s.start_span >= 0
                && s.start_span <= s.end_span
                && (s.end_span as i64) < span_count as i64;
            if !ok {
                return Err(PrefetchError::SpanOutOfRange {
                    artifact: artifact.into(),
                    layer: layer.into(),
                    start: s.start_span.into(),
                    end: s.end_span.into(),
                    spans: span_count,
                });
            }
        }
        Ok(a)
    }

    /// The ranges as span id ranges (inclusive), merged, lowest `priority` first (offset order
    /// among equals): a recorded prefetch ranks its spans by when the workload first read
    /// them, so the daemon asks for them in that order.
    pub fn span_ranges(&self) -> Vec<std::ops::RangeInclusive<usize>> {
        let valid: Vec<PrefetchSpan> = self
            .spans()
            .iter()
            .filter(|s| s.start_span >= 0 && s.start_span <= s.end_span)
            .copied()
            .collect();
        // Merged as `normalize` does, but a merged range keeps its most urgent priority.
        let mut spans = merge(valid, i64::min);
        spans.sort_by_key(|s| s.priority);
        spans
            .into_iter()
            .map(|s| s.start_span as usize..=s.end_span as usize)
            .collect()
    }
}

/// Sorts ranges and merges overlapping and adjacent ones (upstream's
/// `normalizePrefetchSpans`: the merged range keeps the first range's priority).
pub fn normalize(spans: Vec<PrefetchSpan>) -> Vec<PrefetchSpan> {
    merge(spans, |first, _| first)
}

/// Sorts ranges and merges overlapping and adjacent ones; a merged range's priority is
/// `priority(kept, merged in)`.
fn merge(mut spans: Vec<PrefetchSpan>, priority: fn(i64, i64) -> i64) -> Vec<PrefetchSpan> {
    spans.sort_by_key(|s| (s.start_span, s.end_span));
    let mut out: Vec<PrefetchSpan> = Vec::with_capacity(spans.len());
    for s in spans {
        match out.last_mut() {
            Some(cur) if (s.start_span as i64) <= cur.end_span as i64 + 1 => {
                cur.end_span = cur.end_span.max(s.end_span);
                cur.priority = priority(cur.priority, s.priority);
            }
            _ => out.push(s),
        }
    }
    out
}

/// A path as upstream compares it with zTOC names: `filepath.Clean("/" + p)` without the
/// leading `/` (`.` and empty components dropped, `..` resolved, never above the root).
pub fn clean_path(p: &[u8]) -> Vec<u8> {
    let mut parts: Vec<&[u8]> = Vec::new();
    for c in p.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join(&b'/')
}

/// One image layer that has a zTOC, for [`plan`].
pub struct LayerToc<'a> {
    /// Image layer digest.
    pub layer: &'a Digest,
    /// Its zTOC.
    pub ztoc: &'a Ztoc,
}

/// What [`plan`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefetchPlan {
    /// Per layer digest, the span ranges to prefetch (normalised).
    pub layers: BTreeMap<String, Vec<PrefetchSpan>>,
    /// Requested paths found in no indexed layer, or deleted by a whiteout above them.
    pub not_found: Vec<String>,
}

enum Hit {
    Entry(usize),
    Deleted,
}

/// Per layer: cleaned name -> entry index, whiteout and opaque markers.
struct LayerNames {
    entries: HashMap<Vec<u8>, usize>,
    whiteouts: std::collections::HashSet<Vec<u8>>,
    opaque_dirs: std::collections::HashSet<Vec<u8>>,
}

impl LayerNames {
    fn new(z: &Ztoc) -> LayerNames {
        let mut n = LayerNames {
            entries: HashMap::new(),
            whiteouts: Default::default(),
            opaque_dirs: Default::default(),
        };
        for (i, e) in z.entries.iter().enumerate() {
            let name = clean_path(&e.name);
            let (dir, base) = match name.iter().rposition(|&b| b == b'/') {
                Some(p) => (name[..p].to_vec(), name[p + 1..].to_vec()),
                None => (Vec::new(), name.clone()),
            };
            if base == b".wh..wh..opq" {
                n.opaque_dirs.insert(dir);
            } else if let Some(hidden) = base.strip_prefix(b".wh.") {
                let mut p = dir;
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(hidden);
                n.whiteouts.insert(p);
            } else {
                // Later entries of the same name win, as when the tar is extracted.
                n.entries.insert(name, i);
            }
        }
        n
    }

    /// Whether `path` is in this layer, hidden by it, or neither (look lower).
    fn lookup(&self, path: &[u8]) -> Option<Hit> {
        if let Some(&i) = self.entries.get(path) {
            return Some(Hit::Entry(i));
        }
        // A whiteout of the path or of a parent, or an opaque parent, hides lower layers.
        let mut prefix = path;
        loop {
            if self.whiteouts.contains(prefix) {
                return Some(Hit::Deleted);
            }
            let parent = match prefix.iter().rposition(|&b| b == b'/') {
                Some(p) => &prefix[..p],
                None => &b""[..],
            };
            if self.opaque_dirs.contains(parent) {
                return Some(Hit::Deleted);
            }
            if parent.is_empty() {
                return None;
            }
            prefix = parent;
        }
    }
}

/// Maps requested files to span ranges of the layers that provide them: for each path, the
/// topmost indexed layer (`layers` in image order, bottom first) with an entry of that name,
/// unless a whiteout or an opaque directory in a layer above hides it. As upstream: span
/// `span_of(offset)` through `span_of(offset + size)`; layers without a zTOC are not looked
/// at. Non-regular entries (directories, links) provide nothing to prefetch.
pub fn plan(
    layers: &[LayerToc<'_>],
    paths: &[String],
) -> Result<PrefetchPlan, soci_ztoc::ZtocError> {
    let mut out = PrefetchPlan::default();
    let mut names: Vec<Option<LayerNames>> = layers.iter().map(|_| None).collect();
    let mut spans: Vec<Option<soci_ztoc::Spans>> = layers.iter().map(|_| None).collect();
    for path in paths {
        let want = clean_path(path.as_bytes());
        let mut found = false;
        for i in (0..layers.len()).rev() {
            let z = layers[i].ztoc;
            let n = names[i].get_or_insert_with(|| LayerNames::new(z));
            match n.lookup(&want) {
                None => continue,
                Some(Hit::Deleted) => break,
                Some(Hit::Entry(e)) => {
                    let e = &z.entries[e];
                    if e.kind == EntryKind::Regular {
                        let s = match &spans[i] {
                            Some(s) => s,
                            None => spans[i].insert(z.spans()?),
                        };
                        let start = s.span_of(e.offset);
                        let end = s.span_of(e.offset.saturating_add(e.size)).max(start);
                        out.layers
                            .entry(layers[i].layer.to_string())
                            .or_default()
                            .push(PrefetchSpan {
                                start_span: i32::try_from(start).unwrap_or(i32::MAX),
                                end_span: i32::try_from(end).unwrap_or(i32::MAX),
                                priority: 0,
                            });
                        found = true;
                    }
                    break;
                }
            }
        }
        if !found {
            out.not_found.push(path.clone());
        }
    }
    for v in out.layers.values_mut() {
        *v = normalize(std::mem::take(v));
    }
    Ok(out)
}

/// Reads the requested files of upstream's `--prefetch-files-json` file shape: a JSON array of
/// path strings (blank entries dropped, as upstream).
pub fn parse_files_json(bytes: &[u8]) -> Result<Vec<String>, String> {
    let v: Vec<String> = serde_json::from_slice(bytes)
        .map_err(|e| format!("expected a JSON array of paths: {e}"))?;
    Ok(v.into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect())
}

/// The files of `soci convert --prefetch-file` (blank ones dropped) and
/// `--prefetch-files-json`, in that order, as upstream's CLI collects them.
pub fn cli_files(flags: &[String], json: Option<&std::path::Path>) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = flags
        .iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if let Some(p) = json {
        let meta = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
        if meta.len() > 16 << 20 {
            return Err(format!("{}: larger than 16 MiB", p.display()));
        }
        let bytes = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
        out.extend(parse_files_json(&bytes).map_err(|e| format!("{}: {e}", p.display()))?);
    }
    Ok(out)
}

impl crate::soci::SociIndex {
    /// The prefetch artifact listed for an image layer (the first, as upstream).
    pub fn prefetch_for(&self, layer: &Digest) -> Option<&Descriptor> {
        self.ztocs.iter().find(|d| {
            d.media_type == MEDIA_TYPE_PREFETCH
                && d.annotations
                    .get(ANNOTATION_LAYER_DIGEST)
                    .map(String::as_str)
                    == Some(layer.as_str())
        })
    }
}

impl SociImage {
    /// Fetches, verifies (digest, size limit) and parses the prefetch artifact `desc` of
    /// `layer`, whose zTOC has `span_count` spans.
    #[tracing::instrument(level = "debug", name = "fetch_prefetch", skip_all, fields(artifact = %desc.digest, layer = %layer))]
    pub async fn fetch_prefetch(
        &self,
        client: &Client,
        desc: &Descriptor,
        layer: &Digest,
        span_count: usize,
    ) -> Result<PrefetchArtifact, PrefetchError> {
        let artifact = desc.digest.to_string();
        if desc.size > MAX_PREFETCH_BYTES {
            return Err(PrefetchError::TooLarge {
                artifact,
                what: format!("descriptor size {}, limit {MAX_PREFETCH_BYTES}", desc.size),
            });
        }
        let bytes = client
            .get_blob(&self.reference.repository, desc)
            .await
            .map_err(|e: RegistryError| PrefetchError::Fetch {
                artifact: artifact.clone(),
                reason: e.to_string(),
            })?;
        PrefetchArtifact::parse(&bytes, &artifact, layer.as_str(), span_count)
    }
}

/// `soci convert`: writes one prefetch artifact per layer of `built` (layer digest and zTOC, in
/// image layer order) providing some of `files`, and returns their descriptors for the SOCI
/// index, in layer order. Files found nowhere are reported and skipped, as upstream.
pub async fn write_artifacts(
    dst: &crate::store::ImageStore,
    built: &[(Digest, Ztoc)],
    files: &[String],
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Vec<Descriptor>, crate::ConvertError> {
    if files.is_empty() || built.is_empty() {
        return Ok(Vec::new());
    }
    let layers: Vec<LayerToc<'_>> = built
        .iter()
        .map(|(layer, ztoc)| LayerToc { layer, ztoc })
        .collect();
    let p = plan(&layers, files).map_err(|e| {
        crate::ConvertError::Image(format!("prefetch: span table of a built zTOC: {e}"))
    })?;
    for f in &p.not_found {
        tracing::warn!(file = %f, "prefetch file not found in any indexed layer");
        progress(&format!(
            "  prefetch file {f} not found in any indexed layer"
        ));
    }
    let mut out = Vec::new();
    for (layer, _) in built {
        let Some(ranges) = p.layers.get(layer.as_str()) else {
            continue;
        };
        let (desc, bytes) = PrefetchArtifact::new(ranges.clone()).descriptor(layer);
        dst.put_blob(&desc.digest, bytes::Bytes::from(bytes))
            .await?;
        progress(&format!(
            "  layer {layer}: prefetch artifact {} ({} span ranges)",
            desc.digest,
            ranges.len()
        ));
        out.push(desc);
    }
    Ok(out)
}

#[cfg(test)]
#[path = "prefetch_tests.rs"]
mod tests;
