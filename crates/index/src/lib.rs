//! SOCI index manifests (v1 and v2), the v2 image-index binding, discovery of a SOCI index
//! from an image reference, and conversion of an image into a SOCI-enabled image.
//!
//! Facts follow upstream soci-snapshotter so upstream tools read our artifacts and we read
//! theirs: media types, annotations, the `{}` config blob, and Go's JSON layout.

pub mod containerd;
mod convert;
mod discover;
pub mod labels;
mod local;
pub mod platform;
pub mod prefetch;
pub mod record;
mod soci;
mod store;

pub use convert::{
    convert, index_layers, ConvertError, ConvertOptions, ConvertReport, PlatformReport,
    PlatformSelection,
};
pub use discover::{discover, DiscoverOptions, NoSoci, SociImage};
pub use local::{now_secs, ArtifactEntry, ArtifactKind, ArtifactsDb, LocalError};
pub use soci::*;
pub use store::{ImageLocation, ImageStore, StoreError, LAYOUT_PREFIX, REGISTRY_PREFIX};
