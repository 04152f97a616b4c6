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
use std::collections::{BTreeMap, HashMap};
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
    /// Create the bucket when it is missing (otherwise a missing bucket fails the start).
    pub create_bucket: bool,
    /// Keep every object (no clean-up), for debugging.
    pub keep: bool,
    /// Consecutive task failures that open the circuit breaker, and its first back-off.
    pub breaker_failures: u32,
    pub breaker_backoff_ms: u64,
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
            create_bucket: false,
            keep: false,
            breaker_failures: 5,
            breaker_backoff_ms: 10_000,
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

fn parse_flag(s: &str) -> Result<bool, String> {
    match s {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(format!("'{s}': expected 1 or 0")),
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
    /// Object store bucket; it must exist (see --s3-create-bucket). The function
    /// tier must read the same bucket (its P2PML_S3_BUCKET).
    #[arg(long, env = "P2PML_S3_BUCKET", default_value = "p2pml")]
    pub s3_bucket: String,
    /// Create the bucket if it is missing (otherwise a missing bucket stops the start).
    #[arg(long, env = "P2PML_S3_CREATE_BUCKET")]
    pub s3_create_bucket: bool,
    /// Path-style addressing (ENDPOINT/BUCKET/KEY: 1) or virtual-hosted style
    /// (BUCKET.ENDPOINT/KEY: 0) [default: 1 with --s3-endpoint, 0 for AWS S3].
    #[arg(long, env = "P2PML_S3_PATH_STYLE", value_parser = parse_flag)]
    pub s3_path_style: Option<bool>,
    /// Keep every object in the store (batches, parameters, outputs) instead of
    /// deleting what no task needs any more: for debugging.
    #[arg(long, env = "P2PML_S3_KEEP")]
    pub s3_keep: bool,
    /// Consecutive task failures (any cause) after which the node computes
    /// locally for a while, then probes the tier with one task.
    #[arg(long, env = "P2PML_BREAKER_FAILURES", default_value_t = 5)]
    pub breaker_failures: u32,
    /// First back-off of the open breaker (doubles after a failed probe, up to 5 min).
    #[arg(long, env = "P2PML_BREAKER_BACKOFF_MS", default_value_t = 10_000)]
    pub breaker_backoff_ms: u64,
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
                path_style: self.s3_path_style.unwrap_or(self.s3_endpoint.is_some()),
            },
            create_bucket: self.s3_create_bucket,
            keep: self.s3_keep,
            breaker_failures: self.breaker_failures,
            breaker_backoff_ms: self.breaker_backoff_ms,
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
        if self.breaker_failures == 0 {
            return Err("--breaker-failures must be at least 1".into());
        }
        if self.breaker_backoff_ms < 100 {
            return Err("--breaker-backoff-ms must be at least 100".into());
        }
        use p2pml_lambda_grad::objstore::{check_bucket_name, check_endpoint};
        if let Some(e) = &self.store.endpoint {
            check_endpoint(&format!("--s3-endpoint {e}"), e).map_err(|e| e.to_string())?;
        }
        if let Some(e) = &self.lambda_endpoint {
            check_endpoint(&format!("--lambda-endpoint {e}"), e).map_err(|e| e.to_string())?;
        }
        check_bucket_name(&self.store.bucket).map_err(|_| {
            format!("--s3-bucket {}: not a valid bucket name (3-63 characters: lowercase letters, digits, '-' and '.')", self.store.bucket)
        })?;
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
    /// Tasks computed locally, whatever the cause (see `tasks_local`).
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
    /// (Gradient tasks only: a reduce's time is in `reduce_fn_ms`/`reduce_rtt_ms`.)
    pub fn_fetch_ms: f64,
    pub fn_decode_ms: f64,
    pub fn_compute_ms: f64,
    pub fn_encode_ms: f64,
    pub fn_write_ms: f64,
    /// The handlers' whole time (stages and what lies between them).
    pub fn_handler_ms: f64,
    pub invoke_overhead_ms: f64,
    pub peer_upload_ms: f64,
    pub peer_download_ms: f64,
    pub peer_decode_ms: f64,
    /// Reduce invocations: the function's own time and the round trip, summed.
    pub reduce_fn_ms: f64,
    pub reduce_rtt_ms: f64,
    /// Billed milliseconds (each invocation's duration rounded up to 1 ms).
    pub billed_ms: u64,
    pub grad_tasks_ok: u64,
    /// Invocations that started a new function environment.
    pub cold_starts: u64,
    /// Gradient tasks that started a new environment, and the sum of their
    /// round trips beyond the function's own time (the environment's start);
    /// `invoke_overhead_ms` is the same over the warm ones.
    pub cold_grad_tasks: u64,
    pub cold_start_ms: f64,
    /// Every planned task ends in exactly one of: `tasks_ok` (in the tier, first
    /// try), `tasks_ok_after_retry`, or `tasks_local` (computed here, by cause:
    /// breaker_open, upload, unreachable, timeout, function_error, not_found,
    /// bad_result, download). `fallbacks` is the sum of `tasks_local`.
    pub tasks_planned: u64,
    pub tasks_ok: u64,
    pub tasks_ok_after_retry: u64,
    pub tasks_local: BTreeMap<String, u64>,
    /// Objects put back after a function found them missing.
    pub reuploads: u64,
    /// Tasks that met a missing input, and the most invocations any of them
    /// took (at most 2: the input put back and one more try, never blind retries).
    pub not_found_tasks: u64,
    pub not_found_max_invocations: u64,
    pub breaker_opens: u64,
    pub breaker_probes: u64,
    /// Whether the breaker is open now (at the last round).
    pub breaker_open: bool,
    /// Keys asked to be deleted once no task could need them (not with
    /// --s3-keep; a task that failed before writing its output counts too).
    pub objects_deleted: u64,
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
    /// The peer's training split and the whole epoch's batches of this peer
    /// (put in the store once per epoch).
    pub train: &'a Split,
    pub epoch_batches: &'a [Vec<usize>],
    pub params: &'a [f32],
    /// Whether this peer puts the parameters ([`params_uploader`]).
    pub uploader: bool,
}

/// The round's outputs: gradients in task order, and the tasks left for local computation.
pub struct RoundOutput {
    /// (first task index covered, output) in task order; one entry when reduced.
    pub outputs: Vec<(usize, GradOutput)>,
    pub failed: Vec<usize>,
}

/// Why a task was computed on the peer rather than in the function tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LocalCause {
    /// The circuit breaker was open (the tier kept failing).
    BreakerOpen,
    /// This peer could not put the batches or the parameters in the store.
    Upload,
    /// The Lambda endpoint could not be reached.
    Unreachable,
    Timeout,
    /// The function failed (its error type is in the log).
    FunctionError,
    /// The function could not find an input, even after this peer put it back.
    NotFound,
    /// The function answered something this peer cannot use.
    BadResult,
    /// The task's output could not be downloaded or decoded.
    Download,
}

impl LocalCause {
    pub fn as_str(self) -> &'static str {
        match self {
            LocalCause::BreakerOpen => "breaker_open",
            LocalCause::Upload => "upload",
            LocalCause::Unreachable => "unreachable",
            LocalCause::Timeout => "timeout",
            LocalCause::FunctionError => "function_error",
            LocalCause::NotFound => "not_found",
            LocalCause::BadResult => "bad_result",
            LocalCause::Download => "download",
        }
    }

    fn of(e: &ExecError) -> Self {
        match e {
            ExecError::Unreachable(_) => LocalCause::Unreachable,
            ExecError::Timeout(_) => LocalCause::Timeout,
            ExecError::Function { kind, .. } if kind == NOT_FOUND => LocalCause::NotFound,
            ExecError::Function { .. } => LocalCause::FunctionError,
            ExecError::BadResult(_) | ExecError::Output(_) => LocalCause::BadResult,
            ExecError::Store(_) => LocalCause::Upload,
        }
    }
}

/// The function error type of a missing input (lambda-grad's handler).
const NOT_FOUND: &str = "p2pml.NotFound";

/// The key of a missing object in a NotFound message ("… s3://BUCKET/KEY not found").
fn missing_key(message: &str, bucket: &str) -> Option<String> {
    let rest = &message[message.find("s3://")? + 5..];
    let url = rest.split_whitespace().next()?;
    url.strip_prefix(bucket)?.strip_prefix('/').filter(|k| !k.is_empty()).map(str::to_string)
}

/// Whether this peer is the one to upload the parameters with `digest`: the
/// member with the highest hash of (digest, member) among `members` (the live
/// members computing this round), so that every peer agrees without a message
/// and one upload is made per digest. A member that is not the uploader waits
/// for the object, then uploads it itself if it did not come.
pub fn params_uploader<'a>(digest: &str, members: impl IntoIterator<Item = &'a str>, me: &str) -> bool {
    let score = |m: &str| {
        let mut h = blake3::Hasher::new();
        h.update(b"p2pml params uploader");
        h.update(digest.as_bytes());
        h.update(m.as_bytes());
        *h.finalize().as_bytes()
    };
    members.into_iter().max_by_key(|m| score(m)).is_none_or(|m| m == me)
}

/// What the breaker lets through this round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    All,
    /// Half-open: one task probes the tier, the others are computed locally.
    Probe,
    Nothing,
}

#[derive(Clone, Debug, PartialEq)]
enum BreakerState {
    Closed,
    Open { until: Instant },
    HalfOpen,
}

/// A circuit breaker over the function tier: after `threshold` consecutive
/// task failures of any cause (or at once when the endpoint is unreachable) it
/// opens and the peer computes locally for a back-off period; then one task
/// probes the tier: success closes it, failure re-opens it for twice as long
/// (at most `cap`). Pure: the caller passes the time and logs the lines it returns.
#[derive(Clone, Debug)]
pub struct Breaker {
    threshold: u32,
    base: Duration,
    cap: Duration,
    backoff: Duration,
    consecutive: u32,
    state: BreakerState,
    pub opens: u64,
    pub probes: u64,
}

impl Breaker {
    pub fn new(threshold: u32, base: Duration, cap: Duration) -> Self {
        Breaker { threshold: threshold.max(1), base, cap: cap.max(base), backoff: base, consecutive: 0, state: BreakerState::Closed, opens: 0, probes: 0 }
    }

    pub fn is_open(&self) -> bool {
        self.state != BreakerState::Closed
    }

    pub fn admit(&mut self, now: Instant) -> Admit {
        match self.state {
            BreakerState::Closed => Admit::All,
            BreakerState::Open { until } if now < until => Admit::Nothing,
            BreakerState::Open { .. } | BreakerState::HalfOpen => {
                self.state = BreakerState::HalfOpen;
                self.probes += 1;
                Admit::Probe
            }
        }
    }

    fn open(&mut self, now: Instant, why: String) -> String {
        self.state = BreakerState::Open { until: now + self.backoff };
        self.opens += 1;
        let line = format!("{why}; computing locally for {:.0} s, then probing with one task", self.backoff.as_secs_f64());
        self.backoff = (self.backoff * 2).min(self.cap);
        line
    }

    /// One task's outcome in the tier; a line to log when the state changes.
    pub fn record(&mut self, now: Instant, ok: bool, cause: &str) -> Option<String> {
        if ok {
            self.consecutive = 0;
            if self.state == BreakerState::Closed {
                return None;
            }
            self.state = BreakerState::Closed;
            self.backoff = self.base;
            return Some("function tier: a probe task succeeded; offloading again".into());
        }
        self.consecutive += 1;
        match self.state {
            BreakerState::HalfOpen => Some(self.open(now, format!("function tier: the probe task failed ({cause})"))),
            BreakerState::Closed if self.consecutive >= self.threshold => {
                Some(self.open(now, format!("function tier: {} tasks failed in a row (last: {cause})", self.consecutive)))
            }
            _ => None,
        }
    }

    /// Opens at once (the endpoint cannot be reached: every task would fail).
    pub fn trip(&mut self, now: Instant, why: &str) -> Option<String> {
        self.consecutive = self.consecutive.max(self.threshold);
        match self.state {
            BreakerState::Open { .. } => None,
            _ => Some(self.open(now, format!("function tier: {why}"))),
        }
    }
}

/// How long a member that is not the parameters' uploader waits for them.
const PARAMS_WAIT: Duration = Duration::from_secs(3);

/// What a peer can put back into the store when a function reports it missing,
/// and when each of its objects was last put.
struct Supplier {
    store: ObjectStore,
    /// key → bytes: this epoch's batches and the current parameters.
    owned: std::sync::Mutex<HashMap<String, Arc<Vec<u8>>>>,
    /// key → when it was put; a key here is believed to be in the store.
    held: tokio::sync::Mutex<HashMap<String, Instant>>,
    reuploads: std::sync::atomic::AtomicU64,
    /// Set when a restore proved the store lost an object this peer had put:
    /// then it may have lost them all, and the next round puts everything back.
    lost: std::sync::atomic::AtomicBool,
}

impl Supplier {
    /// Puts back every one of `keys` this peer owns unless it was put after
    /// `since` (another task already did); Ok(false) when none is its to put.
    async fn restore(&self, keys: &[String], since: Instant) -> Result<bool, StoreError> {
        let mut any = false;
        for key in keys {
            let Some(bytes) = self.owned.lock().unwrap_or_else(|e| e.into_inner()).get(key).cloned() else { continue };
            any = true;
            let mut held = self.held.lock().await;
            match held.get(key) {
                Some(t) if *t > since => continue,
                Some(_) => self.lost.store(true, std::sync::atomic::Ordering::Relaxed),
                None => {}
            }
            tracing::warn!("the function tier could not find {key}: putting it back");
            self.store.put(key, bytes.to_vec()).await?;
            held.insert(key.clone(), Instant::now());
            self.reuploads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(any)
    }

    fn own(&self, key: String, bytes: Arc<Vec<u8>>) {
        self.owned.lock().unwrap_or_else(|e| e.into_inner()).insert(key, bytes);
    }

    fn disown(&self, key: &str) {
        self.owned.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }
}

/// The function-tier executor of one peer.
pub struct LambdaExecutor {
    cfg: ExecConfig,
    lambda: aws_sdk_lambda::Client,
    supplier: Arc<Supplier>,
    /// The epoch whose batches are in `supplier.owned`, and their keys.
    epoch_batches: Option<(u64, Vec<String>)>,
    /// The current parameters' key (in `supplier.owned`).
    params_owned: Option<String>,
    /// Parameters this peer put, by round, until they are two rounds old.
    params_put: std::collections::VecDeque<(u64, String)>,
    /// Keys no task needs any more, deleted once no invocation that could
    /// still read them may be running.
    doomed: Vec<String>,
    /// An invocation the client timed out on may still run in the function until then.
    hold_deletes_until: Option<Instant>,
    /// Backup races' losers still running.
    stragglers: Arc<Stragglers>,
    /// How long an invocation may run in the function (its configured timeout).
    function_timeout: Duration,
    breaker: Breaker,
    durations_ms: Vec<f64>,
    /// Round trips of gradient invocations since the metrics last took them.
    pub recent_ms: Vec<f64>,
    pub stats: ExecStats,
}

/// The Lambda endpoint as errors name it.
fn lambda_endpoint_display(cfg: &ExecConfig) -> String {
    cfg.lambda_endpoint.clone().unwrap_or_else(|| format!("https://lambda.{}.amazonaws.com", cfg.region))
}

impl LambdaExecutor {
    /// A client of the function tier, after checking what can be checked at
    /// start: the bucket (created only with --s3-create-bucket), the Lambda
    /// endpoint and the function (GetFunction), and that the function's store
    /// is this node's bucket. Each failure is one line naming the setting.
    pub async fn new(cfg: &ExecConfig) -> anyhow::Result<Self> {
        let store = ObjectStore::new(&cfg.store)?.named_by("--s3-endpoint (P2PML_S3_ENDPOINT) of this node", "--s3-bucket (P2PML_S3_BUCKET) of this node");
        if cfg.create_bucket {
            store.ensure_bucket().await?;
        } else {
            store.check_bucket().await.map_err(|e| match e.to_string() {
                m if m.contains("NoSuchBucket") => anyhow::anyhow!("{m} (or pass --s3-create-bucket)"),
                m => anyhow::anyhow!("{m}"),
            })?;
        }
        let lambda = lambda_client(cfg.lambda_endpoint.as_deref(), &cfg.region, Duration::from_millis(cfg.task_timeout_ms))?;
        let function_timeout = check_function(&lambda, cfg, store.bucket()).await?;
        Ok(LambdaExecutor {
            cfg: cfg.clone(),
            lambda,
            supplier: Arc::new(Supplier {
                store,
                owned: Default::default(),
                held: Default::default(),
                reuploads: Default::default(),
                lost: Default::default(),
            }),
            epoch_batches: None,
            params_owned: None,
            params_put: Default::default(),
            doomed: Vec::new(),
            hold_deletes_until: None,
            stragglers: Default::default(),
            // Unknown (GetFunction refused): Lambda's longest timeout, to be safe.
            function_timeout: function_timeout.unwrap_or(Duration::from_secs(900)),
            breaker: Breaker::new(cfg.breaker_failures, Duration::from_millis(cfg.breaker_backoff_ms), BREAKER_CAP),
            durations_ms: Vec::new(),
            recent_ms: Vec::new(),
            stats: ExecStats::default(),
        })
    }

    fn store(&self) -> &ObjectStore {
        &self.supplier.store
    }

    /// Puts this peer's batches of `epoch` that the store does not hold, 16 at a
    /// time. The first call of an epoch encodes them (kept for re-uploads) and
    /// retires the previous epoch's; a failed put is tried again next round.
    async fn upload_epoch(&mut self, run: &str, peer: &str, epoch: u64, train: &Split, batches: &[Vec<usize>]) -> Result<(), StoreError> {
        use futures::stream::{self, StreamExt};
        if self.epoch_batches.as_ref().is_none_or(|(e, _)| *e != epoch) {
            if let Some((_, old)) = self.epoch_batches.take() {
                for k in &old {
                    self.supplier.disown(k);
                }
                self.doomed.extend(old);
            }
            let shape = train.shape;
            let mut keys = Vec::with_capacity(batches.len());
            for (i, b) in batches.iter().enumerate() {
                let s = train.select(b);
                let obj = BatchObject { shape: [shape[0] as u32, shape[1] as u32, shape[2] as u32], images: s.images, labels: s.labels };
                let key = task::batch_key(run, peer, epoch, i);
                self.supplier.own(key.clone(), Arc::new(task::encode_batch(&obj)));
                keys.push(key);
            }
            self.epoch_batches = Some((epoch, keys));
        }
        let keys = &self.epoch_batches.as_ref().expect("just set").1;
        let missing: Vec<String> = {
            let held = self.supplier.held.lock().await;
            keys.iter().filter(|k| !held.contains_key(*k)).cloned().collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let t0 = Instant::now();
        let sup = self.supplier.clone();
        let results: Vec<(String, Result<(), StoreError>)> = stream::iter(missing)
            .map(|key| {
                let sup = sup.clone();
                async move {
                    let bytes = sup.owned.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned().unwrap_or_default();
                    let r = sup.store.put(&key, bytes.to_vec()).await;
                    (key, r)
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        let mut first_error = None;
        let mut held = self.supplier.held.lock().await;
        for (key, r) in results {
            match r {
                Ok(()) => {
                    held.insert(key, Instant::now());
                    self.stats.batches_uploaded += 1;
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        self.stats.data_upload_seconds += t0.elapsed().as_secs_f64();
        first_error.map_or(Ok(()), Err)
    }

    /// Makes sure the parameters with `digest` are in the store: the uploader
    /// ([`params_uploader`]) puts them; the others wait for them a little, then
    /// put them themselves.
    async fn ensure_params(&mut self, run: &str, round: u64, digest: &str, params: &[f32], uploader: bool) -> Result<(), StoreError> {
        let key = task::params_key(run, digest);
        // Parameters this peer put and that no round used for two rounds are not
        // needed any more (a digest that comes back is used again: kept).
        for (r, k) in self.params_put.iter_mut() {
            if *k == key {
                *r = round;
            }
        }
        let (old, keep): (Vec<_>, Vec<_>) = self.params_put.drain(..).partition(|(r, k)| r + 2 <= round && *k != key);
        self.params_put = keep.into();
        for (_, k) in old {
            self.supplier.held.lock().await.remove(&k);
            self.doomed.push(k);
        }
        if self.params_owned.as_deref() != Some(key.as_str()) {
            if let Some(old) = self.params_owned.take() {
                self.supplier.disown(&old);
            }
            let bytes = p2pml_proto::encode_f32(params).map_err(|e| StoreError::Service { op: "encode", key: key.clone(), message: e.to_string() })?;
            self.supplier.own(key.clone(), Arc::new(bytes));
            self.params_owned = Some(key.clone());
        }
        if self.supplier.held.lock().await.contains_key(&key) {
            self.stats.params_upload_skips += 1;
            return Ok(());
        }
        let t0 = Instant::now();
        let store = self.store().clone();
        let deadline = t0 + if uploader { Duration::ZERO } else { PARAMS_WAIT };
        let mut pause = Duration::from_millis(5);
        let present = loop {
            if store.head(&key).await? {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        };
        if present {
            self.stats.params_upload_skips += 1;
        } else {
            if !uploader {
                tracing::info!("round {round}: parameters {digest} did not appear within {} s; putting them", PARAMS_WAIT.as_secs());
            }
            let bytes = self.supplier.owned.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned().unwrap_or_default();
            store.put(&key, bytes.to_vec()).await?;
            self.stats.params_uploads += 1;
            if !self.params_put.iter().any(|(_, k)| *k == key) {
                self.params_put.push_back((round, key.clone()));
            }
        }
        self.supplier.held.lock().await.insert(key, Instant::now());
        self.stats.peer_upload_ms += t0.elapsed().as_secs_f64() * 1e3;
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

    /// Feeds one outcome to the breaker, logging a change of state.
    fn breaker_record(&mut self, ok: bool, cause: &str) {
        if let Some(line) = self.breaker.record(Instant::now(), ok, cause) {
            tracing::warn!("{line}");
        }
    }

    /// Runs a round's tasks in the function tier: puts this epoch's batches and
    /// the parameters in the store, invokes, reduces, downloads. Every planned
    /// task ends counted once: in the tier (first try or after retries), or
    /// returned in `failed` for local computation, by cause.
    pub async fn offload(&mut self, w: &RoundWork<'_>) -> RoundOutput {
        self.stats.tasks_planned += w.tasks.len() as u64;
        let mut local: Vec<(usize, LocalCause)> = Vec::new();
        let admitted: Vec<&TaskPlan> = match self.breaker.admit(Instant::now()) {
            Admit::All => w.tasks.iter().collect(),
            Admit::Probe => w.tasks.iter().take(1).collect(),
            Admit::Nothing => Vec::new(),
        };
        local.extend(w.tasks.iter().skip(admitted.len()).map(|t| (t.index, LocalCause::BreakerOpen)));
        let mut outputs = Vec::new();
        if !admitted.is_empty() {
            let probe = admitted.len() < w.tasks.len() || self.breaker.is_open();
            if self.supplier.lost.swap(false, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!("round {}: the store lost objects this peer had put: putting all of this epoch's back", w.round);
                self.supplier.held.lock().await.clear();
            }
            // The parameters first: the other members wait for them.
            let up = match self.ensure_params(w.run, w.round, w.params_digest, w.params, w.uploader).await {
                Ok(()) => self.upload_epoch(w.run, w.peer, w.epoch, w.train, w.epoch_batches).await,
                Err(e) => Err(e),
            };
            match up {
                Ok(()) => outputs = self.invoke_round(w, &admitted, probe, &mut local).await,
                Err(e) => {
                    tracing::warn!("round {}: cannot put the task inputs in the store ({e}); computing locally", w.round);
                    local.extend(admitted.iter().map(|t| (t.index, LocalCause::Upload)));
                    // One failure of the store, however many tasks it held up.
                    self.breaker_record(false, "upload");
                }
            }
        }
        for (_, cause) in &local {
            *self.stats.tasks_local.entry(cause.as_str().to_string()).or_default() += 1;
        }
        self.stats.fallbacks += local.len() as u64;
        self.stats.breaker_opens = self.breaker.opens;
        self.stats.breaker_probes = self.breaker.probes;
        self.stats.breaker_open = self.breaker.is_open();
        self.stats.reuploads = self.supplier.reuploads.load(std::sync::atomic::Ordering::Relaxed);
        self.count_stragglers();
        self.flush(None).await;
        let mut failed: Vec<usize> = local.into_iter().map(|(i, _)| i).collect();
        failed.sort_unstable();
        RoundOutput { outputs, failed }
    }

    /// Invokes `tasks` (and the reduce), downloads; failures go to `local`.
    async fn invoke_round(&mut self, w: &RoundWork<'_>, tasks: &[&TaskPlan], probe: bool, local: &mut Vec<(usize, LocalCause)>) -> Vec<(usize, GradOutput)> {
        let bucket = self.store().bucket().to_string();
        let grads: Vec<GradTask> = tasks
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
                bucket: Some(bucket.clone()),
                fault: (t.index == 0).then(|| self.cfg.faults.iter().find(|(r, _)| *r == w.round).map(|(_, f)| *f)).flatten(),
            })
            .collect();
        // Whatever happens, no later round reads this round's outputs.
        self.doomed.extend(grads.iter().map(|g| g.output_key.clone()));
        let sem = Arc::new(tokio::sync::Semaphore::new(self.cfg.max_concurrency));
        let deadline = self.backup_deadline();
        let retries = if probe { 0 } else { self.cfg.retries };
        let mut set = tokio::task::JoinSet::new();
        for (t, g) in tasks.iter().zip(grads) {
            let inv = Invoker::new(self, sem.clone(), retries);
            let index = t.index;
            set.spawn(async move { (index, inv.run_with_retries(Task::Grad(g), Some(deadline)).await) });
        }
        // (task index, output key, retried)
        let mut ok: BTreeMap<usize, (String, bool)> = BTreeMap::new();
        let mut unreachable = None;
        let mut reached = false;
        while let Some(joined) = set.join_next().await {
            let (i, (res, outcome)) = match joined {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("round {}: an invocation task failed: {e}", w.round);
                    continue;
                }
            };
            self.absorb(&outcome, true);
            match res {
                Ok(r) => {
                    reached = true;
                    self.breaker_record(true, "");
                    ok.insert(i, (r.output_key, outcome.retries > 0));
                }
                Err(e) => {
                    let cause = LocalCause::of(&e);
                    if cause == LocalCause::Unreachable {
                        unreachable = Some(e.to_string());
                    } else {
                        reached = true;
                        tracing::warn!("round {} task {i}: {e}; computing it locally", w.round);
                        self.breaker_record(false, cause.as_str());
                    }
                    local.push((i, cause));
                }
            }
        }
        // A task whose invocation task was lost (it cannot panic, but be sure).
        for t in tasks {
            if !ok.contains_key(&t.index) && !local.iter().any(|(i, _)| *i == t.index) {
                local.push((t.index, LocalCause::BadResult));
            }
        }
        match unreachable {
            // Nothing reached the tier: every task would fail.
            Some(why) if !reached => {
                if let Some(line) = self.breaker.trip(Instant::now(), &why) {
                    tracing::warn!("{line}");
                }
            }
            Some(why) => self.breaker_record(false, &why),
            None => {}
        }
        let mut outputs = Vec::new();
        if self.cfg.reduce && ok.len() > 1 {
            let red = ReduceTask {
                run: w.run.into(),
                peer: w.peer.into(),
                round: w.round,
                numel: w.numel,
                input_keys: ok.values().map(|(k, _)| k.clone()).collect(),
                output_key: task::output_key(w.run, w.peer, w.round, "reduce"),
                bucket: Some(bucket.clone()),
            };
            self.doomed.push(red.output_key.clone());
            let inv = Invoker::new(self, sem.clone(), retries);
            let (res, outcome) = inv.run_with_retries(Task::Reduce(red), None).await;
            self.absorb(&outcome, false);
            self.stats.reduces += 1;
            match res {
                Ok(r) => match self.download(&r.output_key, w.numel).await {
                    Ok(o) => {
                        self.count_ok(ok.values().map(|(_, retried)| *retried));
                        return vec![(*ok.keys().next().expect("two or more"), o)];
                    }
                    Err(e) => tracing::warn!("round {}: reduced output: {e}; downloading each task's", w.round),
                },
                Err(e) => tracing::warn!("round {}: reduce failed ({e}); downloading each task's output", w.round),
            }
        }
        for (i, (key, retried)) in ok {
            match self.download(&key, w.numel).await {
                Ok(o) => {
                    self.count_ok([retried]);
                    outputs.push((i, o));
                }
                Err(e) => {
                    tracing::warn!("round {} task {i}: {e}; computing it locally", w.round);
                    self.breaker_record(false, "download");
                    local.push((i, LocalCause::Download));
                }
            }
        }
        outputs
    }

    /// Adds the invocations of backup races' losers that have ended.
    fn count_stragglers(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.stats.invocations += self.stragglers.invocations.swap(0, Relaxed);
        self.stats.billed_ms += self.stragglers.billed_ms.swap(0, Relaxed);
        if self.stragglers.timed_out.swap(false, Relaxed) {
            let until = Instant::now() + self.function_timeout;
            self.hold_deletes_until = Some(self.hold_deletes_until.map_or(until, |t| t.max(until)));
        }
    }

    fn count_ok(&mut self, retried: impl IntoIterator<Item = bool>) {
        for r in retried {
            if r {
                self.stats.tasks_ok_after_retry += 1;
            } else {
                self.stats.tasks_ok += 1;
            }
        }
    }

    async fn download(&mut self, key: &str, numel: usize) -> Result<GradOutput, ExecError> {
        let t0 = Instant::now();
        let bytes = self.store().get(key).await?;
        self.stats.peer_download_ms += t0.elapsed().as_secs_f64() * 1e3;
        let t0 = Instant::now();
        let o = task::decode_grad_output(&bytes, numel)?;
        self.stats.peer_decode_ms += t0.elapsed().as_secs_f64() * 1e3;
        Ok(o)
    }

    /// Deletes the doomed keys unless an abandoned invocation may still read
    /// them; with `wait`, waits that long at most for it first.
    async fn flush(&mut self, wait: Option<Duration>) {
        if self.cfg.keep {
            self.doomed.clear();
            return;
        }
        if self.doomed.is_empty() {
            return;
        }
        if self.stragglers.running() > 0 {
            if let Some(w) = wait {
                self.stragglers.wait(w).await;
            }
        }
        if let Some(until) = self.hold_deletes_until {
            let now = Instant::now();
            if until > now {
                match wait {
                    Some(w) if until - now <= w => tokio::time::sleep(until - now).await,
                    _ => return,
                }
            }
            self.hold_deletes_until = None;
        }
        // What a backup race's loser still reads or writes waits for it.
        let (waiting, keys): (Vec<String>, Vec<String>) = std::mem::take(&mut self.doomed).into_iter().partition(|k| self.stragglers.in_use(k));
        self.doomed = waiting;
        if keys.is_empty() {
            return;
        }
        match self.store().delete_keys(&keys).await {
            Ok(n) => self.stats.objects_deleted += n as u64,
            Err(e) => {
                tracing::warn!("cannot delete {} objects no task needs ({e}); trying again later", keys.len());
                // Bounded: a store that never deletes leaves them to a lifecycle rule.
                if self.doomed.len() + keys.len() < 100_000 {
                    self.doomed.extend(keys);
                }
            }
        }
    }

    /// At the end of the run: deletes this peer's batches and what is left to
    /// delete (unless --s3-keep). The parameters of the last two rounds stay:
    /// another peer's last tasks may still read them.
    pub async fn finish(&mut self) {
        if let Some((_, keys)) = self.epoch_batches.take() {
            self.doomed.extend(keys);
        }
        // A straggler ends within the client's timeout of an invocation.
        self.flush(Some(Duration::from_millis(self.cfg.task_timeout_ms) + Duration::from_secs(2))).await;
        self.count_stragglers();
        if !self.doomed.is_empty() && !self.cfg.keep {
            tracing::warn!("left {} objects in the store for an invocation that may still run", self.doomed.len());
        }
    }

    /// Adds a task's counters; `grad`: a gradient task, whose duration feeds the backup deadline.
    fn absorb(&mut self, o: &Outcome, grad: bool) {
        if o.abandoned {
            let until = Instant::now() + self.function_timeout;
            self.hold_deletes_until = Some(self.hold_deletes_until.map_or(until, |t| t.max(until)));
        }
        let s = &mut self.stats;
        if o.not_found {
            s.not_found_tasks += 1;
            s.not_found_max_invocations = s.not_found_max_invocations.max(o.invocations);
        }
        s.invocations += o.invocations;
        s.errors += o.errors;
        s.timeouts += o.timeouts;
        s.retries += o.retries;
        s.backups += o.backups;
        s.backup_wins += o.backup_wins;
        s.billed_ms += o.billed_ms;
        if let Some((r, rtt_ms)) = &o.result {
            let own = r.fetch_ms + r.decode_ms + r.compute_ms + r.encode_ms + r.write_ms;
            s.cold_starts += u64::from(r.cold);
            if !grad {
                // A reduce's stages are its own: the per-task sums are gradient tasks'.
                s.reduce_fn_ms += own;
                s.reduce_rtt_ms += rtt_ms;
                return;
            }
            s.fn_fetch_ms += r.fetch_ms;
            s.fn_decode_ms += r.decode_ms;
            s.fn_compute_ms += r.compute_ms;
            s.fn_encode_ms += r.encode_ms;
            s.fn_write_ms += r.write_ms;
            s.fn_handler_ms += r.handler_ms;
            // A cold start's wait is the environment starting (libtorch loading):
            // apart from the per-invocation overhead of a warm one.
            if r.cold {
                s.cold_start_ms += (rtt_ms - own).max(0.0);
                s.cold_grad_tasks += 1;
            } else {
                s.invoke_overhead_ms += (rtt_ms - own).max(0.0);
            }
            s.params_cache_hits += u64::from(r.params_cached);
            s.grad_tasks_ok += 1;
            // A cold start says nothing of how long a task takes: the backup
            // deadline follows warm ones.
            if !r.cold {
                self.durations_ms.push(*rtt_ms);
            }
            if self.recent_ms.len() < 4096 {
                self.recent_ms.push(*rtt_ms);
            }
            if self.durations_ms.len() > 256 {
                self.durations_ms.drain(..128);
            }
        }
    }
}

/// The longest the breaker stays open between probes.
const BREAKER_CAP: Duration = Duration::from_secs(300);

/// GetFunction: the endpoint answers, the function exists, and its store is
/// this node's bucket (when the function's variables are visible). Returns the
/// function's timeout. A refused GetFunction (a role with only
/// lambda:InvokeFunction) is a warning: the tasks will tell.
async fn check_function(lambda: &aws_sdk_lambda::Client, cfg: &ExecConfig, bucket: &str) -> anyhow::Result<Option<Duration>> {
    use aws_sdk_lambda::error::ProvideErrorMetadata;
    let ep = lambda_endpoint_display(cfg);
    let out = match lambda.get_function().function_name(&cfg.function_name).send().await {
        Ok(out) => out,
        Err(e) => {
            let code = e.code().unwrap_or_default().to_string();
            return match classify_sdk_error(e, &ep) {
                ExecError::Unreachable(m) => Err(anyhow::anyhow!("{m}")),
                _ if code == "ResourceNotFoundException" => Err(anyhow::anyhow!(
                    "function {} not found at {ep}: check --function-name (P2PML_FUNCTION_NAME) and the region (AWS_REGION)",
                    cfg.function_name
                )),
                _ if code.contains("AccessDenied") => {
                    tracing::warn!("cannot check function {} at {ep} ({code}): going on; its tasks will tell", cfg.function_name);
                    Ok(None)
                }
                ExecError::Function { message, .. } => {
                    Err(anyhow::anyhow!("cannot check function {} at {ep}: {message} (--lambda-endpoint, --function-name)", cfg.function_name))
                }
                other => Err(anyhow::anyhow!("cannot check function {} at {ep}: {other}", cfg.function_name)),
            };
        }
    };
    let conf = out.configuration();
    let theirs = conf.and_then(|c| c.environment()).and_then(|e| e.variables()).and_then(|v| v.get(p2pml_lambda_grad::objstore::ENV_BUCKET));
    if let Some(theirs) = theirs.filter(|b| b.as_str() != bucket) {
        anyhow::bail!(
            "function {} reads bucket {theirs} (its P2PML_S3_BUCKET) but this node puts the tasks' objects in bucket {bucket} (--s3-bucket / P2PML_S3_BUCKET): give both the same bucket",
            cfg.function_name
        );
    }
    Ok(conf.and_then(|c| c.timeout()).filter(|t| *t > 0).map(|t| Duration::from_secs(t as u64)))
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
    /// An invocation may still run in the function (the client timed out on it).
    abandoned: bool,
    /// An invocation reported a missing input.
    not_found: bool,
    /// The winning result and its round-trip time in ms.
    result: Option<(TaskResult, f64)>,
}

/// What a spawned invocation needs, cloned out of the executor.
#[derive(Clone)]
struct Invoker {
    lambda: aws_sdk_lambda::Client,
    function: String,
    endpoint: String,
    timeout: Duration,
    retries: u32,
    backoff: Duration,
    sem: Arc<tokio::sync::Semaphore>,
    supplier: Arc<Supplier>,
    stragglers: Arc<Stragglers>,
}

/// Invocations left running after a backup race was won: counted (and billed)
/// when they end, and waited for before deleting what they may still read.
#[derive(Default)]
struct Stragglers {
    in_flight: std::sync::atomic::AtomicUsize,
    invocations: std::sync::atomic::AtomicU64,
    billed_ms: std::sync::atomic::AtomicU64,
    /// A straggler the client timed out on (its function may still run).
    timed_out: std::sync::atomic::AtomicBool,
    /// The keys the running stragglers read or write (counted).
    in_use: std::sync::Mutex<HashMap<String, usize>>,
    done: tokio::sync::Notify,
}

impl Stragglers {
    fn leave_running(self: &Arc<Self>, h: tokio::task::JoinHandle<(Result<TaskResult, ExecError>, f64)>, keys: Vec<String>) {
        use std::sync::atomic::Ordering::Relaxed;
        self.in_flight.fetch_add(1, Relaxed);
        {
            let mut in_use = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
            for k in &keys {
                *in_use.entry(k.clone()).or_default() += 1;
            }
        }
        let me = self.clone();
        tokio::spawn(async move {
            let (res, ms) = joined(h.await);
            me.invocations.fetch_add(1, Relaxed);
            me.billed_ms.fetch_add(ms.ceil() as u64, Relaxed);
            if matches!(res, Err(ExecError::Timeout(_))) {
                me.timed_out.store(true, Relaxed);
            }
            {
                let mut in_use = me.in_use.lock().unwrap_or_else(|e| e.into_inner());
                for k in &keys {
                    if let Some(n) = in_use.get_mut(k) {
                        *n -= 1;
                        if *n == 0 {
                            in_use.remove(k);
                        }
                    }
                }
            }
            me.in_flight.fetch_sub(1, Relaxed);
            me.done.notify_waiters();
        });
    }

    fn in_use(&self, key: &str) -> bool {
        self.in_use.lock().unwrap_or_else(|e| e.into_inner()).contains_key(key)
    }

    fn running(&self) -> usize {
        self.in_flight.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits (at most `limit`) until none runs; whether none does.
    async fn wait(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.running() > 0 {
            let notified = self.done.notified();
            if self.running() == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.running() == 0;
            }
        }
        true
    }
}

/// Every key a task reads or writes.
fn task_keys(t: &Task) -> Vec<String> {
    match t {
        Task::Grad(g) => std::iter::once(g.params_key.clone()).chain(g.batch_keys.iter().cloned()).chain([g.output_key.clone()]).collect(),
        Task::Reduce(r) => r.input_keys.iter().cloned().chain([r.output_key.clone()]).collect(),
    }
}

/// An invocation task's answer; a task that died is a bad result.
fn joined(r: Result<(Result<TaskResult, ExecError>, f64), tokio::task::JoinError>) -> (Result<TaskResult, ExecError>, f64) {
    r.unwrap_or_else(|e| (Err(ExecError::BadResult(format!("the invocation task failed: {e}"))), 0.0))
}

impl Invoker {
    fn new(e: &LambdaExecutor, sem: Arc<tokio::sync::Semaphore>, retries: u32) -> Self {
        Invoker {
            lambda: e.lambda.clone(),
            function: e.cfg.function_name.clone(),
            endpoint: lambda_endpoint_display(&e.cfg),
            timeout: Duration::from_millis(e.cfg.task_timeout_ms),
            retries,
            backoff: Duration::from_millis(e.cfg.backoff_ms),
            sem,
            supplier: e.supplier.clone(),
            stragglers: e.stragglers.clone(),
        }
    }

    /// Attempts with retries and exponential backoff; with `backup`, an attempt
    /// running past that deadline gets a second, concurrent invocation and the
    /// first answer wins (the task is idempotent by output key). A missing input
    /// is not retried blindly: if it is this peer's, it is put back and the task
    /// tried once more; otherwise, or if it is missing again, the task fails.
    async fn run_with_retries(&self, t: Task, backup: Option<Duration>) -> (Result<TaskResult, ExecError>, Outcome) {
        let mut o = Outcome::default();
        let payload = match serde_json::to_vec(&t) {
            Ok(p) => Arc::new(p),
            Err(e) => return (Err(ExecError::BadResult(format!("cannot encode the task: {e}"))), o),
        };
        let (mut retries_left, mut restored) = (self.retries, false);
        let mut pause = self.backoff;
        loop {
            let started = Instant::now();
            let r = match backup {
                Some(d) => self.attempt_with_backup(&payload, &task_keys(&t), d, &mut o).await,
                None => self.attempt(&payload, &mut o).await,
            };
            let e = match r {
                Ok(res) => return (Ok(res), o),
                Err(e @ ExecError::Unreachable(_)) => return (Err(e), o),
                Err(e) => e,
            };
            o.errors += 1;
            if let ExecError::Timeout(_) = e {
                o.timeouts += 1;
                o.abandoned = true;
            }
            if let ExecError::Function { kind, message } = &e {
                if kind == NOT_FOUND {
                    o.not_found = true;
                    if restored {
                        return (Err(e), o);
                    }
                    // The function names the first input it missed; put back all of
                    // the task's inputs that are this peer's, then try once more.
                    let Some(key) = missing_key(message, self.supplier.store.bucket()) else { return (Err(e), o) };
                    let mut keys = vec![key];
                    if let Task::Grad(g) = &t {
                        keys.push(g.params_key.clone());
                        keys.extend(g.batch_keys.iter().cloned());
                    }
                    match self.supplier.restore(&keys, started).await {
                        Ok(true) => {
                            restored = true;
                            o.retries += 1;
                            continue;
                        }
                        Ok(false) => return (Err(e), o),
                        Err(se) => return (Err(ExecError::Store(se)), o),
                    }
                }
            }
            if retries_left == 0 {
                return (Err(e), o);
            }
            retries_left -= 1;
            o.retries += 1;
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
    }

    /// One invocation on its own task (so that the loser of a backup race can
    /// be left to finish, and be counted, rather than dropped unseen).
    fn spawn_invoke(&self, payload: &Arc<Vec<u8>>) -> tokio::task::JoinHandle<(Result<TaskResult, ExecError>, f64)> {
        let (inv, payload) = (self.clone(), payload.clone());
        tokio::spawn(async move { inv.invoke(&payload).await })
    }

    async fn attempt_with_backup(&self, payload: &Arc<Vec<u8>>, keys: &[String], deadline: Duration, o: &mut Outcome) -> Result<TaskResult, ExecError> {
        let mut first = self.spawn_invoke(payload);
        tokio::select! {
            r = &mut first => return self.settle(joined(r), o),
            _ = tokio::time::sleep(deadline) => {}
        }
        o.backups += 1;
        let mut second = self.spawn_invoke(payload);
        let (r, loser, backup_first) = tokio::select! {
            r = &mut first => (r, second, false),
            r = &mut second => (r, first, true),
        };
        let r = self.settle(joined(r), o);
        if r.is_ok() {
            o.backup_wins += u64::from(backup_first);
            self.stragglers.leave_running(loser, keys.to_vec());
            return r;
        }
        let r2 = self.settle(joined(loser.await), o);
        if r2.is_ok() && !backup_first {
            o.backup_wins += 1;
        }
        r2
    }

    async fn attempt(&self, payload: &Arc<Vec<u8>>, o: &mut Outcome) -> Result<TaskResult, ExecError> {
        let r = self.invoke(payload).await;
        self.settle(r, o)
    }

    fn settle(&self, r: (Result<TaskResult, ExecError>, f64), o: &mut Outcome) -> Result<TaskResult, ExecError> {
        let (res, ms) = r;
        o.invocations += 1;
        o.billed_ms += ms.ceil() as u64;
        if matches!(res, Err(ExecError::Timeout(_))) {
            // The client gave up; the function may still run until its own timeout.
            o.abandoned = true;
        }
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
            Ok(Err(e)) => Err(classify_sdk_error(e, &self.endpoint)),
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

/// One line for a failed Lambda request: unreachable (naming the flag), timed
/// out, or the service's error code and message.
fn classify_sdk_error<E, R>(e: aws_sdk_lambda::error::SdkError<E, R>, endpoint: &str) -> ExecError
where
    E: aws_sdk_lambda::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    use aws_sdk_lambda::error::SdkError;
    match &e {
        SdkError::DispatchFailure(d) if d.is_io() || d.is_timeout() => ExecError::Unreachable(format!(
            "function endpoint {endpoint} unreachable: {} — is the function host running, and is --lambda-endpoint (P2PML_LAMBDA_ENDPOINT) right?",
            p2pml_lambda_grad::objstore::root_cause(&e)
        )),
        SdkError::TimeoutError(_) => ExecError::Timeout(0),
        SdkError::ServiceError(s) => {
            let err = s.err();
            let code = err.code().unwrap_or("ServiceError").to_string();
            ExecError::Function { kind: code, message: err.message().unwrap_or("(no message)").to_string() }
        }
        _ => ExecError::Function { kind: "InvokeError".into(), message: p2pml_lambda_grad::objstore::root_cause(&e) },
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

/// One round's work for the function tier.
pub(crate) struct Offload<'a> {
    pub(crate) run: &'a str,
    pub(crate) peer: &'a str,
    pub(crate) round: u64,
    pub(crate) epoch: u64,
    pub(crate) cfg: &'a crate::config::TrainConfig,
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
    let work = RoundWork {
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


#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

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

    #[test]
    fn the_breaker_opens_after_k_failures_probes_and_closes_or_backs_off() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut b = Breaker::new(3, Duration::from_secs(10), Duration::from_secs(25));
        assert_eq!(b.admit(t0), Admit::All);
        assert_eq!(b.record(t0, false, "timeout"), None);
        assert_eq!(b.record(t0, true, ""), None, "a success resets the count");
        assert_eq!(b.record(t0, false, "timeout"), None);
        assert_eq!(b.record(t0, false, "timeout"), None);
        let line = b.record(t0, false, "not_found").expect("opens on the third failure in a row");
        assert!(line.contains("3 tasks failed in a row (last: not_found)") && line.contains("10 s"), "{line}");
        assert_eq!(b.admit(s(9)), Admit::Nothing);
        assert_eq!(b.admit(s(10)), Admit::Probe);
        let line = b.record(s(10), false, "timeout").expect("a failed probe re-opens");
        assert!(line.contains("probe task failed") && line.contains("20 s"), "{line}");
        assert_eq!(b.admit(s(29)), Admit::Nothing);
        assert_eq!(b.admit(s(30)), Admit::Probe);
        assert!(b.record(s(30), false, "timeout").unwrap().contains("25 s"), "capped");
        assert_eq!(b.admit(s(55)), Admit::Probe);
        assert!(b.record(s(55), true, "").unwrap().contains("offloading again"));
        assert_eq!(b.admit(s(55)), Admit::All);
        assert_eq!((b.opens, b.probes), (3, 3));
        // Closed again, the back-off starts over; unreachable opens at once.
        assert!(b.trip(s(60), "unreachable").unwrap().contains("10 s"));
        assert_eq!(b.trip(s(61), "unreachable"), None, "already open");
        assert_eq!(b.admit(s(65)), Admit::Nothing);
    }

    #[test]
    fn missing_keys_are_read_from_not_found_messages_of_this_bucket_only() {
        let m = "cannot read batch: object s3://p2pml/run1/data/peer/e0/b3 not found";
        assert_eq!(missing_key(m, "p2pml").as_deref(), Some("run1/data/peer/e0/b3"));
        assert_eq!(missing_key(m, "other"), None);
        assert_eq!(missing_key("cannot read batch: gone", "p2pml"), None);
        assert_eq!(missing_key("object s3://p2pml/ not found", "p2pml"), None);
    }

    #[test]
    fn exactly_one_member_uploads_each_digest_and_all_agree() {
        let members = ["a", "b", "c", "d"];
        let mut by = std::collections::HashMap::new();
        for d in 0..64 {
            let digest = format!("{d:064x}");
            let ups: Vec<&str> = members.iter().copied().filter(|m| params_uploader(&digest, members, m)).collect();
            assert_eq!(ups.len(), 1, "{digest}: {ups:?}");
            *by.entry(ups[0]).or_insert(0) += 1;
        }
        assert_eq!(by.len(), 4, "the work is spread: {by:?}");
        assert!(params_uploader("x", [], "a"), "no members known: upload");
    }

    #[test]
    fn bad_endpoints_and_buckets_name_the_flag() {
        let mut c = ExecConfig::default();
        c.store.endpoint = Some("127.0.0.1:9000".into());
        let e = c.validate().unwrap_err();
        assert!(e.contains("--s3-endpoint 127.0.0.1:9000") && e.contains("http://HOST:PORT"), "{e}");
        let mut c = ExecConfig { lambda_endpoint: Some("localhost:9001".into()), ..Default::default() };
        assert!(c.validate().unwrap_err().contains("--lambda-endpoint localhost:9001"));
        c.lambda_endpoint = None;
        c.store.bucket = "My_Bucket".into();
        assert!(c.validate().unwrap_err().contains("--s3-bucket My_Bucket"));
    }
}
