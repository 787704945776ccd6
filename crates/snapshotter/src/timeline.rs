//! Start-path timeline: one JSON line per closed tracing span of the soci crates (name,
//! wall-clock start, duration, fields, parent), written to a file named by `--timeline` /
//! `SOCI_SNAPSHOTTER_TIMELINE`.
//!
//! Why a layer of its own rather than the log: the steps of a lazy start (resolve, manifest,
//! SOCI index, zTOC fetch and parse, mount, demand reads, prefetch) are `debug` spans, so that
//! with the timeline off they cost nothing and the log is unchanged; with it on, they are
//! recorded whatever the log level, with absolute start times (microseconds since the Unix
//! epoch) that a benchmark can line up with its own clock (`bench/waterfall.py` draws them).

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Metadata, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Writes closed spans as JSON lines (see the module docs).
pub struct Timeline {
    out: Mutex<File>,
    next: AtomicU64,
}

/// What is kept with an open span.
struct Timing {
    seq: u64,
    start_us: u128,
    started: Instant,
    fields: Map<String, Value>,
}

struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().into(), Value::String(value.into()));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::from(value));
    }
}

impl Timeline {
    /// A timeline appended to `path` (created if missing).
    pub fn open(path: &Path) -> std::io::Result<Timeline> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Timeline {
            out: Mutex::new(out),
            next: AtomicU64::new(1),
        })
    }

    /// The spans recorded: those of the soci crates, at any level.
    pub fn wants(meta: &Metadata<'_>) -> bool {
        meta.is_span() && meta.target().starts_with("soci")
    }
}

impl<S> Layer<S> for Timeline
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Map::new();
        attrs.record(&mut Fields(&mut fields));
        let start_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or(0);
        span.extensions_mut().insert(Timing {
            seq: self.next.fetch_add(1, Ordering::Relaxed),
            start_us,
            started: Instant::now(),
            fields,
        });
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        if let Some(t) = ext.get_mut::<Timing>() {
            values.record(&mut Fields(&mut t.fields));
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let ext = span.extensions();
        let Some(t) = ext.get::<Timing>() else { return };
        // Ids are reused after close: name parents by our own sequence numbers.
        let parent = span
            .parent()
            .and_then(|p| p.extensions().get::<Timing>().map(|t| t.seq));
        let path: Vec<&str> = span.scope().skip(1).map(|s| s.name()).collect();
        let line = serde_json::json!({
            "name": span.name(),
            "target": span.metadata().target(),
            "seq": t.seq,
            "parent": parent,
            "path": path,
            "start_us": t.start_us as u64,
            "dur_us": t.started.elapsed().as_micros() as u64,
            "fields": t.fields,
        });
        if let Ok(mut f) = self.out.lock() {
            // One write per line (the daemon may be killed at any time); best effort.
            let _ = writeln!(f, "{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn closed_spans_become_json_lines_with_parents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.jsonl");
        let layer = Timeline::open(&path).expect("open");
        let sub = tracing_subscriber::registry()
            .with(layer.with_filter(tracing_subscriber::filter::filter_fn(Timeline::wants)));
        tracing::subscriber::with_default(sub, || {
            let outer =
                tracing::debug_span!("outer", layer = "sha256:ab", bytes = tracing::field::Empty);
            let _g = outer.enter();
            tracing::trace_span!("inner", n = 3u64).in_scope(|| {});
            outer.record("bytes", 7u64);
        });
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["name"], "inner");
        assert_eq!(lines[0]["fields"]["n"], 3);
        assert_eq!(lines[0]["path"][0], "outer");
        assert_eq!(lines[1]["name"], "outer");
        assert_eq!(lines[1]["fields"]["layer"], "sha256:ab");
        assert_eq!(lines[1]["fields"]["bytes"], 7);
        assert_eq!(lines[0]["parent"], lines[1]["seq"]);
        assert!(lines[1]["start_us"].as_u64().expect("start") > 0);
    }
}
