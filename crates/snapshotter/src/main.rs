//! `soci-snapshotter-grpc`: the soci-rs containerd snapshotter daemon.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use soci_snapshotter::config::{Config, DEFAULT_CONFIG_PATH};
use soci_snapshotter::cri::ImageProxy;
use soci_snapshotter::proto::runtime::v1::image_service_server::ImageServiceServer;
use soci_snapshotter::proto::snapshots::snapshots_server::SnapshotsServer;
use soci_snapshotter::remote::Remote;
use soci_snapshotter::{Service, Snapshotter};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

/// The soci-rs containerd snapshotter daemon.
#[derive(Parser)]
#[command(name = "soci-snapshotter-grpc", version, about)]
struct Args {
    /// gRPC unix socket to listen on; `fd://` = the socket passed by systemd (socket
    /// activation), as upstream.
    #[arg(long, env = "SOCI_SNAPSHOTTER_ADDRESS")]
    address: Option<PathBuf>,
    /// State directory.
    #[arg(long, env = "SOCI_SNAPSHOTTER_ROOT")]
    root: Option<PathBuf>,
    /// Config file (TOML).
    #[arg(long, env = "SOCI_SNAPSHOTTER_CONFIG")]
    config: Option<PathBuf>,
    /// Log level (error, warn, info, debug, trace).
    #[arg(long, env = "SOCI_SNAPSHOTTER_LOG_LEVEL")]
    log_level: Option<String>,
    /// Log format: text or json.
    #[arg(long)]
    log_format: Option<String>,
    /// Start-path timeline: append every closed span of the lazy start path as a JSON line to
    /// this file (`bench/waterfall.py` draws it).
    #[arg(long, env = "SOCI_SNAPSHOTTER_TIMELINE")]
    timeline: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Internal: the process that keeps lazy layers' FUSE descriptors open across daemon
    /// restarts (started by the daemon itself).
    #[command(hide = true)]
    FdHolder {
        /// Socket to listen on.
        #[arg(long)]
        socket: PathBuf,
        /// Seconds to wait for a daemon to come back before releasing the mounts.
        #[arg(long, default_value_t = 60)]
        timeout_sec: u64,
    },
    /// Print the configuration as TOML.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(clap::Subcommand)]
enum ConfigCommand {
    /// The effective configuration (config file, environment and flags applied).
    Dump,
    /// The default configuration.
    Default,
}

fn init_logging(level: &str, format: &str, timeline: Option<&std::path::Path>) -> Result<()> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .with_context(|| format!("invalid log level {level:?}"))?;
    let b = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let fmt = match format {
        "json" => b.json().with_filter(filter).boxed(),
        "text" => b.with_filter(filter).boxed(),
        other => anyhow::bail!("invalid log format {other:?} (text or json)"),
    };
    let timeline = timeline
        .map(|p| {
            soci_snapshotter::timeline::Timeline::open(p)
                .with_context(|| format!("timeline file {}", p.display()))
        })
        .transpose()?
        .map(|t| {
            t.with_filter(tracing_subscriber::filter::filter_fn(
                soci_snapshotter::timeline::Timeline::wants,
            ))
        });
    tracing_subscriber::registry()
        .with(fmt)
        .with(timeline)
        .try_init()
        .context("logging")?;
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("soci-snapshotter-grpc: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args = Args::parse();
    if let Some(Command::FdHolder {
        socket,
        timeout_sec,
    }) = &args.command
    {
        return soci_snapshotter::holder::run(socket, Duration::from_secs(*timeout_sec))
            .map_err(Into::into);
    }
    if let Some(Command::Config(ConfigCommand::Default)) = &args.command {
        print!("{}", Config::default().to_toml());
        return Ok(());
    }
    let (mut cfg, notes) = match &args.config {
        Some(p) => Config::load(p, true),
        None => Config::load(DEFAULT_CONFIG_PATH.as_ref(), false),
    }
    .map_err(anyhow::Error::msg)?;
    if let Some(r) = &args.root {
        cfg.root_path = r.clone();
    }
    if let Some(a) = &args.address {
        cfg.address = a.clone();
    }
    if let Some(l) = &args.log_level {
        cfg.log_level = l.clone();
    }
    if let Some(f) = &args.log_format {
        cfg.log_format = f.clone();
    }
    if let Some(Command::Config(ConfigCommand::Dump)) = &args.command {
        for n in &notes {
            eprintln!("warning: {n}");
        }
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    init_logging(&cfg.log_level, &cfg.log_format, args.timeline.as_deref())?;
    for n in &notes {
        warn!("{n}");
    }
    // Process environment is read and changed here, before any thread exists.
    let activated = activated_listener()?;
    let notify = sd_notify_socket();
    if cfg.address.as_os_str() == "fd://" && activated.is_none() {
        anyhow::bail!("--address fd:// needs a socket passed by systemd (LISTEN_FDS)");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (root, address) = (cfg.root_path.clone(), cfg.address.clone());
    rt.block_on(serve(cfg, root, address, activated, notify))
}

/// The service manager's notification socket (`NOTIFY_SOCKET`, `Type=notify`), if any; the
/// variable is removed so that child processes (the fd holder) do not inherit it.
fn sd_notify_socket() -> Option<std::os::unix::net::SocketAddr> {
    let path = std::env::var_os("NOTIFY_SOCKET")?;
    std::env::remove_var("NOTIFY_SOCKET");
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    match bytes.strip_prefix(b"@") {
        Some(name) => {
            <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name).ok()
        }
        None => std::os::unix::net::SocketAddr::from_pathname(&path).ok(),
    }
}

/// Sends a state line (`READY=1`, `STOPPING=1`) to the service manager; best effort.
fn sd_notify(addr: Option<&std::os::unix::net::SocketAddr>, state: &str) {
    let Some(addr) = addr else { return };
    let sent = std::os::unix::net::UnixDatagram::unbound()
        .and_then(|s| s.send_to_addr(state.as_bytes(), addr));
    if let Err(e) = sent {
        warn!(error = %e, state, "cannot notify the service manager");
    }
}

/// Binds the gRPC socket (mode 0600), replacing a stale one.
fn bind(address: &std::path::Path) -> Result<UnixListener> {
    if let Some(dir) = address.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(address) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("removing stale socket {}", address.display()))
        }
    }
    let listener = UnixListener::bind(address)
        .with_context(|| format!("listening on {}", address.display()))?;
    std::fs::set_permissions(address, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// The listening socket passed by systemd socket activation (`LISTEN_PID` = our pid,
/// `LISTEN_FDS` >= 1, first fd 3). The socket outlives daemon restarts, so containerd's
/// connection attempts queue instead of failing while the daemon is down.
fn activated_listener() -> Result<Option<std::os::unix::net::UnixListener>> {
    let pid_matches = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let fds: u32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if !pid_matches || fds == 0 {
        return Ok(None);
    }
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    const SD_LISTEN_FDS_START: std::os::fd::RawFd = 3;
    // SAFETY: the service manager passed fd 3 to this process as a listening socket and
    // nothing else in the process owns it; ownership moves into the listener here, once.
    let std_listener = unsafe {
        <std::os::unix::net::UnixListener as std::os::fd::FromRawFd>::from_raw_fd(
            SD_LISTEN_FDS_START,
        )
    };
    std_listener.set_nonblocking(true)?;
    Ok(Some(std_listener))
}

async fn serve(
    cfg: Config,
    root: PathBuf,
    address: PathBuf,
    activated: Option<std::os::unix::net::UnixListener>,
    notify: Option<std::os::unix::net::SocketAddr>,
) -> Result<()> {
    std::fs::create_dir_all(&root).with_context(|| format!("creating root {}", root.display()))?;
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))?;
    let remote = Arc::new(
        Remote::new(&root, &cfg)
            .map_err(anyhow::Error::msg)
            .context("setting up remote layers")?,
    );
    let (r, rem) = (root.clone(), remote.clone());
    let snapshotter = tokio::task::spawn_blocking(move || Snapshotter::open(&r, Some(rem)))
        .await?
        .with_context(|| format!("opening snapshotter state in {}", root.display()))?;
    let snapshotter = Arc::new(snapshotter);
    {
        let r = remote.clone();
        tokio::task::spawn_blocking(move || r.connect_holder()).await?;
    }
    // Lazy layers of an earlier run are mounted again in the background: start-up never waits
    // on a registry.
    tokio::spawn(snapshotter.clone().restore_lazy_layers());
    if let Some(addr) = cfg.metrics_addr().map(str::to_string) {
        let s = snapshotter.clone();
        tokio::spawn(async move {
            if let Err(e) = soci_snapshotter::metrics::serve(addr, s).await {
                error!(error = %e, "metrics endpoint failed");
            }
        });
    }

    let owns_socket = activated.is_none();
    let listener = match activated {
        Some(l) => {
            info!("using the socket passed by the service manager (socket activation)");
            UnixListener::from_std(l).context("socket passed by the service manager")?
        }
        None => bind(&address)?,
    };
    info!(address = %address.display(), root = %root.display(), "soci-snapshotter-grpc serving");

    // `[cri_keychain]`: the kubelet's ImageService, on this same socket (as upstream).
    let image_proxy = remote.cri_credentials.clone().map(|store| {
        info!(backend = %cfg.cri_keychain.image_service_path.display(), "serving the CRI image service (cri_keychain)");
        ImageServiceServer::new(ImageProxy::new(
            cfg.cri_keychain.image_service_path.clone(),
            store,
        ))
    });
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SnapshotsServer::new(Service::new(snapshotter.clone())))
            .add_optional_service(image_proxy)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                async {
                    let _ = stop_rx.await;
                },
            ),
    );
    sd_notify(notify.as_ref(), "READY=1");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
    sd_notify(notify.as_ref(), "STOPPING=1");
    let _ = stop_tx.send(());
    match tokio::time::timeout(Duration::from_secs(cfg.shutdown_timeout_sec), server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => error!(error = %e, "gRPC server error during shutdown"),
        Ok(Err(e)) => error!(error = %e, "gRPC server task failed"),
        Err(_) => error!("in-flight calls did not finish in time; exiting anyway"),
    }
    if owns_socket {
        let _ = std::fs::remove_file(&address);
    }
    if let Some(r) = snapshotter.remote() {
        let r = r.clone();
        let wait = Duration::from_secs(cfg.blob.fetching_timeout_sec.max(1));
        let _ = tokio::task::spawn_blocking(move || r.shutdown(wait)).await;
    }
    info!("stopped");
    Ok(())
}
