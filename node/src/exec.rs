//! exec: where a peer's gradient work runs — on this machine, or in the function
//! tier (AWS Lambda, or the local host that speaks Lambda's protocols).
//!
//! A round's batches are cut into tasks of `--batches-per-invocation` batches.
//! Each task has its own dropout seed, derived from (run seed, round, peer,
//! task), and the local executor seeds the same way, so a task computes the
//! same gradient wherever it runs. The function tier reads the parameters and
//! the batches from the object store and writes its output there; the peer
//! invokes the round's tasks concurrently (at most `--max-concurrency` at a
//! time), retries failures with backoff (tasks are idempotent by output key),
//! starts a backup invocation for a straggler past a deadline derived from the
//! durations seen so far, and computes a task locally when the tier keeps
//! failing or cannot be reached. With more than one task and `--reduce`, one
//! more invocation sums the outputs in the tier, so the peer downloads one
//! gradient.

use clap::Args;
use p2pml_lambda_grad::data::Split;
use p2pml_lambda_grad::objstore::{ObjectStore, StoreConfig, StoreError};
use p2pml_proto::task::{self, BatchObject, Fault, GradOutput, GradTask, ReduceTask, Task, TaskResult};
use p2pml_proto::{DatasetKind, ModelKind, Normalization};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Which executor computes the gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecutorKind {
    Local,
    Lambda,
}

/// Prices for the cost table (USD). Defaults: AWS Lambda x86 in us-east-1 and
/// the paper's instances (t2.small for a peer that offloads, t2.large for one
/// that computes its gradients itself).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pricing {
    pub memory_mb: u64,
    pub gb_second: f64,
    pub per_request: f64,
    pub offload_instance_per_s: f64,
    pub local_instance_per_s: f64,
}

impl Default for Pricing {
    fn default() -> Self {
        Pricing {
            memory_mb: 1769,
            gb_second: 0.000_016_666_7,
            per_request: 0.000_000_2,
            offload_instance_per_s: 0.000_006_39,
            local_instance_per_s: 0.000_025_78,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExecConfig {
    pub executor: ExecutorKind,
    /// Lambda endpoint (the local host's URL); None means AWS's regional endpoint.
    pub lambda_endpoint: Option<String>,
    pub function_name: String,
    pub region: String,
    pub max_concurrency: usize,
    pub batches_per_invocation: usize,
    pub reduce: bool,
    pub task_timeout_ms: u64,
    pub retries: u32,
    pub backoff_ms: u64,
    /// A task running longer than this multiple of the median duration seen so
    /// far (and at least `backup_min_ms`) gets a backup invocation.
    pub backup_after: f64,
    pub backup_min_ms: u64,
    pub store: StoreConfig,
    pub pricing: Pricing,
    /// Test fault injection: (round, fault) for task 0 of that round, every attempt.
    pub faults: Vec<(u64, Fault)>,
}

impl Default for ExecConfig {
    fn default() -> Self {
        ExecConfig {
            executor: ExecutorKind::Local,
            lambda_endpoint: None,
            function_name: "p2pml-grad".into(),
            region: "us-east-1".into(),
            max_concurrency: 4,
            batches_per_invocation: 1,
            reduce: true,
            task_timeout_ms: 60_000,
            retries: 2,
            backoff_ms: 100,
            backup_after: 3.0,
            backup_min_ms: 2_000,
            store: StoreConfig {
                endpoint: None,
                bucket: "p2pml".into(),
                region: "us-east-1".into(),
                path_style: false,
            },
            pricing: Pricing::default(),
            faults: Vec::new(),
        }
    }
}

fn parse_executor(s: &str) -> Result<ExecutorKind, String> {
    match s {
        "local" => Ok(ExecutorKind::Local),
        "lambda" => Ok(ExecutorKind::Lambda),
        _ => Err(format!("unknown executor '{s}': expected local or lambda")),
    }
}

fn parse_fault(s: &str) -> Result<(u64, Fault), String> {
    let bad = || format!("--fault-task {s}: expected panic@ROUND, error@ROUND or sleep:MS@ROUND");
    let (kind, round) = s.split_once('@').ok_or_else(bad)?;
    let round: u64 = round.parse().map_err(|_| bad())?;
    let fault = match kind {
        "panic" => Fault::Panic,
        "error" => Fault::Error,
        k => match k.strip_prefix("sleep:").and_then(|ms| ms.parse().ok()) {
            Some(ms) => Fault::SleepMs(ms),
            None => return Err(bad()),
        },
    };
    Ok((round, fault))
}

/// The command-line form of [`ExecConfig`].
#[derive(Args, Clone, Debug)]
pub struct ExecArgs {
    /// Where gradients are computed: local (this process) or lambda (the function tier).
    #[arg(long, env = "P2PML_EXECUTOR", default_value = "local", value_parser = parse_executor)]
    pub executor: ExecutorKind,
    /// Lambda Invoke endpoint, e.g. the local host's http://127.0.0.1:PORT [default: AWS's regional endpoint].
    #[arg(long, env = "P2PML_LAMBDA_ENDPOINT")]
    pub lambda_endpoint: Option<String>,
    /// Name of the gradient function.
    #[arg(long, env = "P2PML_FUNCTION_NAME", default_value = "p2pml-grad")]
    pub function_name: String,
    /// Invocations in flight at once, per peer.
    #[arg(long, env = "P2PML_MAX_CONCURRENCY", default_value_t = 4)]
    pub max_concurrency: usize,
    /// Batches per function task.
    #[arg(long, env = "P2PML_BATCHES_PER_INVOCATION", default_value_t = 1)]
    pub batches_per_invocation: usize,
    /// Download every task's gradient instead of one reduced in the function tier.
    #[arg(long, env = "P2PML_NO_REDUCE")]
    pub no_reduce: bool,
    /// An invocation that takes longer than this has failed.
    #[arg(long, env = "P2PML_TASK_TIMEOUT_MS", default_value_t = 60_000)]
    pub task_timeout_ms: u64,
    /// Retries of a failed task before it is computed locally.
    #[arg(long, env = "P2PML_TASK_RETRIES", default_value_t = 2)]
    pub task_retries: u32,
    /// Function memory (MB) for the cost table: AWS bills GB-seconds at this size.
    #[arg(long, env = "P2PML_LAMBDA_MEMORY_MB", default_value_t = 1769)]
    pub lambda_memory_mb: u64,
    /// Price of a Lambda GB-second (USD).
    #[arg(long, env = "P2PML_PRICE_GB_SECOND", default_value_t = 0.000_016_666_7)]
    pub price_gb_second: f64,
    /// Price of one Lambda request (USD).
    #[arg(long, env = "P2PML_PRICE_REQUEST", default_value_t = 0.000_000_2)]
    pub price_request: f64,
    /// Instance price per second of a peer that offloads (USD; paper: t2.small).
    #[arg(long, env = "P2PML_PRICE_OFFLOAD_INSTANCE_S", default_value_t = 0.000_006_39)]
    pub price_offload_instance_s: f64,
    /// Instance price per second of a peer that computes locally (USD; paper: t2.large).
    #[arg(long, env = "P2PML_PRICE_LOCAL_INSTANCE_S", default_value_t = 0.000_025_78)]
    pub price_local_instance_s: f64,
    /// Object store endpoint (the local S3 server's URL) [default: AWS S3].
    #[arg(long, env = "P2PML_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// Object store bucket.
    #[arg(long, env = "P2PML_S3_BUCKET", default_value = "p2pml")]
    pub s3_bucket: String,
    /// AWS region of the function and the bucket.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    pub region: String,
    /// Test fault injection: task 0 of ROUND fails on every attempt (panic@R, error@R, sleep:MS@R).
    #[arg(long, hide = true, value_parser = parse_fault)]
    pub fault_task: Vec<(u64, Fault)>,
}

impl ExecArgs {
    pub fn to_config(&self) -> ExecConfig {
        let d = ExecConfig::default();
        ExecConfig {
            executor: self.executor,
            lambda_endpoint: self.lambda_endpoint.clone(),
            function_name: self.function_name.clone(),
            region: self.region.clone(),
            max_concurrency: self.max_concurrency,
            batches_per_invocation: self.batches_per_invocation,
            reduce: !self.no_reduce,
            task_timeout_ms: self.task_timeout_ms,
            retries: self.task_retries,
            store: StoreConfig {
                endpoint: self.s3_endpoint.clone(),
                bucket: self.s3_bucket.clone(),
                region: self.region.clone(),
                path_style: self.s3_endpoint.is_some(),
            },
            pricing: Pricing {
                memory_mb: self.lambda_memory_mb,
                gb_second: self.price_gb_second,
                per_request: self.price_request,
                offload_instance_per_s: self.price_offload_instance_s,
                local_instance_per_s: self.price_local_instance_s,
            },
            faults: self.fault_task.clone(),
            ..d
        }
    }
}

impl ExecConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_concurrency == 0 {
            return Err("--max-concurrency must be at least 1".into());
        }
        if self.batches_per_invocation == 0 {
            return Err("--batches-per-invocation must be at least 1".into());
        }
        if self.task_timeout_ms < 100 {
            return Err("--task-timeout-ms must be at least 100".into());
        }
        Ok(())
    }
}

/// One function task of a round: which of the round's batches, and its dropout seed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskPlan {
    pub index: usize,
    /// Positions in the round's batch list.
    pub batches: std::ops::Range<usize>,
    pub dropout_seed: u64,
}

/// Cuts a round of `n_batches` batches into tasks of at most `per_task`.
pub fn plan_round(n_batches: usize, per_task: usize, run_seed: u64, round: u64, peer: &[u8]) -> Vec<TaskPlan> {
    (0..n_batches.div_ceil(per_task.max(1)))
        .map(|i| {
            let lo = i * per_task;
            let mut h = blake3::Hasher::new();
            h.update(b"p2pml dropout");
            h.update(&run_seed.to_le_bytes());
            h.update(&round.to_le_bytes());
            h.update(peer);
            h.update(&(i as u64).to_le_bytes());
            let seed = u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"));
            // tch seeds are i64: keep it positive.
            TaskPlan { index: i, batches: lo..(lo + per_task).min(n_batches), dropout_seed: seed >> 1 }
        })
        .collect()
}

/// Counters of the function tier, for one peer.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ExecStats {
    pub invocations: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub retries: u64,
    pub backups: u64,
    pub backup_wins: u64,
    /// Tasks computed locally after the tier failed them or was unreachable.
    pub fallbacks: u64,
    /// Invocations that found the parameters in the function's warm cache.
    pub params_cache_hits: u64,
    pub reduces: u64,
    pub params_uploads: u64,
    pub params_upload_skips: u64,
    pub batches_uploaded: u64,
    pub data_upload_seconds: f64,
    /// Sum over successful invocations of the function-side stages, and of the
    /// peer-side round trip minus the function's own time (invoke overhead).
    pub fn_fetch_ms: f64,
    pub fn_decode_ms: f64,
    pub fn_compute_ms: f64,
    pub fn_encode_ms: f64,
    pub fn_write_ms: f64,
    pub invoke_overhead_ms: f64,
    pub peer_upload_ms: f64,
    pub peer_download_ms: f64,
    pub peer_decode_ms: f64,
    /// Billed milliseconds (each invocation's duration rounded up to 1 ms).
    pub billed_ms: u64,
    pub grad_tasks_ok: u64,
    /// Invocations that started a new function environment.
    pub cold_starts: u64,
}

/// The cost of one peer's run, measured and by the paper's formula.
#[derive(Clone, Debug, Serialize)]
pub struct CostRow {
    pub executor: ExecutorKind,
    pub wall_seconds: f64,
    pub requests: u64,
    pub gb_seconds: f64,
    pub lambda_usd: f64,
    pub instance_usd: f64,
    pub total_usd: f64,
    /// DESIGN.md: (Lambda cost/s × batches + instance cost/s) × time, with the
    /// Lambda cost per second at the configured memory; for the local executor,
    /// instance cost/s × time.
    pub paper_formula_usd: f64,
}

pub fn cost(cfg: &ExecConfig, stats: &ExecStats, wall_seconds: f64, batches_per_round: usize) -> CostRow {
    let p = &cfg.pricing;
    let gb = p.memory_mb as f64 / 1024.0;
    match cfg.executor {
        ExecutorKind::Local => {
            let instance = p.local_instance_per_s * wall_seconds;
            CostRow {
                executor: cfg.executor,
                wall_seconds,
                requests: 0,
                gb_seconds: 0.0,
                lambda_usd: 0.0,
                instance_usd: instance,
                total_usd: instance,
                paper_formula_usd: instance,
            }
        }
        ExecutorKind::Lambda => {
            let gb_seconds = stats.billed_ms as f64 / 1000.0 * gb;
            let requests = stats.invocations;
            let lambda = gb_seconds * p.gb_second + requests as f64 * p.per_request;
            let instance = p.offload_instance_per_s * wall_seconds;
            let lambda_per_s = gb * p.gb_second;
            let parallel = batches_per_round.div_ceil(cfg.batches_per_invocation.max(1)) as f64;
            CostRow {
                executor: cfg.executor,
                wall_seconds,
                requests,
                gb_seconds,
                lambda_usd: lambda,
                instance_usd: instance,
                total_usd: lambda + instance,
                paper_formula_usd: (lambda_per_s * parallel + p.offload_instance_per_s) * wall_seconds,
            }
        }
    }
}

/// A failure of the function tier for one task.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("function tier unreachable: {0}")]
    Unreachable(String),
    #[error("function error ({kind}): {message}")]
    Function { kind: String, message: String },
    #[error("invocation timed out after {0} ms")]
    Timeout(u64),
    #[error("bad function result: {0}")]
    BadResult(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("gradient output: {0}")]
    Output(#[from] task::ObjectError),
}

/// What one round asked of the function tier.
pub struct RoundWork<'a> {
    pub run: &'a str,
    pub peer: &'a str,
    pub round: u64,
    pub epoch: u64,
    pub model: ModelKind,
    pub dataset: DatasetKind,
    pub normalization: Normalization,
    pub seed: u64,
    pub numel: usize,
    pub params_digest: &'a str,
    /// Epoch-local indices of this round's batches (their object keys).
    pub batch_ids: &'a [usize],
    pub tasks: &'a [TaskPlan],
}

/// The round's outputs: gradients in task order, and the tasks left for local computation.
pub struct RoundOutput {
    /// (first task index covered, output) in task order; one entry when reduced.
    pub outputs: Vec<(usize, GradOutput)>,
    pub failed: Vec<usize>,
}

/// The function-tier executor of one peer.
pub struct LambdaExecutor {
    cfg: ExecConfig,
    lambda: aws_sdk_lambda::Client,
    store: ObjectStore,
    params_present: HashSet<String>,
    uploaded_epochs: HashSet<u64>,
    durations_ms: Vec<f64>,
    /// Round trips of gradient invocations since the metrics last took them.
    pub recent_ms: Vec<f64>,
    pub stats: ExecStats,
    /// Rounds in which the tier could not be reached at all.
    unreachable_since: Option<Instant>,
}

impl LambdaExecutor {
    pub async fn new(cfg: &ExecConfig) -> anyhow::Result<Self> {
        let store = ObjectStore::new(&cfg.store)?;
        store.ensure_bucket().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let lambda = lambda_client(cfg.lambda_endpoint.as_deref(), &cfg.region, Duration::from_millis(cfg.task_timeout_ms))?;
        Ok(LambdaExecutor {
            cfg: cfg.clone(),
            lambda,
            store,
            params_present: HashSet::new(),
            uploaded_epochs: HashSet::new(),
            durations_ms: Vec::new(),
            recent_ms: Vec::new(),
            stats: ExecStats::default(),
            unreachable_since: None,
        })
    }

    /// Uploads this peer's batches of `epoch` (once per epoch), `in_flight` at a time.
    pub async fn upload_epoch(&mut self, run: &str, peer: &str, epoch: u64, train: &Split, batches: &[Vec<usize>]) -> Result<(), StoreError> {
        if !self.uploaded_epochs.insert(epoch) {
            return Ok(());
        }
        use futures::stream::{self, StreamExt, TryStreamExt};
        let t0 = Instant::now();
        let shape = train.shape;
        let jobs = batches.iter().enumerate().map(|(i, b)| {
            let s = train.select(b);
            let obj = BatchObject { shape: [shape[0] as u32, shape[1] as u32, shape[2] as u32], images: s.images, labels: s.labels };
            let key = task::batch_key(run, peer, epoch, i);
            let store = self.store.clone();
            async move { store.put(&key, task::encode_batch(&obj)).await }
        });
        stream::iter(jobs).buffer_unordered(16).try_collect::<Vec<()>>().await?;
        self.stats.batches_uploaded += batches.len() as u64;
        self.stats.data_upload_seconds += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// Makes sure the parameters with `digest` are in the store (skipped when they are).
    pub async fn ensure_params(&mut self, run: &str, digest: &str, params: &[f32]) -> Result<(), StoreError> {
        if self.params_present.contains(digest) {
            self.stats.params_upload_skips += 1;
            return Ok(());
        }
        let t0 = Instant::now();
        let key = task::params_key(run, digest);
        if self.store.exists(&key).await? {
            self.stats.params_upload_skips += 1;
        } else {
            let bytes = p2pml_proto::encode_f32(params).map_err(|e| StoreError::Service {
                op: "encode",
                key: key.clone(),
                message: e.to_string(),
            })?;
            self.store.put(&key, bytes).await?;
            self.stats.params_uploads += 1;
        }
        self.stats.peer_upload_ms += t0.elapsed().as_secs_f64() * 1e3;
        self.params_present.insert(digest.to_string());
        // Parameters of rounds long gone are not needed again.
        if self.params_present.len() > 64 {
            self.params_present.clear();
            self.params_present.insert(digest.to_string());
        }
        Ok(())
    }

    fn backup_deadline(&self) -> Duration {
        let mut d = self.durations_ms.clone();
        let median = if d.is_empty() {
            0.0
        } else {
            d.sort_by(f64::total_cmp);
            d[d.len() / 2]
        };
        Duration::from_millis(((median * self.cfg.backup_after) as u64).max(self.cfg.backup_min_ms))
    }

    /// Runs a round's tasks in the function tier.
    pub async fn run_round(&mut self, w: &RoundWork<'_>) -> RoundOutput {
        // After the tier was unreachable, compute locally for a while before trying again.
        if self.unreachable_since.is_some_and(|t| t.elapsed() < Duration::from_secs(10)) {
            self.stats.fallbacks += w.tasks.len() as u64;
            return RoundOutput { outputs: Vec::new(), failed: w.tasks.iter().map(|t| t.index).collect() };
        }
        let tasks: Vec<GradTask> = w
            .tasks
            .iter()
            .map(|t| GradTask {
                run: w.run.into(),
                peer: w.peer.into(),
                round: w.round,
                model: w.model,
                dataset: w.dataset,
                normalization: w.normalization,
                seed: w.seed,
                dropout_seed: t.dropout_seed,
                numel: w.numel,
                params_key: task::params_key(w.run, w.params_digest),
                params_digest: w.params_digest.into(),
                batch_keys: w.batch_ids[t.batches.clone()].iter().map(|&b| task::batch_key(w.run, w.peer, w.epoch, b)).collect(),
                output_key: task::output_key(w.run, w.peer, w.round, &format!("t{}", t.index)),
                bucket: Some(self.store.bucket().to_string()),
                fault: (t.index == 0).then(|| self.cfg.faults.iter().find(|(r, _)| *r == w.round).map(|(_, f)| *f)).flatten(),
            })
            .collect();
        let sem = Arc::new(tokio::sync::Semaphore::new(self.cfg.max_concurrency));
        let deadline = self.backup_deadline();
        let mut set = tokio::task::JoinSet::new();
        for (i, t) in tasks.iter().enumerate() {
            let inv = Invoker::new(self, sem.clone());
            let t = Task::Grad(t.clone());
            set.spawn(async move { (i, inv.run_with_retries(t, Some(deadline)).await) });
        }
        let mut ok: BTreeMap<usize, (TaskResult, Outcome)> = BTreeMap::new();
        let mut failed = Vec::new();
        while let Some(joined) = set.join_next().await {
            let Ok((i, (res, outcome))) = joined else { continue };
            self.absorb(&outcome, true);
            match res {
                Ok(r) => {
                    ok.insert(i, (r, outcome));
                }
                Err(e) => {
                    tracing::warn!("round {} task {i}: {e}; computing it locally", w.round);
                    if matches!(e, ExecError::Unreachable(_)) {
                        self.unreachable_since = Some(Instant::now());
                    }
                    failed.push(i);
                }
            }
        }
        self.stats.fallbacks += failed.len() as u64;
        let mut outputs = Vec::new();
        let keys: Vec<(usize, String)> = ok.iter().map(|(i, (r, _))| (*i, r.output_key.clone())).collect();
        if self.cfg.reduce && keys.len() > 1 {
            let red = Task::Reduce(ReduceTask {
                run: w.run.into(),
                peer: w.peer.into(),
                round: w.round,
                numel: w.numel,
                input_keys: keys.iter().map(|(_, k)| k.clone()).collect(),
                output_key: task::output_key(w.run, w.peer, w.round, "reduce"),
                bucket: Some(self.store.bucket().to_string()),
            });
            let inv = Invoker::new(self, sem.clone());
            let (res, outcome) = inv.run_with_retries(red, None).await;
            self.absorb(&outcome, false);
            self.stats.reduces += 1;
            match res {
                Ok(r) => match self.download(&r.output_key, w.numel).await {
                    Ok(o) => return RoundOutput { outputs: vec![(keys[0].0, o)], failed },
                    Err(e) => tracing::warn!("round {}: reduced output: {e}; downloading each task's", w.round),
                },
                Err(e) => tracing::warn!("round {}: reduce failed ({e}); downloading each task's output", w.round),
            }
        }
        for (i, key) in keys {
            match self.download(&key, w.numel).await {
                Ok(o) => outputs.push((i, o)),
                Err(e) => {
                    tracing::warn!("round {} task {i}: {e}; computing it locally", w.round);
                    self.stats.fallbacks += 1;
                    failed.push(i);
                }
            }
        }
        failed.sort_unstable();
        RoundOutput { outputs, failed }
    }

    async fn download(&mut self, key: &str, numel: usize) -> Result<GradOutput, ExecError> {
        let t0 = Instant::now();
        let bytes = self.store.get(key).await?;
        self.stats.peer_download_ms += t0.elapsed().as_secs_f64() * 1e3;
        let t0 = Instant::now();
        let o = task::decode_grad_output(&bytes, numel)?;
        self.stats.peer_decode_ms += t0.elapsed().as_secs_f64() * 1e3;
        Ok(o)
    }

    /// Adds a task's counters; `grad`: a gradient task, whose duration feeds the backup deadline.
    fn absorb(&mut self, o: &Outcome, grad: bool) {
        let s = &mut self.stats;
        s.invocations += o.invocations;
        s.errors += o.errors;
        s.timeouts += o.timeouts;
        s.retries += o.retries;
        s.backups += o.backups;
        s.backup_wins += o.backup_wins;
        s.billed_ms += o.billed_ms;
        if let Some((r, rtt_ms)) = &o.result {
            let own = r.fetch_ms + r.decode_ms + r.compute_ms + r.encode_ms + r.write_ms;
            s.fn_fetch_ms += r.fetch_ms;
            s.fn_decode_ms += r.decode_ms;
            s.fn_compute_ms += r.compute_ms;
            s.fn_encode_ms += r.encode_ms;
            s.fn_write_ms += r.write_ms;
            s.invoke_overhead_ms += (rtt_ms - own).max(0.0);
            s.params_cache_hits += u64::from(r.params_cached);
            s.cold_starts += u64::from(r.cold);
            if grad {
                s.grad_tasks_ok += 1;
                self.durations_ms.push(*rtt_ms);
                if self.recent_ms.len() < 4096 {
                    self.recent_ms.push(*rtt_ms);
                }
                if self.durations_ms.len() > 256 {
                    self.durations_ms.drain(..128);
                }
            }
        }
    }
}

/// What happened to one task across its attempts.
#[derive(Default)]
struct Outcome {
    invocations: u64,
    errors: u64,
    timeouts: u64,
    retries: u64,
    backups: u64,
    backup_wins: u64,
    billed_ms: u64,
    /// The winning result and its round-trip time in ms.
    result: Option<(TaskResult, f64)>,
}

/// What a spawned invocation needs, cloned out of the executor.
#[derive(Clone)]
struct Invoker {
    lambda: aws_sdk_lambda::Client,
    function: String,
    timeout: Duration,
    retries: u32,
    backoff: Duration,
    sem: Arc<tokio::sync::Semaphore>,
}

impl Invoker {
    fn new(e: &LambdaExecutor, sem: Arc<tokio::sync::Semaphore>) -> Self {
        Invoker {
            lambda: e.lambda.clone(),
            function: e.cfg.function_name.clone(),
            timeout: Duration::from_millis(e.cfg.task_timeout_ms),
            retries: e.cfg.retries,
            backoff: Duration::from_millis(e.cfg.backoff_ms),
            sem,
        }
    }

    /// Attempts with retries and exponential backoff; with `backup`, an attempt
    /// running past that deadline gets a second, concurrent invocation and the
    /// first answer wins (the task is idempotent by output key).
    async fn run_with_retries(&self, t: Task, backup: Option<Duration>) -> (Result<TaskResult, ExecError>, Outcome) {
        let mut o = Outcome::default();
        let payload = match serde_json::to_vec(&t) {
            Ok(p) => p,
            Err(e) => return (Err(ExecError::BadResult(format!("cannot encode the task: {e}"))), o),
        };
        let mut last = ExecError::BadResult("no attempt".into());
        for attempt in 0..=self.retries {
            if attempt > 0 {
                o.retries += 1;
                tokio::time::sleep(self.backoff * 2u32.pow(attempt - 1)).await;
            }
            let r = match backup {
                Some(d) => self.attempt_with_backup(&payload, d, &mut o).await,
                None => self.attempt(&payload, &mut o).await,
            };
            match r {
                Ok(res) => return (Ok(res), o),
                Err(ExecError::Unreachable(m)) => return (Err(ExecError::Unreachable(m)), o),
                Err(e) => {
                    o.errors += 1;
                    if matches!(e, ExecError::Timeout(_)) {
                        o.timeouts += 1;
                    }
                    last = e;
                }
            }
        }
        (Err(last), o)
    }

    async fn attempt_with_backup(&self, payload: &[u8], deadline: Duration, o: &mut Outcome) -> Result<TaskResult, ExecError> {
        let first = self.invoke(payload);
        tokio::pin!(first);
        tokio::select! {
            r = &mut first => return self.settle(r, o),
            _ = tokio::time::sleep(deadline) => {}
        }
        o.backups += 1;
        let second = self.invoke(payload);
        tokio::pin!(second);
        tokio::select! {
            r = &mut first => {
                let r = self.settle(r, o);
                if r.is_ok() { return r; }
                let r2 = second.await;
                let r2 = self.settle(r2, o);
                if r2.is_ok() { o.backup_wins += 1; }
                r2
            }
            r = &mut second => {
                let r = self.settle(r, o);
                if r.is_ok() { o.backup_wins += 1; return r; }
                let r1 = first.await;
                self.settle(r1, o)
            }
        }
    }

    async fn attempt(&self, payload: &[u8], o: &mut Outcome) -> Result<TaskResult, ExecError> {
        let r = self.invoke(payload).await;
        self.settle(r, o)
    }

    fn settle(&self, r: (Result<TaskResult, ExecError>, f64), o: &mut Outcome) -> Result<TaskResult, ExecError> {
        let (res, ms) = r;
        o.invocations += 1;
        o.billed_ms += ms.ceil() as u64;
        if let Ok(t) = &res {
            o.result = Some((t.clone(), ms));
        }
        res
    }

    /// One invocation: (result, round-trip ms).
    async fn invoke(&self, payload: &[u8]) -> (Result<TaskResult, ExecError>, f64) {
        let _permit = self.sem.acquire().await;
        let t0 = Instant::now();
        let call = self
            .lambda
            .invoke()
            .function_name(&self.function)
            .payload(aws_sdk_lambda::primitives::Blob::new(payload.to_vec()))
            .send();
        let r = match tokio::time::timeout(self.timeout + Duration::from_secs(1), call).await {
            Err(_) => Err(ExecError::Timeout(self.timeout.as_millis() as u64)),
            Ok(Err(e)) => Err(classify_sdk_error(e)),
            Ok(Ok(out)) => {
                let body = out.payload().map(|b| b.as_ref().to_vec()).unwrap_or_default();
                match out.function_error() {
                    Some(kind) => {
                        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                        let message = v["errorMessage"].as_str().unwrap_or("(no message)").to_string();
                        if message.contains("timed out") {
                            Err(ExecError::Timeout(self.timeout.as_millis() as u64))
                        } else {
                            let kind = v["errorType"].as_str().unwrap_or(kind).to_string();
                            Err(ExecError::Function { kind, message })
                        }
                    }
                    None => serde_json::from_slice::<TaskResult>(&body).map_err(|e| ExecError::BadResult(e.to_string())),
                }
            }
        };
        (r, t0.elapsed().as_secs_f64() * 1e3)
    }
}

fn classify_sdk_error<E: std::fmt::Debug, R: std::fmt::Debug>(e: aws_sdk_lambda::error::SdkError<E, R>) -> ExecError {
    use aws_sdk_lambda::error::SdkError;
    match &e {
        SdkError::DispatchFailure(d) if d.is_io() || d.is_timeout() => ExecError::Unreachable(format!("{e:?}")),
        SdkError::TimeoutError(_) => ExecError::Timeout(0),
        _ => ExecError::Function { kind: "InvokeError".into(), message: format!("{e:?}") },
    }
}

/// An aws-sdk-lambda client for `endpoint` (None: AWS), credentials from the
/// environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN).
/// The SDK does not retry: the executor retries tasks itself.
fn lambda_client(endpoint: Option<&str>, region: &str, timeout: Duration) -> anyhow::Result<aws_sdk_lambda::Client> {
    use aws_sdk_lambda::config::{retry::RetryConfig, timeout::TimeoutConfig, BehaviorVersion, Credentials, Region};
    use p2pml_lambda_grad::objstore::{credentials_from, sdk_http_client};
    let Some((key, secret, token)) = credentials_from(|k| std::env::var(k).ok()) else {
        anyhow::bail!(
            "--executor lambda needs credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
             (testnet sets them for its local function host)"
        );
    };
    let mut b = aws_sdk_lambda::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region.to_string()))
        .credentials_provider(Credentials::new(key, secret, token, None, "environment"))
        .http_client(sdk_http_client())
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(3))
                .operation_timeout(timeout + Duration::from_secs(1))
                .build(),
        );
    if let Some(e) = endpoint {
        b = b.endpoint_url(e);
    }
    Ok(aws_sdk_lambda::Client::from_conf(b.build()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_are_cut_into_tasks_with_distinct_stable_seeds() {
        let t = plan_round(5, 2, 7, 3, b"peer");
        assert_eq!(t.iter().map(|t| t.batches.clone()).collect::<Vec<_>>(), vec![0..2, 2..4, 4..5]);
        assert_eq!(t, plan_round(5, 2, 7, 3, b"peer"), "the same seeds every time");
        let seeds: HashSet<u64> = t.iter().map(|t| t.dropout_seed).collect();
        assert_eq!(seeds.len(), 3);
        assert!(t.iter().all(|t| (t.dropout_seed as i64) >= 0));
        assert_ne!(plan_round(5, 2, 7, 3, b"other")[0].dropout_seed, t[0].dropout_seed);
        assert_ne!(plan_round(5, 2, 7, 4, b"peer")[0].dropout_seed, t[0].dropout_seed);
        assert_eq!(plan_round(1, 4, 7, 3, b"peer").len(), 1);
    }

    #[test]
    fn fault_flags_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!(parse_fault("panic@3"), Ok((3, Fault::Panic)));
        assert_eq!(parse_fault("sleep:1500@2"), Ok((2, Fault::SleepMs(1500))));
        assert!(parse_fault("explode@1").unwrap_err().contains("expected panic@ROUND"));
        assert!(parse_executor("gpu").unwrap_err().contains("expected local or lambda"));
    }

    #[test]
    fn cost_bills_gb_seconds_and_requests_and_follows_the_paper_formula() {
        let mut cfg = ExecConfig { executor: ExecutorKind::Lambda, ..Default::default() };
        cfg.pricing.memory_mb = 1024;
        let stats = ExecStats { invocations: 10, billed_ms: 2000, ..Default::default() };
        let c = cost(&cfg, &stats, 100.0, 4);
        assert!((c.gb_seconds - 2.0).abs() < 1e-12);
        let lambda = 2.0 * cfg.pricing.gb_second + 10.0 * cfg.pricing.per_request;
        assert!((c.lambda_usd - lambda).abs() < 1e-15);
        assert!((c.instance_usd - 100.0 * cfg.pricing.offload_instance_per_s).abs() < 1e-15);
        let paper = (cfg.pricing.gb_second * 4.0 + cfg.pricing.offload_instance_per_s) * 100.0;
        assert!((c.paper_formula_usd - paper).abs() < 1e-12);
        let local = cost(&ExecConfig::default(), &ExecStats::default(), 100.0, 4);
        assert_eq!(local.requests, 0);
        assert!((local.total_usd - 100.0 * cfg.pricing.local_instance_per_s).abs() < 1e-15);
    }
}
