//! Upstream soci-snapshotter's metric families (`fs/metrics/common`, `fs/metrics/layer`),
//! counted here so dashboards built on upstream keep working: same names, types and labels.
//!
//! Why a sink of its own: upstream keys most of its series by layer digest and operation
//! type, while the rest of soci-rs counts process-wide. Counting hooks elsewhere stay one
//! call each (`metrics.upstream.inc(OP, layer)`), and rendering lives with the other
//! metrics in the snapshotter. Series are created on first use, like upstream's vectors.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// `operation_type` values (upstream's names).
pub mod op {
    /// FUSE reads served (count, per layer).
    pub const SYNCHRONOUS_READ_COUNT: &str = "synchronous_read_count";
    /// FUSE reads that had to fetch spans from the registry (count).
    pub const SYNCHRONOUS_READ_REGISTRY_FETCH_COUNT: &str =
        "synchronous_read_remote_registry_fetch_count";
    /// Bytes returned to FUSE reads (`bytes_served`).
    pub const SYNCHRONOUS_BYTES_SERVED: &str = "synchronous_bytes_served";
    /// FUSE read latency (microseconds).
    pub const SYNCHRONOUS_READ: &str = "synchronous_read";
    /// FUSE reads answered with an error (count).
    pub const FUSE_FILE_READ_FAILURE_COUNT: &str = "fuse_file_read_failure_count";
    /// One registry request for spans (milliseconds).
    pub const REMOTE_REGISTRY_GET: &str = "remote_registry_get";
    /// Spans fetched by the background fetcher (count).
    pub const BACKGROUND_SPAN_FETCH_COUNT: &str = "background_span_fetch_count";
    /// Background span fetches that failed (count).
    pub const BACKGROUND_SPAN_FETCH_FAILURE_COUNT: &str = "background_span_fetch_failure_count";
    /// Mounting a lazy layer, zTOC to FUSE mount (milliseconds).
    pub const MOUNT: &str = "mount";
    /// Lazy mounts that failed, the layer then pulled in full (count).
    pub const FUSE_MOUNT_FAILURE_COUNT: &str = "fuse_mount_failure_count";
    /// Fetching and parsing one zTOC (milliseconds).
    pub const ZTOC_FETCH: &str = "ztoc_fetch";
    /// Finding and fetching an image's SOCI index (milliseconds; `layer` = index digest).
    pub const SOCI_INDEX_FETCH: &str = "soci_index_fetch";
    /// GETATTR of an inode (no file handle) failed internally (count).
    pub const FUSE_NODE_GETATTR_FAILURE_COUNT: &str = "fuse_node_getattr_failure_count";
    /// LISTXATTR failed internally (count).
    pub const FUSE_NODE_LISTXATTR_FAILURE_COUNT: &str = "fuse_node_listxattr_failure_count";
    /// LOOKUP failed internally (a missing name is not a failure) (count).
    pub const FUSE_NODE_LOOKUP_FAILURE_COUNT: &str = "fuse_node_lookup_failure_count";
    /// OPEN failed internally (count).
    pub const FUSE_NODE_OPEN_FAILURE_COUNT: &str = "fuse_node_open_failure_count";
    /// READDIR / READDIRPLUS failed internally (count).
    pub const FUSE_NODE_READDIR_FAILURE_COUNT: &str = "fuse_node_readdir_failure_count";
    /// GETATTR through an open file handle failed internally (count).
    pub const FUSE_FILE_GETATTR_FAILURE_COUNT: &str = "fuse_file_getattr_failure_count";
    /// Any other operation failed internally (count).
    pub const FUSE_UNKNOWN_OPERATION_FAILURE_COUNT: &str = "fuse_unknown_operation_failure_count";
}

/// What a FUSE operation that failed is counted as, if the failure is internal (upstream's
/// `reportFailure`: not answers such as a missing name, only errors of the filesystem
/// itself: EIO, or an inode the kernel knows and the layer's tree does not).
pub enum FuseOp {
    /// GETATTR; `with_handle` when the kernel passed an open file handle.
    Getattr {
        /// FUSE_GETATTR_FH was set.
        with_handle: bool,
    },
    /// LISTXATTR.
    Listxattr,
    /// LOOKUP.
    Lookup,
    /// OPEN.
    Open,
    /// READDIR or READDIRPLUS.
    Readdir,
    /// READ (failures of the read itself are counted where the read ends).
    Read,
    /// Any other operation.
    Other,
}

/// Counts a failed FUSE operation on `layer` under upstream's name for it.
pub fn count_fuse_failure(m: &UpstreamMetrics, layer: &str, what: FuseOp) {
    let name = match what {
        FuseOp::Getattr { with_handle: false } => op::FUSE_NODE_GETATTR_FAILURE_COUNT,
        FuseOp::Getattr { with_handle: true } => op::FUSE_FILE_GETATTR_FAILURE_COUNT,
        FuseOp::Listxattr => op::FUSE_NODE_LISTXATTR_FAILURE_COUNT,
        FuseOp::Lookup => op::FUSE_NODE_LOOKUP_FAILURE_COUNT,
        FuseOp::Open => op::FUSE_NODE_OPEN_FAILURE_COUNT,
        FuseOp::Readdir => op::FUSE_NODE_READDIR_FAILURE_COUNT,
        FuseOp::Read => op::FUSE_FILE_READ_FAILURE_COUNT,
        FuseOp::Other => op::FUSE_UNKNOWN_OPERATION_FAILURE_COUNT,
    };
    m.inc(name, layer);
}

/// Upstream's millisecond histogram buckets.
pub const BUCKETS_MS: [f64; 15] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
    16384.0,
];
/// Upstream's microsecond histogram buckets.
pub const BUCKETS_US: [f64; 11] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// A histogram with fixed buckets: counts per bucket (+Inf last), sum, count.
#[derive(Debug, Clone, Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, buckets: &[f64], v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; buckets.len() + 1];
        }
        let i = buckets
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(buckets.len());
        self.counts[i] += 1;
        self.sum += v;
    }
}

type Key = (&'static str, String);

/// A mounted lazy layer, for `layer_size` / `layer_fetched_size`.
#[derive(Debug, Clone)]
struct MountedInfo {
    mountpoint: String,
    digest: String,
    size: u64,
}

#[derive(Default)]
struct Inner {
    counts: BTreeMap<Key, u64>,
    bytes: BTreeMap<Key, u64>,
    ms: BTreeMap<Key, Histogram>,
    us: BTreeMap<Key, Histogram>,
    fetched: BTreeMap<String, u64>,
    mounted: BTreeMap<String, MountedInfo>,
}

/// Upstream's metric families, by operation type and layer digest.
#[derive(Default)]
pub struct UpstreamMetrics {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for UpstreamMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UpstreamMetrics")
    }
}

impl UpstreamMetrics {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// `soci_fs_operation_count{operation_type, layer}` += 1.
    pub fn inc(&self, op: &'static str, layer: &str) {
        self.with(|m| *m.counts.entry((op, layer.into())).or_default() += 1);
    }

    /// `soci_fs_bytes_served{operation_type, layer}` += n.
    pub fn add_bytes(&self, op: &'static str, layer: &str, n: u64) {
        self.with(|m| *m.bytes.entry((op, layer.into())).or_default() += n);
    }

    /// `soci_fs_operation_duration_milliseconds{operation_type, layer}`.
    pub fn observe_ms(&self, op: &'static str, layer: &str, d: Duration) {
        let v = d.as_secs_f64() * 1e3;
        self.with(|m| {
            m.ms.entry((op, layer.into()))
                .or_default()
                .observe(&BUCKETS_MS, v)
        });
    }

    /// `soci_fs_operation_duration_microseconds{operation_type, layer}`.
    pub fn observe_us(&self, op: &'static str, layer: &str, d: Duration) {
        let v = d.as_secs_f64() * 1e6;
        self.with(|m| {
            m.us.entry((op, layer.into()))
                .or_default()
                .observe(&BUCKETS_US, v)
        });
    }

    /// Compressed bytes fetched from the registry for a lazy layer.
    pub fn add_fetched(&self, layer: &str, n: u64) {
        self.with(|m| *m.fetched.entry(layer.into()).or_default() += n);
    }

    /// Lazy layer `layer` of `size` compressed bytes is mounted at `mountpoint` (`key`
    /// names the mount for [`UpstreamMetrics::unmounted`]).
    pub fn mounted(&self, key: &str, mountpoint: &str, layer: &str, size: u64) {
        self.with(|m| {
            m.mounted.insert(
                key.into(),
                MountedInfo {
                    mountpoint: mountpoint.into(),
                    digest: layer.into(),
                    size,
                },
            )
        });
    }

    /// The lazy mount `key` is gone.
    pub fn unmounted(&self, key: &str) {
        self.with(|m| m.mounted.remove(key));
    }

    /// Renders upstream's families in the Prometheus text format.
    pub fn render(&self, o: &mut String) {
        self.with(|m| {
            let _ = writeln!(o, "# HELP soci_fs_operation_count The count of soci snapshotter operations. Broken down by operation type and layer sha.\n# TYPE soci_fs_operation_count counter");
            for ((op, layer), n) in &m.counts {
                let _ = writeln!(o, "soci_fs_operation_count{{layer=\"{}\",operation_type=\"{op}\"}} {n}", esc(layer));
            }
            let _ = writeln!(o, "# HELP soci_fs_bytes_served The number of bytes served per soci snapshotter operations. Broken down by operation type and layer sha.\n# TYPE soci_fs_bytes_served gauge");
            for ((op, layer), n) in &m.bytes {
                let _ = writeln!(o, "soci_fs_bytes_served{{layer=\"{}\",operation_type=\"{op}\"}} {n}", esc(layer));
            }
            histograms(o, "soci_fs_operation_duration_milliseconds", "Latency in milliseconds of soci snapshotter operations. Broken down by operation type and layer sha.", &BUCKETS_MS, &m.ms);
            histograms(o, "soci_fs_operation_duration_microseconds", "Latency in microseconds of soci snapshotter operations. Broken down by operation type and layer sha.", &BUCKETS_US, &m.us);
            let _ = writeln!(o, "# HELP soci_fs_layer_fetched_size_bytes Total fetched size of the layer\n# TYPE soci_fs_layer_fetched_size_bytes counter");
            for l in m.mounted.values() {
                let n = m.fetched.get(&l.digest).copied().unwrap_or(0);
                let _ = writeln!(o, "soci_fs_layer_fetched_size_bytes{{digest=\"{}\",mountpoint=\"{}\"}} {n}", esc(&l.digest), esc(&l.mountpoint));
            }
            let _ = writeln!(o, "# HELP soci_fs_layer_size_bytes Total size of the layer\n# TYPE soci_fs_layer_size_bytes counter");
            for l in m.mounted.values() {
                let _ = writeln!(o, "soci_fs_layer_size_bytes{{digest=\"{}\",mountpoint=\"{}\"}} {}", esc(&l.digest), esc(&l.mountpoint), l.size);
            }
        });
    }
}

/// Counts one synchronous (FUSE) read of `layer` that started at `started`.
pub(crate) fn count_read(
    m: &UpstreamMetrics,
    layer: &str,
    started: tokio::time::Instant,
    r: &std::io::Result<Vec<u8>>,
) {
    match r {
        Ok(data) => {
            m.inc(op::SYNCHRONOUS_READ_COUNT, layer);
            m.add_bytes(op::SYNCHRONOUS_BYTES_SERVED, layer, data.len() as u64);
            m.observe_us(op::SYNCHRONOUS_READ, layer, started.elapsed());
        }
        Err(_) => m.inc(op::FUSE_FILE_READ_FAILURE_COUNT, layer),
    }
}

/// Counts one span made servable (a background one as upstream's background span fetch).
pub(crate) fn count_span(m: &UpstreamMetrics, layer: &str, prio: crate::spans::Priority) {
    if prio == crate::spans::Priority::Background {
        m.inc(op::BACKGROUND_SPAN_FETCH_COUNT, layer);
    }
}

/// One registry request for spans, timed until dropped (`remote_registry_get`); a demand one
/// also counts as a synchronous read that went to the registry.
pub(crate) struct RegistryGet<'a> {
    m: &'a UpstreamMetrics,
    layer: &'a str,
    started: std::time::Instant,
}

impl<'a> RegistryGet<'a> {
    /// Starts timing a request of `prio` for `layer`.
    pub(crate) fn start(
        m: &'a UpstreamMetrics,
        layer: &'a str,
        prio: crate::spans::Priority,
    ) -> RegistryGet<'a> {
        if prio == crate::spans::Priority::Demand {
            m.inc(op::SYNCHRONOUS_READ_REGISTRY_FETCH_COUNT, layer);
        }
        RegistryGet {
            m,
            layer,
            started: std::time::Instant::now(),
        }
    }
}

impl Drop for RegistryGet<'_> {
    fn drop(&mut self) {
        self.m
            .observe_ms(op::REMOTE_REGISTRY_GET, self.layer, self.started.elapsed());
    }
}

fn histograms(
    o: &mut String,
    name: &str,
    help: &str,
    buckets: &[f64],
    hs: &BTreeMap<Key, Histogram>,
) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} histogram");
    for ((op, layer), h) in hs {
        let labels = format!("layer=\"{}\",operation_type=\"{op}\"", esc(layer));
        let mut cum = 0;
        for (i, b) in buckets.iter().enumerate() {
            cum += h.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(o, "{name}_bucket{{{labels},le=\"{b}\"}} {cum}");
        }
        cum += h.counts.get(buckets.len()).copied().unwrap_or(0);
        let _ = writeln!(o, "{name}_bucket{{{labels},le=\"+Inf\"}} {cum}");
        let _ = writeln!(o, "{name}_sum{{{labels}}} {}", h.sum);
        let _ = writeln!(o, "{name}_count{{{labels}}} {cum}");
    }
}

/// Escapes a Prometheus label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_with_upstream_names_and_labels() {
        let m = UpstreamMetrics::default();
        m.inc(op::SYNCHRONOUS_READ_COUNT, "sha256:a");
        m.inc(op::SYNCHRONOUS_READ_COUNT, "sha256:a");
        m.add_bytes(op::SYNCHRONOUS_BYTES_SERVED, "sha256:a", 10);
        m.observe_us(op::SYNCHRONOUS_READ, "sha256:a", Duration::from_micros(3));
        m.observe_ms(op::MOUNT, "sha256:a", Duration::from_secs(60));
        m.mounted("1", "/m/1", "sha256:a", 100);
        m.add_fetched("sha256:a", 40);
        let mut o = String::new();
        m.render(&mut o);
        for want in [
            "soci_fs_operation_count{layer=\"sha256:a\",operation_type=\"synchronous_read_count\"} 2",
            "soci_fs_bytes_served{layer=\"sha256:a\",operation_type=\"synchronous_bytes_served\"} 10",
            "soci_fs_operation_duration_microseconds_bucket{layer=\"sha256:a\",operation_type=\"synchronous_read\",le=\"2\"} 0",
            "soci_fs_operation_duration_microseconds_bucket{layer=\"sha256:a\",operation_type=\"synchronous_read\",le=\"4\"} 1",
            "soci_fs_operation_duration_milliseconds_bucket{layer=\"sha256:a\",operation_type=\"mount\",le=\"+Inf\"} 1",
            "soci_fs_operation_duration_milliseconds_count{layer=\"sha256:a\",operation_type=\"mount\"} 1",
            "soci_fs_layer_fetched_size_bytes{digest=\"sha256:a\",mountpoint=\"/m/1\"} 40",
            "soci_fs_layer_size_bytes{digest=\"sha256:a\",mountpoint=\"/m/1\"} 100",
            "# TYPE soci_fs_operation_count counter",
            "# TYPE soci_fs_bytes_served gauge",
        ] {
            assert!(o.contains(want), "missing {want}:\n{o}");
        }
        m.unmounted("1");
        let mut o = String::new();
        m.render(&mut o);
        assert!(!o.contains("mountpoint=\"/m/1\""));
    }
}
