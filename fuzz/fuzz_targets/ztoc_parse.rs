//! zTOC flatbuffer parsing, span table validation and reads against a fixed blob.
#![no_main]
use libfuzzer_sys::fuzz_target;
use soci_ztoc::Ztoc;

fuzz_target!(|data: &[u8]| {
    if let Ok(z) = Ztoc::from_bytes(data) {
        let _ = z.to_bytes();
        if let Ok(spans) = z.spans() {
            let mut src: &[u8] = data;
            for e in z.entries.iter().take(16) {
                let _ = z.read_file(&spans, &mut src, &e.name);
            }
        }
    }
});
