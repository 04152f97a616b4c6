//! The gradient function's logic, independent of how it is invoked (the Lambda
//! runtime in `main.rs`, or a test calling [`Handler::handle`] directly).
//!
//! A [`Handler`] lives as long as its execution environment: the model (built
//! once per model and data set) and the parameters last loaded into it (keyed by
//! their digest) survive across warm invocations, so that a peer's B tasks of one
//! round fetch the parameters once per environment, not once per task.
//!
//! Every libtorch call runs on a blocking thread, never on the async executor.

use crate::objstore::{ObjectStore, StoreError};
use crate::{Model, ModelSpec, TensorData, TrainError};
use p2pml_proto::task::{
    decode_batch, decode_grad_output, encode_grad_output, BatchObject, Fault, GradOutput, GradTask, ObjectError,
    ReduceTask, Task, TaskResult,
};
use p2pml_proto::{decode_f32, BlobError, DatasetKind, ModelKind};
use std::time::Instant;
use tch::Device;

/// Environment variable with the number of libtorch threads of a function (default 1).
pub const TORCH_THREADS_ENV: &str = "P2PML_TORCH_THREADS";

/// How a function's errors name its object store settings (see [`ObjectStore::named_by`]).
pub const FUNCTION_ENDPOINT_SETTING: &str = "P2PML_S3_ENDPOINT of the function";
pub const FUNCTION_BUCKET_SETTING: &str = "P2PML_S3_BUCKET of the function";

/// Why an invocation failed. Each message names the key, field or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error("bad task event: {0}")]
    Event(#[from] serde_json::Error),
    /// (The store's errors name the key; `key` is kept for callers.)
    #[error("cannot read {what}: {source}")]
    Fetch { what: &'static str, key: String, source: StoreError },
    #[error("cannot write the output: {source}")]
    Write { key: String, source: StoreError },
    #[error("{what} {key}: {source}")]
    Object { what: &'static str, key: String, source: ObjectError },
    #[error("parameters {key}: {source}")]
    Params { key: String, source: BlobError },
    #[error("task says numel {got}, but model {model} on {dataset} has {expected} parameters")]
    Numel { model: ModelKind, dataset: DatasetKind, expected: usize, got: usize },
    #[error("batch {key} holds {got:?} samples, {dataset} samples are {expected:?} (C×H×W)")]
    Shape { key: String, dataset: DatasetKind, expected: [usize; 3], got: [u32; 3] },
    #[error("batch {key}: label {label} at index {index} is out of range for {classes} classes")]
    Label { key: String, label: u8, index: usize, classes: usize },
    #[error("task has no {0}")]
    Empty(&'static str),
    #[error("gradient value {index} is not finite (the model diverged)")]
    NonFinite { index: usize },
    #[error(transparent)]
    Model(#[from] TrainError),
    /// The task's objects are in another bucket than this function's store.
    #[error(
        "task's objects are in bucket {task} (the node's --s3-bucket) but this function's store is bucket {function} \
         ({setting}): give both the same bucket"
    )]
    WrongBucket { task: String, function: String, setting: &'static str },
    #[error("injected fault: error")]
    Injected,
    #[error("{0}={1:?} is not a positive integer")]
    Env(&'static str, String),
    #[error("compute thread failed: {0}")]
    Join(String),
}

impl HandlerError {
    /// The `errorType` a function error reports for this error.
    pub fn error_type(&self) -> &'static str {
        match self {
            HandlerError::Event(_) => "p2pml.BadEvent",
            HandlerError::Fetch { source: StoreError::NotFound { .. }, .. } => "p2pml.NotFound",
            HandlerError::Fetch { .. } | HandlerError::Write { .. } => "p2pml.Store",
            HandlerError::Object { .. }
            | HandlerError::Params { .. }
            | HandlerError::Numel { .. }
            | HandlerError::Shape { .. }
            | HandlerError::Label { .. }
            | HandlerError::Empty(_) => "p2pml.BadInput",
            HandlerError::WrongBucket { .. } => "p2pml.WrongBucket",
            HandlerError::Injected => "p2pml.InjectedFault",
            HandlerError::NonFinite { .. } | HandlerError::Model(_) | HandlerError::Env(..) | HandlerError::Join(_) => {
                "p2pml.Compute"
            }
        }
    }
}

/// Parses a task event (a function's JSON payload).
pub fn parse_task(event: serde_json::Value) -> Result<Task, HandlerError> {
    Ok(Task::from_event(event)?)
}

/// The number of libtorch threads asked for by [`TORCH_THREADS_ENV`] (1 when unset).
pub fn torch_threads_from_env() -> Result<usize, HandlerError> {
    match std::env::var(TORCH_THREADS_ENV) {
        Err(_) => Ok(1),
        Ok(v) => v.trim().parse::<usize>().ok().filter(|&n| n > 0).ok_or(HandlerError::Env(TORCH_THREADS_ENV, v)),
    }
}

/// The model of an environment and the parameters loaded into it.
struct Cached {
    model: Model,
    dataset: DatasetKind,
    /// Digest of the parameters now in `model` (None until a load completed).
    digest: Option<String>,
}

impl Cached {
    fn fits(&self, spec: ModelSpec, dataset: DatasetKind) -> bool {
        self.model.spec() == spec && self.dataset == dataset
    }
}

/// The gradient function: an object store client and the warm state.
pub struct Handler {
    store: ObjectStore,
    cache: Option<Cached>,
    /// Tasks this environment has run (the first one was a cold start).
    handled: u64,
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handler")
            .field("bucket", &self.store.bucket())
            .field("cached_digest", &self.cache.as_ref().and_then(|c| c.digest.as_deref()))
            .finish()
    }
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// The message of a caught panic.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// Runs `f` on a blocking thread; a panic there becomes an error.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, HandlerError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        HandlerError::Join(match e.try_into_panic() {
            Ok(p) => panic_message(p.as_ref()),
            Err(e) => e.to_string(),
        })
    })
}

impl Handler {
    pub fn new(store: ObjectStore) -> Self {
        Handler { store, cache: None, handled: 0 }
    }

    /// Refuses a task whose objects are in another bucket than this store's
    /// (rather than failing later with a not-found key or, worse, reading
    /// another run's objects).
    pub fn check_bucket(&self, task: &Task) -> Result<(), HandlerError> {
        let bucket = match task {
            Task::Grad(t) => t.bucket.as_deref(),
            Task::Reduce(t) => t.bucket.as_deref(),
        };
        match bucket {
            Some(b) if b != self.store.bucket() => Err(HandlerError::WrongBucket {
                task: b.to_string(),
                function: self.store.bucket().to_string(),
                setting: FUNCTION_BUCKET_SETTING,
            }),
            _ => Ok(()),
        }
    }

    /// Runs one task. A [`Fault::Panic`] panics, as asked.
    pub async fn handle(&mut self, task: Task) -> Result<TaskResult, HandlerError> {
        let t0 = Instant::now();
        let cold = self.handled == 0;
        self.handled += 1;
        self.check_bucket(&task)?;
        let r = match task {
            Task::Grad(t) => {
                match t.fault {
                    Some(Fault::Panic) => panic!("injected fault: panic (task {})", t.output_key),
                    Some(Fault::Error) => return Err(HandlerError::Injected),
                    Some(Fault::SleepMs(ms)) => tokio::time::sleep(std::time::Duration::from_millis(ms)).await,
                    None => {}
                }
                self.grad(t).await
            }
            Task::Reduce(t) => self.reduce(t).await,
        };
        r.map(|r| TaskResult { cold, handler_ms: ms_since(t0), ..r })
    }

    async fn get(&self, what: &'static str, key: &str) -> Result<Vec<u8>, HandlerError> {
        self.store.get(key).await.map_err(|source| HandlerError::Fetch { what, key: key.to_string(), source })
    }

    /// Gets every key at once, in order.
    async fn get_all(&self, what: &'static str, keys: &[String]) -> Result<Vec<Vec<u8>>, HandlerError> {
        futures::future::try_join_all(keys.iter().map(|k| self.get(what, k))).await
    }

    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), HandlerError> {
        self.store.put(key, bytes).await.map_err(|source| HandlerError::Write { key: key.to_string(), source })
    }

    async fn grad(&mut self, t: GradTask) -> Result<TaskResult, HandlerError> {
        if t.batch_keys.is_empty() {
            return Err(HandlerError::Empty("batch_keys"));
        }
        let spec = ModelSpec::for_dataset(t.model, t.dataset);
        let cached = self
            .cache
            .as_ref()
            .is_some_and(|c| c.fits(spec, t.dataset) && c.digest.as_deref() == Some(t.params_digest.as_str()));

        let start = Instant::now();
        let params = if cached { None } else { Some(self.get("parameters", &t.params_key).await?) };
        let batches = self.get_all("batch", &t.batch_keys).await?;
        let fetch_ms = ms_since(start);
        let bytes_in = params.as_ref().map_or(0, |p| p.len() as u64) + batches.iter().map(|b| b.len() as u64).sum::<u64>();

        // The model moves onto the blocking thread and comes back with the result;
        // if that thread panics, the environment rebuilds it next time.
        let prior = self.cache.take().filter(|c| c.fits(spec, t.dataset));
        let task = t.clone();
        let (cache, computed) = blocking(move || compute(prior, &task, spec, params, batches)).await?;
        self.cache = cache;
        let c = computed?;

        let r = TaskResult {
            params_cached: cached,
            fetch_ms,
            decode_ms: c.decode_ms,
            compute_ms: c.compute_ms,
            bytes_in,
            ..TaskResult::default()
        };
        self.write_output(t.output_key, &c.out, r).await
    }

    async fn reduce(&mut self, t: ReduceTask) -> Result<TaskResult, HandlerError> {
        if t.input_keys.is_empty() {
            return Err(HandlerError::Empty("input_keys"));
        }
        let start = Instant::now();
        let inputs = self.get_all("gradient output", &t.input_keys).await?;
        let fetch_ms = ms_since(start);
        let bytes_in = inputs.iter().map(|b| b.len() as u64).sum();
        let (keys, numel) = (t.input_keys.clone(), t.numel);
        let (out, decode_ms, compute_ms) = blocking(move || sum_outputs(&keys, &inputs, numel)).await??;
        let r = TaskResult { fetch_ms, decode_ms, compute_ms, bytes_in, ..TaskResult::default() };
        self.write_output(t.output_key, &out, r).await
    }

    /// Encodes and writes `out`, completing `r` with what that took.
    async fn write_output(&self, key: String, out: &GradOutput, r: TaskResult) -> Result<TaskResult, HandlerError> {
        let start = Instant::now();
        let bytes = encode_grad_output(out);
        let encode_ms = ms_since(start);
        let bytes_out = bytes.len() as u64;
        let start = Instant::now();
        self.put(&key, bytes).await?;
        let write_ms = ms_since(start);
        Ok(TaskResult {
            output_key: key,
            samples: out.samples,
            loss_sum: out.loss_sum,
            encode_ms,
            write_ms,
            bytes_out,
            ..r
        })
    }
}

/// What the blocking part of a gradient task produces.
struct Computed {
    out: GradOutput,
    decode_ms: f64,
    compute_ms: f64,
}

/// Loads the parameters (unless cached), decodes the batches and sums their
/// gradients. Returns the model (for the cache) whatever happens.
fn compute(
    prior: Option<Cached>,
    t: &GradTask,
    spec: ModelSpec,
    params: Option<Vec<u8>>,
    batches: Vec<Vec<u8>>,
) -> (Option<Cached>, Result<Computed, HandlerError>) {
    let start = Instant::now();
    let mut cached = match prior {
        Some(c) => c,
        None => match Model::new(spec, Device::Cpu, t.seed) {
            Ok(model) => Cached { model, dataset: t.dataset, digest: None },
            Err(e) => return (None, Err(e.into())),
        },
    };
    let result = load_and_compute(&mut cached, t, spec, params, &batches, start);
    (Some(cached), result)
}

fn load_and_compute(
    c: &mut Cached,
    t: &GradTask,
    spec: ModelSpec,
    params: Option<Vec<u8>>,
    batches: &[Vec<u8>],
    start: Instant,
) -> Result<Computed, HandlerError> {
    let numel = c.model.numel();
    if t.numel != numel {
        return Err(HandlerError::Numel { model: t.model, dataset: t.dataset, expected: numel, got: t.numel });
    }
    if let Some(bytes) = params {
        c.digest = None;
        let values =
            decode_f32(&bytes, numel).map_err(|source| HandlerError::Params { key: t.params_key.clone(), source })?;
        c.model.set_params(&values)?;
        c.digest = Some(t.params_digest.clone());
    }
    let mut data = Vec::with_capacity(batches.len());
    for (key, bytes) in t.batch_keys.iter().zip(batches) {
        let b = decode_batch(bytes).map_err(|source| HandlerError::Object { what: "batch", key: key.clone(), source })?;
        check_batch(key, &b, t.dataset, spec)?;
        let split = crate::data::Split { images: b.images, labels: b.labels, shape: spec.shape };
        data.push(TensorData::new(&split, t.dataset, t.normalization, Device::Cpu));
    }
    let decode_ms = ms_since(start);

    let start = Instant::now();
    tch::manual_seed(t.dropout_seed as i64);
    let g = c.model.gradient_sum(data.iter().filter(|d| !d.is_empty()).map(|d| (d.x.shallow_clone(), d.y.shallow_clone())));
    let grad = Vec::<f32>::try_from(&g.grad).map_err(TrainError::from)?;
    let (loss_sum, samples) = (g.loss_sum, g.samples as u64);
    // Freeing the tensors is part of computing the gradient (the local executor
    // pays it too): inside the measured time, not hidden in the invoke overhead.
    drop(g);
    drop(data);
    if let Some(index) = grad.iter().position(|v| !v.is_finite()) {
        return Err(HandlerError::NonFinite { index });
    }
    if !loss_sum.is_finite() {
        return Err(HandlerError::NonFinite { index: usize::MAX });
    }
    Ok(Computed { out: GradOutput { samples, loss_sum, grad }, decode_ms, compute_ms: ms_since(start) })
}

/// A batch must hold samples of the data set's shape and labels of its classes.
fn check_batch(key: &str, b: &BatchObject, dataset: DatasetKind, spec: ModelSpec) -> Result<(), HandlerError> {
    if b.shape.map(|d| d as usize) != spec.shape {
        return Err(HandlerError::Shape { key: key.to_string(), dataset, expected: spec.shape, got: b.shape });
    }
    match b.labels.iter().position(|&l| l as usize >= spec.classes) {
        Some(index) => {
            Err(HandlerError::Label { key: key.to_string(), label: b.labels[index], index, classes: spec.classes })
        }
        None => Ok(()),
    }
}

/// Sums gradient outputs (in the order given): (sum, decode ms, compute ms).
fn sum_outputs(keys: &[String], inputs: &[Vec<u8>], numel: usize) -> Result<(GradOutput, f64, f64), HandlerError> {
    let start = Instant::now();
    let decoded = keys
        .iter()
        .zip(inputs)
        .map(|(key, bytes)| {
            decode_grad_output(bytes, numel).map_err(|source| HandlerError::Object {
                what: "gradient output",
                key: key.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let decode_ms = ms_since(start);
    let start = Instant::now();
    let mut out = GradOutput { samples: 0, loss_sum: 0.0, grad: vec![0.0; numel] };
    for d in &decoded {
        out.samples += d.samples;
        out.loss_sum += d.loss_sum;
        for (a, b) in out.grad.iter_mut().zip(&d.grad) {
            *a += b;
        }
    }
    Ok((out, decode_ms, ms_since(start)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_outputs_in_order_and_names_bad_keys() {
        let a = GradOutput { samples: 2, loss_sum: 1.5, grad: vec![1.0, 2.0] };
        let b = GradOutput { samples: 3, loss_sum: 0.5, grad: vec![0.5, -1.0] };
        let keys = vec!["a".to_string(), "b".to_string()];
        let (s, _, _) = sum_outputs(&keys, &[encode_grad_output(&a), encode_grad_output(&b)], 2).unwrap();
        assert_eq!(s, GradOutput { samples: 5, loss_sum: 2.0, grad: vec![1.5, 1.0] });
        let e = sum_outputs(&keys, &[encode_grad_output(&a), vec![1, 2, 3]], 2).unwrap_err().to_string();
        assert!(e.contains("gradient output b"), "{e}");
        let e = sum_outputs(&keys, &[encode_grad_output(&a), encode_grad_output(&b)], 3).unwrap_err().to_string();
        assert!(e.contains("gradient output a") && e.contains("expected 3"), "{e}");
    }

    #[test]
    fn batches_are_checked_against_the_data_set() {
        let spec = ModelSpec::for_dataset(ModelKind::Cnn, DatasetKind::FashionMnist);
        let ok = BatchObject { shape: [1, 28, 28], images: vec![0; 784], labels: vec![9] };
        check_batch("k", &ok, DatasetKind::FashionMnist, spec).unwrap();
        let shape = BatchObject { shape: [3, 32, 32], ..ok.clone() };
        let e = check_batch("k1", &shape, DatasetKind::FashionMnist, spec).unwrap_err().to_string();
        assert!(e.contains("batch k1") && e.contains("[3, 32, 32]"), "{e}");
        let label = BatchObject { labels: vec![10], ..ok };
        let e = check_batch("k2", &label, DatasetKind::FashionMnist, spec).unwrap_err().to_string();
        assert!(e.contains("label 10"), "{e}");
    }

    #[test]
    fn tasks_of_another_bucket_are_refused_naming_both() {
        let cfg = crate::objstore::StoreConfig {
            endpoint: Some("http://127.0.0.1:9".into()),
            bucket: "fn-bucket".into(),
            region: "us-east-1".into(),
            path_style: true,
        };
        let store = ObjectStore::with_credentials(&cfg, "k", "s", None).unwrap();
        let h = Handler::new(store);
        let ev = serde_json::json!({
            "op": "reduce", "run": "r", "peer": "p", "round": 0, "numel": 3,
            "input_keys": ["a"], "output_key": "o", "bucket": "node-bucket"
        });
        let task = parse_task(ev.clone()).unwrap();
        let e = h.check_bucket(&task).unwrap_err();
        assert_eq!(e.error_type(), "p2pml.WrongBucket");
        let msg = e.to_string();
        assert!(msg.contains("bucket node-bucket (the node's --s3-bucket)"), "{msg}");
        assert!(msg.contains("bucket fn-bucket (P2PML_S3_BUCKET of the function)"), "{msg}");
        // Refused before any fetch: the store (nothing listens there) is never asked.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut h = h;
        let e = rt.block_on(h.handle(task)).unwrap_err();
        assert!(matches!(e, HandlerError::WrongBucket { .. }), "{e}");
        // The same bucket, or none named, passes.
        let mut same = ev.clone();
        same["bucket"] = "fn-bucket".into();
        h.check_bucket(&parse_task(same).unwrap()).unwrap();
        let mut none = ev;
        none.as_object_mut().unwrap().remove("bucket");
        h.check_bucket(&parse_task(none).unwrap()).unwrap();
    }

    #[test]
    fn events_name_the_missing_field_and_the_unknown_model() {
        let mut ev = serde_json::json!({
            "op": "grad", "run": "r", "peer": "p", "round": 0, "model": "cnn", "dataset": "fashion-mnist",
            "normalization": "mean-std", "seed": 1, "dropout_seed": 2, "numel": 3, "params_key": "k",
            "params_digest": "d", "batch_keys": ["b"], "output_key": "o"
        });
        parse_task(ev.clone()).unwrap();
        let mut missing = ev.clone();
        missing.as_object_mut().unwrap().remove("params_key");
        let e = parse_task(missing).unwrap_err().to_string();
        assert!(e.contains("params_key"), "{e}");
        ev["model"] = "lenet".into();
        let e = parse_task(ev).unwrap_err().to_string();
        assert!(e.contains("lenet"), "{e}");
    }
}
