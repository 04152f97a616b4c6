//! Configuration: one serde struct with defaults, filled once from clap in `main`.

use clap::Args;
use p2pml_lambda_grad::{DeviceChoice, OptimizerConfig};
use p2pml_proto::{Aggregation, Attack, Compression, Exchange, DatasetKind, ModelKind, Normalization, OptimizerKind};
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
    #[error("--momentum must be a number in [0, 1), got {0}")]
    Momentum(String),
    #[error("--weight-decay must be a finite number >= 0, got {0}")]
    WeightDecay(String),
    /// Adam's betas and epsilon (not flags today, but part of the configuration).
    #[error("the optimizer's {0} must be {1}, got {2}")]
    Optimizer(&'static str, &'static str, String),
    #[error("--threads {got} is more than {max} ({} per core on this machine's {cores} cores); use 0 (one per core) or at most {cores}", MAX_THREADS_PER_CORE)]
    Threads { got: usize, max: usize, cores: usize },
    #[error("--eval-batch-size must be at least 1")]
    EvalBatchSize,
}

/// `--threads` above this many per available core is refused: libtorch would
/// spend its time switching threads (and far above it, runs out of stack).
pub const MAX_THREADS_PER_CORE: usize = 4;

/// The cores this process may run on (1 if unknown).
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
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
        if self.eval_batch_size == 0 {
            return Err(ConfigError::EvalBatchSize);
        }
        let o = &self.optimizer;
        // `!(a <= x)` style comparisons are false for NaN, so NaN is refused too.
        if !(o.momentum >= 0.0 && o.momentum < 1.0) {
            return Err(ConfigError::Momentum(o.momentum.to_string()));
        }
        if !(o.weight_decay >= 0.0 && o.weight_decay.is_finite()) {
            return Err(ConfigError::WeightDecay(o.weight_decay.to_string()));
        }
        if !(o.beta1 >= 0.0 && o.beta1 < 1.0) {
            return Err(ConfigError::Optimizer("beta1", "in [0, 1)", o.beta1.to_string()));
        }
        if !(o.beta2 >= 0.0 && o.beta2 < 1.0) {
            return Err(ConfigError::Optimizer("beta2", "in [0, 1)", o.beta2.to_string()));
        }
        if !(o.eps > 0.0 && o.eps.is_finite()) {
            return Err(ConfigError::Optimizer("eps", "a positive number", o.eps.to_string()));
        }
        let cores = available_cores();
        let max = MAX_THREADS_PER_CORE * cores;
        if self.threads > max {
            return Err(ConfigError::Threads { got: self.threads, max, cores });
        }
        if self.threads > cores {
            tracing::warn!(
                "--threads {} is more than this machine's {cores} cores: libtorch's threads will compete for them and training slows down",
                self.threads
            );
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
    /// The gradients' encoding on the wire.
    #[serde(with = "text")]
    pub compression: Compression,
    pub sync: p2pml_proto::wire::SyncMode,
    pub failure_timeout_ms: u64,
    pub heartbeat_ms: u64,
    /// Where the JSON report goes (default: state_dir/report.json).
    pub report: Option<PathBuf>,
    pub lr_factor: f64,
    pub lr_patience: u64,
    pub min_lr: f64,
    pub early_stop_patience: u64,
    /// Fault injection, for tests and experiments only.
    pub faults: Faults,
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
    /// Read control commands (block/unblock peers) from stdin: testnet's partitions.
    pub control_stdin: bool,
    /// Serve Prometheus metrics here (None: off).
    pub metrics_addr: Option<String>,
    /// How each round's gradients are combined.
    #[serde(with = "text")]
    pub aggregation: Aggregation,
    /// How each round's gradients travel: all-to-all or sharded.
    #[serde(with = "text")]
    pub exchange: Exchange,
    /// The private swarm's pre-shared key file (libp2p pnet); None: an open swarm.
    pub swarm_key: Option<PathBuf>,
    /// An emulated uplink for this node's sends (--link); None: the real network as it is.
    #[serde(default)]
    pub link: Option<crate::link::LinkSpec>,
    /// Move earlier checkpoints in --state-dir aside (into old-<unix>/) and start afresh.
    pub fresh: bool,
    /// The straggler deadline and the demotion of members that keep missing rounds.
    pub straggler: Straggler,
}

/// Fault injection: what a node does wrong on purpose, for the tests and the
/// experiments (every flag is `--fault-*`, or `--byzantine`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Corrupt one parameter after this round.
    pub perturb_round: Option<u64>,
    /// Publish invalid messages every round (a rogue that never trains).
    pub garbage: bool,
    /// (round, ms): hold that round's checkpoint write open.
    pub checkpoint_stall: Option<(u64, u64)>,
    /// Publish gossip unsigned, claiming to be the first --bootstrap peer (the
    /// forged-message test).
    pub forge: bool,
    /// An outsider that never sends or answers a Hello but publishes validly
    /// signed heartbeats (ready) on the control topic.
    pub heartbeat_only: bool,
    /// This peer attacks the run.
    #[serde(with = "opt_text")]
    pub byzantine: Option<Attack>,
}

/// Serde as the canonical spelling (`Display` / `FromStr`).
mod text {
    use serde::{Deserialize, Deserializer, Serializer};
    pub(super) fn serialize<T: std::fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }
    pub(super) fn deserialize<'de, T: std::str::FromStr, D: Deserializer<'de>>(d: D) -> Result<T, D::Error>
    where
        T::Err: std::fmt::Display,
    {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

mod opt_text {
    use serde::{Deserialize, Deserializer, Serializer};
    pub(super) fn serialize<T: std::fmt::Display, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }
    pub(super) fn deserialize<'de, T: std::str::FromStr, D: Deserializer<'de>>(d: D) -> Result<Option<T>, D::Error>
    where
        T::Err: std::fmt::Display,
    {
        Option::<String>::deserialize(d)?.map(|x| x.parse().map_err(serde::de::Error::custom)).transpose()
    }
}

/// How long a round waits for missing members once a quorum of its gradients is
/// held: `factor` × the median recent full round, clamped to `[floor_ms, cap_ms]`;
/// a member missing `demote_after` such rounds in a row is demoted until the next epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Straggler {
    pub factor: f64,
    pub floor_ms: u64,
    pub cap_ms: u64,
    pub demote_after: u32,
}

impl Default for Straggler {
    fn default() -> Self {
        Straggler { factor: 4.0, floor_ms: 3000, cap_ms: 30_000, demote_after: 3 }
    }
}

impl std::fmt::Display for Straggler {
    /// The canonical spelling in the run spec.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "factor={},floor_ms={},cap_ms={},demote_after={}", self.factor, self.floor_ms, self.cap_ms, self.demote_after)
    }
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
            compression: DEFAULT_COMPRESSION.parse().expect("the default compression parses"),
            sync: p2pml_proto::wire::SyncMode::Sync,
            failure_timeout_ms: 2000,
            heartbeat_ms: 250,
            report: None,
            lr_factor: 0.1,
            lr_patience: 5,
            min_lr: 1e-6,
            early_stop_patience: 10,
            faults: Faults::default(),
            exec: crate::exec::ExecConfig::default(),
            identity_seed: None,
            checkpoint_every: 1,
            checkpoint_keep: 3,
            start_grace_ms: 5000,
            control_stdin: false,
            metrics_addr: Some("127.0.0.1:0".into()),
            aggregation: Aggregation::Mean,
            exchange: Exchange::AllToAll,
            link: None,
            swarm_key: None,
            fresh: false,
            straggler: Straggler::default(),
        }
    }
}

fn parse_stall(s: &str) -> Result<(u64, u64), String> {
    let err = || format!("expected ROUND:MS, got '{s}'");
    let (r, ms) = s.split_once(':').ok_or_else(err)?;
    Ok((r.parse().map_err(|_| err())?, ms.parse().map_err(|_| err())?))
}

fn parse_aggregation(s: &str) -> Result<Aggregation, String> {
    s.parse::<Aggregation>().map_err(|e| e.to_string())
}

fn parse_exchange(s: &str) -> Result<Exchange, String> {
    s.parse::<Exchange>()
}

fn parse_link(s: &str) -> Result<crate::link::LinkSpec, String> {
    s.parse()
}

fn parse_attack(s: &str) -> Result<Attack, String> {
    s.parse::<Attack>().map_err(|e| e.to_string())
}

fn parse_sync(s: &str) -> Result<String, String> {
    match s {
        "sync" | "async" => Ok(s.to_string()),
        _ => Err(format!("unknown sync mode '{s}': expected sync or async")),
    }
}

/// `none` or `qsgd:bits=4,bucket=512,norm=l2` (any subset of the keys), kept in
/// its canonical spelling so that peers compare equal configurations as equal.
/// The exchange's default encoding: QSGD, 4 bits per coordinate in buckets of 512
/// (about 14x smaller than f32; docs/benchmarks.md measures its accuracy).
pub const DEFAULT_COMPRESSION: &str = "qsgd:bits=4,bucket=512,norm=l2";

fn parse_compression(s: &str) -> Result<Compression, String> {
    s.parse::<Compression>().map_err(|e| e.to_string())
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
    /// Gradient compression on the wire: qsgd:bits=1..8,bucket=N,norm=l2|max (any
    /// subset of the keys), or none (plain f32).
    #[arg(long, env = "P2PML_COMPRESSION", default_value = DEFAULT_COMPRESSION, value_parser = parse_compression)]
    pub compression: Compression,
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
    pub aggregation: Aggregation,
    /// How each round's gradients travel: all-to-all (every peer fetches and
    /// decodes every gradient) or sharded (the gradient is cut into one shard per
    /// member; each shard's owner aggregates it, and every peer fetches the
    /// aggregated shards: about two gradients' worth of bytes per peer at any size).
    #[arg(long, env = "P2PML_EXCHANGE", default_value = "all-to-all", value_parser = parse_exchange)]
    pub exchange: Exchange,
    /// Emulate a WAN uplink for this node's traffic: bw=RATE,delay=TIME[,jitter=TIME]
    /// (e.g. bw=100mbit,delay=25ms): every connection's sends share a token bucket of
    /// that bandwidth and arrive the delay later. For tests and experiments; off by default.
    #[arg(long, env = "P2PML_LINK", value_parser = parse_link)]
    pub link: Option<crate::link::LinkSpec>,
    /// Private swarm: the libp2p pre-shared key file (`p2pml-node swarm-key` writes
    /// one). Every peer of the run needs the same file; peers without it cannot connect.
    #[arg(long, env = "P2PML_SWARM_KEY")]
    pub swarm_key: Option<PathBuf>,
    /// Fault injection: attack the run by sending sign-flip:K (-K times the gradient),
    /// gaussian:SIGMA (noise instead of the gradient), constant:C or nan payloads.
    #[arg(long, value_parser = parse_attack)]
    pub byzantine: Option<Attack>,
    /// Fault injection (with --fault-garbage): publish gossip unsigned, claiming to be
    /// the first --bootstrap peer (tests that forged messages are refused).
    #[arg(long, hide = true)]
    pub fault_forge: bool,
    /// Start afresh although --state-dir holds checkpoints of another configuration:
    /// they are moved into <state-dir>/old-<unix time>/ (never deleted).
    #[arg(long, env = "P2PML_FRESH")]
    pub fresh: bool,
    /// Fault injection: an outsider that never sends or answers a Hello and publishes
    /// validly signed heartbeats claiming to be ready (tests admission).
    #[arg(long, hide = true)]
    pub fault_heartbeat_only: bool,
    /// Straggler deadline: once a quorum of a round's gradients is held, wait for the
    /// missing members at most this many times the median recent round...
    #[arg(long, env = "P2PML_STRAGGLER_FACTOR", default_value_t = 4.0)]
    pub straggler_factor: f64,
    /// ...but at least this long (ms)...
    #[arg(long, env = "P2PML_STRAGGLER_FLOOR_MS", default_value_t = 3000)]
    pub straggler_floor_ms: u64,
    /// ...and at most this long (ms).
    #[arg(long, env = "P2PML_STRAGGLER_CAP_MS", default_value_t = 30_000)]
    pub straggler_cap_ms: u64,
    /// A member missing this many deadline-closed rounds in a row is demoted until the
    /// next epoch (it is not named for the next epoch: its shard is re-cut).
    #[arg(long, env = "P2PML_STRAGGLER_DEMOTE_AFTER", default_value_t = 3)]
    pub straggler_demote_after: u32,
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
            exec: self.exec.to_config(),
            identity_seed: self.identity_seed,
            checkpoint_every: self.checkpoint_every,
            checkpoint_keep: self.checkpoint_keep,
            start_grace_ms: self.start_grace_ms,
            control_stdin: self.control_stdin,
            metrics_addr: (self.metrics_addr != "none").then(|| self.metrics_addr.clone()),
            aggregation: self.aggregation,
            exchange: self.exchange,
            link: self.link,
            swarm_key: self.swarm_key.clone(),
            fresh: self.fresh,
            straggler: Straggler {
                factor: self.straggler_factor,
                floor_ms: self.straggler_floor_ms,
                cap_ms: self.straggler_cap_ms,
                demote_after: self.straggler_demote_after,
            },
            faults: Faults {
                perturb_round: self.fault_perturb_round,
                garbage: self.fault_garbage,
                checkpoint_stall: self.fault_checkpoint_stall,
                forge: self.fault_forge,
                heartbeat_only: self.fault_heartbeat_only,
                byzantine: self.byzantine,
            },
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
        compression: p.compression.to_string(),
        sync: p.sync,
        failure_timeout_ms: p.failure_timeout_ms,
        aggregation: p.aggregation.to_string(),
        straggler: p.straggler.to_string(),
        exchange: p.exchange,
    }
}

mod check;
pub use check::{Addresses, DialAddrError, P2pConfigError};

#[cfg(test)]
mod tests;
