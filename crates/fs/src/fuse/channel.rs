//! The `/dev/fuse` connection of one mount: replies and backing-file registrations are
//! written to it from any thread, and one blocking loop reads requests from it and hands them
//! to [`LayerFs::dispatch`]. Kept apart from the handlers so they can be tested against an
//! in-memory [`ReplySink`] without a connection.

use std::io::IoSlice;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use tracing::{debug, error, warn};

use super::{LayerFs, BUF_SIZE};
use crate::kernel::{self, ReplySink};
use crate::passthrough::BackingFiles;

/// The `/dev/fuse` connection of one mount; replies are written here from any thread.
pub(crate) struct Channel {
    pub(crate) fd: OwnedFd,
}

impl BackingFiles for Channel {
    fn open(&self, file: std::os::fd::BorrowedFd<'_>) -> Result<u32, Errno> {
        kernel::backing::backing_open(self.fd.as_fd(), file)
    }

    fn close(&self, id: u32) -> Result<(), Errno> {
        kernel::backing::backing_close(self.fd.as_fd(), id)
    }
}

impl ReplySink for Channel {
    fn send(&self, parts: &[IoSlice<'_>]) {
        match nix::sys::uio::writev(&self.fd, parts) {
            Ok(_) => {}
            // The request was interrupted, or the filesystem is gone: nobody waits any more.
            Err(Errno::ENOENT) | Err(Errno::ENODEV) => {}
            Err(e) => warn!(error = %e, "FUSE reply not delivered"),
        }
    }
}

/// Reads and dispatches requests until the connection ends or `stop` becomes readable.
pub(crate) fn serve(fs: Arc<LayerFs>, ch: Arc<Channel>, stop: OwnedFd) {
    let mut buf = vec![0u8; BUF_SIZE];
    let sink: Arc<dyn ReplySink> = ch.clone();
    loop {
        let mut fds = [
            PollFd::new(ch.fd.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return error!(error = %e, "poll on /dev/fuse failed"),
        }
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            return;
        }
        let rev = fds[0].revents().unwrap_or(PollFlags::empty());
        if !rev.contains(PollFlags::POLLIN) && !rev.is_empty() {
            return debug!(?rev, "FUSE connection closed");
        }
        match nix::unistd::read(&ch.fd, &mut buf) {
            Ok(n) => fs.dispatch(&buf[..n], &sink),
            Err(Errno::ENOENT) | Err(Errno::EINTR) | Err(Errno::EAGAIN) => continue,
            Err(Errno::ENODEV) => return debug!("FUSE filesystem unmounted"),
            Err(e) => return error!(error = %e, "reading /dev/fuse failed"),
        }
    }
}
