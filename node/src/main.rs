//! The `p2pml-node` binary.

use clap::{Args, Parser, Subcommand};
use p2pml_node::config::{P2pArgs, Role, TrainArgs};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

/// A peer of a decentralized deep-learning run. Without a subcommand it joins
/// (or starts) a run: `p2pml-node --bootstrap /ip4/.../tcp/.../p2p/<id>`.
/// The parameter-server baseline: `p2pml-node --role ps`, and workers
/// `p2pml-node --role worker --ps /ip4/.../tcp/.../p2p/<server id>`.
#[derive(Parser, Debug)]
#[command(name = "p2pml-node", version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    join: JoinArgs,
}

#[derive(Args, Debug)]
struct JoinArgs {
    #[command(flatten)]
    train: TrainArgs,
    #[command(flatten)]
    p2p: P2pArgs,
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
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,libp2p=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Train { train, out }) => {
            p2pml_node::standalone::run(&train.to_config(), out.as_deref(), std::io::stderr().is_terminal())
                .map(|_| ())
        }
        None => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| {
                let (train, p2p) = (cli.join.train.to_config(), cli.join.p2p.to_config());
                let r = rt.block_on(async move {
                    match p2p.role {
                        Role::P2p => p2pml_node::p2p::run(train, p2p).await,
                        Role::Ps => p2pml_node::ps::run_server(train, p2p).await,
                        Role::Worker => p2pml_node::ps::run_worker(train, p2p).await,
                    }
                });
                // Do not wait for blocking reads that never end (the control stdin).
                rt.shutdown_timeout(std::time::Duration::from_secs(2));
                r
            })
            .map(|_| ()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
