//! Demand records of lazy layers, for `soci prefetch record`: every lazily mounted layer
//! records which spans its FUSE reads touched, in first-access order
//! ([`soci_fs::DemandRecord`]), and the list is kept in `<root>/record/<snapshot id>.json`
//! ([`soci_index::record::RecordFile`]).
//!
//! Why a file the daemon keeps current, rather than a request to the daemon: the CLI reads it
//! once the container has exited, with nothing new to configure or expose, and the file is
//! rewritten before the read that grew the list is answered, so it is complete by the time
//! the container's last read returns. Bounded: at most one rewrite per new span, and none past
//! the first [`MAX_REWRITTEN_SPANS`] (the list then keeps the spans first read); layers with
//! more spans than the CLI accepts are not recorded. The file goes with the snapshot.
//!
//! The byte ranges read go to `<root>/record/<snapshot id>.ranges`, one `start end` line
//! appended per read that added bytes (read order; `overflow` when the list stopped, see
//! [`soci_fs::RangeEvent`]): an append per new read instead of a rewrite, so recording costs
//! normal runs a small write per cold read.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use soci_fs::{DemandRecord, RangeEvent, SpanManager};
use soci_index::record::{RecordFile, RANGES_EXTENSION, RECORD_DIR, RECORD_VERSION};
use soci_index::SociImage;
use soci_registry::Descriptor;
use tracing::warn;

/// `<root>/record` from the span cache root `<root>/cache`.
fn dir(cache_root: &Path) -> PathBuf {
    cache_root.with_file_name(RECORD_DIR)
}

/// Spans after which a layer's record file is no longer rewritten: each new span rewrites the
/// whole list on the FUSE reader's thread, so a hostile zTOC of a million tiny spans would cost
/// quadratic time there. 4096 spans of the default size are 16 GiB of layer.
const MAX_REWRITTEN_SPANS: usize = 4096;

fn path(cache_root: &Path, id: u64) -> PathBuf {
    dir(cache_root).join(format!("{id}.json"))
}

/// Starts recording the demand reads of the layer mounted for snapshot `id`.
pub(super) fn start(
    cache_root: &Path,
    id: u64,
    img: &SociImage,
    ztoc: &Descriptor,
    layer: &Descriptor,
    mgr: &Arc<SpanManager>,
) {
    if mgr.span_count() as u64 > soci_index::record::MAX_RECORD_SPANS {
        // The CLI would refuse such a record: do not spend the reads' time writing it.
        return;
    }
    let d = dir(cache_root);
    if let Err(e) = std::fs::create_dir_all(&d) {
        warn!(dir = %d.display(), error = %e, "no demand record for this layer");
        return;
    }
    let mut file = RecordFile {
        version: RECORD_VERSION,
        snapshot: id,
        image: img.reference.to_string(),
        manifest: img.manifest_desc.digest.to_string(),
        layer: layer.digest.to_string(),
        ztoc: ztoc.digest.to_string(),
        mounted_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        span_count: mgr.span_count() as u64,
        uncompressed_size: mgr.uncompressed_size(),
        spans: Vec::new(),
        ranges: None,
    };
    let target = path(cache_root, id);
    let ranges_path = target.with_extension(RANGES_EXTENSION);
    let ranges = std::fs::File::create(&ranges_path)
        .map_err(|e| warn!(file = %ranges_path.display(), error = %e, "no byte ranges in the demand record"))
        .ok()
        .map(std::sync::Mutex::new);
    write(&target, &file);
    let sink = move |order: &[usize]| {
        // Rewritten on the reader's thread: past MAX_REWRITTEN_SPANS the list keeps its first
        // spans (the byte ranges beside it go on, append-only and bounded on their own).
        if order.len() > MAX_REWRITTEN_SPANS {
            return;
        }
        file.spans = order.iter().map(|&s| s as u64).collect();
        write(&target, &file);
    };
    // The sink runs under the record's lock; it owns its copy of the header.
    let sink = std::sync::Mutex::new(sink);
    let mut record = DemandRecord::new(
        mgr.span_count(),
        Some(Box::new(move |order: &[usize]| {
            if let Ok(mut s) = sink.lock() {
                (*s)(order)
            }
        })),
    );
    if let Some(f) = ranges {
        // Called under the record's range lock: lines go out in read order.
        record = record.with_range_sink(Box::new(move |e: &RangeEvent| {
            let line = match e {
                RangeEvent::Read(r) => format!("{} {}\n", r.start, r.end),
                RangeEvent::Overflow => "overflow\n".to_string(),
            };
            if let Ok(mut f) = f.lock() {
                if let Err(err) = f.write_all(line.as_bytes()) {
                    warn!(error = %err, "appending to the demand record's byte ranges failed");
                }
            }
        }));
    }
    mgr.record_demand(Arc::new(record));
}

fn write(target: &Path, file: &RecordFile) {
    let tmp = target.with_extension("json.tmp");
    let r = serde_json::to_vec(file)
        .map_err(std::io::Error::other)
        .and_then(|b| std::fs::write(&tmp, b))
        .and_then(|()| std::fs::rename(&tmp, target));
    if let Err(e) = r {
        warn!(file = %target.display(), error = %e, "writing demand record failed");
    }
}

/// Removes snapshot `id`'s record (the snapshot is gone).
pub(super) fn forget(cache_root: &Path, id: u64) {
    let p = path(cache_root, id);
    let _ = std::fs::remove_file(&p);
    let _ = std::fs::remove_file(p.with_extension("json.tmp"));
    let _ = std::fs::remove_file(p.with_extension(RANGES_EXTENSION));
}
