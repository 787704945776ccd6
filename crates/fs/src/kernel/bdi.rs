//! The read-ahead window of a FUSE mount: a property of its backing device info (BDI), which
//! INIT can only lower.
//!
//! Why it matters: reads of a file that is not passed through (not local yet, passthrough off
//! or unavailable) reach the daemon as READ requests no larger than the read-ahead window.
//! The kernel offers `max_readahead` at INIT from the BDI's default, 128 KiB
//! (`VM_READAHEAD_PAGES`), and keeps the smaller of that and the daemon's answer
//! (`process_init_reply` in fs/fuse/inode.c): a sequential read then costs one round trip to
//! the daemon per 128 KiB although `max_pages` lets a READ carry 1 MiB. The window can be
//! raised, by root, through `/sys/class/bdi/<major>:<minor>/read_ahead_kb` of the mount's
//! anonymous device, once INIT is processed (the INIT reply would lower it again). Small
//! random reads are unaffected: the kernel starts every new read-ahead stream small and only
//! grows it for sequential access.

use std::io;
use std::path::{Path, PathBuf};

/// Read-ahead of a lazy mount in KiB: the largest READ the kernel sends us
/// (`max_pages` 256 pages of 4 KiB).
pub const READ_AHEAD_KIB: u32 = 1024;

/// The sysfs file holding the read-ahead window of the BDI of device `dev`.
pub fn read_ahead_path(dev: u64) -> PathBuf {
    PathBuf::from(format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    ))
}

/// Sets the read-ahead window of the FUSE mount at `mountpoint` to `kib` KiB. Call once the
/// kernel has processed INIT: the `stat` of the mount's root waits for that (the kernel holds
/// every request until the connection is initialised), and is answered by the daemon, so not
/// from the thread that serves the mount.
pub fn set_read_ahead(mountpoint: &Path, kib: u32) -> io::Result<()> {
    let st = nix::sys::stat::stat(mountpoint)?;
    let path = read_ahead_path(st.st_dev);
    std::fs::write(&path, format!("{kib}\n"))
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_names_the_devices_bdi() {
        // FUSE mounts get anonymous devices, major 0: 0:57 -> "0:57" (as the kernel's
        // super_setup_bdi_name("%u:%u")).
        let dev = nix::sys::stat::makedev(0, 57);
        assert_eq!(
            read_ahead_path(dev),
            PathBuf::from("/sys/class/bdi/0:57/read_ahead_kb")
        );
        let dev = nix::sys::stat::makedev(259, 1 << 12);
        assert_eq!(
            read_ahead_path(dev),
            PathBuf::from("/sys/class/bdi/259:4096/read_ahead_kb")
        );
    }

    #[test]
    fn a_path_that_is_not_mounted_fails_with_its_name() {
        let e = set_read_ahead(Path::new("/nonexistent-warm-mount"), 1024).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
