//! Registering passthrough backing files with a FUSE connection: the two ioctls of
//! `include/uapi/linux/fuse.h` (7.40) on the `/dev/fuse` descriptor.
//!
//! ```c
//! #define FUSE_DEV_IOC_MAGIC          229
//! #define FUSE_DEV_IOC_BACKING_OPEN   _IOW(FUSE_DEV_IOC_MAGIC, 1, struct fuse_backing_map)
//! #define FUSE_DEV_IOC_BACKING_CLOSE  _IOW(FUSE_DEV_IOC_MAGIC, 2, uint32_t)
//! ```
//!
//! BACKING_OPEN takes a descriptor of a regular file and returns a positive backing id, valid
//! for the whole connection (not for the descriptor it was called on, nor for the process:
//! a daemon that takes the connection over sees the ids of its predecessor). The kernel keeps
//! its own reference to the file. It answers `EPERM` without `CAP_SYS_ADMIN` in the initial
//! user namespace or when passthrough was not negotiated at INIT, `ELOOP` when the file's
//! filesystem is stacked as deep as the announced `max_stack_depth`, `ENOTTY`/`EOPNOTSUPP`
//! on kernels without it.
//!
//! This is the only `unsafe` of the FUSE server: an ioctl is FFI. Both calls pass a pointer
//! to a value that lives on our stack for the duration of the call, of the exact type and
//! size the request number encodes (checked against the C definitions in the tests), and the
//! kernel only reads it.

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;

use super::abi::fuse_backing_map;

/// `FUSE_DEV_IOC_MAGIC`.
const FUSE_DEV_IOC_MAGIC: u8 = 229;

// `_IOW(229, 1, struct fuse_backing_map)`: `unsafe fn ioc_backing_open(fd, *const map)`.
nix::ioctl_write_ptr!(ioc_backing_open, FUSE_DEV_IOC_MAGIC, 1, fuse_backing_map);
// `_IOW(229, 2, uint32_t)`: `unsafe fn ioc_backing_close(fd, *const u32)`.
nix::ioctl_write_ptr!(ioc_backing_close, FUSE_DEV_IOC_MAGIC, 2, u32);

/// Registers `file` as a backing file of the connection `dev`; its backing id.
pub fn backing_open(dev: BorrowedFd<'_>, file: BorrowedFd<'_>) -> Result<u32, Errno> {
    let map = fuse_backing_map {
        fd: file.as_raw_fd(),
        flags: 0,
        padding: 0,
    };
    // SAFETY: `dev` is an open descriptor (borrowed for the call); `&map` points to a live,
    // initialised `fuse_backing_map`, the type `_IOW` encodes; the kernel only reads it.
    let id = unsafe { ioc_backing_open(dev.as_raw_fd(), &map) }?;
    match u32::try_from(id) {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(Errno::EPROTO),
    }
}

/// Drops backing id `id` of the connection `dev` (open files that use it keep their file).
pub fn backing_close(dev: BorrowedFd<'_>, id: u32) -> Result<(), Errno> {
    // SAFETY: as above; `&id` points to a live `u32`, the type `_IOW` encodes.
    unsafe { ioc_backing_close(dev.as_raw_fd(), &id) }.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_are_the_kernels() {
        // _IOW(type, nr, size) = (1 << 30) | (size << 16) | (type << 8) | nr on x86_64 and
        // arm64 (asm-generic/ioctl.h): 16-byte map, 4-byte id.
        assert_eq!(size_of::<fuse_backing_map>(), 16);
        let open = nix::request_code_write!(FUSE_DEV_IOC_MAGIC, 1, size_of::<fuse_backing_map>());
        let close = nix::request_code_write!(FUSE_DEV_IOC_MAGIC, 2, size_of::<u32>());
        assert_eq!(open as u64, 0x4010_e501);
        assert_eq!(close as u64, 0x4004_e502);
    }

    #[test]
    fn not_a_fuse_device_is_refused() {
        // Any other descriptor: the ioctl is unknown to it (ENOTTY), never a bogus id.
        let f = std::fs::File::open("/dev/null").unwrap();
        let e = backing_open(f.as_fd(), f.as_fd()).unwrap_err();
        assert!(matches!(e, Errno::ENOTTY | Errno::EINVAL), "{e}");
        assert!(backing_close(f.as_fd(), 1).is_err());
    }

    use std::os::fd::AsFd;
}
