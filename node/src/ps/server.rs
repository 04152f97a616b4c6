//! The parameter server's driver (`--role ps`): set-up, then one loop that
//! selects over the network's events and requests, the results of the work it
//! started (fetches, aggregation, the trainer's update and evaluation) and the
//! core's next deadline, feeds each to the [`ServerCore`] and executes the
//! actions it returns without awaiting anything in the loop.

use super::core::{Action, Input, Phase, RequestId, ServerCore, ServerSettings};
use crate::checkpoint::CheckpointWriter;
use crate::config::{P2pConfig, TrainConfig};
use crate::fetch::fetch_blob;
use crate::metrics::record_costs;
use crate::net::Event;
use crate::report::*;
use crate::setup::*;
use crate::train::*;
use anyhow::bail;
use libp2p::request_response::ResponseChannel;
use p2pml_lambda_grad::TensorData;
use p2pml_proto::line::Line;
use p2pml_proto::wire::Response;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// `--role ps`: the parameter server.
pub async fn run_server(cfg: TrainConfig, p2p: P2pConfig) -> anyhow::Result<NodeReport> {
    let setup = Setup::new(&cfg, &p2p)?;
    let (device, spec, run_id) = (setup.device, setup.spec.clone(), setup.run_id.clone());
    let (compression, rule) = (setup.compression.clone(), setup.rule);
    let mut loaded = setup.load(&cfg, &p2p)?;
    let Resume { ckpt, incarnation, stats: ckpt_stats, conv, restored } = setup.resume(&p2p, &mut loaded)?;
    let Loaded { ds, n_train, val_all, model, opt, numel, max_samples } = loaded;
    let val = TensorData::new(&ds.train.select(&val_all), cfg.dataset, cfg.normalization, device);
    let test = TensorData::new(&ds.test, cfg.dataset, cfg.normalization, device);
    // The server computes no gradients: an empty training set stands in.
    let train = TensorData::new(&ds.train.select(&[]), cfg.dataset, cfg.normalization, device);

    let net = start_net(&p2p, &setup.addrs, &run_id).await?;
    let reporter = setup.report_builder("ps", &net, incarnation, &p2p);
    let Net { client, mut events, mut requests, me } = net;
    let settings = ServerSettings {
        cfg: cfg.clone(),
        p2p: p2p.clone(),
        spec,
        me,
        incarnation,
        n_train,
        val_all,
        numel,
        compression: compression.clone(),
        lr: opt.lr(),
    };
    let mut core = ServerCore::new(settings, model.params_vec(), conv, restored.map(|r| r.header));
    let trainer = TrainerHandle::start(Trainer { model, opt, train, test, eval_batch_size: cfg.eval_batch_size });
    let ckpt_writer = CheckpointWriter::start(ckpt.clone(), p2p.faults.checkpoint_stall);
    let mut progress = Progress::new();
    let mut membership = MembershipLog::default();
    let mut invalid_pushes = 0u64;
    let mut ready_unix_ms = None;
    // Results of the work the loop started, as the core's inputs.
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Input>();
    let mut channels: HashMap<RequestId, ResponseChannel<Response>> = HashMap::new();
    let mut next_id: RequestId = 0;
    let mut eval_started = Instant::now();
    let start = Instant::now();

    // Start once --peers workers are live, or --min-peers and the grace has passed
    // (a restarted server waits the same way for its workers to find it again).
    tracing::info!("waiting for {} workers ({} at least)", p2p.peers, p2p.min_peers);
    loop {
        let wake = start + Duration::from_millis(core.next_deadline());
        let input = tokio::select! {
            ev = events.recv() => match ev {
                Some(Event::Connected(p)) => Input::Connected(p),
                Some(Event::Disconnected(p)) => Input::Disconnected(p),
                // The server subscribes to nothing; drop without forwarding.
                Some(Event::Gossip { id, propagated_by, .. }) => {
                    let c = client.clone();
                    tokio::spawn(async move { c.ignore(id, propagated_by).await });
                    continue;
                }
                Some(Event::DialFailed { .. }) => continue,
                None => bail!("the network task stopped"),
            },
            r = requests.recv() => match r {
                Some(r) => {
                    next_id += 1;
                    channels.insert(next_id, r.channel);
                    Input::Request { id: next_id, peer: r.peer, request: r.request }
                }
                None => bail!("the network task stopped"),
            },
            Some(i) = done_rx.recv() => i,
            _ = tokio::time::sleep_until(wake.into()) => Input::Tick,
        };
        let now = start.elapsed().as_millis() as u64;
        for action in core.on_input(now, input) {
            match action {
                Action::Respond { id, response } => {
                    if let Some(ch) = channels.remove(&id) {
                        let c = client.clone();
                        tokio::spawn(async move { c.respond(ch, response).await });
                    }
                }
                Action::Fetch { round, peer, len } => {
                    let (c, tx) = (client.clone(), done_tx.clone());
                    tokio::spawn(async move {
                        let result = fetch_blob(&c, peer, peer, round, None, len).await;
                        let _ = tx.send(Input::Fetched { round, peer, result });
                    });
                }
                Action::Aggregate { round, inputs } => {
                    let (tx, compression) = (done_tx.clone(), compression.clone());
                    tokio::task::spawn_blocking(move || {
                        let (grad, samples, loss, decode_secs, aggregate_secs) = aggregate(&inputs, &compression, numel, &rule, max_samples);
                        let _ = tx.send(Input::Aggregated { round, grad, samples, loss, decode_secs, aggregate_secs });
                    });
                }
                Action::Update(job) => {
                    let (rx, tx) = (trainer.submit_update(*job)?, done_tx.clone());
                    tokio::spawn(async move {
                        if let Ok(u) = rx.await {
                            let _ = tx.send(Input::Updated(u));
                        }
                    });
                }
                Action::Evaluate => {
                    eval_started = Instant::now();
                    let (rx, tx) = (trainer.submit_evaluate(Some(&val))?, done_tx.clone());
                    tokio::spawn(async move {
                        if let Ok((Some(val), test)) = rx.await {
                            let _ = tx.send(Input::Evaluated { val, test });
                        }
                    });
                }
                Action::SetLr(lr) => trainer.set_lr(lr),
                Action::Checkpoint { mut meta, state } => {
                    meta.written_unix_ms = unix_ms();
                    ckpt_writer.submit(meta, state);
                }
                Action::Ready { round, epoch } => {
                    ready_unix_ms = Some(unix_ms());
                    println!("{}", Line::Ready { round, epoch: epoch + 1, incarnation });
                    progress = Progress::new();
                }
                Action::Round(r) => {
                    progress.round(*r);
                    record_costs(None, &mut Default::default(), &p2p.exec, progress.wall_secs(), p2p.batches_per_round, 0);
                }
                Action::Epoch { epoch, val, test, lr } => {
                    crate::metrics::stage("evaluate", eval_started.elapsed().as_secs_f64());
                    progress.epoch(epoch, &test, Some(&val), lr);
                }
                Action::Membership { peer, event, incarnation } => membership.record(&peer, event, incarnation),
                Action::InvalidPush => {
                    invalid_pushes += 1;
                    crate::metrics::invalid_push();
                }
                // The loop ends on the phase below, after this batch's other actions.
                Action::Done => {}
                Action::Fail(why) => bail!("{why}"),
            }
        }
        if core.phase() == Phase::Done {
            break;
        }
    }

    let report = reporter.build(
        progress.wall_secs(),
        Outcome {
            rounds: core.round(),
            final_digest: hex(&core.last_digest()),
            stopped_early: core.stopped_early(),
            invalid_inputs: invalid_pushes,
            rounds_log: progress.rounds,
            epochs_log: progress.epochs,
            ready_unix_ms,
            membership_log: membership.events,
            checkpoints: ckpt_writer.finish(ckpt_stats),
            ..Outcome::default()
        },
    );
    write_report(&p2p, &report)?;
    Ok(report)
}
