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

mod compare;
mod faults;
mod promcfg;
mod report;
mod s3;
mod tier;

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
    /// Run the same configuration and fault schedule in P2P mode and in
    /// parameter-server mode; write DIR/compare.md, compare.json and plots.
    Compare(CompareArgs),
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
    /// Also start this many rogue nodes (p2pml-node --fault-garbage) that never
    /// train and publish invalid messages; the report shows how peers scored them.
    #[arg(long, default_value_t = 0)]
    rogues: usize,
    /// The rogues also forge: they publish unsigned messages that claim to come
    /// from peer 0 (strict signing must refuse them).
    #[arg(long)]
    rogue_forge: bool,
    /// Make peer PEER byzantine: it trains, but sends MODE instead of its
    /// gradient: sign-flip:K (also sign-flipxK), gaussian:SIGMA, constant:C or nan.
    /// Repeatable. Pair it with `-- --aggregation median|trimmed-mean:B|krum:F`.
    #[arg(long, value_name = "PEER:MODE")]
    byzantine: Vec<String>,
    /// Give the nodes random peer ids instead of ids derived from their index
    /// (which make runs reproducible: shards, dropout masks and aggregation
    /// order follow the ids).
    #[arg(long)]
    random_ids: bool,
    /// Node i gets --identity-seed BASE+i.
    #[arg(long, default_value_t = 0)]
    identity_base: u64,
    /// With `-- --executor lambda`: concurrent function environments of the
    /// local function host [default: this machine's cores].
    #[arg(long)]
    fn_concurrency: Option<usize>,
    /// With `-- --executor lambda`: the function host's invocation timeout.
    #[arg(long, default_value_t = 60.0)]
    fn_timeout_s: f64,
    /// With `-- --executor lambda`: function memory (MB) for GB-second billing.
    #[arg(long, default_value_t = 1769)]
    fn_memory_mb: u64,
    /// SIGKILL peer PEER at T: seconds after all peers started (12.5) or when the
    /// furthest peer reaches a round (r5). PEER is an index, or `ps` for the
    /// parameter server (--role ps). Repeatable.
    #[arg(long, value_name = "PEER@T")]
    kill: Vec<String>,
    /// Restart peer PEER at T (same state directory: key and checkpoints); T may
    /// also be +SECONDS after its kill (2@+10). Repeatable.
    #[arg(long, value_name = "PEER@T")]
    revive: Vec<String>,
    /// Kill this many random peers (seeded by --fault-seed), one every --interval
    /// seconds, each revived --down seconds later.
    #[arg(long, default_value_t = 0)]
    random_kills: usize,
    #[arg(long, default_value_t = 20.0)]
    interval: f64,
    /// Seconds a randomly killed peer stays down [default: --interval / 2].
    #[arg(long)]
    down: Option<f64>,
    #[arg(long, default_value_t = 1)]
    fault_seed: u64,
    /// Partition the peers into sides that cannot reach each other, from T for
    /// SECONDS: "0,1|2,3@r5+30". Repeatable.
    #[arg(long, value_name = "A,B|C,D@T+SECONDS")]
    partition: Vec<String>,
    /// p2p: --peers peers of a decentralized run; ps: a parameter server (named
    /// `ps` in the fault schedule) and --peers workers.
    #[arg(long, default_value = "p2p", value_parser = ["p2p", "ps"])]
    role: String,
    /// Start a local Prometheus (the `prometheus` binary, Debian package
    /// `prometheus`) that scrapes every node's /metrics each second; its URL goes
    /// to OUT/prometheus.url. OUT/prometheus.yml is written either way.
    #[arg(long)]
    prometheus: bool,
    /// The Prometheus binary for --prometheus.
    #[arg(long, default_value = "prometheus")]
    prometheus_bin: PathBuf,
    /// Keep Prometheus (and its data) up this many seconds after the run, to look around.
    #[arg(long, default_value_t = 0.0)]
    prometheus_linger: f64,
    /// Draw random kills among this many slots (`testnet compare` pairs the two
    /// modes this way: slot --peers is the server, and peer 0 in P2P mode).
    #[arg(long, hide = true)]
    random_kill_slots: Option<usize>,
    /// Arguments passed to every node (after `--`).
    #[arg(last = true)]
    node_args: Vec<String>,
}

#[derive(Args, Debug, Clone)]
struct CompareArgs {
    /// Test accuracy for the "time to target accuracy" column.
    #[arg(long, default_value_t = 0.7)]
    target_accuracy: f64,
    /// Run nothing: rebuild the table and plots from OUT/p2p/report.json and
    /// OUT/ps/report.json of an earlier comparison.
    #[arg(long)]
    from_reports: bool,
    #[command(flatten)]
    run: RunArgs,
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
        Cmd::Compare(a) => rt.block_on(compare_modes(a)),
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
    /// A worker pushed a gradient (parameter-server mode).
    Computed(usize),
    /// Where the node serves its metrics.
    Metrics(usize, String),
    Listening(usize, String),
    PeerId(usize, String),
    Round(usize, u64, String),
    Epoch(u64, f64),
    Died(usize, String),
    Ready(usize),
    /// Node, generation (its start count), exit code.
    Exited(usize, u32, Option<i32>),
}

struct NodeProc {
    child: Child,
}

/// What the supervisor of a node process can be told.
enum Ctl {
    Kill,
    /// A line for the node's stdin (its control commands).
    Line(String),
    /// The run is over: let it finish, then stop it.
    Stop,
}

/// Owns a node process: waits for its exit, kills it when told or at the deadline.
fn supervise(i: usize, generation: u32, p: NodeProc, deadline: Instant, tx: mpsc::Sender<NodeLine>) -> mpsc::Sender<Ctl> {
    let (ctl_tx, mut ctl) = mpsc::channel::<Ctl>(16);
    let mut child = p.child;
    let mut stdin = child.stdin.take();
    tokio::spawn(async move {
        let status = loop {
            tokio::select! {
                s = child.wait() => break s.ok().and_then(|s| s.code()),
                _ = tokio::time::sleep_until(deadline.into()) => {
                    let _ = child.kill().await;
                    break None;
                }
                c = ctl.recv() => match c {
                    Some(Ctl::Kill) => {
                        let _ = child.kill().await; // SIGKILL
                        break None;
                    }
                    Some(Ctl::Line(l)) => {
                        if let Some(w) = stdin.as_mut() {
                            let _ = w.write_all(format!("{l}\n").as_bytes()).await;
                            let _ = w.flush().await;
                        }
                    }
                    Some(Ctl::Stop) | None => {
                        // Give it a moment to notice the end of the run and write its report.
                        match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
                            Ok(s) => break s.ok().and_then(|s| s.code()),
                            Err(_) => {
                                let _ = child.kill().await;
                                break None;
                            }
                        }
                    }
                },
            }
        };
        let _ = tx.send(NodeLine::Exited(i, generation, status)).await;
    });
    ctl_tx
}

async fn spawn_node(
    i: usize,
    bin: &Path,
    dir: &Path,
    args: &[String],
    env: &[(String, String)],
    tx: mpsc::Sender<NodeLine>,
) -> anyhow::Result<NodeProc> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // Appended: a revived node keeps its earlier lives' logs.
    let stderr = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("stderr.log"))?;
    let control = args.iter().any(|a| a == "--control-stdin");
    let mut child = Command::new(bin)
        .args(args)
        .arg("--state-dir")
        .arg(dir)
        .arg("--report")
        .arg(dir.join("report.json"))
        .stdin(if control { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let stdout = child.stdout.take().expect("piped");
    let mut log = tokio::fs::OpenOptions::new().create(true).append(true).open(dir.join("stdout.log")).await?;
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = log.write_all(format!("{line}\n").as_bytes()).await;
            let mut w = line.split_whitespace();
            let msg = match (w.next(), w.next()) {
                (Some("listening"), Some(addr)) => Some(NodeLine::Listening(i, addr.to_string())),
                (Some("peer"), Some(id)) => Some(NodeLine::PeerId(i, id.to_string())),
                (Some("ready"), _) => Some(NodeLine::Ready(i)),
                (Some("computed"), Some("round")) => Some(NodeLine::Computed(i)),
                (Some("metrics"), Some("listening")) => {
                    line.split_whitespace().nth(3).map(|u| NodeLine::Metrics(i, u.to_string()))
                }
                (Some("member"), Some("died")) => w.next().map(|p| NodeLine::Died(i, p.to_string())),
                (Some("round"), Some(r)) => {
                    let digest = line.split(" digest ").nth(1).unwrap_or_default().trim().to_string();
                    r.parse().ok().map(|r| NodeLine::Round(i, r, digest))
                }
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
    let report = run_report(a).await?;
    Ok(report.ok)
}

/// `testnet compare`: P2P first, then the parameter server, same schedule.
async fn compare_modes(c: CompareArgs) -> anyhow::Result<bool> {
    if !(c.target_accuracy > 0.0 && c.target_accuracy <= 1.0) {
        bail!("--target-accuracy must be a fraction in (0, 1], e.g. 0.7");
    }
    let out = c.run.out.clone();
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    // `ps` names the server; the P2P run loses peer 0 in its place.
    let side = |s: &str| s.split(',').map(|p| if p.trim() == "ps" { "0" } else { p }).collect::<Vec<_>>().join(",");
    let mut p2p = c.run.clone();
    p2p.role = "p2p".into();
    p2p.out = out.join("p2p");
    // Random kills draw among peers + 1 slots in both runs (the last is the server,
    // peer 0 in P2P mode): the same times, the same victims.
    p2p.random_kill_slots = Some(c.run.peers + 1);
    p2p.kill = c.run.kill.iter().map(|k| k.replace("ps@", "0@")).collect();
    p2p.revive = c.run.revive.iter().map(|k| k.replace("ps@", "0@")).collect();
    p2p.partition = c
        .run
        .partition
        .iter()
        .map(|p| match p.split_once('@') {
            Some((sides, when)) => format!("{}@{when}", sides.split('|').map(side).collect::<Vec<_>>().join("|")),
            None => p.clone(),
        })
        .collect();
    let mut ps = c.run.clone();
    ps.role = "ps".into();
    ps.out = out.join("ps");
    let load = |dir: &Path| -> anyhow::Result<report::Report> {
        let path = dir.join("report.json");
        let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}: run the comparison first", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("{} is not a testnet report", path.display()))
    };
    let (r1, r2) = if c.from_reports {
        (load(&p2p.out)?, load(&ps.out)?)
    } else {
        eprintln!("== P2P: {} peers", c.run.peers);
        let r1 = run_report(p2p).await?;
        eprintln!("== parameter server: 1 server, {} workers", c.run.peers);
        (r1, run_report(ps).await?)
    };
    let cmp = compare::compare(c.run.peers, c.target_accuracy, &c.run.node_args, &r1, &r2);
    // The command that ran the experiment (a rebuild from its reports names it too).
    let command = std::env::args().filter(|a| a != "--from-reports").collect::<Vec<_>>().join(" ");
    compare::write(&out, &cmp, &command, &r1, &r2)?;
    println!("{}", compare::markdown(&cmp, &command));
    eprintln!("comparison: {}", out.join("compare.md").display());
    Ok(r1.ok && r2.ok)
}

/// Resolves on SIGINT or SIGTERM.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// A free TCP port on loopback (for the parameter server, which keeps its
/// address across restarts so that workers find it again).
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(l.local_addr()?.port())
}

/// Runs the testnet and returns its report (also written to OUT/report.json).
async fn run_report(a: RunArgs) -> anyhow::Result<report::Report> {
    if a.peers == 0 {
        bail!("--peers must be at least 1");
    }
    let ps = a.role == "ps";
    if a.rogue_forge && a.rogues == 0 {
        bail!("--rogue-forge needs --rogues N");
    }
    if ps && a.rogues > 0 {
        bail!("--rogues is for --role p2p (rogues attack the gossip layer)");
    }
    let nodes = faults::Nodes { peers: a.peers, server: ps };
    let n_nodes = nodes.count();
    // In PS mode the server is the last node.
    let server = ps.then_some(a.peers);
    let bin = node_bin(&a.node_bin)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The same threads per peer and per worker (the server computes no gradients).
    let threads = a.threads_per_node.unwrap_or((cores / a.peers).max(1));
    if a.out.join("nodes").exists() {
        std::fs::remove_dir_all(a.out.join("nodes")).with_context(|| format!("cannot clear {}", a.out.display()))?;
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("cannot create {}", a.out.display()))?;
    let mut args: Vec<String> = vec![
        "--peers".into(),
        a.peers.to_string(),
        "--threads".into(),
        threads.to_string(),
    ];
    args.extend(a.node_args.iter().cloned());
    // The fault schedule.
    let mut schedule: Vec<(faults::Scheduled, String)> = Vec::new();
    let bad = |e: String| anyhow::anyhow!(e);
    for k in &a.kill {
        let (peer, at) = faults::parse_peer_at(k, nodes, "--kill").map_err(bad)?;
        if matches!(at, faults::At::AfterKill(_)) {
            bail!("--kill {k}: +SECONDS (after the kill) is for --revive; give seconds (12.5) or a round (r5)");
        }
        schedule.push((faults::Scheduled { at, action: faults::Action::Kill { peer } }, format!("kill {k}")));
    }
    for k in &a.revive {
        let (peer, at) = faults::parse_peer_at(k, nodes, "--revive").map_err(bad)?;
        schedule.push((faults::Scheduled { at, action: faults::Action::Revive { peer } }, format!("revive {k}")));
    }
    if a.random_kills > 0 {
        if a.interval.is_nan() || a.interval <= 0.0 {
            bail!("--interval must be more than 0 seconds");
        }
        let down = a.down.unwrap_or(a.interval / 2.0);
        let slots = a.random_kill_slots.unwrap_or(n_nodes);
        for mut ev in faults::random_kills(a.random_kills, a.interval, down, slots, a.fault_seed) {
            // A slot past the nodes that exist stands for the server: peer 0 in P2P mode.
            if let faults::Action::Kill { peer } | faults::Action::Revive { peer } = &mut ev.action {
                if *peer >= n_nodes {
                    *peer = 0;
                }
            }
            let spec = match &ev.action {
                faults::Action::Kill { peer } => format!("random kill {peer}@{}", ev.at),
                faults::Action::Revive { peer } => format!("random revive {peer}@{}", ev.at),
                _ => String::new(),
            };
            schedule.push((ev, spec));
        }
    }
    for p in &a.partition {
        for ev in faults::parse_partition(p, nodes).map_err(bad)? {
            schedule.push((ev, format!("partition {p}")));
        }
    }
    if !a.partition.is_empty() {
        args.push("--control-stdin".into());
    }
    // Nodes that offload to the function tier get a local object store and function host.
    let lambda = a.node_args.windows(2).any(|w| w[0] == "--executor" && w[1] == "lambda")
        || a.node_args.iter().any(|x| x == "--executor=lambda");
    let tier = if lambda {
        let settings = tier::TierSettings {
            concurrency: a.fn_concurrency.unwrap_or(cores),
            timeout_s: a.fn_timeout_s,
            memory_mb: a.fn_memory_mb,
        };
        let t = tier::FunctionTier::start(&a.out, &tier::lambda_bin()?, &settings).await?;
        eprintln!("testnet: object store {}, function host {} ({} environments)", t.s3_endpoint, t.lambda_endpoint, settings.concurrency);
        args.extend(t.node_args());
        Some(t)
    } else {
        None
    };
    let env = tier.as_ref().map(|t| t.env()).unwrap_or_default();

    // Prometheus: a configuration naming the nodes' endpoints (a file that
    // follows them as they start and restart), and optionally the server itself.
    let prom = promcfg::PromFiles::write(&a.out).context("cannot write the Prometheus configuration")?;
    let _prometheus = match a.prometheus {
        true => Some(promcfg::start(&a.prometheus_bin, &a.out, &prom).await?),
        false => None,
    };
    let (tx, mut rx) = mpsc::channel(1024);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(a.timeout);
    let node_dir = |i: usize| a.out.join("nodes").join(if Some(i) == server { "ps".to_string() } else { format!("n{i}") });
    let mut extra: Vec<Vec<String>> = vec![Vec::new(); n_nodes];
    for pa in &a.peer_args {
        let Some((i, rest)) = pa.split_once('=') else { bail!("--peer-args {pa}: expected INDEX=ARGS") };
        let i: usize = i.trim().parse().map_err(|_| anyhow::anyhow!("--peer-args {pa}: {i} is not a peer index"))?;
        if i >= a.peers {
            bail!("--peer-args {pa}: peer {i} does not exist (--peers {})", a.peers);
        }
        // (the server takes no --peer-args)
        extra[i].extend(rest.split_whitespace().map(String::from));
    }
    let mut byzantine = std::collections::BTreeSet::new();
    for b in &a.byzantine {
        let (i, mode) = parse_byzantine(b, a.peers)?;
        if !byzantine.insert(i) {
            bail!("--byzantine {b}: peer {i} is named twice; give each byzantine peer one mode");
        }
        extra[i].extend(["--byzantine".to_string(), mode]);
    }
    // Peer ids derived from the node index make a run reproducible: shards,
    // dropout masks and the aggregation order follow the ids.
    let user_ids = a.node_args.iter().any(|x| x.starts_with("--identity-seed"));
    let identity = |i: usize| -> Vec<String> {
        if user_ids || a.random_ids {
            Vec::new()
        } else {
            vec!["--identity-seed".into(), (a.identity_base + i as u64).to_string()]
        }
    };
    // The server listens on a fixed port: a revived server keeps its address.
    let server_listen = match ps {
        true => format!("/ip4/127.0.0.1/tcp/{}", free_port()?),
        false => String::new(),
    };
    // Every node's own arguments (without the bootstrap, which a revival picks anew).
    let args_for = |i: usize| -> Vec<String> {
        let role: Vec<String> = match (ps, Some(i) == server) {
            (false, _) => vec!["--listen".into(), "/ip4/127.0.0.1/tcp/0".into()],
            (true, true) => vec!["--role".into(), "ps".into(), "--listen".into(), server_listen.clone()],
            (true, false) => vec!["--role".into(), "worker".into(), "--listen".into(), "/ip4/127.0.0.1/tcp/0".into()],
        };
        args.iter().cloned().chain(role).chain(extra[i].iter().cloned()).chain(identity(i)).collect()
    };
    // The first node (peer 0, or the server) gives everyone's bootstrap address.
    let first = server.unwrap_or(0);
    let first_proc = spawn_node(first, &bin, &node_dir(first), &args_for(first), &env, tx.clone()).await?;
    let boot = loop {
        match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Ok(Some(NodeLine::Listening(i, addr))) if i == first => break addr,
            Ok(Some(_)) => continue,
            _ => {
                let log = std::fs::read_to_string(node_dir(first).join("stderr.log")).unwrap_or_default();
                bail!("the first node did not start listening: {}", log.lines().last().unwrap_or("(no output)"));
            }
        }
    };
    // How a node (other than the first) finds the run.
    let join_args = |boot: &str| -> Vec<String> {
        if ps {
            vec!["--ps".into(), boot.to_string()]
        } else {
            vec!["--bootstrap".into(), boot.to_string()]
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
    let mut order: Vec<usize> = (0..a.peers).filter(|i| *i != first).collect();
    order.sort_by(|x, y| delays[*x].total_cmp(&delays[*y]));
    let mut procs: Vec<Option<NodeProc>> = (0..n_nodes).map(|_| None).collect();
    procs[first] = Some(first_proc);
    for i in order {
        let at = started + Duration::from_secs_f64(delays[i]);
        tokio::time::sleep_until(at.into()).await;
        let mut args_i = args_for(i);
        args_i.extend(join_args(&boot));
        procs[i] = Some(spawn_node(i, &bin, &node_dir(i), &args_i, &env, tx.clone()).await?);
    }
    let procs: Vec<NodeProc> = procs.into_iter().map(|p| p.expect("every peer started")).collect();
    let mut ctls: Vec<Option<mpsc::Sender<Ctl>>> = Vec::new();
    for (i, p) in procs.into_iter().enumerate() {
        ctls.push(Some(supervise(i, 0, p, deadline, tx.clone())));
    }
    for i in n_nodes..n_nodes + a.rogues {
        let mut args_i = args.clone();
        args_i.extend(identity(i));
        args_i.extend(["--fault-garbage".into(), "--bootstrap".into(), boot.clone()]);
        if a.rogue_forge {
            args_i.push("--fault-forge".into());
        }
        let p = spawn_node(i, &bin, &node_dir(i), &args_i, &env, tx.clone()).await?;
        ctls.push(Some(supervise(i, 0, p, deadline, tx.clone())));
    }
    eprintln!(
        "testnet: {} peers{}{}, {threads} torch threads each, bootstrap {boot}{}",
        a.peers,
        if a.rogues > 0 { format!(" and {} rogue(s)", a.rogues) } else { String::new() },
        if a.byzantine.is_empty() { String::new() } else { format!(" (byzantine: {})", a.byzantine.join(", ")) },
        if schedule.is_empty() { String::new() } else { format!(", {} fault events", schedule.len()) }
    );

    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}").expect("static template"));
    bar.enable_steady_tick(Duration::from_millis(200));
    let say = |bar: &ProgressBar, line: String| {
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    };
    let t0 = Instant::now();
    let n = n_nodes + a.rogues;
    let mut rounds = vec![0u64; n_nodes];
    let mut exits: Vec<Option<Option<i32>>> = vec![None; n];
    let mut generation = vec![0u32; n];
    let mut running = vec![true; n];
    let mut killed = vec![false; n_nodes];
    let mut killed_at: Vec<Option<f64>> = vec![None; n_nodes];
    let mut addrs: Vec<Option<String>> = vec![None; n];
    addrs[first] = Some(boot.clone());
    let mut ids: Vec<String> = vec![String::new(); n_nodes];
    let mut progress: Vec<(f64, u64)> = Vec::new();
    let mut metric_urls: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
    let mut accuracy_timeline: Vec<(f64, u64, f64)> = Vec::new();
    let mut obs: Vec<faults::Obs> = Vec::new();
    let mut fired: Vec<(f64, String, faults::Action)> = Vec::new();
    let mut last_acc = None;
    let mut timed_out = false;
    loop {
        // Fire the events that are due.
        let now = t0.elapsed().as_secs_f64();
        let furthest = rounds.iter().copied().max().unwrap_or(0);
        let mut due = Vec::new();
        schedule.retain(|(ev, spec)| {
            let is_due = match ev.at {
                faults::At::Secs(t) => now >= t,
                faults::At::Round(r) => furthest > r,
                faults::At::AfterKill(d) => match &ev.action {
                    faults::Action::Revive { peer } => killed_at[*peer].is_some_and(|k| now >= k + d),
                    _ => false,
                },
            };
            if is_due {
                due.push((ev.clone(), spec.clone()));
            }
            !is_due
        });
        for (ev, spec) in due {
            match &ev.action {
                faults::Action::Kill { peer } => {
                    let p = *peer;
                    let Some(ctl) = ctls[p].as_ref().filter(|_| running[p]) else {
                        say(&bar, format!("fault: {spec}: peer {p} is not running; skipped"));
                        continue;
                    };
                    let _ = ctl.send(Ctl::Kill).await;
                    killed[p] = true;
                    killed_at[p] = Some(now);
                    running[p] = false;
                    addrs[p] = None; // its next life listens elsewhere
                    say(&bar, format!("fault: {spec} at {now:.1} s (round {furthest})"));
                }
                faults::Action::Revive { peer } => {
                    let p = *peer;
                    if running[p] || !killed[p] {
                        say(&bar, format!("fault: {spec}: peer {p} is running; skipped"));
                        continue;
                    }
                    let mut args_p = args_for(p);
                    let others: Vec<usize> = (0..a.peers).filter(|j| *j != p && running[*j]).collect();
                    let known: Vec<String> = others.iter().filter_map(|j| addrs[*j].clone()).collect();
                    match known.is_empty() {
                        // PS mode: the server keeps its address; a worker needs nothing else.
                        _ if ps => {
                            if Some(p) != server {
                                args_p.extend(join_args(&boot));
                            }
                        }
                        // Every running peer's address: one of them may die before the
                        // revived node is up, and one link to each side keeps the swarm whole.
                        false => {
                            for b in known {
                                args_p.extend(["--bootstrap".into(), b]);
                            }
                        }
                        // Peers are starting but none listens yet (revived together): a moment later.
                        true if !others.is_empty() => {
                            schedule.push((faults::Scheduled { at: faults::At::Secs(now + 0.2), action: ev.action.clone() }, spec));
                            continue;
                        }
                        true => {}
                    }
                    generation[p] += 1;
                    let proc_p = spawn_node(p, &bin, &node_dir(p), &args_p, &env, tx.clone()).await?;
                    ctls[p] = Some(supervise(p, generation[p], proc_p, deadline, tx.clone()));
                    running[p] = true;
                    killed[p] = false;
                    exits[p] = None;
                    say(&bar, format!("fault: {spec} at {now:.1} s (round {furthest})"));
                }
                faults::Action::Partition { sides, secs } => {
                    for (k, side) in sides.iter().enumerate() {
                        let others: Vec<&str> =
                            sides.iter().enumerate().filter(|(j, _)| *j != k).flat_map(|(_, s)| s.iter().map(|p| ids[*p].as_str())).collect();
                        for p in side {
                            if let Some(ctl) = &ctls[*p] {
                                let _ = ctl.send(Ctl::Line(format!("block {}", others.join(" ")))).await;
                            }
                        }
                    }
                    schedule.push((faults::Scheduled { at: faults::At::Secs(now + secs), action: faults::Action::Heal }, format!("heal ({spec})")));
                    say(&bar, format!("fault: {spec} at {now:.1} s (round {furthest})"));
                }
                faults::Action::Heal => {
                    for c in ctls.iter().flatten() {
                        let _ = c.send(Ctl::Line("unblock".into())).await;
                    }
                    say(&bar, format!("fault: {spec} at {now:.1} s"));
                }
            }
            fired.push((now, spec, ev.action.clone()));
        }
        // Done when no peer runs and nothing is left to revive (or the run is over).
        let any_running = (0..n_nodes).any(|i| running[i]);
        let run_over = match server {
            Some(s) => exits[s] == Some(Some(0)),
            None => (0..a.peers).any(|i| exits[i] == Some(Some(0))),
        };
        let revive_pending = schedule.iter().any(|(ev, _)| matches!(ev.action, faults::Action::Revive { .. }));
        // In PS mode the run ends with the server: workers still retrying (revived
        // late) are stopped below.
        if (ps && run_over) || (!any_running && (run_over || !revive_pending)) {
            break;
        }
        if Instant::now() > deadline {
            timed_out = true;
            break;
        }
        let m = tokio::select! {
            m = rx.recv() => m,
            _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
            // SIGINT or SIGTERM: stop the nodes (as at --timeout) and report.
            _ = stop_signal() => {
                eprintln!("testnet: interrupted; stopping the nodes");
                timed_out = true;
                break;
            }
        };
        let Some(m) = m else { break };
        let t = t0.elapsed().as_secs_f64();
        match m {
            NodeLine::Round(i, r, digest) => {
                if i < n_nodes {
                    if r + 1 > rounds.iter().copied().max().unwrap_or(0) {
                        progress.push((t, r + 1));
                    }
                    rounds[i] = r + 1;
                    obs.push(faults::Obs::Round { t, node: i, round: r, digest });
                }
            }
            NodeLine::Computed(i) => obs.push(faults::Obs::Computed { t, node: i }),
            NodeLine::Metrics(i, url) => {
                let name = if Some(i) == server { "ps".to_string() } else { format!("n{i}") };
                metric_urls.insert(name, url);
                if let Err(e) = prom.set_targets(&metric_urls) {
                    say(&bar, format!("testnet: cannot update the Prometheus targets: {e}"));
                }
            }
            NodeLine::Epoch(e, acc) => {
                if last_acc.is_none_or(|(le, _)| e > le) {
                    accuracy_timeline.push((t, e, acc / 100.0));
                    say(&bar, format!("epoch {e}: test accuracy {acc:.2}%"));
                    last_acc = Some((e, acc));
                }
            }
            NodeLine::Exited(i, g, code) => {
                if g == generation[i] {
                    exits[i] = Some(code);
                    running[i] = false;
                }
            }
            NodeLine::Listening(i, addr) => {
                if addr.starts_with("/ip4/127.0.0.1") || addrs[i].is_none() {
                    addrs[i] = Some(addr);
                }
            }
            NodeLine::PeerId(i, id) => {
                if i < n_nodes {
                    ids[i] = id;
                }
            }
            NodeLine::Died(i, peer) => obs.push(faults::Obs::Died { t, node: i, peer }),
            NodeLine::Ready(i) => obs.push(faults::Obs::Ready { t, node: i }),
        }
        let shown = if ps { &rounds[a.peers..] } else { &rounds[..] };
        let min = shown.iter().min().copied().unwrap_or(0);
        let max = shown.iter().max().copied().unwrap_or(0);
        bar.set_message(format!(
            "rounds {min}..{max}, {} of {} {} running{}",
            running[..n_nodes].iter().filter(|r| **r).count(),
            n_nodes,
            if ps { "nodes" } else { "peers" },
            last_acc.map(|(e, acc)| format!(", epoch {e} test accuracy {acc:.2}%")).unwrap_or_default()
        ));
    }
    bar.finish_and_clear();
    if timed_out {
        eprintln!("testnet: --timeout {} s passed; stopping the nodes", a.timeout);
    }
    // Rogues (and anything left) stop now; wait for their exits, bounded.
    for (i, c) in ctls.iter().enumerate() {
        if let (Some(c), true) = (c, running[i]) {
            let _ = c.send(if timed_out { Ctl::Kill } else { Ctl::Stop }).await;
        }
    }
    let stop_deadline = Instant::now() + Duration::from_secs(15);
    while running.iter().any(|r| *r) && Instant::now() < stop_deadline {
        match tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            Ok(Some(NodeLine::Exited(i, g, code))) if g == generation[i] => {
                exits[i] = Some(code);
                running[i] = false;
            }
            Ok(None) => break,
            _ => {}
        }
    }
    drop(tx);
    let down_at_end: Vec<bool> = killed.clone();
    let fault_reports = faults::effects(&fired, &obs, &ids, server);
    let host_stats = match tier {
        Some(t) => {
            let s = t.stats().await;
            t.stop().await;
            Some(s.unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() })))
        }
        None => None,
    };
    let mut report = report::collect(&a.out, n_nodes, a.rogues, &args, started.elapsed(), &exits, &down_at_end, host_stats, server)?;
    report.faults = fault_reports;
    report.role = a.role.clone();
    report.stalled_seconds = report::stalled_seconds(&progress);
    report.progress = progress;
    report.accuracy_timeline = accuracy_timeline;
    let path = a.out.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?).with_context(|| format!("cannot write {}", path.display()))?;
    report::print_summary(&report);
    eprintln!("report: {}", path.display());
    if let (Some(p), true) = (&_prometheus, a.prometheus_linger > 0.0) {
        eprintln!("testnet: Prometheus stays up at {} for {} s", p.url, a.prometheus_linger);
        tokio::time::sleep(Duration::from_secs_f64(a.prometheus_linger)).await;
    }
    Ok(report)
}

/// `PEER:MODE` of --byzantine: a peer index and the attack, in its canonical spelling.
fn parse_byzantine(b: &str, peers: usize) -> anyhow::Result<(usize, String)> {
    let Some((i, mode)) = b.split_once(':') else {
        bail!("--byzantine {b}: expected PEER:MODE, e.g. 3:sign-flip:10")
    };
    let i: usize = i.trim().parse().map_err(|_| anyhow::anyhow!("--byzantine {b}: {i} is not a peer index"))?;
    if i >= peers {
        bail!("--byzantine {b}: peer {i} does not exist (--peers {peers})");
    }
    let attack: p2pml_proto::Attack = mode.parse().map_err(|e| anyhow::anyhow!("--byzantine {b}: {e}"))?;
    Ok((i, attack.to_string()))
}
