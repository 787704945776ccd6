//! Prometheus text endpoint (`GET /metrics`) on `metrics_address`.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::service::Snapshotter;

/// Renders all metrics in the Prometheus text format.
pub fn render(s: &Snapshotter) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# HELP soci_snapshots Snapshots known to the snapshotter.\n# TYPE soci_snapshots gauge"
    );
    let _ = writeln!(o, "soci_snapshots {}", s.count().unwrap_or(0));
    let Some(r) = s.remote() else { return o };
    let m = &r.metrics;
    let _ = writeln!(o, "# HELP soci_fetched_bytes_total Compressed bytes fetched from registries for lazy layers.\n# TYPE soci_fetched_bytes_total counter");
    let _ = writeln!(
        o,
        "soci_fetched_bytes_total{{priority=\"demand\"}} {}",
        m.demand_bytes.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        o,
        "soci_fetched_bytes_total{{priority=\"background\"}} {}",
        m.background_bytes.load(Ordering::Relaxed)
    );
    let _ = writeln!(o, "# HELP soci_spans_verified_total Spans whose digest matched.\n# TYPE soci_spans_verified_total counter");
    let _ = writeln!(
        o,
        "soci_spans_verified_total {}",
        m.spans_verified.load(Ordering::Relaxed)
    );
    let _ = writeln!(o, "# HELP soci_span_verification_failures_total Span fetches whose digest did not match.\n# TYPE soci_span_verification_failures_total counter");
    let _ = writeln!(
        o,
        "soci_span_verification_failures_total {}",
        m.verify_failures.load(Ordering::Relaxed)
    );
    let _ = writeln!(o, "# HELP soci_read_errors_total FUSE reads answered with EIO.\n# TYPE soci_read_errors_total counter");
    let _ = writeln!(
        o,
        "soci_read_errors_total {}",
        m.read_errors.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        o,
        "# HELP soci_layers_total Layers provided, by mode.\n# TYPE soci_layers_total counter"
    );
    let _ = writeln!(
        o,
        "soci_layers_total{{mode=\"lazy\"}} {}",
        r.layers_lazy.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        o,
        "soci_layers_total{{mode=\"full\"}} {}",
        r.full.layers_unpacked.load(Ordering::Relaxed)
    );
    render_broken(&mut o, r);
    render_prefetch(&mut o, &r.prefetch);
    render_full_pulls(&mut o, r.full.stats());
    // Upstream soci-snapshotter's families, same names, types and labels.
    m.upstream.render(&mut o);
    let _ = writeln!(o, "# HELP soci_fallbacks_total Images pulled in full, by reason.\n# TYPE soci_fallbacks_total counter");
    for (reason, n) in r.fallbacks.lock().expect("fallbacks").iter() {
        let _ = writeln!(o, "soci_fallbacks_total{{reason=\"{reason}\"}} {n}");
    }
    render_handed_back(&mut o, r);
    render_content_store(&mut o);
    let _ = writeln!(o, "# HELP soci_span_cache_bytes Decompressed spans cached, by place.\n# TYPE soci_span_cache_bytes gauge");
    let _ = writeln!(
        o,
        "soci_span_cache_bytes{{place=\"disk\"}} {}",
        r.cache.disk_bytes()
    );
    let _ = writeln!(
        o,
        "soci_span_cache_bytes{{place=\"memory\"}} {}",
        r.memory_bytes()
    );
    render_passthrough(&mut o, &m.passthrough);
    let _ = writeln!(o, "# HELP soci_fuse_read_duration_seconds Latency of FUSE reads.\n# TYPE soci_fuse_read_duration_seconds histogram");
    let mut cum = 0;
    for (i, b) in soci_fs::LATENCY_BUCKETS_MS.iter().enumerate() {
        cum += m.read_latency[i].load(Ordering::Relaxed);
        let _ = writeln!(
            o,
            "soci_fuse_read_duration_seconds_bucket{{le=\"{}\"}} {cum}",
            b / 1000.0
        );
    }
    cum += m.read_latency[soci_fs::LATENCY_BUCKETS_MS.len()].load(Ordering::Relaxed);
    let _ = writeln!(
        o,
        "soci_fuse_read_duration_seconds_bucket{{le=\"+Inf\"}} {cum}"
    );
    let _ = writeln!(
        o,
        "soci_fuse_read_duration_seconds_sum {}",
        m.read_latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6
    );
    let _ = writeln!(o, "soci_fuse_read_duration_seconds_count {cum}");
    o
}

/// FUSE passthrough counters.
fn render_passthrough(o: &mut String, p: &soci_fs::PassthroughMetrics) {
    let rows = [
        (
            "soci_passthrough_opens_total",
            "File opens answered with a passthrough backing file (reads bypass the daemon).",
            &p.opens,
        ),
        (
            "soci_passthrough_files_written_total",
            "Passthrough backing files written from verified spans.",
            &p.files_written,
        ),
        (
            "soci_passthrough_unavailable_total",
            "FUSE connections on which passthrough was not offered or was refused by the kernel.",
            &p.unavailable,
        ),
    ];
    for (name, help, v) in rows {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
        let _ = writeln!(o, "{name} {}", v.load(Ordering::Relaxed));
    }
}

/// Escapes a Prometheus label value.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Lazy layers not served: a total by cause, and one series per layer carrying its reason.
fn render_broken(o: &mut String, r: &crate::remote::Remote) {
    let broken = r.broken_layers();
    let _ = writeln!(o, "# HELP soci_layers_broken Lazy layers not served (restore failed; retried in the background), by cause.\n# TYPE soci_layers_broken gauge");
    let mut by_cause: std::collections::BTreeMap<&str, u64> =
        ["deadline", "mount", "registry", "ztoc_changed"]
            .into_iter()
            .map(|c| (c, 0))
            .collect();
    for (_, b) in &broken {
        *by_cause.entry(b.cause).or_default() += 1;
    }
    for (cause, n) in by_cause {
        let _ = writeln!(o, "soci_layers_broken{{cause=\"{cause}\"}} {n}");
    }
    let _ = writeln!(o, "# HELP soci_layer_broken_info A lazy layer that is not served, with why (1 while broken).\n# TYPE soci_layer_broken_info gauge");
    for (id, b) in &broken {
        let _ = writeln!(
            o,
            "soci_layer_broken_info{{snapshot_id=\"{id}\",layer=\"{}\",cause=\"{}\",reason=\"{}\"}} 1",
            label_value(&b.layer),
            b.cause,
            label_value(&b.reason.chars().take(200).collect::<String>())
        );
    }
}

/// What full pulls (parallel pull mode and fallbacks) did.
fn render_full_pulls(o: &mut String, st: &crate::remote::PullStats) {
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    for (name, kind, help, v) in [
        (
            "soci_full_pull_range_requests_total",
            "counter",
            "Range requests made for layer blobs pulled in full (chunked parallel download).",
            load(&st.range_requests),
        ),
        (
            "soci_full_pull_whole_downloads_total",
            "counter",
            "Layers pulled in full with one whole-blob request.",
            load(&st.whole_downloads),
        ),
        (
            "soci_full_pull_spooled_layers_total",
            "counter",
            "Layers downloaded to a temp file while waiting for an unpack slot.",
            load(&st.spooled),
        ),
        (
            "soci_full_pull_peak_chunks_buffered",
            "gauge",
            "Most chunks of one layer held in memory at once.",
            st.peak_chunks_buffered.load(Ordering::Relaxed) as u64,
        ),
        (
            "soci_full_pull_unpacking_layers",
            "gauge",
            "Layers being unpacked now.",
            st.unpacking.load(Ordering::Relaxed) as u64,
        ),
        (
            "soci_full_pull_peak_unpacking_layers",
            "gauge",
            "Most layers unpacked at once.",
            st.peak_unpacking.load(Ordering::Relaxed) as u64,
        ),
    ] {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    }
}

/// Layers the daemon could not provide and handed back to containerd, by reason.
fn render_handed_back(o: &mut String, r: &crate::remote::Remote) {
    let _ = writeln!(o, "# HELP soci_layers_handed_back_total Layers handed back to containerd to pull itself (the daemon could not, or by config did not, provide them), by reason.\n# TYPE soci_layers_handed_back_total counter");
    let mut by_reason: std::collections::BTreeMap<&str, u64> = crate::service::HAND_BACK_REASONS
        .iter()
        .map(|c| (*c, 0))
        .collect();
    for (reason, n) in r.handed_back.lock().expect("handed_back").iter() {
        *by_reason.entry(reason).or_default() += n;
    }
    for (reason, n) in by_reason {
        let _ = writeln!(
            o,
            "soci_layers_handed_back_total{{reason=\"{reason}\"}} {n}"
        );
    }
}

/// Prefetch at mount time: layers, spans, bytes, requests, incomplete prefetches.
fn render_prefetch(o: &mut String, p: &crate::remote::PrefetchState) {
    for (name, help, v) in [
        (
            "soci_prefetch_layers_total",
            "Lazy layers whose prefetch artifact was acted on.",
            &p.layers,
        ),
        (
            "soci_prefetch_spans_total",
            "Spans fetched by prefetch before a mount was ready.",
            &p.spans,
        ),
        (
            "soci_prefetch_bytes_total",
            "Compressed bytes fetched by prefetch.",
            &p.bytes,
        ),
        (
            "soci_prefetch_requests_total",
            "Range requests made by prefetch.",
            &p.requests,
        ),
        (
            "soci_prefetch_failures_total",
            "Prefetches that did not complete (bad artifact, fetch error, timeout).",
            &p.failures,
        ),
    ] {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
        let _ = writeln!(o, "{name} {}", v.load(Ordering::Relaxed));
    }
}

/// Serves `GET /metrics` until the runtime stops.
pub async fn serve(addr: String, s: Arc<Snapshotter>) -> std::io::Result<()> {
    let listener = TcpListener::bind(&addr).await?;
    info!(%addr, "metrics endpoint listening");
    loop {
        let (mut conn, _) = listener.accept().await?;
        let s = s.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n =
                match tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
            let req = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if req.starts_with("GET /metrics") {
                let s2 = s.clone();
                let body = tokio::task::spawn_blocking(move || render(&s2))
                    .await
                    .unwrap_or_default();
                ("200 OK", body)
            } else {
                ("404 Not Found", "not found\n".to_string())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            if let Err(e) = conn.write_all(resp.as_bytes()).await {
                warn!(error = %e, "metrics response failed");
            }
        });
    }
}

/// Layer blobs pulled by the daemon and written to containerd's content store, by result.
fn render_content_store(o: &mut String) {
    let st = &crate::remote::content::STATS;
    let _ = writeln!(o, "# HELP soci_content_store_writes_total Layer blobs pulled by the daemon and written to containerd's content store, by result (failed: not stored, the image cannot be exported).\n# TYPE soci_content_store_writes_total counter");
    for (result, n) in [
        ("written", &st.written),
        ("existing", &st.existing),
        ("failed", &st.failed),
    ] {
        let n = n.load(Ordering::Relaxed);
        let _ = writeln!(
            o,
            "soci_content_store_writes_total{{result=\"{result}\"}} {n}"
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn label_values_are_escaped() {
        assert_eq!(super::label_value("a \"b\"\\c\nd"), "a \\\"b\\\"\\\\c\\nd");
    }
}
