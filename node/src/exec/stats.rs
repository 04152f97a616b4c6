//! What the function tier did (counters by outcome and cause) and what it cost.

use super::*;

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

    pub(super) fn of(e: &ExecError) -> Self {
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
