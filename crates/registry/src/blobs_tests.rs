//! Range reads against a tiny local HTTP server that misbehaves on purpose.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;

use super::*;
use crate::client::ClientOptions;
use crate::hosts::HostsConfig;

/// What the server sends back: raw response bytes, then either close or stall.
struct Reply {
    raw: Vec<u8>,
    stall: bool,
}

type Responder = dyn Fn(usize, Option<String>) -> Reply + Send + Sync;

/// Serves every request with `respond(request number, Range header)`; returns the address
/// and the request counter.
async fn server(respond: Arc<Responder>) -> (String, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let count = Arc::new(AtomicUsize::new(0));
    let c2 = count.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let (respond, count) = (respond.clone(), c2.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let range = text
                    .lines()
                    .find_map(|l| l.strip_prefix("range: ").map(str::to_string));
                let n = count.fetch_add(1, Ordering::SeqCst);
                let r = respond(n, range);
                let _ = s.write_all(&r.raw).await;
                if r.stall {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
            });
        }
    });
    (addr, count)
}

fn blob() -> Vec<u8> {
    (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect()
}

fn reply(status: &str, headers: &[String], body: &[u8]) -> Reply {
    let mut raw = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for h in headers {
        raw.push_str(h);
        raw.push_str("\r\n");
    }
    raw.push_str("\r\n");
    let mut raw = raw.into_bytes();
    raw.extend_from_slice(body);
    Reply { raw, stall: false }
}

fn client(addr: &str) -> (Client, Repository, Digest) {
    let opts = ClientOptions {
        hosts: HostsConfig {
            plain_http_hosts: vec![addr.to_string()],
            ..Default::default()
        },
        max_retries: 2,
        min_backoff: Duration::from_millis(10),
        ..Default::default()
    };
    let c = Client::with_credentials(opts, crate::auth::DockerConfig::default()).unwrap();
    let repo = Repository {
        registry: addr.to_string(),
        name: "r".into(),
    };
    (c, repo, Digest::of(&blob()))
}

/// A well-behaved 206 for the range header it gets.
fn good_206(range: Option<String>) -> Reply {
    let b = blob();
    let r = range.unwrap();
    let (a, z) = r
        .trim_start_matches("bytes=")
        .split_once('-')
        .map(|(a, z)| (a.parse::<usize>().unwrap(), z.parse::<usize>().unwrap()))
        .unwrap();
    reply(
        "206 Partial Content",
        &[
            format!("Content-Range: bytes {a}-{z}/{}", b.len()),
            format!("Content-Length: {}", z + 1 - a),
        ],
        &b[a..=z],
    )
}

#[tokio::test]
async fn exact_partial_answer_is_served() {
    let (addr, _) = server(Arc::new(|_, r| good_206(r))).await;
    let (c, repo, d) = client(&addr);
    let got = c.get_blob_range(&repo, &d, 100..300).await.unwrap();
    assert_eq!(&got[..], &blob()[100..300]);
    assert!(c.supports_ranges(&addr));
}

#[tokio::test]
async fn whole_blob_answer_to_a_huge_range_allocates_nothing_up_front() {
    // The range's size (1 TiB) is what a zTOC or descriptor claims; the registry ignores
    // Range and sends its 10 kB blob. Before the fix this aborted the process (allocation of
    // 1 TiB).
    let (addr, _) = server(Arc::new(|_, _| {
        let b = blob();
        reply("200 OK", &[format!("Content-Length: {}", b.len())], &b)
    }))
    .await;
    let (c, repo, d) = client(&addr);
    let err = c
        .get_blob_range(&repo, &d, 5_000..(1u64 << 40))
        .await
        .unwrap_err();
    assert!(err.to_string().contains(d.as_str()), "{err}");
    assert!(!c.supports_ranges(&addr), "200 to a range request is noted");
    // A range inside the blob is sliced out of the whole answer.
    let got = c.get_blob_range(&repo, &d, 1_000..1_500).await.unwrap();
    assert_eq!(&got[..], &blob()[1_000..1_500]);
}

#[tokio::test]
async fn whole_blob_answer_is_read_only_up_to_the_range_end() {
    // 200 with a declared 1 TiB body that never ends: the reader stops at the range end.
    let (addr, _) = server(Arc::new(|_, _| {
        let mut r = reply(
            "200 OK",
            &[format!("Content-Length: {}", 1u64 << 40)],
            &blob(),
        );
        r.stall = true;
        r
    }))
    .await;
    let (c, repo, d) = client(&addr);
    let started = Instant::now();
    let got = c.get_blob_range(&repo, &d, 10..20).await.unwrap();
    assert_eq!(&got[..], &blob()[10..20]);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn partial_answer_without_content_range_is_an_error() {
    let (addr, count) = server(Arc::new(|_, _| {
        reply(
            "206 Partial Content",
            &["Content-Length: 200".into()],
            &blob()[..200],
        )
    }))
    .await;
    let (c, repo, d) = client(&addr);
    let err = c.get_blob_range(&repo, &d, 100..300).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(d.as_str()) && msg.contains("Content-Range"),
        "{msg}"
    );
    assert_eq!(
        count.load(Ordering::SeqCst),
        1,
        "a protocol error is not retried"
    );
}

#[tokio::test]
async fn partial_answer_for_other_bytes_is_an_error() {
    // Right length, wrong place: serving it would be wrong bytes.
    let (addr, _) = server(Arc::new(|_, _| {
        reply(
            "206 Partial Content",
            &[
                "Content-Range: bytes 0-199/10000".into(),
                "Content-Length: 200".into(),
            ],
            &blob()[..200],
        )
    }))
    .await;
    let (c, repo, d) = client(&addr);
    let err = c.get_blob_range(&repo, &d, 100..300).await.unwrap_err();
    assert!(err.to_string().contains("Content-Range"), "{err}");
}

#[tokio::test]
async fn lying_lengths_are_errors_never_wrong_bytes() {
    // Content-Length says more than the range, and the body follows it.
    let (addr, _) = server(Arc::new(|_, _| {
        reply(
            "206 Partial Content",
            &[
                "Content-Range: bytes 100-299/10000".into(),
                "Content-Length: 300".into(),
            ],
            &blob()[100..400],
        )
    }))
    .await;
    let (c, repo, d) = client(&addr);
    assert!(c.get_blob_range(&repo, &d, 100..300).await.is_err());

    // No Content-Length, connection closed after a longer body.
    let (addr, _) = server(Arc::new(|_, _| {
        reply(
            "206 Partial Content",
            &["Content-Range: bytes 100-299/10000".into()],
            &blob()[100..400],
        )
    }))
    .await;
    let (c, repo, d) = client(&addr);
    let err = c.get_blob_range(&repo, &d, 100..300).await.unwrap_err();
    assert!(err.to_string().contains("longer"), "{err}");

    // Short body: promised 200 bytes, sent 50, closed. Retried, then an error.
    let (addr, count) = server(Arc::new(|_, _| {
        reply(
            "206 Partial Content",
            &[
                "Content-Range: bytes 100-299/10000".into(),
                "Content-Length: 200".into(),
            ],
            &blob()[100..150],
        )
    }))
    .await;
    let (c, repo, d) = client(&addr);
    let err = c.get_blob_range(&repo, &d, 100..300).await.unwrap_err();
    assert!(err.to_string().contains(d.as_str()), "{err}");
    assert_eq!(count.load(Ordering::SeqCst), 3, "first try and 2 retries");

    // A broken transfer that heals is retried by the client.
    let (addr, _) = server(Arc::new(|n, r| {
        if n == 0 {
            reply(
                "206 Partial Content",
                &[
                    "Content-Range: bytes 100-299/10000".into(),
                    "Content-Length: 200".into(),
                ],
                &blob()[100..150],
            )
        } else {
            good_206(r)
        }
    }))
    .await;
    let (c, repo, d) = client(&addr);
    let got = c.get_blob_range(&repo, &d, 100..300).await.unwrap();
    assert_eq!(&got[..], &blob()[100..300]);
}

#[tokio::test]
async fn deadline_covers_every_attempt_and_backoff() {
    // 503 forever with long backoffs, or a stalled body: the deadline ends it, not the
    // retry count or the 300 s request timeout.
    let (addr, count) = server(Arc::new(|_, _| {
        reply(
            "503 Service Unavailable",
            &["Content-Length: 0".into()],
            b"",
        )
    }))
    .await;
    let (mut c, repo, d) = client(&addr);
    c = Client::with_credentials(
        ClientOptions {
            max_retries: 100,
            min_backoff: Duration::from_millis(300),
            ..c.options().clone()
        },
        crate::auth::DockerConfig::default(),
    )
    .unwrap();
    let started = Instant::now();
    let deadline = started + Duration::from_millis(1500);
    let err = c
        .get_blob_range_until(&repo, &d, 0..10, Some(deadline))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(1600), "{err}");
    assert!(
        count.load(Ordering::SeqCst) >= 2,
        "retried within the deadline"
    );

    let (addr, _) = server(Arc::new(|_, _| {
        let mut r = reply(
            "206 Partial Content",
            &[
                "Content-Range: bytes 0-199/10000".into(),
                "Content-Length: 200".into(),
            ],
            &blob()[..50],
        );
        r.stall = true;
        r
    }))
    .await;
    let (c, repo, d) = client(&addr);
    let started = Instant::now();
    let deadline = started + Duration::from_millis(1000);
    assert!(c
        .get_blob_range_until(&repo, &d, 0..200, Some(deadline))
        .await
        .is_err());
    assert!(started.elapsed() < Duration::from_millis(1300));
}

#[tokio::test]
async fn error_bodies_are_read_only_so_far() {
    // A 400 declaring a 1 TiB body that never ends: the error comes back at once.
    let (addr, _) = server(Arc::new(|_, _| {
        let mut r = reply(
            "400 Bad Request",
            &[format!("Content-Length: {}", 1u64 << 40)],
            &vec![b'x'; 64 << 10],
        );
        r.stall = true;
        r
    }))
    .await;
    let (c, repo, d) = client(&addr);
    let started = Instant::now();
    let err = c.get_blob_range(&repo, &d, 0..10).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "{err}");
    assert!(matches!(err, RegistryError::Status { status: 400, .. }));
}

#[tokio::test]
async fn whole_blob_stream_is_capped_by_its_descriptor() {
    let (addr, _) = server(Arc::new(|_, _| {
        let b = blob();
        reply("200 OK", &[], &b)
    }))
    .await;
    let (c, repo, d) = client(&addr);
    // The descriptor says 1 TiB: refused before any request for in-memory reads.
    let huge = Descriptor::new("x", d.clone(), 1 << 40);
    assert!(matches!(
        c.get_blob(&repo, &huge).await,
        Err(RegistryError::TooLarge { .. })
    ));
    // Streaming: a body longer than the descriptor stops at its size.
    let small = Descriptor::new("x", d.clone(), 100);
    let mut s = c.open_blob(&repo, &small, None).await.unwrap();
    let mut err = None;
    loop {
        match s.chunk().await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    assert!(err.is_some() && s.received() <= 10_000);
    let exact = Descriptor::new("x", d, 10_000);
    assert_eq!(c.get_blob(&repo, &exact).await.unwrap().len(), 10_000);
}

#[tokio::test]
async fn chunked_download_is_parallel_in_order_and_verified() {
    let (addr, count) = server(Arc::new(|_, r| match r {
        Some(r) => good_206(Some(r)),
        None => reply("200 OK", &[], &blob()),
    }))
    .await;
    let (c, repo, d) = client(&addr);
    let c = Arc::new(c);
    let desc = Descriptor::new("x", d.clone(), 10_000);
    let limit = Arc::new(tokio::sync::Semaphore::new(2));
    let opts = crate::ChunkedDownload {
        chunk_size: 1000,
        window: 3,
        limits: vec![limit.clone()],
    };
    let mut out = Vec::new();
    let st = c
        .get_blob_chunked_to(&repo, &desc, &opts, &mut out)
        .await
        .unwrap();
    assert_eq!(out, blob());
    assert_eq!(st.range_requests, 10);
    assert!(!st.whole && st.peak_buffered <= 3, "{st:?}");
    assert_eq!(count.load(Ordering::SeqCst), 10);
    assert_eq!(limit.available_permits(), 2, "permits returned");
    // A wrong digest is an error, never silently accepted.
    let bad = Descriptor::new("x", Digest::of(b"other"), 10_000);
    let mut out = Vec::new();
    assert!(matches!(
        c.get_blob_chunked_to(&repo, &bad, &opts, &mut out).await,
        Err(RegistryError::DigestMismatch { .. })
    ));
}

#[tokio::test]
async fn chunked_download_from_a_registry_ignoring_ranges_streams_the_rest_whole() {
    let (addr, count) = server(Arc::new(|_, _| reply("200 OK", &[], &blob()))).await;
    let (c, repo, d) = client(&addr);
    let c = Arc::new(c);
    let desc = Descriptor::new("x", d, 10_000);
    let opts = crate::ChunkedDownload {
        chunk_size: 1000,
        window: 4,
        limits: vec![],
    };
    let mut out = Vec::new();
    let st = c
        .get_blob_chunked_to(&repo, &desc, &opts, &mut out)
        .await
        .unwrap();
    assert_eq!(out, blob());
    assert!(st.whole, "{st:?}");
    assert!(!c.supports_ranges(&addr));
    // At most the first window of range requests, then one whole-blob request.
    assert!(
        count.load(Ordering::SeqCst) <= 5,
        "{}",
        count.load(Ordering::SeqCst)
    );
}

#[tokio::test]
async fn a_range_costs_at_most_max_retries_plus_one_requests() {
    // The retries of failed requests (503) and of broken bodies come out of one budget
    // (max_retries = 2 here): three HTTP attempts in all, not three per layer of retries.
    for pattern in ["503", "short", "mixed"] {
        let (addr, count) = server(Arc::new(move |n, _| {
            let short = pattern == "short" || (pattern == "mixed" && n % 2 == 1);
            if short {
                reply(
                    "206 Partial Content",
                    &[
                        "Content-Range: bytes 0-99/10000".into(),
                        "Content-Length: 100".into(),
                    ],
                    &blob()[..40],
                )
            } else {
                reply(
                    "503 Service Unavailable",
                    &["Content-Length: 0".into()],
                    b"",
                )
            }
        }))
        .await;
        let (c, repo, d) = client(&addr);
        assert!(c.get_blob_range(&repo, &d, 0..100).await.is_err());
        assert_eq!(count.load(Ordering::SeqCst), 3, "{pattern}");
    }
}
