//! The FUSE dispatcher over a small layer: any bytes the kernel could write to /dev/fuse.
//! Checks that nothing panics, that a request expecting a reply gets exactly one well-formed
//! reply under its own id (READ's from a task, waited for), and that none gets more.
#![no_main]
use std::future::Future;
use std::io::IoSlice;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use soci_fs::kernel::{op, ReplySink, Request, Session};
use soci_fs::{DiskBudget, FsMetrics, LayerFs, LayerTree, MemoryCache, RangeReader, Served};
use soci_fs::{SpanConfig, SpanManager};

#[derive(Default)]
struct Sink {
    replies: Mutex<Vec<Vec<u8>>>,
    cv: Condvar,
}

impl ReplySink for Sink {
    fn send(&self, parts: &[IoSlice<'_>]) {
        let m: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        self.replies.lock().unwrap().push(m);
        self.cv.notify_all();
    }
}

struct Blob(Vec<u8>);

impl RangeReader for Blob {
    fn read_range(
        &self,
        range: Range<u64>,
        _deadline: tokio::time::Instant,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Bytes>> + Send + '_>> {
        let r = self
            .0
            .get(range.start as usize..range.end as usize)
            .map(|b| Bytes::copy_from_slice(b))
            .ok_or_else(|| std::io::Error::other("out of range"));
        Box::pin(async move { r })
    }
}

struct Fixture {
    fs: LayerFs,
    sink: Arc<Sink>,
    _rt: tokio::runtime::Runtime,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |name: &str, typ: tar::EntryType, body: &[u8], link: Option<&str>| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(typ);
            h.set_size(body.len() as u64);
            h.set_mode(0o755);
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            b.append_data(&mut h, name, body).unwrap();
        };
        let data: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
        add("f", tar::EntryType::Regular, &data, None);
        add("l", tar::EntryType::Symlink, b"", Some("f"));
        add("d/", tar::EntryType::Directory, b"", None);
        for i in 0..20 {
            add(&format!("d/e{i}"), tar::EntryType::Regular, b"x", None);
        }
        add("o/.wh..wh..opq", tar::EntryType::Regular, b"", None);
        add(".wh.w", tar::EntryType::Regular, b"", None);
        let blob = b.into_inner().unwrap();
        let z = soci_ztoc::build(blob.as_slice(), &Default::default()).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let metrics = Arc::new(FsMetrics::default());
        let cfg = SpanConfig {
            cache_dir: std::env::temp_dir().join(format!("soci-fuzz-dispatch-{}", std::process::id())),
            disable_verification: false,
            max_verification_retries: 0,
            fetch_timeout: Duration::from_secs(5),
            poisoned_ttl: soci_fs::POISONED_SPAN_TTL,
            memory: MemoryCache::new(1 << 20),
            disk: DiskBudget::new(0),
        };
        let spans = SpanManager::new(
            "sha256:fuzz".into(),
            z.spans().unwrap(),
            Arc::new(Blob(blob)),
            cfg,
            metrics.clone(),
        )
        .unwrap();
        let served = Served {
            tree: Arc::new(LayerTree::build(&z).unwrap()),
            spans,
            rt: rt.handle().clone(),
            ttl: Duration::from_secs(1),
            metrics,
            passthrough: None,
        };
        let session = Session { minor: 40, resend: true };
        Fixture { fs: LayerFs::new(served, session), sink: Arc::new(Sink::default()), _rt: rt }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let sink: Arc<dyn ReplySink> = f.sink.clone();
    f.fs.dispatch(data, &sink);
    let (want, unique) = match Request::parse(data) {
        Ok(r) => (usize::from(r.op.expects_reply()), Some(r.header.unique)),
        Err(_) => {
            let opcode = data.get(4..8).map(|b| u32::from_ne_bytes(b.try_into().unwrap()));
            let none = matches!(opcode, None | Some(op::FORGET | op::BATCH_FORGET | op::INTERRUPT));
            let unique = data.get(8..16).map(|b| u64::from_ne_bytes(b.try_into().unwrap()));
            (usize::from(!none && unique.is_some()), unique)
        }
    };
    let g = f.sink.replies.lock().unwrap();
    let (mut g, _) = f
        .sink
        .cv
        .wait_timeout_while(g, Duration::from_secs(10), |r| r.len() < want)
        .unwrap();
    let replies = std::mem::take(&mut *g);
    assert_eq!(replies.len(), want, "replies to one request");
    for r in replies {
        assert!(r.len() >= 16);
        assert_eq!(u32::from_ne_bytes(r[0..4].try_into().unwrap()) as usize, r.len());
        let error = i32::from_ne_bytes(r[4..8].try_into().unwrap());
        assert!(error <= 0 && error > -4096, "error {error}");
        assert_eq!(Some(u64::from_ne_bytes(r[8..16].try_into().unwrap())), unique);
        if error < 0 {
            assert_eq!(r.len(), 16, "an error reply has no payload");
        }
    }
});
