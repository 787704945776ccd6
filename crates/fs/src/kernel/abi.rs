//! The structs of `include/uapi/linux/fuse.h` we read or write, named and laid out as there
//! (protocol 7.40), so that a field can be checked against the header by name.
//!
//! Each struct is `#[repr(C)]` and derives `zerocopy`'s traits: decoding is a bounds-checked
//! copy out of the request buffer ([`FromBytes::read_from_prefix`]), encoding is
//! [`IntoBytes::as_bytes`], and the derive refuses a struct with hidden padding. No `unsafe`.
//! The `layout!` assertions below pin every struct's size and every field's offset at compile
//! time, with the numbers of the C header.
//!
//! Host header note: Debian 12's `/usr/include/linux/fuse.h` is 7.38. 7.39 and 7.40 renamed
//! former padding without moving anything: `fuse_open_out.padding` became `backing_id` (7.40,
//! passthrough), `fuse_init_out.unused[7]` became `max_stack_depth` + `unused[6]` (7.40). The
//! fields below follow 7.40.

#![allow(non_camel_case_types)]

use core::mem::{offset_of, size_of};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Compile-time size and field offsets of a wire struct, numbers from `fuse.h`.
macro_rules! layout {
    ($t:ty, $size:expr, { $($f:ident : $off:expr),* $(,)? }) => {
        const _: () = assert!(size_of::<$t>() == $size);
        $(const _: () = assert!(offset_of!($t, $f) == $off);)*
    };
}

/// `struct fuse_in_header`: the fixed start of every request.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct fuse_in_header {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    /// Length of the request extensions after the arguments, in 8-byte units (7.38).
    pub total_extlen: u16,
    pub padding: u16,
}
layout!(fuse_in_header, 40, { len: 0, opcode: 4, unique: 8, nodeid: 16, uid: 24, gid: 28,
    pid: 32, total_extlen: 36, padding: 38 });

/// `struct fuse_out_header`: the fixed start of every reply and notification.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct fuse_out_header {
    pub len: u32,
    /// 0, a negated errno, or (with `unique` 0) a notification code.
    pub error: i32,
    pub unique: u64,
}
layout!(fuse_out_header, 16, { len: 0, error: 4, unique: 8 });

/// `struct fuse_attr`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct fuse_attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: u64,
    pub mtime: u64,
    pub ctime: u64,
    pub atimensec: u32,
    pub mtimensec: u32,
    pub ctimensec: u32,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
    pub flags: u32,
}
layout!(fuse_attr, 88, { ino: 0, size: 8, blocks: 16, atime: 24, mtime: 32, ctime: 40,
    atimensec: 48, mtimensec: 52, ctimensec: 56, mode: 60, nlink: 64, uid: 68, gid: 72,
    rdev: 76, blksize: 80, flags: 84 });

/// `struct fuse_entry_out` (LOOKUP, and the first part of a `fuse_direntplus`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct fuse_entry_out {
    pub nodeid: u64,
    pub generation: u64,
    pub entry_valid: u64,
    pub attr_valid: u64,
    pub entry_valid_nsec: u32,
    pub attr_valid_nsec: u32,
    pub attr: fuse_attr,
}
layout!(fuse_entry_out, 128, { nodeid: 0, generation: 8, entry_valid: 16, attr_valid: 24,
    entry_valid_nsec: 32, attr_valid_nsec: 36, attr: 40 });

/// `struct fuse_forget_in`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct fuse_forget_in {
    pub nlookup: u64,
}
layout!(fuse_forget_in, 8, { nlookup: 0 });

/// `struct fuse_forget_one` (the entries after a `fuse_batch_forget_in`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct fuse_forget_one {
    pub nodeid: u64,
    pub nlookup: u64,
}
layout!(fuse_forget_one, 16, { nodeid: 0, nlookup: 8 });

/// `struct fuse_batch_forget_in`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct fuse_batch_forget_in {
    pub count: u32,
    pub dummy: u32,
}
layout!(fuse_batch_forget_in, 8, { count: 0, dummy: 4 });

/// `struct fuse_getattr_in`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct fuse_getattr_in {
    pub getattr_flags: u32,
    pub dummy: u32,
    pub fh: u64,
}
layout!(fuse_getattr_in, 16, { getattr_flags: 0, dummy: 4, fh: 8 });

/// `struct fuse_attr_out` (GETATTR).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct fuse_attr_out {
    pub attr_valid: u64,
    pub attr_valid_nsec: u32,
    pub dummy: u32,
    pub attr: fuse_attr,
}
layout!(fuse_attr_out, 104, { attr_valid: 0, attr_valid_nsec: 8, dummy: 12, attr: 16 });

/// `struct fuse_open_in` (OPEN, OPENDIR).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct fuse_open_in {
    pub flags: u32,
    pub open_flags: u32,
}
layout!(fuse_open_in, 8, { flags: 0, open_flags: 4 });

/// `struct fuse_open_out` (7.40: `backing_id` was `padding`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct fuse_open_out {
    pub fh: u64,
    pub open_flags: u32,
    /// Backing file id (from `FUSE_DEV_IOC_BACKING_OPEN`) of an open with
    /// `FOPEN_PASSTHROUGH`; else 0.
    pub backing_id: i32,
}
layout!(fuse_open_out, 16, { fh: 0, open_flags: 8, backing_id: 12 });

/// `struct fuse_release_in` (RELEASE, RELEASEDIR).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct fuse_release_in {
    pub fh: u64,
    pub flags: u32,
    pub release_flags: u32,
    pub lock_owner: u64,
}
layout!(fuse_release_in, 24, { fh: 0, flags: 8, release_flags: 12, lock_owner: 16 });

/// `struct fuse_flush_in`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct fuse_flush_in {
    pub fh: u64,
    pub unused: u32,
    pub padding: u32,
    pub lock_owner: u64,
}
layout!(fuse_flush_in, 24, { fh: 0, unused: 8, padding: 12, lock_owner: 16 });

/// `struct fuse_read_in` (READ, READDIR, READDIRPLUS).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct fuse_read_in {
    pub fh: u64,
    pub offset: u64,
    pub size: u32,
    pub read_flags: u32,
    pub lock_owner: u64,
    pub flags: u32,
    pub padding: u32,
}
layout!(fuse_read_in, 40, { fh: 0, offset: 8, size: 16, read_flags: 20, lock_owner: 24,
    flags: 32, padding: 36 });

/// `struct fuse_kstatfs`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct fuse_kstatfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
    pub padding: u32,
    pub spare: [u32; 6],
}
layout!(fuse_kstatfs, 80, { blocks: 0, bfree: 8, bavail: 16, files: 24, ffree: 32, bsize: 40,
    namelen: 44, frsize: 48, padding: 52, spare: 56 });

/// `struct fuse_statfs_out`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct fuse_statfs_out {
    pub st: fuse_kstatfs,
}
layout!(fuse_statfs_out, 80, { st: 0 });

/// `struct fuse_getxattr_in` (GETXATTR, followed by the name; LISTXATTR).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct fuse_getxattr_in {
    pub size: u32,
    pub padding: u32,
}
layout!(fuse_getxattr_in, 8, { size: 0, padding: 4 });

/// `struct fuse_getxattr_out`: the answer to a size probe (`size` 0 in the request).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct fuse_getxattr_out {
    pub size: u32,
    pub padding: u32,
}
layout!(fuse_getxattr_out, 8, { size: 0, padding: 4 });

/// `struct fuse_init_in` as sent since 7.36 (with `FUSE_INIT_EXT`); older kernels send only
/// the first 16 bytes (up to `flags`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct fuse_init_in {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u32,
    pub flags2: u32,
    pub unused: [u32; 11],
}
layout!(fuse_init_in, 64, { major: 0, minor: 4, max_readahead: 8, flags: 12, flags2: 16,
    unused: 20 });
/// Size of the `fuse_init_in` a kernel before 7.36 sends.
pub const FUSE_COMPAT_INIT_IN_SIZE: usize = 16;

/// `struct fuse_init_out` (64 bytes since 7.23).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct fuse_init_out {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u32,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub max_write: u32,
    pub time_gran: u32,
    pub max_pages: u16,
    pub map_alignment: u16,
    /// 7.36+, read by the kernel only if `flags` has `FUSE_INIT_EXT`.
    pub flags2: u32,
    /// 7.40+, read only with `FUSE_PASSTHROUGH` in `flags2`: how deep the backing files'
    /// filesystems may be stacked, and the stacking depth of this FUSE superblock (see
    /// [`super::PASSTHROUGH_STACK_DEPTH`]); else 0.
    pub max_stack_depth: u32,
    pub unused: [u32; 6],
}
layout!(fuse_init_out, 64, { major: 0, minor: 4, max_readahead: 8, flags: 12,
    max_background: 16, congestion_threshold: 18, max_write: 20, time_gran: 24, max_pages: 28,
    map_alignment: 30, flags2: 32, max_stack_depth: 36, unused: 40 });

/// `struct fuse_interrupt_in`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct fuse_interrupt_in {
    pub unique: u64,
}
layout!(fuse_interrupt_in, 8, { unique: 0 });

/// `struct fuse_dirent` without its flexible `name[]`: the name follows, then zeros up to a
/// multiple of 8 (`FUSE_DIRENT_ALIGN`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct fuse_dirent {
    pub ino: u64,
    pub off: u64,
    pub namelen: u32,
    /// File type: `(st_mode & S_IFMT) >> 12`.
    pub r#type: u32,
}
layout!(fuse_dirent, 24, { ino: 0, off: 8, namelen: 16, r#type: 20 });

/// `struct fuse_direntplus` without the dirent's name.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct fuse_direntplus {
    pub entry_out: fuse_entry_out,
    pub dirent: fuse_dirent,
}
layout!(fuse_direntplus, 152, { entry_out: 0, dirent: 128 });

/// `FUSE_DIRENT_ALIGN`: the size of a dirent record with a name of `namelen` bytes.
pub const fn fuse_dirent_size(namelen: usize) -> usize {
    (size_of::<fuse_dirent>() + namelen).next_multiple_of(8)
}

/// `struct fuse_backing_map`: the argument of `FUSE_DEV_IOC_BACKING_OPEN` (7.40), an ioctl on
/// the `/dev/fuse` descriptor, not a wire message. `flags` and `padding` must be 0.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct fuse_backing_map {
    /// Descriptor of the backing file, in the calling process.
    pub fd: i32,
    pub flags: u32,
    pub padding: u64,
}
layout!(fuse_backing_map, 16, { fd: 0, flags: 4, padding: 8 });
