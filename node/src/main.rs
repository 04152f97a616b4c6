//! The `p2pml-node` binary.

use clap::{Parser, Subcommand};
use p2pml_node::config::TrainArgs;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

/// A peer of a decentralized deep-learning run.
#[derive(Parser, Debug)]
#[command(name = "p2pml-node", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train on this machine alone, with no network (the single-peer reference).
    Train {
        #[command(flatten)]
        train: TrainArgs,
        /// Write the final model (model.safetensors) and report.json here.
        #[arg(long, env = "P2PML_OUT")]
        out: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train { train, out } => {
            p2pml_node::standalone::run(&train.to_config(), out.as_deref(), std::io::stderr().is_terminal())
                .map(|_| ())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
