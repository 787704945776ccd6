//! FUSE request decoding (what the kernel writes to /dev/fuse).
#![no_main]
use libfuzzer_sys::fuzz_target;
use soci_fs::kernel::Request;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Request::parse(data) {
        let _ = r.name();
        let _ = r.read_args();
        let _ = r.xattr_args();
        let _ = r.init_args();
    }
});
