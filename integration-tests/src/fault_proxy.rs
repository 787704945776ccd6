//! An HTTP/1.1 proxy in front of the real registry that injects faults into span fetches
//! (ranged blob GETs): 5xx, 429 with Retry-After, connection reset mid-body, truncated body,
//! a stall longer than the read timeout, a flipped byte. Other requests pass through.

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
        let (st, ap, up) = (state.clone(), applied.clone(), upstream.to_string());
        rt.spawn(async move {
            while let Ok((c, _)) = listener.accept().await {
                tokio::spawn(serve(c, up.clone(), st.clone(), ap.clone()));
            }
        });
        FaultProxy {
            addr,
            state,
            applied,
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
) {
    while let Some(head) = read_head(&mut c).await {
        let text = String::from_utf8_lossy(&head).to_string();
        let span_fetch = text.starts_with("GET ")
            && text.contains("/blobs/")
            && text.to_ascii_lowercase().contains("\r\nrange:");
        let fault = if span_fetch { take_fault(&state) } else { None };
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
