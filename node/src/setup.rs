//! What every role sets up the same way, in the same order (a bad flag fails
//! before a data set loads, a bad data set before the network starts): checks
//! of the configuration and outputs, the run's rules, data and model,
//! checkpoints and incarnation, then the network, the printed addresses, the
//! metrics endpoint and testnet's control stdin.

use crate::checkpoint::{Checkpoints, Restored};
use crate::config::{run_spec, Addresses, P2pConfig, TrainConfig};
use crate::report::{unix_ms, CheckpointStats, ReportBuilder};
use crate::train::{max_round_samples, restore_checkpoint, Convergence};
use p2pml_lambda_grad::data::{Dataset, Partition};
use p2pml_lambda_grad::{device_name, Model, ModelSpec, Optimizer};
use p2pml_proto::line::Line;
use p2pml_proto::wire::RunSpec;
use p2pml_proto::{Aggregation, Attack, Compression};
use std::sync::Arc;
use crate::net::{self, Client, Event, InboundRequest};
use anyhow::{anyhow, Context};
use libp2p::PeerId;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The run's settings, checked, and what follows from them.
pub(crate) struct Setup {
    pub(crate) device: tch::Device,
    pub(crate) spec: RunSpec,
    pub(crate) run_id: String,
    pub(crate) compression: Compression,
    pub(crate) rule: Aggregation,
    /// This peer's attack (--byzantine).
    pub(crate) attack: Option<Attack>,
    pub(crate) started_unix_ms: u64,
    /// --listen, --bootstrap and --ps, parsed once.
    pub(crate) addrs: Addresses,
}

/// The data set, the model and its optimizer.
pub(crate) struct Loaded {
    pub(crate) ds: Dataset,
    pub(crate) n_train: usize,
    /// The validation samples (indices into the training split).
    pub(crate) val_all: Vec<usize>,
    pub(crate) model: Model,
    pub(crate) opt: Optimizer,
    pub(crate) numel: usize,
    /// The most samples one gradient of a round can sum.
    pub(crate) max_samples: u64,
}

/// The checkpoints and what this start resumed from.
pub(crate) struct Resume {
    pub(crate) ckpt: Arc<Checkpoints>,
    /// This start's incarnation (one more than the last start of the state directory).
    pub(crate) incarnation: u64,
    pub(crate) stats: CheckpointStats,
    pub(crate) conv: Convergence,
    pub(crate) restored: Option<Restored>,
}

impl Setup {
    /// Checks the configuration and that --state-dir and --report are writable
    /// (a mistake there costs seconds, not a training run).
    pub(crate) fn new(cfg: &TrainConfig, p2p: &P2pConfig) -> anyhow::Result<Setup> {
        cfg.validate()?;
        let addrs = p2p.validate()?;
        crate::fsutil::check_node_outputs(p2p).map_err(|e| anyhow!(e))?;
        if cfg.threads > 0 {
            p2pml_lambda_grad::set_torch_threads(cfg.threads);
        }
        let device = cfg.device.resolve()?;
        let spec = run_spec(cfg, p2p);
        let run_id = spec.run_id();
        let (compression, rule, attack) = (p2p.compression.clone(), p2p.aggregation, p2p.faults.byzantine);
        if let Some(a) = &attack {
            tracing::warn!("byzantine mode: this peer sends {a} gradients");
        }
        Ok(Setup { device, spec, run_id, compression, rule, attack, started_unix_ms: unix_ms(), addrs })
    }

    /// Loads the data set and builds the model (before the network: a bad data
    /// directory fails fast).
    pub(crate) fn load(&self, cfg: &TrainConfig, p2p: &P2pConfig) -> anyhow::Result<Loaded> {
        let ds = cfg.load_dataset()?;
        let n_train = ds.train.len();
        let val_all = Partition::new(n_train, cfg.val_size, 1, cfg.seed)?.validation().to_vec();
        let model = Model::new(ModelSpec::for_dataset(cfg.model, cfg.dataset), self.device, cfg.seed)?;
        let numel = model.numel();
        Ok(Loaded { ds, n_train, val_all, model, opt: Optimizer::new(cfg.optimizer), numel, max_samples: max_round_samples(p2p, cfg.batch_size) })
    }

    /// Opens the checkpoints (and the incarnation counter) before the network,
    /// so that a restarted node announces a higher incarnation from its first
    /// message, and restores the newest usable checkpoint into `l`.
    pub(crate) fn resume(&self, p2p: &P2pConfig, l: &mut Loaded) -> anyhow::Result<Resume> {
        let ckpt = Arc::new(Checkpoints::open_for(p2p, &self.spec)?);
        let incarnation = ckpt.next_incarnation()?;
        let mut stats = CheckpointStats::default();
        let mut conv = Convergence::new(p2p);
        let restored = if p2p.checkpoint_every > 0 { restore_checkpoint(&ckpt, &mut l.model, &mut l.opt, &mut conv, &mut stats)? } else { None };
        Ok(Resume { ckpt, incarnation, stats, conv, restored })
    }

    /// The report's fixed part, once the network has given this node its id.
    pub(crate) fn report_builder(&self, role: &'static str, net: &Net, incarnation: u64, p2p: &P2pConfig) -> ReportBuilder {
        ReportBuilder {
            role,
            peer_id: net.me.to_string(),
            spec: self.spec.clone(),
            device: device_name(self.device),
            traffic: net.client.traffic.clone(),
            incarnation,
            started_unix_ms: self.started_unix_ms,
            exec: p2p.exec.clone(),
            batches_per_round: p2p.batches_per_round,
        }
    }
}

/// What every role sets up the same way: the network (private if --swarm-key),
/// the printed addresses, metrics and the control stdin.
pub(crate) struct Net {
    pub(crate) client: Client,
    pub(crate) events: mpsc::Receiver<Event>,
    pub(crate) requests: mpsc::Receiver<InboundRequest>,
    pub(crate) me: PeerId,
}

pub(crate) async fn start_net(p2p: &P2pConfig, addrs: &Addresses, run_id: &str) -> anyhow::Result<Net> {
    std::fs::create_dir_all(&p2p.state_dir).with_context(|| format!("cannot create --state-dir {}", p2p.state_dir.display()))?;
    let key = match p2p.identity_seed {
        Some(seed) => net::key_from_seed(seed),
        None => net::load_or_create_key(&p2p.state_dir.join("peer.key"))?,
    };
    let psk = p2p.swarm_key.as_deref().map(net::load_swarm_key).transpose()?;
    // validate() has checked that --fault-forge comes with a --bootstrap.
    let forge_as = addrs.bootstrap.first().filter(|_| p2p.faults.forge).map(|(peer, _)| *peer);
    if psk.is_some() {
        tracing::info!("private swarm: only peers with the same --swarm-key can connect");
    }
    let link = p2p.link.map(|spec| {
        tracing::info!("emulated link: this node's sends go through {spec}");
        crate::link::Link::new(spec, p2p.identity_seed.unwrap_or(0) ^ 0x11_4b)
    });
    let (client, events, requests, event_loop) = net::new(key, &addrs.listen, &net::NetOptions { psk, forge_as, queue: 0, link })?;
    tokio::spawn(event_loop.run());
    if p2p.control_stdin {
        tokio::spawn(control_stdin(client.clone()));
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
        println!("{}", Line::Listening { addr: format!("{a}/p2p/{me}") });
    }
    println!("{}", Line::Peer { id: me.to_string(), run: run_id.to_string(), role: p2p.role.as_str().into() });
    crate::metrics::start_metrics(p2p, p2p.role.as_str(), &me, &client).await?;
    Ok(Net { client, events, requests, me })
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

