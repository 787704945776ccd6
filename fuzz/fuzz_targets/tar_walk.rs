//! Tar walker on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use soci_ztoc::tar::TarWalker;

fuzz_target!(|data: &[u8]| {
    let mut w = TarWalker::new(data);
    while let Ok(Some(_)) = w.next_entry() {}
});
