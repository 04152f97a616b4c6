//! `testnet run`'s run loop: start the nodes (the first gives the bootstrap
//! address), fire the fault schedule as it comes due, follow the nodes' lines,
//! stop them in order and collect the report. Each node is a [`NodeSlot`].

use p2pml_proto::line::{Line, MemberEvent};
use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::VecDeque;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use crate::{faults, plan, prepare_out, promcfg, report, tier, offloads, Plan, RunArgs};

/// What a node's stdout told us.
#[derive(Debug)]
pub(crate) enum NodeLine {
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
pub(crate) struct Exit {
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

pub(crate) struct NodeProc {
    child: Child,
    /// The length of its stderr log before it started: this life's part starts there.
    stderr_from: u64,
}

/// What the supervisor of a node process can be told.
pub(crate) enum Ctl {
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
pub(crate) const STOP_WAIT: Duration = Duration::from_secs(10);
/// How long a node may take to exit after SIGTERM before it gets SIGKILL.
pub(crate) const TERM_GRACE: Duration = Duration::from_secs(5);

/// SIGTERM, a bounded wait, then SIGKILL. The node's status if it exited by itself.
pub(crate) async fn terminate(child: &mut Child) -> Option<std::process::ExitStatus> {
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
pub(crate) fn supervise(i: usize, generation: u32, p: NodeProc, tx: mpsc::Sender<Exit>) -> mpsc::Sender<Ctl> {
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

pub(crate) async fn spawn_node(
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


/// SIGINT, SIGTERM and SIGHUP, watched from the start of a run: one that comes
/// while nobody waits is kept for the next `recv`.
pub(crate) struct Signals {
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
pub(crate) fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(l.local_addr()?.port())
}


/// Why a run ended before its nodes finished it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Cut {
    Timeout,
    /// SIGINT, SIGTERM or SIGHUP.
    Interrupted,
    /// A node exited by itself with an error: the problem, quoting its error line.
    NodeFailed(String),
}

/// One node process as the run loop knows it.
#[derive(Default)]
pub(crate) struct NodeSlot {
    running: bool,
    /// Its last exit: None while it runs (or never ran); the exit code (None: a signal).
    exit: Option<Option<i32>>,
    /// Its start count (a revival is a new generation; exits of an old one are stale).
    generation: u32,
    /// Killed by the fault schedule (and not revived since).
    killed: bool,
    /// When the schedule last killed it (seconds after the run's start).
    killed_at: Option<f64>,
    /// Where this life's stderr begins in its log.
    stderr_from: u64,
    /// Its supervisor.
    ctl: Option<mpsc::Sender<Ctl>>,
    /// Where it listens now (None while down: a revival listens elsewhere).
    addr: Option<String>,
    peer_id: String,
    /// Rounds it has finished (peers and the server).
    rounds: u64,
}

/// The node processes: peers (or workers) 0..peers, the server (if any) at
/// `peers`, then the rogues.
pub(crate) struct Slots {
    peers: usize,
    server: Option<usize>,
    /// Peers and server (without the rogues).
    n_nodes: usize,
    v: Vec<NodeSlot>,
}

impl Slots {
    fn new(peers: usize, server: Option<usize>, n_nodes: usize, rogues: usize) -> Self {
        Slots { peers, server, n_nodes, v: (0..n_nodes + rogues).map(|_| NodeSlot::default()).collect() }
    }

    /// The run's own end: the server finished, or (P2P) a peer finished.
    fn run_over(&self) -> bool {
        match self.server {
            Some(s) => self.v[s].exit == Some(Some(0)),
            None => self.v[..self.peers].iter().any(|n| n.exit == Some(Some(0))),
        }
    }

    fn started(&mut self, i: usize, p: NodeProc, exit_tx: &mpsc::Sender<Exit>) {
        let n = &mut self.v[i];
        n.running = true;
        n.killed = false;
        n.exit = None;
        n.stderr_from = p.stderr_from;
        n.ctl = Some(supervise(i, n.generation, p, exit_tx.clone()));
    }

    /// Records an exit. True when it ends the run: the node stopped by itself with
    /// an error (or a signal not ours) before the run was over.
    fn exited(&mut self, e: &Exit) -> bool {
        if e.generation != self.v[e.node].generation {
            return false;
        }
        let early = self.v[e.node].running && !self.v[e.node].killed && e.code != Some(0) && !self.run_over();
        let n = &mut self.v[e.node];
        n.exit = Some(e.code);
        n.running = false;
        early
    }

    /// The furthest round a peer (or the server) has finished.
    fn furthest(&self) -> u64 {
        self.v[..self.n_nodes].iter().map(|n| n.rounds).max().unwrap_or(0)
    }

    fn any_running(&self) -> bool {
        self.v.iter().any(|n| n.running)
    }
}

pub(crate) fn node_name(i: usize, n_nodes: usize, server: Option<usize>) -> String {
    match server {
        Some(s) if s == i => "the server (ps)".into(),
        _ if i >= n_nodes => format!("rogue {i}"),
        Some(_) => format!("worker {i}"),
        None => format!("peer {i}"),
    }
}

/// Runs the testnet and returns its report (also written to OUT/report.json).
pub(crate) async fn run_report(a: RunArgs) -> anyhow::Result<report::Report> {
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
    let mut st = Slots::new(a.peers, server, n_nodes, a.rogues);
    // Node output read before the run loop (while starting the others).
    let mut early: VecDeque<NodeLine> = VecDeque::new();
    let mut cut: Option<Cut> = None;
    let failed = |e: &Exit, from: u64| format!("{} exited early ({}): {}", name(e.node), e.describe(), report::error_line(&log(e.node), from));

    // The first node (peer 0, or the server) gives everyone's bootstrap address.
    let first = server.unwrap_or(0);
    let p = spawn_node(first, &bin, &node_dir(first), &args_for(first), &env, tx.clone()).await?;
    st.started(first, p, &exit_tx);
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
                    bail!("{} exited before it listened ({}): {}", name(first), e.describe(), report::error_line(&log(first), st.v[first].stderr_from))
                }
                // The run loop handles the exit.
                let _ = exit_tx.send(e).await;
            }
            _ = tokio::time::sleep_until(listen_by.into()) => {
                bail!("{} did not start listening within 60 s: {}", name(first), report::error_line(&log(first), st.v[first].stderr_from))
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
                    let from = st.v[e.node].stderr_from;
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
        st.started(i, p, &exit_tx);
    }
    let rogue_kind = if a.rogue_heartbeat { "heartbeat" } else { "garbage" };
    for i in n_nodes..st.v.len() {
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
        st.started(i, p, &exit_tx);
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
    st.v[first].addr = Some(boot.clone());
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
        let furthest = st.furthest();
        let due = faults::due(&mut schedule, now, furthest, |p| st.v.get(p).and_then(|n| n.killed_at));
        for (ev, spec) in due {
            match &ev.action {
                faults::Action::Kill { peer } => {
                    let p = *peer;
                    let Some(ctl) = st.v[p].ctl.as_ref().filter(|_| st.v[p].running) else {
                        say(&bar, format!("fault: {spec}: peer {p} is not running; skipped"));
                        continue;
                    };
                    let _ = ctl.send(Ctl::Kill).await;
                    let n = &mut st.v[p];
                    n.killed = true;
                    n.killed_at = Some(now);
                    n.running = false;
                    n.addr = None; // its next life listens elsewhere
                    say(&bar, format!("fault: {spec} at {now:.1} s (round {furthest})"));
                }
                faults::Action::Revive { peer } => {
                    let p = *peer;
                    if st.v[p].running || !st.v[p].killed {
                        say(&bar, format!("fault: {spec}: peer {p} is running; skipped"));
                        continue;
                    }
                    let mut args_p = args_for(p);
                    let others: Vec<usize> = (0..a.peers).filter(|j| *j != p && st.v[*j].running).collect();
                    let known: Vec<String> = others.iter().filter_map(|j| st.v[*j].addr.clone()).collect();
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
                    st.v[p].generation += 1;
                    let proc_p = spawn_node(p, &bin, &node_dir(p), &args_p, &env, tx.clone()).await?;
                    st.started(p, proc_p, &exit_tx);
                    say(&bar, format!("fault: {spec} at {now:.1} s (round {furthest})"));
                }
                faults::Action::Partition { sides, secs } => {
                    for (k, side) in sides.iter().enumerate() {
                        let others: Vec<&str> =
                            sides.iter().enumerate().filter(|(j, _)| *j != k).flat_map(|(_, s)| s.iter().map(|p| st.v[*p].peer_id.as_str())).collect();
                        for p in side {
                            if let Some(ctl) = &st.v[*p].ctl {
                                let _ = ctl.send(Ctl::Line(format!("block {}", others.join(" ")))).await;
                            }
                        }
                    }
                    schedule.push((faults::Scheduled { at: faults::At::Secs(now + secs), action: faults::Action::Heal }, format!("heal ({spec})")));
                    say(&bar, format!("fault: {spec} at {now:.1} s (round {furthest})"));
                }
                faults::Action::Heal => {
                    for c in st.v.iter().filter_map(|n| n.ctl.as_ref()) {
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
        let any_running = st.v[..n_nodes].iter().any(|n| n.running);
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
                    let from = st.v[e.node].stderr_from;
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
                    if r + 1 > st.furthest() {
                        progress.push((t, r + 1));
                    }
                    st.v[i].rounds = r + 1;
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
                if addr.starts_with("/ip4/127.0.0.1") || st.v[i].addr.is_none() {
                    st.v[i].addr = Some(addr);
                }
            }
            NodeLine::PeerId(i, id) => st.v[i].peer_id = id,
            NodeLine::Died(i, peer) => obs.push(faults::Obs::Died { t, node: i, peer }),
            NodeLine::Ready(i) => obs.push(faults::Obs::Ready { t, node: i }),
        }
        let shown = if ps { &st.v[a.peers..n_nodes] } else { &st.v[..n_nodes] };
        let min = shown.iter().map(|n| n.rounds).min().unwrap_or(0);
        let max = shown.iter().map(|n| n.rounds).max().unwrap_or(0);
        bar.set_message(format!(
            "rounds {min}..{max}, {} of {} {} running{}",
            st.v[..n_nodes].iter().filter(|n| n.running).count(),
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
    for n in &st.v {
        if let (Some(c), true) = (&n.ctl, n.running) {
            let _ = c.send(if cut.is_some() { Ctl::Terminate } else { Ctl::Stop }).await;
        }
    }
    let stop_deadline = Instant::now() + STOP_WAIT + TERM_GRACE + Duration::from_secs(5);
    let mut forced = false;
    while st.any_running() && Instant::now() < stop_deadline {
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
                for c in st.v.iter().filter_map(|n| n.ctl.as_ref()) {
                    let _ = c.send(Ctl::Kill).await;
                }
            }
        }
    }
    drop(tx);
    let down_at_end: Vec<bool> = st.v[..n_nodes].iter().map(|n| n.killed).collect();
    let ids: Vec<String> = st.v.iter().map(|n| n.peer_id.clone()).collect();
    let exits: Vec<Option<Option<i32>>> = st.v.iter().map(|n| n.exit).collect();
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
        &exits,
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
    report.scale = crate::scale::summarize(&report.peer_reports);
    if a.ideal && cut.is_none() {
        // After the run, alone on the machine: the swarm's round samples at one process's rate.
        let samples: Vec<f64> = report.peer_reports.iter().flat_map(|p| p.rounds_log.as_array().cloned().unwrap_or_default()).filter_map(|r| r["samples"].as_f64()).collect();
        let per_round = if samples.is_empty() { 0.0 } else { let mut v = samples; v.sort_by(f64::total_cmp); v[v.len() / 2] };
        match crate::scale::single_process_rate(&bin, &a.node_args, &a.out.join("ideal"), (per_round as usize * 8).max(1024)) {
            Ok(rate) => {
                let ideal = per_round / rate * 1000.0;
                report.scale.single_process_samples_per_s = Some(rate);
                report.scale.ideal_round_ms = Some(ideal);
                report.scale.efficiency = (report.scale.round_ms_median > 0.0).then(|| ideal / report.scale.round_ms_median);
            }
            Err(e) => report.problems.push(format!("--ideal: {e:#}")),
        }
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

