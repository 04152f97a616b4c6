//! The P2P peer as a sans-I/O core: `on_input(now_ms, input)` returns the
//! actions to take and `next_deadline()` says when to call it again with a
//! tick. No await, clock or channel here: the driver ([`super::driver`]) owns
//! the network, the trainer thread, the function tier and the checkpoint
//! writer, feeds their events and results in, and executes the actions. Given
//! the same inputs at the same times, the core returns the same actions (the
//! maps it iterates are ordered; its only randomness is the run's seed).
//!
//! A run: connect to a bootstrap peer, wait for the start rule (or join a run
//! in progress by state sync), then rounds. A round: compute this peer's
//! gradient (when it is an active member), announce it, wait at the barrier
//! (or catch up by state sync when the run is two rounds ahead), aggregate,
//! apply the update, compare digests (re-sync on a majority mismatch). An
//! epoch ends with an evaluation and the next epoch's membership. A finished
//! peer lingers to serve the others the final state. The network handlers
//! (membership, admission, gossip, fetches, heartbeats) are in
//! [`super::members`], state sync in [`super::sync`].

pub(crate) use super::io::*;
use super::decide::{self, BarrierStep, PeerView, StartRule};
use crate::checkpoint::CheckpointMeta;
use crate::report::{AdmissionReport, RoundDone, ScoreSeen, StageTimes};
use crate::round::{RoundState, Stragglers};
use crate::store::{StateBlob, Store};
use crate::train::{ids, peer_ids, Convergence, EpochInfo, Schedule, UpdateJob, Updated};
use libp2p::PeerId;
use p2pml_lambda_grad::Evaluation;
use p2pml_proto::wire::{self, Announce, Digest, Gossip, SyncMode, ValStats};
use p2pml_proto::Attack;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// How long a node waits to reach a bootstrap peer.
pub(crate) const CONNECT_MS: u64 = 30_000;
/// How long a joining node tries to obtain the run's state.
pub(crate) const JOIN_MS: u64 = 120_000;
/// The longest a finished node lingers for the others.
pub(crate) const LINGER_MS: u64 = 30_000;
/// How often a wait says what it waits for.
const NOTE_MS: u64 = 10_000;

/// The round being worked on: its stage times and the figures its stages hand on.
#[derive(Default)]
pub(super) struct RoundWork {
    pub(super) started_ms: u64,
    pub(super) barrier_ms: u64,
    pub(super) stages: StageTimes,
    pub(super) contributors: usize,
    /// The validation sums the round's announcements carried: (loss, correct, count, any).
    pub(super) val: (f64, u64, u64, bool),
    /// The aggregation's samples and summed loss.
    pub(super) samples: u64,
    pub(super) loss_total: f64,
    pub(super) update_ms: u64,
}

pub(crate) struct PeerCore {
    pub(super) s: PeerSettings,
    pub(super) run_id: String,
    pub(super) phase: Phase,
    pub(super) start: StartRule,
    pub(super) rs: RoundState<PeerId>,
    pub(super) store: Store,
    pub(super) resume: Option<Resumed>,
    pub(super) sched: Option<Schedule>,
    pub(super) epoch_batches: Arc<Vec<Vec<usize>>>,
    pub(super) conv: Convergence,
    pub(super) lr: f64,
    pub(super) work: RoundWork,
    pub(super) announces: BTreeMap<(u64, PeerId), Announce>,
    pub(super) fetching: BTreeSet<(u64, PeerId)>,
    pub(super) digests: BTreeMap<u64, BTreeMap<PeerId, Digest>>,
    pub(super) views: BTreeMap<PeerId, PeerView<PeerId>>,
    /// Peers that accepted our Hello (the outbound half of admission; the
    /// store holds the inbound half).
    pub(super) accepted: BTreeSet<PeerId>,
    pub(super) round: u64,
    pub(super) epoch: u64,
    pub(super) last_digest: Option<(u64, Digest)>,
    pub(super) finished: bool,
    pub(super) next_heartbeat_ms: u64,
    pub(super) gradient_bytes_sent: u64,
    pub(super) digest_mismatches: u64,
    pub(super) state_syncs: u64,
    pub(super) catch_ups: u64,
    /// Async mode: gradients already applied, never applied twice.
    pub(super) applied: BTreeSet<(u64, PeerId)>,
    /// This peer holds the run's state (it founded the run or has synced).
    pub(super) ready: bool,
    /// The highest round a Hello answer reported.
    pub(super) hello_round: u64,
    /// Whose gradients the last aggregation used.
    pub(super) last_contributors: Vec<PeerId>,
    pub(super) bootstrap_peers: BTreeSet<PeerId>,
    pub(super) subscribed: BTreeSet<u64>,
    /// Announcements asked for over request-response.
    pub(super) asked: BTreeSet<(u64, PeerId)>,
    pub(super) connected: BTreeSet<PeerId>,
    pub(super) scores: BTreeMap<PeerId, ScoreSeen>,
    pub(super) listen_addrs: Vec<String>,
    pub(super) garbage_sent: u64,
    /// The next epoch's members, fixed at the epoch's last round (or by a state).
    pub(super) planned_next: Option<Vec<PeerId>>,
    /// When we last dialed a known peer we are not connected to.
    pub(super) redialed: BTreeMap<PeerId, u64>,
    /// When a not-yet-admitted peer was last dialed at its heartbeat's addresses.
    pub(super) admission_dialed: BTreeMap<PeerId, u64>,
    /// Every peer's last known addresses (--bootstrap, the checkpoint, heartbeats).
    pub(super) known: BTreeMap<PeerId, Vec<String>>,
    /// Catch-up sources whose state could not be had, and when.
    pub(super) catch_up_failed: BTreeMap<PeerId, u64>,
    pub(super) last_dial_error: Option<String>,
    pub(super) stragglers: Stragglers<PeerId>,
    /// Members demoted for withholding, with the epoch: not named for the next one.
    pub(super) withheld: BTreeMap<PeerId, u64>,
    pub(super) admission: AdmissionReport,
    pub(super) unadmitted_heartbeats: BTreeMap<PeerId, u64>,
    pub(super) hello_sent: BTreeMap<PeerId, u64>,
    /// The epoch's validation figures, carried on its next first announcement.
    pub(super) pending_val: Option<ValStats>,
    pub(super) evaluated: bool,
    pub(super) stopped_early: bool,
    pub(super) shutdown: bool,
    /// When the current wait began and when it says so next.
    pub(super) wait_since_ms: u64,
    pub(super) note_ms: u64,
    pub(super) final_digest: Option<Digest>,
    pub(super) failed: Option<PeerError>,
    /// Sharded exchange: the round's shard work, the tickets by (round, shard)
    /// with their authors, the joiners the last round's tickets named, and how
    /// many shards were taken from an owner that sent no ticket in time.
    pub(super) shards: super::shard::ShardWork,
    pub(super) tickets: BTreeMap<(u64, u32), (PeerId, wire::Ticket)>,
    pub(super) shard_joiners: Vec<PeerId>,
    pub(super) shard_reassignments: u64,
}

impl PeerCore {
    /// A peer for `s`, resuming from `resume` when given.
    pub(crate) fn new(s: PeerSettings, conv: Convergence, resume: Option<Resumed>) -> Self {
        let p2p = &s.p2p;
        let mut known = s.known.clone();
        for (p, a) in &s.bootstrap {
            let addrs = known.entry(*p).or_default();
            let a = a.to_string();
            if !addrs.contains(&a) {
                addrs.insert(0, a);
            }
        }
        let mut store = Store::default();
        let (mut round, mut epoch, mut last_digest) = (0, 0, None);
        if let Some(r) = &resume {
            round = r.header.round + 1;
            epoch = r.header.epoch;
            last_digest = Some((r.header.round, r.digest));
            store.set_state(StateBlob { round: r.header.round, epoch: r.header.epoch, bytes: r.state.clone() });
        }
        PeerCore {
            run_id: s.spec.run_id(),
            phase: Phase::Connecting,
            start: StartRule::new(p2p.peers, p2p.min_peers, p2p.start_grace_ms),
            rs: RoundState::new(s.me, s.incarnation, p2p.min_peers, p2p.failure_timeout_ms),
            store,
            resume,
            sched: None,
            epoch_batches: Arc::new(Vec::new()),
            conv,
            lr: s.lr,
            work: RoundWork::default(),
            announces: BTreeMap::new(),
            fetching: BTreeSet::new(),
            digests: BTreeMap::new(),
            views: BTreeMap::new(),
            accepted: BTreeSet::new(),
            round,
            epoch,
            last_digest,
            finished: false,
            next_heartbeat_ms: 0,
            gradient_bytes_sent: 0,
            digest_mismatches: 0,
            state_syncs: 0,
            catch_ups: 0,
            applied: BTreeSet::new(),
            ready: false,
            hello_round: 0,
            last_contributors: Vec::new(),
            bootstrap_peers: s.bootstrap.iter().map(|(p, _)| *p).collect(),
            subscribed: BTreeSet::new(),
            asked: BTreeSet::new(),
            connected: BTreeSet::new(),
            scores: BTreeMap::new(),
            listen_addrs: Vec::new(),
            garbage_sent: 0,
            planned_next: None,
            redialed: BTreeMap::new(),
            admission_dialed: BTreeMap::new(),
            known,
            catch_up_failed: BTreeMap::new(),
            last_dial_error: None,
            stragglers: Stragglers::new(p2p.straggler.factor, p2p.straggler.floor_ms, p2p.straggler.cap_ms, p2p.straggler.demote_after),
            withheld: BTreeMap::new(),
            admission: AdmissionReport::default(),
            unadmitted_heartbeats: BTreeMap::new(),
            hello_sent: BTreeMap::new(),
            pending_val: None,
            evaluated: false,
            stopped_early: false,
            shutdown: false,
            wait_since_ms: 0,
            note_ms: NOTE_MS,
            final_digest: None,
            failed: None,
            shards: Default::default(),
            tickets: BTreeMap::new(),
            shard_joiners: Vec::new(),
            shard_reassignments: 0,
            s,
        }
    }

    #[cfg(test)]
    pub(crate) fn phase(&self) -> &Phase {
        &self.phase
    }
    #[cfg(test)]
    pub(crate) fn round(&self) -> u64 {
        self.round
    }
    #[cfg(test)]
    pub(crate) fn last_digest(&self) -> Option<Digest> {
        self.last_digest.map(|(_, d)| d)
    }
    pub(crate) fn rogue(&self) -> bool {
        self.s.p2p.faults.garbage || self.s.p2p.faults.heartbeat_only
    }

    /// The run is over for this peer: what it hands the report (or why it failed).
    pub(crate) fn finished(&self) -> Option<Result<PeerOutcome, PeerError>> {
        if let Some(e) = &self.failed {
            return Some(Err(e.clone()));
        }
        (self.phase == Phase::Done).then(|| {
            Ok(PeerOutcome {
                rounds: self.round,
                final_digest: self.final_digest,
                stopped_early: self.stopped_early,
                gradient_bytes_sent: self.gradient_bytes_sent,
                digest_mismatches: self.digest_mismatches,
                state_syncs: self.state_syncs,
                catch_ups: self.catch_ups,
                garbage_sent: self.garbage_sent,
                rogue: self.rogue(),
                peer_scores: self.scores.iter().map(|(p, s)| (p.to_string(), *s)).collect(),
                admission: AdmissionReport { unadmitted: self.unadmitted_report(), ..self.admission.clone() },
            })
        })
    }

    /// When to tick next: the heartbeat, the barrier's straggler deadline, the
    /// end of a settle, a retry or a linger, the next note of a long wait.
    pub(crate) fn next_deadline(&self) -> u64 {
        let mut d = self.next_heartbeat_ms.min(self.note_ms);
        match &self.phase {
            Phase::Settling { until_ms } => d = d.min(*until_ms),
            Phase::Joining { source: None, retry_ms } => d = d.min(*retry_ms),
            Phase::Barrier { .. } if self.sharded() => {
                if let Some(t) = self.shards.deadline(self.stragglers.deadline_ms()) {
                    d = d.min(t);
                }
            }
            Phase::Barrier { quorum_ms: Some(q), .. } => d = d.min(q + self.stragglers.deadline_ms()),
            Phase::Lingering { since_ms } => d = d.min(since_ms + decide::LOST_MEMBER_GRACE_MS).min(since_ms + LINGER_MS),
            Phase::Rogue { alone_ms: Some(t) } => d = d.min(t + 2001),
            Phase::Connecting => d = d.min(CONNECT_MS + 1),
            _ => {}
        }
        d
    }

    /// The first actions: subscribe to the control topic and epoch 0's, dial the bootstrap peers.
    pub(crate) fn start(&mut self, now: u64, listen_addrs: Vec<String>) -> Vec<Action> {
        self.listen_addrs = listen_addrs;
        self.wait_since_ms = now;
        let mut out = vec![Action::Subscribe(self.control_topic())];
        self.subscribe_epoch(0, &mut out);
        for (peer, addr) in &self.s.bootstrap {
            out.push(Action::Dial { peer: *peer, addr: addr.clone() });
        }
        if self.s.bootstrap.is_empty() {
            self.after_connect(now, &mut out);
        }
        out
    }

    pub(crate) fn on_input(&mut self, now: u64, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        if matches!(self.phase, Phase::Done | Phase::Failed) {
            return out;
        }
        match input {
            Input::Tick => {}
            Input::Shutdown => {
                tracing::info!("asked to stop: leaving after round {}", self.round);
                self.shutdown = true;
            }
            Input::NetStopped => self.fail(PeerError::NetStopped, &mut out),
            Input::Connected(p) => self.on_connected(now, p, &mut out),
            Input::Disconnected(p) => self.on_disconnected(now, p),
            Input::DialFailed { error } => {
                tracing::debug!("dial failed: {error}");
                self.last_dial_error = Some(error);
            }
            Input::Gossip { id, propagated_by, author, data } => self.on_gossip_message(now, id, propagated_by, author, &data, &mut out),
            Input::Request { id, peer, request } => self.on_request(id, peer, request, &mut out),
            Input::HelloAnswer { peer, result } => self.on_hello(peer, result, &mut out),
            Input::Fetched(f) => match f.part {
                Some(p) => self.on_part_fetched(f.round, f.owner, p, f.result),
                None => self.on_fetched(f, &mut out),
            },
            Input::ShardAggregated { round, shard, result } => self.on_shard_aggregated(round, shard, result, &mut out),
            Input::Recovered { owner, announce } => self.on_recovered(now, owner, announce, &mut out),
            Input::NetInfo { scores, addrs } => {
                for (p, s) in scores {
                    let e = self.scores.entry(p).or_insert(ScoreSeen { min: s, last: s });
                    e.min = e.min.min(s);
                    e.last = s;
                }
                if !addrs.is_empty() {
                    self.listen_addrs = addrs;
                }
            }
            Input::Computed { round, result } => match result {
                Ok(g) if self.phase == (Phase::Computing { round }) => self.announce(now, round, g, &mut out),
                Ok(_) => {}
                Err(e) => self.fail(PeerError::Compute(e), &mut out),
            },
            Input::Aggregated { round, grad, samples, loss, decode_secs, aggregate_secs } if self.phase == (Phase::Aggregating { round }) => {
                // Sharded: the owned shards' decode and aggregation came first; add the assembly's decode.
                let st = &mut self.work.stages;
                if self.s.p2p.exchange.is_all_to_all() {
                    (st.decode, st.aggregate) = (decode_secs, aggregate_secs);
                } else {
                    (st.decode, st.aggregate) = (st.decode + decode_secs, st.aggregate + aggregate_secs);
                }
                self.ask_update(now, round, grad, samples, loss, &mut out);
            }
            Input::Aggregated { .. } => {}
            Input::Updated { round, updated } if self.phase == (Phase::Updating { round }) => self.on_updated(now, round, updated, &mut out),
            Input::Updated { .. } => {}
            Input::Evaluated { epoch, val, test } if self.phase == (Phase::Evaluating { epoch }) => self.on_evaluated(now, epoch, val, test, &mut out),
            Input::Evaluated { .. } => {}
            Input::Synced { peer, result } => self.on_synced(now, peer, result, &mut out),
            Input::FinalDigest(d) => {
                if self.phase == Phase::Closing {
                    self.final_digest = Some(d);
                    self.phase = Phase::Done;
                    out.push(Action::Done);
                }
            }
        }
        if now >= self.next_heartbeat_ms {
            self.heartbeat(now, &mut out);
        }
        self.advance(now, &mut out);
        if now >= self.note_ms {
            self.note(now);
        }
        out
    }

    pub(super) fn fail(&mut self, e: PeerError, out: &mut Vec<Action>) {
        if self.failed.is_none() {
            self.failed = Some(e.clone());
            self.phase = Phase::Failed;
            out.push(Action::Fail(e));
        }
    }

    pub(super) fn set_phase(&mut self, now: u64, phase: Phase) {
        self.phase = phase;
        self.wait_since_ms = now;
        self.note_ms = now + NOTE_MS;
    }

    /// A long wait says what it waits for, every 10 s.
    fn note(&mut self, now: u64) {
        let what = match &self.phase {
            Phase::Connecting => "a bootstrap peer".to_string(),
            Phase::Gathering => format!("{} live peers ({} at least)", self.s.p2p.peers, self.s.p2p.min_peers),
            Phase::Joining { .. } => "the run's state".to_string(),
            Phase::Barrier { round, .. } => format!("round {round} gradients"),
            Phase::Computing { round } => format!("round {round}'s gradient"),
            Phase::CatchingUp { .. } | Phase::Resyncing { .. } => "a state sync".to_string(),
            Phase::Lingering { .. } => "the other peers to finish".to_string(),
            _ => String::new(),
        };
        if !what.is_empty() {
            tracing::info!("still waiting for {what} ({:.0} s)", (now - self.wait_since_ms) as f64 / 1000.0);
        }
        self.note_ms = now + NOTE_MS;
    }

    pub(super) fn control_topic(&self) -> String {
        format!("p2pml/{}/control", self.run_id)
    }
    pub(super) fn epoch_topic(&self, epoch: u64) -> String {
        format!("p2pml/{}/epoch/{epoch}", self.run_id)
    }
    pub(super) fn subscribe_epoch(&mut self, epoch: u64, out: &mut Vec<Action>) {
        if self.subscribed.insert(epoch) {
            out.push(Action::Subscribe(self.epoch_topic(epoch)));
        }
    }

    /// Moves the run on as far as what the core holds allows: the old loop's
    /// wait conditions, checked after every input.
    fn advance(&mut self, now: u64, out: &mut Vec<Action>) {
        // Each step either moves to a phase that waits for an input or loops.
        for _ in 0..64 {
            let before = self.phase.clone();
            match self.phase.clone() {
                Phase::Connecting => {
                    let peers = &self.bootstrap_peers;
                    let reached = self.accepted.iter().any(|p| peers.contains(p) || self.known.contains_key(p))
                        || (self.s.p2p.faults.heartbeat_only && !self.connected.is_empty());
                    if reached {
                        self.after_connect(now, out);
                    } else if now > CONNECT_MS {
                        let why = self.last_dial_error.as_deref().map(|e| format!(" (last error: {e})")).unwrap_or_default();
                        let addrs = self.s.p2p.bootstrap.join(", ");
                        self.fail(PeerError::Unreachable { addrs, why }, out);
                    }
                }
                Phase::Gathering => {
                    if self.start.ready(self.rs.live().len(), now) || self.ahead() {
                        self.set_phase(now, Phase::Settling { until_ms: now + 3 * self.s.p2p.heartbeat_ms });
                    }
                }
                Phase::Settling { until_ms } if now >= until_ms => self.begin(now, out),
                Phase::Joining { source: None, retry_ms } if now >= retry_ms => {
                    if now > self.wait_since_ms + JOIN_MS {
                        self.fail(PeerError::JoinTimeout, out);
                    } else if let Some(source) = decide::join_source(&self.views, |p| self.rs.is_alive(p)) {
                        tracing::info!("the run is in progress: syncing state from {source}");
                        self.phase = Phase::Joining { source: Some(source), retry_ms };
                        out.push(Action::Sync { peer: source, min_round: 0 });
                    }
                }
                Phase::Next => self.next(now, out),
                Phase::Barrier { round, .. } if self.sharded() => self.sharded_barrier(now, round, out),
                Phase::Barrier { round, quorum_ms } => self.barrier(now, round, quorum_ms, out),
                Phase::Lingering { since_ms } => {
                    let lost = decide::lost_members(self.rs.members().iter().map(|(p, m)| (*p, m.alive)), &self.views);
                    let may = decide::may_leave(&self.rs.live(), &lost, &self.s.me, &self.views, self.round, now - since_ms);
                    if may || now >= since_ms + LINGER_MS || self.shutdown {
                        self.phase = Phase::Closing;
                        out.push(Action::FinalDigest);
                    }
                }
                Phase::Rogue { alone_ms } => {
                    let seen = !self.views.is_empty();
                    let all_finished = seen && self.views.values().all(|v| v.finished);
                    let alone = if seen && self.connected.is_empty() { alone_ms.or(Some(now)) } else { None };
                    if all_finished || alone.is_some_and(|t| now > t + 2000) || self.shutdown {
                        self.phase = Phase::Done;
                        out.push(Action::Done);
                    } else {
                        self.phase = Phase::Rogue { alone_ms: alone };
                    }
                }
                _ => {}
            }
            if self.phase == before {
                return;
            }
        }
    }

    /// A run ahead of us: a peer past our round (past round 0, or past the checkpoint we resumed from).
    pub(super) fn ahead(&self) -> bool {
        decide::remote_round(&self.views, self.hello_round) > self.round
    }

    /// Admitted by a bootstrap peer (or none to wait for): rogue, or gather.
    fn after_connect(&mut self, now: u64, _out: &mut Vec<Action>) {
        if self.rogue() {
            if self.s.p2p.faults.heartbeat_only {
                tracing::warn!("rogue mode: heartbeats without a Hello until the run ends");
            } else {
                tracing::warn!("rogue mode: publishing invalid messages until the run ends");
            }
            self.set_phase(now, Phase::Rogue { alone_ms: None });
        } else if self.ahead() {
            self.set_phase(now, Phase::Joining { source: None, retry_ms: now });
        } else {
            tracing::info!("waiting for {} live peers ({} at least)", self.s.p2p.peers, self.s.p2p.min_peers);
            self.set_phase(now, Phase::Gathering);
        }
    }

    /// After the start wait: join the run ahead of us, resume the checkpoint, or start a new run.
    fn begin(&mut self, now: u64, out: &mut Vec<Action>) {
        if self.ahead() {
            self.set_phase(now, Phase::Joining { source: None, retry_ms: now });
            return;
        }
        let sched = if let Some(r) = self.resume.take() {
            tracing::info!("resuming the run from checkpoint round {}", r.header.round);
            let active = peer_ids(&r.header.active);
            self.adopt_schedule(&r.header, &active)
        } else {
            let live = self.rs.live();
            self.schedule(0, 0, live)
        };
        match sched {
            Ok(sched) => self.ready_to_train(now, sched, out),
            Err(e) => self.fail(e, out),
        }
    }

    /// An epoch's schedule over `members` (the epoch's members are set in the round state).
    pub(super) fn schedule(&mut self, epoch: u64, first_round: u64, members: Vec<PeerId>) -> Result<Schedule, PeerError> {
        let s = &self.s;
        let sched = Schedule::new(&s.cfg, &s.p2p, s.n_train, &s.val_all, epoch, first_round, members, s.me)
            .map_err(|e| PeerError::Schedule(format!("{e:#}")))?;
        self.rs.set_epoch_members(sched.members.clone());
        Ok(sched)
    }

    pub(super) fn set_schedule(&mut self, sched: Schedule) {
        self.epoch = sched.epoch;
        self.epoch_batches = Arc::new(sched.batches.clone());
        self.evaluated = false;
        self.sched = Some(sched);
    }

    /// The peer holds the run's state: the `ready` line, and rounds.
    pub(super) fn ready_to_train(&mut self, now: u64, sched: Schedule, out: &mut Vec<Action>) {
        out.push(Action::Ready { round: self.round, epoch: sched.epoch });
        self.ready = true;
        for e in [sched.epoch, sched.epoch + 1] {
            self.subscribe_epoch(e, out);
        }
        self.set_schedule(sched);
        self.set_phase(now, Phase::Next);
    }

    pub(super) fn sched(&self) -> &Schedule {
        self.sched.as_ref().expect("a schedule once training")
    }

    /// The next round, or the epoch's end.
    fn next(&mut self, now: u64, out: &mut Vec<Action>) {
        let (first, rounds, epoch, my_index) = {
            let s = self.sched();
            (s.first_round, s.rounds, s.epoch, s.my_index)
        };
        if self.round >= first + rounds {
            // End of the epoch: an active peer evaluates its slice of the
            // validation set (shared on its next announcement) and the test set.
            if let (Some(i), false) = (my_index, self.evaluated) {
                let p = self.sched().members.len();
                let val = self.s.val_all.iter().copied().skip(i).step_by(p).collect();
                self.evaluated = true;
                self.set_phase(now, Phase::Evaluating { epoch });
                out.push(Action::Evaluate { epoch, val });
                return;
            }
            self.end_epoch(now, out);
            return;
        }
        if self.shutdown {
            self.finish(now, out);
            return;
        }
        let round = self.round;
        let k = round - first;
        self.store.round = round;
        self.work = RoundWork { started_ms: now, ..RoundWork::default() };
        // A member trains unless it was demoted (it died or restarted during this
        // epoch, or kept missing rounds). A withholder (--byzantine withhold) stays
        // alive and follows the rounds, but never computes or sends its gradient.
        let withhold = matches!(self.s.p2p.faults.byzantine, Some(Attack::Withhold));
        if my_index.is_some() && self.rs.is_active(&self.s.me) && !withhold {
            let bpr = self.s.p2p.batches_per_round;
            let n = self.epoch_batches.len();
            let (lo, hi) = ((k as usize * bpr).min(n), ((k as usize + 1) * bpr).min(n));
            let job = ComputeJob {
                round,
                epoch,
                epoch_batches: self.epoch_batches.clone(),
                batch_ids: lo..hi,
                params_digest: self.last_digest.map(|(_, d)| d),
                members: self.rs.active_members(),
                seed: crate::train::gradient_seed(self.s.cfg.seed, round, &self.s.me),
                shards: if self.sharded() { self.shard_ranges() } else { Vec::new() },
            };
            self.set_phase(now, Phase::Computing { round });
            out.push(Action::Compute(Box::new(job)));
        } else {
            self.enter_barrier(now, round);
        }
    }

    fn enter_barrier(&mut self, now: u64, round: u64) {
        self.work.barrier_ms = now;
        self.set_phase(now, Phase::Barrier { round, quorum_ms: None });
    }

    /// Our gradient is computed: announce it, hold it, wait at the barrier.
    fn announce(&mut self, now: u64, round: u64, g: OwnGradient, out: &mut Vec<Action>) {
        let st = &mut self.work.stages;
        (st.compute, st.upload, st.encode) = (g.compute_secs, g.upload_secs, g.encode_secs);
        let first = self.sched().first_round;
        let val = if round == first { self.pending_val.take() } else { None };
        let joiners = ids(&self.ready_joiners());
        let mut a = crate::train::announcement(&self.run_id, round, self.epoch, (g.samples, g.loss_sum), &g.blob, val, joiners);
        let me = self.s.me;
        if self.sharded() {
            self.gradient_bytes_sent += g.parts.iter().map(|p| p.len() as u64).sum::<u64>();
            self.announce_shards(round, g.parts, &mut a);
        } else {
            self.gradient_bytes_sent += a.len;
            self.store.insert(round, &me, Arc::new(g.blob));
        }
        self.rs.hold(round, me);
        self.announces.insert((round, me), a.clone());
        self.store.insert_announce(&me, a.clone());
        out.push(Action::Publish { topic: self.epoch_topic(self.epoch), data: wire::encode(&Gossip::Announce(a)), gradient: true });
        self.enter_barrier(now, round);
    }

    /// The barrier: release (aggregate), catch up (the run is ahead), or wait.
    fn barrier(&mut self, now: u64, round: u64, quorum_ms: Option<u64>, out: &mut Vec<Action>) {
        let contributors: Vec<(PeerId, u64)> = match self.s.p2p.sync {
            SyncMode::Sync => {
                // The straggler deadline: once a quorum of the round's gradients is
                // held, the missing members get this long; then the round closes on
                // what arrived.
                let deadline = self.stragglers.deadline_ms();
                let mut quorum_at = quorum_ms;
                let source = self.catch_up_source(now);
                let step = decide::barrier_step(self.rs.barrier(round), self.rs.quorum_held(round), &mut quorum_at, deadline, now, source.is_some());
                match step {
                    BarrierStep::Release { contributors, missing } => {
                        self.close_round(round, &contributors, &missing, deadline, now - self.work.started_ms, out);
                        contributors.into_iter().map(|p| (p, round)).collect()
                    }
                    BarrierStep::CatchUp => {
                        let source = source.expect("a catch-up source");
                        let their = self.views.get(&source).map_or(0, |v| v.round);
                        tracing::warn!("round {round}: peer {source} is at round {their}; catching up by state sync");
                        self.set_phase(now, Phase::CatchingUp { source });
                        out.push(Action::Sync { peer: source, min_round: round + 1 });
                        return;
                    }
                    BarrierStep::Wait { .. } => {
                        self.phase = Phase::Barrier { round, quorum_ms: quorum_at };
                        return;
                    }
                }
            }
            SyncMode::Async { max_staleness } => {
                // Bounded staleness: wait only for peers more than max_staleness
                // behind, then apply each peer's freshest gradient not yet applied.
                let floor = round.saturating_sub(max_staleness);
                let expected = self.rs.expected();
                if !decide::async_ready(&expected, |r, p| self.rs.holds(r, p), floor, round) {
                    return;
                }
                decide::async_select(&expected, |r, p| self.rs.holds(r, p), &mut self.applied, floor, round)
            }
        };
        self.work.stages.barrier_wait = (now - self.work.barrier_ms) as f64 / 1000.0;
        self.aggregate(now, round, contributors, out);
    }

    /// Decode and aggregate, deterministically: contributors sorted by peer id,
    /// each (ours included) in the decoded form everyone else sees.
    fn aggregate(&mut self, now: u64, round: u64, mut contributors: Vec<(PeerId, u64)>, out: &mut Vec<Action>) {
        contributors.sort();
        self.last_contributors = contributors.iter().map(|(p, _)| *p).collect();
        let (first, rounds) = (self.sched().first_round, self.sched().rounds);
        // The epoch's last round fixes the next epoch's members (they travel in the state).
        if self.s.p2p.sync == SyncMode::Sync && round + 1 == first + rounds {
            self.planned_next = Some(self.next_epoch_members(round));
        }
        let mut inputs = Vec::with_capacity(contributors.len());
        let mut val = (0.0f64, 0u64, 0u64, false);
        for (p, r) in &contributors {
            if let (Some(a), Some(blob)) = (self.announces.get(&(*r, *p)), self.store.get(*r, p)) {
                if let Some(v) = &a.val {
                    val = (val.0 + v.loss_sum, val.1 + v.correct, val.2 + v.count, true);
                }
                inputs.push((a.samples, a.loss_sum, blob));
            }
        }
        self.work.val = val;
        self.work.contributors = contributors.len();
        self.set_phase(now, Phase::Aggregating { round });
        out.push(Action::Aggregate { round, inputs });
    }

    /// The aggregated gradient: convergence decisions (they ride on the first
    /// round of each epoch), then the update.
    fn ask_update(&mut self, now: u64, round: u64, grad: Vec<f32>, samples: u64, loss: f64, out: &mut Vec<Action>) {
        let (loss_sum, correct, count, any) = self.work.val;
        if any && count > 0 {
            let val_loss = loss_sum / count as f64;
            let (lr, stop) = self.conv.step(val_loss, self.lr);
            if lr != self.lr {
                tracing::info!("validation loss {val_loss:.4} has not improved: lr {} -> {lr}", self.lr);
                self.lr = lr;
                out.push(Action::SetLr(lr));
            }
            out.push(Action::Validation { loss: val_loss, accuracy: correct as f64 / count as f64 });
            self.stopped_early = stop;
        }
        let (plateau, stopping) = self.conv.snapshot();
        let sched = self.sched();
        let epoch = sched.epoch;
        let info = EpochInfo {
            first_round: sched.first_round,
            members: sched.members.clone(),
            active: self.rs.active_members(),
            next: self.planned_next.clone().unwrap_or_default(),
            withheld: self.withheld.iter().filter(|(_, e)| **e == epoch).map(|(p, _)| *p).collect(),
        };
        let job = UpdateJob {
            grad,
            samples,
            perturb: self.s.p2p.faults.perturb_round == Some(round),
            round,
            epoch,
            plateau,
            stopping,
            info,
            keep_params: self.s.tier,
        };
        (self.work.samples, self.work.loss_total, self.work.update_ms) = (samples, loss, now);
        self.set_phase(now, Phase::Updating { round });
        out.push(Action::Update(Box::new(job)));
    }

    fn on_updated(&mut self, now: u64, round: u64, u: Updated, out: &mut Vec<Action>) {
        let epoch = self.epoch;
        let state = Arc::new(u.state);
        self.store.set_state(StateBlob { round, epoch, bytes: state.clone() });
        let every = self.s.p2p.checkpoint_every;
        if every > 0 && (round + 1).is_multiple_of(every) {
            let meta = CheckpointMeta::of(&self.run_id, round, epoch, &self.rs, |p| self.known.get(p).cloned().unwrap_or_default());
            out.push(Action::Checkpoint { meta, state });
        }
        self.work.stages.update = (now - self.work.update_ms) as f64 / 1000.0;
        self.last_digest = Some((round, u.digest));
        self.digests.entry(round).or_default().insert(self.s.me, u.digest);
        let (loss_total, samples) = (self.work.loss_total, self.work.samples);
        out.push(Action::Round(Box::new(RoundDone {
            round,
            epoch,
            contributors: self.work.contributors,
            samples,
            loss_total,
            lr: self.lr,
            digest: u.digest,
            stages: self.work.stages.clone(),
        })));
        match self.check_digests(round) {
            Some(good) => {
                self.set_phase(now, Phase::Resyncing { source: good });
                out.push(Action::Sync { peer: good, min_round: round });
            }
            None => self.end_round(now, out),
        }
    }

    /// The round's bookkeeping: costs, pruning, the next round.
    pub(super) fn end_round(&mut self, now: u64, out: &mut Vec<Action>) {
        out.push(Action::Costs { state_syncs: self.state_syncs });
        let round = self.round;
        let keep = 4 + if let SyncMode::Async { max_staleness } = self.s.p2p.sync { max_staleness } else { 0 };
        self.rs.prune(round.saturating_sub(keep));
        self.store.prune(round.saturating_sub(keep));
        self.announces.retain(|(r, _), _| *r + 2 * keep >= round);
        self.tickets.retain(|(r, _), _| *r + keep >= round);
        self.round += 1;
        if self.stopped_early || self.shutdown {
            if self.stopped_early {
                tracing::info!("early stopping: validation loss has not improved for {} epochs", self.s.p2p.early_stop_patience);
            }
            // Finish this epoch's bookkeeping and stop at the same round as everyone.
            let r = self.round;
            if let Some(s) = self.sched.as_mut() {
                s.rounds = r - s.first_round;
            }
        }
        self.set_phase(now, Phase::Next);
    }

    fn on_evaluated(&mut self, now: u64, epoch: u64, val: Option<Evaluation>, test: Evaluation, out: &mut Vec<Action>) {
        self.pending_val = val.map(|v| ValStats {
            epoch,
            loss_sum: v.loss * v.samples as f64,
            correct: (v.accuracy * v.samples as f64).round() as u64,
            count: v.samples as u64,
        });
        out.push(Action::Epoch { epoch, test, lr: self.lr });
        self.end_epoch(now, out);
    }

    /// The epoch is over: the last one ends the run; otherwise the next epoch's members.
    fn end_epoch(&mut self, now: u64, out: &mut Vec<Action>) {
        let old_epoch = self.sched().epoch;
        if old_epoch + 1 >= self.s.cfg.epochs || self.stopped_early || self.shutdown {
            self.finish(now, out);
            return;
        }
        // The next epoch's members: in synchronous mode, the contributors of
        // the last round plus the ready joiners they named, which every peer
        // computes from the same announcements; in asynchronous mode, the live peers.
        let planned = self.planned_next.take();
        let members = decide::epoch_members(planned, self.s.p2p.sync, || self.next_epoch_members(self.round - 1), || self.rs.live());
        let sched = match self.schedule(old_epoch + 1, self.round, members) {
            Ok(s) => s,
            Err(e) => return self.fail(e, out),
        };
        self.stragglers.new_epoch();
        self.withheld.retain(|_, e| *e + 1 >= sched.epoch);
        let epoch = sched.epoch;
        if sched.my_index.is_none() {
            tracing::info!("epoch {}: not a member yet, following", epoch + 1);
        }
        self.set_schedule(sched);
        self.subscribe_epoch(epoch + 1, out);
        if self.subscribed.remove(&old_epoch) {
            out.push(Action::Unsubscribe(self.epoch_topic(old_epoch)));
        }
        self.set_phase(now, Phase::Next);
    }

    /// Keep serving until every live peer has passed our last round, and lost
    /// members have had a grace to come back for the final state (bounded).
    fn finish(&mut self, now: u64, out: &mut Vec<Action>) {
        self.finished = true;
        self.heartbeat(now, out);
        self.set_phase(now, Phase::Lingering { since_ms: now });
    }
}
