//! A switchable HTTP/1.1 gate in front of the real registry, to take it down and bring it back
//! at the same address: open (forward everything), blobs down (503 for every blob request,
//! manifests still served), down (every connection closed at once, like a dead registry), or
//! holding span fetches (ranged blob GETs wait until the mode changes, so reads stay in
//! flight inside the daemon).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the gate lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateMode {
    /// Forward every request.
    Open = 0,
    /// Answer 503 instead of any blob larger than 64 KiB (layers, spans; image configs and
    /// small zTOCs still pass, so clients get as far as pulling layers); forward the rest.
    BlobsDown = 1,
    /// Close every connection without an answer.
    Down = 2,
    /// Hold every ranged blob GET (span fetch; of the blobs named by [`Gate::hold_only`] if
    /// any) until the mode changes (at most two minutes), then handle it in the new mode;
    /// forward the rest.
    HoldRanges = 3,
}

/// A running gate; stopped when dropped.
pub struct Gate {
    /// `127.0.0.1:PORT` to point clients at.
    pub addr: String,
    mode: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    held: Arc<AtomicUsize>,
    only: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Gate {
    /// Starts an open gate forwarding to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind gate");
        let addr = listener.local_addr().unwrap().to_string();
        let mode = Arc::new(AtomicU8::new(GateMode::Open as u8));
        let stop = Arc::new(AtomicBool::new(false));
        let held = Arc::new(AtomicUsize::new(0));
        let only = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (m, st, h, o, up) = (
            mode.clone(),
            stop.clone(),
            held.clone(),
            only.clone(),
            upstream.to_string(),
        );
        std::thread::spawn(move || {
            for c in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(c) = c else { continue };
                let (m, h, o, up) = (m.clone(), h.clone(), o.clone(), up.clone());
                std::thread::spawn(move || serve(c, &up, &m, &h, &o));
            }
        });
        Gate {
            addr,
            mode,
            stop,
            held,
            only,
        }
    }

    /// [`GateMode::HoldRanges`] holds only ranged GETs of these blobs (e.g. the layers, not
    /// their zTOCs, which a mount may also read by ranges).
    pub fn hold_only(&self, digests: &[String]) {
        *self.only.lock().unwrap() = digests.to_vec();
    }

    /// Span fetches waiting at the gate now ([`GateMode::HoldRanges`]).
    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// Switches what the gate lets through (connections opened later see the new mode).
    pub fn set(&self, mode: GateMode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
    }
}

fn read_head(c: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if c.read(&mut b).ok()? == 0 || head.len() > 65536 {
            return None;
        }
        head.push(b[0]);
    }
    Some(head)
}

fn serve(
    mut c: TcpStream,
    upstream: &str,
    mode: &AtomicU8,
    held: &AtomicUsize,
    only: &std::sync::Mutex<Vec<String>>,
) {
    let _ = c.set_read_timeout(Some(Duration::from_secs(60)));
    while let Some(head) = read_head(&mut c) {
        let text = String::from_utf8_lossy(&head).to_string();
        let ranged_blob = text.starts_with("GET ")
            && text.contains("/blobs/")
            && text.to_ascii_lowercase().contains("\r\nrange:")
            && {
                let only = only.lock().unwrap();
                only.is_empty() || only.iter().any(|d| text.contains(d.as_str()))
            };
        if ranged_blob && mode.load(Ordering::SeqCst) == GateMode::HoldRanges as u8 {
            held.fetch_add(1, Ordering::SeqCst);
            let deadline = Instant::now() + Duration::from_secs(120);
            while mode.load(Ordering::SeqCst) == GateMode::HoldRanges as u8
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            held.fetch_sub(1, Ordering::SeqCst);
        }
        let m = mode.load(Ordering::SeqCst);
        if m == GateMode::Down as u8 {
            return;
        }
        let blob = text.starts_with("GET ") && text.contains("/blobs/");
        let Ok(mut u) = TcpStream::connect(upstream) else {
            return;
        };
        let req = format!("{}Connection: close\r\n\r\n", &text[..text.len() - 2]);
        if u.write_all(req.as_bytes()).is_err() {
            return;
        }
        // Request bodies (pushes) do not go through the gate.
        let mut resp = Vec::new();
        if u.read_to_end(&mut resp).is_err() {
            return;
        }
        if m == GateMode::BlobsDown as u8 && blob && content_length(&resp) > 64 << 10 {
            let _ = c.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
            continue;
        }
        // The registry's `Connection: close` stays: the client opens a new connection next.
        let _ = c.write_all(&resp);
        return;
    }
}

/// The `Content-Length` of an HTTP response (0 if absent).
fn content_length(resp: &[u8]) -> u64 {
    let end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(resp.len());
    String::from_utf8_lossy(&resp[..end])
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0)
}
