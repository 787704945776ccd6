//! Reads a daemon took from `/dev/fuse` and did not answer before a kill -9 are answered by the
//! next daemon (`FUSE_NOTIFY_RESEND`), for every reader, including others waiting on the same
//! page: nothing hangs. Real registry (behind a gate that holds span fetches), containerd,
//! the daemon and its fd holder.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::containerd::Containerd;
use integration_tests::daemon::SociDaemon;
use integration_tests::image::{push_busybox_image, random_bytes, Entry};
use integration_tests::registry::Registry;
use integration_tests::{bin, run, sha256_hex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A proxy in front of the registry that, while closed, holds every span fetch (ranged blob
/// GET) until it opens (at most two minutes), so demand reads stay in flight in the daemon.
struct Gate {
    addr: String,
    open: Arc<AtomicBool>,
    held: Arc<AtomicUsize>,
    _rt: tokio::runtime::Runtime,
}

impl Gate {
    fn start(upstream: &str) -> Gate {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let open = Arc::new(AtomicBool::new(true));
        let held = Arc::new(AtomicUsize::new(0));
        let (o, h, up) = (open.clone(), held.clone(), upstream.to_string());
        rt.spawn(async move {
            while let Ok((c, _)) = listener.accept().await {
                tokio::spawn(forward(c, up.clone(), o.clone(), h.clone()));
            }
        });
        Gate {
            addr,
            open,
            held,
            _rt: rt,
        }
    }

    /// Span fetches waiting at the closed gate now.
    fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }
}

async fn read_head(c: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if c.read(&mut b).await.ok()? == 0 || head.len() > 65536 {
            return None;
        }
        head.push(b[0]);
    }
    Some(head)
}

async fn forward(
    mut c: TcpStream,
    upstream: String,
    open: Arc<AtomicBool>,
    held: Arc<AtomicUsize>,
) {
    while let Some(head) = read_head(&mut c).await {
        let text = String::from_utf8_lossy(&head).to_string();
        let span_fetch = text.starts_with("GET ")
            && text.contains("/blobs/")
            && text.to_ascii_lowercase().contains("\r\nrange:");
        if span_fetch && !open.load(Ordering::SeqCst) {
            held.fetch_add(1, Ordering::SeqCst);
            let deadline = Instant::now() + Duration::from_secs(120);
            while !open.load(Ordering::SeqCst) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            held.fetch_sub(1, Ordering::SeqCst);
        }
        let Ok(mut u) = TcpStream::connect(&upstream).await else {
            return;
        };
        let req = format!("{}Connection: close\r\n\r\n", &text[..text.len() - 2]);
        if u.write_all(req.as_bytes()).await.is_err() {
            return;
        }
        let mut resp = Vec::new();
        if u.read_to_end(&mut resp).await.is_err() {
            return;
        }
        let Some(split) = resp
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| i + 4)
        else {
            return;
        };
        let (rhead, body) = resp.split_at(split);
        let rhead = String::from_utf8_lossy(rhead).replace("Connection: close\r\n", "");
        if c.write_all(rhead.as_bytes()).await.is_err() || c.write_all(body).await.is_err() {
            return;
        }
    }
}

fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn reads_in_flight_at_kill_9_are_answered_by_the_next_daemon() {
    let reg = Registry::start();
    let tmp = tempfile::Builder::new()
        .prefix("fuse-resend")
        .tempdir_in("/tmp")
        .unwrap();
    let mut data = vec![Entry::Dir("data/".into())];
    let mut sums = Vec::new();
    for i in 0..3u64 {
        let bytes = random_bytes(3 << 20, 900 + i);
        sums.push(sha256_hex(&bytes));
        data.push(Entry::File(format!("data/f{i}"), bytes, 0o644));
    }
    let repo = push_busybox_image(&reg, tmp.path(), "fuseresend", data, &["/bin/true"]);
    run(Command::new(bin("soci")).args([
        "convert",
        "--plain-http",
        "--min-layer-size",
        "1000000",
        "--span-size",
        "1048576",
        &format!("{repo}:v1"),
        &format!("{repo}:soci"),
    ]))
    .unwrap();

    let gate = Gate::start(&reg.addr);
    let config = format!(
        "[resolver]\nplain_http_hosts = [\"{}\"]\n[background_fetch]\ndisable = true\n[fuse]\nholder_timeout_sec = 120\n",
        gate.addr
    );
    let mut daemon = SociDaemon::start(&tmp.path().join("d"), &config);
    let ctd = Containerd::start_with_soci(&daemon.socket);
    let image = format!("{}/fuseresend:soci", gate.addr);
    ctd.soci(&["image", "rpull", "--plain-http", &image]);

    // Two long-running containers; on /out/go each starts one reader per listed file, 0.2 s
    // apart, and writes each reader's sha256sum to /out/<id>-<n>. f0 is read three times:
    // twice in the first container (the second waits on the page the first one's read
    // locked), once in the other.
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let mount = format!("type=bind,src={},dst=/out,options=rbind:rw", out.display());
    let pid = std::process::id();
    let readers = [
        (format!("fuse{pid}a"), vec![0, 1, 0]),
        (format!("fuse{pid}b"), vec![0, 2]),
    ];
    for (id, files) in &readers {
        let list: Vec<String> = files.iter().map(|f| format!("f{f}")).collect();
        let script = format!(
            "touch /out/ready-{id}; while [ ! -e /out/go ]; do sleep 0.05; done; i=0; \
             for f in {}; do \
             (if sha256sum /data/$f > /out/t-{id}-$i 2>&1; then mv /out/t-{id}-$i /out/{id}-$i; \
             else echo failed > /out/{id}-$i; fi) & i=$((i+1)); sleep 0.2; done; sleep 3600",
            list.join(" ")
        );
        ctd.ctr_ok(&[
            "run",
            "-d",
            "--snapshotter",
            "soci",
            "--mount",
            &mount,
            &image,
            id,
            "/bin/sh",
            "-c",
            &script,
        ]);
    }
    for (id, _) in &readers {
        let ready = out.join(format!("ready-{id}"));
        wait_for("containers ready", Duration::from_secs(60), || {
            ready.exists()
        });
    }
    let fuse_mounts = |d: &SociDaemon| {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(" - fuse.soci soci ") && l.contains(d.root.to_str().unwrap()))
            .count()
    };
    let lazy = fuse_mounts(&daemon);
    assert!(lazy >= 1, "no lazy mounts");

    // Close the gate, start the readers: their reads reach the daemon, which waits on the
    // registry with the requests taken from /dev/fuse.
    gate.open.store(false, Ordering::SeqCst);
    std::fs::write(out.join("go"), b"").unwrap();
    wait_for(
        "span fetches held at the gate",
        Duration::from_secs(30),
        || gate.held() >= 2,
    );
    std::thread::sleep(Duration::from_secs(1));
    let results: Vec<std::path::PathBuf> = readers
        .iter()
        .flat_map(|(id, files)| (0..files.len()).map(move |n| format!("{id}-{n}")))
        .map(|name| out.join(name))
        .collect();
    assert!(
        results.iter().all(|r| !r.exists()),
        "a read completed with the registry held"
    );

    // Crash with the reads in flight; the next daemon resumes the mounts; the registry
    // answers again.
    daemon.kill9();
    assert_eq!(fuse_mounts(&daemon), lazy, "the fd holder keeps the mounts");
    daemon.restart();
    wait_for("mounts resumed", Duration::from_secs(60), || {
        daemon
            .log_text()
            .matches("serving the mount kept by the fd holder again")
            .count()
            >= lazy
    });
    gate.open.store(true, Ordering::SeqCst);

    // Every reader finishes, with the right bytes, in bounded time.
    let deadline = Instant::now() + Duration::from_secs(60);
    for ((id, files), _) in readers.iter().zip(0..) {
        for (n, f) in files.iter().enumerate() {
            let path = out.join(format!("{id}-{n}"));
            let got = loop {
                if let Ok(s) = std::fs::read_to_string(&path) {
                    break s;
                }
                assert!(
                    Instant::now() < deadline,
                    "reader {n} of {id} (data/f{f}) still blocked 60 s after the restart: \
                     the read the killed daemon took was never answered\n{}",
                    daemon.log_text()
                );
                std::thread::sleep(Duration::from_millis(50));
            };
            let sum = got.split_whitespace().next().unwrap_or("");
            assert_eq!(sum, sums[*f], "{id}-{n}: {got}");
        }
    }
    let log = daemon.log_text();
    assert!(
        log.contains("asked the kernel to resend FUSE requests"),
        "no resend asked for:\n{log}"
    );
    assert!(
        log.contains("answering a request the kernel sent again"),
        "no resent request seen:\n{log}"
    );

    for (id, _) in &readers {
        let _ = ctd.ctr(&["task", "kill", "-s", "SIGKILL", id]);
    }
    std::thread::sleep(Duration::from_millis(300));
    for (id, _) in &readers {
        let _ = ctd.ctr(&["task", "delete", "-f", id]);
        let _ = ctd.ctr(&["container", "delete", id]);
    }
}
