//! Tests of the FUSE server against a socket standing in for `/dev/fuse`: what a resumed
//! daemon writes, and how it answers a request the kernel sent again.

use std::future::Future;
use std::io;
use std::ops::Range;
use std::pin::Pin;

use bytes::Bytes;
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout};

use crate::kernel::{notify_resend, UNIQUE_RESEND};
use crate::kernel::{op, Session};
use crate::mount::{resume, Served};
use crate::spans::{FsMetrics, SpanManager};
use crate::spans::{RangeReader, SpanCache, SpanConfig};
use crate::tree::LayerTree;

/// The layer blob in memory; `panics` makes every read panic.
struct Blob(Vec<u8>, bool);

impl RangeReader for Blob {
    fn read_range(
        &self,
        range: Range<u64>,
        _deadline: tokio::time::Instant,
    ) -> Pin<Box<dyn Future<Output = io::Result<Bytes>> + Send + '_>> {
        assert!(!self.1, "reader bug");
        let data = self.0[range.start as usize..range.end as usize].to_vec();
        Box::pin(async move { Ok(Bytes::from(data)) })
    }
}

/// A one-file layer ("f") served from memory, and the file's bytes.
fn served(rt: &tokio::runtime::Runtime, dir: &Path) -> (Served, Vec<u8>) {
    served_by(rt, dir, false)
}

fn served_by(rt: &tokio::runtime::Runtime, dir: &Path, panics: bool) -> (Served, Vec<u8>) {
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    b.append_data(&mut h, "f", data.as_slice()).unwrap();
    let blob = b.into_inner().unwrap();
    let opts = soci_ztoc::BuildOptions {
        span_size: 65536,
        ..Default::default()
    };
    let z = soci_ztoc::build(blob.as_slice(), &opts).unwrap();
    let metrics = Arc::new(FsMetrics::default());
    let cfg = SpanConfig {
        cache_dir: dir.join("cache"),
        disable_verification: false,
        max_verification_retries: 0,
        fetch_timeout: Duration::from_secs(5),
        poisoned_ttl: crate::cache::POISONED_SPAN_TTL,
        cache: SpanCache::new(1 << 20, 0),
        read_ahead_spans: 0,
    };
    let spans = SpanManager::new(
        "sha256:test".into(),
        z.spans().unwrap(),
        Arc::new(Blob(blob, panics)),
        cfg,
        metrics.clone(),
    )
    .unwrap();
    let s = Served {
        tree: Arc::new(LayerTree::build(&z).unwrap()),
        spans,
        rt: rt.handle().clone(),
        timeouts: crate::CacheTimeouts::all(Duration::from_secs(1)),
        metrics,
        passthrough: None,
    };
    (s, data)
}

/// A connected pair: (our side, the "kernel" side), packets kept whole like `/dev/fuse`.
fn device() -> (OwnedFd, OwnedFd) {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap()
}

/// The next packet the "kernel" side gets, within 5 s.
fn next_packet(k: &OwnedFd) -> Option<Vec<u8>> {
    let mut p = [PollFd::new(k.as_fd(), PollFlags::POLLIN)];
    if nix::poll::poll(&mut p, PollTimeout::from(5000u16)).unwrap() == 0 {
        return None;
    }
    let mut buf = vec![0u8; 1 << 20];
    let n = nix::unistd::read(k, &mut buf).unwrap();
    buf.truncate(n);
    Some(buf)
}

fn read_request(unique: u64, ino: u64, offset: u64, size: u32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(40u32 + 40).to_le_bytes());
    b.extend_from_slice(&op::READ.to_le_bytes());
    b.extend_from_slice(&unique.to_le_bytes());
    b.extend_from_slice(&ino.to_le_bytes());
    b.extend_from_slice(&[0; 16]);
    b.extend_from_slice(&0u64.to_le_bytes()); // fh
    b.extend_from_slice(&offset.to_le_bytes());
    b.extend_from_slice(&size.to_le_bytes());
    b.extend_from_slice(&[0; 20]);
    b
}

#[test]
fn resumed_session_asks_for_resend_and_answers_resent_reads() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (s, data) = served(&rt, dir.path());
    let ino = s.tree.lookup(crate::tree::ROOT_INO, b"f").unwrap();
    let (ours, kernel) = device();
    let session = Session {
        minor: 40,
        resend: true,
    };
    // Not a mount point: dropping the layer's unmount finds nothing to do.
    let m = resume(s, ours, session, &dir.path().join("mnt")).unwrap();
    assert_eq!(
        next_packet(&kernel).unwrap(),
        notify_resend(),
        "first thing written: FUSE_NOTIFY_RESEND"
    );
    assert_eq!(m.session(), session);

    // The kernel queues again a READ the dead daemon took: bit 63 set, answered under the
    // same id with the right bytes.
    let unique = UNIQUE_RESEND | 0x2a;
    nix::unistd::write(&kernel, &read_request(unique, ino, 4096, 8192)).unwrap();
    let reply = next_packet(&kernel).expect("a reply to the resent read");
    assert_eq!(
        u32::from_le_bytes(reply[0..4].try_into().unwrap()) as usize,
        reply.len()
    );
    assert_eq!(i32::from_le_bytes(reply[4..8].try_into().unwrap()), 0);
    assert_eq!(u64::from_le_bytes(reply[8..16].try_into().unwrap()), unique);
    assert_eq!(&reply[16..], &data[4096..4096 + 8192]);
    assert_eq!(m.resent_requests(), 1);
    drop(m);
}

#[test]
fn resumed_session_without_resend_writes_nothing() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = served(&rt, dir.path());
    let (ours, kernel) = device();
    let session = Session {
        minor: 31,
        resend: false,
    };
    let m = resume(s, ours, session, &dir.path().join("mnt")).unwrap();
    let mut p = [PollFd::new(kernel.as_fd(), PollFlags::POLLIN)];
    assert_eq!(
        nix::poll::poll(&mut p, PollTimeout::from(300u16)).unwrap(),
        0,
        "no notification on a connection without resend"
    );
    drop(m);
}

/// Neither a panicking read nor a request that cannot be decoded leaves its caller waiting.
#[test]
fn every_request_gets_an_answer() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = served_by(&rt, dir.path(), true);
    let ino = s.tree.lookup(crate::tree::ROOT_INO, b"f").unwrap();
    let (ours, kernel) = device();
    let session = Session {
        minor: 40,
        resend: false,
    };
    let m = resume(s, ours, session, &dir.path().join("mnt")).unwrap();
    let error_of = |reply: Vec<u8>| {
        (
            reply.len(),
            i32::from_le_bytes(reply[4..8].try_into().unwrap()),
            u64::from_le_bytes(reply[8..16].try_into().unwrap()),
        )
    };
    nix::unistd::write(&kernel, &read_request(77, ino, 0, 4096)).unwrap();
    let reply = next_packet(&kernel).expect("an answer to a read whose task panicked");
    assert_eq!(error_of(reply), (16, -libc::EIO, 77));

    let mut bad = read_request(78, ino, 0, 4096);
    bad[0..4].copy_from_slice(&20u32.to_le_bytes()); // shorter than fuse_in_header
    nix::unistd::write(&kernel, &bad).unwrap();
    let reply = next_packet(&kernel).expect("an answer to a malformed request");
    assert_eq!(error_of(reply), (16, -libc::EIO, 78));
    drop(m);
}
