//! The parameter server as a sans-I/O core: `on_input(now_ms, input)` returns
//! the actions to take, `next_deadline()` says when to call it again with a
//! tick. No await, clock or channel here: the driver ([`super::server`]) owns
//! the network, the trainer thread and the checkpoint writer, and feeds their
//! events and results in. Given the same inputs at the same times, the core
//! returns the same actions.
//!
//! A round: the server opens it (workers' polls for it are answered), takes
//! each active worker's push (inline, or fetched from the worker), and when the
//! barrier over the live workers of the epoch releases, asks for the
//! aggregation, then for the update; the new parameters open the next round.
//! At an epoch's end it asks for an evaluation, steps the plateau and early
//! stopping, and cuts the next epoch over the workers live then.

use crate::checkpoint::{CheckpointMeta, MemberRecord};
use crate::config::{P2pConfig, TrainConfig};
use crate::report::{RoundDone, StageTimes};
use crate::round::{Barrier, Change, RoundState};
use crate::store::Store;
use crate::train::{ids, peer_ids, Convergence, EpochInfo, Schedule, UpdateJob, Updated};
use libp2p::PeerId;
use p2pml_lambda_grad::Evaluation;
use p2pml_proto::line::MemberEvent;
use p2pml_proto::wire::{self, Announce, Digest, PsWork, Request, Response, RunSpec};
use p2pml_proto::{Compression, StateHeader};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// How long the server holds a poll for a round it has not reached.
pub(crate) const POLL_HOLD_MS: u64 = 2000;
/// After the run, how long the server waits for its workers to hear so and hang up.
pub(crate) const FINISH_WAIT_MS: u64 = 10_000;

/// The driver's handle on a request it must answer (its response channel).
pub(crate) type RequestId = u64;

/// What happens to the server.
pub(crate) enum Input {
    Connected(PeerId),
    Disconnected(PeerId),
    Request { id: RequestId, peer: PeerId, request: Request },
    /// A pushed gradient fetched from its worker (or why not).
    Fetched { round: u64, peer: PeerId, result: Result<Vec<u8>, String> },
    /// The round's aggregation: (gradient, samples, loss, decode s, aggregate s).
    Aggregated { round: u64, grad: Vec<f32>, samples: u64, loss: f64, decode_secs: f64, aggregate_secs: f64 },
    Updated(Updated),
    Evaluated { val: Evaluation, test: Evaluation },
    Tick,
}

/// What the driver does for the core, without awaiting anything in its loop.
#[derive(Debug)]
pub(crate) enum Action {
    Respond { id: RequestId, response: Response },
    /// Fetch `peer`'s gradient of `round` (`len` bytes) from `peer`.
    Fetch { round: u64, peer: PeerId, len: u64 },
    /// Aggregate these (samples, loss, blob) inputs, in this order.
    Aggregate { round: u64, inputs: Vec<(u64, f64, Arc<Vec<u8>>)> },
    Update(Box<UpdateJob>),
    /// Evaluate the validation and the test set.
    Evaluate,
    SetLr(f64),
    /// Write a checkpoint (the driver stamps the wall-clock time).
    Checkpoint { meta: CheckpointMeta, state: Arc<Vec<u8>> },
    /// The server holds the run's state and takes gradients (the `ready` line).
    Ready { round: u64, epoch: u64 },
    Round(Box<RoundDone>),
    Epoch { epoch: u64, val: Evaluation, test: Evaluation, lr: f64 },
    Membership { peer: PeerId, event: MemberEvent, incarnation: u64 },
    /// A push was refused or a gradient dropped (counted, metered).
    InvalidPush,
    /// The run is over and the workers have heard it: stop.
    Done,
    /// The run cannot go on (one line that says why).
    Fail(String),
}

/// Where the server is in the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Waiting for --peers workers (or --min-peers and the grace).
    Starting,
    /// Taking gradients for the current round.
    Open,
    /// The round's barrier released: aggregating.
    Aggregating,
    /// Applying the aggregated gradient.
    Updating,
    /// An epoch ended: evaluating.
    Evaluating,
    /// The run is over: telling the workers, until `until_ms`.
    Finishing { until_ms: u64 },
    Done,
}

/// A poll held until its round comes (or `until_ms`).
struct HeldPoll {
    id: RequestId,
    peer: PeerId,
    round: u64,
    until_ms: u64,
}

/// The server's fixed settings.
pub(crate) struct ServerSettings {
    pub(crate) cfg: TrainConfig,
    pub(crate) p2p: P2pConfig,
    pub(crate) spec: RunSpec,
    pub(crate) me: PeerId,
    pub(crate) incarnation: u64,
    pub(crate) n_train: usize,
    pub(crate) val_all: Vec<usize>,
    pub(crate) numel: usize,
    pub(crate) compression: Compression,
    pub(crate) lr: f64,
}

pub(crate) struct ServerCore {
    s: ServerSettings,
    run_id: String,
    phase: Phase,
    start: crate::peer::StartRule,
    rs: RoundState<PeerId>,
    store: Store,
    /// Workers whose Hello (same run configuration) was accepted.
    accepted: HashSet<PeerId>,
    round: u64,
    sched: Option<Schedule>,
    params_len: u64,
    params_digest: Digest,
    /// The parameters' digest (of their f32 values), for the report.
    last_digest: Digest,
    told_finished: HashSet<PeerId>,
    connected: HashSet<PeerId>,
    polls: Vec<HeldPoll>,
    /// This round's accepted pushes, by worker.
    pushes: HashMap<PeerId, Announce>,
    fetch_attempts: HashMap<PeerId, u32>,
    conv: Convergence,
    lr: f64,
    stopped_early: bool,
    /// A checkpoint to resume from: (its header), used when the run starts.
    resume: Option<StateHeader>,
    /// The initial parameters (published when the run starts).
    initial: Option<Vec<f32>>,
    next_tick_ms: u64,
    /// Round timing: when it opened, when its update was asked for.
    opened_ms: u64,
    stages: StageTimes,
    /// The released round's contributors, samples and summed loss.
    figures: (usize, u64, f64),
    update_asked_ms: u64,
    /// Why the run cannot go on (reported once, as [`Action::Fail`]).
    failed: Option<String>,
}

impl ServerCore {
    /// A server for `s`, with the model's initial (or restored) parameters and
    /// the checkpoint it resumes from, if any.
    pub(crate) fn new(s: ServerSettings, params: Vec<f32>, conv: Convergence, resume: Option<StateHeader>) -> Self {
        // The quorum counts the server too.
        let rs = RoundState::new(s.me, s.incarnation, s.p2p.min_peers + 1, s.p2p.failure_timeout_ms);
        let start = crate::peer::StartRule::new(s.p2p.peers, s.p2p.min_peers, s.p2p.start_grace_ms);
        let last_digest = crate::train::digest_of(&params);
        ServerCore {
            run_id: s.spec.run_id(),
            lr: s.lr,
            phase: Phase::Starting,
            start,
            rs,
            store: Store::default(),
            accepted: HashSet::new(),
            round: 0,
            sched: None,
            params_len: 0,
            params_digest: [0; 32],
            last_digest,
            told_finished: HashSet::new(),
            connected: HashSet::new(),
            polls: Vec::new(),
            pushes: HashMap::new(),
            fetch_attempts: HashMap::new(),
            conv,
            stopped_early: false,
            resume,
            initial: Some(params),
            next_tick_ms: 0,
            opened_ms: 0,
            stages: StageTimes::default(),
            figures: (0, 0, 0.0),
            update_asked_ms: 0,
            failed: None,
            s,
        }
    }

    pub(crate) fn phase(&self) -> Phase {
        self.phase
    }
    /// The round the server is at (the number of rounds run, once finished).
    pub(crate) fn round(&self) -> u64 {
        self.round
    }
    pub(crate) fn last_digest(&self) -> Digest {
        self.last_digest
    }
    pub(crate) fn stopped_early(&self) -> bool {
        self.stopped_early
    }

    /// When to tick next: the heartbeat interval, a held poll's expiry, the end of the finishing wait.
    pub(crate) fn next_deadline(&self) -> u64 {
        let mut d = self.next_tick_ms;
        for p in &self.polls {
            d = d.min(p.until_ms);
        }
        if let Phase::Finishing { until_ms } = self.phase {
            d = d.min(until_ms);
        }
        d
    }

    fn workers_live(&self) -> Vec<PeerId> {
        self.rs.live().into_iter().filter(|p| *p != self.s.me).collect()
    }

    /// Taking gradients for the current round: also while its barrier's
    /// aggregation and update run (a push then is too late to count; it is
    /// accepted and dropped with the round, as it always was).
    fn open(&self) -> bool {
        matches!(self.phase, Phase::Open | Phase::Aggregating | Phase::Updating)
    }
    fn finished(&self) -> bool {
        matches!(self.phase, Phase::Finishing { .. } | Phase::Done)
    }

    pub(crate) fn on_input(&mut self, now: u64, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Connected(p) => {
                self.connected.insert(p);
                self.rs.unsuspect(&p);
            }
            Input::Disconnected(p) => {
                self.connected.remove(&p);
                self.rs.suspect(&p, now);
            }
            Input::Request { id, peer, request } => self.on_request(now, id, peer, request, &mut out),
            Input::Fetched { round, peer, result } => self.on_fetched(round, peer, result, &mut out),
            Input::Aggregated { round, grad, samples, loss, decode_secs, aggregate_secs } if round == self.round => {
                self.stages.decode = decode_secs;
                self.stages.aggregate = aggregate_secs;
                self.ask_update(now, grad, samples, loss, &mut out);
            }
            Input::Aggregated { .. } => {}
            Input::Updated(u) => self.on_updated(now, u, &mut out),
            Input::Evaluated { val, test } => self.on_evaluated(now, val, test, &mut out),
            Input::Tick => {}
        }
        // After every input, as the old loop did after every event: the failure
        // detector, the start rule, the barrier, the held polls, the finish.
        if now >= self.next_tick_ms {
            self.next_tick_ms = now + self.s.p2p.heartbeat_ms;
        }
        for c in self.rs.tick(now) {
            self.on_change(c, &mut out);
        }
        crate::metrics::membership(self.connected.len(), self.rs.live().len());
        self.step(now, &mut out);
        self.answer_polls(now, &mut out);
        if let Some(why) = self.failed.take() {
            self.phase = Phase::Done;
            out.push(Action::Fail(why));
        }
        out
    }

    /// Moves the run on as far as the inputs so far allow.
    fn step(&mut self, now: u64, out: &mut Vec<Action>) {
        match self.phase {
            Phase::Starting if self.start.ready(self.workers_live().len(), now) => self.begin(now, out),
            Phase::Open => {
                if let Barrier::Release(c) = self.rs.barrier(self.round) {
                    self.stages.barrier_wait = now.saturating_sub(self.opened_ms) as f64 / 1e3;
                    let contributors: Vec<PeerId> = c.into_iter().filter(|p| *p != self.s.me).collect();
                    let inputs = contributors
                        .iter()
                        .filter_map(|p| {
                            let a = self.pushes.get(p)?;
                            let blob = self.store.get(self.round, p)?;
                            Some((a.samples, a.loss_sum, blob))
                        })
                        .collect();
                    self.figures = (contributors.len(), 0, 0.0);
                    self.phase = Phase::Aggregating;
                    out.push(Action::Aggregate { round: self.round, inputs });
                }
            }
            Phase::Finishing { until_ms } => {
                let all_told = self.workers_live().iter().all(|p| self.told_finished.contains(p));
                let hung_up = !self.told_finished.iter().any(|p| self.connected.contains(p));
                if now >= until_ms || (all_told && hung_up) {
                    self.phase = Phase::Done;
                    out.push(Action::Done);
                }
            }
            _ => {}
        }
    }

    /// The run starts (or resumes from the checkpoint).
    fn begin(&mut self, now: u64, out: &mut Vec<Action>) {
        let (cfg, p2p, me) = (&self.s.cfg, &self.s.p2p, self.s.me);
        let sched = match self.resume.take() {
            Some(h) => {
                tracing::info!("resuming the run from checkpoint round {}", h.round);
                self.round = h.round + 1;
                let sched = Schedule::new(cfg, p2p, self.s.n_train, &self.s.val_all, h.epoch, h.epoch_start, peer_ids(&h.epoch_members), me);
                let sched = match sched {
                    Ok(s) => s,
                    Err(e) => return self.fail(&e.to_string()),
                };
                self.rs.set_epoch_members(sched.members.clone());
                let active = peer_ids(&h.active);
                for m in &sched.members {
                    if !active.contains(m) {
                        self.rs.demote(m);
                    }
                }
                sched
            }
            None => match Schedule::new(cfg, p2p, self.s.n_train, &self.s.val_all, 0, 0, self.workers_live(), me) {
                Ok(s) => {
                    self.rs.set_epoch_members(s.members.clone());
                    s
                }
                Err(e) => return self.fail(&e.to_string()),
            },
        };
        out.push(Action::Ready { round: self.round, epoch: sched.epoch });
        self.sched = Some(sched);
        let params = self.initial.take().unwrap_or_default();
        self.set_params(&params);
        self.open_round(now);
    }

    /// A schedule that cannot be cut is a bug of the configuration's checks: stop.
    fn fail(&mut self, why: &str) {
        self.failed = Some(format!("cannot cut the epoch's schedule: {why}"));
    }

    fn open_round(&mut self, now: u64) {
        self.phase = Phase::Open;
        self.opened_ms = now;
        self.stages = StageTimes::default();
    }

    fn on_change(&mut self, c: Change<PeerId>, out: &mut Vec<Action>) {
        let (peer, event, incarnation) = match &c {
            Change::Joined(p) => (*p, MemberEvent::Joined, self.rs.members().get(p).map_or(0, |m| m.incarnation)),
            Change::Rejoined { peer, incarnation } => {
                tracing::info!("worker {peer} is back (incarnation {incarnation}); it trains again from the next epoch");
                (*peer, MemberEvent::Rejoined, *incarnation)
            }
            Change::Died(p) => {
                tracing::warn!("worker {p} declared dead (connection closed, or silent for {} ms)", self.s.p2p.failure_timeout_ms);
                (*p, MemberEvent::Died, self.rs.members().get(p).map_or(0, |m| m.incarnation))
            }
            Change::Refuted { .. } => return,
        };
        out.push(Action::Membership { peer, event, incarnation });
    }

    /// First-hand word from a worker. The server is the only judge of its
    /// workers' liveness, so a worker it buried that speaks again (it was slow,
    /// not dead) is back, as a new incarnation of the server's own numbering.
    fn heard(&mut self, peer: PeerId, incarnation: u64, now: u64, out: &mut Vec<Action>) {
        let incarnation = match self.rs.members().get(&peer) {
            Some(m) if !m.alive && m.incarnation >= incarnation => m.incarnation.saturating_add(1),
            Some(m) => incarnation.max(m.incarnation),
            None => incarnation,
        };
        if let Some(c) = self.rs.heard(peer, incarnation, now) {
            self.on_change(c, out);
        }
    }

    /// Whether a poll for `round` from `peer` has its answer now: the run is
    /// over, or the server takes gradients for that round, or for an earlier one
    /// that this worker has not pushed (it must compute it: the server restarted,
    /// or its push was lost).
    fn poll_ready(&self, peer: &PeerId, round: u64) -> bool {
        self.finished()
            || (self.open() && (self.round >= round || (self.rs.is_active(peer) && self.rs.is_alive(peer) && !self.pushes.contains_key(peer))))
    }

    /// The answer to a poll; `ready` is [`Self::poll_ready`]: if not, the worker
    /// is told to wait and ask again.
    fn work_for(&self, peer: &PeerId, ready: bool) -> PsWork {
        let (epoch, first_round, members) = match &self.sched {
            Some(s) => (s.epoch, s.first_round, ids(&s.members)),
            None => (0, 0, Vec::new()),
        };
        PsWork {
            round: self.round,
            epoch,
            first_round,
            members,
            active: self.rs.is_active(peer) && self.rs.is_alive(peer),
            params_len: self.params_len,
            params_digest: self.params_digest,
            finished: self.finished(),
            waiting: !ready,
        }
    }

    /// Publishes the parameters of the round about to start.
    fn set_params(&mut self, params: &[f32]) {
        match p2pml_proto::encode_f32(params) {
            Ok(bytes) => {
                self.params_len = bytes.len() as u64;
                self.params_digest = *blake3::hash(&bytes).as_bytes();
                self.store.set_params(self.round, Arc::new(bytes));
            }
            Err(e) => self.failed = Some(format!("the parameters are not finite ({e}); the run diverged: lower --lr")),
        }
    }

    fn on_request(&mut self, now: u64, id: RequestId, peer: PeerId, request: Request, out: &mut Vec<Action>) {
        let refuse = |why: &str| Response::PsAck { accepted: false, reason: Some(why.to_string()) };
        let respond = |response: Response| Action::Respond { id, response };
        match request {
            Request::Hello { .. } => {
                let answer = self.store.answer(&self.s.spec, peer, request);
                if matches!(answer, Response::Hello { accepted: true, .. }) {
                    self.accepted.insert(peer);
                }
                out.push(respond(answer));
            }
            Request::PsHeartbeat { .. } | Request::PsPoll { .. } | Request::PsPush(_) if !self.accepted.contains(&peer) => {
                out.push(respond(refuse("hello first: this server does not know you (it may have restarted)")));
            }
            Request::PsHeartbeat { incarnation } => {
                self.heard(peer, incarnation, now, out);
                out.push(respond(Response::PsAck { accepted: true, reason: None }));
            }
            Request::PsPoll { round, incarnation } => {
                self.heard(peer, incarnation, now, out);
                if self.poll_ready(&peer, round) {
                    if self.finished() {
                        self.told_finished.insert(peer);
                    }
                    out.push(respond(Response::PsWork(Box::new(self.work_for(&peer, true)))));
                } else {
                    self.polls.push(HeldPoll { id, peer, round, until_ms: now + POLL_HOLD_MS });
                }
            }
            Request::PsPush(a) => match self.check_push(&peer, &a) {
                Err(why) => {
                    out.push(Action::InvalidPush);
                    tracing::debug!("push from {peer} refused: {why}");
                    out.push(respond(refuse(&why)));
                }
                Ok(()) => {
                    out.push(respond(Response::PsAck { accepted: true, reason: None }));
                    self.take_push(peer, *a, out);
                }
            },
            other => out.push(respond(self.store.answer(&self.s.spec, peer, other))),
        }
    }

    fn check_push(&self, peer: &PeerId, a: &Announce) -> Result<(), String> {
        let epoch = self.sched.as_ref().map_or(0, |s| s.epoch);
        if a.run_id != self.run_id {
            return Err("another run".into());
        }
        if a.epoch != epoch || !a.loss_sum.is_finite() || a.loss_sum < 0.0 {
            return Err("epoch or loss out of range".into());
        }
        // A round covers at most --batches-per-round batches of --batch-size.
        if a.samples > (self.s.spec.batches_per_round * self.s.spec.batch_size) as u64 {
            return Err(format!("{} samples in one round", a.samples));
        }
        if a.round != self.round || !self.open() {
            return Err(format!("the server is at round {}, not {}", self.round, a.round));
        }
        if !(self.rs.is_active(peer) && self.rs.is_alive(peer)) {
            return Err("not a worker of this epoch's rounds (you join at the next epoch)".into());
        }
        if self.pushes.contains_key(peer) {
            return Err("already pushed for this round".into());
        }
        if a.len > wire::MAX_BLOB_BYTES {
            return Err(format!("gradient of {} bytes is too large", a.len));
        }
        if let Some(b) = &a.inline {
            if b.len() as u64 != a.len || *blake3::hash(b).as_bytes() != a.digest {
                return Err("inline gradient does not match its length and digest".into());
            }
        }
        Ok(())
    }

    /// Holds an accepted push: at once when inline, else after fetching it from the worker.
    fn take_push(&mut self, peer: PeerId, a: Announce, out: &mut Vec<Action>) {
        let (round, len, inline) = (a.round, a.len, a.inline.clone());
        self.pushes.insert(peer, a);
        match inline {
            Some(b) => self.hold(round, peer, b.into_vec(), out),
            None => self.fetch(round, peer, len, out),
        }
    }

    fn fetch(&mut self, round: u64, peer: PeerId, len: u64, out: &mut Vec<Action>) {
        *self.fetch_attempts.entry(peer).or_default() += 1;
        out.push(Action::Fetch { round, peer, len });
    }

    fn on_fetched(&mut self, round: u64, peer: PeerId, r: Result<Vec<u8>, String>, out: &mut Vec<Action>) {
        if round != self.round {
            return;
        }
        let Some(a) = self.pushes.get(&peer) else { return };
        match r {
            Ok(blob) if *blake3::hash(&blob).as_bytes() == a.digest => self.hold(round, peer, blob, out),
            Ok(_) => self.refuse_gradient(peer, "does not match its digest".into(), out),
            Err(e) => {
                let len = a.len;
                if self.fetch_attempts.get(&peer).copied().unwrap_or(0) < 3 && self.rs.is_alive(&peer) {
                    tracing::debug!("fetching {peer}'s gradient failed ({e}); again");
                    self.fetch(round, peer, len, out);
                } else {
                    tracing::warn!("cannot fetch {peer}'s gradient for round {round}: {e}");
                    self.pushes.remove(&peer);
                }
            }
        }
    }

    /// A worker whose gradient is invalid is not waited for again this epoch (a
    /// deterministic fault would otherwise repeat forever and stall the barrier).
    fn refuse_gradient(&mut self, peer: PeerId, why: String, out: &mut Vec<Action>) {
        out.push(Action::InvalidPush);
        tracing::warn!("gradient from {peer} {why}: dropped; the worker sits out the rest of the epoch");
        self.pushes.remove(&peer);
        self.rs.demote(&peer);
    }

    fn hold(&mut self, round: u64, peer: PeerId, blob: Vec<u8>, out: &mut Vec<Action>) {
        // The length must decode with the run's compression before it counts.
        if let Err(e) = p2pml_proto::decode_gradient(&blob, &self.s.compression, self.s.numel) {
            self.refuse_gradient(peer, format!("does not decode ({e})"), out);
            return;
        }
        self.store.insert(round, &peer, Arc::new(blob));
        self.rs.hold(round, peer);
    }

    fn ask_update(&mut self, now: u64, grad: Vec<f32>, samples: u64, loss: f64, out: &mut Vec<Action>) {
        let Some(sched) = &self.sched else { return };
        self.figures.1 = samples;
        self.figures.2 = loss;
        let (plateau, stopping) = self.conv.snapshot();
        let info = EpochInfo {
            first_round: sched.first_round,
            members: sched.members.clone(),
            active: self.rs.active_members(),
            next: Vec::new(),
            withheld: Vec::new(),
        };
        self.phase = Phase::Updating;
        self.update_asked_ms = now;
        self.stages.update = 0.0;
        let job = UpdateJob { grad, samples, perturb: false, round: self.round, epoch: sched.epoch, plateau, stopping, info, keep_params: true };
        out.push(Action::Update(Box::new(job)));
    }

    fn on_updated(&mut self, now: u64, u: Updated, out: &mut Vec<Action>) {
        if self.phase != Phase::Updating {
            return;
        }
        let Some(sched) = &self.sched else { return };
        let (round, epoch, epoch_end) = (self.round, sched.epoch, sched.first_round + sched.rounds);
        self.last_digest = u.digest;
        let p2p = &self.s.p2p;
        if p2p.checkpoint_every > 0 && (round + 1).is_multiple_of(p2p.checkpoint_every) {
            let meta = CheckpointMeta {
                run_id: self.run_id.clone(),
                round,
                epoch,
                incarnation: self.rs.incarnation(),
                written_unix_ms: 0,
                members: self
                    .rs
                    .members()
                    .iter()
                    .map(|(p, m)| MemberRecord { peer: p.to_bytes(), incarnation: m.incarnation, alive: m.alive, addrs: Vec::new() })
                    .collect(),
            };
            out.push(Action::Checkpoint { meta, state: Arc::new(u.state) });
        }
        self.stages.update = now.saturating_sub(self.update_asked_ms) as f64 / 1e3;
        let (contributors, samples, loss_total) = std::mem::take(&mut self.figures);
        out.push(Action::Round(Box::new(RoundDone {
            round,
            epoch,
            contributors,
            samples,
            loss_total,
            lr: self.lr,
            digest: u.digest,
            stages: std::mem::take(&mut self.stages),
        })));
        self.rs.prune(round.saturating_sub(4));
        self.store.prune(round.saturating_sub(4));
        self.pushes.clear();
        self.fetch_attempts.clear();
        self.round += 1;
        if let Some(p) = &u.params {
            self.set_params(p);
        }
        if self.finished() {
            return;
        }
        // After an epoch's last round the workers wait for the evaluation.
        if self.round >= epoch_end {
            self.phase = Phase::Evaluating;
            out.push(Action::Evaluate);
        } else {
            self.open_round(now);
        }
    }

    fn on_evaluated(&mut self, now: u64, val: Evaluation, test: Evaluation, out: &mut Vec<Action>) {
        if self.phase != Phase::Evaluating {
            return;
        }
        let (lr, stop) = self.conv.step(val.loss, self.lr);
        if let Some(m) = crate::metrics::get() {
            m.validation_loss.set(val.loss);
        }
        if lr != self.lr {
            tracing::info!("validation loss {:.4} has not improved: lr {} -> {lr}", val.loss, self.lr);
            self.lr = lr;
            out.push(Action::SetLr(lr));
        }
        let epoch = self.sched.as_ref().map_or(0, |s| s.epoch);
        out.push(Action::Epoch { epoch, val, test, lr: self.lr });
        if epoch + 1 >= self.s.cfg.epochs || stop {
            if stop {
                tracing::info!("early stopping: validation loss has not improved for {} epochs", self.s.p2p.early_stop_patience);
            }
            self.stopped_early = stop;
            // Tell every live worker that the run is over, and stay until they
            // have hung up (so that the answers are on the wire before we exit; bounded).
            self.phase = Phase::Finishing { until_ms: now + FINISH_WAIT_MS };
            return;
        }
        // The next epoch is cut over the workers live now.
        let (cfg, p2p) = (&self.s.cfg, &self.s.p2p);
        match Schedule::new(cfg, p2p, self.s.n_train, &self.s.val_all, epoch + 1, self.round, self.workers_live(), self.s.me) {
            Ok(s) => {
                self.rs.set_epoch_members(s.members.clone());
                self.sched = Some(s);
                self.open_round(now);
            }
            Err(e) => self.fail(&e.to_string()),
        }
    }

    /// Answers the polls that are due: the round they wait for has come, the
    /// run is over, or they have been held long enough.
    fn answer_polls(&mut self, now: u64, out: &mut Vec<Action>) {
        let polls = std::mem::take(&mut self.polls);
        for p in polls {
            let ready = self.poll_ready(&p.peer, p.round);
            if !(ready || now >= p.until_ms) {
                self.polls.push(p);
                continue;
            }
            if self.finished() {
                self.told_finished.insert(p.peer);
            }
            out.push(Action::Respond { id: p.id, response: Response::PsWork(Box::new(self.work_for(&p.peer, ready))) });
        }
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
