//! A port of the scenarios of containerd's snapshotter conformance suite
//! (`pkg/snapshots/testsuite`), run through the gRPC API against the real daemon, with the
//! returned mounts really mounted. Cases are run against the daemon's socket directly and,
//! where containerd's metadata layer sits in front of us in production, through a private
//! containerd's `soci` proxy snapshotter (namespace `fuseproto-conf`). A table at the end of
//! this file maps each upstream case to the test that covers it.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use containerd_client::services::v1::snapshots as pb;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::types::Mount;
use integration_tests::containerd::Containerd;
use integration_tests::daemon::SociDaemon;
use integration_tests::run;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Code;

/// Adds containerd's namespace header (ignored by our daemon, required by containerd).
#[derive(Clone)]
struct Namespace(MetadataValue<Ascii>);

impl tonic::service::Interceptor for Namespace {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut()
            .insert("containerd-namespace", self.0.clone());
        Ok(req)
    }
}

type Client = SnapshotsClient<InterceptedService<Channel, Namespace>>;

const NAMESPACE: &str = "fuseproto-conf";
const GC_ROOT: &str = "containerd.io/gc.root";

fn client(rt: &tokio::runtime::Runtime, sock: &Path) -> Client {
    let ch = rt.block_on(containerd_client::connect(sock)).unwrap();
    SnapshotsClient::with_interceptor(ch, Namespace(NAMESPACE.parse().unwrap()))
}

struct Env {
    /// Set when the client talks to containerd, which talks to the daemon (dropped first).
    containerd: Option<Containerd>,
    rt: tokio::runtime::Runtime,
    daemon: SociDaemon,
    client: Client,
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
        let client = client(&rt, &daemon.socket);
        Env {
            rt,
            daemon,
            client,
            dir,
            containerd: None,
        }
    }

    /// The daemon behind a private containerd, as in production.
    fn proxied() -> Env {
        let mut e = Env::new();
        let c = Containerd::start_with_soci(&e.daemon.socket);
        e.client = client(&e.rt, &c.socket);
        e.containerd = Some(c);
        e
    }

    fn reconnect(&mut self) {
        let sock = self.daemon.socket.clone();
        self.client = client(&self.rt, &sock);
    }

    /// Labels of a new snapshot: through containerd a GC root, or its collector may remove
    /// unreferenced snapshots between steps (upstream's suite does the same).
    fn root_labels(&self, mut labels: HashMap<String, String>) -> HashMap<String, String> {
        if self.containerd.is_some() {
            labels
                .entry(GC_ROOT.to_string())
                .or_insert_with(|| "fuseproto".to_string());
        }
        labels
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
            labels: self.root_labels(labels),
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
            labels: self.root_labels(HashMap::new()),
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
            labels: self.root_labels(labels),
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

    fn update(&mut self, info: pb::Info, paths: &[&str]) -> Result<pb::Info, tonic::Status> {
        let req = pb::UpdateSnapshotRequest {
            snapshotter: "soci".into(),
            info: Some(info),
            update_mask: (!paths.is_empty()).then(|| prost_types::FieldMask {
                paths: paths.iter().map(|p| p.to_string()).collect(),
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
            let (dir, options) = compact_lowerdirs(&m.options);
            if let Some(d) = dir {
                cmd.current_dir(d);
            }
            run(cmd
                .arg("-t")
                .arg(&m.r#type)
                .arg(&m.source)
                .arg("-o")
                .arg(options)
                .arg(target))
            .unwrap();
        }
    }
}

/// Mount options fit in one page: with many layers, containerd's `mount.All` runs mount in
/// the lowerdirs' common parent with relative paths; so do we.
fn compact_lowerdirs(options: &[String]) -> (Option<PathBuf>, String) {
    let joined = options.join(",");
    if joined.len() < 4000 {
        return (None, joined);
    }
    let lower = options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .expect("a long overlay option string has lowerdirs");
    let dirs: Vec<&str> = lower.split(':').collect();
    let mut common = Path::new(dirs[0]).parent().unwrap().to_path_buf();
    while !dirs.iter().all(|d| Path::new(d).starts_with(&common)) {
        common = common.parent().unwrap().to_path_buf();
    }
    let rel: Vec<String> = dirs
        .iter()
        .map(|d| {
            Path::new(d)
                .strip_prefix(&common)
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    let options: Vec<String> = options
        .iter()
        .map(|o| match o.strip_prefix("lowerdir=") {
            Some(_) => format!("lowerdir={}", rel.join(":")),
            None => o.clone(),
        })
        .collect();
    (Some(common), options.join(","))
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

// ---- Ported from containerd 1.6's snapshots/testsuite (testsuite.go, issues.go) ----------

/// Runs `f` against the daemon directly and through containerd.
fn both(f: impl Fn(&mut Env)) {
    f(&mut Env::new());
    f(&mut Env::proxied());
}

fn time_of(t: &Option<prost_types::Timestamp>) -> std::time::SystemTime {
    let t = t.as_ref().expect("a timestamp");
    std::time::UNIX_EPOCH + std::time::Duration::new(t.seconds as u64, t.nanos as u32)
}

/// upstream `checkSnapshotterTransitivity` and `checkSnapshotterPrepareView`.
#[test]
fn transitivity_and_same_key_prepare_view() {
    both(|e| {
        e.prepare("prep", "").unwrap();
        e.commit("snapA", "prep").unwrap();
        e.prepare("next", "snapA").unwrap();
        e.commit("snapB", "next").unwrap();
        let b = e.stat("snapB").unwrap();
        assert_eq!(b.parent, "snapA");
        assert_eq!(e.stat(&b.parent).unwrap().parent, "");
        // Prepare then View with the same key, two Prepares, two Views: the second fails.
        e.prepare("newlayer", "snapA").unwrap();
        assert_eq!(code(e.view("newlayer", "snapA")), Code::AlreadyExists);
        e.prepare("prepLayer", "snapA").unwrap();
        assert_eq!(code(e.prepare("prepLayer", "snapA")), Code::AlreadyExists);
        e.view("viewLayer", "snapA").unwrap();
        assert_eq!(code(e.view("viewLayer", "snapA")), Code::AlreadyExists);
        // A key that names a committed snapshot cannot be prepared or viewed either.
        assert_eq!(code(e.prepare("snapA", "")), Code::AlreadyExists);
        assert_eq!(code(e.view("snapB", "snapA")), Code::AlreadyExists);
    });
}

/// upstream `baseTestSnapshots` + `checkUpdate`: times, kinds, parents, label updates.
#[test]
fn update_times_and_labels() {
    both(|e| {
        let t1 = std::time::SystemTime::now();
        e.prepare("c1-a", "").unwrap();
        e.commit("c1", "c1-a").unwrap();
        e.prepare("c2-a", "c1").unwrap();
        e.commit("c2", "c2-a").unwrap();
        e.prepare("a1", "c2").unwrap();
        e.prepare("a2", "").unwrap();
        e.view("v1", "c2").unwrap();
        e.view("v2", "").unwrap();
        let t2 = std::time::SystemTime::now();
        let cases = [
            ("c1", pb::Kind::Committed, ""),
            ("c2", pb::Kind::Committed, "c1"),
            ("a1", pb::Kind::Active, "c2"),
            ("a2", pb::Kind::Active, ""),
            ("v1", pb::Kind::View, "c2"),
            ("v2", pb::Kind::View, ""),
        ];
        for (name, kind, parent) in cases {
            let st = e.stat(name).unwrap();
            let created = time_of(&st.created_at);
            assert!(
                created >= t1 && created <= t2,
                "{name}: created {created:?}"
            );
            assert_eq!(st.updated_at, st.created_at, "{name}: updated == created");
            assert_eq!(
                (st.kind, st.parent.as_str()),
                (kind as i32, parent),
                "{name}"
            );
            assert_eq!(st.name, name);

            // Update without a mask: all labels replaced, the parent is not touched.
            let root = st.labels.get(GC_ROOT).cloned();
            let mut expected: HashMap<String, String> = [("l1", "v1"), ("l2", "v2"), ("l3", "v3")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into();
            expected.extend(root.clone().map(|r| (GC_ROOT.to_string(), r)));
            let mut info = st.clone();
            info.parent = "doesnotexist".into();
            info.labels = expected.clone();
            let u1 = std::time::SystemTime::now();
            let st = e.update(info, &[]).unwrap();
            let u2 = std::time::SystemTime::now();
            assert_eq!(st.created_at, e.stat(name).unwrap().created_at);
            assert_eq!(time_of(&st.created_at), created, "{name}: created kept");
            let updated = time_of(&st.updated_at);
            assert!(
                updated >= u1 && updated <= u2,
                "{name}: updated {updated:?}"
            );
            assert_eq!(
                (st.kind, st.parent.as_str()),
                (kind as i32, parent),
                "{name}"
            );
            assert_eq!(st.labels, expected, "{name}");

            // Masked: l1 set, l2 removed (absent in the request), l4 not in the mask.
            let mut info = st.clone();
            info.labels = [("l1", "updated"), ("l4", "v4")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into();
            let st = e.update(info, &["labels.l1", "labels.l2"]).unwrap();
            let mut want: HashMap<String, String> = [("l1", "updated"), ("l3", "v3")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into();
            want.extend(root.clone().map(|r| (GC_ROOT.to_string(), r)));
            assert_eq!(st.labels, want, "{name}");

            // "labels": the whole map.
            let mut want: HashMap<String, String> = [("l4".to_string(), "v4".to_string())].into();
            want.extend(root.clone().map(|r| (GC_ROOT.to_string(), r)));
            let mut info = st.clone();
            info.labels = want.clone();
            let st = e.update(info, &["labels"]).unwrap();
            assert_eq!(st.labels, want, "{name}");

            // Immutable fields cannot be named in the mask.
            let mut info = st.clone();
            info.parent = "doesnotexist".into();
            assert_eq!(
                code(e.update(info, &["parent"])),
                Code::InvalidArgument,
                "{name}"
            );
        }
    });
}

/// upstream `checkRemove`: keys are reusable after Remove, for any kind.
#[test]
fn removed_keys_are_reusable() {
    both(|e| {
        e.prepare("committed-a", "").unwrap();
        e.commit("committed-1", "committed-a").unwrap();
        e.prepare("reuse-1", "committed-1").unwrap();
        e.remove("reuse-1").unwrap();
        e.view("reuse-1", "committed-1").unwrap();
        e.remove("reuse-1").unwrap();
        e.prepare("reuse-1", "").unwrap();
        e.remove("committed-1").unwrap();
        e.commit("committed-1", "reuse-1").unwrap();
        assert_eq!(
            e.stat("committed-1").unwrap().kind,
            pb::Kind::Committed as i32
        );
        assert_eq!(code(e.stat("reuse-1")), Code::NotFound);
    });
}

/// upstream `checkWalk` (filters) and `checkStatInWalk` (a walked Info equals Stat's).
#[test]
fn walk_filters_and_stat_in_walk() {
    both(|e| {
        let l = |v: &str| {
            HashMap::from([
                ("l".to_string(), v.to_string()),
                (GC_ROOT.to_string(), "check-walk".to_string()),
            ])
        };
        let root = HashMap::from([(GC_ROOT.to_string(), "check-walk".to_string())]);
        e.prepare_labels("a-np", "", root.clone()).unwrap();
        e.prepare_labels("p-tmp", "", root.clone()).unwrap();
        e.commit_labels("p", "p-tmp", root.clone()).unwrap();
        e.prepare_labels("a", "p", root.clone()).unwrap();
        let req =
            |key: &str, parent: &str, labels: HashMap<String, String>| pb::ViewSnapshotRequest {
                snapshotter: "soci".into(),
                key: key.into(),
                parent: parent.into(),
                labels,
            };
        e.rt.block_on(e.client.view(req("v", "p", root.clone())))
            .unwrap();
        e.prepare_labels("p-wl-tmp", "", root.clone()).unwrap();
        e.commit_labels("p-wl", "p-wl-tmp", l("1")).unwrap();
        e.prepare_labels("a-wl", "p-wl", l("2")).unwrap();
        e.rt.block_on(e.client.view(req("v-wl", "p-wl", l("3"))))
            .unwrap();
        e.prepare_labels("a-np-wl", "", l("2")).unwrap();
        let cases: [(&[&str], &[&str]); 5] = [
            (
                &["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"],
                &["labels.\"containerd.io/gc.root\"==check-walk"],
            ),
            (
                &["a-np", "a", "a-wl", "a-np-wl"],
                &["kind==active,labels.\"containerd.io/gc.root\"==check-walk"],
            ),
            (&["p-wl", "a-wl", "v-wl", "a-np-wl"], &["labels.l"]),
            (&["a-wl", "a-np-wl"], &["labels.l==2"]),
            (&["a", "v"], &["parent==p"]),
        ];
        for (matches, filters) in cases {
            let mut got: Vec<String> = e.list(filters).into_iter().map(|i| i.name).collect();
            got.sort();
            let mut want: Vec<String> = matches.iter().map(|s| s.to_string()).collect();
            want.sort();
            assert_eq!(got, want, "{filters:?}");
        }
        for info in e.list(&[]) {
            assert_eq!(
                e.stat(&info.name).unwrap(),
                info,
                "walk == stat for {}",
                info.name
            );
        }
    });
}

/// upstream `checkRootPermission`: the root of a new active snapshot is 0755.
#[test]
fn root_of_a_new_snapshot_is_0755() {
    use std::os::unix::fs::PermissionsExt;
    both(|e| {
        let t = e.target("root");
        let m = e.prepare("preparing", "").unwrap();
        mount_all(&m, &t);
        let mode = fs::metadata(&t).unwrap().permissions().mode() & 0o7777;
        umount(&t);
        assert_eq!(mode, 0o755);
    });
}

/// One step of upstream's `fstest` appliers.
#[derive(Clone, Copy)]
enum Op<'a> {
    File(&'a str, &'a str, u32),
    Dir(&'a str, u32),
    RemoveAll(&'a str),
    Chown(&'a str, u32, u32),
    Link(&'a str, &'a str),
    Rename(&'a str, &'a str),
}

fn apply(root: &Path, ops: &[Op]) {
    use std::os::unix::fs::PermissionsExt;
    let p = |r: &str| root.join(r.trim_start_matches('/'));
    for op in ops {
        match *op {
            Op::File(f, body, mode) => {
                fs::write(p(f), body).unwrap();
                fs::set_permissions(p(f), fs::Permissions::from_mode(mode)).unwrap();
            }
            Op::Dir(d, mode) => {
                fs::create_dir_all(p(d)).unwrap();
                fs::set_permissions(p(d), fs::Permissions::from_mode(mode)).unwrap();
            }
            Op::RemoveAll(x) => match fs::symlink_metadata(p(x)) {
                Ok(m) if m.is_dir() => fs::remove_dir_all(p(x)).unwrap(),
                Ok(_) => fs::remove_file(p(x)).unwrap(),
                Err(_) => {}
            },
            Op::Chown(x, u, g) => std::os::unix::fs::lchown(p(x), Some(u), Some(g)).unwrap(),
            Op::Link(old, new) => fs::hard_link(p(old), p(new)).unwrap(),
            // A directory from a lower layer cannot be renamed in place without overlayfs's
            // redirect_dir (EXDEV); like mv(1), copy it instead.
            Op::Rename(old, new) => {
                if let Err(e) = fs::rename(p(old), p(new)) {
                    assert_eq!(e.raw_os_error(), Some(libc::EXDEV), "rename {old}: {e}");
                    run(Command::new("mv").arg(p(old)).arg(p(new))).unwrap();
                }
            }
        }
    }
}

/// Every entry under `root` (not `root` itself): path, type, mode, owner, content or target.
fn tree(root: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let m = fs::symlink_metadata(&path).unwrap();
            let what = if m.is_dir() {
                stack.push(path.clone());
                "dir".to_string()
            } else if m.file_type().is_symlink() {
                format!("-> {}", fs::read_link(&path).unwrap().display())
            } else {
                format!("{:?}", fs::read(&path).unwrap())
            };
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            out.push(format!(
                "{rel} {:o} {}:{} {what}",
                m.mode(),
                m.uid(),
                m.gid()
            ));
        }
    }
    out.sort();
    out
}

/// upstream `checkSnapshots`: each layer applied in its own snapshot on top of the previous
/// ones; a view of the top must equal all layers applied to one plain directory.
fn check_layers(e: &mut Env, name: &str, layers: &[&[Op]]) {
    let flat = e.dir.path().join(format!("flat-{name}"));
    fs::create_dir_all(&flat).unwrap();
    let t = e.target(name);
    let mut parent = String::new();
    for (i, ops) in layers.iter().enumerate() {
        let key = format!("{name}-active-{i}");
        let m = e.prepare(&key, &parent).unwrap();
        mount_all(&m, &t);
        assert_eq!(
            tree(&t),
            tree(&flat),
            "{name}: layer {i} starts from the layers below"
        );
        apply(&t, ops);
        apply(&flat, ops);
        umount(&t);
        parent = format!("{name}-committed-{i}");
        e.commit(&parent, &key).unwrap();
    }
    let m = e.view(&format!("{name}-view"), &parent).unwrap();
    mount_all(&m, &t);
    let (got, want) = (tree(&t), tree(&flat));
    umount(&t);
    assert_eq!(got, want, "{name}");
}

/// upstream `checkLayerFileUpdate`, `checkRemoveDirectoryInLowerLayer`, `checkChown`,
/// `checkDirectoryPermissionOnCommit`, `checkDeletedFilesInChildSnapshot`,
/// `checkFileFromLowerLayer` and `checkRename`, through containerd.
#[test]
fn layered_changes_equal_a_flat_apply() {
    use Op::*;
    let mut e = Env::proxied();
    let cases: &[(&str, &[&[Op]])] = &[
        (
            "file-update",
            &[
                &[
                    Dir("/etc", 0o700),
                    File("/etc/hosts", "mydomain 10.0.0.1", 0o644),
                    File("/etc/profile", "PATH=/usr/bin", 0o644),
                ],
                &[
                    File("/etc/hosts", "mydomain 10.0.0.2", 0o644),
                    File("/etc/profile", "PATH=/usr/bin", 0o666),
                    Dir("/root", 0o700),
                    File("/root/.bashrc", "PATH=/usr/sbin:/usr/bin", 0o644),
                ],
                &[],
            ],
        ),
        (
            "remove-lower-dir",
            &[
                &[Dir("/lib", 0o700), File("/lib/hidden", "", 0o644)],
                &[
                    RemoveAll("/lib"),
                    Dir("/lib", 0o700),
                    File("/lib/not-hidden", "", 0o644),
                ],
                &[File("/lib/newfile", "", 0o644)],
            ],
        ),
        (
            "chown",
            &[
                &[
                    Dir("/opt", 0o700),
                    Dir("/opt/a", 0o700),
                    Dir("/opt/a/b", 0o700),
                    File("/opt/a/b/file.txt", "hello", 0o644),
                ],
                &[
                    Chown("/opt", 1, 1),
                    Chown("/opt/a", 1, 1),
                    Chown("/opt/a/b", 1, 1),
                    Chown("/opt/a/b/file.txt", 1, 1),
                ],
            ],
        ),
        (
            "dir-perm",
            &[
                &[
                    Dir("/dir1", 0o700),
                    Dir("/dir2", 0o700),
                    Dir("/dir3", 0o700),
                    Dir("/dir4", 0o700),
                    File("/dir4/f1", "...", 0o644),
                    Dir("/dir5", 0o700),
                    File("/dir5/f1", "...", 0o644),
                    Chown("/dir1", 1, 1),
                    Chown("/dir2", 1, 1),
                    Chown("/dir3", 1, 1),
                    Chown("/dir5", 1, 1),
                    Chown("/dir5/f1", 1, 1),
                ],
                &[
                    Chown("/dir2", 0, 0),
                    RemoveAll("/dir3"),
                    Chown("/dir4", 1, 1),
                    Chown("/dir4/f1", 1, 1),
                ],
            ],
        ),
        (
            "deleted-in-child",
            &[
                &[
                    File("/foo", "foo\n", 0o777),
                    File("/foobar", "foobar\n", 0o777),
                ],
                &[RemoveAll("/foobar")],
                &[],
            ],
        ),
        (
            "move-from-lower",
            &[
                &[
                    Dir("/dir1", 0o700),
                    File("/dir1/f1", "Hello", 0o644),
                    Dir("/dir2", 0o700),
                    File("/dir2/f2", "...", 0o644),
                ],
                &[
                    Dir("/dir3", 0o700),
                    File("/dir3/f1", "Hello", 0o644),
                    RemoveAll("/dir1"),
                    Link("/dir2/f2", "/dir3/f2"),
                    RemoveAll("/dir2/f2"),
                ],
            ],
        ),
        (
            "rename",
            &[
                &[
                    Dir("/dir1", 0o700),
                    Dir("/somefiles", 0o700),
                    File("/somefiles/f1", "was here first!", 0o644),
                    File("/somefiles/f2", "nothing interesting", 0o644),
                ],
                &[
                    Rename("/dir1", "/dir2"),
                    File("/somefiles/f1-overwrite", "new content 1", 0o644),
                    Rename("/somefiles/f1-overwrite", "/somefiles/f1"),
                    Rename("/somefiles/f2", "/somefiles/f3"),
                ],
            ],
        ),
    ];
    for (name, layers) in cases {
        check_layers(&mut e, name, layers);
    }
}

/// upstream `check128LayersMount`: 128 layers, each overwriting, adding and replacing a
/// directory; every step equals the flat apply, and so does a view of the top.
#[test]
fn chain_of_128_layers() {
    use Op::*;
    let mut e = Env::proxied();
    let names: Vec<(String, String)> = (1..=127)
        .map(|i| (format!("{i} WAS HERE!\n"), format!("/ADDHERE/file-{i}")))
        .collect();
    let only: Vec<String> = (1..=127).map(|i| format!("/ONLYME/file-{i}")).collect();
    let mut layers: Vec<Vec<Op>> = vec![vec![
        File("/bottom", "way at the bottom\n", 0o777),
        File("/overwriteme", "FIRST!\n", 0o777),
        Dir("/ADDHERE", 0o755),
        Dir("/ONLYME", 0o755),
        File("/ONLYME/bottom", "bye!\n", 0o777),
    ]];
    for (i, (body, add)) in names.iter().enumerate() {
        layers.push(vec![
            File("/overwriteme", body, 0o777),
            File(add, "same\n", 0o755),
            RemoveAll("/ONLYME"),
            Dir("/ONLYME", 0o755),
            File(&only[i], "only me!\n", 0o777),
        ]);
    }
    let refs: Vec<&[Op]> = layers.iter().map(|l| l.as_slice()).collect();
    check_layers(&mut e, "l128", &refs);
}

// Upstream case -> test here:
// Basic -> basic_layers_whiteouts_and_views; StatActive, StatComitted ->
// basic_layers_whiteouts_and_views; TransitivityTest, PreareViewFailingtest ->
// transitivity_and_same_key_prepare_view; Update -> update_times_and_labels (and
// labels_update_and_list_filters); Remove -> removed_keys_are_reusable; Walk, StatInWalk ->
// walk_filters_and_stat_in_walk; LayerFileupdate, RemoveDirectoryInLowerLayer, Chown,
// DirectoryPermissionOnCommit, DeletedFilesInChildSnapshot, MoveFileFromLowerLayer, Rename ->
// layered_changes_equal_a_flat_apply; RemoveIntermediateSnapshot ->
// basic_layers_whiteouts_and_views (children first); ViewReadonly ->
// basic_layers_whiteouts_and_views; RootPermission -> root_of_a_new_snapshot_is_0755;
// 128LayersMount -> chain_of_128_layers. CloseTwice has no gRPC counterpart (Close is the
// in-process Snapshotter's; the daemon's shutdown is state_survives_restart_and_crash).
