//! The P2P training loop.

use crate::checkpoint::CheckpointMeta;
use crate::config::{P2pConfig, TrainConfig};
use crate::exec::{self, compute_round, ExecutorKind, LambdaExecutor, Offload};
use crate::checkpoint::CheckpointWriter;
use super::rogue::run_rogue;
use crate::round::{RoundState, Stragglers};
use crate::store::{SharedStore, StateBlob, Store};
use crate::report::*;
use crate::train::*;
use crate::fetch::*;
use crate::metrics::record_costs;
use crate::setup::*;
use p2pml_proto::line::Line;
use anyhow::bail;
use libp2p::PeerId;
use p2pml_lambda_grad::TensorData;
use p2pml_proto::wire::{self, Digest, Gossip, SyncMode, ValStats};
use p2pml_proto::Attack;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use super::node::*;
use super::decide::{self, BarrierStep, StartRule};

/// Joins (or starts) a decentralized run and trains until it ends.
pub async fn run(cfg: TrainConfig, p2p: P2pConfig) -> anyhow::Result<NodeReport> {
    let setup = Setup::new(&cfg, &p2p)?;
    let (device, spec, run_id) = (setup.device, setup.spec.clone(), setup.run_id.clone());
    let (compression, rule, attack) = (setup.compression.clone(), setup.rule.clone(), setup.attack.clone());
    // The function tier's settings are checked before the network starts: a
    // wrong bucket or endpoint costs seconds, not a joined run.
    let mut lambda = match p2p.exec.executor {
        ExecutorKind::Lambda if !(p2p.faults.garbage || p2p.faults.heartbeat_only) => Some(LambdaExecutor::new(&p2p.exec).await?),
        _ => None,
    };
    let bootstrap =
        p2p.bootstrap.iter().map(|a| dial_addr("--bootstrap", a, "the bootstrap node")).collect::<anyhow::Result<Vec<_>>>()?;

    // Data and model before the network, so that a bad flag fails fast.
    let mut loaded = setup.load(&cfg, &p2p)?;
    let Resume { ckpt, incarnation, stats: ckpt_stats, mut conv, restored } = setup.resume(&p2p, &mut loaded)?;
    let Loaded { ds, n_train, val_all, model, opt, numel, max_samples } = loaded;
    let train = TensorData::new(&ds.train, cfg.dataset, cfg.normalization, device);
    let test = TensorData::new(&ds.test, cfg.dataset, cfg.normalization, device);
    let started_unix_ms = setup.started_unix_ms;
    let net = start_net(&p2p, &run_id).await?;
    let reporter = setup.report_builder("peer", &net, incarnation, &p2p);
    let Net { client, events, requests, me } = net;
    let store: SharedStore = Arc::new(Mutex::new(Store::default()));
    if p2p.faults.heartbeat_only {
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
        membership: MembershipLog::default(),
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
            n.accepted.iter().any(|p| peers.contains(p) || n.known.contains_key(p)) || (n.p2p.faults.heartbeat_only && !n.connected.is_empty())
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

    if p2p.faults.garbage || p2p.faults.heartbeat_only {
        return run_rogue(node, ReportBuilder { role: "rogue", ..reporter }).await;
    }
    let withhold = matches!(attack, Some(Attack::Withhold));
    let me_s = me.to_string();
    let mut latest_params: Option<(Digest, Arc<Vec<f32>>)> = None;

    // A run that is ahead of us (a peer past our round: past round 0, or past the
    // checkpoint we resumed from) is joined by state sync. Otherwise a new run
    // starts, or the run resumes from our checkpoint, once --peers peers are live
    // (or --min-peers, and --start-grace-ms has passed).
    let ahead = |n: &Node| n.remote_round() > n.round;
    let mut trainer = TrainerHandle::start(Trainer { model, opt, train, test, eval_batch_size: cfg.eval_batch_size });
    let mut state_syncs = 0u64;
    if !ahead(&node) {
        tracing::info!("waiting for {} live peers ({} at least)", p2p.peers, p2p.min_peers);
        let mut start = StartRule::new(p2p.peers, p2p.min_peers, p2p.start_grace_ms);
        node.wait_until("peers to join", |n| start.ready(n.rs.live().len(), n.now_ms()) || ahead(n))
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
        let (h, active) = node.join_running(&mut trainer, &mut conv).await?;
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
    println!("{}", Line::Ready { round: node.round, epoch: sched.epoch + 1, incarnation });
    node.ready = true;
    node.epoch = sched.epoch;
    for e in [sched.epoch, sched.epoch + 1] {
        if node.subscribed.insert(e) {
            client.subscribe(&node.epoch_topic(e)).await?;
        }
    }

    let mut progress = Progress::new();
    let mut catch_ups = 0u64;
    let ckpt_writer = CheckpointWriter::start(ckpt.clone(), p2p.faults.checkpoint_stall);
    let mut pending_val: Option<ValStats> = None;
    let mut stopped_early = false;
    let bpr = p2p.batches_per_round;
    let mut fn_seen = exec::ExecStats::default();

    loop {
        if node.round >= sched.first_round + sched.rounds {
            // End of the epoch: an active peer evaluates its slice of the
            // validation set (shared on its next announcement) and the test set.
            if let Some(my_index) = sched.my_index {
                let p = sched.members.len();
                let my_val: Vec<usize> = val_all.iter().copied().skip(my_index).step_by(p).collect();
                let val_data = (!my_val.is_empty())
                    .then(|| TensorData::new(&ds.train.select(&my_val), cfg.dataset, cfg.normalization, device));
                let t_eval = Instant::now();
                let (v, te) = node.while_pumping(trainer.evaluate(val_data.as_ref())).await??;
                crate::metrics::stage("evaluate", t_eval.elapsed().as_secs_f64());
                pending_val = v.map(|v| ValStats {
                    epoch: sched.epoch,
                    loss_sum: v.loss * v.samples as f64,
                    correct: (v.accuracy * v.samples as f64).round() as u64,
                    count: v.samples as u64,
                });
                progress.epoch(sched.epoch, &te, None, trainer.lr());
            }
            if sched.epoch + 1 >= cfg.epochs || stopped_early {
                break;
            }
            // The next epoch's members: in synchronous mode, the contributors of
            // the last round plus the ready joiners they named, which every peer
            // computes from the same announcements; in asynchronous mode, the live peers.
            let planned = node.planned_next.take();
            let members = decide::epoch_members(planned, p2p.sync, || node.next_epoch_members(node.round - 1), || node.rs.live());
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
            let mut tier = None;
            if let Some(lx) = lambda.as_mut() {
                let digest = node.last_digest.map(|(_, d)| d);
                let params = match (&latest_params, digest) {
                    (Some((d, p)), Some(cur)) if *d == cur => p.clone(),
                    _ => {
                        let p = node.while_pumping(trainer.params()).await??;
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
                tier = Some((lx, work));
            }
            // The function tier's tasks, then (all of them, or those it failed) here, off the async threads.
            let (c, upload) = node.while_pumping(compute_round(tier, &trainer, batches, &tasks, None, numel)).await??;
            st.upload = upload;
            st.compute = c.secs;

            // Encode and announce.
            let t0 = Instant::now();
            let seed = gradient_seed(cfg.seed, round, &me);
            let mut c = c;
            let blob = encode_own(&mut c.grad, c.samples, &compression, seed, attack.as_ref(), round)?;
            st.encode = t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            let val = if k == 0 { pending_val.take() } else { None };
            let a = announcement(&run_id, round, epoch, &c, &blob, val, ids(&node.ready_joiners()));
            let len = a.len;
            store.lock().expect("store lock").insert(round, &me, Arc::new(blob));
            node.rs.hold(round, me);
            node.announces.insert((round, me), a.clone());
            store.lock().expect("store lock").insert_announce(&me, a.clone());
            let topic = node.epoch_topic(epoch);
            client.publish(&topic, wire::encode(&Gossip::Announce(a))).await?;
            node.gradient_bytes_sent += len;
            st.send = t0.elapsed().as_secs_f64();
            if p2p.faults.garbage {
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
                let mut quorum_at: Option<u64> = None;
                node.wait_until(&format!("round {round} gradients"), |n| {
                    let (now, can_catch_up) = (n.now_ms(), n.catch_up_source().is_some());
                    let step = decide::barrier_step(n.rs.barrier(round), n.rs.quorum_held(round), &mut quorum_at, deadline.as_millis() as u64, now, can_catch_up);
                    match step {
                        BarrierStep::Release { contributors, missing } => {
                            released = Some((contributors, missing));
                            true
                        }
                        BarrierStep::CatchUp => true,
                        BarrierStep::Wait { wake_at_ms } => {
                            if let Some(w) = wake_at_ms {
                                n.wake = Some(n.start + Duration::from_millis(w));
                            }
                            false
                        }
                    }
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
                        let r = node.sync_state(source, round + 1, &mut trainer, &mut conv).await?;
                        match r {
                            Ok(h) => {
                                state_syncs += 1;
                                catch_ups += 1;
                                let active = node.views.get(&source).map(|v| v.active.clone()).unwrap_or_default();
                                node.round = h.round + 1;
                                sched = node.adopt_schedule(&cfg, &p2p, n_train, &val_all, &h, &active)?;
                                // The run's view of who trains wins over ours: peers we
                                // buried while cut off (a partition) are not demoted when
                                // their refutation reaches us.
                                let now = node.now_ms();
                                for p in peer_ids(&h.active).iter().filter(|p| active.contains(p)) {
                                    node.rs.trust_alive(p, now);
                                }
                                node.epoch = sched.epoch;
                                for e in [sched.epoch, sched.epoch + 1] {
                                    if node.subscribed.insert(e) {
                                        client.subscribe(&node.epoch_topic(e)).await?;
                                    }
                                }
                            }
                            Err(e) => {
                                tracing::warn!("catching up from {source} failed: {e}");
                                node.catch_up_failed.insert(source, node.now_ms());
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
                node.wait_until("stragglers", |n| decide::async_ready(&n.rs.expected(), |r, p| n.rs.holds(r, p), floor, round)).await?;
                let expected = node.rs.expected();
                decide::async_select(&expected, |r, p| node.rs.holds(r, p), &mut node.applied, floor, round)
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
            node.while_pumping(tokio::task::spawn_blocking(move || aggregate(&inputs, &compression, numel, &rule, max_samples))).await??;
        st.decode = decode_secs;
        st.aggregate = aggregate_secs;

        // Convergence decisions ride on the first round of each epoch.
        if any_val && val_sum.2 > 0 {
            let val_loss = val_sum.0 / val_sum.2 as f64;
            let t_conv = Instant::now();
            let (lr, stop) = conv.step(val_loss, trainer.lr());
            crate::metrics::stage("convergence_check", t_conv.elapsed().as_secs_f64());
            if let Some(m) = crate::metrics::get() {
                m.validation_loss.set(val_loss);
            }
            if lr != trainer.lr() {
                tracing::info!("validation loss {val_loss:.4} has not improved: lr {} -> {lr}", trainer.lr());
                trainer.set_lr(lr);
            }
            if let Some(e) = progress.epochs.last_mut() {
                let e: &mut EpochRecord = e;
                e.val_loss = Some(val_loss);
                e.val_accuracy = Some(val_sum.1 as f64 / val_sum.2 as f64);
            }
            stopped_early = stop;
        }

        // Update.
        let t0 = Instant::now();
        let lr = trainer.lr();
        let (plateau, stopping) = conv.snapshot();
        let perturb = p2p.faults.perturb_round == Some(round);
        let sched_info = EpochInfo {
            first_round: sched.first_round,
            members: sched.members.clone(),
            active: node.rs.active_members(),
            next: node.planned_next.clone().unwrap_or_default(),
            withheld: node.withheld.iter().filter(|(_, e)| **e == epoch).map(|(p, _)| *p).collect(),
        };
        let job = UpdateJob {
            grad: grad_mean,
            samples: total_samples,
            perturb,
            round,
            epoch,
            plateau,
            stopping,
            info: sched_info,
            keep_params: lambda.is_some(),
        };
        let Updated { digest, state, params } = node.while_pumping(trainer.update(job)).await??;
        latest_params = params.map(|p| (digest, p));
        let state = Arc::new(state);
        store.lock().expect("store lock").set_state(StateBlob { round, epoch, bytes: state.clone() });
        if p2p.checkpoint_every > 0 && (round + 1).is_multiple_of(p2p.checkpoint_every) {
            let meta = CheckpointMeta::now(&run_id, round, epoch, &node.rs, |p| node.known.get(p).cloned().unwrap_or_default());
            ckpt_writer.submit(meta, state);
        }
        st.update = t0.elapsed().as_secs_f64();
        node.last_digest = Some((round, digest));
        node.digests.entry(round).or_default().insert(me, digest);
        progress.round(RoundDone {
            round,
            epoch,
            contributors: sorted.len(),
            samples: total_samples,
            loss_total,
            lr,
            digest,
            stages: st,
        });
        if let Some(good) = node.check_digests(round) {
            let r = node.sync_state(good, round, &mut trainer, &mut conv).await?;
            match r {
                Ok(_) => {
                    state_syncs += 1;
                    if let Some(r) = progress.rounds.last_mut() {
                        let r: &mut RoundRecord = r;
                        r.digest = node.last_digest.map(|(_, d)| hex(&d)).unwrap_or_default();
                    }
                }
                Err(e) => tracing::warn!("state sync from {good} failed: {e}"),
            }
        }
        record_costs(lambda.as_mut(), &mut fn_seen, &p2p.exec, progress.wall_secs(), bpr, state_syncs);
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

    // Keep serving until every live peer has passed our last round, and lost
    // members have had a grace to come back for the final state (bounded).
    node.finished = true;
    node.heartbeat().await;
    let last = node.round;
    let finished_at = node.now_ms();
    let linger_deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < linger_deadline {
        let lost = decide::lost_members(node.rs.members().iter().map(|(p, m)| (*p, m.alive)), &node.views);
        if decide::may_leave(&node.rs.live(), &lost, &me, &node.views, last, node.now_ms() - finished_at) {
            break;
        }
        tokio::select! {
            r = node.pump() => r?,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }

    let final_digest = hex(&node.while_pumping(trainer.digest()).await??);
    let wall_secs = progress.wall_secs();
    if let Some(lx) = lambda.as_mut() {
        lx.finish().await;
    }
    let report = reporter.build(
        wall_secs,
        Outcome {
            rounds: node.round,
            final_digest,
            stopped_early,
            gradient_bytes_sent: node.gradient_bytes_sent,
            digest_mismatches: node.digest_mismatches,
            state_syncs,
            rounds_log: progress.rounds,
            epochs_log: progress.epochs,
            peer_scores: node.scores_report(),
            function_tier: lambda.as_ref().map(|l| l.stats.clone()),
            ready_unix_ms,
            catch_ups,
            membership_log: std::mem::take(&mut node.membership.events),
            checkpoints: ckpt_writer.finish(ckpt_stats),
            admission: AdmissionReport { unadmitted: node.unadmitted_report(), ..std::mem::take(&mut node.admission) },
            ..Outcome::default()
        },
    );
    write_report(&p2p, &report)?;
    Ok(report)
}

