//! Whole builder (gzip detection, zran indexing, tar walk) on arbitrary layer bytes, then
//! extraction of every file through the resulting zTOC.
#![no_main]
use libfuzzer_sys::fuzz_target;
use soci_ztoc::{build, BuildOptions};

fuzz_target!(|data: &[u8]| {
    let opts = BuildOptions { span_size: 1024, ..Default::default() };
    if let Ok(z) = build(data, &opts) {
        let spans = z.spans().expect("a zTOC we built must validate");
        let mut src: &[u8] = data;
        for e in &z.entries {
            if e.kind == soci_ztoc::EntryKind::Regular {
                let got = z.read_file(&spans, &mut src, &e.name).expect("read back");
                assert_eq!(got.len() as u64, e.size);
            }
        }
    }
});
