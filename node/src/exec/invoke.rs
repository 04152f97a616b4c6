//! One task's invocations: retries with backoff, backups of stragglers, and the SDK client.

use super::*;

/// What happened to one task across its attempts.
#[derive(Default)]
pub(super) struct Outcome {
    pub(super) invocations: u64,
    pub(super) errors: u64,
    pub(super) timeouts: u64,
    pub(super) retries: u64,
    pub(super) backups: u64,
    pub(super) backup_wins: u64,
    pub(super) billed_ms: u64,
    /// An invocation may still run in the function (the client timed out on it).
    pub(super) abandoned: bool,
    /// An invocation reported a missing input.
    pub(super) not_found: bool,
    /// The winning result and its round-trip time in ms.
    pub(super) result: Option<(TaskResult, f64)>,
}

/// What a spawned invocation needs, cloned out of the executor.
#[derive(Clone)]
pub(super) struct Invoker {
    pub(super) lambda: aws_sdk_lambda::Client,
    pub(super) function: String,
    pub(super) endpoint: String,
    pub(super) timeout: Duration,
    pub(super) retries: u32,
    pub(super) backoff: Duration,
    pub(super) sem: Arc<tokio::sync::Semaphore>,
    pub(super) supplier: Arc<Supplier>,
    pub(super) stragglers: Arc<Stragglers>,
}

/// Invocations left running after a backup race was won: counted (and billed)
/// when they end, and waited for before deleting what they may still read.
#[derive(Default)]
pub(super) struct Stragglers {
    pub(super) in_flight: std::sync::atomic::AtomicUsize,
    pub(super) invocations: std::sync::atomic::AtomicU64,
    pub(super) billed_ms: std::sync::atomic::AtomicU64,
    /// A straggler the client timed out on (its function may still run).
    pub(super) timed_out: std::sync::atomic::AtomicBool,
    /// The keys the running stragglers read or write (counted).
    pub(super) in_use: std::sync::Mutex<HashMap<String, usize>>,
    pub(super) done: tokio::sync::Notify,
}

impl Stragglers {
    pub(super) fn leave_running(self: &Arc<Self>, h: tokio::task::JoinHandle<(Result<TaskResult, ExecError>, f64)>, keys: Vec<String>) {
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

    pub(super) fn in_use(&self, key: &str) -> bool {
        self.in_use.lock().unwrap_or_else(|e| e.into_inner()).contains_key(key)
    }

    pub(super) fn running(&self) -> usize {
        self.in_flight.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits (at most `limit`) until none runs; whether none does.
    pub(super) async fn wait(&self, limit: Duration) -> bool {
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
pub(super) fn task_keys(t: &Task) -> Vec<String> {
    match t {
        Task::Grad(g) => std::iter::once(g.params_key.clone()).chain(g.batch_keys.iter().cloned()).chain([g.output_key.clone()]).collect(),
        Task::Reduce(r) => r.input_keys.iter().cloned().chain([r.output_key.clone()]).collect(),
    }
}

/// An invocation task's answer; a task that died is a bad result.
pub(super) fn joined(r: Result<(Result<TaskResult, ExecError>, f64), tokio::task::JoinError>) -> (Result<TaskResult, ExecError>, f64) {
    r.unwrap_or_else(|e| (Err(ExecError::BadResult(format!("the invocation task failed: {e}"))), 0.0))
}

impl Invoker {
    pub(super) fn new(e: &LambdaExecutor, sem: Arc<tokio::sync::Semaphore>, retries: u32) -> Self {
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
    pub(super) async fn run_with_retries(&self, t: Task, backup: Option<Duration>) -> (Result<TaskResult, ExecError>, Outcome) {
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
    pub(super) fn spawn_invoke(&self, payload: &Arc<Vec<u8>>) -> tokio::task::JoinHandle<(Result<TaskResult, ExecError>, f64)> {
        let (inv, payload) = (self.clone(), payload.clone());
        tokio::spawn(async move { inv.invoke(&payload).await })
    }

    pub(super) async fn attempt_with_backup(&self, payload: &Arc<Vec<u8>>, keys: &[String], deadline: Duration, o: &mut Outcome) -> Result<TaskResult, ExecError> {
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

    pub(super) async fn attempt(&self, payload: &Arc<Vec<u8>>, o: &mut Outcome) -> Result<TaskResult, ExecError> {
        let r = self.invoke(payload).await;
        self.settle(r, o)
    }

    pub(super) fn settle(&self, r: (Result<TaskResult, ExecError>, f64), o: &mut Outcome) -> Result<TaskResult, ExecError> {
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
    pub(super) async fn invoke(&self, payload: &[u8]) -> (Result<TaskResult, ExecError>, f64) {
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
pub(super) fn classify_sdk_error<E, R>(e: aws_sdk_lambda::error::SdkError<E, R>, endpoint: &str) -> ExecError
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
pub(super) fn lambda_client(endpoint: Option<&str>, region: &str, timeout: Duration) -> Result<aws_sdk_lambda::Client, super::StartError> {
    use aws_sdk_lambda::config::{retry::RetryConfig, timeout::TimeoutConfig, BehaviorVersion, Credentials, Region};
    use p2pml_lambda_grad::objstore::{credentials_from, sdk_http_client};
    let Some((key, secret, token)) = credentials_from(|k| std::env::var(k).ok()) else {
        return Err(super::StartError::NoCredentials);
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
