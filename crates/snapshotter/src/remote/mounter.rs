//! The mount side of lazy layers behind a seam: FUSE mount (new, or resumed from a `/dev/fuse`
//! descriptor the fd holder kept), unmount, detach, and clearing a stale mount point.
//!
//! Why a seam: everything else about a lazy layer (planning, span managers, bookkeeping,
//! hand-back, release on Remove) is plain logic that unit tests can drive without root, a
//! kernel FUSE device or overlayfs. Production uses [`FuseMounter`]; tests pass a recording
//! fake to [`super::Remote::with_mounter`].

use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use soci_fs::{MountedLayer, Passthrough, Served, Session, SpanManager};

/// A detached background step of a mount.
pub type BoxFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>>;

use crate::holder::Held;

/// A lazy layer's mount, as the daemon uses it.
pub trait LazyMount: Send {
    /// The layer's span manager.
    fn spans(&self) -> &Arc<SpanManager>;
    /// The connection's protocol state (for the fd holder).
    fn session(&self) -> Session;
    /// The `/dev/fuse` descriptor to hand to the fd holder, if there is one.
    fn fuse_fd(&self) -> Option<BorrowedFd<'_>>;
    /// The layer's passthrough backing files, if the mount has them.
    fn passthrough(&self) -> Option<Arc<Passthrough>> {
        None
    }
    /// Writes backing files for every file whose spans are all local (run it once the
    /// background fetch completed the layer); a no-op without passthrough.
    fn materialize_local_files(&self) -> BoxFuture {
        Box::pin(async {})
    }
    /// Unmounts and ends the connection.
    fn unmount(self: Box<Self>) -> std::io::Result<()>;
    /// Stops serving but leaves the mount for the next daemon (reads in flight answered
    /// within `wait`).
    fn detach(self: Box<Self>, wait: Duration);
}

/// Makes and clears lazy-layer mounts.
pub trait Mounter: Send + Sync {
    /// Serves `served` at `dir`: on the descriptor `held` kept by the fd holder if given,
    /// else on a new FUSE mount.
    fn mount(
        &self,
        served: Served,
        dir: &Path,
        held: Option<Held>,
    ) -> std::io::Result<Box<dyn LazyMount>>;
    /// Detaches whatever is mounted at `dir` (left by an earlier daemon process).
    fn detach_stale(&self, dir: &Path);
}

/// The kernel's FUSE and `umount2`.
pub struct FuseMounter;

impl Mounter for FuseMounter {
    fn mount(
        &self,
        served: Served,
        dir: &Path,
        held: Option<Held>,
    ) -> std::io::Result<Box<dyn LazyMount>> {
        let m = match held {
            Some(h) => {
                let session = Session {
                    minor: h.minor,
                    resend: h.resend,
                };
                soci_fs::resume(served, h.fd, session, dir)?
            }
            None => soci_fs::mount(served, dir)?,
        };
        Ok(Box::new(m))
    }

    fn detach_stale(&self, dir: &Path) {
        detach_stale_mount(dir);
    }
}

impl LazyMount for MountedLayer {
    fn spans(&self) -> &Arc<SpanManager> {
        MountedLayer::spans(self)
    }

    fn session(&self) -> Session {
        MountedLayer::session(self)
    }

    fn passthrough(&self) -> Option<Arc<Passthrough>> {
        MountedLayer::passthrough(self).cloned()
    }
    fn materialize_local_files(&self) -> BoxFuture {
        Box::pin(MountedLayer::materialize_local_files(self))
    }
    fn fuse_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(MountedLayer::fuse_fd(self))
    }

    fn unmount(self: Box<Self>) -> std::io::Result<()> {
        MountedLayer::unmount(*self)
    }

    fn detach(self: Box<Self>, wait: Duration) {
        MountedLayer::detach(*self, wait)
    }
}

/// Detaches whatever is mounted at `dir` (a FUSE mount left by a previous daemon process).
pub fn detach_stale_mount(dir: &Path) {
    // EINVAL (not a mount point) and ENOENT are the common, harmless answers.
    let _ = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH);
}

/// A recording [`Mounter`] for unit tests: mounts nothing, remembers what was asked.
#[cfg(test)]
pub(crate) mod fake {
    use std::path::PathBuf;
    use std::sync::Mutex;

    use super::*;

    /// What the fake was asked to do, in order.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) enum Call {
        /// A mount at this directory (resumed from a held descriptor or not).
        Mount(PathBuf, bool),
        /// An unmount of the mount made at this directory.
        Unmount(PathBuf),
        /// A detach of the mount made at this directory.
        Detach(PathBuf),
        /// A stale mount point cleared.
        DetachStale(PathBuf),
    }

    /// Records calls; mounts succeed.
    #[derive(Default)]
    pub(crate) struct FakeMounter {
        pub(crate) calls: Arc<Mutex<Vec<Call>>>,
    }

    impl FakeMounter {
        pub(crate) fn calls(&self) -> Vec<Call> {
            self.calls.lock().unwrap().clone()
        }
    }

    struct FakeMount {
        dir: PathBuf,
        spans: Arc<SpanManager>,
        calls: Arc<Mutex<Vec<Call>>>,
    }

    impl LazyMount for FakeMount {
        fn spans(&self) -> &Arc<SpanManager> {
            &self.spans
        }
        fn session(&self) -> Session {
            Session {
                minor: 0,
                resend: false,
            }
        }
        fn fuse_fd(&self) -> Option<BorrowedFd<'_>> {
            None
        }
        fn unmount(self: Box<Self>) -> std::io::Result<()> {
            self.spans.close();
            self.calls
                .lock()
                .unwrap()
                .push(Call::Unmount(self.dir.clone()));
            Ok(())
        }
        fn detach(self: Box<Self>, _wait: Duration) {
            self.spans.close();
            self.calls
                .lock()
                .unwrap()
                .push(Call::Detach(self.dir.clone()));
        }
    }

    impl Mounter for FakeMounter {
        fn mount(
            &self,
            served: Served,
            dir: &Path,
            held: Option<Held>,
        ) -> std::io::Result<Box<dyn LazyMount>> {
            self.calls
                .lock()
                .unwrap()
                .push(Call::Mount(dir.to_path_buf(), held.is_some()));
            Ok(Box::new(FakeMount {
                dir: dir.to_path_buf(),
                spans: served.spans,
                calls: self.calls.clone(),
            }))
        }
        fn detach_stale(&self, dir: &Path) {
            self.calls
                .lock()
                .unwrap()
                .push(Call::DetachStale(dir.to_path_buf()));
        }
    }
}
