//! Decentralized synchronous (or bounded-staleness asynchronous) training: the
//! node's main loop. Each round: compute the gradient of this peer's next batches
//! off the async threads, announce it on the epoch's gossip topic, wait at the
//! barrier while fetching the others' gradients, aggregate deterministically,
//! update, and gossip the parameter digest.

use crate::checkpoint::{CheckpointMeta, Checkpoints, MemberRecord};
use crate::config::{run_spec, P2pConfig, TrainConfig};
use crate::exec::{self, ExecConfig, ExecutorKind, LambdaExecutor, TaskPlan};
use p2pml_proto::task::GradOutput;
use p2pml_proto::{Aggregation, Attack};
use crate::net::{self, Client, Event, InboundRequest};
use crate::round::{Barrier, Change, RoundState, Stragglers};
use crate::store::{chunks, SharedStore, StateBlob, Store};
use anyhow::{anyhow, bail, Context};
use libp2p::{Multiaddr, PeerId};
use p2pml_lambda_grad::data::Partition;
use p2pml_lambda_grad::{device_name, Model, ModelSpec, Optimizer, TensorData};
use p2pml_proto::wire::{self, Announce, Digest, Gossip, Heartbeat, MemberEntry, Request, Response, RunSpec, SyncMode, ValStats};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Wall-clock seconds spent in each stage of one round.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StageTimes {
    /// Gradient time: local computation, or the function tier's whole phase
    /// (parameter upload, invocations, output download, local fallbacks).
    pub compute: f64,
    /// Function tier only: putting the round's parameters in the object store (part of compute).
    pub upload: f64,
    pub encode: f64,
    pub send: f64,
    pub barrier_wait: f64,
    pub decode: f64,
    pub aggregate: f64,
    pub update: f64,
}

/// One completed round as this peer saw it.
#[derive(Clone, Debug, Serialize)]
pub struct RoundRecord {
    pub round: u64,
    pub epoch: u64,
    pub contributors: usize,
    pub samples: u64,
    pub train_loss: f64,
    pub lr: f64,
    pub digest: String,
    pub finished_at: f64,
    /// When the round finished (Unix ms): testnet lines it up with its fault events.
    pub unix_ms: u64,
    pub stages: StageTimes,
}

/// A change of the membership as this node saw it.
#[derive(Clone, Debug, Serialize)]
pub struct MembershipEvent {
    pub unix_ms: u64,
    pub peer: String,
    /// joined, rejoined, died, or refuted (somebody declared this node dead).
    pub event: String,
    pub incarnation: u64,
}

/// Checkpoints written and restored by this start of the node.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckpointStats {
    pub written: u64,
    /// Not written because the previous write was still in progress.
    pub skipped_busy: u64,
    pub failed: u64,
    pub last_round: Option<u64>,
    pub last_bytes: u64,
    /// The checkpoints' size on disk after the last write (records and index).
    pub disk_bytes: u64,
    pub write_secs_mean: f64,
    pub write_secs_max: f64,
    /// The checkpoint this start resumed from, how long loading it took, and the
    /// newer ones that failed verification (round, why).
    pub restored_round: Option<u64>,
    pub restore_secs: Option<f64>,
    pub restore_skipped: Vec<(u64, String)>,
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[derive(Clone, Debug, Serialize)]
pub struct EpochRecord {
    pub epoch: u64,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    pub test_accuracy: f64,
    pub test_loss: f64,
    pub lr: f64,
}

/// The node's report, written as JSON at the end of the run.
#[derive(Clone, Debug, Serialize)]
pub struct NodeReport {
    /// "peer", or "rogue" for a --fault-garbage node that only sends invalid messages.
    pub role: String,
    pub peer_id: String,
    pub run_id: String,
    pub spec: RunSpec,
    pub device: String,
    pub threads: i32,
    pub rounds: u64,
    pub epochs: u64,
    pub final_digest: String,
    pub final_test_accuracy: f64,
    pub final_test_loss: f64,
    pub stopped_early: bool,
    pub gossip_bytes_sent: u64,
    pub gossip_bytes_received: u64,
    pub fetch_bytes_sent: u64,
    pub fetch_bytes_received: u64,
    pub gradient_bytes_sent: u64,
    pub invalid_messages: u64,
    pub digest_mismatches: u64,
    pub state_syncs: u64,
    pub wall_seconds: f64,
    pub rounds_log: Vec<RoundRecord>,
    pub epochs_log: Vec<EpochRecord>,
    /// This node's gossipsub score of each peer it was connected to.
    pub peer_scores: BTreeMap<String, ScoreSeen>,
    /// Rogue only: invalid messages published.
    pub garbage_sent: u64,
    /// `--executor lambda`: invocations, retries, backups, fallbacks, stage sums.
    pub function_tier: Option<exec::ExecStats>,
    /// This peer's cost: measured billing and the paper's formula.
    pub cost: exec::CostRow,
    /// This start's incarnation (1 at the first start of the state directory).
    pub incarnation: u64,
    pub started_unix_ms: u64,
    /// When this node first held the run's state (founded, resumed or synced).
    pub ready_unix_ms: Option<u64>,
    /// State syncs that caught up with peers more than a round ahead.
    pub catch_ups: u64,
    pub membership_log: Vec<MembershipEvent>,
    pub checkpoints: CheckpointStats,
    /// Worker (parameter-server mode): seconds spent retrying an unreachable server.
    pub server_unreachable_seconds: f64,
    /// Who counted, and who did not: deadline closures, withholding demotions,
    /// heartbeats of peers never admitted.
    #[serde(flatten)]
    pub admission: AdmissionReport,
}

/// What the straggler deadline and admission did in a run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AdmissionReport {
    /// Rounds this node closed on the straggler deadline, without every expected member.
    pub deadline_rounds: Vec<u64>,
    /// Members this node demoted for missing rounds in a row.
    pub withholding_demotions: Vec<WithholdingDemotion>,
    /// Peers that sent heartbeats but never completed an accepted Hello with this node.
    pub unadmitted: Vec<Unadmitted>,
}

#[derive(Clone, Debug, Serialize)]
pub struct WithholdingDemotion {
    pub peer: String,
    pub round: u64,
    pub epoch: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Unadmitted {
    pub peer: String,
    /// Heartbeats ignored.
    pub heartbeats: u64,
}

/// The seed of a peer's stochastic rounding in a round: distinct per peer and
/// round, reproducible from the run seed.
pub(crate) fn gradient_seed(run_seed: u64, round: u64, peer: &PeerId) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&run_seed.to_le_bytes());
    h.update(&round.to_le_bytes());
    h.update(&peer.to_bytes());
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
}

pub(crate) fn hex(d: &Digest) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// BLAKE3 of the parameters as little-endian f32 bytes.
pub(crate) fn params_digest(model: &Model) -> Digest {
    digest_of(&model.params_vec())
}

pub(crate) fn digest_of(v: &[f32]) -> Digest {
    let mut bytes = Vec::with_capacity(v.len() * 4);
    for x in v {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    *blake3::hash(&bytes).as_bytes()
}

/// ReduceLROnPlateau (mode min, relative threshold 1e-4) and early stopping,
/// stepped with the members' mean validation loss: the same inputs on every peer,
/// so the same decisions at the same round.
#[derive(Clone, Debug)]
pub(crate) struct Convergence {
    best: f64,
    bad_epochs: u64,
    best_for_stop: f64,
    stop_bad: u64,
    factor: f64,
    patience: u64,
    min_lr: f64,
    stop_patience: u64,
}

impl Convergence {
    pub(crate) fn new(p: &P2pConfig) -> Self {
        Convergence {
            best: f64::INFINITY,
            bad_epochs: 0,
            best_for_stop: f64::INFINITY,
            stop_bad: 0,
            factor: p.lr_factor,
            patience: p.lr_patience,
            min_lr: p.min_lr,
            stop_patience: p.early_stop_patience,
        }
    }
    pub(crate) fn snapshot(&self) -> ((f64, u64), (f64, u64)) {
        ((self.best, self.bad_epochs), (self.best_for_stop, self.stop_bad))
    }
    pub(crate) fn restore(&mut self, plateau: (f64, u64), stopping: (f64, u64)) {
        (self.best, self.bad_epochs) = plateau;
        (self.best_for_stop, self.stop_bad) = stopping;
    }
    /// Returns (new lr, stop).
    pub(crate) fn step(&mut self, val_loss: f64, lr: f64) -> (f64, bool) {
        let mut lr = lr;
        if val_loss < self.best * (1.0 - 1e-4) {
            self.best = val_loss;
            self.bad_epochs = 0;
        } else {
            self.bad_epochs += 1;
            if self.bad_epochs > self.patience {
                lr = (lr * self.factor).max(self.min_lr);
                self.bad_epochs = 0;
            }
        }
        if val_loss < self.best_for_stop {
            self.best_for_stop = val_loss;
            self.stop_bad = 0;
        } else {
            self.stop_bad += 1;
        }
        (lr, self.stop_bad >= self.stop_patience)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregate_applies_the_rule_to_per_peer_means_and_drops_poison() {
        let none = p2pml_proto::Compression::None;
        // Summed gradients of 2, 4 and 2 samples: per-peer means 1, 2 and -10.
        let blob = |v: &[f32]| Arc::new(p2pml_proto::encode_f32(v).unwrap());
        let mut nan = (*blob(&[0.0, 0.0])).clone();
        Attack::Nan.poison(&mut nan);
        let inputs = vec![
            (2, 1.0, blob(&[2.0, 2.0])),
            (4, 1.0, blob(&[8.0, 8.0])),
            (2, 1.0, blob(&[-20.0, -20.0])),
            (9, 1.0, Arc::new(nan)),
            // Over the round's cap of 8 samples, and a peer without a batch.
            (80, 1.0, blob(&[1e6, 1e6])),
            (0, 0.0, blob(&[0.0, 0.0])),
        ];
        let (mean, samples, loss, _, _) = aggregate(&inputs, &none, 2, &Aggregation::Mean, 8);
        assert_eq!((mean, samples, loss), (vec![-1.25, -1.25], 8, 3.0), "weighted by samples; NaN and over-cap blobs dropped");
        let (median, samples, _, _, _) = aggregate(&inputs, &none, 2, &Aggregation::Median, 8);
        assert_eq!((median, samples), (vec![1.0, 1.0], 8), "the empty peer has no vote");
        let (krum, _, _, _, _) = aggregate(&inputs, &none, 2, &Aggregation::Krum { f: 0 }, 8);
        assert_eq!(krum, vec![1.0, 1.0], "the input closest to the others");
        let (empty, samples, _, _, _) = aggregate(&inputs[3..4], &none, 2, &Aggregation::Median, 8);
        assert_eq!((empty, samples), (vec![0.0, 0.0], 0));
    }

    #[test]
    fn plateau_lowers_the_lr_after_patience_and_early_stopping_fires() {
        let p = P2pConfig { lr_patience: 2, early_stop_patience: 4, ..P2pConfig::default() };
        let mut c = Convergence::new(&p);
        let mut lr = 0.1;
        let mut log = vec![];
        for loss in [1.0, 0.9, 0.95, 0.95, 0.95, 0.95, 0.95] {
            let (new_lr, stop) = c.step(loss, lr);
            lr = new_lr;
            log.push((lr, stop));
        }
        // Improvement at epochs 0 and 1; three bad epochs exceed patience 2: lr x0.1;
        // the fourth bad epoch stops the run.
        let lrs: Vec<f64> = log.iter().map(|x| x.0).collect();
        assert!((lrs[4] - 0.01).abs() < 1e-12 && (lrs[3] - 0.1).abs() < 1e-12, "{lrs:?}");
        let stops: Vec<bool> = log.iter().map(|x| x.1).collect();
        assert_eq!(stops, [false, false, false, false, false, true, true]);
        // Snapshots restore the same decisions (state sync carries them).
        let (a, b) = c.snapshot();
        let mut d = Convergence::new(&p);
        d.restore(a, b);
        assert_eq!(d.step(0.95, lr), c.clone().step(0.95, lr));
        let mut tiny = Convergence::new(&P2pConfig { lr_patience: 0, min_lr: 1e-6, ..P2pConfig::default() });
        let mut lr = 1e-6;
        tiny.step(1.0, lr);
        lr = tiny.step(1.0, lr).0;
        assert_eq!(lr, 1e-6, "never below min_lr");
    }
}

/// A gradient fetched (or failed to fetch) by a background task.
struct Fetched {
    round: u64,
    owner: PeerId,
    result: Result<Vec<u8>, String>,
}

/// Addresses kept (and dialed) per peer.
const MAX_ADDRS_PER_PEER: usize = 8;

/// Serves this node's metrics (unless `--metrics-addr none`) and prints where:
/// testnet reads the line.
pub(crate) async fn start_metrics(p2p: &P2pConfig, role: &str, me: &PeerId, client: &Client) -> anyhow::Result<()> {
    if let Some(addr) = &p2p.metrics_addr {
        let a = crate::metrics::serve(addr, role, &me.to_string(), client.traffic.clone()).await?;
        println!("metrics listening on http://{a}/metrics");
    }
    Ok(())
}

/// A round's figures into the log (one info line) and the metrics (if they are on).
pub(crate) fn record_round(round: u64, epoch: u64, contributors: usize, samples: u64, st: &StageTimes, train_loss: f64, lr: f64) {
    tracing::info!(
        round,
        epoch = epoch + 1,
        contributors,
        samples,
        loss = format!("{train_loss:.4}"),
        lr,
        compute_s = format!("{:.3}", st.compute),
        barrier_s = format!("{:.3}", st.barrier_wait),
        update_s = format!("{:.3}", st.update),
        "round done"
    );
    let Some(m) = crate::metrics::get() else { return };
    for (name, secs) in [
        ("compute", st.compute),
        ("encode", st.encode),
        ("send", st.send),
        ("barrier_wait", st.barrier_wait),
        ("decode", st.decode),
        ("aggregate", st.aggregate),
        ("update", st.update),
    ] {
        // A stage this node did not run this round (the server computes nothing,
        // a demoted peer only follows) is not an observation of zero.
        if secs > 0.0 {
            m.stage_seconds.with_label_values(&[name]).observe(secs);
        }
    }
    m.round.set(round as i64 + 1);
    m.epoch.set(epoch as i64 + 1);
    m.rounds.inc();
    m.train_loss.set(train_loss);
    m.learning_rate.set(lr);
}

/// The function tier's counters (from `seen` to now), state syncs and the cost
/// estimate into the metrics.
pub(crate) fn record_costs(lambda: Option<&mut LambdaExecutor>, seen: &mut exec::ExecStats, cfg: &ExecConfig, wall_secs: f64, bpr: usize, state_syncs: u64) {
    let Some(m) = crate::metrics::get() else { return };
    m.state_syncs.inc_by(state_syncs.saturating_sub(m.state_syncs.get()));
    let stats = match lambda {
        Some(lx) => {
            m.function_stats(seen, &lx.stats, cfg.pricing.memory_mb, &std::mem::take(&mut lx.recent_ms));
            *seen = lx.stats.clone();
            lx.stats.clone()
        }
        None => exec::ExecStats::default(),
    };
    let cost = exec::cost(cfg, &stats, wall_secs, bpr).total_usd;
    m.cost_usd.inc_by((cost - m.cost_usd.get()).max(0.0));
}

/// An epoch's evaluation into the metrics.
pub(crate) fn record_epoch(test_accuracy: f64, test_loss: f64) {
    if let Some(m) = crate::metrics::get() {
        m.test_accuracy.set(test_accuracy);
        m.test_loss.set(test_loss);
    }
}

/// Where to find peers at start: the --bootstrap addresses, and the addresses
/// the restored checkpoint remembers for its members.
fn known_addresses(bootstrap: &[(PeerId, Multiaddr)], meta: Option<&CheckpointMeta>, me: &PeerId) -> HashMap<PeerId, Vec<String>> {
    let mut known: HashMap<PeerId, Vec<String>> = HashMap::new();
    for m in meta.map(|m| m.members.as_slice()).unwrap_or_default() {
        if let Ok(p) = PeerId::from_bytes(&m.peer) {
            if &p != me && !m.addrs.is_empty() {
                known.insert(p, m.addrs.iter().take(MAX_ADDRS_PER_PEER).cloned().collect());
            }
        }
    }
    for (p, a) in bootstrap {
        let addrs = known.entry(*p).or_default();
        let a = a.to_string();
        if !addrs.contains(&a) {
            addrs.insert(0, a);
        }
    }
    known
}

struct PeerView {
    round: u64,
    epoch: u64,
    finished: bool,
    ready: bool,
    /// The sender's active members of its current epoch.
    active: Vec<PeerId>,
    boot: u64,
}

/// How this node scored a peer (gossipsub's peer score), sampled every heartbeat.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct ScoreSeen {
    pub min: f64,
    pub last: f64,
}

struct Node {
    p2p: P2pConfig,
    spec: RunSpec,
    run_id: String,
    client: Client,
    events: mpsc::Receiver<Event>,
    store: SharedStore,
    rs: RoundState<PeerId>,
    announces: HashMap<(u64, PeerId), Announce>,
    fetching: HashSet<(u64, PeerId)>,
    fetch_tx: mpsc::Sender<Fetched>,
    fetch_rx: mpsc::Receiver<Fetched>,
    digests: BTreeMap<u64, BTreeMap<PeerId, Digest>>,
    views: HashMap<PeerId, PeerView>,
    accepted: HashSet<PeerId>,
    hello_tx: mpsc::Sender<(PeerId, Result<Response, String>)>,
    hello_rx: mpsc::Receiver<(PeerId, Result<Response, String>)>,
    round: u64,
    epoch: u64,
    last_digest: Option<(u64, Digest)>,
    finished: bool,
    start: Instant,
    next_heartbeat: Instant,
    gradient_bytes_sent: u64,
    digest_mismatches: u64,
    /// Async mode: gradients already applied, never applied twice.
    applied: HashSet<(u64, PeerId)>,
    /// This peer holds the run's state (it founded the run or has synced).
    ready: bool,
    /// The highest round a Hello answer reported.
    hello_round: u64,
    /// Whose gradients the last aggregation used.
    last_contributors: Vec<PeerId>,
    /// The run's gradient encoding and the model's parameter count.
    compression: p2pml_proto::Compression,
    numel: usize,
    /// The peers named by --bootstrap.
    bootstrap_peers: HashSet<PeerId>,
    /// Epoch topics subscribed to.
    subscribed: HashSet<u64>,
    /// Announcements asked for over request-response, and the answers.
    asked: HashSet<(u64, PeerId)>,
    recovered_tx: mpsc::Sender<(PeerId, Announce)>,
    recovered_rx: mpsc::Receiver<(PeerId, Announce)>,
    /// Training samples outside the validation set, and the batch size (to
    /// compute an epoch's rounds while joining).
    n_train_minus_val: usize,
    batch_size: usize,
    /// Peers connected now.
    connected: HashSet<PeerId>,
    /// Gossipsub scores of the peers, lowest and latest.
    scores: BTreeMap<PeerId, ScoreSeen>,
    /// Rogue mode (--fault-garbage): invalid messages published.
    garbage_sent: u64,
    /// Membership changes, for the report.
    membership_log: Vec<MembershipEvent>,
    /// The next epoch's members, fixed at the epoch's last round (or by a state).
    planned_next: Option<Vec<PeerId>>,
    /// When we last dialed a known peer we are not connected to.
    redialed: HashMap<PeerId, Instant>,
    /// When a not-yet-admitted peer was last dialed at its heartbeat's addresses
    /// (apart from `redialed`: the periodic redial of stale known addresses must
    /// not starve the dial at the fresh ones).
    admission_dialed: HashMap<PeerId, Instant>,
    /// Every peer's last known addresses: from --bootstrap, the restored
    /// checkpoint and heartbeats. Peers not connected are redialed.
    known: HashMap<PeerId, Vec<String>>,
    /// This process start (heartbeats carry it).
    boot: u64,
    /// Catch-up sources whose state could not be had, and when (tried again after 10 s).
    catch_up_failed: HashMap<PeerId, Instant>,
    ckpt: Arc<Checkpoints>,
    /// Why the last dial failed (said when no bootstrap peer can be reached).
    last_dial_error: Option<String>,
    /// The straggler deadline and who keeps missing rounds.
    stragglers: Stragglers<PeerId>,
    /// Members demoted for withholding, with the epoch: not named for the next one.
    withheld: HashMap<PeerId, u64>,
    /// Deadline closures and withholding demotions, for the report.
    admission: AdmissionReport,
    /// Heartbeats ignored because their sender is not admitted, by sender.
    unadmitted_heartbeats: BTreeMap<PeerId, u64>,
    /// When we last sent each peer a Hello.
    hello_sent: HashMap<PeerId, Instant>,
    /// Wake the event loop at this instant (a deadline being waited on).
    wake: Option<Instant>,
}

impl Node {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// A peer counts (its heartbeats, readiness and announcements) once this node
    /// holds an accepted Hello for it, in either direction: ours accepted by it, or
    /// its own accepted by our responder. (The heartbeat-only rogue trusts everyone,
    /// only to follow the run.)
    fn is_admitted(&self, p: &PeerId) -> bool {
        self.p2p.heartbeat_only || self.accepted.contains(p) || self.store.lock().expect("store lock").admitted.contains(p)
    }

    /// Sends `peer` our Hello (the run spec); the answer comes back through `hello_rx`.
    fn send_hello(&mut self, peer: PeerId) {
        if self.p2p.heartbeat_only {
            return; // the outsider never asks to be admitted
        }
        self.hello_sent.insert(peer, Instant::now());
        let (client, spec, tx) = (self.client.clone(), self.spec.clone(), self.hello_tx.clone());
        tokio::spawn(async move {
            let r = client.request(peer, Request::Hello { spec }).await.map_err(|e| e.to_string());
            let _ = tx.send((peer, r)).await;
        });
    }

    /// A heartbeat from a peer we have not admitted: ignored (it costs the sender
    /// nothing more), counted for the report. If we are not connected to it we dial
    /// it (a Hello follows the connection); if we are and our Hello got no answer,
    /// we ask again, at most every 3 s.
    async fn on_unadmitted_heartbeat(&mut self, author: PeerId, h: &Heartbeat) {
        *self.unadmitted_heartbeats.entry(author).or_insert(0) += 1;
        let now = Instant::now();
        let refused = self.store.lock().expect("store lock").refused.contains(&author);
        if refused {
            return;
        }
        if !self.connected.contains(&author) {
            // A peer we knew (from the checkpoint or --bootstrap) that came back
            // elsewhere: its signed heartbeat has its new addresses, and the
            // periodic redial should use them rather than the dead ones.
            if !h.addrs.is_empty() && self.known.contains_key(&author) {
                self.known.insert(author, h.addrs.iter().take(MAX_ADDRS_PER_PEER).cloned().collect());
            }
            if self.admission_dialed.get(&author).is_none_or(|t| now.duration_since(*t) >= Duration::from_secs(2)) {
                self.admission_dialed.insert(author, now);
                for a in h.addrs.iter().take(MAX_ADDRS_PER_PEER) {
                    if let Ok(addr) = a.parse::<Multiaddr>() {
                        let _ = self.client.dial(Some(author), addr).await;
                    }
                }
            }
        } else if self.hello_sent.get(&author).is_none_or(|t| now.duration_since(*t) >= Duration::from_secs(3)) {
            self.send_hello(author);
        }
    }

    /// Bookkeeping of a closed round: a full release feeds the deadline's median;
    /// a deadline closure is counted, and members missing `demote_after` such
    /// rounds in a row are demoted until the next epoch (not named for it).
    fn close_round(&mut self, round: u64, epoch: u64, contributors: &[PeerId], missing: &[PeerId], deadline: Duration, took: Duration) {
        if missing.is_empty() {
            self.stragglers.observe(took.as_millis() as u64);
            self.stragglers.closed(contributors, &[]);
            return;
        }
        let names: Vec<String> = missing.iter().map(|p| p.to_string()).collect();
        tracing::warn!(
            "round {round}: closed on the straggler deadline ({} ms after a quorum) with {} contributors, without {}",
            deadline.as_millis(),
            contributors.len(),
            names.join(", ")
        );
        // testnet reads this line.
        println!("deadline round {round} missing {}", names.join(","));
        self.admission.deadline_rounds.push(round);
        if let Some(m) = crate::metrics::get() {
            m.deadline_rounds.inc();
        }
        for p in self.stragglers.closed(contributors, missing) {
            if !self.rs.demote(&p) {
                continue;
            }
            self.withheld.insert(p, epoch);
            let n = self.p2p.straggler.demote_after;
            tracing::warn!("peer {p} missed {n} rounds in a row while alive: demoted until the next epoch, which it will not be named for");
            let incarnation = self.rs.members().get(&p).map_or(0, |m| m.incarnation);
            println!("member withholding {p} incarnation {incarnation}");
            crate::metrics::membership_event("withholding");
            self.membership_log.push(MembershipEvent { unix_ms: unix_ms(), peer: p.to_string(), event: "withholding".into(), incarnation });
            self.admission.withholding_demotions.push(WithholdingDemotion { peer: p.to_string(), round, epoch });
        }
    }

    /// The admission part of the report: peers that heartbeat and were never admitted.
    fn unadmitted_report(&self) -> Vec<Unadmitted> {
        self.unadmitted_heartbeats
            .iter()
            .filter(|(p, _)| !self.is_admitted(p))
            .map(|(p, n)| Unadmitted { peer: p.to_string(), heartbeats: *n })
            .collect()
    }

    fn control_topic(&self) -> String {
        format!("p2pml/{}/control", self.run_id)
    }
    fn epoch_topic(&self, epoch: u64) -> String {
        format!("p2pml/{}/epoch/{epoch}", self.run_id)
    }

    /// For the round being waited on: asks for the announcements of expected
    /// peers we hold nothing from (a missed gossip message, or a peer that joined
    /// the topic late), from the owner and any peer that saw it.
    fn recover_announcements(&mut self) {
        let round = self.round;
        for p in self.rs.expected() {
            if p == self.client.peer_id || self.rs.holds(round, &p) || self.announces.contains_key(&(round, p)) {
                continue;
            }
            if !self.asked.insert((round, p)) {
                continue;
            }
            let mut sources = vec![p];
            sources.extend(self.rs.live().into_iter().filter(|x| *x != p && *x != self.client.peer_id));
            let (client, tx) = (self.client.clone(), self.recovered_tx.clone());
            tokio::spawn(async move {
                for _ in 0..3 {
                    for src in &sources {
                        if let Ok(Response::Announcement(a)) =
                            client.request(*src, Request::Announcement { owner: p.to_bytes(), round }).await
                        {
                            let _ = tx.send((p, *a)).await;
                            return;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                // Not found: allow another attempt at the next heartbeat.
                let _ = tx.send((p, Announce::missing(round))).await;
            });
        }
    }

    async fn heartbeat(&mut self) {
        if let Ok(scores) = self.client.peer_scores().await {
            for (p, s) in scores {
                let e = self.scores.entry(p).or_insert(ScoreSeen { min: s, last: s });
                e.min = e.min.min(s);
                e.last = s;
            }
        }
        if self.p2p.garbage {
            // A rogue sends garbage where honest peers send heartbeats.
            let (round, epoch) = self.views.values().map(|v| (v.round, v.epoch)).max().unwrap_or((0, 0));
            self.publish_garbage(round, epoch).await;
            self.next_heartbeat = Instant::now() + Duration::from_millis(self.p2p.heartbeat_ms);
            return;
        }
        if self.p2p.heartbeat_only {
            // The outsider claims the round the run is at, to look like a member.
            let (round, epoch) = self.views.values().map(|v| (v.round, v.epoch)).max().unwrap_or((0, 0));
            self.round = round;
            self.epoch = epoch;
        }
        if self.ready {
            self.recover_announcements();
        }
        let now = self.now_ms();
        for change in self.rs.tick(now) {
            self.on_change(change);
        }
        crate::metrics::membership(self.connected.len(), self.rs.live().len());
        let members = self
            .rs
            .members()
            .iter()
            .map(|(p, m)| MemberEntry { peer: p.to_bytes(), incarnation: m.incarnation, alive: m.alive })
            .collect();
        let contributed = self
            .rs
            .recent_contributions(self.round.saturating_sub(2))
            .into_iter()
            .map(|(r, ps)| (r, ps.iter().map(|p| serde_bytes::ByteBuf::from(p.to_bytes())).collect()))
            .collect();
        let addrs = self.client.listen_addrs().await.unwrap_or_default().iter().map(|a| a.to_string()).collect();
        self.redial().await;
        let hb = Heartbeat {
            run_id: self.run_id.clone(),
            incarnation: self.rs.incarnation(),
            round: self.round,
            epoch: self.epoch,
            last_digest: self.last_digest,
            members,
            contributed,
            addrs,
            finished: self.finished,
            ready: self.ready || self.p2p.heartbeat_only,
            active: self.rs.active_members().iter().map(|p| serde_bytes::ByteBuf::from(p.to_bytes())).collect(),
            boot: self.boot,
        };
        let topic = self.control_topic();
        if let Err(e) = self.client.publish(&topic, wire::encode(&Gossip::Heartbeat(hb))).await {
            tracing::debug!("heartbeat: {e}");
        }
        self.next_heartbeat = Instant::now() + Duration::from_millis(self.p2p.heartbeat_ms);
    }

    fn on_change(&mut self, c: Change<PeerId>) {
        let (peer, event, incarnation) = match &c {
            Change::Joined(p) => {
                tracing::info!("peer {p} joined");
                (*p, "joined", self.rs.members().get(p).map_or(0, |m| m.incarnation))
            }
            Change::Rejoined { peer, incarnation } => {
                tracing::info!("peer {peer} rejoined (incarnation {incarnation}); it follows until the next epoch");
                (*peer, "rejoined", *incarnation)
            }
            Change::Died(p) => {
                tracing::warn!("peer {p} declared dead (connection closed, or silent for {} ms)", self.p2p.failure_timeout_ms);
                (*p, "died", self.rs.members().get(p).map_or(0, |m| m.incarnation))
            }
            Change::Refuted { incarnation } => {
                tracing::warn!("a peer declared this node dead: refuted with incarnation {incarnation}");
                // The next start must be higher still.
                if let Err(e) = self.ckpt.note_incarnation(*incarnation) {
                    tracing::warn!("cannot record incarnation {incarnation}: {e}");
                }
                (self.client.peer_id, "refuted", *incarnation)
            }
        };
        // testnet reads this line to time failure detection.
        println!("member {event} {peer} incarnation {incarnation}");
        crate::metrics::membership_event(event);
        self.membership_log.push(MembershipEvent { unix_ms: unix_ms(), peer: peer.to_string(), event: event.into(), incarnation });
    }

    /// Dials known peers we are not connected to (after a partition heals, or a
    /// peer restarted, or our bootstrap peer died), each at most every two seconds.
    async fn redial(&mut self) {
        let now = Instant::now();
        let mut dial = Vec::new();
        for (p, addrs) in &self.known {
            if self.connected.contains(p) || self.views.get(p).is_some_and(|v| v.finished) {
                continue;
            }
            if self.redialed.get(p).is_some_and(|t| now.duration_since(*t) < Duration::from_secs(2)) {
                continue;
            }
            dial.push((*p, addrs.clone()));
        }
        for (p, addrs) in dial {
            self.redialed.insert(p, now);
            for a in addrs {
                if let Ok(addr) = a.parse::<Multiaddr>() {
                    let _ = self.client.dial(Some(p), addr).await;
                }
            }
        }
    }

    /// A live, ready peer at least two rounds ahead of us (we will not be waited
    /// for in the rounds between): the furthest one, to state-sync from.
    fn catch_up_source(&self) -> Option<PeerId> {
        let now = Instant::now();
        self.views
            .iter()
            .filter(|(p, _)| self.catch_up_failed.get(p).is_none_or(|t| now.duration_since(*t) > Duration::from_secs(10)))
            // A finished peer holds the run's final state: a peer left behind
            // (the minority side of a partition) catches up from it too.
            .filter(|(p, v)| v.ready && v.round >= self.round + 2 && self.rs.is_alive(p))
            .max_by_key(|(_, v)| v.round)
            .map(|(p, _)| *p)
    }

    /// Handles one input: a network event, a finished fetch, a Hello answer or a timer.
    async fn pump(&mut self) -> anyhow::Result<()> {
        let sleep = tokio::time::sleep_until(self.next_heartbeat.into());
        let wake = self.wake;
        tokio::select! {
            ev = self.events.recv() => match ev {
                Some(ev) => self.on_event(ev).await,
                None => bail!("the network task stopped"),
            },
            Some(f) = self.fetch_rx.recv() => self.on_fetched(f),
            Some((peer, r)) = self.hello_rx.recv() => self.on_hello(peer, r).await?,
            Some((owner, a)) = self.recovered_rx.recv() => {
                self.asked.remove(&(a.round, owner));
                // Signed by its author and well-formed: used like a gossiped one (a
                // bad gradient in it is dropped at aggregation, on every peer alike).
                let g = Gossip::Announce(a);
                if g.validate(&self.run_id, self.round).is_ok() && self.is_admitted(&owner) {
                    self.on_gossip(owner, g).await;
                }
            }
            _ = sleep => self.heartbeat().await,
            // A deadline the caller waits on (nothing to do but return to it).
            _ = async move {
                match wake {
                    Some(w) => tokio::time::sleep_until(w.into()).await,
                    None => std::future::pending().await,
                }
            } => self.wake = None,
        }
        Ok(())
    }

    /// Runs `fut` (blocking work on another thread) while keeping the node responsive.
    async fn while_pumping<T>(&mut self, fut: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return Ok(out),
                r = self.pump() => r?,
            }
        }
    }

    async fn on_hello(&mut self, peer: PeerId, r: Result<Response, String>) -> anyhow::Result<()> {
        match r {
            Ok(Response::Hello { accepted: true, round, .. }) => {
                if self.accepted.insert(peer) {
                    tracing::debug!("peer {peer} admitted (it accepted our Hello)");
                }
                self.hello_round = self.hello_round.max(round);
            }
            Ok(Response::Hello { accepted: false, reason, .. }) => {
                self.accepted.remove(&peer);
                let reason = reason.unwrap_or_default();
                // Only the node that asked to join (through this bootstrap peer)
                // gives up; a run's member just ignores a stranger.
                if self.accepted.is_empty() && self.bootstrap_peers.contains(&peer) {
                    bail!(
                        "peer {peer} refused to let this node join: {reason}. Start the node with the run's settings or start a new run"
                    );
                }
                tracing::warn!("peer {peer} runs a different configuration ({reason}); ignoring it");
                // Disconnect a little later, so that our own refusal of its Hello
                // reaches it first (it exits with that reason instead of timing out).
                let client = self.client.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    let _ = client.disconnect(peer).await;
                });
            }
            Ok(other) => tracing::debug!("unexpected hello answer from {peer}: {other:?}"),
            Err(e) => tracing::debug!("hello to {peer} failed: {e}"),
        }
        Ok(())
    }

    async fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Connected(peer) => {
                self.connected.insert(peer);
                self.rs.unsuspect(&peer);
                self.send_hello(peer);
            }
            Event::Disconnected(peer) => {
                self.connected.remove(&peer);
                let now = self.now_ms();
                self.rs.suspect(&peer, now);
                tracing::debug!("disconnected from {peer}");
            }
            Event::DialFailed { peer, error } => {
                tracing::debug!("dial {peer:?} failed: {error}");
                self.last_dial_error = Some(error);
            }
            Event::Gossip { id, propagated_by, author, data } => {
                let refused = self.store.lock().expect("store lock").refused.contains(&author);
                let msg = if refused {
                    Err(wire::WireError::Invalid("sender runs another configuration".into()))
                } else {
                    Gossip::decode_valid(&data, &self.run_id, self.round)
                };
                match msg {
                    // Only admitted peers count (an accepted Hello, either way): an
                    // outsider's heartbeat is dropped unforwarded and makes nobody a
                    // member; its announcements are dropped too.
                    Ok(Gossip::Heartbeat(h)) if author != self.client.peer_id && !self.is_admitted(&author) => {
                        tracing::debug!("ignored a heartbeat from {author}: not admitted (no accepted Hello)");
                        let _ = self.client.ignore(id, propagated_by).await;
                        self.on_unadmitted_heartbeat(author, &h).await;
                    }
                    // Gradients come from admitted members only (heartbeats make
                    // members): one from a peer we have not heard yet is fetched again
                    // once it is a member.
                    Ok(Gossip::Announce(_))
                        if author != self.client.peer_id && (!self.is_admitted(&author) || !self.rs.members().contains_key(&author)) =>
                    {
                        tracing::debug!("ignored an announcement from {author}: not an admitted member");
                        let _ = self.client.ignore(id, propagated_by).await;
                    }
                    Ok(g) => {
                        let payload = self.check_payload(&g);
                        if let Err(e) = &payload {
                            // Signed and well-formed, but its gradient is unusable: not
                            // forwarded, and its sender is scored down. It still counts at
                            // the barrier (aggregation drops it on every peer alike), so
                            // that a byzantine peer cannot stall the round.
                            tracing::debug!("rejected gossip from {author} via {propagated_by}: {e}");
                        }
                        let _ = self.client.validate(id, propagated_by, payload.is_ok()).await;
                        if author != self.client.peer_id {
                            self.on_gossip(author, g).await;
                        }
                    }
                    // A restarting node far behind the run drops announcements it cannot
                    // use yet, without lowering the score of the honest peers that sent them.
                    Err(e @ wire::WireError::OutOfWindow(_)) => {
                        tracing::debug!("ignored gossip from {author} via {propagated_by}: {e}");
                        let _ = self.client.ignore(id, propagated_by).await;
                    }
                    Err(e) => {
                        tracing::debug!("rejected gossip from {author} via {propagated_by}: {e}");
                        let _ = self.client.validate(id, propagated_by, false).await;
                    }
                }
            }
        }
    }

    /// Model-aware checks: at most a round's samples, and an inline gradient must
    /// decode to the model's length with the run's compression (fetched ones are
    /// checked after the fetch).
    fn check_payload(&self, g: &Gossip) -> Result<(), wire::WireError> {
        if let Gossip::Announce(a) = g {
            // A round's gradient sums at most its batches: a larger count would
            // buy its sender more weight in the mean.
            let most = max_round_samples(&self.p2p, self.batch_size);
            if a.samples > most {
                return Err(wire::WireError::Invalid(format!("{} samples in a round of at most {most}", a.samples)));
            }
            if let Some(inline) = &a.inline {
                p2pml_proto::decode_gradient(inline, &self.compression, self.numel)
                    .map_err(|e| wire::WireError::Invalid(format!("inline gradient: {e}")))?;
            }
        }
        Ok(())
    }

    /// Fault injection (--fault-garbage): publishes invalid messages of every kind
    /// the validation must stop.
    async fn publish_garbage(&mut self, round: u64, epoch: u64) {
        let topic = self.epoch_topic(epoch);
        let mut bad = vec![
            vec![0xff, 0x00, 0x13, 0x37],          // not CBOR
            wire::encode(&"a string, not a message"), // CBOR, wrong type
        ];
        let honest = Announce {
            run_id: self.run_id.clone(),
            round: round + 1,
            epoch,
            samples: 64,
            loss_sum: 1.0,
            val: None,
            len: 8,
            digest: *blake3::hash(&[0u8; 8]).as_bytes(),
            inline: Some(serde_bytes::ByteBuf::from(vec![0u8; 8])),
            joiners: vec![],
        };
        // A gradient of the wrong length (8 bytes for a model of many parameters).
        bad.push(wire::encode(&Gossip::Announce(honest.clone())));
        // A round far ahead of everyone.
        bad.push(wire::encode(&Gossip::Announce(Announce { round: round + 10_000, ..honest.clone() })));
        // An honest announcement cut short.
        let mut cut = wire::encode(&Gossip::Announce(honest.clone()));
        cut.truncate(cut.len() / 2);
        bad.push(cut);
        if self.p2p.forge {
            // Forged (unsigned, "from" the first bootstrap peer): a well-formed
            // announcement of the next round's gradient that, were it accepted
            // first, would stand in for that peer's real one.
            let plain = self.numel as u64 * 4;
            bad.push(wire::encode(&Gossip::Announce(Announce {
                round: round + 1,
                samples: max_round_samples(&self.p2p, self.batch_size),
                len: plain,
                digest: *blake3::hash(b"forged").as_bytes(),
                inline: None,
                ..honest.clone()
            })));
        }
        // Another run's message.
        bad.push(wire::encode(&Gossip::Announce(Announce { run_id: "0000000000000000".into(), ..honest })));
        for b in bad {
            if self.client.publish(&topic, b).await.is_ok() {
                self.garbage_sent += 1;
            }
        }
    }

    async fn on_gossip(&mut self, author: PeerId, g: Gossip) {
        let now = self.now_ms();
        match g {
            Gossip::Heartbeat(h) => {
                if let Some(c) = self.rs.heard(author, h.incarnation, now) {
                    self.on_change(c);
                }
                for m in &h.members {
                    if let Ok(p) = PeerId::from_bytes(&m.peer) {
                        if let Some(c) = self.rs.merge_member(p, m.incarnation, m.alive, now) {
                            self.on_change(c);
                        }
                    }
                }
                for (r, ps) in &h.contributed {
                    for p in ps {
                        if let Ok(p) = PeerId::from_bytes(p) {
                            self.rs.contributed(*r, p);
                        }
                    }
                }
                if let Some((r, d)) = h.last_digest {
                    self.digests.entry(r).or_default().insert(author, d);
                }
                for e in [h.epoch, h.epoch + 1] {
                    if self.subscribed.insert(e) {
                        let _ = self.client.subscribe(&self.epoch_topic(e)).await;
                    }
                }
                let is_new = !self.views.contains_key(&author);
                if self.views.get(&author).is_some_and(|v| v.boot != 0 && v.boot != h.boot) && self.rs.demote(&author) {
                    tracing::info!("peer {author} restarted; it follows until the next epoch");
                }
                let active = h.active.iter().filter_map(|b| PeerId::from_bytes(b).ok()).collect();
                let view = PeerView { round: h.round, epoch: h.epoch, finished: h.finished, ready: h.ready, active, boot: h.boot };
                self.views.insert(author, view);
                if !h.addrs.is_empty() {
                    // A few addresses per peer: a heartbeat cannot make us dial a long list.
                    self.known.insert(author, h.addrs.iter().take(MAX_ADDRS_PER_PEER).cloned().collect());
                }
                if is_new {
                    for a in &h.addrs {
                        if let Ok(addr) = a.parse::<Multiaddr>() {
                            let _ = self.client.dial(Some(author), addr).await;
                        }
                    }
                }
            }
            Gossip::Announce(a) => {
                if let Some(c) = self.rs.heard(author, self.rs.members().get(&author).map_or(1, |m| m.incarnation), now) {
                    self.on_change(c);
                }
                let key = (a.round, author);
                if a.round < self.round || self.announces.contains_key(&key) {
                    return;
                }
                self.store.lock().expect("store lock").insert_announce(&author, a.clone());
                self.rs.contributed(a.round, author);
                if let Some(inline) = &a.inline {
                    let blob = inline.to_vec();
                    self.announces.insert(key, a.clone());
                    self.on_fetched(Fetched { round: a.round, owner: author, result: Ok(blob) });
                } else {
                    self.announces.insert(key, a.clone());
                    self.start_fetch(a.round, author);
                }
            }
        }
    }

    /// Fetches `owner`'s gradient for `round` in chunks, from the owner first and
    /// then from any other peer that has it.
    fn start_fetch(&mut self, round: u64, owner: PeerId) {
        if !self.fetching.insert((round, owner)) {
            return;
        }
        let Some(a) = self.announces.get(&(round, owner)).cloned() else { return };
        let mut sources = vec![owner];
        sources.extend(self.rs.contributors(round).into_iter().filter(|p| *p != owner && *p != self.client.peer_id));
        let client = self.client.clone();
        let tx = self.fetch_tx.clone();
        tokio::spawn(async move {
            let mut last_err = String::from("no source");
            for attempt in 0..6 {
                let src = sources[attempt % sources.len()];
                match fetch_blob(&client, src, owner, round, a.len).await {
                    Ok(blob) if *blake3::hash(&blob).as_bytes() == a.digest => {
                        let _ = tx.send(Fetched { round, owner, result: Ok(blob) }).await;
                        return;
                    }
                    Ok(_) => last_err = format!("digest mismatch from {src}"),
                    Err(e) => last_err = e,
                }
                tokio::time::sleep(Duration::from_millis(100 << attempt.min(4))).await;
            }
            let _ = tx.send(Fetched { round, owner, result: Err(last_err) }).await;
        });
    }

    fn on_fetched(&mut self, f: Fetched) {
        self.fetching.remove(&(f.round, f.owner));
        match f.result {
            Ok(blob) => {
                let Some(a) = self.announces.get(&(f.round, f.owner)) else { return };
                if *blake3::hash(&blob).as_bytes() != a.digest || blob.len() as u64 != a.len {
                    tracing::warn!("gradient of {} for round {} does not match its announcement", f.owner, f.round);
                    return;
                }
                self.store.lock().expect("store lock").insert(f.round, &f.owner, Arc::new(blob));
                self.rs.hold(f.round, f.owner);
            }
            Err(e) => {
                tracing::warn!("could not fetch the gradient of {} for round {}: {e}", f.owner, f.round);
                // Try again while the round is still ahead and its author alive.
                let wanted = f.round >= self.round && self.rs.is_alive(&f.owner);
                if wanted && self.announces.contains_key(&(f.round, f.owner)) {
                    self.start_fetch(f.round, f.owner);
                }
            }
        }
    }

    /// Waits until `ready` says so, pumping events; prints why while it waits.
    async fn wait_until(&mut self, what: &str, mut ready: impl FnMut(&mut Node) -> bool) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let mut next_note = start + Duration::from_secs(10);
        while !ready(self) {
            self.pump().await?;
            if Instant::now() > next_note {
                tracing::info!("still waiting for {what} ({:.0} s)", start.elapsed().as_secs_f64());
                next_note = Instant::now() + Duration::from_secs(10);
            }
        }
        Ok(start.elapsed())
    }
}

pub(crate) async fn fetch_blob(client: &Client, src: PeerId, owner: PeerId, round: u64, len: u64) -> Result<Vec<u8>, String> {
    let t0 = Instant::now();
    let r = fetch_chunks(client, src, owner, round, len).await;
    if r.is_ok() {
        crate::metrics::stage("receive", t0.elapsed().as_secs_f64());
    }
    r
}

async fn fetch_chunks(client: &Client, src: PeerId, owner: PeerId, round: u64, len: u64) -> Result<Vec<u8>, String> {
    let n = chunks(len);
    let reqs = (0..n).map(|index| {
        let client = client.clone();
        async move { client.request(src, Request::Chunk { owner: owner.to_bytes(), round, index }).await }
    });
    let parts = futures::future::join_all(reqs).await;
    let mut blob = Vec::with_capacity(len as usize);
    for p in parts {
        match p.map_err(|e| e.to_string())? {
            Response::Chunk { total_len, data } if total_len == len => blob.extend_from_slice(&data),
            Response::Chunk { .. } => return Err(format!("{src} has a different blob")),
            Response::Missing => return Err(format!("{src} does not have it")),
            other => return Err(format!("unexpected answer {other:?}")),
        }
    }
    if blob.len() as u64 != len {
        return Err(format!("got {} of {len} bytes", blob.len()));
    }
    Ok(blob)
}

/// Serves inbound requests from the shared store until the network stops.
pub(crate) async fn responder(client: Client, store: SharedStore, spec: RunSpec, mut requests: mpsc::Receiver<InboundRequest>) {
    while let Some(r) = requests.recv().await {
        let response = store.lock().expect("store lock").answer(&spec, r.peer, r.request);
        if client.respond(r.channel, response).await.is_err() {
            return;
        }
    }
}

/// The work of one round: this peer's gradient, summed over its batches.
pub(crate) struct Computed {
    pub(crate) grad: Vec<f32>,
    pub(crate) loss_sum: f64,
    pub(crate) samples: u64,
    pub(crate) secs: f64,
}

/// Model, optimizer and data: moved onto a blocking thread for each heavy step.
pub(crate) struct Trainer {
    pub(crate) model: Model,
    pub(crate) opt: Optimizer,
    pub(crate) train: TensorData,
}

/// Decodes a round's gradients (in the order given: the same on every node) and
/// combines them with `rule`: `mean` streams the sample-weighted mean; the robust
/// rules combine the per-peer mean gradients ([`p2pml_proto::robust`]). Returns the
/// gradient, the samples and loss summed, and the seconds spent decoding and
/// aggregating. A gradient that does not decode (wrong length, NaN) or claims more
/// than `max_samples` is dropped with a warning.
pub(crate) fn aggregate(
    inputs: &[(u64, f64, Arc<Vec<u8>>)],
    compression: &p2pml_proto::Compression,
    numel: usize,
    rule: &Aggregation,
    max_samples: u64,
) -> (Vec<f32>, u64, f64, f64, f64) {
    let mut acc = vec![0f32; if rule.is_mean() { numel } else { 0 }];
    let mut per_peer: Vec<Vec<f32>> = Vec::new();
    let mut weights = Vec::new();
    let (mut samples, mut loss) = (0u64, 0f64);
    let (mut dec, mut agg) = (Duration::ZERO, Duration::ZERO);
    let drop_invalid = |why: String| {
        tracing::warn!("dropping a gradient: {why}");
        if let Some(m) = crate::metrics::get() {
            m.invalid_pushes.inc();
        }
    };
    for (s, l, blob) in inputs {
        if *s > max_samples {
            drop_invalid(format!("{s} samples in a round of at most {max_samples}"));
            continue;
        }
        if *s == 0 && !rule.is_mean() {
            // A peer without a batch this round: no vote (the mean gives it no weight).
            continue;
        }
        let t = Instant::now();
        let decoded = p2pml_proto::decode_gradient(blob, compression, numel);
        dec += t.elapsed();
        match decoded {
            Ok(mut v) => {
                let t = Instant::now();
                if rule.is_mean() {
                    for (a, x) in acc.iter_mut().zip(&v) {
                        *a += *x;
                    }
                } else {
                    let scale = 1.0 / (*s).max(1) as f32;
                    v.iter_mut().for_each(|x| *x *= scale);
                    per_peer.push(v);
                    weights.push(*s);
                }
                agg += t.elapsed();
                samples += s;
                loss += l;
            }
            Err(e) => drop_invalid(format!("it does not decode ({e})")),
        }
    }
    let t = Instant::now();
    if rule.is_mean() {
        let scale = 1.0 / samples.max(1) as f32;
        for a in acc.iter_mut() {
            *a *= scale;
        }
    } else if per_peer.is_empty() {
        acc = vec![0f32; numel];
    } else {
        let (g, chosen) = p2pml_proto::robust::combine(rule, &per_peer, &weights);
        if let Some(i) = chosen {
            tracing::debug!("{rule} chose input {i} of {}", per_peer.len());
        }
        acc = g;
    }
    agg += t.elapsed();
    (acc, samples, loss, dec.as_secs_f64(), agg.as_secs_f64())
}

/// The most samples one peer's gradient of a round can sum.
pub(crate) fn max_round_samples(p2p: &P2pConfig, batch_size: usize) -> u64 {
    (p2p.batches_per_round * batch_size) as u64
}

/// The run's compression and aggregation rule, and this peer's attack (--byzantine).
pub(crate) fn wire_rules(p2p: &P2pConfig) -> anyhow::Result<(p2pml_proto::Compression, Aggregation, Option<Attack>)> {
    let compression = p2p.compression.parse().map_err(|e| anyhow!("--compression: {e}"))?;
    let rule = p2p.aggregation.parse().map_err(|e| anyhow!("--aggregation: {e}"))?;
    let attack = p2p.byzantine.as_deref().map(str::parse).transpose().map_err(|e| anyhow!("--byzantine: {e}"))?;
    if let Some(a) = &attack {
        tracing::warn!("byzantine mode: this peer sends {a} gradients");
    }
    Ok((compression, rule, attack))
}

/// Encodes this peer's gradient for the wire; a byzantine peer (--byzantine)
/// poisons it first.
pub(crate) fn encode_own(
    grad: &mut [f32],
    samples: u64,
    compression: &p2pml_proto::Compression,
    seed: u64,
    attack: Option<&Attack>,
    round: u64,
) -> anyhow::Result<Vec<u8>> {
    if let Some(a) = attack {
        a.apply(grad, samples, seed);
    }
    let mut blob = p2pml_proto::encode_gradient(grad, compression, seed)
        .map_err(|e| {
            anyhow!("round {round}: cannot encode the gradient ({e}); the run diverged: lower --lr, or, if a peer may be byzantine, use a robust --aggregation (median, trimmed-mean:BETA, krum:F)")
        })?;
    if let Some(a) = attack {
        a.poison(&mut blob);
    }
    Ok(blob)
}

/// One round's work for the function tier.
pub(crate) struct Offload<'a> {
    pub(crate) run: &'a str,
    pub(crate) peer: &'a str,
    pub(crate) round: u64,
    pub(crate) epoch: u64,
    pub(crate) cfg: &'a TrainConfig,
    pub(crate) numel: usize,
    pub(crate) train: &'a p2pml_lambda_grad::data::Split,
    /// The whole epoch's batches of this peer (uploaded once per epoch).
    pub(crate) epoch_batches: &'a [Vec<usize>],
    /// Indices into `epoch_batches` of this round's batches.
    pub(crate) batch_ids: Vec<usize>,
    pub(crate) tasks: &'a [TaskPlan],
    pub(crate) params: Arc<Vec<f32>>,
    pub(crate) params_digest: String,
    /// Whether this peer puts the parameters in the store ([`exec::params_uploader`]).
    pub(crate) uploader: bool,
}

/// Runs a round's tasks in the function tier ([`LambdaExecutor::offload`]).
/// Returns the outputs, the tasks to compute locally instead, and the seconds
/// spent putting the inputs in the store.
pub(crate) async fn offload(lx: &mut LambdaExecutor, w: Offload<'_>) -> (Vec<(usize, GradOutput)>, Vec<usize>, f64) {
    let before = lx.stats.peer_upload_ms / 1e3 + lx.stats.data_upload_seconds;
    let work = exec::RoundWork {
        run: w.run,
        peer: w.peer,
        round: w.round,
        epoch: w.epoch,
        model: w.cfg.model,
        dataset: w.cfg.dataset,
        normalization: w.cfg.normalization,
        seed: w.cfg.seed,
        numel: w.numel,
        params_digest: &w.params_digest,
        batch_ids: &w.batch_ids,
        tasks: w.tasks,
        train: w.train,
        epoch_batches: w.epoch_batches,
        params: &w.params,
        uploader: w.uploader,
    };
    let out = lx.offload(&work).await;
    let upload = lx.stats.peer_upload_ms / 1e3 + lx.stats.data_upload_seconds - before;
    (out.outputs, out.failed, upload)
}

/// Computes `tasks` of a round locally, each seeded as the function tier seeds
/// it: one summed gradient per task, in task order.
pub(crate) fn compute_tasks(t: &mut Trainer, batches: &[Vec<usize>], tasks: &[TaskPlan]) -> Vec<(usize, GradOutput)> {
    tasks
        .iter()
        .map(|task| {
            tch::manual_seed(task.dropout_seed as i64);
            let g = t.model.gradient_sum(batches[task.batches.clone()].iter().map(|b| t.train.batch(b)));
            let grad = Vec::<f32>::try_from(&g.grad.to_device(tch::Device::Cpu)).expect("f32 gradient");
            (task.index, GradOutput { samples: g.samples as u64, loss_sum: g.loss_sum, grad })
        })
        .collect()
}

/// Sums task outputs in task order (the same order wherever they were computed).
pub(crate) fn sum_outputs(mut outputs: Vec<(usize, GradOutput)>, numel: usize, secs: f64) -> Computed {
    outputs.sort_by_key(|(i, _)| *i);
    let mut grad = vec![0f32; numel];
    let (mut loss_sum, mut samples) = (0.0, 0u64);
    for (_, o) in &outputs {
        for (a, x) in grad.iter_mut().zip(&o.grad) {
            *a += *x;
        }
        loss_sum += o.loss_sum;
        samples += o.samples;
    }
    Computed { grad, loss_sum, samples, secs }
}

/// What every role sets up the same way: the network (private if --swarm-key),
/// the printed addresses, metrics and the control stdin.
pub(crate) struct Net {
    pub(crate) client: Client,
    pub(crate) events: mpsc::Receiver<Event>,
    pub(crate) requests: mpsc::Receiver<InboundRequest>,
    pub(crate) me: PeerId,
}

pub(crate) async fn start_net(p2p: &P2pConfig, run_id: &str) -> anyhow::Result<Net> {
    let mut listen = Vec::new();
    for a in &p2p.listen {
        listen.push(a.parse::<Multiaddr>().map_err(|e| anyhow!("--listen {a} is not a multiaddr ({e}); for example /ip4/0.0.0.0/tcp/4001"))?);
    }
    std::fs::create_dir_all(&p2p.state_dir).with_context(|| format!("cannot create --state-dir {}", p2p.state_dir.display()))?;
    let key = match p2p.identity_seed {
        Some(seed) => net::key_from_seed(seed),
        None => net::load_or_create_key(&p2p.state_dir.join("peer.key"))?,
    };
    let psk = p2p.swarm_key.as_deref().map(net::load_swarm_key).transpose()?;
    let forge_as = match (p2p.forge, p2p.bootstrap.first()) {
        (true, Some(b)) => match b.parse::<Multiaddr>().ok().and_then(|a| a.iter().last().map(|p| p.acquire())) {
            Some(libp2p::multiaddr::Protocol::P2p(p)) => Some(p),
            _ => bail!("--fault-forge: --bootstrap {b} must end in /p2p/<peer id>"),
        },
        _ => None,
    };
    if psk.is_some() {
        tracing::info!("private swarm: only peers with the same --swarm-key can connect");
    }
    let (client, events, requests, event_loop) = net::new(key, &listen, &net::NetOptions { psk, forge_as })?;
    tokio::spawn(event_loop.run());
    if p2p.control_stdin {
        tokio::spawn(crate::p2p::control_stdin(client.clone()));
    }
    let me = client.peer_id;
    let started = Instant::now();
    let addrs = loop {
        let a = client.listen_addrs().await?;
        let concrete: Vec<_> = a.into_iter().filter(|a| !a.to_string().contains("/tcp/0")).collect();
        if !concrete.is_empty() || started.elapsed() > Duration::from_secs(5) {
            break concrete;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for a in &addrs {
        println!("listening {a}/p2p/{me}");
    }
    println!("peer {me} run {run_id} role {}", p2p.role.as_str());
    crate::p2p::start_metrics(p2p, p2p.role.as_str(), &me, &client).await?;
    Ok(Net { client, events, requests, me })
}

/// Joins (or starts) a decentralized run and trains until it ends.
pub async fn run(cfg: TrainConfig, p2p: P2pConfig) -> anyhow::Result<NodeReport> {
    cfg.validate()?;
    p2p.validate().map_err(|e| anyhow!(e))?;
    // A mistake in --state-dir or --report costs seconds, not a training run.
    crate::fsutil::check_node_outputs(&p2p).map_err(|e| anyhow!(e))?;
    if cfg.threads > 0 {
        p2pml_lambda_grad::set_torch_threads(cfg.threads);
    }
    let device = cfg.device.resolve()?;
    let spec = run_spec(&cfg, &p2p);
    let run_id = spec.run_id();
    let (compression, rule, attack) = wire_rules(&p2p)?;
    // The function tier's settings are checked before the network starts: a
    // wrong bucket or endpoint costs seconds, not a joined run.
    let mut lambda = match p2p.exec.executor {
        ExecutorKind::Lambda if !(p2p.garbage || p2p.heartbeat_only) => Some(LambdaExecutor::new(&p2p.exec).await?),
        _ => None,
    };

    let mut bootstrap = Vec::new();
    for a in &p2p.bootstrap {
        let addr: Multiaddr = a.parse().map_err(|e| anyhow!("--bootstrap {a} is not a multiaddr ({e}); for example /ip4/10.0.0.1/tcp/4001/p2p/12D3Koo..."))?;
        let peer = match addr.iter().last() {
            Some(libp2p::multiaddr::Protocol::P2p(p)) => p,
            _ => bail!("--bootstrap {a} must end in /p2p/<peer id> (the id the bootstrap node prints at start)"),
        };
        bootstrap.push((peer, addr));
    }

    // Data and model before the network, so that a bad flag fails fast.
    let ds = cfg.load_dataset()?;
    let n_train = ds.train.len();
    let val_partition = Partition::new(n_train, cfg.val_size, 1, cfg.seed)?;
    let train = TensorData::new(&ds.train, cfg.dataset, cfg.normalization, device);
    let val_all: Vec<usize> = val_partition.validation().to_vec();
    let test = TensorData::new(&ds.test, cfg.dataset, cfg.normalization, device);
    let model = Model::new(ModelSpec::for_dataset(cfg.model, cfg.dataset), device, cfg.seed)?;
    let opt = Optimizer::new(cfg.optimizer);
    let numel = model.numel();
    let max_samples = max_round_samples(&p2p, cfg.batch_size);

    // --state-dir and --report writable (a probe file), before any training.
    crate::fsutil::check_node_outputs(&p2p).map_err(|e| anyhow!(e))?;
    let started_unix_ms = unix_ms();
    // Checkpoints (and the incarnation counter) before the network: a restarted
    // node announces a higher incarnation from its first heartbeat.
    let ckpt = Arc::new(Checkpoints::open_for(&p2p, &spec)?);
    let incarnation = ckpt.next_incarnation()?;
    let mut ckpt_stats = CheckpointStats::default();
    let mut model = model;
    let mut opt = opt;
    let mut conv = Convergence::new(&p2p);
    let restored = if p2p.checkpoint_every > 0 { restore_checkpoint(&ckpt, &mut model, &mut opt, &mut conv, &mut ckpt_stats)? } else { None };
    let Net { client, events, requests, me } = start_net(&p2p, &run_id).await?;
    let store: SharedStore = Arc::new(Mutex::new(Store::default()));
    if p2p.heartbeat_only {
        // The outsider answers nothing: requests are dropped unanswered.
        let mut requests = requests;
        tokio::spawn(async move { while requests.recv().await.is_some() {} });
    } else {
        tokio::spawn(responder(client.clone(), store.clone(), spec.clone(), requests));
    }

    let (fetch_tx, fetch_rx) = mpsc::channel(256);
    let (hello_tx, hello_rx) = mpsc::channel(64);
    let (recovered_tx, recovered_rx) = mpsc::channel(64);
    let mut node = Node {
        rs: RoundState::new(me, incarnation, p2p.min_peers, p2p.failure_timeout_ms),
        p2p: p2p.clone(),
        spec: spec.clone(),
        run_id: run_id.clone(),
        client: client.clone(),
        events,
        store: store.clone(),
        announces: HashMap::new(),
        fetching: HashSet::new(),
        fetch_tx,
        fetch_rx,
        digests: BTreeMap::new(),
        views: HashMap::new(),
        accepted: HashSet::new(),
        hello_tx,
        hello_rx,
        round: 0,
        epoch: 0,
        last_digest: None,
        finished: false,
        start: Instant::now(),
        next_heartbeat: Instant::now(),
        gradient_bytes_sent: 0,
        digest_mismatches: 0,
        applied: HashSet::new(),
        ready: false,
        hello_round: 0,
        last_contributors: Vec::new(),
        asked: HashSet::new(),
        subscribed: HashSet::from([0]),
        bootstrap_peers: bootstrap.iter().map(|(p, _)| *p).collect(),
        compression,
        numel,
        recovered_tx,
        recovered_rx,
        n_train_minus_val: n_train - cfg.val_size,
        batch_size: cfg.batch_size,
        connected: HashSet::new(),
        scores: BTreeMap::new(),
        garbage_sent: 0,
        membership_log: Vec::new(),
        planned_next: None,
        redialed: HashMap::new(),
        admission_dialed: HashMap::new(),
        known: known_addresses(&bootstrap, restored.as_ref().map(|r| &r.meta), &me),
        boot: started_unix_ms,
        catch_up_failed: HashMap::new(),
        ckpt: ckpt.clone(),
        last_dial_error: None,
        stragglers: Stragglers::new(p2p.straggler.factor, p2p.straggler.floor_ms, p2p.straggler.cap_ms, p2p.straggler.demote_after),
        withheld: HashMap::new(),
        admission: AdmissionReport::default(),
        unadmitted_heartbeats: BTreeMap::new(),
        hello_sent: HashMap::new(),
        wake: None,
    };
    if let Some(r) = &restored {
        node.round = r.header.round + 1;
        node.epoch = r.header.epoch;
        let d = digest_of(&r.params);
        node.last_digest = Some((r.header.round, d));
        store.lock().expect("store lock").set_state(StateBlob { round: r.header.round, epoch: r.header.epoch, bytes: Arc::new(r.state.clone()) });
    }
    client.subscribe(&node.control_topic()).await?;
    client.subscribe(&node.epoch_topic(0)).await?;
    for (peer, addr) in &bootstrap {
        client.dial(Some(*peer), addr.clone()).await?;
    }
    if !bootstrap.is_empty() {
        let deadline = Instant::now() + Duration::from_secs(30);
        let peers: Vec<PeerId> = bootstrap.iter().map(|(p, _)| *p).collect();
        // Any bootstrap peer will do, or a peer the checkpoint remembers.
        // (The heartbeat-only outsider only needs a connection.)
        let reached = |n: &Node| {
            n.accepted.iter().any(|p| peers.contains(p) || n.known.contains_key(p)) || (n.p2p.heartbeat_only && !n.connected.is_empty())
        };
        while !reached(&node) {
            if Instant::now() > deadline {
                let why = node.last_dial_error.as_deref().map(|e| format!(" (last error: {e})")).unwrap_or_default();
                bail!(
                    "cannot reach any bootstrap peer ({}) within 30 s{why}: check the address, that the peer runs, and that both use the same --swarm-key (or neither)",
                    p2p.bootstrap.join(", ")
                );
            }
            tokio::select! {
                r = node.pump() => r?,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    if p2p.garbage || p2p.heartbeat_only {
        return run_rogue(node, spec, device, report_path(&p2p)).await;
    }
    let withhold = matches!(attack, Some(Attack::Withhold));
    let me_s = me.to_string();
    let mut latest_params: Option<(Digest, Arc<Vec<f32>>)> = None;

    // A run that is ahead of us (a peer past our round: past round 0, or past the
    // checkpoint we resumed from) is joined by state sync. Otherwise a new run
    // starts, or the run resumes from our checkpoint, once --peers peers are live
    // (or --min-peers, and --start-grace-ms has passed).
    let ahead = |n: &Node| n.remote_round() > n.round;
    let mut trainer = Some(Trainer { model, opt, train });
    let mut state_syncs = 0u64;
    if !ahead(&node) {
        tracing::info!("waiting for {} live peers ({} at least)", p2p.peers, p2p.min_peers);
        let (all, min, grace) = (p2p.peers, p2p.min_peers, Duration::from_millis(p2p.start_grace_ms));
        let mut quorum_since: Option<Instant> = None;
        node.wait_until("peers to join", |n| {
            let live = n.rs.live().len();
            quorum_since = if live >= min { quorum_since.or(Some(Instant::now())) } else { None };
            live >= all || quorum_since.is_some_and(|t| t.elapsed() >= grace) || ahead(n)
        })
        .await?;
        // Give late heartbeats a moment so that every peer starts from the same membership.
        let settle = Instant::now() + Duration::from_millis(3 * p2p.heartbeat_ms);
        while Instant::now() < settle {
            tokio::select! {
                r = node.pump() => r?,
                _ = tokio::time::sleep_until(settle.into()) => {}
            }
        }
    }
    let mut sched = if ahead(&node) {
        let t = trainer.take().expect("trainer present");
        let (t_back, h, active) = node.join_running(t, &mut conv).await?;
        trainer = Some(t_back);
        state_syncs += 1;
        node.adopt_schedule(&cfg, &p2p, n_train, &val_all, &h, &active)?
    } else if let Some(r) = &restored {
        tracing::info!("resuming the run from checkpoint round {}", r.header.round);
        let active = peer_ids(&r.header.active);
        node.adopt_schedule(&cfg, &p2p, n_train, &val_all, &r.header, &active)?
    } else {
        let sched = Schedule::new(&cfg, &p2p, n_train, &val_all, 0, 0, node.rs.live(), me)?;
        node.rs.set_epoch_members(sched.members.clone());
        sched
    };
    drop(restored);
    let ready_unix_ms = Some(unix_ms());
    println!("ready round {} epoch {} incarnation {incarnation}", node.round, sched.epoch + 1);
    node.ready = true;
    node.epoch = sched.epoch;
    for e in [sched.epoch, sched.epoch + 1] {
        if node.subscribed.insert(e) {
            client.subscribe(&node.epoch_topic(e)).await?;
        }
    }

    let mut rounds_log = Vec::new();
    let mut epochs_log: Vec<EpochRecord> = Vec::new();
    let mut catch_ups = 0u64;
    let ckpt_writer = CheckpointWriter::start(ckpt.clone(), p2p.checkpoint_stall);
    let mut pending_val: Option<ValStats> = None;
    let mut stopped_early = false;
    let wall = Instant::now();
    let bpr = p2p.batches_per_round;
    let mut fn_seen = exec::ExecStats::default();

    loop {
        if node.round >= sched.first_round + sched.rounds {
            // End of the epoch: an active peer evaluates its slice of the
            // validation set (shared on its next announcement) and the test set.
            if let Some(my_index) = sched.my_index {
                let t = trainer.take().expect("trainer present");
                let p = sched.members.len();
                let my_val: Vec<usize> = val_all.iter().copied().skip(my_index).step_by(p).collect();
                let val_data = (!my_val.is_empty())
                    .then(|| TensorData::new(&ds.train.select(&my_val), cfg.dataset, cfg.normalization, device));
                let eval_bs = cfg.eval_batch_size;
                let test_x = test.x.shallow_clone();
                let test_y = test.y.shallow_clone();
                let t_eval = Instant::now();
                let (t_back, v, te) = node
                    .while_pumping(tokio::task::spawn_blocking(move || {
                        let v = val_data.map(|d| t.model.evaluate(&d.x, &d.y, eval_bs));
                        let te = t.model.evaluate(&test_x, &test_y, eval_bs);
                        (t, v, te)
                    }))
                    .await??;
                crate::metrics::stage("evaluate", t_eval.elapsed().as_secs_f64());
                trainer = Some(t_back);
                pending_val = v.map(|v| ValStats {
                    epoch: sched.epoch,
                    loss_sum: v.loss * v.samples as f64,
                    correct: (v.accuracy * v.samples as f64).round() as u64,
                    count: v.samples as u64,
                });
                println!("epoch {} test_acc {:.2}% test_loss {:.4}", sched.epoch + 1, 100.0 * te.accuracy, te.loss);
                record_epoch(te.accuracy, te.loss);
                epochs_log.push(EpochRecord {
                    epoch: sched.epoch + 1,
                    val_loss: None,
                    val_accuracy: None,
                    test_accuracy: te.accuracy,
                    test_loss: te.loss,
                    lr: trainer.as_ref().map_or(0.0, |t| t.opt.lr()),
                });
            }
            if sched.epoch + 1 >= cfg.epochs || stopped_early {
                break;
            }
            // The next epoch's members: in synchronous mode, the contributors of
            // the last round plus the ready joiners they named, which every peer
            // computes from the same announcements; in asynchronous mode, the live peers.
            let members = match (node.planned_next.take(), p2p.sync) {
                (Some(m), _) => m,
                (None, SyncMode::Sync) => node.next_epoch_members(node.round - 1),
                (None, SyncMode::Async { .. }) => node.rs.live(),
            };
            let old_epoch = sched.epoch;
            sched = Schedule::new(&cfg, &p2p, n_train, &val_all, old_epoch + 1, node.round, members, me)?;
            node.rs.set_epoch_members(sched.members.clone());
            node.stragglers.new_epoch();
            node.withheld.retain(|_, e| *e + 1 >= sched.epoch);
            node.epoch = sched.epoch;
                    if node.subscribed.insert(sched.epoch + 1) {
                client.subscribe(&node.epoch_topic(sched.epoch + 1)).await?;
            }
            if node.subscribed.remove(&old_epoch) {
                client.unsubscribe(&node.epoch_topic(old_epoch)).await?;
            }
            if sched.my_index.is_none() {
                tracing::info!("epoch {}: not a member yet, following", sched.epoch + 1);
            }
            continue;
        }
        let round = node.round;
        let round_start = Instant::now();
        let epoch = sched.epoch;
        let k = round - sched.first_round;
        store.lock().expect("store lock").round = round;
        let mut st = StageTimes::default();

        // A member trains unless it was demoted (it died or restarted during this
        // epoch, or kept missing rounds). A withholder (--byzantine withhold) stays
        // alive and follows the rounds, but never computes or sends its gradient.
        if sched.my_index.is_some() && node.rs.is_active(&me) && !withhold {
            let lo = (k as usize * bpr).min(sched.batches.len());
            let hi = ((k as usize + 1) * bpr).min(sched.batches.len());
            let batches = sched.batches[lo..hi].to_vec();

            let tasks = exec::plan_round(batches.len(), p2p.exec.batches_per_invocation, cfg.seed, round, &me.to_bytes());
            let t_compute = Instant::now();
            let mut local_tasks = tasks.clone();
            let mut outputs = Vec::new();
            if let Some(lx) = lambda.as_mut() {
                let digest = node.last_digest.map(|(_, d)| d);
                let params = match (&latest_params, digest) {
                    (Some((d, p)), Some(cur)) if *d == cur => p.clone(),
                    _ => {
                        let t = trainer.as_ref().expect("trainer present");
                        let p = Arc::new(t.model.params_vec());
                        latest_params = Some((digest_of(&p), p.clone()));
                        p
                    }
                };
                let digest_hex = hex(&latest_params.as_ref().expect("just set").0);
                let members: Vec<String> = node.rs.active_members().iter().map(|p| p.to_string()).collect();
                let uploader = exec::params_uploader(&digest_hex, members.iter().map(String::as_str), &me_s);
                let work = Offload {
                    run: &run_id,
                    peer: &me_s,
                    round,
                    epoch,
                    cfg: &cfg,
                    numel,
                    train: &ds.train,
                    epoch_batches: &sched.batches,
                    batch_ids: (lo..hi).collect(),
                    tasks: &tasks,
                    params,
                    params_digest: digest_hex,
                    uploader,
                };
                let (out, failed, upload) = node.while_pumping(offload(lx, work)).await?;
                outputs = out;
                st.upload = upload;
                local_tasks.retain(|t| failed.contains(&t.index));
            }
            // Local computation (all tasks, or those the function tier failed), off the async threads.
            if !local_tasks.is_empty() {
                let mut t = trainer.take().expect("trainer present");
                let (t_back, local) = node
                    .while_pumping(tokio::task::spawn_blocking(move || {
                        let o = compute_tasks(&mut t, &batches, &local_tasks);
                        (t, o)
                    }))
                    .await??;
                trainer = Some(t_back);
                outputs.extend(local);
            }
            let c = sum_outputs(outputs, numel, t_compute.elapsed().as_secs_f64());
            st.compute = c.secs;

            // Encode and announce.
            let t0 = Instant::now();
            let seed = gradient_seed(cfg.seed, round, &me);
            let mut c = c;
            let blob = encode_own(&mut c.grad, c.samples, &compression, seed, attack.as_ref(), round)?;
            let digest = *blake3::hash(&blob).as_bytes();
            st.encode = t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            let len = blob.len() as u64;
            let inline = (blob.len() <= wire::INLINE_MAX_BYTES).then(|| serde_bytes::ByteBuf::from(blob.clone()));
            store.lock().expect("store lock").insert(round, &me, Arc::new(blob));
            node.rs.hold(round, me);
            let val = if k == 0 { pending_val.take() } else { None };
            let joiners = node.ready_joiners().iter().map(|p| serde_bytes::ByteBuf::from(p.to_bytes())).collect();
            let a = Announce {
                run_id: run_id.clone(),
                round,
                epoch,
                samples: c.samples,
                loss_sum: c.loss_sum,
                val,
                len,
                digest,
                inline,
                joiners,
            };
            node.announces.insert((round, me), a.clone());
            store.lock().expect("store lock").insert_announce(&me, a.clone());
            let topic = node.epoch_topic(epoch);
            client.publish(&topic, wire::encode(&Gossip::Announce(a))).await?;
            node.gradient_bytes_sent += len;
            st.send = t0.elapsed().as_secs_f64();
            if p2p.garbage {
                node.publish_garbage(round, epoch).await;
            }
        }

        // Barrier.
        let t0 = Instant::now();
        // Each contributor with the round of the gradient used.
        let contributors: Vec<(PeerId, u64)> = match p2p.sync {
            SyncMode::Sync => {
                let mut released = None;
                // The straggler deadline: once a quorum of the round's gradients is
                // held, the missing members get this long; then the round closes on
                // what arrived.
                let deadline = Duration::from_millis(node.stragglers.deadline_ms());
                let mut quorum_at: Option<Instant> = None;
                node.wait_until(&format!("round {round} gradients"), |n| match n.rs.barrier(round) {
                    Barrier::Release(c) => {
                        released = Some((c, Vec::new()));
                        true
                    }
                    Barrier::Waiting(missing) => {
                        if let Some(held) = n.rs.quorum_held(round) {
                            let at = *quorum_at.get_or_insert_with(Instant::now);
                            if at.elapsed() >= deadline {
                                released = Some((held, missing));
                                return true;
                            }
                            n.wake = Some(at + deadline);
                        }
                        // Peers two rounds ahead went on without us: we will not be waited for.
                        n.catch_up_source().is_some()
                    }
                    Barrier::BelowMinPeers { .. } => n.catch_up_source().is_some(),
                })
                .await?;
                node.wake = None;
                match released {
                    Some((c, missing)) => {
                        node.close_round(round, epoch, &c, &missing, deadline, round_start.elapsed());
                        c.into_iter().map(|p| (p, round)).collect()
                    }
                    None => {
                        let Some(source) = node.catch_up_source() else { continue };
                        let their = node.views.get(&source).map_or(0, |v| v.round);
                        tracing::warn!("round {round}: peer {source} is at round {their}; catching up by state sync");
                        let t = trainer.take().expect("trainer present");
                        let (t_back, r) = node.sync_state(source, round + 1, t, &mut conv).await?;
                        trainer = Some(t_back);
                        match r {
                            Ok(h) => {
                                state_syncs += 1;
                                catch_ups += 1;
                                let active = node.views.get(&source).map(|v| v.active.clone()).unwrap_or_default();
                                node.round = h.round + 1;
                                sched = node.adopt_schedule(&cfg, &p2p, n_train, &val_all, &h, &active)?;
                                node.epoch = sched.epoch;
                                for e in [sched.epoch, sched.epoch + 1] {
                                    if node.subscribed.insert(e) {
                                        client.subscribe(&node.epoch_topic(e)).await?;
                                    }
                                }
                            }
                            Err(e) => {
                                tracing::warn!("catching up from {source} failed: {e}");
                                node.catch_up_failed.insert(source, Instant::now());
                            }
                        }
                        continue;
                    }
                }
            }
            SyncMode::Async { max_staleness } => {
                // Bounded staleness: wait only for peers more than max_staleness
                // behind, then apply each peer's freshest gradient not yet applied.
                let floor = round.saturating_sub(max_staleness);
                node.wait_until("stragglers", |n| {
                    n.rs.expected().iter().all(|p| (floor..=round).any(|r| n.rs.holds(r, p)))
                })
                .await?;
                let mut chosen = Vec::new();
                for p in node.rs.expected() {
                    let fresh = (floor..=round).rev().find(|r| node.rs.holds(*r, &p) && !node.applied.contains(&(*r, p)));
                    if let Some(r) = fresh {
                        node.applied.insert((r, p));
                        chosen.push((p, r));
                    }
                }
                node.applied.retain(|(r, _)| *r >= floor);
                chosen
            }
        };
        st.barrier_wait = t0.elapsed().as_secs_f64();

        // Decode and aggregate, deterministically: contributors sorted by peer id,
        // each (ours included) in the decoded form everyone else sees.
        let mut sorted = contributors.clone();
        sorted.sort();
        node.last_contributors = sorted.iter().map(|(p, _)| *p).collect();
        // The epoch's last round fixes the next epoch's members (they travel in the state).
        if p2p.sync == SyncMode::Sync && round + 1 == sched.first_round + sched.rounds {
            node.planned_next = Some(node.next_epoch_members(round));
        }
        let mut inputs = Vec::with_capacity(sorted.len());
        let mut val_sum = (0.0f64, 0u64, 0u64);
        let mut any_val = false;
        for (p, r) in &sorted {
            let (p, r) = (p, *r);
            let a = node.announces.get(&(r, *p)).cloned();
            let blob = store.lock().expect("store lock").get(r, p);
            if let (Some(a), Some(blob)) = (a, blob) {
                if let Some(v) = a.val {
                    val_sum.0 += v.loss_sum;
                    val_sum.1 += v.correct;
                    val_sum.2 += v.count;
                    any_val = true;
                }
                inputs.push((a.samples, a.loss_sum, blob));
            }
        }
        let (grad_mean, total_samples, loss_total, decode_secs, aggregate_secs) =
            tokio::task::spawn_blocking(move || aggregate(&inputs, &compression, numel, &rule, max_samples)).await?;
        st.decode = decode_secs;
        st.aggregate = aggregate_secs;

        // Convergence decisions ride on the first round of each epoch.
        let mut t = trainer.take().expect("trainer present");
        if any_val && val_sum.2 > 0 {
            let val_loss = val_sum.0 / val_sum.2 as f64;
            let t_conv = Instant::now();
            let (lr, stop) = conv.step(val_loss, t.opt.lr());
            crate::metrics::stage("convergence_check", t_conv.elapsed().as_secs_f64());
            if let Some(m) = crate::metrics::get() {
                m.validation_loss.set(val_loss);
            }
            if lr != t.opt.lr() {
                tracing::info!("validation loss {val_loss:.4} has not improved: lr {} -> {lr}", t.opt.lr());
                t.opt.set_lr(lr);
            }
            if let Some(e) = epochs_log.last_mut() {
                let e: &mut EpochRecord = e;
                e.val_loss = Some(val_loss);
                e.val_accuracy = Some(val_sum.1 as f64 / val_sum.2 as f64);
            }
            stopped_early = stop;
        }

        // Update.
        let t0 = Instant::now();
        let lr = t.opt.lr();
        let (plateau, stopping) = conv.snapshot();
        let perturb = p2p.perturb_round == Some(round);
        let sched_info = EpochInfo {
            first_round: sched.first_round,
            members: sched.members.clone(),
            active: node.rs.active_members(),
            next: node.planned_next.clone().unwrap_or_default(),
            withheld: node.withheld.iter().filter(|(_, e)| **e == epoch).map(|(p, _)| *p).collect(),
        };
        let keep_params = lambda.is_some();
        let (t_back, digest, state, params) = node
            .while_pumping(tokio::task::spawn_blocking(move || {
                if total_samples > 0 {
                    let g = tch::Tensor::from_slice(&grad_mean).to_device(t.model.device());
                    let Trainer { model, opt, .. } = &mut t;
                    opt.step(model.flat_params_mut(), &g);
                }
                if perturb {
                    // Fault injection (--fault-perturb-round): silent corruption of one value.
                    let mut v = t.model.params_vec();
                    v[0] += 1e-3;
                    t.model.set_params(&v).expect("same length");
                }
                // One copy of the parameters serves the digest and the state snapshot.
                let params = t.model.params_vec();
                let d = digest_of(&params);
                let state = state_blob(&t, &params, round, epoch, plateau, stopping, &sched_info);
                (t, d, state, keep_params.then(|| Arc::new(params)))
            }))
            .await??;
        trainer = Some(t_back);
        latest_params = params.map(|p| (digest, p));
        let state = Arc::new(state);
        store.lock().expect("store lock").set_state(StateBlob { round, epoch, bytes: state.clone() });
        if p2p.checkpoint_every > 0 && (round + 1).is_multiple_of(p2p.checkpoint_every) {
            let meta = CheckpointMeta {
                run_id: run_id.clone(),
                round,
                epoch,
                incarnation: node.rs.incarnation(),
                written_unix_ms: unix_ms(),
                members: node
                    .rs
                    .members()
                    .iter()
                    .map(|(p, m)| MemberRecord {
                        peer: p.to_bytes(),
                        incarnation: m.incarnation,
                        alive: m.alive,
                        addrs: node.known.get(p).cloned().unwrap_or_default(),
                    })
                    .collect(),
            };
            ckpt_writer.submit(meta, state);
        }
        st.update = t0.elapsed().as_secs_f64();
        node.last_digest = Some((round, digest));
        node.digests.entry(round).or_default().insert(me, digest);
        let train_loss = loss_total / total_samples.max(1) as f64;
        println!(
            "round {round} epoch {} contributors {} samples {total_samples} loss {train_loss:.4} lr {lr} barrier_ms {:.0} digest {}",
            epoch + 1,
            sorted.len(),
            st.barrier_wait * 1000.0,
            &hex(&digest)[..16]
        );
        record_round(round, epoch, sorted.len(), total_samples, &st, train_loss, lr);
        rounds_log.push(RoundRecord {
            round,
            epoch,
            contributors: sorted.len(),
            samples: total_samples,
            train_loss,
            lr,
            digest: hex(&digest),
            finished_at: wall.elapsed().as_secs_f64(),
            unix_ms: unix_ms(),
            stages: st,
        });
        if let Some(good) = node.check_digests(round) {
            let t = trainer.take().expect("trainer present");
            let (t_back, r) = node.sync_state(good, round, t, &mut conv).await?;
            trainer = Some(t_back);
            match r {
                Ok(_) => {
                    state_syncs += 1;
                    if let Some(r) = rounds_log.last_mut() {
                        let r: &mut RoundRecord = r;
                        r.digest = node.last_digest.map(|(_, d)| hex(&d)).unwrap_or_default();
                    }
                }
                Err(e) => tracing::warn!("state sync from {good} failed: {e}"),
            }
        }
        record_costs(lambda.as_mut(), &mut fn_seen, &p2p.exec, wall.elapsed().as_secs_f64(), bpr, state_syncs);
        let keep = 4 + if let SyncMode::Async { max_staleness } = p2p.sync { max_staleness } else { 0 };
        node.rs.prune(round.saturating_sub(keep));
        store.lock().expect("store lock").prune(round.saturating_sub(keep));
        node.announces.retain(|(r, _), _| *r + 2 * keep >= round);
        node.round += 1;
        if stopped_early {
            tracing::info!("early stopping: validation loss has not improved for {} epochs", p2p.early_stop_patience);
            // Finish this epoch's bookkeeping and stop at the same round as everyone.
            sched.rounds = node.round - sched.first_round;
        }
    }

    // Keep serving until every live peer has passed our last round (bounded).
    node.finished = true;
    node.heartbeat().await;
    let last = node.round;
    let linger_deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < linger_deadline {
        let live: Vec<PeerId> = node.rs.live().into_iter().filter(|p| *p != me).collect();
        if live.iter().all(|p| node.views.get(p).is_some_and(|v| v.finished || v.round >= last)) {
            break;
        }
        tokio::select! {
            r = node.pump() => r?,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }

    let t = trainer.expect("trainer present");
    let final_eval = epochs_log.last().map(|e| (e.test_accuracy, e.test_loss)).unwrap_or((0.0, 0.0));
    let tr = &client.traffic;
    let wall_secs = wall.elapsed().as_secs_f64();
    if let Some(lx) = lambda.as_mut() {
        lx.finish().await;
    }
    let report = NodeReport {
        role: "peer".into(),
        peer_id: me.to_string(),
        run_id,
        spec,
        device: device_name(device),
        threads: tch::get_num_threads(),
        rounds: node.round,
        epochs: epochs_log.len() as u64,
        final_digest: hex(&params_digest(&t.model)),
        final_test_accuracy: final_eval.0,
        final_test_loss: final_eval.1,
        stopped_early,
        gossip_bytes_sent: tr.gossip_bytes_sent.load(Ordering::Relaxed),
        gossip_bytes_received: tr.gossip_bytes_received.load(Ordering::Relaxed),
        fetch_bytes_sent: tr.rr_bytes_sent.load(Ordering::Relaxed),
        fetch_bytes_received: tr.rr_bytes_received.load(Ordering::Relaxed),
        gradient_bytes_sent: node.gradient_bytes_sent,
        invalid_messages: tr.invalid_messages.load(Ordering::Relaxed),
        digest_mismatches: node.digest_mismatches,
        state_syncs,
        wall_seconds: wall_secs,
        rounds_log,
        epochs_log,
        peer_scores: node.scores_report(),
        garbage_sent: 0,
        function_tier: lambda.as_ref().map(|l| l.stats.clone()),
        cost: exec::cost(&p2p.exec, &lambda.as_ref().map(|l| l.stats.clone()).unwrap_or_default(), wall_secs, bpr),
        incarnation,
        started_unix_ms,
        ready_unix_ms,
        catch_ups,
        membership_log: std::mem::take(&mut node.membership_log),
        checkpoints: ckpt_writer.finish(ckpt_stats),
        server_unreachable_seconds: 0.0,
        admission: AdmissionReport { unadmitted: node.unadmitted_report(), ..std::mem::take(&mut node.admission) },
    };
    let path = report_path(&p2p);
    crate::fsutil::write_atomic(&path, serde_json::to_string_pretty(&report)?.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
    println!("done rounds {} test_acc {:.2}% digest {} report {}", report.rounds, 100.0 * report.final_test_accuracy, &report.final_digest[..16], path.display());
    Ok(report)
}

pub(crate) fn report_path(p2p: &P2pConfig) -> std::path::PathBuf {
    p2p.report.clone().unwrap_or_else(|| p2p.state_dir.join("report.json"))
}

/// Rogue mode (--fault-garbage, for tests of validation and peer scoring): the
/// node never joins the membership or trains; every heartbeat interval it
/// publishes invalid messages of every kind on the current epoch's topic, until
/// the run's peers have finished or gone.
async fn run_rogue(mut node: Node, spec: RunSpec, device: tch::Device, path: std::path::PathBuf) -> anyhow::Result<NodeReport> {
    let wall = Instant::now();
    if node.p2p.heartbeat_only {
        tracing::warn!("rogue mode: heartbeats without a Hello until the run ends");
    } else {
        tracing::warn!("rogue mode: publishing invalid messages until the run ends");
    }
    let mut alone_since: Option<Instant> = None;
    node.wait_until("the run to end", |n| {
        let seen = !n.views.is_empty();
        let all_finished = seen && n.views.values().all(|v| v.finished);
        alone_since = if seen && n.connected.is_empty() { alone_since.or(Some(Instant::now())) } else { None };
        all_finished || alone_since.is_some_and(|t| t.elapsed() > Duration::from_secs(2))
    })
    .await?;
    let tr = &node.client.traffic;
    let report = NodeReport {
        role: "rogue".into(),
        peer_id: node.client.peer_id.to_string(),
        run_id: node.run_id.clone(),
        spec,
        device: device_name(device),
        threads: tch::get_num_threads(),
        rounds: 0,
        epochs: 0,
        final_digest: String::new(),
        final_test_accuracy: 0.0,
        final_test_loss: 0.0,
        stopped_early: false,
        gossip_bytes_sent: tr.gossip_bytes_sent.load(Ordering::Relaxed),
        gossip_bytes_received: tr.gossip_bytes_received.load(Ordering::Relaxed),
        fetch_bytes_sent: tr.rr_bytes_sent.load(Ordering::Relaxed),
        fetch_bytes_received: tr.rr_bytes_received.load(Ordering::Relaxed),
        gradient_bytes_sent: 0,
        invalid_messages: tr.invalid_messages.load(Ordering::Relaxed),
        digest_mismatches: 0,
        state_syncs: 0,
        wall_seconds: wall.elapsed().as_secs_f64(),
        rounds_log: Vec::new(),
        epochs_log: Vec::new(),
        peer_scores: node.scores_report(),
        garbage_sent: node.garbage_sent,
        function_tier: None,
        cost: exec::cost(&ExecConfig::default(), &Default::default(), 0.0, 1),
        incarnation: node.rs.incarnation(),
        started_unix_ms: unix_ms(),
        ready_unix_ms: None,
        catch_ups: 0,
        membership_log: std::mem::take(&mut node.membership_log),
        checkpoints: CheckpointStats::default(),
        server_unreachable_seconds: 0.0,
        admission: AdmissionReport::default(),
    };
    crate::fsutil::write_atomic(&path, serde_json::to_string_pretty(&report)?.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
    println!("done rogue garbage_sent {} report {}", report.garbage_sent, path.display());
    Ok(report)
}

/// The epoch's schedule as a state records it.
pub(crate) struct EpochInfo {
    pub(crate) first_round: u64,
    /// The epoch's members (shard i belongs to members[i]).
    pub(crate) members: Vec<PeerId>,
    /// Those not demoted.
    pub(crate) active: Vec<PeerId>,
    /// After the epoch's last round: the next epoch's members.
    pub(crate) next: Vec<PeerId>,
    /// Members demoted for withholding in this epoch.
    pub(crate) withheld: Vec<PeerId>,
}

pub(crate) fn ids(peers: &[PeerId]) -> Vec<serde_bytes::ByteBuf> {
    peers.iter().map(|p| serde_bytes::ByteBuf::from(p.to_bytes())).collect()
}

pub(crate) fn peer_ids(bytes: &[serde_bytes::ByteBuf]) -> Vec<PeerId> {
    bytes.iter().filter_map(|b| PeerId::from_bytes(b).ok()).collect()
}

/// A state's header must fit this run: the optimizer's vectors, a schedule that
/// starts at or before the state's round, members named.
/// Loads the newest checkpoint that verifies and fits this run into the model,
/// optimizer and convergence state (older ones stand in for damaged ones).
pub(crate) fn restore_checkpoint(
    ckpt: &Checkpoints,
    model: &mut Model,
    opt: &mut Optimizer,
    conv: &mut Convergence,
    stats: &mut CheckpointStats,
) -> anyhow::Result<Option<crate::checkpoint::Restored>> {
    let Some(r) = ckpt.latest(model.numel() as u64)? else { return Ok(None) };
    if let Err(why) = check_state(&r.header, r.opt.len(), opt.state_vectors()) {
        tracing::warn!("checkpoint of round {} does not fit this run ({why}); starting without it", r.header.round);
        return Ok(None);
    }
    for (round, why) in &r.skipped {
        tracing::warn!("checkpoint of round {round} is unusable ({why}); using an older one");
    }
    apply_state(model, opt, &r.params, &r.opt, r.header.lr, r.header.opt_steps);
    conv.restore(r.header.plateau, r.header.stopping);
    println!(
        "restored checkpoint round {} epoch {} digest {} in {:.3} s",
        r.header.round,
        r.header.epoch + 1,
        &hex(&digest_of(&r.params))[..16],
        r.load_secs
    );
    stats.restored_round = Some(r.header.round);
    stats.restore_secs = Some(r.load_secs);
    stats.restore_skipped = r.skipped.clone();
    Ok(Some(r))
}

pub(crate) fn check_state(h: &p2pml_proto::StateHeader, opt_vectors: usize, ours: usize) -> Result<(), String> {
    if opt_vectors != ours && !(opt_vectors == 0 && h.opt_steps == 0) {
        return Err(format!("state has {opt_vectors} optimizer vectors, this optimizer has {ours}"));
    }
    if h.epoch_start > h.round || h.epoch_members.is_empty() {
        return Err(format!("state schedule is inconsistent (epoch start {}, round {}, {} members)", h.epoch_start, h.round, h.epoch_members.len()));
    }
    Ok(())
}

/// Loads parameters and optimizer state into a model and optimizer.
pub(crate) fn apply_state(model: &mut Model, opt: &mut Optimizer, params: &[f32], state: &[Vec<f32>], lr: f64, steps: u64) {
    model.set_params(params).expect("length checked by decode_state");
    let device = model.device();
    let state = state.iter().map(|v| tch::Tensor::from_slice(v).to_device(device)).collect();
    opt.restore(lr, steps, state);
}

/// Writes checkpoints on a thread of its own, one at a time: a round never waits
/// for the disk; when the previous write is still going, this one is skipped.
pub(crate) struct CheckpointWriter {
    tx: Option<std::sync::mpsc::SyncSender<(CheckpointMeta, Arc<Vec<u8>>)>>,
    stats: Arc<Mutex<CheckpointStats>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CheckpointWriter {
    pub(crate) fn start(ckpt: Arc<Checkpoints>, stall: Option<(u64, u64)>) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(CheckpointMeta, Arc<Vec<u8>>)>(0);
        let stats = Arc::new(Mutex::new(CheckpointStats::default()));
        let st = stats.clone();
        let thread = std::thread::spawn(move || {
            let mut total = 0.0;
            while let Ok((meta, state)) = rx.recv() {
                let hold = stall.filter(|(r, _)| *r == meta.round).map(|(_, ms)| Duration::from_millis(ms));
                let r = ckpt.write(&meta, &state, hold);
                let mut s = st.lock().expect("stats lock");
                match r {
                    Ok(w) => {
                        let secs = w.encode_secs + w.write_secs;
                        s.written += 1;
                        total += secs;
                        s.write_secs_mean = total / s.written as f64;
                        s.write_secs_max = s.write_secs_max.max(secs);
                        s.last_round = Some(meta.round);
                        s.last_bytes = w.bytes;
                        s.disk_bytes = ckpt.disk_bytes();
                        crate::metrics::stage("checkpoint", secs);
                        tracing::debug!("checkpoint round {} written: {} bytes in {:.3} s", meta.round, w.bytes, secs);
                    }
                    Err(e) => {
                        s.failed += 1;
                        tracing::warn!("checkpoint of round {} failed: {e}", meta.round);
                    }
                }
            }
        });
        CheckpointWriter { tx: Some(tx), stats, thread: Some(thread) }
    }

    pub(crate) fn submit(&self, meta: CheckpointMeta, state: Arc<Vec<u8>>) {
        if let Some(tx) = &self.tx {
            if let Err(std::sync::mpsc::TrySendError::Full(_)) = tx.try_send((meta, state)) {
                self.stats.lock().expect("stats lock").skipped_busy += 1;
            }
        }
    }

    /// Waits for the write in progress; the stats, with the restore's.
    pub(crate) fn finish(mut self, restore: CheckpointStats) -> CheckpointStats {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let s = self.stats.lock().expect("stats lock").clone();
        CheckpointStats { restored_round: restore.restored_round, restore_secs: restore.restore_secs, restore_skipped: restore.restore_skipped, ..s }
    }
}

/// testnet's control commands on stdin: `block <peer id> ...` refuses those
/// peers (a partition), `unblock` lifts every block.
pub(crate) async fn control_stdin(client: Client) {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut w = line.split_whitespace();
        match w.next() {
            Some("block") => {
                let peers: Vec<PeerId> = w.filter_map(|p| p.parse().ok()).collect();
                tracing::warn!("control: blocking {} peers", peers.len());
                let _ = client.block(peers).await;
            }
            Some("unblock") => {
                tracing::warn!("control: unblocking every peer");
                let _ = client.unblock_all().await;
            }
            Some(other) => tracing::warn!("control: unknown command {other}"),
            None => {}
        }
    }
}

/// The state blob of the trainer after `round`.
pub(crate) fn state_blob(
    t: &Trainer,
    params: &[f32],
    round: u64,
    epoch: u64,
    plateau: (f64, u64),
    stopping: (f64, u64),
    sched: &EpochInfo,
) -> Vec<u8> {
    let opt: Vec<Vec<f32>> = t
        .opt
        .state()
        .iter()
        .map(|x| Vec::<f32>::try_from(&x.to_device(tch::Device::Cpu)).expect("f32 state"))
        .collect();
    let h = p2pml_proto::StateHeader {
        round,
        epoch,
        lr: t.opt.lr(),
        opt_steps: t.opt.steps(),
        numel: t.model.numel() as u64,
        opt_vectors: opt.len() as u32,
        plateau,
        stopping,
        epoch_start: sched.first_round,
        epoch_members: ids(&sched.members),
        active: ids(&sched.active),
        next_members: ids(&sched.next),
        withheld: ids(&sched.withheld),
    };
    p2pml_proto::encode_state(&h, params, &opt)
}

/// One epoch's plan, the same on every peer: who trains, on which shard, for how many rounds.
pub(crate) struct Schedule {
    pub(crate) epoch: u64,
    pub(crate) first_round: u64,
    pub(crate) rounds: u64,
    /// Sorted peer ids; shard i belongs to members[i].
    pub(crate) members: Vec<PeerId>,
    pub(crate) my_index: Option<usize>,
    /// This peer's batches (indices into the training split) when it is a member.
    pub(crate) batches: Vec<Vec<usize>>,
}

impl Schedule {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cfg: &TrainConfig,
        p2p: &P2pConfig,
        n_train: usize,
        val_all: &[usize],
        epoch: u64,
        first_round: u64,
        mut members: Vec<PeerId>,
        me: PeerId,
    ) -> anyhow::Result<Schedule> {
        members.sort();
        members.dedup();
        let p = members.len().max(1);
        // Shards index into the training samples that are not validation samples.
        let partition = Partition::new(n_train - cfg.val_size, 0, p, cfg.seed ^ 0x5eed)?;
        let bs = cfg.batch_size;
        let max_batches = (0..p).map(|i| partition.shard(i).map(|s| s.len().div_ceil(bs)).unwrap_or(0)).max().unwrap_or(0);
        let rounds = max_batches.div_ceil(p2p.batches_per_round).max(1) as u64;
        let my_index = members.iter().position(|x| *x == me);
        let batches = match my_index {
            Some(i) => {
                let val_set: HashSet<usize> = val_all.iter().copied().collect();
                let train_idx: Vec<usize> = (0..n_train).filter(|i| !val_set.contains(i)).collect();
                partition
                    .epoch_batches(i, epoch, bs)?
                    .into_iter()
                    .map(|b| b.into_iter().map(|i| train_idx[i]).collect())
                    .collect()
            }
            None => Vec::new(),
        };
        tracing::info!(
            "epoch {} from round {first_round}: {} members, {rounds} rounds{}",
            epoch + 1,
            members.len(),
            my_index.map(|i| format!(", shard {i} of {} batches", batches.len())).unwrap_or_default()
        );
        Ok(Schedule { epoch, first_round, rounds, members, my_index, batches })
    }
}

impl Node {
    /// The furthest round another peer has told us about.
    fn scores_report(&self) -> BTreeMap<String, ScoreSeen> {
        self.scores.iter().map(|(p, s)| (p.to_string(), *s)).collect()
    }

    fn remote_round(&self) -> u64 {
        self.views.values().map(|v| v.round).max().unwrap_or(0).max(self.hello_round)
    }

    /// Live, ready peers that do not train in this epoch (joiners, and members
    /// demoted by a death or restart): they are named for the next epoch.
    fn ready_joiners(&self) -> Vec<PeerId> {
        self.rs
            .live()
            .into_iter()
            .filter(|p| !self.rs.is_active(p) && self.withheld.get(p) != Some(&self.epoch) && self.views.get(p).is_some_and(|v| v.ready && !v.finished))
            .collect()
    }

    /// The members of the next epoch: the last round's contributors and the
    /// joiners they named (the same announcements on every peer).
    fn next_epoch_members(&self, last_round: u64) -> Vec<PeerId> {
        let mut members: Vec<PeerId> = self.last_contributors.clone();
        for c in &self.last_contributors {
            if let Some(a) = self.announces.get(&(last_round, *c)) {
                members.extend(a.joiners.iter().filter_map(|b| PeerId::from_bytes(b).ok()));
            }
        }
        members.sort();
        members.dedup();
        if members.is_empty() {
            // Nobody trained in the last round (every member died or restarted):
            // the live, ready peers start the next epoch.
            members = self.rs.live().into_iter().filter(|p| *p == self.client.peer_id || self.views.get(p).is_some_and(|v| v.ready && !v.finished)).collect();
        }
        members
    }

    /// Joins a run in progress: adopts the furthest running peer's latest state.
    /// Returns the state's header and that peer's active members of the epoch
    /// (a restarted member is not among them: it follows until the next epoch).
    async fn join_running(&mut self, mut t: Trainer, conv: &mut Convergence) -> anyhow::Result<(Trainer, p2pml_proto::StateHeader, Vec<PeerId>)> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if Instant::now() > deadline {
                bail!("could not obtain the run's state within 120 s");
            }
            let source = self
                .views
                .iter()
                .filter(|(p, v)| v.ready && !v.finished && self.rs.is_alive(p))
                .max_by_key(|(_, v)| v.round)
                .map(|(p, _)| *p);
            let Some(source) = source else {
                self.pump().await?;
                continue;
            };
            tracing::info!("the run is in progress: syncing state from {source}");
            let (t_back, r) = self.sync_state(source, 0, t, conv).await?;
            t = t_back;
            let header = match r {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!("state sync from {source} failed: {e}; retrying");
                    let pause = tokio::time::sleep(Duration::from_millis(500));
                    self.while_pumping(pause).await?;
                    continue;
                }
            };
            if header.round + 1 >= header.epoch_start + self.epoch_rounds(header.epoch_members.len()) && header.next_members.is_empty() {
                // The last round of an epoch whose next members the state does not name (asynchronous mode).
                let pause = tokio::time::sleep(Duration::from_millis(200));
                self.while_pumping(pause).await?;
                continue;
            }
            self.round = header.round + 1;
            let active = self.views.get(&source).map(|v| v.active.clone()).unwrap_or_default();
            return Ok((t, header, active));
        }
    }

    /// Rounds of an epoch with `members` members, as [`Schedule`] computes them.
    fn epoch_rounds(&self, members: usize) -> u64 {
        let shard = self.n_train_minus_val.div_ceil(members.max(1));
        shard.div_ceil(self.batch_size).div_ceil(self.p2p.batches_per_round).max(1) as u64
    }

    /// Takes the epoch's schedule from a state (restored or synced): its members
    /// keep their shards; those the state (or `source_active`, the sender's live
    /// view) does not list as active follow until the next epoch, this node too.
    #[allow(clippy::too_many_arguments)]
    fn adopt_schedule(
        &mut self,
        cfg: &TrainConfig,
        p2p: &P2pConfig,
        n_train: usize,
        val_all: &[usize],
        h: &p2pml_proto::StateHeader,
        source_active: &[PeerId],
    ) -> anyhow::Result<Schedule> {
        let me = self.client.peer_id;
        let members = peer_ids(&h.epoch_members);
        let active = peer_ids(&h.active);
        let sched = Schedule::new(cfg, p2p, n_train, val_all, h.epoch, h.epoch_start, members.clone(), me)?;
        self.rs.set_epoch_members(sched.members.clone());
        // Whoever the state says withheld in its epoch stays out of the next one.
        for p in peer_ids(&h.withheld) {
            self.withheld.insert(p, h.epoch);
        }
        self.stragglers.new_epoch();
        for p in &members {
            let mine = *p == me && !source_active.contains(&me);
            if !active.contains(p) || mine {
                self.rs.demote(p);
            }
        }
        if !self.rs.is_active(&me) && sched.my_index.is_some() {
            tracing::info!("following until the next epoch (this node restarted during epoch {})", h.epoch + 1);
        }
        let next = peer_ids(&h.next_members);
        self.planned_next = (!next.is_empty()).then_some(next);
        self.epoch = sched.epoch;
        Ok(sched)
    }

    /// Compares our parameter digests of recent rounds with the live members'.
    /// When a strict majority of the live members agree on a digest that is not
    /// ours, returns one of them to re-sync from.
    fn check_digests(&mut self, current: u64) -> Option<PeerId> {
        let me = self.client.peer_id;
        let live = self.rs.live();
        let mut resync = None;
        for (round, ds) in self.digests.range(current.saturating_sub(4)..=current) {
            let Some(mine) = ds.get(&me) else { continue };
            let mut counts: BTreeMap<Digest, Vec<PeerId>> = BTreeMap::new();
            for (p, d) in ds {
                if live.contains(p) {
                    counts.entry(*d).or_default().push(*p);
                }
            }
            if let Some((major, peers)) = counts.iter().max_by_key(|(_, ps)| ps.len()) {
                if major != mine && peers.len() > live.len() / 2 {
                    tracing::warn!(
                        "round {round}: our parameters differ from the majority ({} of {} live peers): re-syncing",
                        peers.len(),
                        live.len()
                    );
                    self.digest_mismatches += 1;
                    resync = peers.first().copied();
                    break;
                }
            }
        }
        if resync.is_some() {
            // Forget the evidence: after the sync our digest is the majority's.
            self.digests.clear();
        }
        self.digests = self.digests.split_off(&current.saturating_sub(8));
        resync
    }

    /// Replaces our state with `peer`'s state after round `min_round` or later
    /// (exactly `min_round` when re-syncing: the peer cannot pass round + 1
    /// before we announce it). Returns the adopted state's header.
    async fn sync_state(
        &mut self,
        peer: PeerId,
        min_round: u64,
        mut t: Trainer,
        conv: &mut Convergence,
    ) -> anyhow::Result<(Trainer, Result<p2pml_proto::StateHeader, String>)> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let (round, total_len, data) = loop {
            let client = self.client.clone();
            let r = async move { client.request(peer, Request::State { round: min_round, index: 0 }).await };
            match self.while_pumping(r).await? {
                Ok(Response::State { round: r, total_len, data, .. }) if r >= min_round => break (r, total_len, data),
                Ok(_) | Err(_) if Instant::now() < deadline => {
                    let pause = tokio::time::sleep(Duration::from_millis(100));
                    self.while_pumping(pause).await?;
                }
                Ok(other) => return Ok((t, Err(format!("no state for round {min_round}: {other:?}")))),
                Err(e) => return Ok((t, Err(e.to_string()))),
            }
        };
        if total_len > wire::MAX_BLOB_BYTES * 3 {
            return Ok((t, Err(format!("state of {total_len} bytes is too large"))));
        }
        let mut bytes = data.into_vec();
        for index in 1..chunks(total_len) {
            let client = self.client.clone();
            let r = async move { client.request(peer, Request::State { round, index }).await };
            match self.while_pumping(r).await? {
                Ok(Response::State { round: r, data, .. }) if r == round => bytes.extend_from_slice(&data),
                other => return Ok((t, Err(format!("state chunk {index}: {other:?}")))),
            }
        }
        let numel = t.model.numel() as u64;
        let (h, params, opt) = match p2pml_proto::decode_state(&bytes, numel) {
            Ok(x) => x,
            Err(e) => return Ok((t, Err(e.to_string()))),
        };
        if h.round != round {
            return Ok((t, Err(format!("state header says round {}, chunks say {round}", h.round))));
        }
        if let Err(e) = check_state(&h, opt.len(), t.opt.state_vectors()) {
            return Ok((t, Err(e)));
        }
        let (lr, steps) = (h.lr, h.opt_steps);
        let (t, digest) = self
            .while_pumping(tokio::task::spawn_blocking(move || {
                let Trainer { model, opt: o, .. } = &mut t;
                apply_state(model, o, &params, &opt, lr, steps);
                let d = params_digest(&t.model);
                (t, d)
            }))
            .await??;
        conv.restore(h.plateau, h.stopping);
        for p in peer_ids(&h.withheld) {
            self.withheld.insert(p, h.epoch);
        }
        self.last_digest = Some((round, digest));
        self.digests.entry(round).or_default().insert(self.client.peer_id, digest);
        self.store.lock().expect("store lock").set_state(StateBlob { round, epoch: h.epoch, bytes: Arc::new(bytes) });
        tracing::info!("state synced from {peer} at round {round}: digest {}", &hex(&digest)[..16]);
        Ok((t, Ok(h)))
    }
}
