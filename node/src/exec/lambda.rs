//! The function-tier executor: inputs in the object store, a round's tasks
//! invoked, stragglers backed up, outputs fetched, failures computed locally.

use super::*;

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

/// Why the function tier cannot be used: found at start, before the network.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0} (or pass --s3-create-bucket)")]
    NoBucket(String),
    #[error("--executor lambda needs credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (testnet sets them for its local function host)")]
    NoCredentials,
    #[error("{0}")]
    Unreachable(String),
    #[error("function {name} not found at {endpoint}: check --function-name (P2PML_FUNCTION_NAME) and the region (AWS_REGION)")]
    FunctionNotFound { name: String, endpoint: String },
    #[error("cannot check function {name} at {endpoint}: {reason}")]
    CheckFailed { name: String, endpoint: String, reason: String },
    #[error("function {name} reads bucket {theirs} (its P2PML_S3_BUCKET) but this node puts the tasks' objects in bucket {ours} (--s3-bucket / P2PML_S3_BUCKET): give both the same bucket")]
    BucketMismatch { name: String, theirs: String, ours: String },
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


/// The function error type of a missing input (lambda-grad's handler).
pub(super) const NOT_FOUND: &str = "p2pml.NotFound";

/// The key of a missing object in a NotFound message ("… s3://BUCKET/KEY not found").
pub(super) fn missing_key(message: &str, bucket: &str) -> Option<String> {
    let rest = &message[message.find("s3://")? + 5..];
    let url = rest.split_whitespace().next()?;
    url.strip_prefix(bucket)?.strip_prefix('/').filter(|k| !k.is_empty()).map(str::to_string)
}


/// How long a member that is not the parameters' uploader waits for them.
pub(super) const PARAMS_WAIT: Duration = Duration::from_secs(3);

/// What a peer can put back into the store when a function reports it missing,
/// and when each of its objects was last put.
pub(super) struct Supplier {
    pub(super) store: ObjectStore,
    /// key → bytes: this epoch's batches and the current parameters.
    pub(super) owned: std::sync::Mutex<HashMap<String, Arc<Vec<u8>>>>,
    /// key → when it was put; a key here is believed to be in the store.
    pub(super) held: tokio::sync::Mutex<HashMap<String, Instant>>,
    pub(super) reuploads: std::sync::atomic::AtomicU64,
    /// Set when a restore proved the store lost an object this peer had put:
    /// then it may have lost them all, and the next round puts everything back.
    pub(super) lost: std::sync::atomic::AtomicBool,
}

impl Supplier {
    /// Puts back every one of `keys` this peer owns unless it was put after
    /// `since` (another task already did); Ok(false) when none is its to put.
    pub(super) async fn restore(&self, keys: &[String], since: Instant) -> Result<bool, StoreError> {
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

    pub(super) fn own(&self, key: String, bytes: Arc<Vec<u8>>) {
        self.owned.lock().unwrap_or_else(|e| e.into_inner()).insert(key, bytes);
    }

    pub(super) fn disown(&self, key: &str) {
        self.owned.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }
}

/// The function-tier executor of one peer.
pub struct LambdaExecutor {
    pub(super) cfg: ExecConfig,
    pub(super) lambda: aws_sdk_lambda::Client,
    pub(super) supplier: Arc<Supplier>,
    /// The epoch whose batches are in `supplier.owned`, and their keys.
    pub(super) epoch_batches: Option<(u64, Vec<String>)>,
    /// The current parameters' key (in `supplier.owned`).
    pub(super) params_owned: Option<String>,
    /// Parameters this peer put, by round, until they are two rounds old.
    pub(super) params_put: std::collections::VecDeque<(u64, String)>,
    /// Keys no task needs any more, deleted once no invocation that could
    /// still read them may be running.
    pub(super) doomed: Vec<String>,
    /// An invocation the client timed out on may still run in the function until then.
    pub(super) hold_deletes_until: Option<Instant>,
    /// Backup races' losers still running.
    pub(super) stragglers: Arc<Stragglers>,
    /// How long an invocation may run in the function (its configured timeout).
    pub(super) function_timeout: Duration,
    pub(super) breaker: Breaker,
    pub(super) durations_ms: Vec<f64>,
    /// Round trips of gradient invocations since the metrics last took them.
    pub recent_ms: Vec<f64>,
    pub stats: ExecStats,
}

/// The Lambda endpoint as errors name it.
pub(super) fn lambda_endpoint_display(cfg: &ExecConfig) -> String {
    cfg.lambda_endpoint.clone().unwrap_or_else(|| format!("https://lambda.{}.amazonaws.com", cfg.region))
}

impl LambdaExecutor {
    /// A client of the function tier, after checking what can be checked at
    /// start: the bucket (created only with --s3-create-bucket), the Lambda
    /// endpoint and the function (GetFunction), and that the function's store
    /// is this node's bucket. Each failure is one line naming the setting.
    pub async fn new(cfg: &ExecConfig) -> Result<Self, StartError> {
        let store = ObjectStore::new(&cfg.store)?.named_by("--s3-endpoint (P2PML_S3_ENDPOINT) of this node", "--s3-bucket (P2PML_S3_BUCKET) of this node");
        if cfg.create_bucket {
            store.ensure_bucket().await?;
        } else {
            store.check_bucket().await.map_err(|e| match e.to_string() {
                m if m.contains("NoSuchBucket") => StartError::NoBucket(m),
                _ => StartError::Store(e),
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

    pub(super) fn store(&self) -> &ObjectStore {
        &self.supplier.store
    }

    /// Puts this peer's batches of `epoch` that the store does not hold, 16 at a
    /// time. The first call of an epoch encodes them (kept for re-uploads) and
    /// retires the previous epoch's; a failed put is tried again next round.
    pub(super) async fn upload_epoch(&mut self, run: &str, peer: &str, epoch: u64, train: &Split, batches: &[Vec<usize>]) -> Result<(), StoreError> {
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
    pub(super) async fn ensure_params(&mut self, run: &str, round: u64, digest: &str, params: &[f32], uploader: bool) -> Result<(), StoreError> {
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

    pub(super) fn backup_deadline(&self) -> Duration {
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
    pub(super) fn breaker_record(&mut self, ok: bool, cause: &str) {
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
    pub(super) async fn invoke_round(&mut self, w: &RoundWork<'_>, tasks: &[&TaskPlan], probe: bool, local: &mut Vec<(usize, LocalCause)>) -> Vec<(usize, GradOutput)> {
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
    pub(super) fn count_stragglers(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.stats.invocations += self.stragglers.invocations.swap(0, Relaxed);
        self.stats.billed_ms += self.stragglers.billed_ms.swap(0, Relaxed);
        if self.stragglers.timed_out.swap(false, Relaxed) {
            let until = Instant::now() + self.function_timeout;
            self.hold_deletes_until = Some(self.hold_deletes_until.map_or(until, |t| t.max(until)));
        }
    }

    pub(super) fn count_ok(&mut self, retried: impl IntoIterator<Item = bool>) {
        for r in retried {
            if r {
                self.stats.tasks_ok_after_retry += 1;
            } else {
                self.stats.tasks_ok += 1;
            }
        }
    }

    pub(super) async fn download(&mut self, key: &str, numel: usize) -> Result<GradOutput, ExecError> {
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
    pub(super) async fn flush(&mut self, wait: Option<Duration>) {
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
    pub(super) fn absorb(&mut self, o: &Outcome, grad: bool) {
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



/// GetFunction: the endpoint answers, the function exists, and its store is
/// this node's bucket (when the function's variables are visible). Returns the
/// function's timeout. A refused GetFunction (a role with only
/// lambda:InvokeFunction) is a warning: the tasks will tell.
pub(super) async fn check_function(lambda: &aws_sdk_lambda::Client, cfg: &ExecConfig, bucket: &str) -> Result<Option<Duration>, StartError> {
    use aws_sdk_lambda::error::ProvideErrorMetadata;
    let ep = lambda_endpoint_display(cfg);
    let out = match lambda.get_function().function_name(&cfg.function_name).send().await {
        Ok(out) => out,
        Err(e) => {
            let code = e.code().unwrap_or_default().to_string();
            return match classify_sdk_error(e, &ep) {
                ExecError::Unreachable(m) => Err(StartError::Unreachable(m)),
                _ if code == "ResourceNotFoundException" => Err(StartError::FunctionNotFound { name: cfg.function_name.clone(), endpoint: ep }),
                _ if code.contains("AccessDenied") => {
                    tracing::warn!("cannot check function {} at {ep} ({code}): going on; its tasks will tell", cfg.function_name);
                    Ok(None)
                }
                ExecError::Function { message, .. } => Err(StartError::CheckFailed {
                    name: cfg.function_name.clone(),
                    endpoint: ep,
                    reason: format!("{message} (--lambda-endpoint, --function-name)"),
                }),
                other => Err(StartError::CheckFailed { name: cfg.function_name.clone(), endpoint: ep, reason: other.to_string() }),
            };
        }
    };
    let conf = out.configuration();
    let theirs = conf.and_then(|c| c.environment()).and_then(|e| e.variables()).and_then(|v| v.get(p2pml_lambda_grad::objstore::ENV_BUCKET));
    if let Some(theirs) = theirs.filter(|b| b.as_str() != bucket) {
        return Err(StartError::BucketMismatch { name: cfg.function_name.clone(), theirs: theirs.clone(), ours: bucket.to_string() });
    }
    Ok(conf.and_then(|c| c.timeout()).filter(|t| *t > 0).map(|t| Duration::from_secs(t as u64)))
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

/// A round's tasks computed: in the function tier first when there is one
/// (`tier`), then here those it could not do (all of them without a tier), at
/// `params` when given. Returns the summed gradient and the seconds spent
/// putting the inputs in the store. The same for a peer and a worker.
pub(crate) async fn compute_round(
    tier: Option<(&mut LambdaExecutor, Offload<'_>)>,
    trainer: &crate::train::TrainerLink,
    batches: Vec<Vec<usize>>,
    tasks: &[TaskPlan],
    params: Option<Arc<Vec<f32>>>,
    numel: usize,
) -> Result<(crate::train::Computed, f64), crate::train::TrainerStopped> {
    let t0 = Instant::now();
    let mut local = tasks.to_vec();
    let (mut outputs, mut upload) = (Vec::new(), 0.0);
    if let Some((lx, work)) = tier {
        let (out, failed, up) = offload(lx, work).await;
        (outputs, upload) = (out, up);
        local.retain(|t| failed.contains(&t.index));
    }
    if !local.is_empty() {
        outputs.extend(trainer.compute(batches, local, params).await?);
    }
    Ok((crate::train::sum_outputs(outputs, numel, t0.elapsed().as_secs_f64()), upload))
}
