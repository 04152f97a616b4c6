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
mod units;

use p2pml_proto::line::{Line, MemberEvent};
use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::VecDeque;
use std::os::unix::process::ExitStatusExt;
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
    /// It must be empty or absent (an earlier run's output is kept) unless --force.
    #[arg(long, default_value = "out/testnet")]
    out: PathBuf,
    /// Replace what is in a non-empty --out (an earlier run's logs, keys,
    /// checkpoints and reports: everything in it is deleted first).
    #[arg(long)]
    force: bool,
    /// The p2pml-node binary [default: next to this testnet binary].
    #[arg(long)]
    node_bin: Option<PathBuf>,
    /// libtorch threads per node [default: cores / peers, at least 1].
    #[arg(long)]
    threads_per_node: Option<usize>,
    /// Give up (and stop the nodes) after this many seconds (1 to 2592000, 30 days).
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
    /// The rogues instead publish validly signed heartbeats (ready: true) but never
    /// send or answer a Hello (p2pml-node --fault-heartbeat-only): the peers must
    /// never admit them; the report names them.
    #[arg(long)]
    rogue_heartbeat: bool,
    /// Make peer PEER byzantine: it trains, but sends MODE instead of its
    /// gradient: sign-flip:K (also sign-flipxK), gaussian:SIGMA, constant:C, nan,
    /// or withhold (it stays alive and heartbeats but never sends its gradient:
    /// the straggler deadline closes its rounds and it is demoted).
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
    /// With `-- --executor lambda`: the object store stops at T, loses every
    /// object, and serves again (empty) SECONDS later: "r3+4". Repeatable.
    #[arg(long, value_name = "T+SECONDS")]
    store_outage: Vec<String>,
    /// With `-- --executor lambda`: give the function host a store of its own,
    /// as a misconfigured deployment would (the functions find none of the
    /// nodes' objects; the nodes' circuit breakers must take over).
    #[arg(long)]
    fn_separate_store: bool,
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
    /// Keep Prometheus (and its data) up this many seconds after the run, to look around
    /// (a signal ends it early).
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
        Cmd::S3(a) => rt.block_on(s3::run(a)).map(|()| Outcome::Ok),
    };
    match r {
        Ok(Outcome::Ok) => ExitCode::SUCCESS,
        Ok(Outcome::Problems) => ExitCode::from(3),
        // As a shell reports a process that SIGINT ended.
        Ok(Outcome::Interrupted) => ExitCode::from(130),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// How a command ended: exit 0, 3 (the run had problems), 130 (interrupted).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    Ok,
    Problems,
    Interrupted,
}

impl Outcome {
    fn of(r: &report::Report) -> Outcome {
        match (r.interrupted, r.ok) {
            (true, _) => Outcome::Interrupted,
            (false, true) => Outcome::Ok,
            (false, false) => Outcome::Problems,
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
}

/// A node process ended (sent by its supervisor).
#[derive(Debug, Clone, Copy)]
struct Exit {
    node: usize,
    /// Its start count: an exit of an earlier life is old news.
    generation: u32,
    code: Option<i32>,
    /// The signal that ended it, if one did.
    signal: Option<i32>,
}

impl Exit {
    fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(c), _) => format!("exit {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            (None, None) => "exit status unknown".into(),
        }
    }
}

struct NodeProc {
    child: Child,
    /// The length of its stderr log before it started: this life's part starts there.
    stderr_from: u64,
}

/// What the supervisor of a node process can be told.
enum Ctl {
    /// SIGKILL now (a fault of the schedule).
    Kill,
    /// A line for the node's stdin (its control commands).
    Line(String),
    /// The run is over: let it finish (STOP_WAIT), then terminate it.
    Stop,
    /// The run was cut short: SIGTERM, then SIGKILL after TERM_GRACE.
    Terminate,
}

/// How long a node may take to finish by itself once the run is over.
const STOP_WAIT: Duration = Duration::from_secs(10);
/// How long a node may take to exit after SIGTERM before it gets SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(5);

/// SIGTERM, a bounded wait, then SIGKILL. The node's status if it exited by itself.
async fn terminate(child: &mut Child) -> Option<std::process::ExitStatus> {
    // (tokio sends only SIGKILL; `kill` is in every base system.)
    if let Some(pid) = child.id() {
        let sent = Command::new("kill")
            .args(["-s", "TERM", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success());
        if sent {
            if let Ok(s) = tokio::time::timeout(TERM_GRACE, child.wait()).await {
                return s.ok();
            }
        }
    }
    let _ = child.kill().await;
    None
}

/// Owns a node process: waits for its exit, stops it when told, reports the exit.
fn supervise(i: usize, generation: u32, p: NodeProc, tx: mpsc::Sender<Exit>) -> mpsc::Sender<Ctl> {
    let (ctl_tx, mut ctl) = mpsc::channel::<Ctl>(16);
    let mut child = p.child;
    let mut stdin = child.stdin.take();
    tokio::spawn(async move {
        let status = loop {
            tokio::select! {
                s = child.wait() => break s.ok(),
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
                    Some(Ctl::Stop) => {
                        // Give it a moment to notice the end of the run and write its report.
                        match tokio::time::timeout(STOP_WAIT, child.wait()).await {
                            Ok(s) => break s.ok(),
                            Err(_) => break terminate(&mut child).await,
                        }
                    }
                    // Cut short, or testnet itself is going away.
                    Some(Ctl::Terminate) | None => break terminate(&mut child).await,
                },
            }
        };
        let (code, signal) = (status.and_then(|s| s.code()), status.and_then(|s| s.signal()));
        let _ = tx.send(Exit { node: i, generation, code, signal }).await;
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
    let stderr_from = stderr.metadata().map_or(0, |m| m.len());
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
        // Its own process group: a Ctrl-C in the terminal reaches testnet only,
        // which then stops the nodes in order (SIGTERM, then SIGKILL).
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let stdout = child.stdout.take().expect("piped");
    let mut log = tokio::fs::OpenOptions::new().create(true).append(true).open(dir.join("stdout.log")).await?;
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = log.write_all(format!("{line}\n").as_bytes()).await;
            // The node's own line type: the same definition prints and parses them.
            let msg = match line.parse::<Line>() {
                Ok(Line::Listening { addr }) => Some(NodeLine::Listening(i, addr)),
                Ok(Line::Peer { id, .. }) => Some(NodeLine::PeerId(i, id)),
                Ok(Line::Ready { .. }) => Some(NodeLine::Ready(i)),
                Ok(Line::Computed { .. }) => Some(NodeLine::Computed(i)),
                Ok(Line::Metrics { url }) => Some(NodeLine::Metrics(i, url)),
                Ok(Line::Member { event: MemberEvent::Died, peer, .. }) => Some(NodeLine::Died(i, peer)),
                Ok(Line::Round { round, digest, .. }) => Some(NodeLine::Round(i, round, digest)),
                Ok(Line::Epoch { epoch, test_acc_pct, .. }) => Some(NodeLine::Epoch(epoch, test_acc_pct)),
                _ => None,
            };
            if let Some(m) = msg {
                let _ = tx.send(m).await;
            }
        }
        let _ = log.flush().await;
    });
    Ok(NodeProc { child, stderr_from })
}

async fn run(a: RunArgs) -> anyhow::Result<Outcome> {
    let report = run_report(a).await?;
    Ok(Outcome::of(&report))
}

/// `testnet compare`: P2P first, then the parameter server, same schedule.
async fn compare_modes(c: CompareArgs) -> anyhow::Result<Outcome> {
    if !(c.target_accuracy > 0.0 && c.target_accuracy <= 1.0) {
        bail!("--target-accuracy must be a fraction in (0, 1], e.g. 0.7");
    }
    let out = c.run.out.clone();
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
        // Both runs' arguments and output directories are checked before either starts.
        plan(&p2p)?;
        plan(&ps)?;
        check_out(&p2p.out, c.run.force)?;
        check_out(&ps.out, c.run.force)?;
        eprintln!("== P2P: {} peers", c.run.peers);
        let r1 = run_report(p2p).await?;
        if r1.interrupted {
            return Ok(Outcome::Interrupted);
        }
        eprintln!("== parameter server: 1 server, {} workers", c.run.peers);
        (r1, run_report(ps).await?)
    };
    if r2.interrupted {
        return Ok(Outcome::Interrupted);
    }
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let cmp = compare::compare(c.run.peers, c.target_accuracy, &c.run.node_args, &r1, &r2);
    // The command that ran the experiment (a rebuild from its reports names it too).
    let command = std::env::args().filter(|a| a != "--from-reports").collect::<Vec<_>>().join(" ");
    compare::write(&out, &cmp, &command, &r1, &r2)?;
    println!("{}", compare::markdown(&cmp, &command));
    eprintln!("comparison: {}", out.join("compare.md").display());
    Ok(if r1.ok && r2.ok { Outcome::Ok } else { Outcome::Problems })
}

/// SIGINT, SIGTERM and SIGHUP, watched from the start of a run: one that comes
/// while nobody waits is kept for the next `recv`.
struct Signals {
    int: Option<tokio::signal::unix::Signal>,
    term: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        Signals {
            int: signal(SignalKind::interrupt()).ok(),
            term: signal(SignalKind::terminate()).ok(),
            hup: signal(SignalKind::hangup()).ok(),
        }
    }

    /// Resolves when one of them arrives.
    async fn recv(&mut self) {
        async fn one(s: &mut Option<tokio::signal::unix::Signal>) {
            let got = match s {
                Some(s) => s.recv().await.is_some(),
                None => false,
            };
            if !got {
                std::future::pending::<()>().await;
            }
        }
        tokio::select! {
            _ = one(&mut self.int) => {}
            _ = one(&mut self.term) => {}
            _ = one(&mut self.hup) => {}
        }
    }
}

/// A free TCP port on loopback (for the parameter server, which keeps its
/// address across restarts so that workers find it again).
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(l.local_addr()?.port())
}

/// Everything `testnet run` derives from its arguments, checked before anything
/// touches the disk.
struct Plan {
    n_nodes: usize,
    /// The parameter server's index (--role ps): the last node.
    server: Option<usize>,
    bin: PathBuf,
    threads: usize,
    schedule: Vec<(faults::Scheduled, String)>,
    /// Seconds after the first node that each peer starts (--start-delay).
    delays: Vec<f64>,
    /// Each node's own arguments (--peer-args, --byzantine).
    extra: Vec<Vec<String>>,
}

/// Checks every argument of a run (flags, durations, the fault schedule, the
/// per-peer arguments) and resolves the node binary. Touches no file.
/// Whether the node arguments ask for the function tier (`--executor lambda`).
fn offloads(node_args: &[String]) -> bool {
    node_args.windows(2).any(|w| w[0] == "--executor" && w[1] == "lambda") || node_args.iter().any(|x| x == "--executor=lambda")
}

fn plan(a: &RunArgs) -> anyhow::Result<Plan> {
    use units::{check_secs, parse_secs, Zero};
    let bad = |e: String| anyhow::anyhow!(e);
    if a.peers == 0 {
        bail!("--peers must be at least 1");
    }
    let ps = a.role == "ps";
    if a.rogue_forge && a.rogues == 0 {
        bail!("--rogue-forge needs --rogues N");
    }
    if a.rogue_heartbeat && a.rogues == 0 {
        bail!("--rogue-heartbeat needs --rogues N");
    }
    if a.rogue_heartbeat && a.rogue_forge {
        bail!("--rogue-heartbeat and --rogue-forge are two kinds of rogue: give one");
    }
    if ps && a.rogues > 0 {
        bail!("--rogues is for --role p2p (rogues attack the gossip layer)");
    }
    // Every duration: finite, in range (an Instant plus it cannot overflow).
    if a.timeout == 0 || a.timeout > units::MAX_SECS as u64 {
        bail!("--timeout {}: give seconds from 1 up to {} (30 days)", a.timeout, units::MAX_SECS);
    }
    check_secs("--prometheus-linger", a.prometheus_linger, Zero::Allowed).map_err(bad)?;
    check_secs("--fn-timeout-s", a.fn_timeout_s, Zero::Refused).map_err(bad)?;
    check_secs("--interval", a.interval, Zero::Refused).map_err(bad)?;
    if let Some(d) = a.down {
        check_secs("--down", d, Zero::Allowed).map_err(bad)?;
    }
    if a.threads_per_node == Some(0) {
        bail!("--threads-per-node must be at least 1");
    }
    if a.fn_concurrency == Some(0) {
        bail!("--fn-concurrency must be at least 1");
    }
    let nodes = faults::Nodes { peers: a.peers, server: ps };
    let n_nodes = nodes.count();
    let server = ps.then_some(a.peers);
    // The fault schedule.
    let mut schedule: Vec<(faults::Scheduled, String)> = Vec::new();
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
    let lambda = offloads(&a.node_args);
    if !lambda && (!a.store_outage.is_empty() || a.fn_separate_store) {
        return Err(bad("--store-outage and --fn-separate-store need the function tier: add `-- --executor lambda`".into()));
    }
    for o in &a.store_outage {
        schedule.push((faults::parse_store_outage(o).map_err(bad)?, format!("store outage {o}")));
    }
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
    let mut delays = vec![0f64; a.peers];
    for d in &a.start_delay {
        let expected = || anyhow::anyhow!("--start-delay {d}: expected INDEX=SECONDS with 0 < INDEX < --peers");
        let (i, secs) = d.split_once('=').ok_or_else(expected)?;
        let i = i.trim().parse::<usize>().ok().filter(|i| *i > 0 && *i < a.peers).ok_or_else(expected)?;
        delays[i] = parse_secs(&format!("--start-delay {d}"), secs, Zero::Allowed).map_err(bad)?;
    }
    let bin = node_bin(&a.node_bin)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The same threads per peer and per worker (the server computes no gradients).
    let threads = a.threads_per_node.unwrap_or((cores / a.peers).max(1));
    Ok(Plan { n_nodes, server, bin, threads, schedule, delays, extra })
}

/// Refuses a non-empty `--out` unless `--force`: an earlier run's logs, keys,
/// checkpoints and reports are not deleted without being asked. Touches nothing.
fn check_out(out: &Path, force: bool) -> anyhow::Result<()> {
    match std::fs::read_dir(out) {
        Ok(mut entries) => {
            if entries.next().is_some() && !force {
                bail!("--out {} is not empty (an earlier run?): pass --force to replace its contents, or give another --out", out.display());
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => bail!("--out {}: {e}", out.display()),
    }
}

/// `check_out`, then (with --force) empties `--out`, and creates it.
fn prepare_out(out: &Path, force: bool) -> anyhow::Result<()> {
    check_out(out, force)?;
    if let Ok(entries) = std::fs::read_dir(out) {
        for e in entries {
            let e = e.with_context(|| format!("cannot list {}", out.display()))?;
            let path = e.path();
            let removed = match e.file_type() {
                Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
                _ => std::fs::remove_file(&path),
            };
            removed.with_context(|| format!("--force: cannot remove {}", path.display()))?;
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))
}

/// Why a run ended before its nodes finished it.
#[derive(Debug, Clone, PartialEq)]
enum Cut {
    Timeout,
    /// SIGINT, SIGTERM or SIGHUP.
    Interrupted,
    /// A node exited by itself with an error: the problem, quoting its error line.
    NodeFailed(String),
}

/// The node processes as the run loop knows them.
struct NodeStates {
    /// The peers (or workers) 0..peers; the server, if any, is `peers`.
    peers: usize,
    server: Option<usize>,
    running: Vec<bool>,
    exits: Vec<Option<Option<i32>>>,
    generation: Vec<u32>,
    /// Killed by the fault schedule (and not revived since).
    killed: Vec<bool>,
    stderr_from: Vec<u64>,
}

impl NodeStates {
    /// The run's own end: the server finished, or (P2P) a peer finished.
    fn run_over(&self) -> bool {
        match self.server {
            Some(s) => self.exits[s] == Some(Some(0)),
            None => (0..self.peers).any(|i| self.exits[i] == Some(Some(0))),
        }
    }

    fn started(&mut self, i: usize, p: &NodeProc) {
        self.running[i] = true;
        self.killed[i] = false;
        self.exits[i] = None;
        self.stderr_from[i] = p.stderr_from;
    }

    /// Records an exit. True when it ends the run: the node stopped by itself with
    /// an error (or a signal not ours) before the run was over.
    fn exited(&mut self, e: &Exit) -> bool {
        if e.generation != self.generation[e.node] {
            return false;
        }
        let early = self.running[e.node] && !self.killed[e.node] && e.code != Some(0) && !self.run_over();
        self.exits[e.node] = Some(e.code);
        self.running[e.node] = false;
        early
    }
}

fn node_name(i: usize, n_nodes: usize, server: Option<usize>) -> String {
    match server {
        Some(s) if s == i => "the server (ps)".into(),
        _ if i >= n_nodes => format!("rogue {i}"),
        Some(_) => format!("worker {i}"),
        None => format!("peer {i}"),
    }
}

/// Runs the testnet and returns its report (also written to OUT/report.json).
async fn run_report(a: RunArgs) -> anyhow::Result<report::Report> {
    let Plan { n_nodes, server, bin, threads, mut schedule, delays, extra } = plan(&a)?;
    prepare_out(&a.out, a.force)?;
    // From here on a signal stops the run in order.
    let mut signals = Signals::new();
    let ps = server.is_some();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut args: Vec<String> = vec![
        "--peers".into(),
        a.peers.to_string(),
        "--threads".into(),
        threads.to_string(),
    ];
    args.extend(a.node_args.iter().cloned());
    if !a.partition.is_empty() {
        args.push("--control-stdin".into());
    }
    // Nodes that offload to the function tier get a local object store and function host.
    let lambda = offloads(&a.node_args);
    let mut tier = if lambda {
        let settings = tier::TierSettings {
            concurrency: a.fn_concurrency.unwrap_or(cores),
            timeout_s: a.fn_timeout_s,
            memory_mb: a.fn_memory_mb,
            separate_store: a.fn_separate_store,
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
    let (exit_tx, mut exit_rx) = mpsc::channel::<Exit>(1024);
    let started = Instant::now();
    // (--timeout is at most 30 days: no overflow)
    let deadline = started + Duration::from_secs(a.timeout);
    let node_dir = |i: usize| a.out.join("nodes").join(if Some(i) == server { "ps".to_string() } else { format!("n{i}") });
    let log = |i: usize| node_dir(i).join("stderr.log");
    let name = |i: usize| node_name(i, n_nodes, server);
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
    let n = n_nodes + a.rogues;
    let mut st = NodeStates {
        peers: a.peers,
        server,
        running: vec![false; n],
        exits: vec![None; n],
        generation: vec![0; n],
        killed: vec![false; n],
        stderr_from: vec![0; n],
    };
    let mut ctls: Vec<Option<mpsc::Sender<Ctl>>> = vec![None; n];
    // Node output read before the run loop (while starting the others).
    let mut early: VecDeque<NodeLine> = VecDeque::new();
    let mut cut: Option<Cut> = None;
    let failed = |e: &Exit, from: u64| format!("{} exited early ({}): {}", name(e.node), e.describe(), report::error_line(&log(e.node), from));

    // The first node (peer 0, or the server) gives everyone's bootstrap address.
    let first = server.unwrap_or(0);
    let p = spawn_node(first, &bin, &node_dir(first), &args_for(first), &env, tx.clone()).await?;
    st.started(first, &p);
    ctls[first] = Some(supervise(first, 0, p, exit_tx.clone()));
    let listen_by = Instant::now() + Duration::from_secs(60);
    let mut boot = String::new();
    while boot.is_empty() && cut.is_none() {
        tokio::select! {
            m = rx.recv() => match m {
                Some(NodeLine::Listening(i, addr)) if i == first => boot = addr,
                Some(m) => early.push_back(m),
                None => bail!("lost the nodes' output"),
            },
            Some(e) = exit_rx.recv() => {
                // Its last lines may still be on their way (the exit can be seen
                // first): a node that listened and then ended did listen.
                let grace = tokio::time::sleep(Duration::from_millis(500));
                tokio::pin!(grace);
                loop {
                    tokio::select! {
                        m = rx.recv() => match m {
                            Some(NodeLine::Listening(i, addr)) if i == first => {
                                boot = addr;
                                break;
                            }
                            Some(m) => early.push_back(m),
                            None => break,
                        },
                        _ = &mut grace => break,
                    }
                }
                if boot.is_empty() {
                    bail!("{} exited before it listened ({}): {}", name(first), e.describe(), report::error_line(&log(first), st.stderr_from[first]))
                }
                // The run loop handles the exit.
                let _ = exit_tx.send(e).await;
            }
            _ = tokio::time::sleep_until(listen_by.into()) => {
                bail!("{} did not start listening within 60 s: {}", name(first), report::error_line(&log(first), st.stderr_from[first]))
            }
            _ = signals.recv() => cut = Some(Cut::Interrupted),
        }
    }
    // How a node (other than the first) finds the run.
    let join_args = |boot: &str| -> Vec<String> {
        if ps {
            vec!["--ps".into(), boot.to_string()]
        } else {
            vec!["--bootstrap".into(), boot.to_string()]
        }
    };
    // The other peers, each at its --start-delay; a failure or a signal meanwhile stops the run.
    let mut order: Vec<usize> = (0..a.peers).filter(|i| *i != first).collect();
    order.sort_by(|x, y| delays[*x].total_cmp(&delays[*y]));
    'start: for i in order {
        if cut.is_some() {
            break;
        }
        // (delays are at most 30 days: no overflow)
        let at = (started + Duration::from_secs_f64(delays[i])).min(deadline);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(at.into()) => break,
                Some(m) = rx.recv() => early.push_back(m),
                Some(e) = exit_rx.recv() => {
                    let from = st.stderr_from[e.node];
                    if st.exited(&e) {
                        cut = Some(Cut::NodeFailed(failed(&e, from)));
                        break 'start;
                    }
                }
                _ = signals.recv() => {
                    cut = Some(Cut::Interrupted);
                    break 'start;
                }
            }
        }
        if Instant::now() >= deadline {
            cut = Some(Cut::Timeout);
            break;
        }
        let mut args_i = args_for(i);
        args_i.extend(join_args(&boot));
        let p = spawn_node(i, &bin, &node_dir(i), &args_i, &env, tx.clone()).await?;
        st.started(i, &p);
        ctls[i] = Some(supervise(i, 0, p, exit_tx.clone()));
    }
    let rogue_kind = if a.rogue_heartbeat { "heartbeat" } else { "garbage" };
    for (i, ctl) in ctls.iter_mut().enumerate().skip(n_nodes) {
        if cut.is_some() {
            break;
        }
        let mut args_i = args.clone();
        args_i.extend(identity(i));
        args_i.push(if a.rogue_heartbeat { "--fault-heartbeat-only".into() } else { "--fault-garbage".into() });
        args_i.extend(["--bootstrap".into(), boot.clone()]);
        if a.rogue_forge {
            args_i.push("--fault-forge".into());
        }
        let p = spawn_node(i, &bin, &node_dir(i), &args_i, &env, tx.clone()).await?;
        st.started(i, &p);
        *ctl = Some(supervise(i, 0, p, exit_tx.clone()));
    }
    eprintln!(
        "testnet: {} peers{}{}, {threads} torch threads each, bootstrap {boot}{}",
        a.peers,
        if a.rogues > 0 { format!(" and {} {rogue_kind} rogue(s)", a.rogues) } else { String::new() },
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
    let mut rounds = vec![0u64; n_nodes];
    let mut killed_at: Vec<Option<f64>> = vec![None; n_nodes];
    let mut addrs: Vec<Option<String>> = vec![None; n];
    addrs[first] = Some(boot.clone());
    let mut ids: Vec<String> = vec![String::new(); n];
    let mut progress: Vec<(f64, u64)> = Vec::new();
    let mut metric_urls: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
    let mut accuracy_timeline: Vec<(f64, u64, f64)> = Vec::new();
    let mut obs: Vec<faults::Obs> = Vec::new();
    let mut fired: Vec<(f64, String, faults::Action)> = Vec::new();
    let mut last_acc = None;
    loop {
        if cut.is_some() {
            break;
        }
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
                    let Some(ctl) = ctls[p].as_ref().filter(|_| st.running[p]) else {
                        say(&bar, format!("fault: {spec}: peer {p} is not running; skipped"));
                        continue;
                    };
                    let _ = ctl.send(Ctl::Kill).await;
                    st.killed[p] = true;
                    killed_at[p] = Some(now);
                    st.running[p] = false;
                    addrs[p] = None; // its next life listens elsewhere
                    say(&bar, format!("fault: {spec} at {now:.1} s (round {furthest})"));
                }
                faults::Action::Revive { peer } => {
                    let p = *peer;
                    if st.running[p] || !st.killed[p] {
                        say(&bar, format!("fault: {spec}: peer {p} is running; skipped"));
                        continue;
                    }
                    let mut args_p = args_for(p);
                    let others: Vec<usize> = (0..a.peers).filter(|j| *j != p && st.running[*j]).collect();
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
                    st.generation[p] += 1;
                    let proc_p = spawn_node(p, &bin, &node_dir(p), &args_p, &env, tx.clone()).await?;
                    st.started(p, &proc_p);
                    ctls[p] = Some(supervise(p, st.generation[p], proc_p, exit_tx.clone()));
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
                faults::Action::StoreOutage { secs } => {
                    if let Some(t) = tier.as_mut() {
                        t.store_down().await?;
                    }
                    schedule.push((faults::Scheduled { at: faults::At::Secs(now + secs), action: faults::Action::StoreBack }, format!("store back ({spec})")));
                    say(&bar, format!("fault: {spec} at {now:.1} s (round {furthest}): the store is down and its objects are lost"));
                }
                faults::Action::StoreBack => {
                    if let Some(t) = tier.as_mut() {
                        t.store_back().await?;
                    }
                    say(&bar, format!("fault: {spec} at {now:.1} s: the store serves again, empty"));
                }
            }
            fired.push((now, spec, ev.action.clone()));
        }
        // Done when no peer runs and nothing is left to revive (or the run is over).
        let any_running = (0..n_nodes).any(|i| st.running[i]);
        let run_over = st.run_over();
        let revive_pending = schedule.iter().any(|(ev, _)| matches!(ev.action, faults::Action::Revive { .. }));
        // In PS mode the run ends with the server: workers still retrying (revived
        // late) are stopped below.
        if (ps && run_over) || (!any_running && (run_over || !revive_pending)) {
            break;
        }
        if Instant::now() > deadline {
            cut = Some(Cut::Timeout);
            break;
        }
        let m = match early.pop_front() {
            Some(m) => m,
            None => tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => m,
                    None => break,
                },
                Some(e) = exit_rx.recv() => {
                    let from = st.stderr_from[e.node];
                    if st.exited(&e) {
                        // A node that fails by itself ends the run now, not at --timeout.
                        cut = Some(Cut::NodeFailed(failed(&e, from)));
                    }
                    continue;
                }
                _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                // SIGINT, SIGTERM or SIGHUP: stop the nodes and report the run as interrupted.
                _ = signals.recv() => {
                    cut = Some(Cut::Interrupted);
                    break;
                }
            },
        };
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
            NodeLine::Listening(i, addr) => {
                if addr.starts_with("/ip4/127.0.0.1") || addrs[i].is_none() {
                    addrs[i] = Some(addr);
                }
            }
            NodeLine::PeerId(i, id) => ids[i] = id,
            NodeLine::Died(i, peer) => obs.push(faults::Obs::Died { t, node: i, peer }),
            NodeLine::Ready(i) => obs.push(faults::Obs::Ready { t, node: i }),
        }
        let shown = if ps { &rounds[a.peers..] } else { &rounds[..] };
        let min = shown.iter().min().copied().unwrap_or(0);
        let max = shown.iter().max().copied().unwrap_or(0);
        bar.set_message(format!(
            "rounds {min}..{max}, {} of {} {} running{}",
            st.running[..n_nodes].iter().filter(|r| **r).count(),
            n_nodes,
            if ps { "nodes" } else { "peers" },
            last_acc.map(|(e, acc)| format!(", epoch {e} test accuracy {acc:.2}%")).unwrap_or_default()
        ));
    }
    bar.finish_and_clear();
    match &cut {
        Some(Cut::Timeout) => eprintln!("testnet: --timeout {} s passed; stopping the nodes", a.timeout),
        Some(Cut::Interrupted) => eprintln!("testnet: interrupted; stopping the nodes (SIGTERM, then SIGKILL)"),
        Some(Cut::NodeFailed(p)) => eprintln!("testnet: {p}; stopping the run"),
        None => {}
    }
    // Rogues (and anything left) stop now; wait for their exits, bounded: a run
    // cut short terminates its nodes (SIGTERM, SIGKILL after a grace).
    for (i, c) in ctls.iter().enumerate() {
        if let (Some(c), true) = (c, st.running[i]) {
            let _ = c.send(if cut.is_some() { Ctl::Terminate } else { Ctl::Stop }).await;
        }
    }
    let stop_deadline = Instant::now() + STOP_WAIT + TERM_GRACE + Duration::from_secs(5);
    let mut forced = false;
    while st.running.iter().any(|r| *r) && Instant::now() < stop_deadline {
        tokio::select! {
            Some(e) = exit_rx.recv() => {
                st.exited(&e);
            }
            // Keep the nodes' output flowing: a node blocked on stdout cannot finish.
            Some(_) = rx.recv() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            // Another signal: no more waiting.
            _ = signals.recv(), if !forced => {
                eprintln!("testnet: interrupted again; killing the nodes");
                forced = true;
                if cut.is_none() {
                    cut = Some(Cut::Interrupted);
                }
                for c in ctls.iter().flatten() {
                    let _ = c.send(Ctl::Kill).await;
                }
            }
        }
    }
    drop(tx);
    let down_at_end: Vec<bool> = st.killed[..n_nodes].to_vec();
    let fault_reports = faults::effects(&fired, &obs, &ids[..n_nodes], server);
    let host_stats = match tier {
        Some(mut t) => {
            let s = t.stats().await;
            // A run that ended during an outage: count what the store holds.
            let _ = t.store_back().await;
            let store = t.leftovers();
            t.stop().await;
            Some((s.unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() })), store))
        }
        None => None,
    };
    let mut report = report::collect(
        &a.out,
        n_nodes,
        a.rogues,
        &args,
        started.elapsed(),
        &st.exits,
        &down_at_end,
        host_stats,
        server,
        &ids,
        rogue_kind,
        cut.is_some(),
    )?;
    if let Some(c) = &cut {
        let why = match c {
            Cut::Timeout => format!("timed out: --timeout {} s passed before the run finished", a.timeout),
            Cut::Interrupted => "interrupted by signal".to_string(),
            Cut::NodeFailed(p) => p.clone(),
        };
        report.problems.insert(0, why);
        report.ok = false;
        report.interrupted = *c == Cut::Interrupted;
    }
    report.faults = fault_reports;
    report.role = a.role.clone();
    report.stalled_seconds = report::stalled_seconds(&progress);
    report.progress = progress;
    report.accuracy_timeline = accuracy_timeline;
    let path = a.out.join("report.json");
    // Whole or not at all: a temporary file, then a rename.
    let tmp = a.out.join("report.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&report)?)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("cannot write {}", path.display()))?;
    report::print_summary(&report);
    eprintln!("report: {}", path.display());
    if let (Some(p), true, false) = (&_prometheus, a.prometheus_linger > 0.0, report.interrupted) {
        eprintln!("testnet: Prometheus stays up at {} for {} s (Ctrl-C ends it)", p.url, a.prometheus_linger);
        // (checked by plan: finite, at most 30 days)
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs_f64(a.prometheus_linger)) => {}
            _ = signals.recv() => {}
        }
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
