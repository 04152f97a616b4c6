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
mod scale;
mod tier;
mod units;
mod run;
use run::run_report;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

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
    /// Emulate a WAN uplink on every node: bw=RATE,delay=TIME[,jitter=TIME],
    /// e.g. bw=100mbit,delay=25ms (passed to each node as --link).
    #[arg(long)]
    link: Option<String>,
    /// One node's own link instead: "INDEX=SPEC", repeatable (a slow peer),
    /// e.g. --link-peer "3=bw=10mbit,delay=100ms".
    #[arg(long)]
    link_peer: Vec<String>,
    /// After the run, time a single process training the same model on every
    /// core, and report the run's efficiency against that compute-bound ideal
    /// (scale.efficiency: the round's samples at that rate over the measured round time).
    #[arg(long)]
    ideal: bool,
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
    let mut links: Vec<Option<String>> = vec![None; n_nodes];
    if let Some(l) = &a.link {
        l.parse::<p2pml_proto::LinkSpec>().map_err(bad)?;
        links.iter_mut().for_each(|x| *x = Some(l.clone()));
    }
    for lp in &a.link_peer {
        let Some((i, spec)) = lp.split_once('=') else { bail!("--link-peer {lp}: expected INDEX=SPEC, e.g. 3=bw=10mbit,delay=100ms") };
        let i: usize = i.trim().parse().map_err(|_| anyhow::anyhow!("--link-peer {lp}: {i} is not a peer index"))?;
        if i >= a.peers {
            bail!("--link-peer {lp}: peer {i} does not exist (--peers {})", a.peers);
        }
        spec.parse::<p2pml_proto::LinkSpec>().map_err(bad)?;
        links[i] = Some(spec.to_string());
    }
    for (i, l) in links.into_iter().enumerate() {
        if let Some(l) = l {
            extra[i].extend(["--link".to_string(), l]);
        }
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
