//! A worker of the parameter server (`--role worker --ps ADDR`).


use crate::config::{P2pConfig, TrainConfig};
use crate::exec::{self, ExecutorKind, LambdaExecutor};
use crate::net::{Client, Event};
use crate::fetch::*;
use crate::metrics::record_costs;
use crate::report::*;
use crate::setup::*;
use crate::train::*;
use crate::exec::{compute_round, Offload};
use crate::store::{chunks, SharedStore, Store};
use anyhow::bail;
use libp2p::{Multiaddr, PeerId};
use p2pml_lambda_grad::TensorData;
use p2pml_proto::wire::{PsWork, Request, Response, RunSpec};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use p2pml_proto::line::{Line, MemberEvent};

/// A worker gives up when the server has been unreachable this long.
const SERVER_PATIENCE: Duration = Duration::from_secs(600);


/// The worker's link to the server: requests that retry with backoff (and
/// redial) while the server is unreachable, and the time spent so.
struct Link {
    client: Client,
    server: PeerId,
    addr: Multiaddr,
    spec: RunSpec,
    /// Seconds spent waiting for an unreachable server.
    stalled: f64,
    /// Whether we believe the server is up (for the printed membership lines);
    /// shared with the task that sees the connection close.
    server_up: Arc<AtomicBool>,
    failures: u64,
}

impl Link {
    /// Sends `req` until the server answers it, greeting the server again when it
    /// does not know us (it restarted). Backoff 100 ms doubling to 2 s.
    async fn call(&mut self, req: Request) -> anyhow::Result<Response> {
        let mut backoff = Duration::from_millis(100);
        let mut down_since: Option<Instant> = None;
        loop {
            match self.client.request(self.server, req.clone()).await {
                Ok(Response::PsAck { accepted: false, reason: Some(r) }) if r.starts_with("hello first") => {
                    self.hello().await?;
                }
                Ok(r) => {
                    if let Some(t) = down_since {
                        self.stalled += t.elapsed().as_secs_f64();
                    }
                    if !self.server_up.swap(true, Ordering::SeqCst) {
                        println!("{}", Line::Member { event: MemberEvent::Rejoined, peer: self.server.to_string(), incarnation: 0 });
                    }
                    return Ok(r);
                }
                Err(e) => {
                    self.failures += 1;
                    let since = *down_since.get_or_insert_with(Instant::now);
                    if server_lost(&self.server_up, self.server) {
                        tracing::warn!("the parameter server is unreachable ({e}); retrying");
                    }
                    if since.elapsed() > SERVER_PATIENCE {
                        self.stalled += since.elapsed().as_secs_f64();
                        bail!("the parameter server {} has been unreachable for {} s: check that it runs", self.addr, SERVER_PATIENCE.as_secs());
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    let _ = self.client.dial(Some(self.server), self.addr.clone()).await;
                }
            }
        }
    }

    async fn hello(&mut self) -> anyhow::Result<()> {
        let r = Box::pin(self.call(Request::Hello { spec: self.spec.clone() })).await?;
        match r {
            Response::Hello { accepted: true, .. } => Ok(()),
            Response::Hello { accepted: false, reason, .. } => {
                bail!("the parameter server refused this worker: {}", reason.unwrap_or_default())
            }
            other => bail!("unexpected answer to hello: {other:?}"),
        }
    }
}

/// The server is gone (its connection closed, or a request failed): says so
/// once (testnet reads the line to time detection). True if it was news.
fn server_lost(up: &AtomicBool, server: PeerId) -> bool {
    let news = up.swap(false, Ordering::SeqCst);
    if news {
        println!("{}", Line::Member { event: MemberEvent::Died, peer: server.to_string(), incarnation: 0 });
    }
    news
}

/// Fetches the parameters of `round` from the server, checked against the poll's length and digest.
async fn fetch_params(client: &Client, server: PeerId, w: &PsWork, numel: usize) -> Result<Vec<f32>, String> {
    let n = chunks(w.params_len);
    let reqs = (0..n).map(|index| {
        let client = client.clone();
        let round = w.round;
        async move { client.request(server, Request::Params { round, index }).await }
    });
    let mut bytes = Vec::with_capacity(w.params_len as usize);
    for p in futures::future::join_all(reqs).await {
        match p.map_err(|e| e.to_string())? {
            Response::Params { total_len, data, .. } if total_len == w.params_len => bytes.extend_from_slice(&data),
            other => return Err(format!("unexpected answer {other:?}")),
        }
    }
    if *blake3::hash(&bytes).as_bytes() != w.params_digest {
        return Err("the parameters do not match their digest".into());
    }
    p2pml_proto::decode_f32(&bytes, numel).map_err(|e| e.to_string())
}

/// `--role worker --ps ADDR`: computes gradients for the server.
pub async fn run_worker(cfg: TrainConfig, p2p: P2pConfig) -> anyhow::Result<NodeReport> {
    let setup = Setup::new(&cfg, &p2p)?;
    // validate() has checked that a worker has --ps.
    let (server, addr) = setup.addrs.ps.clone().expect("a worker's --ps is checked");
    let mut lambda = match p2p.exec.executor {
        ExecutorKind::Local => None,
        ExecutorKind::Lambda => Some(LambdaExecutor::new(&p2p.exec).await?),
    };
    let (device, spec, run_id) = (setup.device, setup.spec.clone(), setup.run_id.clone());
    let (compression, attack) = (setup.compression.clone(), setup.attack.clone());
    let Loaded { ds, n_train, val_all, model, opt, numel, .. } = setup.load(&cfg, &p2p)?;
    let train = TensorData::new(&ds.train, cfg.dataset, cfg.normalization, device);
    // A restarted worker is a new incarnation: the start time orders them.
    let incarnation = setup.started_unix_ms;

    let net = start_net(&p2p, &setup.addrs, &run_id).await?;
    let reporter = setup.report_builder("worker", &net, incarnation, &p2p);
    let me = net.me;
    let me_s = me.to_string();
    let store: SharedStore = Arc::new(Mutex::new(Store::default()));
    tokio::spawn(responder(net.client.clone(), store.clone(), spec.clone(), net.requests));
    // The server's connection closing is the first sign of its death; gossip is
    // of no use to a worker.
    let server_up = Arc::new(AtomicBool::new(true));
    let mut events = net.events;
    let drain_client = net.client.clone();
    let up = server_up.clone();
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            match ev {
                Event::Gossip { id, propagated_by, .. } => {
                    let _ = drain_client.ignore(id, propagated_by).await;
                }
                Event::Disconnected(p) if p == server && server_lost(&up, server) => {
                    tracing::warn!("the connection to the parameter server closed");
                }
                _ => {}
            }
        }
    });
    let client = net.client.clone();
    client.dial(Some(server), addr.clone()).await?;
    let mut link = Link { client: client.clone(), server, addr: addr.clone(), spec: spec.clone(), stalled: 0.0, server_up, failures: 0 };
    link.hello().await?;
    // Heartbeats keep the server's failure detector fed while we compute.
    let hb_client = client.clone();
    let hb_every = Duration::from_millis(p2p.heartbeat_ms);
    let heartbeats = tokio::spawn(async move {
        loop {
            tokio::time::sleep(hb_every).await;
            let _ = hb_client.request(server, Request::PsHeartbeat { incarnation }).await;
        }
    });

    // The worker evaluates nothing: an empty test set stands in.
    let test = TensorData::new(&ds.test.select(&[]), cfg.dataset, cfg.normalization, device);
    let trainer = TrainerHandle::start(Trainer { model, opt, train, test, eval_batch_size: cfg.eval_batch_size });
    let mut sched: Option<Schedule> = None;
    let mut next = 0u64;
    let mut rounds_log = Vec::new();
    let mut computed = 0u64;
    let mut gradient_bytes_sent = 0u64;
    let mut ready_unix_ms = None;
    let wall = Instant::now();
    let bpr = p2p.batches_per_round;
    let mut fn_seen = exec::ExecStats::default();
    let final_digest = loop {
        let work = match link.call(Request::PsPoll { round: next, incarnation }).await? {
            Response::PsWork(w) => *w,
            other => bail!("unexpected answer to a poll: {other:?}"),
        };
        if work.finished {
            break hex(&work.params_digest);
        }
        if work.waiting {
            continue;
        }
        if work.params_len != 4 * numel as u64 || work.round < work.first_round {
            bail!("the parameter server answered with {} bytes of parameters for round {} of an epoch from round {}: not this model's run", work.params_len, work.round, work.first_round);
        }
        if work.round < next {
            tracing::warn!("the server is back at round {} (it restarted from a checkpoint)", work.round);
        } else if work.round > next + 1 && computed > 0 {
            tracing::info!("the server went on without us from round {next} to {}", work.round);
        }
        if !work.active {
            next = work.round + 1;
            continue;
        }
        let members = peer_ids(&work.members);
        let fresh = sched.as_ref().is_none_or(|s| s.epoch != work.epoch || s.first_round != work.first_round || s.members != members);
        if fresh {
            sched = Some(Schedule::new(&cfg, &p2p, n_train, &val_all, work.epoch, work.first_round, members, me)?);
        }
        let sc = sched.as_ref().expect("just set");
        if sc.my_index.is_none() {
            next = work.round + 1;
            continue;
        }
        if ready_unix_ms.is_none() {
            ready_unix_ms = Some(unix_ms());
            println!("{}", Line::Ready { round: work.round, epoch: work.epoch + 1, incarnation });
        }
        let round = work.round;
        let mut st = StageTimes::default();
        let t0 = Instant::now();
        let params = match fetch_params(&client, server, &work, numel).await {
            Ok(p) => Arc::new(p),
            Err(e) => {
                tracing::debug!("cannot fetch round {round}'s parameters ({e}); polling again");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        st.upload = t0.elapsed().as_secs_f64();

        // Compute: the same tasks, seeds and order as a P2P peer.
        let k = round - sc.first_round;
        let lo = (k as usize * bpr).min(sc.batches.len());
        let hi = ((k as usize + 1) * bpr).min(sc.batches.len());
        let batches = sc.batches[lo..hi].to_vec();
        let tasks = exec::plan_round(batches.len(), p2p.exec.batches_per_invocation, cfg.seed, round, &me.to_bytes());
        let tier = lambda.as_mut().map(|lx| {
            let digest = hex(&work.params_digest);
            let members: Vec<String> = sc.members.iter().map(|p| p.to_string()).collect();
            let uploader = exec::params_uploader(&digest, members.iter().map(String::as_str), &me_s);
            let w = Offload {
                run: &run_id,
                peer: &me_s,
                round,
                epoch: work.epoch,
                cfg: &cfg,
                numel,
                train: &ds.train,
                epoch_batches: &sc.batches,
                batch_ids: (lo..hi).collect(),
                tasks: &tasks,
                params: params.clone(),
                params_digest: digest,
                uploader,
            };
            (lx, w)
        });
        let (c, _) = compute_round(tier, &trainer, batches, &tasks, Some(params.clone()), numel).await?;
        st.compute = c.secs;

        // Encode and push.
        let t0 = Instant::now();
        let mut c = c;
        let blob = encode_own(&mut c.grad, c.samples, &compression, gradient_seed(cfg.seed, round, &me), attack.as_ref(), round)?;
        st.encode = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let len = blob.len() as u64;
        let a = announcement(&run_id, round, work.epoch, (c.samples, c.loss_sum), &blob, None, Vec::new());
        {
            let mut s = store.lock().expect("store lock");
            s.insert(round, &me, Arc::new(blob));
            s.prune(round.saturating_sub(4));
        }
        let accepted = match link.call(Request::PsPush(Box::new(a))).await? {
            Response::PsAck { accepted: true, .. } => true,
            Response::PsAck { accepted: false, reason } => {
                tracing::info!("round {round}: push refused ({})", reason.unwrap_or_default());
                false
            }
            other => bail!("unexpected answer to a push: {other:?}"),
        };
        st.send = t0.elapsed().as_secs_f64();
        next = round + 1;
        if !accepted {
            continue;
        }
        gradient_bytes_sent += len;
        computed += 1;
        if let Some(m) = crate::metrics::get() {
            for (name, secs) in [("receive", st.upload), ("compute", st.compute), ("encode", st.encode), ("send", st.send)] {
                m.stage_seconds.with_label_values(&[name]).observe(secs);
            }
            m.round.set(round as i64 + 1);
            m.epoch.set(work.epoch as i64 + 1);
            m.rounds.inc();
            // A worker's view of the membership: itself and the server.
            let up = usize::from(link.server_up.load(Ordering::SeqCst));
            crate::metrics::membership(up, 1 + up);
            m.train_loss.set(c.loss_sum / c.samples.max(1) as f64);
        }
        record_costs(lambda.as_mut(), &mut fn_seen, &p2p.exec, wall.elapsed().as_secs_f64(), bpr, 0);
        tracing::info!(round, epoch = work.epoch + 1, samples = c.samples, compute_s = format!("{:.3}", st.compute), "gradient pushed");
        // testnet reads this line: the worker contributes again.
        println!("{}", Line::Computed { round, epoch: work.epoch + 1, samples: c.samples, loss: c.loss_sum / c.samples.max(1) as f64 });
        rounds_log.push(RoundRecord {
            round,
            epoch: work.epoch,
            contributors: 1,
            samples: c.samples,
            train_loss: c.loss_sum / c.samples.max(1) as f64,
            lr: 0.0,
            digest: hex(&work.params_digest),
            finished_at: wall.elapsed().as_secs_f64(),
            unix_ms: unix_ms(),
            stages: st,
            announced_unix_ms: None,
            bytes_sent: 0,
            bytes_received: 0,
        });
    };
    heartbeats.abort();

    let wall_secs = wall.elapsed().as_secs_f64();
    if link.stalled > 0.0 {
        tracing::info!("stalled {:.1} s waiting for the parameter server", link.stalled);
    }
    if let Some(lx) = lambda.as_mut() {
        lx.finish().await;
    }
    let report = reporter.build(
        wall_secs,
        Outcome {
            rounds: computed,
            final_digest,
            gradient_bytes_sent,
            rounds_log,
            function_tier: lambda.as_ref().map(|l| l.stats.clone()),
            ready_unix_ms,
            server_unreachable_seconds: link.stalled,
            ..Outcome::default()
        },
    );
    write_report(&p2p, &report)?;
    Ok(report)
}

