//! `soci`: build and inspect SOCI artifacts.

mod ztoc_cmd;

use anyhow::Result;
use clap::{Parser, Subcommand};

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

#[derive(Subcommand)]
enum Command {
    /// Build and inspect zTOCs.
    #[command(subcommand)]
    Ztoc(ztoc_cmd::ZtocCommand),
}

fn main() {
    let cli = Cli::parse();
    let _ = (&cli.address, &cli.namespace);
    let result: Result<()> = match cli.command {
        Command::Ztoc(c) => ztoc_cmd::run(c),
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
