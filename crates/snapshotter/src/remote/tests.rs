//! Unit tests of lazy layers through the [`Mounter`] seam (no root, no registry): a fake
//! mounter records what the daemon asks of the kernel, and the resolver's caches are seeded
//! with an image whose single layer has a zTOC built here.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use soci_fs::LayerTree;
use soci_index::{SociImage, SociIndex, SociVersion, ANNOTATION_LAYER_DIGEST};
use soci_registry::{Descriptor, Digest, ImageManifest, Reference};

use super::mounter::fake::{Call, FakeMounter};
use super::resolver::PreparedLayer;
use super::Remote;
use crate::config::Config;

/// The image reference of [`seed_lazy_image`] (nothing listens there).
pub(crate) const IMAGE: &str = "127.0.0.1:1/soci-test:latest";

fn digest_of(bytes: &[u8]) -> Digest {
    Digest::of(bytes)
}

/// A remote whose lazy layers are "mounted" by a recording fake; background fetch off (no
/// registry behind it).
pub(crate) fn fake_remote(root: &Path) -> (Arc<Remote>, Arc<FakeMounter>) {
    let mut cfg = Config::default();
    cfg.background_fetch.disable = true;
    let mounter = Arc::new(FakeMounter::default());
    let remote = Remote::with_mounter(root, &cfg, mounter.clone()).expect("remote");
    (Arc::new(remote), mounter)
}

/// Seeds `remote`'s discovery and zTOC caches with a one-layer image at [`IMAGE`] whose
/// layer has a zTOC: the labels a remote Prepare of that layer carries.
pub(crate) async fn seed_lazy_image(remote: &Remote) -> BTreeMap<String, String> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    let data = b"hello from a lazy layer\n";
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    b.append_data(&mut h, "hello", &data[..]).expect("tar");
    let blob = b.into_inner().expect("tar");
    let z = soci_ztoc::build(blob.as_slice(), &Default::default()).expect("ztoc");
    let layer = Descriptor::new(
        soci_registry::oci::MEDIA_TYPE_LAYER_TAR,
        digest_of(&blob),
        blob.len() as u64,
    );
    let mut ztoc = Descriptor::new("application/octet-stream", digest_of(b"ztoc"), 4);
    ztoc.annotations
        .insert(ANNOTATION_LAYER_DIGEST.into(), layer.digest.to_string());
    let config = Descriptor::new(
        soci_registry::oci::MEDIA_TYPE_OCI_CONFIG,
        digest_of(b"{}"),
        2,
    );
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(soci_registry::oci::MEDIA_TYPE_OCI_MANIFEST.into()),
        artifact_type: None,
        config,
        layers: vec![layer.clone()],
        subject: None,
        annotations: BTreeMap::new(),
    };
    let manifest_desc = Descriptor::new(
        soci_registry::oci::MEDIA_TYPE_OCI_MANIFEST,
        digest_of(b"manifest"),
        8,
    );
    let img = SociImage {
        reference: Reference::parse(IMAGE).expect("reference"),
        manifest_desc: manifest_desc.clone(),
        manifest,
        index_desc: Descriptor::new("application/json", digest_of(b"index"), 5),
        index: SociIndex::new(SociVersion::V2, vec![ztoc.clone()], None, "test"),
    };
    let key = format!("{IMAGE}@{} ", manifest_desc.digest);
    let img = Arc::new(img);
    let _ = remote.resolver.images.run(&key, async { Ok(img) }).await;
    let prepared = PreparedLayer {
        spans: z.spans().expect("spans"),
        tree: Arc::new(LayerTree::build(&z).expect("tree")),
    };
    let _ = remote
        .resolver
        .prepared
        .run(&super::resolver::prepared_key(&ztoc), async {
            Ok(prepared)
        })
        .await;
    BTreeMap::from([
        (soci_index::labels::IMAGE_REF.into(), IMAGE.into()),
        (
            soci_index::labels::MANIFEST_DIGEST.into(),
            manifest_desc.digest.to_string(),
        ),
        (
            soci_index::labels::LAYER_DIGEST.into(),
            layer.digest.to_string(),
        ),
    ])
}

#[tokio::test]
async fn a_lazy_layer_is_mounted_at_its_dir_and_released() {
    let dir = tempfile::tempdir().unwrap();
    let (remote, mounter) = fake_remote(dir.path());
    let labels = seed_lazy_image(&remote).await;
    let plan = remote.plan(&labels).await.expect("plan");
    let super::LayerPlan::Lazy { image, ztoc, layer } = plan else {
        panic!("not lazy");
    };
    let fs = dir.path().join("snapshots/7/fs");
    remote
        .mount_lazy(7, &fs, &image, &ztoc, &layer)
        .await
        .expect("mount");
    assert_eq!(mounter.calls(), vec![Call::Mount(fs.clone(), false)]);
    assert!(remote.is_mounted(7));
    assert_eq!(remote.cached_spans(7).map(|(_, n)| n > 0), Some(true));
    remote.release(7);
    assert!(!remote.is_mounted(7));
    assert_eq!(mounter.calls()[1], Call::Unmount(fs));
}

#[tokio::test]
async fn caches_of_snapshots_that_are_gone_are_removed_and_live_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (remote, _) = fake_remote(dir.path());
    let labels = seed_lazy_image(&remote).await;
    let super::LayerPlan::Lazy { image, ztoc, layer } = remote.plan(&labels).await.unwrap() else {
        panic!("not lazy");
    };
    // Snapshot 7 is mounted (not in the list given: still kept), 8 is live, 9 is gone.
    let fs = dir.path().join("snapshots/7/fs");
    remote
        .mount_lazy(7, &fs, &image, &ztoc, &layer)
        .await
        .unwrap();
    let cache = dir.path().join("cache");
    for d in [
        "7",
        "8",
        "9",
        "passthrough/8",
        "passthrough/9",
        "passthrough/x",
        "other",
    ] {
        std::fs::create_dir_all(cache.join(d)).unwrap();
        std::fs::write(cache.join(d).join("f"), b"x").unwrap();
    }
    // A link named like a snapshot is not followed.
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("keep"), b"x").unwrap();
    std::os::unix::fs::symlink(&outside, cache.join("10")).unwrap();
    let live: std::collections::HashSet<u64> = [8].into();
    assert_eq!(remote.remove_orphan_caches(&live), 2);
    for (d, kept) in [
        ("7", true),
        ("8", true),
        ("9", false),
        ("passthrough/8", true),
        ("passthrough/9", false),
        ("passthrough/x", true),
        ("other", true),
    ] {
        assert_eq!(cache.join(d).exists(), kept, "{d}");
    }
    assert!(outside.join("keep").exists());
    remote.release(7);
}

#[tokio::test]
async fn a_plan_without_labels_is_an_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let (remote, mounter) = fake_remote(dir.path());
    let Err(e) = remote.plan(&BTreeMap::new()).await else {
        panic!("planned without labels");
    };
    assert_eq!(e.status("t").code(), tonic::Code::InvalidArgument);
    assert!(mounter.calls().is_empty());
}

/// Serves `blob` for any GET on 127.0.0.1 (whole, ignoring ranges), one connection at a time.
async fn serve_blob(blob: Vec<u8>) -> std::net::SocketAddr {
    let n = blob.len();
    serve_blob_held(blob, n, Arc::new(tokio::sync::Notify::new())).await
}

/// As [`serve_blob`], but each answer stops after `held_from` bytes until `gate` is notified.
async fn serve_blob_held(
    blob: Vec<u8>,
    held_from: usize,
    gate: Arc<tokio::sync::Notify>,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut head = Vec::new();
            let mut b = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&b[..n]),
                }
            }
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                blob.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.write_all(&blob[..held_from]).await;
            if held_from < blob.len() {
                gate.notified().await;
                let _ = s.write_all(&blob[held_from..]).await;
            }
            let _ = s.shutdown().await;
        }
    });
    addr
}

/// A remote (fake mounter, background fetch off) pulling in full from the blob server at
/// `addr`, with one unpack per image (`tweak` changes more), and the layer list of a one-layer
/// image there.
async fn one_layer_image(
    root: &Path,
    addr: std::net::SocketAddr,
    layer: &Descriptor,
    tweak: impl FnOnce(&mut crate::config::ParallelPullUnpack),
) -> (
    Arc<Remote>,
    soci_registry::Repository,
    Arc<super::ImageLayers>,
) {
    let mut cfg = Config::default();
    cfg.background_fetch.disable = true;
    cfg.resolver.plain_http_hosts = vec![addr.to_string()];
    cfg.pull_modes
        .parallel_pull_unpack
        .max_concurrent_unpacks_per_image = 1;
    tweak(&mut cfg.pull_modes.parallel_pull_unpack);
    let remote =
        Arc::new(Remote::with_mounter(root, &cfg, Arc::new(FakeMounter::default())).unwrap());
    let repo = Reference::parse(&format!("{addr}/soci-test-full:v1"))
        .unwrap()
        .repository;
    let list = remote
        .full
        .layer_list("img", async { Ok(vec![layer.clone()]) })
        .await
        .unwrap();
    (remote, repo, list)
}

/// The fallback full pull of a layer whose download was started ahead but whose spawned task
/// has not run yet: the Prepare's own call gets to the download first, and must still be
/// bound by the image's unpack limit (it used fresh limits once: 3 layers of an image
/// unpacked at once with `max_concurrent_unpacks_per_image = 2`).
#[tokio::test]
async fn a_prepare_that_starts_the_download_itself_keeps_the_image_unpack_limit() {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(6);
    h.set_mode(0o644);
    b.append_data(&mut h, "hello", &b"hello\n"[..]).unwrap();
    let blob = b.into_inner().unwrap();
    let layer = Descriptor::new(
        soci_registry::oci::MEDIA_TYPE_LAYER_TAR,
        digest_of(&blob),
        blob.len() as u64,
    );
    let addr = serve_blob(blob).await;
    let dir = tempfile::tempdir().unwrap();
    let (remote, repo, list) = one_layer_image(dir.path(), addr, &layer, |p| {
        p.experimental_parallel_pull_as_fallback = true
    })
    .await;
    // Another layer of the image is unpacking: the image's one unpack slot is taken.
    let busy = remote.full.limits.try_unpack(&list.limits).expect("slot");
    let labels = BTreeMap::from([(
        soci_index::labels::IMAGE_LAYERS.to_string(),
        layer.digest.to_string(),
    )]);
    // Spawned, but on this single-threaded runtime not run before the Prepare's call below.
    remote
        .full
        .start_downloads(&repo, &labels, &list.layers, &list.limits, |_| true);
    let fs = dir.path().join("fs");
    let unpack = remote.full.unpack_full(&fs, &repo, &layer, &list.limits);
    tokio::pin!(unpack);
    let early = tokio::time::timeout(std::time::Duration::from_millis(500), &mut unpack).await;
    assert!(
        early.is_err(),
        "unpacked while the image's only unpack slot was taken: {early:?}"
    );
    assert_eq!(remote.full.stats().spooled.load(Ordering::Relaxed), 1);
    drop(busy);
    tokio::time::timeout(std::time::Duration::from_secs(10), &mut unpack)
        .await
        .expect("unpacks once the slot is free")
        .expect("unpack");
    assert_eq!(std::fs::read(fs.join("hello")).unwrap(), b"hello\n");
    assert_eq!(
        remote.full.stats().peak_unpacking.load(Ordering::Relaxed),
        1
    );
}

/// A layer spooled for want of an unpack slot starts unpacking when the slot frees, from its
/// temp file while the download goes on; and its unpacked tree is used only if the whole
/// blob's digest matched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spooled_layer_unpacks_while_it_downloads_and_only_a_verified_one_is_used() {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(6);
    h.set_mode(0o644);
    b.append_data(&mut h, "first", &b"first\n"[..]).unwrap();
    let big: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut h = tar::Header::new_gnu();
    h.set_size(big.len() as u64);
    h.set_mode(0o644);
    b.append_data(&mut h, "second", &big[..]).unwrap();
    let blob = b.into_inner().unwrap();
    for tampered in [false, true] {
        let mut served = blob.clone();
        if tampered {
            let last = served.len() - 2048;
            served[last] ^= 1; // in the tar's end padding: unpacks fine, digest differs
        }
        let layer = Descriptor::new(
            soci_registry::oci::MEDIA_TYPE_LAYER_TAR,
            digest_of(&blob),
            blob.len() as u64,
        );
        let gate = Arc::new(tokio::sync::Notify::new());
        let addr = serve_blob_held(served, 64 * 1024, gate.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let (remote, repo, list) = one_layer_image(dir.path(), addr, &layer, |_| {}).await;
        let busy = remote.full.limits.try_unpack(&list.limits).expect("slot");
        let fs = dir.path().join("fs");
        let task = {
            let (remote, fs, repo, layer, limits) = (
                remote.clone(),
                fs.clone(),
                repo.clone(),
                layer.clone(),
                list.limits.clone(),
            );
            tokio::spawn(async move { remote.full.unpack_full(&fs, &repo, &layer, &limits).await })
        };
        // The download is held after 64 KiB; the slot frees: "first" appears in the staging
        // directory before the download can end.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(remote.full.stats().spooled.load(Ordering::Relaxed), 1);
        drop(busy);
        let staged_first = || {
            std::fs::read_dir(dir.path().join("tmp"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| e.path().join("first").exists())
        };
        let t0 = std::time::Instant::now();
        while !staged_first() {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(10),
                "the unpack did not start while the download was held"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(!task.is_finished());
        gate.notify_one();
        let r = tokio::time::timeout(std::time::Duration::from_secs(10), task)
            .await
            .expect("bounded")
            .unwrap();
        if tampered {
            let e = r.expect_err("digest mismatch");
            assert!(e.to_string().contains("digest"), "{e}");
            assert!(!fs.exists(), "an unverified tree was moved into place");
        } else {
            r.expect("unpacked");
            assert_eq!(std::fs::read(fs.join("second")).unwrap(), big);
        }
        assert_eq!(
            remote.full.stats().peak_unpacking.load(Ordering::Relaxed),
            1
        );
    }
}

#[test]
fn layers_naming_one_ztoc_with_different_checkpoint_indexes_are_prepared_apart() {
    use super::resolver::prepared_key;
    let plain = Descriptor::new(soci_index::MEDIA_TYPE_ZTOC, digest_of(b"ztoc"), 4);
    assert_eq!(
        prepared_key(&plain),
        plain.digest,
        "no index: the zTOC digest"
    );
    let with = |idx: &str| {
        let mut d = plain.clone();
        d.annotations
            .insert(soci_index::ANNOTATION_CHECKPOINT_INDEX.into(), idx.into());
        d
    };
    let (a, b) = (with("AAAA"), with("BBBB"));
    assert_ne!(prepared_key(&a), prepared_key(&plain));
    assert_ne!(prepared_key(&a), prepared_key(&b));
    assert_eq!(prepared_key(&a), prepared_key(&with("AAAA")));
}
