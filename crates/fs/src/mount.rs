//! Starting, resuming and ending the FUSE session of a layer mount (the request loop itself
//! is in [`crate::fuse`]).
//!
//! A session outlives the daemon process: the `/dev/fuse` descriptor is handed to the fd
//! holder, and a later daemon resumes it without INIT. What that later daemon must know about
//! the connection is its [`Session`] (negotiated minor, whether the kernel can resend the
//! requests a dead daemon took).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use tokio::runtime::Handle;
use tracing::{info, warn};

use crate::fuse::{serve, Channel, LayerFs};
use crate::kernel::{self, Session};
use crate::passthrough::{BackingFiles, Passthrough, PassthroughConfig};
use crate::spans::{FsMetrics, SpanManager};
use crate::tree::LayerTree;

/// Where a mount is in its life: what dropping the [`MountedLayer`] still has to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lifecycle {
    /// Serving; dropping unmounts.
    Serving,
    /// Left in place for the fd holder ([`MountedLayer::detach`]); dropping does nothing.
    Detached,
    /// Unmounted already ([`MountedLayer::unmount`]).
    Unmounted,
}

/// A served layer mount. Dropping it unmounts; [`MountedLayer::detach`] leaves the mount and
/// its connection to whoever else holds the `/dev/fuse` descriptor.
pub struct MountedLayer {
    fs: Arc<LayerFs>,
    ch: Arc<Channel>,
    mountpoint: PathBuf,
    stop: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
    state: Lifecycle,
}

impl MountedLayer {
    /// The layer's span manager (for background fetch and stats).
    pub fn spans(&self) -> &Arc<SpanManager> {
        &self.fs.spans
    }

    /// The `/dev/fuse` descriptor of the mount (to hand to an fd holder).
    pub fn fuse_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.ch.fd.as_fd()
    }

    /// Negotiated FUSE protocol minor version.
    pub fn proto_minor(&self) -> u32 {
        self.fs.session.get().minor
    }

    /// The connection's protocol state, for the fd holder to give the next daemon.
    pub fn session(&self) -> Session {
        self.fs.session.get()
    }

    /// The mount's passthrough state (backing files), if configured.
    pub fn passthrough(&self) -> Option<&Arc<Passthrough>> {
        self.fs.passthrough.as_ref()
    }

    /// Writes backing files for every file whose spans are all local (call once the
    /// background fetch completed the layer); a no-op without passthrough.
    pub fn materialize_local_files(
        &self,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.fs.clone().materialize_local_files()
    }

    /// Requests answered that the kernel had sent again (taken by an earlier daemon).
    pub fn resent_requests(&self) -> usize {
        self.fs.resent.load(Ordering::Relaxed)
    }

    /// Stops reading requests and joins the session thread.
    fn stop_loop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // Closing the write end would also wake the loop; writing is explicit.
            let _ = nix::unistd::write(&stop, &[1]);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Unmounts (lazily if busy) and ends the connection.
    pub fn unmount(mut self) -> std::io::Result<()> {
        self.do_unmount()
    }

    fn do_unmount(&mut self) -> std::io::Result<()> {
        self.state = Lifecycle::Unmounted;
        let r = match nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::empty()) {
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
            Err(Errno::EBUSY) => {
                warn!(mountpoint = %self.mountpoint.display(), "layer busy; detaching it");
                nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH)
                    .map_err(std::io::Error::from)
            }
            Err(e) => Err(e.into()),
        };
        self.fs.spans.close();
        self.stop_loop();
        r
    }

    /// Stops serving but leaves the mount in place: answers the reads in flight (waiting at
    /// most `wait`), then lets go of this process's descriptor. Requests that arrive later
    /// wait in the kernel for whoever holds the connection next ([`resume`]).
    pub fn detach(mut self, wait: Duration) {
        self.stop_loop();
        if !self.fs.inflight.wait_idle(wait) {
            warn!(
                mountpoint = %self.mountpoint.display(),
                "reads still in flight at detach: the next daemon gets them again by resend"
            );
        }
        self.fs.spans.close();
        if let Some(p) = &self.fs.passthrough {
            p.save();
        }
        self.state = Lifecycle::Detached;
    }
}

impl Drop for MountedLayer {
    fn drop(&mut self) {
        if self.state != Lifecycle::Serving {
            return;
        }
        if let Err(e) = self.do_unmount() {
            warn!(mountpoint = %self.mountpoint.display(), error = %e, "unmounting layer failed");
        }
    }
}

/// How long a new mount waits for the kernel's INIT.
const INIT_TIMEOUT: Duration = Duration::from_secs(10);

/// What serves a layer: its tree, spans and where reads run.
pub struct Served {
    /// Inodes.
    pub tree: Arc<LayerTree>,
    /// Span fetching and caching.
    pub spans: Arc<SpanManager>,
    /// Runtime the read tasks run on.
    pub rt: Handle,
    /// How long the kernel may cache what lookups and getattrs answer.
    pub timeouts: CacheTimeouts,
    /// Counters.
    pub metrics: Arc<FsMetrics>,
    /// FUSE passthrough of complete files (`None`: off).
    pub passthrough: Option<PassthroughConfig>,
}

/// How long the kernel may keep what the filesystem told it. A layer never changes while
/// mounted, so any value is correct; longer means fewer requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheTimeouts {
    /// A name found by LOOKUP (`entry_valid`).
    pub entry: Duration,
    /// A node's attributes (`attr_valid`).
    pub attr: Duration,
    /// A name LOOKUP did not find: answered as a negative entry (node id 0) cached this long;
    /// zero answers `ENOENT`, which the kernel does not cache.
    pub negative: Duration,
}

impl CacheTimeouts {
    /// The same timeout for all three.
    pub fn all(d: Duration) -> CacheTimeouts {
        CacheTimeouts {
            entry: d,
            attr: d,
            negative: d,
        }
    }
}

fn start(
    served: Served,
    fd: OwnedFd,
    mountpoint: &Path,
    session: Session,
) -> std::io::Result<MountedLayer> {
    let resumed = session.minor != 0;
    let fs = Arc::new(LayerFs::new(served, session));
    let ch = Arc::new(Channel { fd });
    if let Some(p) = &fs.passthrough {
        if resumed {
            p.resume();
        }
        let ch: Arc<dyn BackingFiles> = ch.clone();
        let _ = fs.backing.set(Arc::downgrade(&ch));
    }
    let (stop_r, stop_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (fs2, ch2) = (fs.clone(), ch.clone());
    let thread = std::thread::Builder::new()
        .name("soci-fuse".into())
        .spawn(move || serve(fs2, ch2, stop_r))?;
    Ok(MountedLayer {
        fs,
        ch,
        mountpoint: mountpoint.to_path_buf(),
        stop: Some(stop_w),
        thread: Some(thread),
        state: Lifecycle::Serving,
    })
}

/// Mounts a layer at `mountpoint` (read-only, `allow_other`, `default_permissions`, devices
/// and setuid allowed as in an image) and serves it; returns once the kernel's INIT is
/// answered.
#[tracing::instrument(level = "debug", name = "fuse_mount", skip_all)]
pub fn mount(served: Served, mountpoint: &Path) -> std::io::Result<MountedLayer> {
    let fd: OwnedFd = nix::fcntl::open(
        "/dev/fuse",
        OFlag::O_RDWR | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| std::io::Error::other(format!("opening /dev/fuse: {e}")))?;
    let opts = format!(
        "fd={},rootmode=40000,user_id={},group_id={},default_permissions,allow_other",
        fd.as_raw_fd(),
        nix::unistd::geteuid(),
        nix::unistd::getegid()
    );
    nix::mount::mount(
        Some("soci"),
        mountpoint,
        Some("fuse.soci"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(opts.as_str()),
    )?;
    let m = start(served, fd, mountpoint, Session::default())?;
    if !m.fs.session.wait_init(INIT_TIMEOUT) {
        drop(m);
        return Err(std::io::Error::other(format!(
            "the kernel sent no FUSE INIT for {} within {INIT_TIMEOUT:?}",
            mountpoint.display()
        )));
    }
    // INIT can only lower the kernel's 128 KiB read-ahead: raise it to our largest READ.
    if let Err(e) = kernel::bdi::set_read_ahead(mountpoint, kernel::bdi::READ_AHEAD_KIB) {
        warn!(mountpoint = %mountpoint.display(), error = %e, "cannot raise FUSE read-ahead");
    }
    Ok(m)
}

/// Serves an already mounted and initialised FUSE connection `fd` (protocol state `session`)
/// at `mountpoint`, as taken over from an earlier daemon process.
///
/// The earlier daemon may have died (kill -9) holding requests it had read and not
/// answered: the kernel keeps them as "being processed" forever, their callers wait, and the
/// page cache pages they fill stay locked for every later reader. Before our reader starts we
/// send `FUSE_NOTIFY_RESEND`, which puts them (and only them) back in the queue (ids marked with
/// [`kernel::UNIQUE_RESEND`]) and we answer them like any request. Without resend support
/// (kernel before 7.40, or a connection set up by a daemon that did not record it) they stay
/// stuck; that is logged once for the mount.
pub fn resume(
    served: Served,
    fd: OwnedFd,
    session: Session,
    mountpoint: &Path,
) -> std::io::Result<MountedLayer> {
    if session.minor < kernel::MIN_MINOR {
        return Err(std::io::Error::other(format!(
            "FUSE protocol 7.{} of the held connection at {} is not supported",
            session.minor,
            mountpoint.display()
        )));
    }
    let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)?;
    nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )?;
    // Before our reader runs: only requests the dead daemon took are queued again. Sent
    // after, a request our reader had just taken would be queued again too, and answered
    // twice (an OPEN counted twice, a READ computed twice).
    let resent = session
        .resend
        .then(|| nix::unistd::write(&fd, &kernel::notify_resend()));
    let m = start(served, fd, mountpoint, session)?;
    if let Some(resent) = resent {
        // The reader thread runs: whatever the kernel queued again is read and answered.
        match resent {
            Ok(_) => info!(
                mountpoint = %mountpoint.display(),
                "asked the kernel to resend FUSE requests the previous daemon left unanswered"
            ),
            Err(e) => warn!(
                mountpoint = %mountpoint.display(),
                error = %e,
                "FUSE_NOTIFY_RESEND refused: reads the previous daemon took may stay blocked"
            ),
        }
    } else {
        warn!(
            mountpoint = %mountpoint.display(),
            minor = session.minor,
            "FUSE connection without resend support (kernel before 7.40, or set up by an older \
             daemon): reads the previous daemon took and did not answer stay blocked until \
             the layer is unmounted"
        );
    }
    Ok(m)
}
