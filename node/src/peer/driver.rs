//! The P2P peer's driver (`--role peer`): set-up, then one loop that selects
//! over the network's events and requests, the results of the work it started
//! (fetches, Hellos, state syncs, the trainer's and the function tier's
//! answers), the core's next deadline and shutdown; feeds each to the
//! [`PeerCore`] and executes the actions it returns without awaiting anything
//! in the loop: network commands go to one task that sends them in order,
//! requests and blocking work to tasks of their own, the trainer's jobs to
//! its thread, gradient computations to the executor task that owns the
//! function tier.

use super::core::*;
use crate::checkpoint::{CheckpointMeta, CheckpointWriter};
use crate::config::{P2pConfig, TrainConfig};
use crate::exec::{self, compute_round, ExecStats, ExecutorKind, LambdaExecutor, Offload};
use crate::fetch::{fetch_state, fetch_verified, Fetched};
use crate::metrics::record_costs;
use crate::net::{Client, Event};
use crate::report::*;
use crate::setup::*;
use crate::train::*;
use anyhow::bail;
use libp2p::gossipsub::MessageId;
use libp2p::request_response::ResponseChannel;
use libp2p::{Multiaddr, PeerId};
use p2pml_lambda_grad::data::Split;
use p2pml_lambda_grad::TensorData;
use p2pml_proto::line::Line;
use p2pml_proto::wire::{Digest, Request, Response};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Joins (or starts) a decentralized run and trains until it ends.
pub async fn run(cfg: TrainConfig, p2p: P2pConfig) -> anyhow::Result<NodeReport> {
    let setup = Setup::new(&cfg, &p2p)?;
    let (device, run_id) = (setup.device, setup.run_id.clone());
    // The function tier's settings are checked before the network starts: a
    // wrong bucket or endpoint costs seconds, not a joined run.
    let rogue = p2p.faults.garbage || p2p.faults.heartbeat_only;
    let lambda = match p2p.exec.executor {
        ExecutorKind::Lambda if !rogue => Some(LambdaExecutor::new(&p2p.exec).await?),
        _ => None,
    };
    let bootstrap = setup.addrs.bootstrap.clone();

    // Data and model before the network, so that a bad flag fails fast.
    let mut loaded = setup.load(&cfg, &p2p)?;
    let Resume { ckpt, incarnation, stats: ckpt_stats, conv, restored } = setup.resume(&p2p, &mut loaded)?;
    let Loaded { ds, n_train, val_all, model, opt, numel, max_samples } = loaded;
    let train = TensorData::new(&ds.train, cfg.dataset, cfg.normalization, device);
    let test = TensorData::new(&ds.test, cfg.dataset, cfg.normalization, device);
    let split = Arc::new(ds.train);
    let net = start_net(&p2p, &setup.addrs, &run_id).await?;
    let reporter = setup.report_builder(if rogue { "rogue" } else { "peer" }, &net, incarnation, &p2p);
    let Net { client, mut events, mut requests, me } = net;
    let listen: Vec<String> = client.listen_addrs().await.unwrap_or_default().iter().map(|a| a.to_string()).collect();

    let known = restored.as_ref().map(|r| remembered_addresses(&r.meta, &me)).unwrap_or_default();
    let resume = restored.map(|r| Resumed { header: r.header, digest: digest_of(&r.params), state: Arc::new(r.state) });
    let settings = PeerSettings {
        cfg: cfg.clone(),
        p2p: p2p.clone(),
        spec: setup.spec.clone(),
        me,
        incarnation,
        boot: setup.started_unix_ms,
        n_train,
        val_all,
        numel,
        compression: setup.compression.clone(),
        lr: opt.lr(),
        bootstrap,
        known,
        tier: lambda.is_some(),
    };
    let mut core = PeerCore::new(settings, conv, resume);
    let trainer = TrainerHandle::start(Trainer { model, opt, train, test, eval_batch_size: cfg.eval_batch_size });
    let ckpt_writer = CheckpointWriter::start(ckpt.clone(), p2p.faults.checkpoint_stall);

    // Results of the work the loop started, as the core's inputs.
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Input>();
    let ops = NetOps::start(client.clone());
    let exec_tx = Executor::start(
        Executor {
            lambda,
            trainer: trainer.link(),
            cfg: cfg.clone(),
            p2p: p2p.clone(),
            run_id: run_id.clone(),
            me,
            numel,
            compression: setup.compression.clone(),
            train: split.clone(),
            latest: None,
            seen: ExecStats::default(),
        },
        done_tx.clone(),
    );
    let mut channels: HashMap<RequestId, ResponseChannel<Response>> = HashMap::new();
    let mut next_id: RequestId = 0;
    let mut progress = Progress::with_traffic(client.traffic.clone());
    let mut membership = MembershipLog::default();
    let mut ready_unix_ms = None;
    let mut shutdown = std::pin::pin!(tokio::signal::ctrl_c());
    let start = Instant::now();

    let mut actions = core.start(0, listen);
    loop {
        for action in actions.drain(..) {
            match action {
                Action::Publish { topic, data, gradient } => {
                    if gradient {
                        progress.announced_unix_ms = Some(crate::report::unix_ms());
                    }
                    ops.send(NetOp::Publish { topic, data, gradient })
                }
                Action::Verdict { id, propagated_by, verdict } => ops.send(NetOp::Verdict { id, propagated_by, verdict }),
                Action::Subscribe(t) => ops.send(NetOp::Subscribe(t)),
                Action::Unsubscribe(t) => ops.send(NetOp::Unsubscribe(t)),
                Action::Dial { peer, addr } => ops.send(NetOp::Dial { peer, addr }),
                Action::Respond { id, response } => {
                    if let Some(channel) = channels.remove(&id) {
                        ops.send(NetOp::Respond { channel, response });
                    }
                }
                Action::Drop { id } => drop(channels.remove(&id)),
                Action::Disconnect { peer, after_ms } => {
                    let c = client.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(after_ms)).await;
                        let _ = c.disconnect(peer).await;
                    });
                }
                Action::Hello { peer } => {
                    let (c, tx, spec) = (client.clone(), done_tx.clone(), setup.spec.clone());
                    tokio::spawn(async move {
                        let result = c.request(peer, Request::Hello { spec }).await.map_err(|e| e.to_string());
                        let _ = tx.send(Input::HelloAnswer { peer, result });
                    });
                }
                Action::Fetch { round, owner, part, sources, len, digest } => {
                    let (c, tx) = (client.clone(), done_tx.clone());
                    tokio::spawn(async move {
                        let result = fetch_verified(&c, &sources, owner, round, part, len, digest).await;
                        let _ = tx.send(Input::Fetched(Fetched { round, owner, part, result }));
                    });
                }
                Action::Recover { round, owner, sources } => {
                    let (c, tx) = (client.clone(), done_tx.clone());
                    tokio::spawn(async move {
                        let announce = recover(&c, &sources, owner, round).await;
                        let _ = tx.send(Input::Recovered { owner, announce });
                    });
                }
                Action::NetInfo => {
                    let (c, tx) = (client.clone(), done_tx.clone());
                    tokio::spawn(async move {
                        let scores = c.peer_scores().await.unwrap_or_default();
                        let addrs = c.listen_addrs().await.unwrap_or_default().iter().map(|a| a.to_string()).collect();
                        let _ = tx.send(Input::NetInfo { scores, addrs });
                    });
                }
                Action::Compute(job) => {
                    if exec_tx.send(ExecMsg::Compute(job)).is_err() {
                        bail!("the executor task stopped");
                    }
                }
                Action::Aggregate { round, inputs } => {
                    let (tx, compression, rule) = (done_tx.clone(), setup.compression.clone(), setup.rule.clone());
                    tokio::task::spawn_blocking(move || {
                        let (grad, samples, loss, decode_secs, aggregate_secs) = aggregate(&inputs, &compression, numel, &rule, max_samples);
                        let _ = tx.send(Input::Aggregated { round, grad, samples, loss, decode_secs, aggregate_secs });
                    });
                }
                Action::AggregateShard { round, shard, len, seed, inputs } => {
                    let (tx, compression, rule) = (done_tx.clone(), setup.compression.clone(), setup.rule.clone());
                    tokio::task::spawn_blocking(move || {
                        let result = aggregate_shard(&inputs, &compression, len, &rule, max_samples, seed);
                        let _ = tx.send(Input::ShardAggregated { round, shard, result });
                    });
                }
                Action::Assemble { round, parts, samples, loss } => {
                    let (tx, compression) = (done_tx.clone(), setup.compression.clone());
                    tokio::task::spawn_blocking(move || {
                        // The shards' aggregates were checked by their digests; one
                        // that does not decode is the owner's fault and fatal here.
                        match assemble(&parts, &compression, numel) {
                            Ok((grad, decode_secs)) => {
                                let _ = tx.send(Input::Aggregated { round, grad, samples, loss, decode_secs, aggregate_secs: 0.0 });
                            }
                            Err(e) => {
                                let _ = tx.send(Input::Computed { round, result: Err(format!("round {round}: {e}")) });
                            }
                        }
                    });
                }
                Action::Update(job) => {
                    let round = job.round;
                    let (rx, tx, etx) = (trainer.submit_update(*job)?, done_tx.clone(), exec_tx.clone());
                    tokio::spawn(async move {
                        if let Ok(Updated { digest, state, params }) = rx.await {
                            // The tier computes at these parameters: the executor keeps them.
                            if let Some(p) = params {
                                let _ = etx.send(ExecMsg::Params(digest, p));
                            }
                            let _ = tx.send(Input::Updated { round, updated: Updated { digest, state, params: None } });
                        }
                    });
                }
                Action::Evaluate { epoch, val } => {
                    let val = (!val.is_empty()).then(|| TensorData::new(&split.select(&val), cfg.dataset, cfg.normalization, device));
                    let (rx, tx) = (trainer.submit_evaluate(val.as_ref())?, done_tx.clone());
                    let t0 = Instant::now();
                    tokio::spawn(async move {
                        if let Ok((val, test)) = rx.await {
                            crate::metrics::stage("evaluate", t0.elapsed().as_secs_f64());
                            let _ = tx.send(Input::Evaluated { epoch, val, test });
                        }
                    });
                }
                Action::SetLr(lr) => trainer.set_lr(lr),
                Action::Sync { peer, min_round } => {
                    let (c, tx, t) = (client.clone(), done_tx.clone(), trainer.link());
                    tokio::spawn(async move {
                        let result = sync_state(&c, peer, min_round, &t).await;
                        let _ = tx.send(Input::Synced { peer, result });
                    });
                }
                Action::Checkpoint { mut meta, state } => {
                    meta.written_unix_ms = unix_ms();
                    ckpt_writer.submit(meta, state);
                }
                Action::NoteIncarnation(n) => {
                    if let Err(e) = ckpt.note_incarnation(n) {
                        tracing::warn!("cannot record incarnation {n}: {e}");
                    }
                }
                Action::Ready { round, epoch } => {
                    ready_unix_ms = Some(unix_ms());
                    println!("{}", Line::Ready { round, epoch: epoch + 1, incarnation });
                }
                Action::Round(r) => progress.round(*r),
                Action::RoundDigest(d) => {
                    if let Some(r) = progress.rounds.last_mut() {
                        r.digest = hex(&d);
                    }
                }
                Action::Epoch { epoch, test, lr } => progress.epoch(epoch, &test, None, lr),
                Action::Validation { loss, accuracy } => {
                    if let Some(m) = crate::metrics::get() {
                        m.validation_loss.set(loss);
                    }
                    if let Some(e) = progress.epochs.last_mut() {
                        (e.val_loss, e.val_accuracy) = (Some(loss), Some(accuracy));
                    }
                }
                Action::Membership { peer, event, incarnation } => membership.record(&peer, event, incarnation),
                Action::Deadline { round, missing } => {
                    // testnet reads this line.
                    println!("{}", Line::Deadline { round, missing });
                    if let Some(m) = crate::metrics::get() {
                        m.deadline_rounds.inc();
                    }
                }
                Action::Gauges { connected, live } => crate::metrics::membership(connected, live),
                Action::Costs { state_syncs } => {
                    let _ = exec_tx.send(ExecMsg::Costs { wall_secs: progress.wall_secs(), state_syncs });
                }
                Action::FinalDigest => {
                    let (t, tx) = (trainer.link(), done_tx.clone());
                    tokio::spawn(async move {
                        if let Ok(d) = t.digest().await {
                            let _ = tx.send(Input::FinalDigest(d));
                        }
                    });
                }
                // The loop ends on `finished()` below, after this batch's other actions.
                Action::Done => {}
                Action::Fail(e) => bail!("{e}"),
            }
        }
        if core.finished().is_some() {
            break;
        }
        let wake = start + Duration::from_millis(core.next_deadline());
        let input = tokio::select! {
            ev = events.recv() => match ev {
                Some(Event::Connected(p)) => Input::Connected(p),
                Some(Event::Disconnected(p)) => Input::Disconnected(p),
                Some(Event::DialFailed { error, .. }) => Input::DialFailed { error },
                Some(Event::Gossip { id, propagated_by, author, data }) => Input::Gossip { id, propagated_by, author, data },
                None => Input::NetStopped,
            },
            r = requests.recv() => match r {
                Some(r) => {
                    next_id += 1;
                    channels.insert(next_id, r.channel);
                    Input::Request { id: next_id, peer: r.peer, request: r.request }
                }
                None => Input::NetStopped,
            },
            Some(i) = done_rx.recv() => i,
            _ = tokio::time::sleep_until(wake.into()) => Input::Tick,
            _ = &mut shutdown => Input::Shutdown,
        };
        let now = start.elapsed().as_millis() as u64;
        let timed = matches!(input, Input::Aggregated { .. });
        let t0 = Instant::now();
        actions = core.on_input(now, input);
        if timed && actions.iter().any(|a| matches!(a, Action::Validation { .. })) {
            // The convergence check (plateau and early stopping) is the core's handling of the aggregate.
            crate::metrics::stage("convergence_check", t0.elapsed().as_secs_f64());
        }
    }

    let outcome = match core.finished() {
        Some(Ok(o)) => o,
        Some(Err(e)) => bail!("{e}"),
        None => unreachable!("the loop ends when the core has finished"),
    };
    let (reply, stats) = oneshot::channel();
    let _ = exec_tx.send(ExecMsg::Finish(reply));
    let function_tier = stats.await.ok().flatten();
    let wall_secs = if outcome.rogue { start.elapsed().as_secs_f64() } else { progress.wall_secs() };
    let report = reporter.build(
        wall_secs,
        if outcome.rogue {
            Outcome { peer_scores: outcome.peer_scores, garbage_sent: outcome.garbage_sent, membership_log: membership.events, ..Outcome::default() }
        } else {
            Outcome {
                rounds: outcome.rounds,
                final_digest: outcome.final_digest.map(|d| hex(&d)).unwrap_or_default(),
                stopped_early: outcome.stopped_early,
                gradient_bytes_sent: outcome.gradient_bytes_sent,
                digest_mismatches: outcome.digest_mismatches,
                state_syncs: outcome.state_syncs,
                rounds_log: progress.rounds,
                epochs_log: progress.epochs,
                peer_scores: outcome.peer_scores,
                function_tier,
                ready_unix_ms,
                catch_ups: outcome.catch_ups,
                membership_log: membership.events,
                checkpoints: ckpt_writer.finish(ckpt_stats),
                admission: outcome.admission,
                ..Outcome::default()
            }
        },
    );
    write_report(&p2p, &report)?;
    Ok(report)
}

/// The addresses a restored checkpoint remembers for its members (not ours).
fn remembered_addresses(meta: &CheckpointMeta, me: &PeerId) -> BTreeMap<PeerId, Vec<String>> {
    let mut known = BTreeMap::new();
    for m in &meta.members {
        if let Ok(p) = PeerId::from_bytes(&m.peer) {
            if &p != me && !m.addrs.is_empty() {
                known.insert(p, m.addrs.iter().take(8).cloned().collect());
            }
        }
    }
    known
}

/// A network command, sent by one task in the order the core asked.
enum NetOp {
    Publish { topic: String, data: Vec<u8>, gradient: bool },
    Verdict { id: MessageId, propagated_by: PeerId, verdict: Verdict },
    Subscribe(String),
    Unsubscribe(String),
    Dial { peer: PeerId, addr: Multiaddr },
    Respond { channel: ResponseChannel<Response>, response: Response },
}

/// The queue of network commands: the loop hands them over and goes on.
struct NetOps(mpsc::UnboundedSender<NetOp>);

impl NetOps {
    fn start(client: Client) -> NetOps {
        let (tx, mut rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(op) = rx.recv().await {
                let r = match op {
                    NetOp::Publish { topic, data, gradient } => {
                        let t0 = Instant::now();
                        let r = client.publish(&topic, data).await;
                        if gradient {
                            crate::metrics::stage("send", t0.elapsed().as_secs_f64());
                        }
                        r
                    }
                    NetOp::Verdict { id, propagated_by, verdict: Verdict::Ignore } => client.ignore(id, propagated_by).await,
                    NetOp::Verdict { id, propagated_by, verdict } => client.validate(id, propagated_by, verdict == Verdict::Accept).await,
                    NetOp::Subscribe(t) => client.subscribe(&t).await,
                    NetOp::Unsubscribe(t) => client.unsubscribe(&t).await,
                    NetOp::Dial { peer, addr } => client.dial(Some(peer), addr).await,
                    NetOp::Respond { channel, response } => client.respond(channel, response).await,
                };
                if let Err(e) = r {
                    tracing::debug!("network command: {e}");
                }
            }
        });
        NetOps(tx)
    }
    fn send(&self, op: NetOp) {
        let _ = self.0.send(op);
    }
}

/// Asks `sources` in turn (three passes, 500 ms apart) for `owner`'s announcement of `round`.
async fn recover(client: &Client, sources: &[PeerId], owner: PeerId, round: u64) -> p2pml_proto::wire::Announce {
    for _ in 0..3 {
        for src in sources {
            if let Ok(Response::Announcement(a)) = client.request(*src, Request::Announcement { owner: owner.to_bytes(), round }).await {
                return *a;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Not found: the core may ask again at its next heartbeat.
    p2pml_proto::wire::Announce::missing(round)
}

/// Fetches `peer`'s state after round `min_round` or later (exactly
/// `min_round` when re-syncing: the peer cannot pass round + 1 before we
/// announce it), checks that it fits the model and optimizer, and loads it.
pub(super) async fn sync_state(client: &Client, peer: PeerId, min_round: u64, t: &TrainerLink) -> Result<SyncedState, String> {
    let (round, bytes) = fetch_state(client, peer, min_round).await?;
    let (header, params, opt) = p2pml_proto::decode_state(&bytes, t.numel() as u64).map_err(|e| e.to_string())?;
    if header.round != round {
        return Err(format!("state header says round {}, chunks say {round}", header.round));
    }
    check_state(&header, opt.len(), t.opt_vectors())?;
    let (lr, steps) = (header.lr, header.opt_steps);
    let digest = t.load(LoadJob { params, opt, lr, steps }).await.map_err(|e| e.to_string())?;
    Ok(SyncedState { header, digest, bytes: Arc::new(bytes) })
}

/// What the executor task is asked.
enum ExecMsg {
    Compute(Box<ComputeJob>),
    /// The parameters after an update (their digest), for the function tier.
    Params(Digest, Arc<Vec<f32>>),
    /// A round is over: the tier's counters and the costs into the metrics.
    Costs { wall_secs: f64, state_syncs: u64 },
    /// The run is over: the tier's statistics.
    Finish(oneshot::Sender<Option<ExecStats>>),
}

/// The task that computes this peer's gradients: in the function tier when
/// there is one (it owns the [`LambdaExecutor`]), then (all of them, or the
/// tasks the tier failed) on the trainer thread; and encodes them.
struct Executor {
    lambda: Option<LambdaExecutor>,
    trainer: TrainerLink,
    cfg: TrainConfig,
    p2p: P2pConfig,
    run_id: String,
    me: PeerId,
    numel: usize,
    compression: p2pml_proto::Compression,
    train: Arc<Split>,
    /// The parameters the tier computes at, by digest.
    latest: Option<(Digest, Arc<Vec<f32>>)>,
    seen: ExecStats,
}

impl Executor {
    fn start(mut x: Executor, done: mpsc::UnboundedSender<Input>) -> mpsc::UnboundedSender<ExecMsg> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                match m {
                    ExecMsg::Compute(job) => {
                        let round = job.round;
                        let result = x.compute(*job).await;
                        let _ = done.send(Input::Computed { round, result });
                    }
                    ExecMsg::Params(d, p) => x.latest = Some((d, p)),
                    ExecMsg::Costs { wall_secs, state_syncs } => {
                        record_costs(x.lambda.as_mut(), &mut x.seen, &x.p2p.exec, wall_secs, x.p2p.batches_per_round, state_syncs)
                    }
                    ExecMsg::Finish(reply) => {
                        if let Some(lx) = x.lambda.as_mut() {
                            lx.finish().await;
                        }
                        let _ = reply.send(x.lambda.as_ref().map(|l| l.stats.clone()));
                        return;
                    }
                }
            }
        });
        tx
    }

    async fn compute(&mut self, job: ComputeJob) -> Result<OwnGradient, String> {
        let batches = job.epoch_batches[job.batch_ids.clone()].to_vec();
        let me_s = self.me.to_string();
        let tasks = exec::plan_round(batches.len(), self.p2p.exec.batches_per_invocation, self.cfg.seed, job.round, &self.me.to_bytes());
        let mut tier = None;
        if let Some(lx) = self.lambda.as_mut() {
            let params = match (&self.latest, job.params_digest) {
                (Some((d, p)), Some(cur)) if *d == cur => p.clone(),
                _ => {
                    let p = self.trainer.params().await.map_err(|e| e.to_string())?;
                    self.latest = Some((digest_of(&p), p.clone()));
                    p
                }
            };
            let digest_hex = hex(&self.latest.as_ref().expect("just set").0);
            let members: Vec<String> = job.members.iter().map(|p| p.to_string()).collect();
            let uploader = exec::params_uploader(&digest_hex, members.iter().map(String::as_str), &me_s);
            let work = Offload {
                run: &self.run_id,
                peer: &me_s,
                round: job.round,
                epoch: job.epoch,
                cfg: &self.cfg,
                numel: self.numel,
                train: &self.train,
                epoch_batches: &job.epoch_batches,
                batch_ids: job.batch_ids.clone().collect(),
                tasks: &tasks,
                params,
                params_digest: digest_hex,
                uploader,
            };
            tier = Some((lx, work));
        }
        let (mut c, upload) = compute_round(tier, &self.trainer, batches, &tasks, None, self.numel).await.map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        let attack = self.p2p.faults.byzantine.as_ref();
        let (blob, parts) = if job.shards.is_empty() {
            (encode_own(&mut c.grad, c.samples, &self.compression, job.seed, attack, job.round).map_err(|e| format!("{e:#}"))?, Vec::new())
        } else {
            (Vec::new(), encode_own_shards(&mut c.grad, c.samples, &self.compression, job.seed, attack, job.round, &job.shards).map_err(|e| format!("{e:#}"))?)
        };
        Ok(OwnGradient {
            blob,
            parts,
            samples: c.samples,
            loss_sum: c.loss_sum,
            compute_secs: c.secs,
            upload_secs: upload,
            encode_secs: t0.elapsed().as_secs_f64(),
        })
    }
}
