//! Generates a CRI v1 client (`runtime.v1` RuntimeService and ImageService) from the vendored
//! `proto/k8s.io/cri-api` so tests can drive containerd's CRI plugin, and the daemon's CRI image
//! service proxy, the way the kubelet does (Debian has no crictl).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let proto = root.join("k8s.io/cri-api/pkg/apis/runtime/v1/api.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_protos(&[proto], &[root])?;
    Ok(())
}
