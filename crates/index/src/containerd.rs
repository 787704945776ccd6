//! containerd's image and content stores over gRPC, as an image store for `soci convert`,
//! `soci create` and friends.
//!
//! Upstream's `soci` reads the source image from containerd and writes its artifacts there by
//! default; we do the same. Two containerd rules shape this module:
//! - content written without a lease or a reference is garbage collected, so every write
//!   happens under a lease ([`Containerd::begin`]) and every manifest/index we write carries
//!   `containerd.io/gc.ref.content.*` labels naming its children, so that once the lease ends
//!   the image record keeps the whole graph alive;
//! - gRPC messages are bounded, so blobs are read and written in chunks.

use std::collections::HashMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use containerd_client::services::v1::{
    content_client::ContentClient, images_client::ImagesClient, leases_client::LeasesClient,
    CreateImageRequest, CreateRequest, DeleteContentRequest, DeleteRequest, GetImageRequest, Image,
    InfoRequest, ListContentRequest, ListImagesRequest, ReadContentRequest, UpdateImageRequest,
    UpdateRequest, WriteAction, WriteContentRequest,
};
use soci_registry::{Descriptor, Digest};
use tokio::io::AsyncWriteExt;
use tonic::transport::Channel;
use tonic::{Code, Request};

/// Chunk size for content writes (containerd's default max message is 16 MiB).
const WRITE_CHUNK: usize = 1 << 20;
/// Largest blob read into memory (manifests, configs, zTOCs).
const MAX_IN_MEMORY: usize = 512 << 20;
/// Label prefix that makes containerd's GC follow a content reference.
pub const GC_REF_CONTENT: &str = "containerd.io/gc.ref.content";

/// A containerd failure, naming the object.
#[derive(Debug, thiserror::Error)]
#[error("containerd: {what}: {message}")]
pub struct CtdError {
    /// What we were doing (names the image or digest).
    pub what: String,
    /// containerd's message.
    pub message: String,
    /// The object does not exist.
    pub not_found: bool,
}

fn err(what: impl Into<String>, s: tonic::Status) -> CtdError {
    CtdError {
        what: what.into(),
        not_found: s.code() == Code::NotFound,
        message: s.message().to_string(),
    }
}

/// A connection to containerd in one namespace, optionally holding a lease.
#[derive(Debug, Clone)]
pub struct Containerd {
    channel: Channel,
    namespace: String,
    lease: Option<String>,
}

impl Containerd {
    /// Connects to containerd's socket (`unix://` prefix accepted, as upstream).
    pub async fn connect(address: &str, namespace: &str) -> Result<Containerd, CtdError> {
        let path = address.strip_prefix("unix://").unwrap_or(address);
        let channel = containerd_client::connect(path)
            .await
            .map_err(|e| CtdError {
                what: format!("connecting to {path}"),
                message: e.to_string(),
                not_found: false,
            })?;
        Ok(Containerd {
            channel,
            namespace: namespace.into(),
            lease: None,
        })
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        let md = r.metadata_mut();
        if let Ok(v) = self.namespace.parse() {
            md.insert("containerd-namespace", v);
        }
        if let Some(l) = &self.lease {
            if let Ok(v) = l.parse() {
                md.insert("containerd-lease", v);
            }
        }
        r
    }

    /// Starts a lease (expiring after a day if we die) under which later writes are protected
    /// from GC until [`Containerd::end`].
    pub async fn begin(&mut self) -> Result<(), CtdError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let id = format!("soci-cli-{}-{now}", std::process::id());
        let mut labels = HashMap::new();
        let expire = soci_ztoc::format_mod_time((now / 1_000_000_000) as i64 + 86_400, 0);
        labels.insert("containerd.io/gc.expire".to_string(), expire);
        LeasesClient::new(self.channel.clone())
            .create(self.req(CreateRequest {
                id: id.clone(),
                labels,
            }))
            .await
            .map_err(|e| err("creating lease", e))?;
        self.lease = Some(id);
        Ok(())
    }

    /// Ends the lease started by [`Containerd::begin`] (content not referenced by then becomes
    /// collectable).
    pub async fn end(&mut self) -> Result<(), CtdError> {
        if let Some(id) = self.lease.take() {
            LeasesClient::new(self.channel.clone())
                .delete(self.req(DeleteRequest {
                    id: id.clone(),
                    sync: false,
                }))
                .await
                .map_err(|e| err(format!("deleting lease {id}"), e))?;
        }
        Ok(())
    }

    /// The image record `name`, or None.
    pub async fn get_image(&self, name: &str) -> Result<Option<Image>, CtdError> {
        match ImagesClient::new(self.channel.clone())
            .get(self.req(GetImageRequest { name: name.into() }))
            .await
        {
            Ok(r) => Ok(r.into_inner().image),
            Err(e) if e.code() == Code::NotFound => Ok(None),
            Err(e) => Err(err(format!("image {name}"), e)),
        }
    }

    /// The target descriptor of image `name`, or None.
    pub async fn image_target(&self, name: &str) -> Result<Option<Descriptor>, CtdError> {
        Ok(self
            .get_image(name)
            .await?
            .and_then(|i| i.target)
            .and_then(|t| {
                Digest::parse(&t.digest)
                    .map(|d| Descriptor::new(t.media_type, d, t.size.max(0) as u64))
            }))
    }

    /// Creates or updates image `name` to point at `target`, keeping its other labels and
    /// adding `labels`.
    pub async fn put_image(
        &self,
        name: &str,
        target: &Descriptor,
        labels: HashMap<String, String>,
    ) -> Result<(), CtdError> {
        let mut images = ImagesClient::new(self.channel.clone());
        let mut all = self
            .get_image(name)
            .await?
            .map(|i| i.labels)
            .unwrap_or_default();
        all.extend(labels);
        let image = Image {
            name: name.into(),
            labels: all,
            target: Some(containerd_client::types::Descriptor {
                media_type: target.media_type.clone(),
                digest: target.digest.to_string(),
                size: target.size as i64,
                annotations: HashMap::new(),
            }),
            created_at: None,
            updated_at: None,
        };
        match images
            .create(self.req(CreateImageRequest {
                image: Some(image.clone()),
                source_date_epoch: None,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Code::AlreadyExists => images
                .update(self.req(UpdateImageRequest {
                    image: Some(image),
                    update_mask: None,
                    source_date_epoch: None,
                }))
                .await
                .map(|_| ())
                .map_err(|e| err(format!("updating image {name}"), e)),
            Err(e) => Err(err(format!("creating image {name}"), e)),
        }
    }

    /// Size and labels of a blob, or None when absent.
    pub async fn info(
        &self,
        d: &Digest,
    ) -> Result<Option<(u64, HashMap<String, String>)>, CtdError> {
        match ContentClient::new(self.channel.clone())
            .info(self.req(InfoRequest {
                digest: d.to_string(),
            }))
            .await
        {
            Ok(r) => Ok(r
                .into_inner()
                .info
                .map(|i| (i.size.max(0) as u64, i.labels))),
            Err(e) if e.code() == Code::NotFound => Ok(None),
            Err(e) => Err(err(format!("content {d}"), e)),
        }
    }

    async fn read_stream(
        &self,
        d: &Digest,
        sink: &mut (dyn FnMut(&[u8]) -> Result<(), String> + Send),
    ) -> Result<(), CtdError> {
        let what = || format!("reading {d}");
        let mut s = ContentClient::new(self.channel.clone())
            .read(self.req(ReadContentRequest {
                digest: d.to_string(),
                offset: 0,
                size: 0,
            }))
            .await
            .map_err(|e| err(what(), e))?
            .into_inner();
        while let Some(m) = s.message().await.map_err(|e| err(what(), e))? {
            sink(&m.data).map_err(|message| CtdError {
                what: what(),
                message,
                not_found: false,
            })?;
        }
        Ok(())
    }

    /// Reads a blob into memory and checks its digest.
    pub async fn read(&self, d: &Digest) -> Result<Bytes, CtdError> {
        let mut out: Vec<u8> = Vec::new();
        self.read_stream(d, &mut |chunk| {
            if out.len() + chunk.len() > MAX_IN_MEMORY {
                return Err(format!("larger than {MAX_IN_MEMORY} bytes"));
            }
            out.extend_from_slice(chunk);
            Ok(())
        })
        .await?;
        let actual = Digest::of(&out);
        if &actual != d {
            return Err(CtdError {
                what: format!("reading {d}"),
                message: format!("digest mismatch, content is {actual}"),
                not_found: false,
            });
        }
        Ok(Bytes::from(out))
    }

    /// Copies a blob into a file and checks its digest.
    pub async fn read_to_file(&self, d: &Digest, path: &Path) -> Result<(), CtdError> {
        use sha2::Digest as _;
        let io = |e: std::io::Error| CtdError {
            what: format!("writing {d} to {}", path.display()),
            message: e.to_string(),
            not_found: false,
        };
        let mut hasher = sha2::Sha256::new();
        let mut buf = Vec::new();
        let mut f = tokio::fs::File::create(path).await.map_err(io)?;
        // Stream into memory-bounded chunks written as they arrive.
        let mut s = ContentClient::new(self.channel.clone())
            .read(self.req(ReadContentRequest {
                digest: d.to_string(),
                offset: 0,
                size: 0,
            }))
            .await
            .map_err(|e| err(format!("reading {d}"), e))?
            .into_inner();
        while let Some(m) = s
            .message()
            .await
            .map_err(|e| err(format!("reading {d}"), e))?
        {
            hasher.update(&m.data);
            buf.clear();
            buf.extend_from_slice(&m.data);
            f.write_all(&buf).await.map_err(io)?;
        }
        f.flush().await.map_err(io)?;
        let actual = Digest::from_hasher(hasher);
        if &actual != d {
            return Err(CtdError {
                what: format!("reading {d}"),
                message: format!("digest mismatch, content is {actual}"),
                not_found: false,
            });
        }
        Ok(())
    }

    /// Writes a blob with `labels` (or, when it exists, adds the labels to it).
    pub async fn write(
        &self,
        d: &Digest,
        data: Bytes,
        labels: HashMap<String, String>,
    ) -> Result<(), CtdError> {
        if self.info(d).await?.is_some() {
            return self.label(d, labels).await;
        }
        let total = data.len() as i64;
        let r#ref = format!("soci-cli-{}", d.hex());
        let mut msgs = Vec::new();
        let mut offset = 0usize;
        loop {
            let end = (offset + WRITE_CHUNK).min(data.len());
            let last = end == data.len();
            msgs.push(WriteContentRequest {
                action: if last {
                    WriteAction::Commit as i32
                } else {
                    WriteAction::Write as i32
                },
                r#ref: r#ref.clone(),
                total,
                expected: d.to_string(),
                offset: offset as i64,
                data: data[offset..end].to_vec(),
                labels: if last { labels.clone() } else { HashMap::new() },
            });
            if last {
                break;
            }
            offset = end;
        }
        let mut content = ContentClient::new(self.channel.clone());
        match content.write(self.req(tokio_stream::iter(msgs))).await {
            Ok(resp) => {
                let mut s = resp.into_inner();
                loop {
                    match s.message().await {
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(e) if e.code() == Code::AlreadyExists => {
                            return self.label(d, labels).await
                        }
                        Err(e) => return Err(err(format!("writing {d}"), e)),
                    }
                }
                Ok(())
            }
            Err(e) if e.code() == Code::AlreadyExists => self.label(d, labels).await,
            Err(e) => Err(err(format!("writing {d}"), e)),
        }
    }

    /// Adds labels to an existing blob.
    pub async fn label(&self, d: &Digest, labels: HashMap<String, String>) -> Result<(), CtdError> {
        if labels.is_empty() {
            return Ok(());
        }
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        let info = containerd_client::services::v1::Info {
            digest: d.to_string(),
            labels,
            ..Default::default()
        };
        ContentClient::new(self.channel.clone())
            .update(self.req(UpdateRequest {
                info: Some(info),
                update_mask: Some(prost_types::FieldMask { paths }),
            }))
            .await
            .map(|_| ())
            .map_err(|e| err(format!("labelling {d}"), e))
    }

    /// Every blob in the namespace: digest and size.
    pub async fn list(&self) -> Result<Vec<(Digest, u64)>, CtdError> {
        let mut s = ContentClient::new(self.channel.clone())
            .list(self.req(ListContentRequest { filters: vec![] }))
            .await
            .map_err(|e| err("listing content", e))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(m) = s.message().await.map_err(|e| err("listing content", e))? {
            out.extend(
                m.info
                    .into_iter()
                    .filter_map(|i| Digest::parse(&i.digest).map(|d| (d, i.size.max(0) as u64))),
            );
        }
        Ok(out)
    }

    /// Names of the images whose target is `digest`.
    pub async fn images_with_target(&self, digest: &str) -> Result<Vec<String>, CtdError> {
        let r = ImagesClient::new(self.channel.clone())
            .list(self.req(ListImagesRequest {
                filters: vec![format!("target.digest=={digest}")],
            }))
            .await
            .map_err(|e| err("listing images", e))?;
        Ok(r.into_inner().images.into_iter().map(|i| i.name).collect())
    }

    /// Deletes a blob (absent is fine).
    pub async fn delete(&self, d: &Digest) -> Result<(), CtdError> {
        match ContentClient::new(self.channel.clone())
            .delete(self.req(DeleteContentRequest {
                digest: d.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Code::NotFound => Ok(()),
            Err(e) => Err(err(format!("deleting {d}"), e)),
        }
    }
}

/// The GC labels a manifest or index needs so containerd keeps what it references:
/// `m.<i>` for index entries, `config` and `l.<i>` for manifest config and layers (upstream
/// and containerd's own names).
pub fn gc_labels(body: &[u8]) -> HashMap<String, String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(default)]
        manifests: Vec<Descriptor>,
        config: Option<Descriptor>,
        #[serde(default)]
        layers: Vec<Descriptor>,
    }
    let mut out = HashMap::new();
    let Ok(p) = serde_json::from_slice::<Probe>(body) else {
        return out;
    };
    for (i, d) in p.manifests.iter().enumerate() {
        out.insert(format!("{GC_REF_CONTENT}.m.{i}"), d.digest.to_string());
    }
    if let Some(c) = p.config {
        out.insert(format!("{GC_REF_CONTENT}.config"), c.digest.to_string());
    }
    for (i, d) in p.layers.iter().enumerate() {
        out.insert(format!("{GC_REF_CONTENT}.l.{i}"), d.digest.to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gc_labels_name_every_child() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        let idx = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"x","digest":"{a}","size":1}},{{"mediaType":"y","digest":"{b}","size":1}}]}}"#
        );
        let l = gc_labels(idx.as_bytes());
        assert_eq!(l["containerd.io/gc.ref.content.m.0"], a.to_string());
        assert_eq!(l["containerd.io/gc.ref.content.m.1"], b.to_string());
        let m = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"c","digest":"{a}","size":2}},"layers":[{{"mediaType":"l","digest":"{b}","size":3}}]}}"#
        );
        let l = gc_labels(m.as_bytes());
        assert_eq!(l["containerd.io/gc.ref.content.config"], a.to_string());
        assert_eq!(l["containerd.io/gc.ref.content.l.0"], b.to_string());
        assert_eq!(l.len(), 2);
        assert!(gc_labels(b"not json").is_empty());
    }
}
