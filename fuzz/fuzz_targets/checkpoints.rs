//! gzip checkpoint blob parsing.
#![no_main]
use libfuzzer_sys::fuzz_target;
use soci_ztoc::GzipCheckpoints;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = GzipCheckpoints::parse(data.to_vec()) {
        for i in 0..c.points().len() {
            let _ = c.window(i);
        }
    }
});
