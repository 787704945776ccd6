//! A TCP proxy that adds a fixed one-way delay to every chunk in both directions, without
//! serialising chunks (so throughput is not capped by the delay), for latency benchmarks.
//!
//! Usage: soci-delay-proxy LISTEN_ADDR UPSTREAM_ADDR ONE_WAY_DELAY_MS
//! (RTT added = 2 x delay). Prints "ready" once listening.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at + delay).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: soci-delay-proxy LISTEN_ADDR UPSTREAM_ADDR ONE_WAY_DELAY_MS");
        std::process::exit(2);
    }
    let delay = Duration::from_millis(args[3].parse().unwrap_or(0));
    let listener = TcpListener::bind(&args[1]).await?;
    println!("ready");
    loop {
        let (client, _) = listener.accept().await?;
        let upstream = args[2].clone();
        tokio::spawn(async move {
            // The connection set-up itself costs one round trip.
            tokio::time::sleep(delay * 2).await;
            let Ok(server) = TcpStream::connect(&upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::join!(pump(cr, sw, delay), pump(sr, cw, delay));
        });
    }
}
