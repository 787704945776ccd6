//! `soci`: build and inspect SOCI artifacts.

mod artifacts;
mod convert_cmd;
mod duration;
mod image_cmd;
mod local_cmd;
mod push_cmd;
mod record_cmd;
mod rpull;
mod version;
mod ztoc_cmd;
mod ztoc_local;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use soci_registry::{Client, ClientOptions, HostsConfig};

/// Build, inspect and push SOCI (Seekable OCI) artifacts; a drop-in for upstream
/// soci-snapshotter's `soci` command.
#[derive(Parser)]
#[command(name = "soci", about, disable_version_flag = true)]
struct Cli {
    #[command(flatten)]
    global: Globals,
    #[command(subcommand)]
    command: Command,
}

/// Upstream's global flags (same names, defaults and environment variables).
#[derive(Args, Clone, Debug)]
pub struct Globals {
    /// Address for containerd's GRPC server.
    #[arg(
        short = 'a',
        long,
        global = true,
        env = "CONTAINERD_ADDRESS",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub address: String,
    /// Namespace to use with commands.
    #[arg(
        short = 'n',
        long,
        global = true,
        env = "CONTAINERD_NAMESPACE",
        default_value = "default"
    )]
    pub namespace: String,
    /// Timeout for commands (Go duration: 30s, 5m, 1h30m; 0 = none).
    #[arg(long, global = true, value_parser = duration::parse)]
    pub timeout: Option<std::time::Duration>,
    /// Enable debug output.
    #[arg(long, global = true)]
    pub debug: bool,
    /// Content store for SOCI artifacts: `containerd` (containerd's content store, in the
    /// namespace) or `soci` (`<root>/content`).
    #[arg(long, global = true, default_value = "containerd", value_parser = ["containerd", "soci"])]
    pub content_store: String,
    /// Path to the root directory for this snapshotter (artifacts database, `soci` content store).
    #[arg(long, global = true, default_value = "/var/lib/soci-snapshotter-grpc")]
    pub root: PathBuf,
}

/// How to reach registries.
#[derive(Args, Clone)]
pub struct RegistryArgs {
    /// Use plain HTTP (no TLS) for registries.
    #[arg(long)]
    pub plain_http: bool,
    /// containerd hosts directory with `<host>/hosts.toml` (mirrors, plain HTTP).
    #[arg(long, default_value = "/etc/containerd/certs.d")]
    pub hosts_dir: PathBuf,
}

impl RegistryArgs {
    /// A registry client for these settings.
    pub fn client(&self) -> Result<Arc<Client>> {
        let hosts = HostsConfig {
            hosts_dir: self.hosts_dir.is_dir().then(|| self.hosts_dir.clone()),
            plain_http: self.plain_http,
            plain_http_hosts: Vec::new(),
            ..Default::default()
        };
        Ok(Arc::new(Client::new(ClientOptions {
            hosts,
            ..Default::default()
        })?))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Manage zTOCs: list, info and get-file over the local store (upstream), plus build, and
    /// info/get-file of files.
    #[command(subcommand)]
    Ztoc(ztoc_cmd::ZtocCommand),
    /// Convert an image into a SOCI-enabled image (SOCI index manifest v2 bound by an image
    /// index). SRC and DST are images in containerd's store, as upstream; `docker://REF`
    /// selects a registry and `oci:DIR[:TAG]` an OCI layout instead.
    Convert(convert_cmd::ConvertArgs),
    /// Create a SOCI index manifest v1 for an image in containerd's store.
    Create(artifacts::CreateArgs),
    /// Push the SOCI index manifest v1 and zTOCs of an image to its registry.
    Push(push_cmd::PushArgs),
    /// Rebuild the artifacts database from the content store.
    #[command(name = "rebuild-db", alias = "rebuild_db")]
    RebuildDb,
    /// Manage SOCI indexes (local store; or, given an image reference, in a registry).
    #[command(subcommand)]
    Index(local_cmd::IndexCommand),
    /// Pull images through containerd with the soci snapshotter; show how they were pulled.
    #[command(subcommand)]
    Image(rpull::ImageCommand),
    /// Prefetch artifacts: `record` one from a real run of an image.
    #[command(subcommand)]
    Prefetch(PrefetchCommand),
}

#[derive(Subcommand)]
enum PrefetchCommand {
    /// Run a SOCI-enabled image once under the soci snapshotter (fresh lazy mounts in a
    /// scratch namespace), record the spans each layer's reads needed, and write them as the
    /// prefetch artifacts of a new SOCI index v2 for the image. Each recorded gzip layer gets a
    /// refined zTOC with small spans around the bytes the run read (`--keep-spans`: same
    /// zTOCs, whole spans). Prints the new image index digest.
    Record(Box<record_cmd::RecordArgs>),
    /// Not supported: upstream's `soci prefetch list|info`.
    #[command(external_subcommand)]
    Other(Vec<String>),
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // Upstream (urfave/cli) answers `--version`/`-v` before any subcommand; nerdctl parses it.
    if args.len() == 2 && (args[1] == "--version" || args[1] == "-v") {
        println!("{}", version::line());
        return;
    }
    let cli = Cli::parse();
    let default_level = if cli.global.debug { "debug" } else { "warn" };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SOCI_LOG")
                .unwrap_or_else(|_| default_level.into()),
        )
        .init();
    let g = cli.global.clone();
    let result: Result<()> = match cli.command {
        Command::Ztoc(c) => run_async(&g, ztoc_cmd::run(c, &g)),
        Command::Convert(a) => run_async(&g, convert_cmd::convert(a, &g)),
        Command::Create(a) => run_async(&g, artifacts::create(a, &g)),
        Command::Push(a) => run_async(&g, push_cmd::push(a, &g)),
        Command::RebuildDb => run_async(&g, artifacts::rebuild_db(&g)),
        Command::Index(c) => run_async(&g, local_cmd::index(c, &g)),
        Command::Image(c) => run_async(&g, rpull::run(c, &g.address, &g.namespace)),
        Command::Prefetch(PrefetchCommand::Record(a)) => run_async(&g, record_cmd::record(*a, &g)),
        Command::Prefetch(PrefetchCommand::Other(a)) => Err(anyhow::anyhow!(
            "`soci prefetch {}` (upstream's list/info) is not supported by soci-rs; prefetch artifacts \
             are written by `soci convert --prefetch-file` and `soci prefetch record`",
            a.first().map(String::as_str).unwrap_or("")
        )),
    };
    if let Err(e) = result {
        // A closed stdout (e.g. piped into `head`) is not a failure.
        let broken_pipe = e
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe);
        if broken_pipe {
            return;
        }
        eprintln!("soci: error: {e:#}");
        std::process::exit(1);
    }
}

/// Runs a command on a runtime, bounded by `--timeout` when given.
fn run_async(g: &Globals, fut: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    let rt = runtime()?;
    match g.timeout.filter(|t| !t.is_zero()) {
        Some(t) => rt.block_on(async {
            tokio::time::timeout(t, fut)
                .await
                .map_err(|_| anyhow::anyhow!("timed out after {t:?} (--timeout)"))?
        }),
        None => rt.block_on(fut),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
