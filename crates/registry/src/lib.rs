//! OCI distribution client for soci-rs: resolve tags, fetch manifests and blobs (whole, or by
//! HTTP range), push blobs and manifests, with anonymous, basic and bearer-token auth
//! (credentials from the docker config file and credential helpers), containerd `hosts.toml`
//! mirrors, plain-HTTP hosts, timeouts, and bounded retries with backoff. Every manifest and
//! whole blob read is checked against its digest.

pub mod auth;
mod blobs;
mod chunked;
mod client;
pub mod digest;
mod error;
pub mod hosts;
pub mod keychain;
pub mod oci;
mod push;
pub mod reference;
mod warm;

pub use blobs::{BlobStream, MAX_BLOB_IN_MEMORY};
pub use chunked::{ChunkedDownload, ChunkedStats};
pub use client::{Client, ClientOptions};
pub use digest::Digest;
pub use error::{RegistryError, Result};
pub use hosts::{Endpoint, HostsConfig, Mirror};
pub use keychain::{CredentialSource, Keychain};
pub use oci::{Descriptor, ImageIndex, ImageManifest, Platform};
pub use reference::{Reference, Repository};
