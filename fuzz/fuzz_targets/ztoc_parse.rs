//! zTOC flatbuffer parsing, span table validation and reads against a fixed blob.
//!
//! Decoding and validation run under an allocation cap in proportion to the input
//! (the decode budget, `DECODE_FACTOR x input`, twice over for the copies `spans()` makes, plus
//! 2 MiB): a decoder that copies shared flatbuffer data per reference exceeds it, and the
//! allocator then fails the allocation, which aborts and is reported as a crash. Run with
//! `-rss_limit_mb` / `-malloc_limit_mb` as well for the process as a whole.
#![no_main]
use std::alloc::System;

use cap::Cap;
use libfuzzer_sys::fuzz_target;
use soci_ztoc::limits::DECODE_FACTOR;
use soci_ztoc::Ztoc;

#[global_allocator]
static ALLOC: Cap<System> = Cap::new(System, usize::MAX);

fn capped<T>(input_len: usize, f: impl FnOnce() -> T) -> T {
    let bound = (2 * DECODE_FACTOR as usize + 2) * input_len + (2 << 20);
    // The limit is on live bytes; libFuzzer runs one input at a time on this thread.
    let _ = ALLOC.set_limit(ALLOC.allocated() + bound);
    let r = f();
    let _ = ALLOC.set_limit(usize::MAX);
    r
}

fuzz_target!(|data: &[u8]| {
    let parsed = capped(data.len(), || {
        Ztoc::from_bytes(data).map(|z| {
            let spans = z.spans();
            (z, spans)
        })
    });
    if let Ok((z, spans)) = parsed {
        let _ = z.to_bytes();
        if let Ok(spans) = spans {
            let mut src: &[u8] = data;
            for e in z.entries.iter().take(16) {
                let _ = z.read_file(&spans, &mut src, &e.name);
            }
        }
    }
});
