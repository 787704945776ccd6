//! `soci`: build and inspect SOCI artifacts.

mod image_cmd;
mod rpull;
mod ztoc_cmd;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use soci_registry::{Client, ClientOptions, HostsConfig};

/// Build and inspect SOCI (Seekable OCI) artifacts.
#[derive(Parser)]
#[command(name = "soci", version, about)]
struct Cli {
    /// containerd socket address.
    #[arg(
        short = 'a',
        long,
        global = true,
        default_value = "/run/containerd/containerd.sock"
    )]
    address: String,
    /// containerd namespace.
    #[arg(short = 'n', long, global = true, default_value = "default")]
    namespace: String,
    #[command(subcommand)]
    command: Command,
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
    /// Build and inspect zTOCs.
    #[command(subcommand)]
    Ztoc(ztoc_cmd::ZtocCommand),
    /// Convert an image into a SOCI-enabled image (SOCI index v2 bound by an image index).
    Convert(image_cmd::ConvertArgs),
    /// Inspect SOCI indexes in a registry.
    #[command(subcommand)]
    Index(image_cmd::IndexCommand),
    /// Pull images through containerd with the soci snapshotter; show how they were pulled.
    #[command(subcommand)]
    Image(rpull::ImageCommand),
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SOCI_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let result: Result<()> = match cli.command {
        Command::Ztoc(c) => ztoc_cmd::run(c),
        Command::Convert(a) => runtime().and_then(|rt| rt.block_on(image_cmd::convert(a))),
        Command::Index(c) => runtime().and_then(|rt| rt.block_on(image_cmd::index(c))),
        Command::Image(c) => {
            runtime().and_then(|rt| rt.block_on(rpull::run(c, &cli.address, &cli.namespace)))
        }
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

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
