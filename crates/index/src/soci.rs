//! SOCI index manifest types, media types and annotations.

use std::collections::BTreeMap;

use soci_registry::oci::{to_go_json, MEDIA_TYPE_OCI_MANIFEST};
use soci_registry::{Descriptor, Digest, ImageManifest};

/// SOCI index v1 artifact and config media type.
pub const ARTIFACT_TYPE_V1: &str = "application/vnd.amazon.soci.index.v1+json";
/// SOCI index v2 artifact and config media type.
pub const ARTIFACT_TYPE_V2: &str = "application/vnd.amazon.soci.index.v2+json";
/// Media type of zTOC blobs in a SOCI index.
pub const MEDIA_TYPE_ZTOC: &str = "application/octet-stream";
/// zTOC descriptor annotation: media type of the image layer.
pub const ANNOTATION_LAYER_MEDIA_TYPE: &str = "com.amazon.soci.image-layer-mediaType";
/// zTOC descriptor annotation: digest of the image layer.
pub const ANNOTATION_LAYER_DIGEST: &str = "com.amazon.soci.image-layer-digest";
/// zTOC descriptor annotation: span size.
pub const ANNOTATION_SPAN_SIZE: &str = "com.amazon.soci.span-size";
/// zTOC descriptor annotation: no entry has xattrs.
pub const ANNOTATION_DISABLE_XATTRS: &str = "com.amazon.soci.disable-xattrs";
/// zTOC descriptor annotation (soci-rs; upstream readers ignore it): base64 of the zTOC's
/// [`soci_ztoc::WindowIndex`], so a mount can fetch the zTOC without its checkpoint records
/// and each record when a read needs it.
pub const ANNOTATION_CHECKPOINT_INDEX: &str = "io.github.soci-rs.checkpoint-index.v1";
/// Longest [`ANNOTATION_CHECKPOINT_INDEX`] value read (~64k checkpoints, a 256 GiB layer at
/// the default span size).
pub const MAX_CHECKPOINT_INDEX_CHARS: usize = 4 << 20;
/// SOCI index annotation: build tool.
pub const ANNOTATION_BUILD_TOOL: &str = "com.amazon.soci.build-tool-identifier";
/// On the image manifest (and its index entry): digest of its SOCI index.
pub const ANNOTATION_INDEX_DIGEST: &str = "com.amazon.soci.index-digest";
/// On the SOCI index entry of an image index: digest of the image manifest it indexes.
pub const ANNOTATION_IMAGE_MANIFEST_DIGEST: &str = "com.amazon.soci.image-manifest-digest";
/// Default minimum compressed layer size for building a zTOC (10 MiB).
pub const DEFAULT_MIN_LAYER_SIZE: u64 = 10 << 20;
/// The config blob of a SOCI index: `{}`.
pub const EMPTY_CONFIG: &[u8] = b"{}";

/// SOCI index version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SociVersion {
    /// v1: found through the referrers API, has a subject.
    V1,
    /// v2: bound to the image through an image index, no subject.
    V2,
}

impl SociVersion {
    /// The artifact (and config media) type.
    pub fn artifact_type(self) -> &'static str {
        match self {
            SociVersion::V1 => ARTIFACT_TYPE_V1,
            SociVersion::V2 => ARTIFACT_TYPE_V2,
        }
    }
}

/// A parsed SOCI index manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SociIndex {
    /// v1 or v2.
    pub version: SociVersion,
    /// zTOC descriptors, one per indexed layer, in image layer order, then the prefetch
    /// artifacts (see [`crate::prefetch`]).
    pub ztocs: Vec<Descriptor>,
    /// Subject (v1).
    pub subject: Option<Descriptor>,
    /// Manifest annotations (build tool).
    pub annotations: BTreeMap<String, String>,
}

impl SociIndex {
    /// A new index over `ztocs`.
    pub fn new(
        version: SociVersion,
        ztocs: Vec<Descriptor>,
        subject: Option<Descriptor>,
        build_tool: &str,
    ) -> Self {
        let annotations =
            BTreeMap::from([(ANNOTATION_BUILD_TOOL.to_string(), build_tool.to_string())]);
        SociIndex {
            version,
            ztocs,
            subject,
            annotations,
        }
    }

    /// Serialises as an OCI image manifest, exactly as upstream does.
    pub fn to_json(&self) -> Vec<u8> {
        let m = ImageManifest {
            schema_version: 2,
            media_type: Some(MEDIA_TYPE_OCI_MANIFEST.into()),
            artifact_type: None,
            config: Descriptor::new(
                self.version.artifact_type(),
                Digest::of(EMPTY_CONFIG),
                EMPTY_CONFIG.len() as u64,
            ),
            layers: self.ztocs.clone(),
            subject: self.subject.clone(),
            annotations: self.annotations.clone(),
        };
        to_go_json(&m)
    }

    /// Parses a SOCI index manifest.
    pub fn parse(bytes: &[u8]) -> Result<SociIndex, String> {
        let m: ImageManifest =
            serde_json::from_slice(bytes).map_err(|e| format!("invalid SOCI index JSON: {e}"))?;
        let version = match m.config.media_type.as_str() {
            ARTIFACT_TYPE_V1 => SociVersion::V1,
            ARTIFACT_TYPE_V2 => SociVersion::V2,
            other => return Err(format!("not a SOCI index (config media type {other:?})")),
        };
        for z in &m.layers {
            let d = z
                .annotations
                .get(ANNOTATION_LAYER_DIGEST)
                .map(String::as_str)
                .unwrap_or("");
            if Digest::parse(d).is_none() {
                return Err(format!(
                    "zTOC {} has no valid {ANNOTATION_LAYER_DIGEST} annotation",
                    z.digest
                ));
            }
        }
        Ok(SociIndex {
            version,
            ztocs: m.layers,
            subject: m.subject,
            annotations: m.annotations,
        })
    }

    /// The zTOC descriptor for an image layer digest (prefetch artifacts, listed in the same
    /// `layers` array with the same annotation, are not zTOCs).
    pub fn ztoc_for(&self, layer: &Digest) -> Option<&Descriptor> {
        self.ztocs.iter().find(|z| {
            z.media_type != crate::prefetch::MEDIA_TYPE_PREFETCH
                && z.annotations
                    .get(ANNOTATION_LAYER_DIGEST)
                    .map(String::as_str)
                    == Some(layer.as_str())
        })
    }
}

/// The descriptor of a zTOC blob for `layer`, with upstream's annotations.
pub fn ztoc_descriptor(
    ztoc_digest: Digest,
    ztoc_size: u64,
    layer: &Descriptor,
    span_size: u64,
    has_xattrs: bool,
) -> Descriptor {
    let mut d = Descriptor::new(MEDIA_TYPE_ZTOC, ztoc_digest, ztoc_size);
    d.annotations
        .insert(ANNOTATION_LAYER_MEDIA_TYPE.into(), layer.media_type.clone());
    d.annotations
        .insert(ANNOTATION_LAYER_DIGEST.into(), layer.digest.to_string());
    d.annotations
        .insert(ANNOTATION_SPAN_SIZE.into(), span_size.to_string());
    if !has_xattrs {
        d.annotations
            .insert(ANNOTATION_DISABLE_XATTRS.into(), "true".into());
    }
    d
}

/// Sets (or, for a zTOC without separable records, removes) the
/// [`ANNOTATION_CHECKPOINT_INDEX`] of `desc`, the descriptor of `ztoc` (its bytes).
pub fn annotate_checkpoint_index(
    desc: &mut Descriptor,
    ztoc: &[u8],
) -> Result<(), soci_ztoc::ZtocError> {
    use base64::Engine as _;
    match soci_ztoc::WindowIndex::of(ztoc)? {
        Some(idx) => {
            let v = base64::engine::general_purpose::STANDARD.encode(idx.encode());
            desc.annotations
                .insert(ANNOTATION_CHECKPOINT_INDEX.into(), v);
        }
        None => {
            desc.annotations.remove(ANNOTATION_CHECKPOINT_INDEX);
        }
    }
    Ok(())
}

/// The [`ANNOTATION_CHECKPOINT_INDEX`] of a zTOC descriptor: `None` without one, else the
/// index or why it is unusable.
pub fn checkpoint_index(desc: &Descriptor) -> Option<Result<soci_ztoc::WindowIndex, String>> {
    use base64::Engine as _;
    let v = desc.annotations.get(ANNOTATION_CHECKPOINT_INDEX)?;
    if v.len() > MAX_CHECKPOINT_INDEX_CHARS {
        return Some(Err(format!(
            "{ANNOTATION_CHECKPOINT_INDEX} of {} characters (at most {MAX_CHECKPOINT_INDEX_CHARS})",
            v.len()
        )));
    }
    Some(
        base64::engine::general_purpose::STANDARD
            .decode(v)
            .map_err(|e| format!("{ANNOTATION_CHECKPOINT_INDEX}: {e}"))
            .and_then(|b| soci_ztoc::WindowIndex::decode(&b).map_err(|e| e.to_string())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_json_round_trip_and_layout() {
        let layer = Descriptor::new(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            Digest::of(b"layer"),
            5,
        );
        let z = ztoc_descriptor(Digest::of(b"ztoc"), 4, &layer, 1 << 22, false);
        let idx = SociIndex::new(SociVersion::V2, vec![z], None, "AWS SOCI CLI v0.2");
        let json = idx.to_json();
        let s = String::from_utf8(json.clone()).unwrap();
        assert!(s.starts_with(r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.amazon.soci.index.v2+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[{"mediaType":"application/octet-stream""#), "{s}");
        assert!(
            s.ends_with(
                r#""annotations":{"com.amazon.soci.build-tool-identifier":"AWS SOCI CLI v0.2"}}"#
            ),
            "{s}"
        );
        let back = SociIndex::parse(&json).unwrap();
        assert_eq!(back, idx);
        assert!(back.ztoc_for(&layer.digest).is_some());
        assert!(SociIndex::parse(b"{}").is_err());
        assert!(SociIndex::parse(br#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#).is_err());
    }
}
