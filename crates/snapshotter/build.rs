//! Generates the containerd Snapshots gRPC server and the CRI v1 ImageService server and
//! client (the kubelet-facing proxy of the CRI keychain) from `proto/`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let proto =
        root.join("github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto");
    println!("cargo:rerun-if-changed={}", root.display());
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .compile_protos(&[proto], std::slice::from_ref(&root))?;
    let cri = root.join("k8s.io/cri-api/pkg/apis/runtime/v1/api.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Credentials: `Debug` is written by hand (redacted) in `cri::redact`.
        .skip_debug(["runtime.v1.AuthConfig"])
        .compile_protos(&[cri], &[root])?;
    Ok(())
}
