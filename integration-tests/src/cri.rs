//! CRI v1 client types generated from the vendored kubernetes/cri-api proto (see build.rs).
//! Tests use them to drive containerd's CRI plugin and the daemon's image service proxy as the
//! kubelet would.

/// Generated `runtime.v1` messages and the RuntimeService / ImageService clients.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("runtime.v1");
}
