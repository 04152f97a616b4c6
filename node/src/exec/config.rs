//! The executor's settings: flags, environment variables, pricing.

use super::*;

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

pub(super) fn parse_executor(s: &str) -> Result<ExecutorKind, String> {
    match s {
        "local" => Ok(ExecutorKind::Local),
        "lambda" => Ok(ExecutorKind::Lambda),
        _ => Err(format!("unknown executor '{s}': expected local or lambda")),
    }
}

pub(super) fn parse_flag(s: &str) -> Result<bool, String> {
    match s {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(format!("'{s}': expected 1 or 0")),
    }
}

pub(super) fn parse_fault(s: &str) -> Result<(u64, Fault), String> {
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

/// What `ExecConfig::validate` refuses: each is one line naming the setting.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExecConfigError {
    /// A setting below its least value (the flag and that value).
    #[error("{0} must be at least {1}")]
    TooSmall(&'static str, u64),
    #[error("{0}")]
    Endpoint(String),
    #[error("--s3-bucket {0}: not a valid bucket name (3-63 characters: lowercase letters, digits, '-' and '.')")]
    Bucket(String),
}

impl ExecConfig {
    pub fn validate(&self) -> Result<(), ExecConfigError> {
        for (flag, value, least) in [
            ("--max-concurrency", self.max_concurrency as u64, 1),
            ("--batches-per-invocation", self.batches_per_invocation as u64, 1),
            ("--task-timeout-ms", self.task_timeout_ms, 100),
            ("--breaker-failures", self.breaker_failures as u64, 1),
            ("--breaker-backoff-ms", self.breaker_backoff_ms, 100),
        ] {
            if value < least {
                return Err(ExecConfigError::TooSmall(flag, least));
            }
        }
        use p2pml_lambda_grad::objstore::{check_bucket_name, check_endpoint};
        if let Some(e) = &self.store.endpoint {
            check_endpoint(&format!("--s3-endpoint {e}"), e).map_err(|e| ExecConfigError::Endpoint(e.to_string()))?;
        }
        if let Some(e) = &self.lambda_endpoint {
            check_endpoint(&format!("--lambda-endpoint {e}"), e).map_err(|e| ExecConfigError::Endpoint(e.to_string()))?;
        }
        check_bucket_name(&self.store.bucket).map_err(|_| ExecConfigError::Bucket(self.store.bucket.clone()))?;
        Ok(())
    }
}
