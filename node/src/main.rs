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
    /// Write a new random swarm key for a private run (--swarm-key): give every
    /// peer a copy; peers without it cannot connect.
    SwarmKey {
        /// Where to write it (mode 0600; an existing file is kept unless --force).
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        force: bool,
    },
}

fn write_swarm_key(out: &std::path::Path, force: bool) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if out.is_dir() {
        anyhow::bail!("--out {} is a directory: give the path of the key file to write, e.g. {}", out.display(), out.join("swarm.key").display());
    }
    let key = p2pml_node::net::generate_swarm_key().map_err(|e| anyhow::anyhow!("cannot draw a random key: {e}"))?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).mode(0o600);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let mut f = opts.open(out).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => {
            anyhow::anyhow!("{} exists: it may be the key of a running swarm; pass --force to replace it", out.display())
        }
        _ => anyhow::anyhow!("cannot write {}: {e}", out.display()),
    })?;
    // The mode above applies to a new file only: a replaced one is made private too.
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| anyhow::anyhow!("cannot make {} private: {e}", out.display()))?;
    writeln!(f, "{key}").map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
    eprintln!("swarm key {} written to {}", key.fingerprint(), out.display());
    Ok(())
}

/// Help and version as clap prints them; a usage error as one line on stderr
/// (clap's message and its tip), like every other error of this binary.
fn clap_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand) {
        let _ = e.print();
        return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
    }
    let text = e.render().to_string();
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or("error: invalid arguments");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let mut msg = format!("error: {first}");
    for l in lines {
        if let Some(tip) = l.strip_prefix("tip: ") {
            msg.push_str("; ");
            msg.push_str(tip);
        }
    }
    eprintln!("{msg} (see --help)");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,libp2p=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_error(e),
    };
    let result = match cli.command {
        Some(Command::Train { train, out }) => {
            p2pml_node::standalone::run(&train.to_config(), out.as_deref(), std::io::stderr().is_terminal())
                .map(|_| ())
        }
        Some(Command::SwarmKey { out, force }) => write_swarm_key(&out, force),
        None => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| {
                let (train, p2p) = (cli.join.train.to_config(), cli.join.p2p.to_config());
                let r = rt.block_on(async move {
                    match p2p.role {
                        Role::P2p => p2pml_node::peer::run(train, p2p).await,
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
