//! A whole run of [`PeerCore`]s in one process: an in-memory network (gossip
//! to subscribers over connected links, requests answered by the target
//! core), a fake clock, and a stand-in for the trainer (a small deterministic
//! gradient per peer, round and batch; SGD on a 16-value model; the state in
//! the real encoding). Kills, revivals and partitions are scripted; every
//! action of every core goes into a trace, so that two runs of the same seed
//! can be compared.

use super::core::*;
use crate::config::{run_spec, P2pConfig, TrainConfig};
use crate::fetch::Fetched;
use crate::store::chunks;
use crate::train::{aggregate, digest_of, max_round_samples, Convergence, Updated};
use libp2p::gossipsub::MessageId;
use libp2p::{identity, Multiaddr, PeerId};
use p2pml_lambda_grad::Evaluation;
use p2pml_proto::wire::{Request, Response};
use p2pml_proto::{Aggregation, Compression};
use std::collections::{BTreeMap, BTreeSet};

/// The stand-in model's parameter count (small: every gradient goes inline).
pub(crate) const NUMEL: usize = 16;

/// A fault at a time: kill or revive a node, cut the network into groups or heal it.
#[derive(Clone, Debug)]
pub(crate) enum Fault {
    Kill(usize),
    Revive(usize),
    Partition(Vec<Vec<usize>>),
    Heal,
}

/// What one node is: its core and the stand-in trainer's state.
struct Node {
    core: PeerCore,
    params: Vec<f32>,
    lr: f64,
    steps: u64,
    /// Bumped at each revival: events for an earlier life are dropped.
    life: u64,
    done: bool,
}

enum Ev {
    Input(usize, Input),
    Fault(Fault),
}

pub(crate) struct Sim {
    pub(crate) now: u64,
    seed: u64,
    cfg: TrainConfig,
    p2p: P2pConfig,
    ids: Vec<PeerId>,
    nodes: Vec<Option<Node>>,
    lives: Vec<u64>,
    incarnations: Vec<u64>,
    queue: BTreeMap<(u64, u64), (u64, Ev)>,
    seq: u64,
    links: BTreeSet<(usize, usize)>,
    /// Each node's group while partitioned.
    groups: Option<Vec<usize>>,
    subs: Vec<BTreeSet<String>>,
    /// Every action of every core, in order, with the time and the node.
    pub(crate) trace: blake3::Hasher,
    pub(crate) actions: u64,
    pub(crate) rounds_done: BTreeMap<usize, u64>,
    /// Shards aggregated by their owners (sharded exchange).
    pub(crate) shards_aggregated: u64,
    msg: u64,
    n_train: usize,
    val_all: Vec<usize>,
}

fn peer(i: usize) -> PeerId {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    bytes[31] = 0x51;
    identity::Keypair::ed25519_from_bytes(&mut bytes).expect("a key").public().to_peer_id()
}

/// A deterministic value in [0, 1) from the inputs.
fn noise(parts: &[u64]) -> f64 {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(&p.to_le_bytes());
    }
    let b = h.finalize();
    u64::from_le_bytes(b.as_bytes()[..8].try_into().expect("8 bytes")) as f64 / u64::MAX as f64
}

impl Sim {
    /// `n` nodes exchanging gradients as `exchange` says; node 0 founds the
    /// run, the others bootstrap from it.
    pub(crate) fn with_exchange(n: usize, seed: u64, epochs: u64, samples_per_peer: usize, exchange: p2pml_proto::Exchange) -> Sim {
        let cfg = TrainConfig { epochs, batch_size: 4, val_size: 40, seed, ..TrainConfig::default() };
        let p2p = P2pConfig {
            peers: n,
            min_peers: n / 2 + 1,
            batches_per_round: 1,
            compression: Compression::None,
            heartbeat_ms: 250,
            failure_timeout_ms: 2000,
            checkpoint_every: 0,
            start_grace_ms: 2000,
            metrics_addr: None,
            exchange,
            ..P2pConfig::default()
        };
        let n_train = samples_per_peer * n + cfg.val_size;
        let val_all = (n_train - cfg.val_size..n_train).collect();
        let mut sim = Sim {
            now: 0,
            seed,
            cfg,
            p2p,
            ids: (0..n).map(peer).collect(),
            nodes: (0..n).map(|_| None).collect(),
            lives: vec![0; n],
            incarnations: vec![0; n],
            queue: BTreeMap::new(),
            seq: 0,
            links: BTreeSet::new(),
            groups: None,
            subs: vec![BTreeSet::new(); n],
            trace: blake3::Hasher::new(),
            actions: 0,
            rounds_done: BTreeMap::new(),
            shards_aggregated: 0,
            msg: 0,
            n_train,
            val_all,
        };
        for i in 0..n {
            sim.start_node(i);
        }
        sim
    }

    fn settings(&self, i: usize) -> PeerSettings {
        let bootstrap = if i == 0 { vec![] } else { vec![(self.ids[0], addr(0))] };
        PeerSettings {
            cfg: self.cfg.clone(),
            p2p: self.p2p.clone(),
            spec: run_spec(&self.cfg, &self.p2p),
            me: self.ids[i],
            incarnation: self.incarnations[i],
            boot: 1_000_000 + self.now + i as u64,
            n_train: self.n_train,
            val_all: self.val_all.clone(),
            numel: NUMEL,
            compression: Compression::None,
            lr: 0.1,
            bootstrap,
            known: BTreeMap::new(),
            tier: false,
        }
    }

    fn start_node(&mut self, i: usize) {
        self.lives[i] += 1;
        self.incarnations[i] += 1;
        let mut core = PeerCore::new(self.settings(i), Convergence::new(&self.p2p), None);
        let actions = core.start(self.now, vec![addr(i).to_string()]);
        let params = (0..NUMEL).map(|k| (k as f32 * 0.1).sin()).collect();
        self.nodes[i] = Some(Node { core, params, lr: 0.1, steps: 0, life: self.lives[i], done: false });
        self.subs[i].clear();
        self.execute(i, actions);
    }

    /// Schedules `f` at `at_ms`.
    pub(crate) fn fault(&mut self, at_ms: u64, f: Fault) {
        self.push(at_ms, u64::MAX, Ev::Fault(f));
    }

    fn push(&mut self, at: u64, life: u64, ev: Ev) {
        self.seq += 1;
        self.queue.insert((at, self.seq), (life, ev));
    }

    /// An input for node `i` after `delay` ms (dropped if `i` dies first).
    fn input(&mut self, i: usize, delay: u64, input: Input) {
        let life = self.lives[i];
        self.push(self.now + delay, life, Ev::Input(i, input));
    }

    fn latency(&self, a: usize, b: usize) -> u64 {
        2 + (noise(&[self.seed, a as u64, b as u64, self.seq]) * 8.0) as u64
    }

    fn alive(&self, i: usize) -> bool {
        self.nodes[i].as_ref().is_some_and(|n| !n.done)
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        a != b && self.alive(a) && self.alive(b) && self.groups.as_ref().is_none_or(|g| g[a] == g[b])
    }

    fn linked(&self, a: usize, b: usize) -> bool {
        self.links.contains(&(a.min(b), a.max(b)))
    }

    fn index(&self, p: &PeerId) -> Option<usize> {
        self.ids.iter().position(|x| x == p)
    }

    /// Runs until every live node is done or `until_ms`; returns whether all finished.
    pub(crate) fn run(&mut self, until_ms: u64) -> bool {
        while let Some(((at, _), _)) = self.queue.first_key_value() {
            if *at > until_ms {
                break;
            }
            let ((at, _), (life, ev)) = self.queue.pop_first().expect("an event");
            self.now = at;
            match ev {
                Ev::Fault(f) => self.apply(f),
                Ev::Input(i, input) => {
                    if life != self.lives[i] || !self.alive(i) {
                        continue;
                    }
                    let actions = self.nodes[i].as_mut().expect("alive").core.on_input(at, input);
                    self.execute(i, actions);
                }
            }
            if self.nodes.iter().flatten().all(|n| n.done) {
                return true;
            }
        }
        false
    }

    fn apply(&mut self, f: Fault) {
        self.trace.update(format!("{} fault {f:?}\n", self.now).as_bytes());
        match f {
            Fault::Kill(i) => {
                self.nodes[i] = None;
                self.lives[i] += 1;
                self.cut(|a, b| a == i || b == i);
            }
            Fault::Revive(i) => self.start_node(i),
            Fault::Partition(groups) => {
                let mut g = vec![0; self.ids.len()];
                for (k, members) in groups.iter().enumerate() {
                    for m in members {
                        g[*m] = k;
                    }
                }
                self.groups = Some(g.clone());
                self.cut(|a, b| g[a] != g[b]);
            }
            Fault::Heal => self.groups = None,
        }
    }

    /// Closes the links `which` selects: both ends hear of it.
    fn cut(&mut self, which: impl Fn(usize, usize) -> bool) {
        let gone: Vec<(usize, usize)> = self.links.iter().copied().filter(|(a, b)| which(*a, *b)).collect();
        for (a, b) in gone {
            self.links.remove(&(a, b));
            for (x, y) in [(a, b), (b, a)] {
                if self.alive(x) {
                    self.input(x, 1, Input::Disconnected(self.ids[y]));
                }
            }
        }
    }

    /// Answers `req` from node `to` for node `from` (None: unreachable or unanswered).
    fn ask(&mut self, from: usize, to: usize, req: Request) -> Option<Response> {
        if !self.reachable(from, to) {
            return None;
        }
        self.msg += 1;
        let id = self.msg;
        let actions = self.nodes[to].as_mut().expect("alive").core.on_input(self.now, Input::Request { id, peer: self.ids[from], request: req });
        let mut answer = None;
        let mut rest = Vec::new();
        for a in actions {
            match a {
                Action::Respond { id: rid, response } if rid == id => answer = Some(response),
                other => rest.push(other),
            }
        }
        self.execute(to, rest);
        answer
    }

    fn execute(&mut self, i: usize, actions: Vec<Action>) {
        for a in actions {
            self.actions += 1;
            self.trace.update(format!("{} {i} {a:?}\n", self.now).as_bytes());
            self.act(i, a);
        }
    }

    fn act(&mut self, i: usize, a: Action) {
        let me = self.ids[i];
        match a {
            Action::Publish { topic, data, .. } => {
                // Gossip floods the topic's subscribers over live links, one hop's
                // latency at a time, each hearing it once from the first to forward it.
                self.msg += 1;
                let id = MessageId::new(&self.msg.to_le_bytes());
                let mut reached = BTreeMap::from([(i, 0u64)]);
                let mut frontier = vec![i];
                while let Some(k) = frontier.pop() {
                    for j in 0..self.ids.len() {
                        if reached.contains_key(&j) || !self.reachable(k, j) || !self.linked(k, j) || !self.subs[j].contains(&topic) {
                            continue;
                        }
                        let at = reached[&k] + self.latency(k, j);
                        reached.insert(j, at);
                        frontier.push(j);
                        let input = Input::Gossip { id: id.clone(), propagated_by: self.ids[k], author: me, data: data.clone() };
                        self.input(j, at, input);
                    }
                }
            }
            Action::Subscribe(t) => {
                self.subs[i].insert(t);
            }
            Action::Unsubscribe(t) => {
                self.subs[i].remove(&t);
            }
            Action::Dial { peer, .. } => {
                let Some(j) = self.index(&peer) else { return };
                if self.reachable(i, j) && !self.linked(i, j) {
                    self.links.insert((i.min(j), i.max(j)));
                    let d = self.latency(i, j);
                    self.input(i, d, Input::Connected(peer));
                    self.input(j, d, Input::Connected(me));
                } else if !self.reachable(i, j) {
                    self.input(i, 5, Input::DialFailed { error: format!("{peer} unreachable") });
                }
            }
            Action::Disconnect { peer, after_ms } => {
                if let Some(j) = self.index(&peer) {
                    let _ = after_ms;
                    self.cut(|a, b| (a, b) == (i.min(j), i.max(j)));
                }
            }
            Action::Hello { peer } => {
                let Some(j) = self.index(&peer) else { return };
                let spec = run_spec(&self.cfg, &self.p2p);
                let result = self.ask(i, j, Request::Hello { spec }).ok_or_else(|| "unreachable".to_string());
                let d = 2 * self.latency(i, j);
                self.input(i, d, Input::HelloAnswer { peer, result });
            }
            Action::Fetch { round, owner, part, sources, len, digest } => {
                let result = self.fetch(i, &sources, owner, round, part, len, digest);
                self.input(i, 10, Input::Fetched(Fetched { round, owner, part, result }));
            }
            Action::Recover { round, owner, sources } => {
                let mut announce = p2pml_proto::wire::Announce::missing(round);
                for s in sources {
                    let Some(j) = self.index(&s) else { continue };
                    if let Some(Response::Announcement(a)) = self.ask(i, j, Request::Announcement { owner: owner.to_bytes(), round }) {
                        announce = *a;
                        break;
                    }
                }
                self.input(i, 20, Input::Recovered { owner, announce });
            }
            Action::NetInfo => self.input(i, 1, Input::NetInfo { scores: vec![], addrs: vec![addr(i).to_string()] }),
            Action::Compute(job) => {
                let node = self.nodes[i].as_ref().expect("alive");
                let batches = &job.epoch_batches[job.batch_ids.clone()];
                let samples: u64 = batches.iter().map(|b| b.len() as u64).sum();
                // The loss is the distance to a target; each batch adds its own noise.
                let mut grad = vec![0f32; NUMEL];
                let mut loss = 0.0;
                for b in batches {
                    for (k, g) in grad.iter_mut().enumerate() {
                        let target = (k as f32 * 0.37).cos();
                        let d = node.params[k] - target;
                        let wobble = noise(&[self.seed, b[0] as u64, k as u64]) as f32 - 0.5;
                        *g += (d + 0.1 * wobble) * b.len() as f32;
                        loss += (d * d) as f64 * b.len() as f64;
                    }
                }
                let (blob, parts) = if job.shards.is_empty() {
                    (p2pml_proto::encode_gradient(&grad, &Compression::None, job.seed).expect("f32 encodes"), Vec::new())
                } else {
                    (Vec::new(), crate::train::encode_own_shards(&mut grad, samples, &Compression::None, job.seed, None, job.round, &job.shards).expect("f32 encodes"))
                };
                let g = OwnGradient { blob, parts, samples, loss_sum: loss, compute_secs: 0.05, upload_secs: 0.0, encode_secs: 0.0 };
                self.input(i, 50, Input::Computed { round: job.round, result: Ok(g) });
            }
            Action::Aggregate { round, inputs } => {
                let most = max_round_samples(&self.p2p, self.cfg.batch_size);
                let (grad, samples, loss, _, _) = aggregate(&inputs, &Compression::None, NUMEL, &Aggregation::Mean, most);
                self.input(i, 3, Input::Aggregated { round, grad, samples, loss, decode_secs: 0.0, aggregate_secs: 0.0 });
            }
            Action::AggregateShard { round, shard, len, seed, inputs } => {
                self.shards_aggregated += 1;
                let most = max_round_samples(&self.p2p, self.cfg.batch_size);
                // The stand-in's times are fixed (the trace must not depend on the host's clock).
                let result = crate::train::aggregate_shard(&inputs, &Compression::None, len, &Aggregation::Mean, most, seed)
                    .map(|a| crate::train::ShardAggregate { decode_secs: 0.0, aggregate_secs: 0.0, encode_secs: 0.0, ..a });
                self.input(i, 2, Input::ShardAggregated { round, shard, result });
            }
            Action::Assemble { round, parts, samples, loss } => {
                let (grad, _) = crate::train::assemble(&parts, &Compression::None, NUMEL).expect("the aggregates decode");
                self.input(i, 1, Input::Aggregated { round, grad, samples, loss, decode_secs: 0.0, aggregate_secs: 0.0 });
            }
            Action::Update(job) => {
                let node = self.nodes[i].as_mut().expect("alive");
                if job.samples > 0 {
                    for (p, g) in node.params.iter_mut().zip(&job.grad) {
                        *p -= node.lr as f32 * g;
                    }
                    node.steps += 1;
                }
                let h = job.header(node.lr, node.steps, NUMEL as u64, 0);
                let state = p2pml_proto::encode_state(&h, &node.params, &[]);
                let digest = digest_of(&node.params);
                self.input(i, 5, Input::Updated { round: job.round, updated: Updated { digest, state, params: None } });
            }
            Action::Evaluate { epoch, val } => {
                let node = self.nodes[i].as_ref().expect("alive");
                let loss = node.params.iter().enumerate().map(|(k, p)| (p - (k as f32 * 0.37).cos()).powi(2) as f64).sum::<f64>();
                let e = |samples| Evaluation { loss, accuracy: 1.0 / (1.0 + loss), samples };
                self.input(i, 20, Input::Evaluated { epoch, val: (!val.is_empty()).then(|| e(val.len())), test: e(100) });
            }
            Action::SetLr(lr) => self.nodes[i].as_mut().expect("alive").lr = lr,
            Action::Sync { peer, min_round } => {
                let result = match self.index(&peer) {
                    Some(j) => self.sync(i, j, min_round),
                    None => Err("unknown peer".into()),
                };
                self.input(i, 30, Input::Synced { peer, result });
            }
            Action::Round(r) => {
                *self.rounds_done.entry(i).or_default() += 1;
                let _ = r;
            }
            Action::FinalDigest => {
                let d = digest_of(&self.nodes[i].as_ref().expect("alive").params);
                self.input(i, 1, Input::FinalDigest(d));
            }
            Action::Done => self.nodes[i].as_mut().expect("alive").done = true,
            Action::Fail(e) => panic!("node {i} failed at {} ms: {e}", self.now),
            Action::Verdict { .. }
            | Action::Respond { .. }
            | Action::Drop { .. }
            | Action::Checkpoint { .. }
            | Action::NoteIncarnation(_)
            | Action::Ready { .. }
            | Action::RoundDigest(_)
            | Action::Epoch { .. }
            | Action::Validation { .. }
            | Action::Membership { .. }
            | Action::Deadline { .. }
            | Action::Gauges { .. }
            | Action::Costs { .. } => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn fetch(&mut self, i: usize, sources: &[PeerId], owner: PeerId, round: u64, part: Option<p2pml_proto::wire::Part>, len: u64, digest: [u8; 32]) -> Result<Vec<u8>, String> {
        for s in sources {
            let Some(j) = self.index(s) else { continue };
            let mut blob = Vec::new();
            for index in 0..chunks(len) {
                match self.ask(i, j, Request::Chunk { owner: owner.to_bytes(), round, index, part }) {
                    Some(Response::Chunk { data, .. }) => blob.extend_from_slice(&data),
                    _ => break,
                }
            }
            if *blake3::hash(&blob).as_bytes() == digest {
                return Ok(blob);
            }
        }
        Err("no source had it".into())
    }

    /// A state transfer from `j`, loaded into `i`'s stand-in trainer.
    fn sync(&mut self, i: usize, j: usize, min_round: u64) -> Result<SyncedState, String> {
        let Some(Response::State { round, total_len, data, .. }) = self.ask(i, j, Request::State { round: min_round, index: 0 }) else {
            return Err("no state".into());
        };
        if round < min_round {
            return Err(format!("state of round {round} < {min_round}"));
        }
        let mut bytes = data.into_vec();
        for index in 1..chunks(total_len) {
            match self.ask(i, j, Request::State { round, index }) {
                Some(Response::State { data, .. }) => bytes.extend_from_slice(&data),
                other => return Err(format!("chunk {index}: {other:?}")),
            }
        }
        let (header, params, _) = p2pml_proto::decode_state(&bytes, NUMEL as u64).map_err(|e| e.to_string())?;
        let node = self.nodes[i].as_mut().expect("alive");
        (node.params, node.lr, node.steps) = (params, header.lr, header.opt_steps);
        Ok(SyncedState { header, digest: digest_of(&node.params), bytes: std::sync::Arc::new(bytes) })
    }

    /// Ticks every live core at its deadline (the driver's sleep).
    pub(crate) fn tick_all(&mut self) {
        for i in 0..self.ids.len() {
            if let Some(n) = self.nodes[i].as_ref().filter(|n| !n.done) {
                let at = n.core.next_deadline().max(self.now + 1);
                let life = n.life;
                self.push(at, life, Ev::Input(i, Input::Tick));
            }
        }
    }

    /// Runs to `until_ms`, ticking each core at its deadline; true if every node finished.
    pub(crate) fn run_ticked(&mut self, until_ms: u64) -> bool {
        while self.now < until_ms {
            self.tick_all();
            let step = (self.now + 50).min(until_ms);
            if self.run(step) {
                return true;
            }
            self.now = step;
        }
        false
    }

    /// Each node's phase and round, for a failing assertion.
    pub(crate) fn status(&self) -> String {
        let mut out = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            match n {
                Some(n) => out += &format!("\n  node {i}: {:?} round {} (done {}, rounds {})", n.core.phase(), n.core.round(), n.done, self.rounds_done.get(&i).unwrap_or(&0)),
                None => out += &format!("\n  node {i}: dead"),
            }
        }
        out
    }

    /// The final digests of the nodes alive now.
    pub(crate) fn digests(&self) -> Vec<(usize, u64, Option<[u8; 32]>)> {
        self.nodes.iter().enumerate().filter_map(|(i, n)| n.as_ref().map(|n| (i, n.core.round(), n.core.last_digest()))).collect()
    }
}

fn addr(i: usize) -> Multiaddr {
    format!("/memory/{}", i + 1).parse().expect("a memory address")
}

/// 8 cores through a kill of node 5 at `kill_ms`, its revival at 6 s, a
/// partition {0..5}|{6,7} at 9 s and a heal at 13 s.
fn faulted_run(seed: u64, exchange: p2pml_proto::Exchange, kill_ms: u64) -> (bool, Sim) {
    let mut sim = Sim::with_exchange(8, seed, 3, 400, exchange);
    sim.fault(kill_ms, Fault::Kill(5));
    sim.fault(6_000, Fault::Revive(5));
    sim.fault(9_000, Fault::Partition(vec![vec![0, 1, 2, 3, 4, 5], vec![6, 7]]));
    sim.fault(13_000, Fault::Heal);
    let finished = sim.run_ticked(600_000);
    (finished, sim)
}

/// Every node finished on node 0's round and digest, after some hundreds of rounds: the rounds.
fn assert_all_agree(finished: bool, a: &Sim) -> u64 {
    assert!(finished, "every node finished by {} ms:{}", a.now, a.status());
    let d = a.digests();
    let rounds = d[0].1;
    assert!(rounds >= 250, "some hundreds of rounds: {rounds}");
    for (i, r, digest) in &d {
        assert_eq!((*r, *digest), (rounds, d[0].2), "node {i} ends on node 0's round and parameters");
    }
    rounds
}

#[test]
fn eight_cores_agree_through_a_kill_a_revival_and_a_partition_and_the_same_seed_gives_the_same_trace() {
    let run = |seed| faulted_run(seed, p2pml_proto::Exchange::AllToAll, 3_000);
    let (finished, a) = run(7);
    let rounds = assert_all_agree(finished, &a);
    assert!(a.now > 13_000, "the run outlasts the faults: it ended at {} ms", a.now);
    let syncs: Vec<u64> = a.nodes.iter().flatten().map(|n| n.core.state_syncs).collect();
    assert!(syncs[5] >= 1, "the revived node joined by state sync: {syncs:?}");
    assert!(syncs[6] >= 1 && syncs[7] >= 1, "the minority caught up after the heal: {syncs:?}");
    assert!(a.rounds_done[&6] < rounds, "the minority stalled while cut off: {:?}", a.rounds_done);
    let (_, b) = run(7);
    assert_eq!(a.trace.finalize(), b.trace.finalize(), "the same seed gives the same trace");
    assert_eq!(a.actions, b.actions);
    let (_, c) = run(8);
    assert_ne!(a.trace.finalize(), c.trace.finalize(), "the trace is the run's: another seed, another trace");
}

/// The sharded exchange's core logic over the same in-memory network: with
/// plain f32 gradients the shards' means are the whole mean's arithmetic,
/// coordinate by coordinate, so a fault-free sharded run ends on the very
/// parameters of an all-to-all run; through a kill of a shard owner, a
/// revival and a partition, every core still ends on one digest.
#[test]
fn sharded_cores_match_all_to_all_bit_for_bit_and_agree_through_an_owner_killed_mid_round() {
    use p2pml_proto::Exchange;
    let plain = |exchange| {
        let mut sim = Sim::with_exchange(4, 3, 2, 200, exchange);
        assert!(sim.run_ticked(600_000), "finished:{}", sim.status());
        (sim.digests(), sim.shards_aggregated)
    };
    let ((a, none), (s, shards)) = (plain(Exchange::AllToAll), plain(Exchange::Sharded));
    assert!(a[0].1 >= 90, "some rounds: {a:?}");
    assert_eq!(none, 0);
    assert_eq!(shards, 4 * a[0].1, "each of 4 owners aggregated its shard of every round");
    assert_eq!(a, s, "sharded f32 means are the all-to-all means");

    // 3,020 ms: inside a round (rounds take ~70 ms here); node 5 owns a shard of every round.
    let run = |seed| faulted_run(seed, Exchange::Sharded, 3_020);
    let (finished, a) = run(7);
    let rounds = assert_all_agree(finished, &a);
    let syncs: Vec<u64> = a.nodes.iter().flatten().map(|n| n.core.state_syncs).collect();
    assert!(syncs[5] >= 1, "the revived node joined by state sync: {syncs:?}");
    assert!(a.rounds_done[&6] < rounds, "the minority stalled while cut off: {:?}", a.rounds_done);
    let reassigned: u64 = a.nodes.iter().flatten().map(|n| n.core.shard_reassignments).sum();
    eprintln!("sharded sim: {rounds} rounds, {} shards aggregated, {reassigned} reassigned on a missed ticket, syncs {syncs:?}", a.shards_aggregated);
    let (_, b) = run(7);
    assert_eq!(a.trace.finalize(), b.trace.finalize(), "the same seed gives the same trace");
}
