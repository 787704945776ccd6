//! SOCI index, image index and image manifest JSON parsing (and re-serialisation).
#![no_main]
use libfuzzer_sys::fuzz_target;
use soci_index::SociIndex;
use soci_registry::oci::to_go_json;
use soci_registry::{ImageIndex, ImageManifest, Reference};

fuzz_target!(|data: &[u8]| {
    if let Ok(idx) = SociIndex::parse(data) {
        let again = SociIndex::parse(&idx.to_json()).expect("our own JSON parses");
        assert_eq!(again, idx);
    }
    if let Ok(i) = serde_json::from_slice::<ImageIndex>(data) {
        let _ = to_go_json(&i);
    }
    if let Ok(m) = serde_json::from_slice::<ImageManifest>(data) {
        let _ = to_go_json(&m);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = Reference::parse(s);
    }
});
