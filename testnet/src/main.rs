//! `testnet`: N real `p2pml-node` processes on this machine, with a progress bar
//! and one machine-readable report.
//!
//!     testnet run --peers 4 --out out/testnet -- --limit-train 8000 --epochs 2
//!
//! Arguments after `--` go to every node unchanged (model, data, optimizer, ...).
//!
//!     testnet s3 --root out/s3 --addr-file out/s3.addr
//!
//! serves a local S3-compatible object store until SIGTERM/SIGINT.

mod report;
mod s3;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

#[derive(Parser, Debug)]
#[command(name = "testnet", version, about = "Runs p2pml peers as real processes on this machine")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start N peers on loopback, wait for the run to finish, write DIR/report.json.
    Run(RunArgs),
    /// Serve a local S3-compatible object store (a directory) on loopback until SIGTERM/SIGINT.
    /// Prints `s3 listening on http://ADDR`. Credentials: --access-key/--secret-key, else
    /// AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, else p2pml-local/p2pml-local-secret.
    S3(s3::S3Args),
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Number of peer processes.
    #[arg(long, default_value_t = 4)]
    peers: usize,
    /// Output directory: report.json, and nodes/<i>/ with each node's logs and state.
    #[arg(long, default_value = "out/testnet")]
    out: PathBuf,
    /// The p2pml-node binary [default: next to this testnet binary].
    #[arg(long)]
    node_bin: Option<PathBuf>,
    /// libtorch threads per node [default: cores / peers, at least 1].
    #[arg(long)]
    threads_per_node: Option<usize>,
    /// Give up (and kill the nodes) after this many seconds.
    #[arg(long, default_value_t = 1800)]
    timeout: u64,
    /// Extra arguments for one peer: "INDEX=ARGS" (split on spaces), repeatable,
    /// e.g. --peer-args "2=--fault-perturb-round 5".
    #[arg(long)]
    peer_args: Vec<String>,
    /// Start one peer late: "INDEX=SECONDS" after the first node, repeatable
    /// (it joins the run in progress by state sync).
    #[arg(long)]
    start_delay: Vec<String>,
    /// Arguments passed to every node (after `--`).
    #[arg(last = true)]
    node_args: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = match cli.command {
        Cmd::Run(a) => rt.block_on(run(a)),
        Cmd::S3(a) => rt.block_on(s3::run(a)).map(|()| true),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(3),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn node_bin(arg: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = arg {
        return Ok(p.clone());
    }
    let me = std::env::current_exe().context("cannot locate the testnet binary")?;
    let p = me.with_file_name("p2pml-node");
    if !p.exists() {
        bail!("{} not found: build it (cargo build --release) or pass --node-bin", p.display());
    }
    Ok(p)
}

/// What a node's stdout told us.
#[derive(Debug)]
enum NodeLine {
    Listening(usize, String),
    Round(usize, u64),
    Epoch(u64, f64),
    Exited(usize, Option<i32>),
}

struct NodeProc {
    child: Child,
}

async fn spawn_node(
    i: usize,
    bin: &Path,
    dir: &Path,
    args: &[String],
    tx: mpsc::Sender<NodeLine>,
) -> anyhow::Result<NodeProc> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let stderr = std::fs::File::create(dir.join("stderr.log"))?;
    let mut child = Command::new(bin)
        .args(args)
        .arg("--state-dir")
        .arg(dir)
        .arg("--report")
        .arg(dir.join("report.json"))
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let stdout = child.stdout.take().expect("piped");
    let mut log = tokio::fs::File::create(dir.join("stdout.log")).await?;
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = log.write_all(format!("{line}\n").as_bytes()).await;
            let mut w = line.split_whitespace();
            let msg = match (w.next(), w.next()) {
                (Some("listening"), Some(addr)) => Some(NodeLine::Listening(i, addr.to_string())),
                (Some("round"), Some(r)) => r.parse().ok().map(|r| NodeLine::Round(i, r)),
                (Some("epoch"), Some(e)) => {
                    let acc = line.split("test_acc ").nth(1).and_then(|s| s.trim_end_matches(|c: char| !c.is_ascii_digit()).split('%').next()).and_then(|s| s.parse().ok());
                    match (e.parse(), acc) {
                        (Ok(e), Some(acc)) => Some(NodeLine::Epoch(e, acc)),
                        _ => None,
                    }
                }
                _ => None,
            };
            if let Some(m) = msg {
                let _ = tx.send(m).await;
            }
        }
        let _ = log.flush().await;
    });
    Ok(NodeProc { child })
}

async fn run(a: RunArgs) -> anyhow::Result<bool> {
    if a.peers == 0 {
        bail!("--peers must be at least 1");
    }
    let bin = node_bin(&a.node_bin)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = a.threads_per_node.unwrap_or((cores / a.peers).max(1));
    if a.out.join("nodes").exists() {
        std::fs::remove_dir_all(a.out.join("nodes")).with_context(|| format!("cannot clear {}", a.out.display()))?;
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("cannot create {}", a.out.display()))?;
    let mut args: Vec<String> = vec![
        "--listen".into(),
        "/ip4/127.0.0.1/tcp/0".into(),
        "--peers".into(),
        a.peers.to_string(),
        "--threads".into(),
        threads.to_string(),
    ];
    args.extend(a.node_args.iter().cloned());

    let (tx, mut rx) = mpsc::channel(1024);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(a.timeout);
    let node_dir = |i: usize| a.out.join("nodes").join(format!("n{i}"));
    let mut extra: Vec<Vec<String>> = vec![Vec::new(); a.peers];
    for pa in &a.peer_args {
        let Some((i, rest)) = pa.split_once('=') else { bail!("--peer-args {pa}: expected INDEX=ARGS") };
        let i: usize = i.trim().parse().map_err(|_| anyhow::anyhow!("--peer-args {pa}: {i} is not a peer index"))?;
        if i >= a.peers {
            bail!("--peer-args {pa}: peer {i} does not exist (--peers {})", a.peers);
        }
        extra[i].extend(rest.split_whitespace().map(String::from));
    }
    let args_for = |i: usize| -> Vec<String> { args.iter().cloned().chain(extra[i].iter().cloned()).collect() };
    let procs = vec![spawn_node(0, &bin, &node_dir(0), &args_for(0), tx.clone()).await?];
    // The first node's address is everyone's bootstrap.
    let boot = loop {
        match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Ok(Some(NodeLine::Listening(0, addr))) => break addr,
            Ok(Some(_)) => continue,
            _ => {
                let log = std::fs::read_to_string(node_dir(0).join("stderr.log")).unwrap_or_default();
                bail!("the first node did not start listening: {}", log.lines().last().unwrap_or("(no output)"));
            }
        }
    };
    let mut delays = vec![0f64; a.peers];
    for d in &a.start_delay {
        let parsed = d.split_once('=').and_then(|(i, s)| Some((i.trim().parse::<usize>().ok()?, s.trim().parse::<f64>().ok()?)));
        match parsed {
            Some((i, secs)) if i > 0 && i < a.peers && secs >= 0.0 => delays[i] = secs,
            _ => bail!("--start-delay {d}: expected INDEX=SECONDS with 0 < INDEX < --peers"),
        }
    }
    let mut order: Vec<usize> = (1..a.peers).collect();
    order.sort_by(|x, y| delays[*x].total_cmp(&delays[*y]));
    let mut procs: Vec<Option<NodeProc>> = procs.into_iter().map(Some).chain((1..a.peers).map(|_| None)).collect();
    for i in order {
        let at = started + Duration::from_secs_f64(delays[i]);
        tokio::time::sleep_until(at.into()).await;
        let mut args_i = args_for(i);
        args_i.extend(["--bootstrap".into(), boot.clone()]);
        procs[i] = Some(spawn_node(i, &bin, &node_dir(i), &args_i, tx.clone()).await?);
    }
    let procs: Vec<NodeProc> = procs.into_iter().map(|p| p.expect("every peer started")).collect();
    eprintln!("testnet: {} peers, {threads} torch threads each, bootstrap {boot}", a.peers);

    // Watch exits.
    let mut waiters = Vec::new();
    for (i, p) in procs.into_iter().enumerate() {
        let tx = tx.clone();
        let mut child = p.child;
        waiters.push(tokio::spawn(async move {
            let status = tokio::select! {
                s = child.wait() => s.ok().and_then(|s| s.code()),
                _ = tokio::time::sleep_until(deadline.into()) => {
                    let _ = child.kill().await;
                    None
                }
            };
            let _ = tx.send(NodeLine::Exited(i, status)).await;
        }));
    }
    drop(tx);

    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}").expect("static template"));
    bar.enable_steady_tick(Duration::from_millis(200));
    let mut rounds = vec![0u64; a.peers];
    let mut exits: Vec<Option<Option<i32>>> = vec![None; a.peers];
    let mut last_acc = None;
    while let Some(m) = rx.recv().await {
        match m {
            NodeLine::Round(i, r) => rounds[i] = r + 1,
            NodeLine::Epoch(e, acc) => {
                if last_acc.is_none_or(|(le, _)| e > le) {
                    let line = format!("epoch {e}: test accuracy {acc:.2}%");
                    if bar.is_hidden() {
                        eprintln!("{line}");
                    } else {
                        bar.println(line);
                    }
                    last_acc = Some((e, acc));
                }
            }
            NodeLine::Exited(i, code) => exits[i] = Some(code),
            NodeLine::Listening(..) => {}
        }
        let min = rounds.iter().min().copied().unwrap_or(0);
        let max = rounds.iter().max().copied().unwrap_or(0);
        bar.set_message(format!(
            "rounds {min}..{max}, {} of {} peers running{}",
            exits.iter().filter(|e| e.is_none()).count(),
            a.peers,
            last_acc.map(|(e, acc)| format!(", epoch {e} test accuracy {acc:.2}%")).unwrap_or_default()
        ));
        if exits.iter().all(Option::is_some) {
            break;
        }
    }
    bar.finish_and_clear();
    for w in waiters {
        let _ = w.await;
    }
    let report = report::collect(&a.out, a.peers, &args, started.elapsed(), &exits)?;
    let path = a.out.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?).with_context(|| format!("cannot write {}", path.display()))?;
    report::print_summary(&report);
    eprintln!("report: {}", path.display());
    Ok(report.ok)
}
