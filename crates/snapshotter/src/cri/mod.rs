//! The CRI keychain: the daemon serves the CRI v1 `ImageService` on its own socket, as
//! upstream soci-snapshotter does (`[cri_keychain] enable_keychain`), the kubelet is pointed
//! at it (`--image-service-endpoint=unix:///run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock`),
//! and every call is forwarded to containerd's CRI plugin (`image_service_path`).
//!
//! Why: on Kubernetes nodes the credentials of private images (imagePullSecrets, kubelet
//! credential providers) exist only in the kubelet's PullImage request. containerd uses them
//! for its own requests, but the snapshotter, which fetches lazy layers long after the pull,
//! never sees them. The proxy keeps each PullImage's `AuthConfig` for that image's registry
//! and repository ([`store::CredentialStore`]), and the registry client asks the store first.

pub mod store;

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use soci_registry::Keychain;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::proto::runtime::v1 as cri;
use cri::image_service_client::ImageServiceClient;
pub use store::CredentialStore;

/// `Debug` of the CRI `AuthConfig` (generated without one): never prints a secret.
impl std::fmt::Debug for cri::AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |s: &str| if s.is_empty() { "" } else { "<redacted>" };
        f.debug_struct("AuthConfig")
            .field("username", &self.username)
            .field("password", &set(&self.password))
            .field("auth", &set(&self.auth))
            .field("server_address", &self.server_address)
            .field("identity_token", &set(&self.identity_token))
            .field("registry_token", &set(&self.registry_token))
            .finish()
    }
}

/// The registry client's keychain for this config: the CRI credential store first (when
/// enabled: per image, the credentials containerd itself pulled with), then the docker config
/// file (read again when it changes). Returns the store too, for the proxy.
pub fn keychain(root: &Path, cfg: &Config) -> (Keychain, Option<Arc<CredentialStore>>) {
    let mut kc = Keychain::docker_default();
    if !cfg.cri_keychain.enable_keychain {
        return (kc, None);
    }
    let ttl = Duration::from_secs(cfg.cri_keychain.credentials_ttl_sec);
    let store = Arc::new(CredentialStore::open(root, ttl));
    kc = kc.with_first(store.clone());
    (kc, Some(store))
}

/// Longest a forwarded call other than a pull may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest a forwarded PullImage may take (the kubelet's own deadline usually ends it first).
const PULL_TIMEOUT: Duration = Duration::from_secs(2 * 3600);
/// Longest wait to connect to containerd's socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The `runtime.v1.ImageService` proxy.
pub struct ImageProxy {
    backend: PathBuf,
    channel: tokio::sync::Mutex<Option<Channel>>,
    store: Arc<CredentialStore>,
}

impl ImageProxy {
    /// A proxy to containerd's CRI socket `backend`, keeping credentials in `store`.
    pub fn new(backend: PathBuf, store: Arc<CredentialStore>) -> ImageProxy {
        ImageProxy {
            backend,
            channel: tokio::sync::Mutex::new(None),
            store,
        }
    }

    /// A client of containerd's ImageService; connects on first use (containerd may start
    /// after the daemon) and keeps the channel, which reconnects by itself.
    async fn backend(&self) -> Result<ImageServiceClient<Channel>, Status> {
        let mut ch = self.channel.lock().await;
        if let Some(c) = ch.as_ref() {
            return Ok(ImageServiceClient::new(c.clone()));
        }
        let unavailable = |e: String| {
            Status::unavailable(format!(
                "containerd CRI image service at {} (cri_keychain.image_service_path): {e}",
                self.backend.display()
            ))
        };
        let c = tokio::time::timeout(CONNECT_TIMEOUT, containerd_client::connect(&self.backend))
            .await
            .map_err(|_| unavailable("connect timed out".into()))?
            .map_err(|e| unavailable(e.to_string()))?;
        info!(backend = %self.backend.display(), "connected to containerd's CRI image service");
        *ch = Some(c.clone());
        Ok(ImageServiceClient::new(c))
    }
}

/// Forwards `req`'s message (with its `grpc-timeout`, so containerd sees the caller's
/// deadline) within `limit`.
fn forward<T>(req: Request<T>, limit: Duration) -> Request<T> {
    let timeout = req.metadata().get("grpc-timeout").cloned();
    let mut out = Request::new(req.into_inner());
    if let Some(t) = timeout {
        out.metadata_mut().insert("grpc-timeout", t);
    }
    out.set_timeout(limit);
    out
}

/// A rejected-credentials error from containerd, made to say so and name the registry.
fn explain_pull_error(status: Status, image: &str) -> Status {
    let msg = status.message().to_ascii_lowercase();
    if msg.contains("authentication to ") {
        // The snapshotter's own registry error: it already names the registry and the cause.
        return status;
    }
    let auth = ["401", "403", "unauthorized", "forbidden", "authoriz"]
        .iter()
        .any(|k| msg.contains(k));
    if !auth {
        return status;
    }
    let registry = store::normalize_image(image)
        .map(|(_, r)| r.repository.registry)
        .unwrap_or_else(|_| image.to_string());
    Status::new(
        status.code(),
        format!(
            "registry {registry} rejected the credentials of the PullImage request for {image}: {}",
            status.message()
        ),
    )
}

type ImageStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<cri::StreamImagesResponse, Status>> + Send>>;

#[tonic::async_trait]
impl cri::image_service_server::ImageService for ImageProxy {
    async fn list_images(
        &self,
        req: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        self.backend()
            .await?
            .list_images(forward(req, CALL_TIMEOUT))
            .await
    }

    type StreamImagesStream = ImageStream;

    async fn stream_images(
        &self,
        req: Request<cri::StreamImagesRequest>,
    ) -> Result<Response<Self::StreamImagesStream>, Status> {
        let s = self
            .backend()
            .await?
            .stream_images(forward(req, CALL_TIMEOUT))
            .await?
            .into_inner();
        Ok(Response::new(Box::pin(s) as ImageStream))
    }

    async fn image_status(
        &self,
        req: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        self.backend()
            .await?
            .image_status(forward(req, CALL_TIMEOUT))
            .await
    }

    async fn pull_image(
        &self,
        req: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let mut backend = self.backend().await?;
        let image = req
            .get_ref()
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        // Kept before forwarding: containerd prepares the image's snapshots during the pull.
        let replaced = self
            .store
            .remember(&image, req.get_ref().auth.as_ref())
            .map_err(Status::invalid_argument)?;
        debug!(image, with_auth = req.get_ref().auth.is_some(), "PullImage");
        match backend.pull_image(forward(req, PULL_TIMEOUT)).await {
            Ok(r) => Ok(r),
            Err(e) => {
                // The credentials that worked before stay.
                self.store.restore(&image, replaced);
                warn!(image, error = %e.message(), "PullImage failed");
                Err(explain_pull_error(e, &image))
            }
        }
    }

    async fn remove_image(
        &self,
        req: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        let mut backend = self.backend().await?;
        let spec = req.get_ref().image.clone();
        // The kubelet's image GC removes by image id: learn the image's names first.
        let mut names = Vec::new();
        if let Some(spec) = &spec {
            names.push(spec.image.clone());
            let status = backend
                .image_status(forward(
                    Request::new(cri::ImageStatusRequest {
                        image: Some(spec.clone()),
                        verbose: false,
                    }),
                    CALL_TIMEOUT,
                ))
                .await;
            if let Ok(Some(img)) = status.map(|s| s.into_inner().image) {
                names.extend(img.repo_tags);
                names.extend(
                    img.repo_digests
                        .into_iter()
                        .filter(|d| !d.starts_with("sha256:")),
                );
            }
        }
        let r = backend.remove_image(forward(req, CALL_TIMEOUT)).await?;
        for n in names {
            self.store.forget(&n);
        }
        Ok(r)
    }

    async fn image_fs_info(
        &self,
        req: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        self.backend()
            .await?
            .image_fs_info(forward(req, CALL_TIMEOUT))
            .await
    }
}
