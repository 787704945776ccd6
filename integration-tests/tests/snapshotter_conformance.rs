//! A port of the scenarios of containerd's snapshotter conformance suite
//! (`pkg/snapshots/testsuite`), run through the gRPC API against the real daemon, with the
//! returned mounts really mounted.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use containerd_client::services::v1::snapshots as pb;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::types::Mount;
use integration_tests::daemon::SociDaemon;
use integration_tests::run;
use tonic::transport::Channel;
use tonic::Code;

struct Env {
    rt: tokio::runtime::Runtime,
    daemon: SociDaemon,
    client: SnapshotsClient<Channel>,
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("soci-conf")
            .tempdir_in("/tmp")
            .unwrap();
        let daemon = SociDaemon::start(&dir.path().join("d"), "");
        let rt = tokio::runtime::Runtime::new().unwrap();
        let client = rt.block_on(async {
            SnapshotsClient::new(containerd_client::connect(&daemon.socket).await.unwrap())
        });
        Env {
            rt,
            daemon,
            client,
            dir,
        }
    }

    fn reconnect(&mut self) {
        let sock = self.daemon.socket.clone();
        self.client = self.rt.block_on(async {
            SnapshotsClient::new(containerd_client::connect(&sock).await.unwrap())
        });
    }

    fn prepare(&mut self, key: &str, parent: &str) -> Result<Vec<Mount>, tonic::Status> {
        self.prepare_labels(key, parent, HashMap::new())
    }

    fn prepare_labels(
        &mut self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, tonic::Status> {
        let req = pb::PrepareSnapshotRequest {
            snapshotter: "soci".into(),
            key: key.into(),
            parent: parent.into(),
            labels,
        };
        self.rt
            .block_on(self.client.prepare(req))
            .map(|r| r.into_inner().mounts)
    }

    fn view(&mut self, key: &str, parent: &str) -> Result<Vec<Mount>, tonic::Status> {
        let req = pb::ViewSnapshotRequest {
            snapshotter: "soci".into(),
            key: key.into(),
            parent: parent.into(),
            labels: HashMap::new(),
        };
        self.rt
            .block_on(self.client.view(req))
            .map(|r| r.into_inner().mounts)
    }

    fn commit(&mut self, name: &str, key: &str) -> Result<(), tonic::Status> {
        self.commit_labels(name, key, HashMap::new())
    }

    fn commit_labels(
        &mut self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), tonic::Status> {
        let req = pb::CommitSnapshotRequest {
            snapshotter: "soci".into(),
            name: name.into(),
            key: key.into(),
            labels,
        };
        self.rt.block_on(self.client.commit(req)).map(|_| ())
    }

    fn remove(&mut self, key: &str) -> Result<(), tonic::Status> {
        let req = pb::RemoveSnapshotRequest {
            snapshotter: "soci".into(),
            key: key.into(),
        };
        self.rt.block_on(self.client.remove(req)).map(|_| ())
    }

    fn stat(&mut self, key: &str) -> Result<pb::Info, tonic::Status> {
        let req = pb::StatSnapshotRequest {
            snapshotter: "soci".into(),
            key: key.into(),
        };
        self.rt
            .block_on(self.client.stat(req))
            .map(|r| r.into_inner().info.unwrap())
    }

    fn mounts(&mut self, key: &str) -> Result<Vec<Mount>, tonic::Status> {
        let req = pb::MountsRequest {
            snapshotter: "soci".into(),
            key: key.into(),
        };
        self.rt
            .block_on(self.client.mounts(req))
            .map(|r| r.into_inner().mounts)
    }

    fn usage(&mut self, key: &str) -> Result<pb::UsageResponse, tonic::Status> {
        let req = pb::UsageRequest {
            snapshotter: "soci".into(),
            key: key.into(),
        };
        self.rt
            .block_on(self.client.usage(req))
            .map(|r| r.into_inner())
    }

    fn list(&mut self, filters: &[&str]) -> Vec<pb::Info> {
        let req = pb::ListSnapshotsRequest {
            snapshotter: "soci".into(),
            filters: filters.iter().map(|s| s.to_string()).collect(),
        };
        self.rt.block_on(async {
            let mut s = self.client.list(req).await.unwrap().into_inner();
            let mut out = Vec::new();
            while let Some(m) = s.message().await.unwrap() {
                out.extend(m.info);
            }
            out
        })
    }

    fn update_label(
        &mut self,
        key: &str,
        label: &str,
        value: Option<&str>,
    ) -> Result<pb::Info, tonic::Status> {
        let mut labels = HashMap::new();
        if let Some(v) = value {
            labels.insert(label.to_string(), v.to_string());
        }
        let info = pb::Info {
            name: key.into(),
            labels,
            ..Default::default()
        };
        let req = pb::UpdateSnapshotRequest {
            snapshotter: "soci".into(),
            info: Some(info),
            update_mask: Some(prost_types::FieldMask {
                paths: vec![format!("labels.{label}")],
            }),
        };
        self.rt
            .block_on(self.client.update(req))
            .map(|r| r.into_inner().info.unwrap())
    }

    fn target(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join("mnt").join(name);
        fs::create_dir_all(&p).unwrap();
        p
    }
}

/// Mounts what the snapshotter returned, as containerd would.
fn mount_all(mounts: &[Mount], target: &Path) {
    for m in mounts {
        let mut cmd = Command::new("mount");
        if m.r#type == "bind" {
            let ro = m.options.iter().any(|o| o == "ro");
            run(cmd.arg("--rbind").arg(&m.source).arg(target)).unwrap();
            if ro {
                run(Command::new("mount")
                    .args(["-o", "remount,bind,ro"])
                    .arg(target))
                .unwrap();
            }
        } else {
            run(cmd
                .arg("-t")
                .arg(&m.r#type)
                .arg(&m.source)
                .arg("-o")
                .arg(m.options.join(","))
                .arg(target))
            .unwrap();
        }
    }
}

fn umount(target: &Path) {
    run(Command::new("umount").arg(target)).unwrap();
}

fn code(r: Result<impl std::fmt::Debug, tonic::Status>) -> Code {
    r.expect_err("expected an error").code()
}

#[test]
fn basic_layers_whiteouts_and_views() {
    let mut e = Env::new();
    let t = e.target("a");
    let m = e.prepare("prepare-1", "").unwrap();
    mount_all(&m, &t);
    fs::write(t.join("foo"), "foo v1").unwrap();
    fs::create_dir_all(t.join("dir/sub")).unwrap();
    fs::write(t.join("dir/sub/x"), "x").unwrap();
    fs::write(t.join("dir/keep"), "keep").unwrap();
    fs::write(t.join("moved"), "moved").unwrap();
    umount(&t);
    e.commit("layer-1", "prepare-1").unwrap();
    let i = e.stat("layer-1").unwrap();
    assert_eq!(
        (i.kind, i.parent.as_str()),
        (pb::Kind::Committed as i32, "")
    );

    let m = e.prepare("prepare-2", "layer-1").unwrap();
    assert_eq!(e.stat("prepare-2").unwrap().parent, "layer-1");
    assert_eq!(e.stat("prepare-2").unwrap().kind, pb::Kind::Active as i32);
    mount_all(&m, &t);
    assert_eq!(fs::read_to_string(t.join("foo")).unwrap(), "foo v1");
    fs::write(t.join("foo"), "foo v2").unwrap();
    fs::write(t.join("bar"), "bar").unwrap();
    fs::remove_dir_all(t.join("dir/sub")).unwrap();
    fs::rename(t.join("moved"), t.join("dir/moved")).unwrap();
    umount(&t);
    e.commit("layer-2", "prepare-2").unwrap();

    let v = e.target("v");
    let m = e.view("view-1", "layer-2").unwrap();
    assert_eq!(e.stat("view-1").unwrap().kind, pb::Kind::View as i32);
    mount_all(&m, &v);
    assert_eq!(fs::read_to_string(v.join("foo")).unwrap(), "foo v2");
    assert_eq!(fs::read_to_string(v.join("bar")).unwrap(), "bar");
    assert!(
        !v.join("dir/sub").exists(),
        "removed directory in the lower layer stays hidden"
    );
    assert!(!v.join("moved").exists());
    assert_eq!(fs::read_to_string(v.join("dir/moved")).unwrap(), "moved");
    assert_eq!(fs::read_to_string(v.join("dir/keep")).unwrap(), "keep");
    assert!(
        fs::write(v.join("new"), "x").is_err(),
        "views are read-only"
    );
    umount(&v);
    // Single-parent view: a read-only bind of the parent.
    let m = e.view("view-0", "layer-1").unwrap();
    assert_eq!(m[0].r#type, "bind");
    mount_all(&m, &v);
    assert_eq!(fs::read_to_string(v.join("foo")).unwrap(), "foo v1");
    assert!(fs::write(v.join("new"), "x").is_err());
    umount(&v);
    // Mounts of active and view snapshots are stable; committed ones have none.
    let first = e.mounts("view-1").unwrap();
    assert_eq!(e.mounts("view-1").unwrap(), first);
    assert_eq!(code(e.mounts("layer-1")), Code::FailedPrecondition);

    // Removal order: children first.
    assert_eq!(code(e.remove("layer-1")), Code::FailedPrecondition);
    e.remove("view-0").unwrap();
    e.remove("view-1").unwrap();
    e.remove("layer-2").unwrap();
    e.remove("layer-1").unwrap();
    assert_eq!(code(e.stat("layer-1")), Code::NotFound);
}

#[test]
fn error_codes_match_containerd() {
    let mut e = Env::new();
    e.prepare("p", "").unwrap();
    assert_eq!(code(e.prepare("p", "")), Code::AlreadyExists);
    assert_eq!(code(e.prepare("q", "missing")), Code::NotFound);
    assert_eq!(
        code(e.prepare("q", "p")),
        Code::InvalidArgument,
        "active parent"
    );
    assert_eq!(code(e.commit("c", "missing")), Code::NotFound);
    e.commit("c", "p").unwrap();
    e.prepare("p2", "c").unwrap();
    assert_eq!(code(e.commit("c", "p2")), Code::AlreadyExists);
    e.view("v", "c").unwrap();
    assert_eq!(
        code(e.commit("cv", "v")),
        Code::FailedPrecondition,
        "views cannot be committed"
    );
    assert_eq!(
        code(e.commit("cc", "c")),
        Code::FailedPrecondition,
        "committed cannot be committed"
    );
    assert_eq!(code(e.stat("nope")), Code::NotFound);
    assert_eq!(code(e.update_label("nope", "a", Some("b"))), Code::NotFound);
    assert_eq!(code(e.remove("nope")), Code::NotFound);
    assert_eq!(code(e.usage("nope")), Code::NotFound);
    assert_eq!(code(e.prepare("", "")), Code::InvalidArgument);
}

#[test]
fn labels_update_and_list_filters() {
    let mut e = Env::new();
    let l = HashMap::from([("containerd.io/gc.root".to_string(), "x".to_string())]);
    e.prepare_labels("p", "", l).unwrap();
    assert_eq!(e.stat("p").unwrap().labels["containerd.io/gc.root"], "x");
    let i = e.update_label("p", "foo", Some("bar")).unwrap();
    assert_eq!(i.labels["foo"], "bar");
    assert_eq!(
        i.labels["containerd.io/gc.root"], "x",
        "masked update keeps other labels"
    );
    let i = e.update_label("p", "foo", None).unwrap();
    assert!(!i.labels.contains_key("foo"));
    let created = e.stat("p").unwrap().created_at.unwrap();
    let updated = e.stat("p").unwrap().updated_at.unwrap();
    assert!((updated.seconds, updated.nanos) >= (created.seconds, created.nanos));
    e.commit_labels(
        "c",
        "p",
        HashMap::from([("k".to_string(), "v".to_string())]),
    )
    .unwrap();
    assert_eq!(
        e.stat("c").unwrap().labels.get("k").map(String::as_str),
        Some("v")
    );
    e.prepare("other", "c").unwrap();
    assert_eq!(e.list(&[]).len(), 2);
    let f = e.list(&["labels.\"k\"==v"]);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].name, "c");
    assert_eq!(e.list(&["parent==c"])[0].name, "other");
    assert_eq!(
        e.list(&["kind==active", "name==c"]).len(),
        2,
        "filters are OR-ed"
    );
}

#[test]
fn deep_parent_chain_and_usage() {
    let mut e = Env::new();
    let t = e.target("t");
    let mut parent = String::new();
    for i in 0..40 {
        let key = format!("active-{i}");
        let m = e.prepare(&key, &parent).unwrap();
        mount_all(&m, &t);
        fs::write(t.join(format!("file-{i}")), format!("{i}")).unwrap();
        fs::write(t.join("common"), format!("layer {i}")).unwrap();
        if i == 0 {
            fs::write(t.join("big"), vec![7u8; 1 << 20]).unwrap();
        }
        umount(&t);
        let u = e.usage(&key).unwrap();
        assert!(u.inodes >= 2, "{u:?}");
        if i == 0 {
            assert!(u.size >= 1 << 20, "usage counts the 1 MiB file: {u:?}");
        }
        let name = format!("layer-{i}");
        e.commit(&name, &key).unwrap();
        if i == 0 {
            assert!(e.usage(&name).unwrap().size >= 1 << 20);
        }
        parent = name;
    }
    let m = e.view("top", &parent).unwrap();
    mount_all(&m, &t);
    for i in 0..40 {
        assert_eq!(
            fs::read_to_string(t.join(format!("file-{i}"))).unwrap(),
            format!("{i}")
        );
    }
    assert_eq!(fs::read_to_string(t.join("common")).unwrap(), "layer 39");
    umount(&t);
}

#[test]
fn state_survives_restart_and_crash() {
    let mut e = Env::new();
    let t = e.target("t");
    let m = e.prepare("p", "").unwrap();
    mount_all(&m, &t);
    fs::write(t.join("kept"), "kept").unwrap();
    umount(&t);
    e.commit("c", "p").unwrap();
    e.prepare_labels(
        "active",
        "c",
        HashMap::from([("l".to_string(), "1".to_string())]),
    )
    .unwrap();
    let before = e.list(&[]);

    // Graceful: SIGTERM exits 0; everything is there after start.
    assert_eq!(
        e.daemon.stop(),
        Some(0),
        "SIGTERM exits 0: {}",
        e.daemon.log_text()
    );
    e.daemon.restart();
    e.reconnect();
    let mut after = e.list(&[]);
    let mut b = before.clone();
    b.sort_by(|x, y| x.name.cmp(&y.name));
    after.sort_by(|x, y| x.name.cmp(&y.name));
    assert_eq!(after, b);

    // Crash: kill -9 right after a commit; committed state survives, orphans are cleaned.
    e.prepare("p2", "c").unwrap();
    e.commit("c2", "p2").unwrap();
    let orphan = e.daemon.root.join("snapshots/999999");
    fs::create_dir_all(orphan.join("fs")).unwrap();
    e.daemon.kill9();
    e.daemon.restart();
    e.reconnect();
    assert_eq!(e.stat("c2").unwrap().parent, "c");
    assert!(!orphan.exists(), "orphan directory removed at start-up");
    let m = e.view("v", "c2").unwrap();
    mount_all(&m, &t);
    assert_eq!(fs::read_to_string(t.join("kept")).unwrap(), "kept");
    umount(&t);
    // A new Prepare with a fresh key works after the crash.
    e.prepare("p3", "c2").unwrap();
    let req = pb::CleanupRequest {
        snapshotter: "soci".into(),
    };
    e.rt.block_on(e.client.cleanup(req)).unwrap();
    assert_eq!(e.stat("p3").unwrap().kind, pb::Kind::Active as i32);
}
