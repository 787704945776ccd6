//! FUSE request decoding (what the kernel writes to /dev/fuse).
#![no_main]
use libfuzzer_sys::fuzz_target;
use soci_fs::kernel::{negotiate, InitWants, Operation, Request, KERNEL_MINOR};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Request::parse(data) {
        assert!(r.header.len as usize <= data.len());
        if let Operation::Init { arg } = &r.op {
            let wants = InitWants {
                flags: u32::MAX,
                max_background: 16,
                congestion_threshold: 12,
                max_write: 131072,
                max_pages: 256,
            };
            if let Ok((out, session)) = negotiate(arg, &wants) {
                assert!(out.minor <= KERNEL_MINOR);
                assert_eq!(session.minor, out.minor);
            }
        }
        let _ = r.op.expects_reply();
        let _ = r.header.is_resend();
    }
});
