//! An HTTP/1.1 proxy in front of the real registry that injects faults into span fetches
//! (ranged blob GETs): 5xx, 429 with Retry-After, connection reset mid-body, truncated body,
//! a stall longer than the read timeout, a flipped byte; and hostile answers: Range ignored
//! (200 with the whole blob), no `Content-Range`, a `Content-Range` or `Content-Length` that
//! lies, no answer at all. Other requests pass through. Every blob GET is counted.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A fault to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer 503 without asking the registry.
    ServerError,
    /// Answer 429 with `Retry-After: 1`.
    TooManyRequests,
    /// Send the headers and half the body, then reset the connection.
    ResetMidBody,
    /// Send the headers and half the body, then close.
    Truncate,
    /// Send the headers and half the body, then stall for a minute.
    Stall,
    /// Flip one byte of the body.
    FlipByte,
    /// Ask the registry without `Range`: 200 with the whole blob.
    IgnoreRange,
    /// Remove `Content-Range` from the 206 answer.
    DropContentRange,
    /// `Content-Range` one byte later than the bytes sent.
    ShiftContentRange,
    /// `Content-Length` 100 bytes longer than the body, then close.
    LongContentLength,
    /// `Content-Length` one byte shorter than the body, then close.
    ShortContentLength,
    /// Accept the request and never answer.
    StallHeaders,
    /// Answer 403 with no `WWW-Authenticate` challenge, as ECR answers an expired token; only
    /// span fetches that carry an `Authorization` header count (others pass through).
    ForbiddenIfAuthorized,
}

/// Blob GETs seen by the proxy.
#[derive(Debug, Default, Clone)]
pub struct BlobGets {
    /// Path of each GET with a `Range` header.
    pub ranged: Vec<String>,
    /// Path of each GET without one.
    pub whole: Vec<String>,
}

#[derive(Default)]
struct State {
    fault: Option<Fault>,
    remaining: u32,
}

/// A running proxy; stopped when dropped.
pub struct FaultProxy {
    /// `127.0.0.1:PORT` to point clients at.
    pub addr: String,
    state: Arc<Mutex<State>>,
    applied: Arc<AtomicU32>,
    gets: Arc<Mutex<BlobGets>>,
    _rt: tokio::runtime::Runtime,
}

impl FaultProxy {
    /// Starts a proxy forwarding to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> FaultProxy {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let state = Arc::new(Mutex::new(State::default()));
        let applied = Arc::new(AtomicU32::new(0));
        let gets = Arc::new(Mutex::new(BlobGets::default()));
        let (st, ap, up, g) = (
            state.clone(),
            applied.clone(),
            upstream.to_string(),
            gets.clone(),
        );
        rt.spawn(async move {
            while let Ok((c, _)) = listener.accept().await {
                tokio::spawn(serve(c, up.clone(), st.clone(), ap.clone(), g.clone()));
            }
        });
        FaultProxy {
            addr,
            state,
            applied,
            gets,
            _rt: rt,
        }
    }

    /// Injects `fault` into the next `count` span fetches (`u32::MAX`: until cleared).
    pub fn inject(&self, fault: Fault, count: u32) {
        *self.state.lock().unwrap() = State {
            fault: Some(fault),
            remaining: count,
        };
    }

    /// Stops injecting.
    pub fn clear(&self) {
        *self.state.lock().unwrap() = State::default();
    }

    /// Faults injected so far.
    pub fn applied(&self) -> u32 {
        self.applied.load(Ordering::SeqCst)
    }

    /// Blob GETs seen so far.
    pub fn blob_gets(&self) -> BlobGets {
        self.gets.lock().unwrap().clone()
    }
}

/// Replaces (or with `None` removes) header `name` in a response head.
fn set_header(head: &str, name: &str, value: Option<String>) -> String {
    let prefix = format!("{}:", name.to_ascii_lowercase());
    let mut out = String::new();
    for line in head.split_inclusive("\r\n") {
        if line.to_ascii_lowercase().starts_with(&prefix) {
            if let Some(v) = &value {
                out.push_str(&format!("{name}: {v}\r\n"));
            }
        } else {
            out.push_str(line);
        }
    }
    out
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    let prefix = format!("{}:", name.to_ascii_lowercase());
    head.split("\r\n")
        .find(|l| l.to_ascii_lowercase().starts_with(&prefix))
        .map(|l| l[prefix.len()..].trim())
}

fn take_fault(state: &Mutex<State>) -> Option<Fault> {
    let mut s = state.lock().unwrap();
    if s.remaining == 0 {
        return None;
    }
    if s.remaining != u32::MAX {
        s.remaining -= 1;
    }
    s.fault
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

/// Makes closing `c` send a TCP reset (zero linger: nothing blocks on drop).
#[allow(deprecated)]
fn reset_on_close(c: &TcpStream) {
    let _ = c.set_linger(Some(Duration::ZERO));
}

async fn serve(
    mut c: TcpStream,
    upstream: String,
    state: Arc<Mutex<State>>,
    applied: Arc<AtomicU32>,
    gets: Arc<Mutex<BlobGets>>,
) {
    while let Some(head) = read_head(&mut c).await {
        let mut text = String::from_utf8_lossy(&head).to_string();
        let ranged = text.to_ascii_lowercase().contains("\r\nrange:");
        let span_fetch = text.starts_with("GET ") && text.contains("/blobs/") && ranged;
        if text.starts_with("GET ") && text.contains("/blobs/") {
            let path = text.split(' ').nth(1).unwrap_or("").to_string();
            let mut g = gets.lock().unwrap();
            if ranged {
                g.ranged.push(path);
            } else {
                g.whole.push(path);
            }
        }
        let authorized = text.to_ascii_lowercase().contains("\r\nauthorization:");
        let forbid_mode = state.lock().unwrap().fault == Some(Fault::ForbiddenIfAuthorized);
        let fault = if span_fetch && (authorized || !forbid_mode) {
            take_fault(&state)
        } else {
            None
        };
        if fault.is_some() {
            applied.fetch_add(1, Ordering::SeqCst);
        }
        match fault {
            Some(Fault::ServerError) => {
                let _ = c
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
                    .await;
                continue;
            }
            Some(Fault::TooManyRequests) => {
                let _ = c.write_all(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n").await;
                continue;
            }
            Some(Fault::StallHeaders) => {
                tokio::time::sleep(Duration::from_secs(60)).await;
                return;
            }
            Some(Fault::ForbiddenIfAuthorized) => {
                let _ = c
                    .write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 6\r\n\r\ndenied")
                    .await;
                continue;
            }
            Some(Fault::IgnoreRange) => {
                text = format!("{}\r\n", set_header(&text[..text.len() - 2], "Range", None));
            }
            _ => {}
        }
        // One upstream connection per request, closed by the registry after the response.
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
        let mut body = body.to_vec();
        let lie = |h: &str| -> Option<String> {
            match fault? {
                Fault::DropContentRange => Some(set_header(h, "Content-Range", None)),
                Fault::ShiftContentRange => {
                    let cr = header(h, "Content-Range")?;
                    let (span, total) = cr.strip_prefix("bytes ")?.split_once('/')?;
                    let (a, b) = span.split_once('-')?;
                    let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
                    Some(set_header(
                        h,
                        "Content-Range",
                        Some(format!("bytes {}-{}/{total}", a + 1, b + 1)),
                    ))
                }
                Fault::LongContentLength => Some(set_header(
                    h,
                    "Content-Length",
                    Some((body.len() + 100).to_string()),
                )),
                Fault::ShortContentLength => Some(set_header(
                    h,
                    "Content-Length",
                    Some(body.len().saturating_sub(1).to_string()),
                )),
                _ => None,
            }
        };
        if let Some(h) = lie(&String::from_utf8_lossy(rhead)) {
            let h = h.replace("Connection: close\r\n", "");
            let _ = c.write_all(h.as_bytes()).await;
            let _ = c.write_all(&body).await;
            if matches!(
                fault,
                Some(Fault::LongContentLength | Fault::ShortContentLength)
            ) {
                // The lengths no longer frame the stream: end the connection.
                return;
            }
            continue;
        }
        let half = body.len() / 2;
        match fault {
            Some(Fault::FlipByte) if !body.is_empty() => body[half] ^= 0xff,
            Some(Fault::ResetMidBody | Fault::Truncate | Fault::Stall) => {
                let _ = c.write_all(rhead).await;
                let _ = c.write_all(&body[..half]).await;
                match fault {
                    Some(Fault::ResetMidBody) => reset_on_close(&c),
                    Some(Fault::Stall) => tokio::time::sleep(Duration::from_secs(60)).await,
                    _ => {}
                }
                return;
            }
            _ => {}
        }
        // The registry said `Connection: close`; keep the client's connection usable.
        let rhead = String::from_utf8_lossy(rhead).replace("Connection: close\r\n", "");
        if c.write_all(rhead.as_bytes()).await.is_err() || c.write_all(&body).await.is_err() {
            return;
        }
    }
}
