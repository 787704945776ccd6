//! soci-fs: the read-only FUSE filesystem of one image layer, served lazily.
//!
//! [`LayerTree`] turns a zTOC into inodes (overlay whiteouts and opaque directories included);
//! [`SpanManager`] fetches, verifies, decompresses and caches spans (in the [`SpanCache`])
//! through a [`RangeReader`];
//! [`mount`] serves both over FUSE (read-only, `allow_other`, `default_permissions`) and
//! [`resume`] takes over a mount left by an earlier process.

mod cache;
mod fuse;
pub mod kernel;
pub mod metrics;
mod mount;
mod passthrough;
mod spans;
mod tree;

pub use fuse::LayerFs;
pub use kernel::Session;
pub use mount::{mount, resume, CacheTimeouts, MountedLayer, Served};
pub use passthrough::{Passthrough, PassthroughConfig, PassthroughMetrics};
pub use spans::plan_prefetch;
pub use spans::record::{DemandRecord, RangeEvent, RangeSink, RecordSink, MAX_RANGE_EVENTS};
pub use spans::{
    BackgroundConfig, FsMetrics, PrefetchReport, Priority, RangeReader, ReadFuture, SpanCache,
    SpanConfig, SpanManager, DEFAULT_READ_AHEAD_SPANS, FAILED_FETCH_MEMO, LATENCY_BUCKETS_MS,
    MAX_PREFETCH_REQUEST_BYTES, MAX_READ_AHEAD_BYTES, MAX_READ_AHEAD_TASKS, POISONED_SPAN_TTL,
};
pub use tree::{Children, LayerTree, Node, NodeKind, TreeError, OPAQUE_XATTR, ROOT_INO};
