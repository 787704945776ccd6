//! Where images live: containerd's image and content store, a registry repository, or an OCI
//! image layout directory. One enum so conversion code is written once for every pair.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use soci_registry::oci::{to_go_json, MEDIA_TYPE_OCI_INDEX};
use soci_registry::{Client, Descriptor, Digest, ImageIndex, Reference, RegistryError, Repository};

use crate::containerd::{gc_labels, Containerd};

/// Failure reading or writing an image store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Registry failure.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// OCI layout problem.
    #[error("OCI layout {dir}: {message}")]
    Layout {
        /// Layout directory.
        dir: String,
        /// What went wrong.
        message: String,
    },
    /// Invalid location string.
    #[error("{0}")]
    Location(String),
    /// containerd failure.
    #[error(transparent)]
    Containerd(#[from] crate::containerd::CtdError),
}

/// An image location given by a user: `oci:DIR[:TAG]` or a registry reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageLocation {
    /// OCI image layout directory and tag (`org.opencontainers.image.ref.name`).
    Layout {
        /// Directory.
        dir: PathBuf,
        /// Tag, default `latest`.
        tag: String,
    },
    /// Registry reference.
    Registry(Reference),
    /// An image name in containerd's image store.
    Containerd {
        /// Image name (a tagged reference, as containerd stores it).
        name: String,
    },
}

/// Prefix that selects a registry in `soci convert` (skopeo's spelling).
pub const REGISTRY_PREFIX: &str = "docker://";
/// Prefix that selects an OCI image layout directory.
pub const LAYOUT_PREFIX: &str = "oci:";

impl ImageLocation {
    /// Parses `oci:DIR[:TAG]` or a registry reference.
    pub fn parse(s: &str) -> Result<ImageLocation, StoreError> {
        if let Some(rest) = s.strip_prefix("oci:") {
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((d, t)) if !t.contains('/') && !d.is_empty() => (d, t),
                _ => (rest, "latest"),
            };
            if dir.is_empty() {
                return Err(StoreError::Location(format!(
                    "invalid OCI layout location {s:?}"
                )));
            }
            return Ok(ImageLocation::Layout {
                dir: dir.into(),
                tag: tag.into(),
            });
        }
        Reference::parse(s)
            .map(ImageLocation::Registry)
            .map_err(StoreError::Location)
    }

    /// Parses the `soci convert` spelling, which follows upstream: a plain name is an image in
    /// containerd's store; `docker://REF` is a registry; `oci:DIR[:TAG]` is an OCI layout.
    pub fn parse_explicit(s: &str) -> Result<ImageLocation, StoreError> {
        if let Some(r) = s.strip_prefix(REGISTRY_PREFIX) {
            return Reference::parse(r)
                .map(ImageLocation::Registry)
                .map_err(StoreError::Location);
        }
        if s.starts_with(LAYOUT_PREFIX) {
            return ImageLocation::parse(s);
        }
        if s.is_empty() || s.contains("://") {
            return Err(StoreError::Location(format!(
                "invalid image {s:?}: use an image name in containerd, docker://REF or oci:DIR[:TAG]"
            )));
        }
        Ok(ImageLocation::Containerd { name: s.into() })
    }

    /// The tag or digest to resolve.
    pub fn object(&self) -> String {
        match self {
            ImageLocation::Layout { tag, .. } => tag.clone(),
            ImageLocation::Registry(r) => r.object(),
            ImageLocation::Containerd { name } => name.clone(),
        }
    }
}

/// An image store.
#[derive(Clone)]
pub enum ImageStore {
    /// A repository in a registry.
    Registry {
        /// Shared client.
        client: Arc<Client>,
        /// Repository.
        repo: Repository,
    },
    /// An OCI image layout directory.
    Layout {
        /// Directory.
        dir: PathBuf,
    },
    /// containerd's content and image store (one namespace).
    Containerd(Arc<Containerd>),
}

fn layout_err(dir: &Path, message: impl Into<String>) -> StoreError {
    StoreError::Layout {
        dir: dir.display().to_string(),
        message: message.into(),
    }
}

impl ImageStore {
    /// The store of a location (`ctd` serves [`ImageLocation::Containerd`]).
    pub fn open(
        loc: &ImageLocation,
        client: Arc<Client>,
        ctd: Option<Arc<Containerd>>,
    ) -> Result<ImageStore, StoreError> {
        Ok(match loc {
            ImageLocation::Layout { dir, .. } => ImageStore::Layout { dir: dir.clone() },
            ImageLocation::Registry(r) => ImageStore::Registry {
                client,
                repo: r.repository.clone(),
            },
            ImageLocation::Containerd { .. } => ImageStore::Containerd(ctd.ok_or_else(|| {
                StoreError::Location("no containerd connection for a containerd image".into())
            })?),
        })
    }

    /// Whether two stores are the same place.
    pub fn same_as(&self, other: &ImageStore) -> bool {
        match (self, other) {
            (ImageStore::Registry { repo: a, .. }, ImageStore::Registry { repo: b, .. }) => a == b,
            (ImageStore::Layout { dir: a }, ImageStore::Layout { dir: b }) => a == b,
            (ImageStore::Containerd(a), ImageStore::Containerd(b)) => {
                a.namespace() == b.namespace()
            }
            _ => false,
        }
    }

    fn blob_path(dir: &Path, d: &Digest) -> PathBuf {
        dir.join("blobs/sha256").join(d.hex())
    }

    fn read_layout_index(dir: &Path) -> Result<ImageIndex, StoreError> {
        let p = dir.join("index.json");
        match std::fs::read(&p) {
            Ok(b) => {
                serde_json::from_slice(&b).map_err(|e| layout_err(dir, format!("index.json: {e}")))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ImageIndex {
                schema_version: 2,
                media_type: Some(MEDIA_TYPE_OCI_INDEX.into()),
                artifact_type: None,
                manifests: Vec::new(),
                subject: None,
                annotations: Default::default(),
            }),
            Err(e) => Err(layout_err(dir, format!("index.json: {e}"))),
        }
    }

    /// Fetches a manifest or index by tag or digest (digest-verified).
    pub async fn get_manifest(&self, object: &str) -> Result<(Descriptor, Bytes), StoreError> {
        match self {
            ImageStore::Registry { client, repo } => Ok(client.get_manifest(repo, object).await?),
            ImageStore::Layout { dir } => {
                let desc = match Digest::parse(object) {
                    Some(d) => {
                        let bytes = self.read_layout_blob(&d).await?;
                        return Ok((probe_descriptor(&bytes, d), bytes));
                    }
                    None => Self::read_layout_index(dir)?
                        .manifests
                        .into_iter()
                        .find(|m| {
                            m.annotations
                                .get("org.opencontainers.image.ref.name")
                                .map(String::as_str)
                                == Some(object)
                        })
                        .ok_or_else(|| layout_err(dir, format!("no image tagged {object:?}")))?,
                };
                let bytes = self.read_layout_blob(&desc.digest).await?;
                Ok((
                    Descriptor::new(desc.media_type, desc.digest, bytes.len() as u64),
                    bytes,
                ))
            }
            ImageStore::Containerd(c) => {
                if let Some(d) = Digest::parse(object) {
                    let bytes = c.read(&d).await?;
                    return Ok((probe_descriptor(&bytes, d), bytes));
                }
                let desc = c.image_target(object).await?.ok_or_else(|| {
                    StoreError::Location(format!(
                        "image {object:?} not found in containerd namespace {:?}",
                        c.namespace()
                    ))
                })?;
                let bytes = c.read(&desc.digest).await?;
                Ok((
                    Descriptor::new(desc.media_type, desc.digest, bytes.len() as u64),
                    bytes,
                ))
            }
        }
    }

    async fn read_layout_blob(&self, d: &Digest) -> Result<Bytes, StoreError> {
        let ImageStore::Layout { dir } = self else {
            unreachable!("layout only")
        };
        let bytes = tokio::fs::read(Self::blob_path(dir, d))
            .await
            .map_err(|e| layout_err(dir, format!("blob {d}: {e}")))?;
        let actual = Digest::of(&bytes);
        if &actual != d {
            return Err(layout_err(
                dir,
                format!("blob {d}: digest mismatch, content is {actual}"),
            ));
        }
        Ok(Bytes::from(bytes))
    }

    /// Fetches a small blob into memory (verified).
    pub async fn get_blob(&self, desc: &Descriptor) -> Result<Bytes, StoreError> {
        match self {
            ImageStore::Registry { client, repo } => Ok(client.get_blob(repo, desc).await?),
            ImageStore::Layout { .. } => self.read_layout_blob(&desc.digest).await,
            ImageStore::Containerd(c) => Ok(c.read(&desc.digest).await?),
        }
    }

    /// Copies a blob into a local file (verified).
    pub async fn get_blob_to_file(&self, desc: &Descriptor, path: &Path) -> Result<(), StoreError> {
        let io = |e: std::io::Error| layout_err(path, e.to_string());
        match self {
            ImageStore::Registry { client, repo } => {
                let mut f = tokio::fs::File::create(path).await.map_err(io)?;
                client.get_blob_to(repo, desc, &mut f).await?;
                Ok(())
            }
            ImageStore::Layout { dir } => {
                let src = Self::blob_path(dir, &desc.digest);
                tokio::fs::copy(&src, path)
                    .await
                    .map_err(|e| layout_err(dir, format!("blob {}: {e}", desc.digest)))?;
                let d = desc.digest.clone();
                let p = path.to_path_buf();
                let actual = tokio::task::spawn_blocking(move || file_digest(&p))
                    .await
                    .map_err(|e| layout_err(dir, e.to_string()))?
                    .map_err(io)?;
                if actual != d {
                    return Err(layout_err(
                        dir,
                        format!("blob {d}: digest mismatch, content is {actual}"),
                    ));
                }
                Ok(())
            }
            ImageStore::Containerd(c) => Ok(c.read_to_file(&desc.digest, path).await?),
        }
    }

    /// Whether the store has a blob.
    pub async fn has_blob(&self, d: &Digest) -> Result<bool, StoreError> {
        match self {
            ImageStore::Registry { client, repo } => Ok(client.blob_size(repo, d).await?.is_some()),
            ImageStore::Layout { dir } => Ok(Self::blob_path(dir, d).exists()),
            ImageStore::Containerd(c) => Ok(c.info(d).await?.is_some()),
        }
    }

    /// Stores a blob from memory.
    pub async fn put_blob(&self, d: &Digest, data: Bytes) -> Result<(), StoreError> {
        match self {
            ImageStore::Registry { client, repo } => Ok(client.push_blob(repo, d, data).await?),
            ImageStore::Containerd(c) => Ok(c.write(d, data, Default::default()).await?),
            ImageStore::Layout { dir } => {
                let p = Self::blob_path(dir, d);
                let parent = p.parent().expect("blob path has a parent").to_path_buf();
                tokio::fs::create_dir_all(&parent)
                    .await
                    .map_err(|e| layout_err(dir, e.to_string()))?;
                let tmp = p.with_extension("tmp");
                tokio::fs::write(&tmp, &data)
                    .await
                    .map_err(|e| layout_err(dir, e.to_string()))?;
                tokio::fs::rename(&tmp, &p)
                    .await
                    .map_err(|e| layout_err(dir, e.to_string()))?;
                let layout = dir.join("oci-layout");
                if !layout.exists() {
                    tokio::fs::write(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)
                        .await
                        .map_err(|e| layout_err(dir, e.to_string()))?;
                }
                Ok(())
            }
        }
    }

    /// Copies a blob from `src` unless present (cross-repository mount when possible).
    pub async fn copy_blob_from(
        &self,
        src: &ImageStore,
        desc: &Descriptor,
        tmp_dir: &Path,
    ) -> Result<(), StoreError> {
        if self.same_as(src) || self.has_blob(&desc.digest).await? {
            return Ok(());
        }
        if let (ImageStore::Registry { client, repo }, ImageStore::Registry { repo: from, .. }) =
            (self, src)
        {
            if client.mount_blob(repo, from, &desc.digest).await? {
                return Ok(());
            }
        }
        let tmp = tempfile::NamedTempFile::new_in(tmp_dir)
            .map_err(|e| layout_err(tmp_dir, e.to_string()))?;
        src.get_blob_to_file(desc, tmp.path()).await?;
        match self {
            ImageStore::Registry { client, repo } => Ok(client
                .push_blob_file(repo, &desc.digest, tmp.path())
                .await?),
            ImageStore::Layout { dir } => {
                let p = Self::blob_path(dir, &desc.digest);
                tokio::fs::create_dir_all(p.parent().expect("parent"))
                    .await
                    .map_err(|e| layout_err(dir, e.to_string()))?;
                tokio::fs::copy(tmp.path(), &p)
                    .await
                    .map_err(|e| layout_err(dir, e.to_string()))?;
                Ok(())
            }
            ImageStore::Containerd(c) => {
                let data = tokio::fs::read(tmp.path())
                    .await
                    .map_err(|e| layout_err(tmp_dir, e.to_string()))?;
                Ok(c.write(&desc.digest, Bytes::from(data), Default::default())
                    .await?)
            }
        }
    }

    /// Deletes a blob (containerd and OCI layout stores; absent is fine).
    pub async fn delete_blob(&self, d: &Digest) -> Result<(), StoreError> {
        match self {
            ImageStore::Containerd(c) => Ok(c.delete(d).await?),
            ImageStore::Layout { dir } => match std::fs::remove_file(Self::blob_path(dir, d)) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(layout_err(dir, format!("deleting {d}: {e}"))),
            },
            ImageStore::Registry { repo, .. } => Err(StoreError::Location(format!(
                "deleting {d} from registry {}/{} is not supported",
                repo.registry, repo.name
            ))),
        }
    }

    /// Stores a manifest; with `tag`, also points the tag at it. Returns its digest.
    pub async fn put_manifest(
        &self,
        tag: Option<&str>,
        media_type: &str,
        body: Bytes,
    ) -> Result<Digest, StoreError> {
        let digest = Digest::of(&body);
        match self {
            ImageStore::Registry { client, repo } => {
                let object = tag
                    .map(str::to_string)
                    .unwrap_or_else(|| digest.to_string());
                Ok(client.put_manifest(repo, &object, media_type, body).await?)
            }
            ImageStore::Containerd(c) => {
                let size = body.len() as u64;
                let labels = gc_labels(&body);
                c.write(&digest, body, labels).await?;
                if let Some(name) = tag {
                    let target = Descriptor::new(media_type, digest.clone(), size);
                    c.put_image(name, &target, Default::default()).await?;
                }
                Ok(digest)
            }
            ImageStore::Layout { dir } => {
                let size = body.len() as u64;
                self.put_blob(&digest, body).await?;
                if let Some(tag) = tag {
                    let mut idx = Self::read_layout_index(dir)?;
                    idx.manifests.retain(|m| {
                        m.annotations
                            .get("org.opencontainers.image.ref.name")
                            .map(String::as_str)
                            != Some(tag)
                    });
                    let mut d = Descriptor::new(media_type, digest.clone(), size);
                    d.annotations
                        .insert("org.opencontainers.image.ref.name".into(), tag.into());
                    idx.manifests.push(d);
                    std::fs::write(dir.join("index.json"), to_go_json(&idx))
                        .map_err(|e| layout_err(dir, e.to_string()))?;
                }
                Ok(digest)
            }
        }
    }
}

/// A descriptor for manifest bytes whose media type is read from the JSON.
fn probe_descriptor(bytes: &[u8], digest: Digest) -> Descriptor {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    let mt = serde_json::from_slice::<Probe>(bytes)
        .ok()
        .map(|p| {
            p.media_type.unwrap_or_else(|| {
                if p.manifests.is_some() {
                    MEDIA_TYPE_OCI_INDEX.into()
                } else {
                    soci_registry::oci::MEDIA_TYPE_OCI_MANIFEST.into()
                }
            })
        })
        .unwrap_or_default();
    Descriptor::new(mt, digest, bytes.len() as u64)
}

fn file_digest(p: &Path) -> std::io::Result<Digest> {
    use sha2::Digest as _;
    use std::io::Read;
    let mut f = std::fs::File::open(p)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Digest::from_hasher(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        assert_eq!(
            ImageLocation::parse("oci:/tmp/x:v1").unwrap(),
            ImageLocation::Layout {
                dir: "/tmp/x".into(),
                tag: "v1".into()
            }
        );
        assert_eq!(
            ImageLocation::parse("oci:rel/dir").unwrap(),
            ImageLocation::Layout {
                dir: "rel/dir".into(),
                tag: "latest".into()
            }
        );
        assert!(matches!(
            ImageLocation::parse("127.0.0.1:5000/a:b").unwrap(),
            ImageLocation::Registry(_)
        ));
        assert!(ImageLocation::parse("oci:").is_err());
    }
}
