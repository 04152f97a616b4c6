//! Configuration: one serde struct with defaults, filled once from clap in `main`.

use clap::Args;
use p2pml_lambda_grad::{DeviceChoice, OptimizerConfig};
use p2pml_proto::{DatasetKind, ModelKind, Normalization, OptimizerKind};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Everything that decides what is trained and how.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    pub model: ModelKind,
    pub dataset: DatasetKind,
    /// Directory with the data set's files (default: where the Debian package puts them).
    pub data_dir: Option<PathBuf>,
    pub normalization: Normalization,
    pub epochs: u64,
    pub batch_size: usize,
    pub optimizer: OptimizerConfig,
    pub seed: u64,
    /// Training samples held out for validation (taken before sharding).
    pub val_size: usize,
    /// Use only the first N training samples (0: all).
    pub limit_train: usize,
    /// Use only the first N test samples (0: all).
    pub limit_test: usize,
    pub eval_batch_size: usize,
    pub device: DeviceChoice,
    /// libtorch intra-op threads (0: libtorch's default, one per core).
    pub threads: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: ModelKind::Cnn,
            dataset: DatasetKind::FashionMnist,
            data_dir: None,
            normalization: Normalization::MeanStd,
            epochs: 3,
            batch_size: 64,
            optimizer: OptimizerConfig::default(),
            seed: 1,
            val_size: 5000,
            limit_train: 0,
            limit_test: 0,
            eval_batch_size: 1000,
            device: DeviceChoice::Auto,
            threads: 0,
        }
    }
}

fn parse_model(s: &str) -> Result<ModelKind, String> {
    s.parse().map_err(|e: p2pml_proto::ParseSpecError| e.to_string())
}
fn parse_dataset(s: &str) -> Result<DatasetKind, String> {
    s.parse().map_err(|e: p2pml_proto::ParseSpecError| e.to_string())
}
fn parse_norm(s: &str) -> Result<Normalization, String> {
    s.parse().map_err(|e: p2pml_proto::ParseSpecError| e.to_string())
}
fn parse_opt(s: &str) -> Result<OptimizerKind, String> {
    s.parse().map_err(|e: p2pml_proto::ParseSpecError| e.to_string())
}
fn parse_device(s: &str) -> Result<DeviceChoice, String> {
    s.parse().map_err(|e: p2pml_lambda_grad::DeviceError| e.to_string())
}

/// The command-line form of [`TrainConfig`]; every flag also reads `P2PML_<NAME>`.
#[derive(Args, Clone, Debug)]
pub struct TrainArgs {
    /// Model: cnn, vgg11, squeezenet1_1, mobilenet_v2, densenet121, resnet18.
    #[arg(long, env = "P2PML_MODEL", default_value = "cnn", value_parser = parse_model)]
    pub model: ModelKind,
    /// Data set: mnist, fashion-mnist, cifar10.
    #[arg(long, env = "P2PML_DATASET", default_value = "fashion-mnist", value_parser = parse_dataset)]
    pub dataset: DatasetKind,
    /// Directory with the data set's files [default: /usr/share/datasets/<dataset>].
    #[arg(long, env = "P2PML_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Preprocessing: mean-std, min-max, standardize.
    #[arg(long, env = "P2PML_NORMALIZATION", default_value = "mean-std", value_parser = parse_norm)]
    pub normalization: Normalization,
    #[arg(long, env = "P2PML_EPOCHS", default_value_t = 3)]
    pub epochs: u64,
    #[arg(long, env = "P2PML_BATCH_SIZE", default_value_t = 64)]
    pub batch_size: usize,
    /// Optimizer: sgd, adam.
    #[arg(long, env = "P2PML_OPTIMIZER", default_value = "sgd", value_parser = parse_opt)]
    pub optimizer: OptimizerKind,
    #[arg(long, env = "P2PML_LR", default_value_t = 0.01)]
    pub lr: f64,
    #[arg(long, env = "P2PML_MOMENTUM", default_value_t = 0.9)]
    pub momentum: f64,
    #[arg(long, env = "P2PML_WEIGHT_DECAY", default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, env = "P2PML_SEED", default_value_t = 1)]
    pub seed: u64,
    /// Training samples held out for validation.
    #[arg(long, env = "P2PML_VAL_SIZE", default_value_t = 5000)]
    pub val_size: usize,
    /// Use only the first N training samples (0: all).
    #[arg(long, env = "P2PML_LIMIT_TRAIN", default_value_t = 0)]
    pub limit_train: usize,
    /// Use only the first N test samples (0: all).
    #[arg(long, env = "P2PML_LIMIT_TEST", default_value_t = 0)]
    pub limit_test: usize,
    /// Device: cpu, cuda, auto (CUDA when present).
    #[arg(long, env = "P2PML_DEVICE", default_value = "auto", value_parser = parse_device)]
    pub device: DeviceChoice,
    /// libtorch threads for this process (0: one per core).
    #[arg(long, env = "P2PML_THREADS", default_value_t = 0)]
    pub threads: usize,
}

impl TrainArgs {
    pub fn to_config(&self) -> TrainConfig {
        let d = TrainConfig::default();
        TrainConfig {
            model: self.model,
            dataset: self.dataset,
            data_dir: self.data_dir.clone(),
            normalization: self.normalization,
            epochs: self.epochs,
            batch_size: self.batch_size,
            optimizer: OptimizerConfig {
                kind: self.optimizer,
                lr: self.lr,
                momentum: self.momentum,
                weight_decay: self.weight_decay,
                ..d.optimizer
            },
            seed: self.seed,
            val_size: self.val_size,
            limit_train: self.limit_train,
            limit_test: self.limit_test,
            device: self.device,
            threads: self.threads,
            ..d
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--batch-size must be at least 1")]
    BatchSize,
    #[error("--lr must be a positive number, got {0}")]
    Lr(String),
    #[error("--epochs must be at least 1")]
    Epochs,
}

impl TrainConfig {
    /// Loads the data set, cut to --limit-train and --limit-test.
    pub fn load_dataset(&self) -> Result<p2pml_lambda_grad::data::Dataset, p2pml_lambda_grad::data::DataError> {
        let mut ds = p2pml_lambda_grad::data::load(self.dataset, self.data_dir.as_deref())?;
        if self.limit_train > 0 {
            ds.train = ds.train.truncate(self.limit_train);
        }
        if self.limit_test > 0 {
            ds.test = ds.test.truncate(self.limit_test);
        }
        Ok(ds)
    }

    /// Checks what clap's types cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.batch_size == 0 {
            return Err(ConfigError::BatchSize);
        }
        if !(self.optimizer.lr > 0.0 && self.optimizer.lr.is_finite()) {
            return Err(ConfigError::Lr(self.optimizer.lr.to_string()));
        }
        if self.epochs == 0 {
            return Err(ConfigError::Epochs);
        }
        Ok(())
    }
}

/// What this process is in a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A peer of the decentralized run (no coordinator).
    #[default]
    P2p,
    /// The parameter server of the baseline: holds parameters and optimizer state.
    Ps,
    /// A worker of the parameter server (`--ps`).
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::P2p => "p2p",
            Role::Ps => "ps",
            Role::Worker => "worker",
        }
    }
}

fn parse_role(s: &str) -> Result<Role, String> {
    match s {
        "p2p" => Ok(Role::P2p),
        "ps" => Ok(Role::Ps),
        "worker" => Ok(Role::Worker),
        _ => Err(format!("unknown role '{s}': expected p2p, ps or worker")),
    }
}

/// How this peer takes part in a decentralized run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct P2pConfig {
    pub role: Role,
    /// Worker: the parameter server's multiaddr, ending in /p2p/<peer id>.
    pub ps: Option<String>,
    pub listen: Vec<String>,
    pub bootstrap: Vec<String>,
    /// Holds the peer key (and, later, checkpoints); keeps the peer id across restarts.
    pub state_dir: PathBuf,
    pub peers: usize,
    pub min_peers: usize,
    pub batches_per_round: usize,
    pub compression: String,
    pub sync: p2pml_proto::wire::SyncMode,
    pub failure_timeout_ms: u64,
    pub heartbeat_ms: u64,
    /// Where the JSON report goes (default: state_dir/report.json).
    pub report: Option<PathBuf>,
    pub lr_factor: f64,
    pub lr_patience: u64,
    pub min_lr: f64,
    pub early_stop_patience: u64,
    /// Fault injection for tests: corrupt one parameter after this round.
    pub perturb_round: Option<u64>,
    /// Fault injection for tests: publish invalid messages every round.
    pub garbage: bool,
    /// Where gradients are computed.
    pub exec: crate::exec::ExecConfig,
    /// Derive the peer key from this number (reproducible testnets only).
    pub identity_seed: Option<u64>,
    /// Checkpoint every this many rounds (0: never).
    pub checkpoint_every: u64,
    /// Checkpoints kept.
    pub checkpoint_keep: usize,
    /// A new run starts when --peers peers are live, or when --min-peers are and
    /// this long has passed since.
    pub start_grace_ms: u64,
    /// Fault injection: (round, ms) — hold that round's checkpoint write open.
    pub checkpoint_stall: Option<(u64, u64)>,
    /// Read control commands (block/unblock peers) from stdin: testnet's partitions.
    pub control_stdin: bool,
    /// Serve Prometheus metrics here (None: off).
    pub metrics_addr: Option<String>,
    /// How each round's gradients are combined (canonical spelling of
    /// [`p2pml_proto::Aggregation`]).
    pub aggregation: String,
    /// Fault injection: this peer attacks the run ([`p2pml_proto::Attack`]).
    pub byzantine: Option<String>,
    /// The private swarm's pre-shared key file (libp2p pnet); None: an open swarm.
    pub swarm_key: Option<PathBuf>,
    /// Fault injection: publish gossip unsigned, claiming to be the first
    /// --bootstrap peer (the forged-message test).
    pub forge: bool,
}

impl Default for P2pConfig {
    fn default() -> Self {
        P2pConfig {
            role: Role::P2p,
            ps: None,
            listen: vec!["/ip4/0.0.0.0/tcp/0".into()],
            bootstrap: vec![],
            state_dir: PathBuf::from("p2pml-state"),
            peers: 4,
            min_peers: 0,
            batches_per_round: 10,
            compression: "none".into(),
            sync: p2pml_proto::wire::SyncMode::Sync,
            failure_timeout_ms: 2000,
            heartbeat_ms: 250,
            report: None,
            lr_factor: 0.1,
            lr_patience: 5,
            min_lr: 1e-6,
            early_stop_patience: 10,
            perturb_round: None,
            garbage: false,
            exec: crate::exec::ExecConfig::default(),
            identity_seed: None,
            checkpoint_every: 1,
            checkpoint_keep: 3,
            start_grace_ms: 5000,
            checkpoint_stall: None,
            control_stdin: false,
            metrics_addr: Some("127.0.0.1:0".into()),
            aggregation: "mean".into(),
            byzantine: None,
            swarm_key: None,
            forge: false,
        }
    }
}

fn parse_stall(s: &str) -> Result<(u64, u64), String> {
    let err = || format!("expected ROUND:MS, got '{s}'");
    let (r, ms) = s.split_once(':').ok_or_else(err)?;
    Ok((r.parse().map_err(|_| err())?, ms.parse().map_err(|_| err())?))
}

fn parse_aggregation(s: &str) -> Result<String, String> {
    s.parse::<p2pml_proto::Aggregation>().map(|a| a.to_string()).map_err(|e| e.to_string())
}

fn parse_attack(s: &str) -> Result<String, String> {
    s.parse::<p2pml_proto::Attack>().map(|a| a.to_string()).map_err(|e| e.to_string())
}

fn parse_sync(s: &str) -> Result<String, String> {
    match s {
        "sync" | "async" => Ok(s.to_string()),
        _ => Err(format!("unknown sync mode '{s}': expected sync or async")),
    }
}

/// `none` or `qsgd:bits=4,bucket=512,norm=l2` (any subset of the keys), kept in
/// its canonical spelling so that peers compare equal configurations as equal.
fn parse_compression(s: &str) -> Result<String, String> {
    s.parse::<p2pml_proto::Compression>().map(|c| c.to_string()).map_err(|e| e.to_string())
}

/// The command-line form of [`P2pConfig`].
#[derive(Args, Clone, Debug)]
pub struct P2pArgs {
    /// p2p: a peer of the decentralized run; ps: the parameter server of the
    /// baseline (--peers is then the number of workers); worker: a worker of --ps.
    #[arg(long, env = "P2PML_ROLE", default_value = "p2p", value_parser = parse_role)]
    pub role: Role,
    /// With --role worker: the parameter server's multiaddr, ending in /p2p/<peer id>
    /// (the server prints it at start).
    #[arg(long, env = "P2PML_PS")]
    pub ps: Option<String>,
    /// Multiaddr to listen on (repeatable).
    #[arg(long, env = "P2PML_LISTEN", default_value = "/ip4/0.0.0.0/tcp/0", value_delimiter = ',')]
    pub listen: Vec<String>,
    /// Multiaddr of any peer of the run, ending in /p2p/<peer id> (repeatable).
    #[arg(long, env = "P2PML_BOOTSTRAP", value_delimiter = ',')]
    pub bootstrap: Vec<String>,
    /// The node's own directory: its peer key (so a restart keeps the id) and report.
    #[arg(long, env = "P2PML_STATE_DIR", default_value = "p2pml-state")]
    pub state_dir: PathBuf,
    /// Peers the run expects (the data is cut into this many shards).
    #[arg(long, env = "P2PML_PEERS", default_value_t = 4)]
    pub peers: usize,
    /// Quorum: below this many live peers the run waits (so the minority side of a
    /// partition never trains on its own) [default: a majority of --peers].
    #[arg(long, env = "P2PML_MIN_PEERS")]
    pub min_peers: Option<usize>,
    /// Batches each peer computes per round (one exchange per round).
    #[arg(long, env = "P2PML_BATCHES_PER_ROUND", default_value_t = 10)]
    pub batches_per_round: usize,
    /// Gradient compression on the wire: none, or qsgd:bits=1..8,bucket=N,norm=l2|max.
    #[arg(long, env = "P2PML_COMPRESSION", default_value = "none", value_parser = parse_compression)]
    pub compression: String,
    /// sync: barrier every round; async: no barrier, bounded staleness.
    #[arg(long, env = "P2PML_SYNC", default_value = "sync", value_parser = parse_sync)]
    pub sync: String,
    /// Async mode: apply gradients at most this many rounds old.
    #[arg(long, env = "P2PML_MAX_STALENESS", default_value_t = 2)]
    pub max_staleness: u64,
    /// A peer silent this long is declared dead and dropped from the round (a
    /// closed connection makes it suspected, and dead after a quarter of this).
    #[arg(long, env = "P2PML_FAILURE_TIMEOUT_MS", default_value_t = 2000)]
    pub failure_timeout_ms: u64,
    /// Write the JSON report here [default: <state-dir>/report.json].
    #[arg(long, env = "P2PML_REPORT")]
    pub report: Option<PathBuf>,
    /// Fault injection: silently corrupt one parameter after this round (tests the digest check).
    #[arg(long, hide = true)]
    pub fault_perturb_round: Option<u64>,
    /// Fault injection: run as a rogue that never trains and publishes malformed, wrong-length,
    /// far-ahead and foreign messages every heartbeat (tests validation and peer scoring).
    #[arg(long, hide = true)]
    pub fault_garbage: bool,
    /// Derive the peer key from this number instead of the key in --state-dir, so
    /// that a testnet run is reproducible (shards, dropout masks and aggregation
    /// order follow the peer ids). Anyone can derive such a key: never on real machines.
    #[arg(long)]
    pub identity_seed: Option<u64>,
    /// Checkpoint (parameters, optimizer, schedule, membership) to sled in --state-dir
    /// every this many rounds; 0 turns checkpoints off. A restarted node resumes from
    /// its newest valid checkpoint.
    #[arg(long, env = "P2PML_CHECKPOINT_EVERY", default_value_t = 1)]
    pub checkpoint_every: u64,
    /// How many checkpoints to keep.
    #[arg(long, env = "P2PML_CHECKPOINT_KEEP", default_value_t = 3)]
    pub checkpoint_keep: usize,
    /// A new run starts once --peers peers are live, or once --min-peers are and this
    /// long has passed (later peers join by state sync).
    #[arg(long, env = "P2PML_START_GRACE_MS", default_value_t = 5000)]
    pub start_grace_ms: u64,
    /// Fault injection: hold round ROUND's checkpoint write open for MS ms (the crash test).
    #[arg(long, hide = true, value_parser = parse_stall)]
    pub fault_checkpoint_stall: Option<(u64, u64)>,
    /// Read control commands from stdin ("block <peer id>...", "unblock"): testnet's partitions.
    #[arg(long, hide = true)]
    pub control_stdin: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (port 0: any free port; the
    /// node prints where). Loopback by default; `none` turns it off.
    #[arg(long, env = "P2PML_METRICS_ADDR", default_value = "127.0.0.1:0")]
    pub metrics_addr: String,
    /// How each round's gradients are combined: mean (sample-weighted), median
    /// (coordinate-wise), trimmed-mean:BETA (drop the BETA fraction of largest and
    /// smallest values per coordinate, 0 <= BETA < 0.5) or krum:F (the gradient
    /// closest to its n-F-2 nearest others; tolerates F byzantine peers when n >= 2F+3).
    #[arg(long, env = "P2PML_AGGREGATION", default_value = "mean", value_parser = parse_aggregation)]
    pub aggregation: String,
    /// Private swarm: the libp2p pre-shared key file (`p2pml-node swarm-key` writes
    /// one). Every peer of the run needs the same file; peers without it cannot connect.
    #[arg(long, env = "P2PML_SWARM_KEY")]
    pub swarm_key: Option<PathBuf>,
    /// Fault injection: attack the run by sending sign-flip:K (-K times the gradient),
    /// gaussian:SIGMA (noise instead of the gradient), constant:C or nan payloads.
    #[arg(long, value_parser = parse_attack)]
    pub byzantine: Option<String>,
    /// Fault injection (with --fault-garbage): publish gossip unsigned, claiming to be
    /// the first --bootstrap peer (tests that forged messages are refused).
    #[arg(long, hide = true)]
    pub fault_forge: bool,
    #[command(flatten)]
    pub exec: crate::exec::ExecArgs,
}

impl P2pArgs {
    pub fn to_config(&self) -> P2pConfig {
        let d = P2pConfig::default();
        P2pConfig {
            role: self.role,
            ps: self.ps.clone(),
            listen: self.listen.clone(),
            bootstrap: self.bootstrap.clone(),
            state_dir: self.state_dir.clone(),
            peers: self.peers,
            min_peers: self.min_peers.unwrap_or(self.peers / 2 + 1),
            batches_per_round: self.batches_per_round,
            compression: self.compression.clone(),
            sync: if self.sync == "async" {
                p2pml_proto::wire::SyncMode::Async { max_staleness: self.max_staleness }
            } else {
                p2pml_proto::wire::SyncMode::Sync
            },
            failure_timeout_ms: self.failure_timeout_ms,
            report: self.report.clone(),
            perturb_round: self.fault_perturb_round,
            garbage: self.fault_garbage,
            exec: self.exec.to_config(),
            identity_seed: self.identity_seed,
            checkpoint_every: self.checkpoint_every,
            checkpoint_keep: self.checkpoint_keep,
            start_grace_ms: self.start_grace_ms,
            checkpoint_stall: self.fault_checkpoint_stall,
            control_stdin: self.control_stdin,
            metrics_addr: (self.metrics_addr != "none").then(|| self.metrics_addr.clone()),
            aggregation: self.aggregation.clone(),
            byzantine: self.byzantine.clone(),
            swarm_key: self.swarm_key.clone(),
            forge: self.fault_forge,
            ..d
        }
    }
}

/// The part of the configuration every peer of a run must share.
pub fn run_spec(t: &TrainConfig, p: &P2pConfig) -> p2pml_proto::wire::RunSpec {
    p2pml_proto::wire::RunSpec {
        model: t.model,
        dataset: t.dataset,
        normalization: t.normalization,
        seed: t.seed,
        peers: p.peers,
        min_peers: p.min_peers,
        batch_size: t.batch_size,
        batches_per_round: p.batches_per_round,
        epochs: t.epochs,
        optimizer: t.optimizer.kind,
        lr: t.optimizer.lr,
        momentum: t.optimizer.momentum,
        weight_decay: t.optimizer.weight_decay,
        val_size: t.val_size,
        limit_train: t.limit_train,
        limit_test: t.limit_test,
        compression: p.compression.clone(),
        sync: p.sync,
        failure_timeout_ms: p.failure_timeout_ms,
        aggregation: p.aggregation.clone(),
    }
}

impl P2pConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.peers == 0 {
            return Err("--peers must be at least 1".into());
        }
        if self.min_peers == 0 || self.min_peers > self.peers {
            return Err(format!("--min-peers must be between 1 and --peers ({})", self.peers));
        }
        match (self.role, &self.ps) {
            (Role::Worker, None) => return Err("--role worker needs --ps <multiaddr of the parameter server, ending in /p2p/<peer id>>".into()),
            (Role::P2p | Role::Ps, Some(_)) => return Err("--ps is for --role worker only".into()),
            _ => {}
        }
        if self.checkpoint_keep == 0 {
            return Err("--checkpoint-keep must be at least 1".into());
        }
        if self.batches_per_round == 0 {
            return Err("--batches-per-round must be at least 1".into());
        }
        self.exec.validate()?;
        if let Ok(p2pml_proto::Aggregation::Krum { f }) = self.aggregation.parse() {
            if self.peers < 2 * f + 3 {
                return Err(format!(
                    "--aggregation krum:{f} needs --peers of at least {} (2F+3); lower F or use median or trimmed-mean",
                    2 * f + 3
                ));
            }
        }
        if self.forge && !self.garbage {
            return Err("--fault-forge needs --fault-garbage".into());
        }
        if self.forge && self.bootstrap.is_empty() {
            return Err("--fault-forge needs --bootstrap (it claims to be that peer)".into());
        }
        if self.failure_timeout_ms < 2 * self.heartbeat_ms {
            return Err(format!("--failure-timeout-ms must be at least {} (two heartbeats)", 2 * self.heartbeat_ms));
        }
        Ok(())
    }
}
