//! Hostile zTOCs: decoder amplification (many entries sharing one big string or one table) is
//! refused with memory in proportion to the blob, honest large zTOCs still decode under the same
//! bound, and entries pointing past what the spans can produce are refused at validation.
//!
//! This binary runs every decode under a process-wide allocation limit (the `cap` allocator):
//! a decoder that copies shared data per entry exceeds it and the process aborts, so the tests
//! serialise on one lock while a limit is set.

use std::alloc::System;
use std::io::Write;
use std::sync::Mutex;

use cap::Cap;
use flatbuffers::{FlatBufferBuilder, UnionWIPOffset, WIPOffset};
use soci_ztoc::{build, BuildOptions, Ztoc};

#[global_allocator]
static ALLOC: Cap<System> = Cap::new(System, usize::MAX);
static LOCK: Mutex<()> = Mutex::new(());

/// Decode may use at most this much memory beyond what is live before it (decoded result
/// included): 16 x the blob + 1 MiB.
fn bound(blob: &[u8]) -> usize {
    16 * blob.len() + (1 << 20)
}

/// Every test holds this while it runs: the allocation limit is process-wide.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Decodes under a hard allocation limit of `bound(blob)` on top of what is live (exceeding it
/// aborts the process); returns the result with the error as text.
fn decode_capped(blob: &[u8]) -> Result<Ztoc, String> {
    let base = ALLOC.allocated();
    ALLOC.set_limit(base + bound(blob)).unwrap();
    let r = Ztoc::from_bytes(blob).map_err(|e| e.to_string());
    ALLOC.set_limit(usize::MAX).unwrap();
    r
}

type Off = WIPOffset<UnionWIPOffset>;

// vtable slots (field id * 2 + 4) from fbs/ztoc.fbs.
const FM_NAME: u16 = 4;
const FM_TYPE: u16 = 6;
const FM_LINKNAME: u16 = 12;
const FM_UNAME: u16 = 20;
const FM_GNAME: u16 = 22;
const FM_XATTRS: u16 = 30;
const X_KEY: u16 = 4;
const X_VALUE: u16 = 6;
const TOC_METADATA: u16 = 4;
const CI_ALGO: u16 = 4;
const CI_MAX_SPAN: u16 = 6;
const CI_DIGESTS: u16 = 8;
const CI_CHECKPOINTS: u16 = 10;
const Z_VERSION: u16 = 4;
const Z_TOOL: u16 = 6;
const Z_CSIZE: u16 = 8;
const Z_USIZE: u16 = 10;
const Z_TOC: u16 = 12;
const Z_INFO: u16 = 14;

/// What the hostile zTOC shares among its references.
enum Shape {
    /// `entries` distinct small entry tables whose name, linkname, uname, gname and one xattr
    /// key all point at one `big`-byte string.
    String { entries: usize, big: usize },
    /// One entry table (with a `big`-byte name) referenced from `entries` vector slots.
    Table { entries: usize, big: usize },
    /// One entry whose xattr vector has `records` slots all pointing at one xattr table whose
    /// key and value are one `big`-byte string.
    Xattr { records: usize, big: usize },
    /// `digests` span digest slots all pointing at one digest string.
    Digest { digests: usize },
}

fn bytes(b: &mut FlatBufferBuilder<'_>, s: &[u8]) -> Off {
    b.create_byte_string(s).as_union_value()
}

fn entry(b: &mut FlatBufferBuilder<'_>, name: Off, reg: Off, xattrs: Off, all: bool) -> Off {
    let t = b.start_table();
    b.push_slot_always(FM_NAME, name);
    b.push_slot_always(FM_TYPE, reg);
    if all {
        b.push_slot_always(FM_LINKNAME, name);
        b.push_slot_always(FM_UNAME, name);
        b.push_slot_always(FM_GNAME, name);
    }
    b.push_slot_always(FM_XATTRS, xattrs);
    b.end_table(t).as_union_value()
}

fn xattr(b: &mut FlatBufferBuilder<'_>, k: Off, v: Off) -> Off {
    let t = b.start_table();
    b.push_slot_always(X_KEY, k);
    b.push_slot_always(X_VALUE, v);
    b.end_table(t).as_union_value()
}

fn hostile(shape: Shape) -> Vec<u8> {
    let mut b = FlatBufferBuilder::with_capacity(1 << 20);
    let reg = bytes(&mut b, b"reg");
    let empty: Vec<Off> = Vec::new();
    let no_xattrs = b.create_vector(&empty).as_union_value();
    let mut digest_slots = 1;
    let entries: Vec<Off> = match shape {
        Shape::String { entries, big } => {
            let s = bytes(&mut b, &vec![b'a'; big]);
            let x = xattr(&mut b, s, reg);
            let xs = b.create_vector(&[x]).as_union_value();
            (0..entries)
                .map(|_| entry(&mut b, s, reg, xs, true))
                .collect()
        }
        Shape::Table { entries, big } => {
            let s = bytes(&mut b, &vec![b'a'; big]);
            let e = entry(&mut b, s, reg, no_xattrs, false);
            vec![e; entries]
        }
        Shape::Xattr { records, big } => {
            let s = bytes(&mut b, &vec![b'k'; big]);
            let name = bytes(&mut b, b"f");
            let x = xattr(&mut b, s, s);
            let xs = b.create_vector(&vec![x; records]).as_union_value();
            vec![entry(&mut b, name, reg, xs, false)]
        }
        Shape::Digest { digests } => {
            digest_slots = digests;
            Vec::new()
        }
    };
    let md = b.create_vector(&entries);
    let t = b.start_table();
    b.push_slot_always(TOC_METADATA, md);
    let toc = b.end_table(t);
    let d = bytes(&mut b, format!("sha256:{}", "ab".repeat(32)).as_bytes());
    let digests = b.create_vector(&vec![d; digest_slots]);
    let cps = b.create_vector(&[0u8; 16]);
    let t = b.start_table();
    b.push_slot::<i32>(CI_MAX_SPAN, digest_slots as i32 - 1, 0);
    b.push_slot_always(CI_DIGESTS, digests);
    b.push_slot_always(CI_CHECKPOINTS, cps);
    b.push_slot::<i8>(CI_ALGO, 1, 1);
    let info = b.end_table(t);
    let v = bytes(&mut b, b"0.9");
    let t = b.start_table();
    b.push_slot_always(Z_VERSION, v);
    b.push_slot_always(Z_TOOL, v);
    b.push_slot_always(Z_TOC, toc);
    b.push_slot::<i64>(Z_CSIZE, 100, 0);
    b.push_slot::<i64>(Z_USIZE, 100, 0);
    b.push_slot_always(Z_INFO, info);
    let root = b.end_table(t);
    b.finish_minimal(root);
    b.finished_data().to_vec()
}

fn expect_refused(shape: Shape, what: &str) {
    let blob = hostile(shape);
    let start = std::time::Instant::now();
    let err = decode_capped(&blob).expect_err("hostile zTOC must be refused");
    assert!(err.contains(what), "{err}");
    assert!(start.elapsed() < std::time::Duration::from_secs(5));
}

#[test]
fn shared_name_string_is_refused_with_bounded_memory() {
    let _g = serial();
    // ~1 MiB blob; the old decoder copied 2.5 MiB per entry (~30 GiB in all).
    expect_refused(
        Shape::String {
            entries: 12_000,
            big: 512 << 10,
        },
        "larger than",
    );
}

#[test]
fn shared_entry_table_is_refused_with_bounded_memory() {
    let _g = serial();
    // 4 MiB of vector slots all naming one entry: ~1M entries of a 64 KiB name each.
    expect_refused(
        Shape::Table {
            entries: 1 << 20,
            big: 64 << 10,
        },
        "entries",
    );
}

#[test]
fn shared_xattr_table_is_refused_with_bounded_memory() {
    let _g = serial();
    expect_refused(
        Shape::Xattr {
            records: 200_000,
            big: 256 << 10,
        },
        "xattr",
    );
}

#[test]
fn shared_span_digest_is_within_bound() {
    let _g = serial();
    // 32 decoded bytes per 4-byte slot: an 8x amplification, inside the proportional budget
    // (the zTOC is then rejected by the span table check, not here).
    let blob = hostile(Shape::Digest { digests: 1 << 20 });
    let _ = decode_capped(&blob);
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// A layer of `n` small files (with xattrs on some) in nested directories.
fn many_small_files(n: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for d in 0..n / 1000 + 1 {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, format!("usr/share/d{d}/"), &b""[..])
            .unwrap();
    }
    for i in 0..n {
        if i % 50 == 0 {
            b.append_pax_extensions([("SCHILY.xattr.user.k", &b"v"[..])])
                .unwrap();
        }
        let data = if i % 3 == 0 { &b"x"[..] } else { &b""[..] };
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_600_000_000);
        b.append_data(&mut h, format!("usr/share/d{}/f{i}", i / 1000), data)
            .unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn honest_large_ztoc_decodes_within_bound() {
    let _g = serial();
    let gz = gzip(&many_small_files(300_000));
    let z = build(gz.as_slice(), &BuildOptions::default()).unwrap();
    let blob = z.to_bytes();
    drop(z);
    let base = ALLOC.allocated();
    let back = decode_capped(&blob).expect("honest zTOC decodes under the bound");
    let live = ALLOC.allocated() - base;
    eprintln!(
        "honest zTOC: {} entries, {} bytes, decoded {live} bytes ({:.2}x)",
        back.entries.len(),
        blob.len(),
        live as f64 / blob.len() as f64
    );
    // The decoded zTOC is well inside the decode budget (8x + 1 MiB).
    assert!(live < 4 * blob.len());
    assert_eq!(back.entries.len(), 300_000 + 301);
    back.spans().expect("honest zTOC validates");
}

/// A gzip layer with two files and its zTOC (span size 1 KiB, so several checkpoints).
fn small_layer() -> (Vec<u8>, Ztoc) {
    let mut b = tar::Builder::new(Vec::new());
    for (name, len) in [("a", 3000usize), ("b", 5000)] {
        let data: Vec<u8> = (0..len).map(|i| (i * 7919 % 251) as u8).collect();
        let mut h = tar::Header::new_gnu();
        h.set_size(len as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    let gz = gzip(&b.into_inner().unwrap());
    let opts = BuildOptions {
        span_size: 1024,
        ..Default::default()
    };
    let z = build(gz.as_slice(), &opts).unwrap();
    (gz, z)
}

#[test]
fn entry_past_the_end_is_refused_at_validation() {
    let _g = serial();
    let (_, z) = small_layer();
    for (grow_size, by) in [(true, 1u64), (true, 1 << 20), (false, 100_000)] {
        let mut bad = z.clone();
        let e = bad.entries.iter_mut().find(|e| e.name == b"b").unwrap();
        if grow_size {
            e.size = z.uncompressed_archive_size - e.offset + by;
        } else {
            e.offset += by;
        }
        let bytes = bad.to_bytes();
        let decoded = Ztoc::from_bytes(&bytes).unwrap();
        let err = decoded
            .spans()
            .expect_err("entry past the end must be refused")
            .to_string();
        assert!(err.contains("\"b\"") && err.contains("past"), "{err}");
    }
    // Offset + size overflowing u64 is refused too, not wrapped.
    let mut bad = z.clone();
    let e = bad.entries.iter_mut().find(|e| e.name == b"b").unwrap();
    e.offset = i64::MAX as u64;
    e.size = i64::MAX as u64;
    assert!(Ztoc::from_bytes(&bad.to_bytes()).unwrap().spans().is_err());
    // The honest zTOC still validates, and an empty file past the end is harmless.
    z.spans().unwrap();
    let mut ok = z.clone();
    let e = ok.entries.iter_mut().find(|e| e.name == b"a").unwrap();
    e.offset = 1 << 40;
    e.size = 0;
    ok.spans().unwrap();
}

/// Runs `f` with at most `extra` bytes allocated on top of what is live (abort past it).
fn with_cap<T>(extra: usize, f: impl FnOnce() -> T) -> T {
    let base = ALLOC.allocated();
    ALLOC.set_limit(base + extra).unwrap();
    let r = f();
    ALLOC.set_limit(usize::MAX).unwrap();
    r
}

#[test]
fn pax_header_size_is_not_allocated_ahead_of_its_bytes() {
    let _g = serial();
    // A PAX header claiming 1 MiB of records, then the stream ends.
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::XHeader);
    h.set_size(1 << 20);
    h.set_path("pax").unwrap();
    h.set_cksum();
    let stream = h.as_bytes().to_vec();
    let r = with_cap(256 << 10, || {
        let mut w = soci_ztoc::tar::TarWalker::new(stream.as_slice());
        w.next_entry().map(|_| ())
    });
    assert!(matches!(r, Err(soci_ztoc::tar::TarError::Truncated { .. })));
}

#[test]
fn span_claiming_more_than_its_stream_is_not_allocated_ahead() {
    let _g = serial();
    let (gz, mut z) = small_layer();
    // The last span claims 200 MiB more than the stream holds (within MAX_SPAN_BYTES).
    z.uncompressed_archive_size += 200 << 20;
    let spans = z.spans().unwrap();
    let last = spans.span(spans.len() - 1).unwrap();
    let compressed = &gz[last.compressed.start as usize..last.compressed.end as usize];
    let r = with_cap(32 << 20, || {
        spans.decompress(last.id, compressed).map(|v| v.len())
    });
    assert!(r.is_err(), "a short stream is an error: {r:?}");
}

#[test]
fn span_with_far_more_compressed_than_uncompressed_bytes_is_refused() {
    let (_, mut z) = small_layer();
    assert!(z.spans().is_ok());
    // A layer of gigabytes behind a handful of checkpoints: the last span would make a reader
    // fetch and buffer everything up to the end of the blob for a few uncompressed bytes.
    z.compressed_archive_size = 4 << 30;
    let e = z.spans().unwrap_err().to_string();
    assert!(e.contains("compressed bytes for"), "{e}");
}
