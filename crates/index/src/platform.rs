//! Which entry of an image index is the image manifest for a platform.
//!
//! Why one place: the daemon (discovery, full pulls) and the CLI (rpull, image mode,
//! convert's platform list) each picked the entry themselves, with slightly different rules
//! (one skipped SOCI index entries, one did not check the media type). The rule lives here
//! once: an image entry is an image manifest that is not an artifact (no `artifactType`, not
//! a SOCI index bound to the image); the first one whose platform matches, or that names no
//! platform, serves it.

use soci_registry::oci::is_manifest;
use soci_registry::{Descriptor, ImageIndex, Platform};

use crate::ANNOTATION_IMAGE_MANIFEST_DIGEST;

/// Whether an image-index entry is an image manifest (not a SOCI index or another artifact).
pub fn is_image_entry(d: &Descriptor) -> bool {
    is_manifest(&d.media_type)
        && d.artifact_type.is_none()
        && !d.annotations.contains_key(ANNOTATION_IMAGE_MANIFEST_DIGEST)
}

/// The image manifests of `idx`, in index order.
pub fn image_entries(idx: &ImageIndex) -> impl Iterator<Item = &Descriptor> {
    idx.manifests.iter().filter(|d| is_image_entry(d))
}

/// The image manifest of `idx` for `platform`: the first image entry whose platform matches
/// it or that names none.
pub fn manifest_for<'a>(idx: &'a ImageIndex, platform: &Platform) -> Option<&'a Descriptor> {
    image_entries(idx).find(|d| d.platform.as_ref().is_none_or(|p| p.matches(platform)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use soci_registry::Digest;

    fn entry(n: u8, platform: Option<&str>) -> Descriptor {
        let mut d = Descriptor::new(
            "application/vnd.oci.image.manifest.v1+json",
            Digest::parse(&format!("sha256:{}", format!("{n:02x}").repeat(32))).unwrap(),
            1,
        );
        d.platform = platform.and_then(Platform::parse);
        d
    }

    fn index(manifests: Vec<Descriptor>) -> ImageIndex {
        ImageIndex {
            schema_version: 2,
            media_type: None,
            artifact_type: None,
            manifests,
            subject: None,
            annotations: Default::default(),
        }
    }

    #[test]
    fn picks_the_first_matching_platform() {
        let idx = index(vec![
            entry(1, Some("linux/arm64")),
            entry(2, Some("linux/amd64")),
            entry(3, Some("linux/amd64")),
        ]);
        let amd = Platform::parse("linux/amd64").unwrap();
        assert_eq!(manifest_for(&idx, &amd), Some(&idx.manifests[1]));
        let arm = Platform::parse("linux/arm64/v8").unwrap();
        assert_eq!(manifest_for(&idx, &arm), Some(&idx.manifests[0]));
        let s390 = Platform::parse("linux/s390x").unwrap();
        assert_eq!(manifest_for(&idx, &s390), None);
    }

    #[test]
    fn an_entry_without_platform_serves_any() {
        let idx = index(vec![entry(1, None)]);
        let amd = Platform::parse("linux/amd64").unwrap();
        assert_eq!(manifest_for(&idx, &amd), Some(&idx.manifests[0]));
    }

    #[test]
    fn artifacts_and_soci_indexes_are_skipped() {
        let mut soci = entry(1, None);
        soci.artifact_type = Some(crate::ARTIFACT_TYPE_V2.into());
        let mut bound = entry(2, None);
        bound
            .annotations
            .insert(ANNOTATION_IMAGE_MANIFEST_DIGEST.into(), "sha256:x".into());
        let mut nested = entry(3, None);
        nested.media_type = "application/vnd.oci.image.index.v1+json".into();
        let image = entry(4, Some("linux/amd64"));
        let idx = index(vec![soci, bound, nested, image]);
        let amd = Platform::parse("linux/amd64").unwrap();
        assert_eq!(manifest_for(&idx, &amd), Some(&idx.manifests[3]));
        assert_eq!(image_entries(&idx).count(), 1);
    }
}
