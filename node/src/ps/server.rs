//! The parameter server (`--role ps`).


use crate::checkpoint::CheckpointMeta;
use crate::config::{P2pConfig, TrainConfig};
use crate::net::{Client, Event, InboundRequest};
use crate::fetch::*;
use crate::metrics::record_costs;
use crate::report::*;
use crate::setup::*;
use p2pml_proto::line::{Line, MemberEvent};
use crate::train::*;
use crate::checkpoint::CheckpointWriter;
use crate::round::{Barrier, Change, RoundState};
use crate::store::{SharedStore, Store};
use anyhow::{anyhow, bail};
use libp2p::request_response::ResponseChannel;
use libp2p::PeerId;
use p2pml_lambda_grad::TensorData;
use p2pml_proto::wire::{self, Announce, Digest, PsWork, Request, Response, RunSpec};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;


/// How long the server holds a poll for a round it has not reached.
const POLL_HOLD: Duration = Duration::from_secs(2);
/// A poll the server holds until its round advances (or `until`).
struct HeldPoll {
    peer: PeerId,
    round: u64,
    until: Instant,
    channel: ResponseChannel<Response>,
}

struct Server {
    p2p: P2pConfig,
    spec: RunSpec,
    run_id: String,
    client: Client,
    events: mpsc::Receiver<Event>,
    requests: mpsc::Receiver<InboundRequest>,
    store: SharedStore,
    rs: RoundState<PeerId>,
    /// Workers whose Hello (same run configuration) was accepted.
    accepted: HashSet<PeerId>,
    round: u64,
    epoch: u64,
    first_round: u64,
    members: Vec<PeerId>,
    params_len: u64,
    params_digest: Digest,
    finished: bool,
    /// Taking gradients for `round` (not starting, not between epochs).
    open: bool,
    /// Workers told the run is over.
    told_finished: HashSet<PeerId>,
    /// Peers with an open connection.
    connected: HashSet<PeerId>,
    polls: Vec<HeldPoll>,
    /// This round's accepted pushes, by worker.
    pushes: HashMap<PeerId, Announce>,
    fetch_tx: mpsc::Sender<(u64, PeerId, Result<Vec<u8>, String>)>,
    fetch_rx: mpsc::Receiver<(u64, PeerId, Result<Vec<u8>, String>)>,
    fetch_attempts: HashMap<PeerId, u32>,
    compression: p2pml_proto::Compression,
    numel: usize,
    membership: MembershipLog,
    start: Instant,
    invalid_pushes: u64,
}

impl Server {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn workers_live(&self) -> Vec<PeerId> {
        let me = self.client.peer_id;
        self.rs.live().into_iter().filter(|p| *p != me).collect()
    }

    fn on_change(&mut self, c: Change<PeerId>) {
        let (peer, event, incarnation) = match &c {
            Change::Joined(p) => (*p, MemberEvent::Joined, self.rs.members().get(p).map_or(0, |m| m.incarnation)),
            Change::Rejoined { peer, incarnation } => {
                tracing::info!("worker {peer} is back (incarnation {incarnation}); it trains again from the next epoch");
                (*peer, MemberEvent::Rejoined, *incarnation)
            }
            Change::Died(p) => {
                tracing::warn!("worker {p} declared dead (connection closed, or silent for {} ms)", self.p2p.failure_timeout_ms);
                (*p, MemberEvent::Died, self.rs.members().get(p).map_or(0, |m| m.incarnation))
            }
            Change::Refuted { .. } => return,
        };
        self.membership.record(&peer, event, incarnation);
    }

    /// First-hand word from a worker. The server is the only judge of its
    /// workers' liveness, so a worker it buried that speaks again (it was slow,
    /// not dead) is back, as a new incarnation of the server's own numbering.
    fn heard(&mut self, peer: PeerId, incarnation: u64, now: u64) {
        let incarnation = match self.rs.members().get(&peer) {
            Some(m) if !m.alive && m.incarnation >= incarnation => m.incarnation.saturating_add(1),
            Some(m) => incarnation.max(m.incarnation),
            None => incarnation,
        };
        if let Some(c) = self.rs.heard(peer, incarnation, now) {
            self.on_change(c);
        }
    }

    /// Whether a poll for `round` from `peer` has its answer now: the run is
    /// over, or the server takes gradients for that round, or for an earlier one
    /// that this worker has not pushed (it must compute it: the server restarted,
    /// or its push was lost).
    fn poll_ready(&self, peer: &PeerId, round: u64) -> bool {
        self.finished
            || (self.open
                && (self.round >= round
                    || (self.rs.is_active(peer) && self.rs.is_alive(peer) && !self.pushes.contains_key(peer))))
    }

    /// The answer to a poll; `ready` is [`Server::poll_ready`]: if not, the worker
    /// is told to wait and ask again.
    fn work_for(&self, peer: &PeerId, ready: bool) -> PsWork {
        PsWork {
            round: self.round,
            epoch: self.epoch,
            first_round: self.first_round,
            members: ids(&self.members),
            active: self.rs.is_active(peer) && self.rs.is_alive(peer),
            params_len: self.params_len,
            params_digest: self.params_digest,
            finished: self.finished,
            waiting: !ready,
        }
    }

    /// Publishes the parameters of the round about to start.
    fn set_params(&mut self, params: &[f32]) -> anyhow::Result<()> {
        let bytes = p2pml_proto::encode_f32(params).map_err(|e| anyhow!("the parameters are not finite ({e}); the run diverged: lower --lr"))?;
        self.params_len = bytes.len() as u64;
        self.params_digest = *blake3::hash(&bytes).as_bytes();
        self.store.lock().expect("store lock").set_params(self.round, Arc::new(bytes));
        Ok(())
    }

    async fn respond(&self, channel: ResponseChannel<Response>, r: Response) {
        let _ = self.client.respond(channel, r).await;
    }

    async fn on_request(&mut self, r: InboundRequest) {
        let InboundRequest { peer, request, channel } = r;
        let now = self.now_ms();
        let refuse = |why: &str| Response::PsAck { accepted: false, reason: Some(why.to_string()) };
        match request {
            Request::Hello { .. } => {
                let answer = self.store.lock().expect("store lock").answer(&self.spec, peer, request);
                if matches!(answer, Response::Hello { accepted: true, .. }) {
                    self.accepted.insert(peer);
                }
                self.respond(channel, answer).await;
            }
            Request::PsHeartbeat { .. } | Request::PsPoll { .. } | Request::PsPush(_) if !self.accepted.contains(&peer) => {
                self.respond(channel, refuse("hello first: this server does not know you (it may have restarted)")).await;
            }
            Request::PsHeartbeat { incarnation } => {
                self.heard(peer, incarnation, now);
                self.respond(channel, Response::PsAck { accepted: true, reason: None }).await;
            }
            Request::PsPoll { round, incarnation } => {
                self.heard(peer, incarnation, now);
                if self.poll_ready(&peer, round) {
                    if self.finished {
                        self.told_finished.insert(peer);
                    }
                    let w = self.work_for(&peer, true);
                    self.respond(channel, Response::PsWork(Box::new(w))).await;
                } else {
                    self.polls.push(HeldPoll { peer, round, until: Instant::now() + POLL_HOLD, channel });
                }
            }
            Request::PsPush(a) => {
                let verdict = self.check_push(&peer, &a);
                match verdict {
                    Err(why) => {
                        self.invalid_pushes += 1;
                        crate::metrics::invalid_push();
                        tracing::debug!("push from {peer} refused: {why}");
                        self.respond(channel, refuse(&why)).await;
                    }
                    Ok(()) => {
                        self.respond(channel, Response::PsAck { accepted: true, reason: None }).await;
                        self.take_push(peer, *a);
                    }
                }
            }
            other => {
                let answer = self.store.lock().expect("store lock").answer(&self.spec, peer, other);
                self.respond(channel, answer).await;
            }
        }
    }

    fn check_push(&self, peer: &PeerId, a: &Announce) -> Result<(), String> {
        if a.run_id != self.run_id {
            return Err("another run".into());
        }
        if a.epoch != self.epoch || !a.loss_sum.is_finite() || a.loss_sum < 0.0 {
            return Err("epoch or loss out of range".into());
        }
        // A round covers at most --batches-per-round batches of --batch-size.
        if a.samples > (self.spec.batches_per_round * self.spec.batch_size) as u64 {
            return Err(format!("{} samples in one round", a.samples));
        }
        if a.round != self.round || !self.open {
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
    fn take_push(&mut self, peer: PeerId, a: Announce) {
        let round = a.round;
        let inline = a.inline.clone();
        let len = a.len;
        self.pushes.insert(peer, a);
        match inline {
            Some(b) => self.hold(round, peer, b.into_vec()),
            None => self.start_fetch(round, peer, len),
        }
    }

    fn start_fetch(&mut self, round: u64, peer: PeerId, len: u64) {
        *self.fetch_attempts.entry(peer).or_default() += 1;
        let (client, tx) = (self.client.clone(), self.fetch_tx.clone());
        tokio::spawn(async move {
            let r = fetch_blob(&client, peer, peer, round, len).await;
            let _ = tx.send((round, peer, r)).await;
        });
    }

    fn on_fetched(&mut self, round: u64, peer: PeerId, r: Result<Vec<u8>, String>) {
        if round != self.round {
            return;
        }
        let Some(a) = self.pushes.get(&peer) else { return };
        match r {
            Ok(blob) if *blake3::hash(&blob).as_bytes() == a.digest => self.hold(round, peer, blob),
            Ok(_) => self.refuse_gradient(peer, "does not match its digest".into()),
            Err(e) => {
                let len = a.len;
                if self.fetch_attempts.get(&peer).copied().unwrap_or(0) < 3 && self.rs.is_alive(&peer) {
                    tracing::debug!("fetching {peer}'s gradient failed ({e}); again");
                    self.start_fetch(round, peer, len);
                } else {
                    tracing::warn!("cannot fetch {peer}'s gradient for round {round}: {e}");
                    self.pushes.remove(&peer);
                }
            }
        }
    }

    /// A worker whose gradient is invalid is not waited for again this epoch (a
    /// deterministic fault would otherwise repeat forever and stall the barrier).
    fn refuse_gradient(&mut self, peer: PeerId, why: String) {
        self.invalid_pushes += 1;
        crate::metrics::invalid_push();
        tracing::warn!("gradient from {peer} {why}: dropped; the worker sits out the rest of the epoch");
        self.pushes.remove(&peer);
        self.rs.demote(&peer);
    }

    fn hold(&mut self, round: u64, peer: PeerId, blob: Vec<u8>) {
        // The length must decode with the run's compression before it counts.
        if let Err(e) = p2pml_proto::decode_gradient(&blob, &self.compression, self.numel) {
            self.refuse_gradient(peer, format!("does not decode ({e})"));
            return;
        }
        self.store.lock().expect("store lock").insert(round, &peer, Arc::new(blob));
        self.rs.hold(round, peer);
    }

    /// Answers the polls that are due: the round they wait for has come, the
    /// run is over, or they have been held long enough.
    async fn answer_polls(&mut self) {
        let now = Instant::now();
        let (due, keep): (Vec<HeldPoll>, Vec<HeldPoll>) =
            std::mem::take(&mut self.polls).into_iter().partition(|p| self.poll_ready(&p.peer, p.round) || now >= p.until);
        self.polls = keep;
        for p in due {
            if self.finished {
                self.told_finished.insert(p.peer);
            }
            let ready = self.poll_ready(&p.peer, p.round);
            let w = self.work_for(&p.peer, ready);
            self.respond(p.channel, Response::PsWork(Box::new(w))).await;
        }
    }

    async fn pump(&mut self) -> anyhow::Result<()> {
        let tick = tokio::time::sleep(Duration::from_millis(self.p2p.heartbeat_ms));
        tokio::select! {
            ev = self.events.recv() => match ev {
                Some(Event::Connected(p)) => {
                    self.connected.insert(p);
                    self.rs.unsuspect(&p);
                }
                Some(Event::Disconnected(p)) => {
                    self.connected.remove(&p);
                    let now = self.now_ms();
                    self.rs.suspect(&p, now);
                }
                // The server subscribes to nothing; drop without forwarding.
                Some(Event::Gossip { id, propagated_by, .. }) => {
                    let _ = self.client.ignore(id, propagated_by).await;
                }
                Some(Event::DialFailed { .. }) => {}
                None => bail!("the network task stopped"),
            },
            r = self.requests.recv() => match r {
                Some(r) => self.on_request(r).await,
                None => bail!("the network task stopped"),
            },
            Some((round, peer, r)) = self.fetch_rx.recv() => self.on_fetched(round, peer, r),
            _ = tick => {}
        }
        let now = self.now_ms();
        for c in self.rs.tick(now) {
            self.on_change(c);
        }
        crate::metrics::membership(self.connected.len(), self.rs.live().len());
        self.answer_polls().await;
        Ok(())
    }

    async fn wait_until(&mut self, what: &str, mut ready: impl FnMut(&mut Server) -> bool) -> anyhow::Result<f64> {
        let t0 = Instant::now();
        let mut said = false;
        while !ready(self) {
            if !said && t0.elapsed() > Duration::from_secs(5) {
                tracing::info!("waiting for {what}");
                said = true;
            }
            self.pump().await?;
        }
        Ok(t0.elapsed().as_secs_f64())
    }

    /// Runs `fut` (a blocking job) while serving the workers.
    async fn while_pumping<T>(&mut self, fut: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return Ok(out),
                r = self.pump() => r?,
            }
        }
    }
}

/// `--role ps`: the parameter server.
pub async fn run_server(cfg: TrainConfig, p2p: P2pConfig) -> anyhow::Result<NodeReport> {
    let setup = Setup::new(&cfg, &p2p)?;
    let (device, spec, run_id) = (setup.device, setup.spec.clone(), setup.run_id.clone());
    let (compression, rule) = (setup.compression.clone(), setup.rule.clone());
    let mut loaded = setup.load(&cfg, &p2p)?;
    let Resume { ckpt, incarnation, stats: ckpt_stats, mut conv, restored } = setup.resume(&p2p, &mut loaded)?;
    let Loaded { ds, n_train, val_all, model, opt, numel, max_samples } = loaded;
    let val = TensorData::new(&ds.train.select(&val_all), cfg.dataset, cfg.normalization, device);
    let test = TensorData::new(&ds.test, cfg.dataset, cfg.normalization, device);
    // The server computes no gradients: an empty training set stands in.
    let train = TensorData::new(&ds.train.select(&[]), cfg.dataset, cfg.normalization, device);

    let net = start_net(&p2p, &run_id).await?;
    let reporter = setup.report_builder("ps", &net, incarnation, &p2p);
    let me = net.me;
    let store: SharedStore = Arc::new(Mutex::new(Store::default()));
    let (fetch_tx, fetch_rx) = mpsc::channel(256);
    let mut s = Server {
        p2p: p2p.clone(),
        spec: spec.clone(),
        run_id: run_id.clone(),
        client: net.client.clone(),
        events: net.events,
        requests: net.requests,
        store: store.clone(),
        // The quorum counts the server too.
        rs: RoundState::new(me, incarnation, p2p.min_peers + 1, p2p.failure_timeout_ms),
        accepted: HashSet::new(),
        round: 0,
        epoch: 0,
        first_round: 0,
        members: Vec::new(),
        params_len: 0,
        params_digest: [0; 32],
        finished: false,
        open: false,
        told_finished: HashSet::new(),
        connected: HashSet::new(),
        polls: Vec::new(),
        pushes: HashMap::new(),
        fetch_tx,
        fetch_rx,
        fetch_attempts: HashMap::new(),
        compression,
        numel,
        membership: MembershipLog::default(),
        start: Instant::now(),
        invalid_pushes: 0,
    };

    // Start once --peers workers are live, or --min-peers and the grace has passed
    // (a restarted server waits the same way for its workers to find it again).
    tracing::info!("waiting for {} workers ({} at least)", p2p.peers, p2p.min_peers);
    let mut start = crate::peer::StartRule::new(p2p.peers, p2p.min_peers, p2p.start_grace_ms);
    s.wait_until("workers to join", |s| start.ready(s.workers_live().len(), s.now_ms()))
    .await?;

    let mut sched = match &restored {
        Some(r) => {
            let h = &r.header;
            tracing::info!("resuming the run from checkpoint round {}", h.round);
            s.round = h.round + 1;
            let members = peer_ids(&h.epoch_members);
            let sched = Schedule::new(&cfg, &p2p, n_train, &val_all, h.epoch, h.epoch_start, members, me)?;
            s.rs.set_epoch_members(sched.members.clone());
            let active = peer_ids(&h.active);
            for m in &sched.members {
                if !active.contains(m) {
                    s.rs.demote(m);
                }
            }
            sched
        }
        None => {
            let sched = Schedule::new(&cfg, &p2p, n_train, &val_all, 0, 0, s.workers_live(), me)?;
            s.rs.set_epoch_members(sched.members.clone());
            sched
        }
    };
    drop(restored);
    s.epoch = sched.epoch;
    s.first_round = sched.first_round;
    s.members = sched.members.clone();
    s.set_params(&model.params_vec())?;
    let ready_unix_ms = Some(unix_ms());
    println!("{}", Line::Ready { round: s.round, epoch: sched.epoch + 1, incarnation });
    s.open = true;
    s.answer_polls().await;

    let mut last_digest: Digest = params_digest(&model);
    let mut trainer = TrainerHandle::start(Trainer { model, opt, train, test, eval_batch_size: cfg.eval_batch_size });
    let ckpt_writer = CheckpointWriter::start(ckpt.clone(), p2p.faults.checkpoint_stall);
    let mut progress = Progress::new();

    let stopped_early = loop {
        if s.round >= sched.first_round + sched.rounds {
            // End of the epoch: the server evaluates (validation for the lr
            // schedule and early stopping, then the test set).
            s.open = false;
            let t_eval = Instant::now();
            let (v, te) = s.while_pumping(trainer.evaluate(Some(&val))).await??;
            let v = v.expect("the validation set was given");
            crate::metrics::stage("evaluate", t_eval.elapsed().as_secs_f64());
            let t_conv = Instant::now();
            let (lr, stop) = conv.step(v.loss, trainer.lr());
            crate::metrics::stage("convergence_check", t_conv.elapsed().as_secs_f64());
            if let Some(m) = crate::metrics::get() {
                m.validation_loss.set(v.loss);
            }
            if lr != trainer.lr() {
                tracing::info!("validation loss {:.4} has not improved: lr {} -> {lr}", v.loss, trainer.lr());
                trainer.set_lr(lr);
            }
            progress.epoch(sched.epoch, &te, Some(&v), trainer.lr());
            if sched.epoch + 1 >= cfg.epochs || stop {
                if stop {
                    tracing::info!("early stopping: validation loss has not improved for {} epochs", p2p.early_stop_patience);
                }
                break stop;
            }
            // The next epoch is cut over the workers live now.
            sched = Schedule::new(&cfg, &p2p, n_train, &val_all, sched.epoch + 1, s.round, s.workers_live(), me)?;
            s.rs.set_epoch_members(sched.members.clone());
            s.epoch = sched.epoch;
            s.first_round = sched.first_round;
            s.members = sched.members.clone();
            s.open = true;
            s.answer_polls().await;
            continue;
        }
        let round = s.round;
        let epoch = sched.epoch;
        let mut st = StageTimes::default();

        // Barrier over the live workers of the epoch.
        let t0 = Instant::now();
        let mut released = Vec::new();
        s.wait_until(&format!("round {round} gradients"), |s| match s.rs.barrier(round) {
            Barrier::Release(c) => {
                released = c;
                true
            }
            _ => false,
        })
        .await?;
        st.barrier_wait = t0.elapsed().as_secs_f64();
        let contributors: Vec<PeerId> = released.into_iter().filter(|p| *p != me).collect();
        let inputs: Vec<(u64, f64, Arc<Vec<u8>>)> = contributors
            .iter()
            .filter_map(|p| {
                let a = s.pushes.get(p)?;
                let blob = store.lock().expect("store lock").get(round, p)?;
                Some((a.samples, a.loss_sum, blob))
            })
            .collect();
        let (grad_mean, total_samples, loss_total, decode_secs, aggregate_secs) =
            s.while_pumping(tokio::task::spawn_blocking(move || aggregate(&inputs, &compression, numel, &rule, max_samples))).await??;
        st.decode = decode_secs;
        st.aggregate = aggregate_secs;

        // Update, state, checkpoint.
        let t0 = Instant::now();
        let lr = trainer.lr();
        let (plateau, stopping) = conv.snapshot();
        let sched_info =
            EpochInfo { first_round: sched.first_round, members: sched.members.clone(), active: s.rs.active_members(), next: Vec::new(), withheld: Vec::new() };
        let job = UpdateJob {
            grad: grad_mean,
            samples: total_samples,
            perturb: false,
            round,
            epoch,
            plateau,
            stopping,
            info: sched_info,
            keep_params: true,
        };
        let Updated { digest, state, params } = s.while_pumping(trainer.update(job)).await??;
        let params = params.expect("kept");
        last_digest = digest;
        if p2p.checkpoint_every > 0 && (round + 1).is_multiple_of(p2p.checkpoint_every) {
            let meta = CheckpointMeta::now(&run_id, round, epoch, &s.rs, |_| Vec::new());
            ckpt_writer.submit(meta, Arc::new(state));
        }
        st.update = t0.elapsed().as_secs_f64();
        progress.round(RoundDone { round, epoch, contributors: contributors.len(), samples: total_samples, loss_total, lr, digest, stages: st });
        record_costs(None, &mut Default::default(), &p2p.exec, progress.wall_secs(), p2p.batches_per_round, 0);
        s.rs.prune(round.saturating_sub(4));
        store.lock().expect("store lock").prune(round.saturating_sub(4));
        s.pushes.clear();
        s.fetch_attempts.clear();
        s.round += 1;
        s.set_params(&params)?;
        // After an epoch's last round the workers wait for the evaluation.
        if s.round >= sched.first_round + sched.rounds {
            s.open = false;
        }
        s.answer_polls().await;
    };

    // Tell every live worker that the run is over, and stay until they have
    // hung up (so that the answers are on the wire before we exit; bounded).
    s.finished = true;
    s.open = false;
    s.answer_polls().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline
        && (!s.workers_live().iter().all(|p| s.told_finished.contains(p)) || s.told_finished.iter().any(|p| s.connected.contains(p)))
    {
        s.pump().await?;
    }

    let report = reporter.build(
        progress.wall_secs(),
        Outcome {
            rounds: s.round,
            final_digest: hex(&last_digest),
            stopped_early,
            invalid_inputs: s.invalid_pushes,
            rounds_log: progress.rounds,
            epochs_log: progress.epochs,
            ready_unix_ms,
            membership_log: std::mem::take(&mut s.membership.events),
            checkpoints: ckpt_writer.finish(ckpt_stats),
            ..Outcome::default()
        },
    );
    write_report(&p2p, &report)?;
    Ok(report)
}


