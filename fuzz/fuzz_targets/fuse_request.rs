//! FUSE request decoding (what the kernel writes to /dev/fuse).
#![no_main]
use libfuzzer_sys::fuzz_target;
use soci_fs::kernel::Request;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Request::parse(data) {
        let _ = r.name();
        let _ = r.read_args();
        let _ = r.xattr_args();
        if let Ok(init) = r.init_args() {
            let wants = soci_fs::kernel::InitWants {
                flags: u32::MAX,
                max_background: 16,
                congestion_threshold: 12,
                max_write: 131072,
                max_pages: 256,
            };
            if let Ok((out, session)) = init.negotiate(&wants) {
                assert!(out.minor <= soci_fs::kernel::KERNEL_MINOR);
                assert_eq!(session.minor, out.minor);
            }
        }
        let _ = r.header.is_resend();
    }
});
