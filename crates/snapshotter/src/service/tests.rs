//! Unit tests of the gRPC service's remote path without root: the remote's lazy layers are
//! mounted by a recording fake (see `remote/mounter.rs`), and its caches are seeded instead of
//! asking a registry.

use std::collections::HashMap;
use std::sync::Arc;

use soci_index::labels as label;
use tonic::Request;

use super::{Service, Snapshotter};
use crate::proto::snapshots as pb;
use crate::proto::snapshots::snapshots_server::Snapshots;
use crate::remote::mounter::fake::Call;
use crate::remote::tests::{fake_remote, seed_lazy_image};

fn prepare(key: &str, labels: HashMap<String, String>) -> Request<pb::PrepareSnapshotRequest> {
    Request::new(pb::PrepareSnapshotRequest {
        snapshotter: "soci".into(),
        key: key.into(),
        parent: String::new(),
        labels,
    })
}

fn stat_labels(s: &Snapshotter, key: &str) -> std::collections::BTreeMap<String, String> {
    s.store.get(key).expect("snapshot").labels
}

#[tokio::test]
async fn prepare_of_a_lazy_layer_mounts_its_fs_dir_and_remove_releases_it() {
    let dir = tempfile::tempdir().unwrap();
    let (remote, mounter) = fake_remote(dir.path());
    let mut labels: HashMap<String, String> = seed_lazy_image(&remote).await.into_iter().collect();
    labels.insert(label::TARGET.into(), "remote-chain1".into());
    let snap = Arc::new(Snapshotter::open(dir.path(), Some(remote.clone())).unwrap());
    let svc = Service::new(snap.clone());
    let e = svc
        .prepare(prepare("remote-extract-1", labels))
        .await
        .expect_err("a provided remote layer answers AlreadyExists");
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    let committed = snap.store.get("remote-chain1").expect("committed target");
    let fs = snap.layout.fs(committed.id);
    assert_eq!(mounter.calls(), vec![Call::Mount(fs.clone(), false)]);
    assert_eq!(
        committed.labels.get(label::MODE).map(String::as_str),
        Some(label::MODE_LAZY)
    );
    svc.remove(Request::new(pb::RemoveSnapshotRequest {
        snapshotter: "soci".into(),
        key: "remote-chain1".into(),
    }))
    .await
    .expect("remove");
    assert!(!remote.is_mounted(committed.id));
    assert_eq!(mounter.calls().last(), Some(&Call::Unmount(fs)));
}

#[tokio::test]
async fn a_discovery_error_hands_the_layer_back() {
    let dir = tempfile::tempdir().unwrap();
    let (remote, mounter) = fake_remote(dir.path());
    let layer = format!("sha256:{}", "ab".repeat(32));
    let labels = HashMap::from([
        (label::TARGET.to_string(), "remote-chain2".to_string()),
        // Nothing listens on port 1: discovery and the layer list both fail.
        (
            label::IMAGE_REF.to_string(),
            "127.0.0.1:1/remote-none:latest".to_string(),
        ),
        (label::LAYER_DIGEST.to_string(), layer),
    ]);
    let snap = Arc::new(Snapshotter::open(dir.path(), Some(remote)).unwrap());
    let svc = Service::new(snap.clone());
    let mounts = svc
        .prepare(prepare("remote-extract-2", labels))
        .await
        .expect("handed back: an ordinary active snapshot")
        .into_inner()
        .mounts;
    assert!(!mounts.is_empty());
    let l = stat_labels(&snap, "remote-extract-2");
    assert_eq!(
        l.get(label::FALLBACK_REASON).map(String::as_str),
        Some("handed_back:registry")
    );
    assert!(
        snap.store.get("remote-chain2").is_err(),
        "target not committed"
    );
    assert!(mounter.calls().is_empty(), "nothing mounted");
}
