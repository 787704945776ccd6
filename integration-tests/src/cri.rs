//! containerd's CRI plugin driven the way the kubelet drives it: a containerd with CRI enabled
//! and `soci` as its snapshotter, and a small synchronous CRI v1 client (generated from the
//! vendored kubernetes/cri-api proto, see build.rs) that pulls images, runs a host-network pod
//! with one container, waits for it to exit and reads its log. Debian has no crictl.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tonic::transport::Channel;

use crate::containerd::Containerd;
use crate::image::{busybox_layer, LayoutWriter};
use crate::registry::Registry;

/// Generated `runtime.v1` messages and the RuntimeService / ImageService clients.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("runtime.v1");
}

use v1::image_service_client::ImageServiceClient;
use v1::runtime_service_client::RuntimeServiceClient;

/// The containerd namespace CRI works in.
pub const K8S_NAMESPACE: &str = "k8s.io";

/// Pushes a busybox image running `sleep 3600` to `reg` as `<name>:v1` for use as the pod
/// sandbox ("pause") image; returns its reference.
pub fn push_pause_image(reg: &Registry, dir: &Path, name: &str) -> String {
    let mut w = LayoutWriter::new(&dir.join(name));
    let m = w.manifest(
        "amd64",
        &[busybox_layer()],
        &["/bin/busybox", "sleep", "3600"],
    );
    w.tag_manifest(&m, "v1");
    reg.push_layout(&w.dir, "v1", &format!("{name}:v1"), None);
    format!("{}/{name}:v1", reg.addr)
}

/// Writes `<dir>/<host>/hosts.toml` sending `host` to plain HTTP (containerd's hosts.toml
/// format, used by CRI's `registry.config_path`).
pub fn write_plain_http_hosts(certs_dir: &Path, host: &str) {
    let d = certs_dir.join(host);
    fs::create_dir_all(&d).unwrap();
    fs::write(
        d.join("hosts.toml"),
        format!(
            "server = \"http://{host}\"\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )
    .unwrap();
}

/// Options for a containerd with CRI enabled.
pub struct CriOptions<'a> {
    /// The daemon's socket, registered as the `soci` proxy snapshotter.
    pub soci_socket: &'a Path,
    /// CRI's `registry.config_path` (hosts.toml directories).
    pub certs_dir: &'a Path,
    /// Sandbox image reference (see [`push_pause_image`]); pulled by CRI on first use.
    pub sandbox_image: &'a str,
    /// Extra TOML appended to the containerd config.
    pub extra: &'a str,
}

/// The documented node configuration (deploy/kubernetes/containerd-1.x.toml) with the
/// socket and root of the daemon under test, without its `version` line (the harness writes
/// it): the tested configuration is the documented one.
pub fn deploy_snippet(soci_socket: &Path, soci_root: &Path) -> String {
    let text = include_str!("../../deploy/kubernetes/containerd-1.x.toml");
    text.lines()
        .filter(|l| !l.starts_with("version ="))
        .collect::<Vec<_>>()
        .join("\n")
        .replace(
            "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock",
            &soci_socket.to_string_lossy(),
        )
        .replace(
            "/var/lib/soci-snapshotter-grpc",
            &soci_root.to_string_lossy(),
        )
}

/// Starts containerd with the CRI plugin using `soci` as its snapshotter with snapshot
/// annotations passed on: deploy/kubernetes/containerd-1.x.toml (see [`deploy_snippet`];
/// the daemon's root is `root` next to its socket, as [`crate::daemon::SociDaemon`] lays
/// them out) plus what a test node needs (sandbox image, registries' hosts.toml).
pub fn start_containerd(o: &CriOptions) -> Containerd {
    let root = o
        .soci_socket
        .parent()
        .map(|d| d.join("root"))
        .unwrap_or_default();
    let cfg = format!(
        r#"{snippet}
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs}"
{extra}
"#,
        snippet = deploy_snippet(o.soci_socket, &root),
        sandbox = o.sandbox_image,
        certs = o.certs_dir.display(),
        extra = o.extra,
    );
    Containerd::start_with_cri(&cfg)
}

/// How a container ended.
#[derive(Debug)]
pub struct Exited {
    /// Exit code.
    pub code: i32,
    /// stdout and stderr lines, in order (CRI log prefixes removed).
    pub log: String,
}

/// A synchronous CRI v1 client (its own tokio runtime).
pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    /// Directory where pod logs are written.
    pub log_dir: PathBuf,
}

impl Cri {
    /// Connects the RuntimeService to `runtime_socket` and the ImageService to `image_socket`
    /// (the same socket, or the daemon's image service proxy, as the kubelet's
    /// `--image-service-endpoint`). Pod logs go under `log_dir`.
    pub fn connect(runtime_socket: &Path, image_socket: &Path, log_dir: &Path) -> Result<Cri> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (runtime, images) = rt.block_on(async {
            let r = containerd_client::connect(runtime_socket)
                .await
                .with_context(|| format!("connecting to {}", runtime_socket.display()))?;
            let i = containerd_client::connect(image_socket)
                .await
                .with_context(|| format!("connecting to {}", image_socket.display()))?;
            anyhow::Ok((RuntimeServiceClient::new(r), ImageServiceClient::new(i)))
        })?;
        fs::create_dir_all(log_dir)?;
        Ok(Cri {
            rt,
            runtime,
            images,
            log_dir: log_dir.to_path_buf(),
        })
    }

    /// PullImage with optional credentials; returns the image id (config digest).
    pub fn pull(&self, image: &str, auth: Option<v1::AuthConfig>) -> Result<String> {
        let mut c = self.images.clone();
        let req = v1::PullImageRequest {
            image: Some(v1::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            auth,
            sandbox_config: None,
        };
        let r = self
            .rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(300), c.pull_image(req)).await
            })
            .map_err(|_| anyhow!("PullImage {image} timed out"))?
            .map_err(|s| anyhow!("PullImage {image}: {s}"))?;
        Ok(r.into_inner().image_ref)
    }

    /// RemoveImage.
    pub fn remove_image(&self, image: &str) -> Result<()> {
        let mut c = self.images.clone();
        let req = v1::RemoveImageRequest {
            image: Some(v1::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
        };
        self.rt
            .block_on(c.remove_image(req))
            .map_err(|s| anyhow!("RemoveImage {image}: {s}"))?;
        Ok(())
    }

    /// ImageStatus: `None` when the image is not present.
    pub fn image_status(&self, image: &str) -> Result<Option<v1::Image>> {
        let mut c = self.images.clone();
        let req = v1::ImageStatusRequest {
            image: Some(v1::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            verbose: false,
        };
        let r = self
            .rt
            .block_on(c.image_status(req))
            .map_err(|s| anyhow!("ImageStatus {image}: {s}"))?;
        Ok(r.into_inner().image)
    }

    /// ImageFsInfo: the image filesystems' mountpoints.
    pub fn image_fs_mountpoints(&self) -> Result<Vec<String>> {
        let mut c = self.images.clone();
        let r = self
            .rt
            .block_on(c.image_fs_info(v1::ImageFsInfoRequest {}))
            .map_err(|s| anyhow!("ImageFsInfo: {s}"))?
            .into_inner();
        Ok(r.image_filesystems
            .iter()
            .filter_map(|f| f.fs_id.as_ref().map(|id| id.mountpoint.clone()))
            .collect())
    }

    /// Runs a host-network pod named `name` with one container of `image` running `cmd`
    /// (empty: the image's own command), waits up to `within` for it to exit, removes the pod
    /// and returns the exit code and log. The image must have been pulled.
    pub fn run(&self, name: &str, image: &str, cmd: &[&str], within: Duration) -> Result<Exited> {
        let mut rs = self.runtime.clone();
        let pod_logs = self.log_dir.join(name);
        fs::create_dir_all(&pod_logs)?;
        let sandbox_config = v1::PodSandboxConfig {
            metadata: Some(v1::PodSandboxMetadata {
                name: name.into(),
                uid: format!("{name}-uid"),
                namespace: "default".into(),
                attempt: 0,
            }),
            log_directory: pod_logs.to_string_lossy().into_owned(),
            linux: Some(v1::LinuxPodSandboxConfig {
                security_context: Some(v1::LinuxSandboxSecurityContext {
                    namespace_options: Some(v1::NamespaceOption {
                        network: v1::NamespaceMode::Node as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let rt = &self.rt;
        let pod_id = rt
            .block_on(rs.run_pod_sandbox(v1::RunPodSandboxRequest {
                config: Some(sandbox_config.clone()),
                runtime_handler: String::new(),
            }))
            .map_err(|s| anyhow!("RunPodSandbox {name}: {s}"))?
            .into_inner()
            .pod_sandbox_id;
        let result = (|| -> Result<Exited> {
            let config = v1::ContainerConfig {
                metadata: Some(v1::ContainerMetadata {
                    name: format!("{name}-c"),
                    attempt: 0,
                }),
                image: Some(v1::ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                command: cmd.iter().map(|s| s.to_string()).collect(),
                log_path: "c.log".into(),
                linux: Some(v1::LinuxContainerConfig {
                    security_context: Some(v1::LinuxContainerSecurityContext {
                        namespace_options: Some(v1::NamespaceOption {
                            network: v1::NamespaceMode::Node as i32,
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let cid = rt
                .block_on(rs.create_container(v1::CreateContainerRequest {
                    pod_sandbox_id: pod_id.clone(),
                    config: Some(config),
                    sandbox_config: Some(sandbox_config.clone()),
                }))
                .map_err(|s| anyhow!("CreateContainer in {name}: {s}"))?
                .into_inner()
                .container_id;
            rt.block_on(rs.start_container(v1::StartContainerRequest {
                container_id: cid.clone(),
            }))
            .map_err(|s| anyhow!("StartContainer in {name}: {s}"))?;
            let deadline = Instant::now() + within;
            let code = loop {
                let st = rt
                    .block_on(rs.container_status(v1::ContainerStatusRequest {
                        container_id: cid.clone(),
                        verbose: false,
                    }))
                    .map_err(|s| anyhow!("ContainerStatus in {name}: {s}"))?
                    .into_inner()
                    .status
                    .ok_or_else(|| anyhow!("ContainerStatus in {name}: no status"))?;
                if st.state == v1::ContainerState::ContainerExited as i32 {
                    break st.exit_code;
                }
                if Instant::now() > deadline {
                    bail!("container in pod {name} still running after {within:?}");
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            let raw = fs::read_to_string(pod_logs.join("c.log")).unwrap_or_default();
            Ok(Exited {
                code,
                log: parse_cri_log(&raw),
            })
        })();
        let _ = rt.block_on(rs.stop_pod_sandbox(v1::StopPodSandboxRequest {
            pod_sandbox_id: pod_id.clone(),
        }));
        let _ = rt.block_on(rs.remove_pod_sandbox(v1::RemovePodSandboxRequest {
            pod_sandbox_id: pod_id,
        }));
        result
    }
}

/// Strips CRI log prefixes (`TIMESTAMP STREAM TAG message`), joining partial (`P`) lines.
fn parse_cri_log(raw: &str) -> String {
    let mut out = String::new();
    for line in raw.lines() {
        let mut parts = line.splitn(4, ' ');
        let (_ts, _stream, tag) = (parts.next(), parts.next(), parts.next());
        let msg = parts.next().unwrap_or("");
        out.push_str(msg);
        if tag != Some("P") {
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn cri_log_lines_are_unwrapped() {
        let raw = "2026-01-01T00:00:00Z stdout P hel\n2026-01-01T00:00:00Z stdout F lo\n2026-01-01T00:00:01Z stderr F x y\n";
        assert_eq!(super::parse_cri_log(raw), "hello\nx y\n");
    }
}
