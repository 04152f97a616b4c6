//! The function tier's interface: the JSON event a gradient function receives,
//! the JSON result it returns, and the binary objects it reads and writes in the
//! object store (batches, parameters, gradient outputs).
//!
//! Object keys (all under the run's prefix, so runs never collide):
//! - `{run}/params/{digest}`: the flat parameters, content-addressed by their
//!   digest ([`encode_f32`](crate::encode_f32) bytes); written once per digest.
//! - `{run}/data/{peer}/e{epoch}/b{index}`: one batch of a peer's shard ([`encode_batch`]).
//! - `{run}/grad/{peer}/r{round}/t{task}`: a task's output ([`encode_grad_output`]);
//!   tasks are idempotent by output key, so a retry or a backup overwrites it
//!   with the same content.

use crate::spec::{DatasetKind, ModelKind, Normalization};
use serde::{Deserialize, Serialize};

/// Largest batch object accepted (64 MiB).
pub const MAX_BATCH_BYTES: usize = 64 << 20;

/// What a function invocation is asked to do. JSON, tagged by `op`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Task {
    /// Summed gradient of the loss over some batches.
    Grad(GradTask),
    /// Sum of several gradient outputs into one (the tier's reduce step).
    Reduce(ReduceTask),
}

impl Task {
    /// Parses a function invocation's event (its JSON payload): the one parser
    /// of the function tier's untrusted input (fuzzed: fuzz/fuzz_targets/event.rs).
    pub fn from_event(event: serde_json::Value) -> Result<Task, serde_json::Error> {
        serde_json::from_value(event)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GradTask {
    pub run: String,
    pub peer: String,
    pub round: u64,
    pub model: ModelKind,
    pub dataset: DatasetKind,
    pub normalization: Normalization,
    /// Seed of the model's construction (dropout masks come from `dropout_seed`).
    pub seed: u64,
    /// Seed for this task's dropout masks, so a retry computes the same gradient.
    pub dropout_seed: u64,
    /// Number of parameters; the parameter object must hold exactly this many.
    pub numel: usize,
    /// Key of the parameters and their digest (the cache key across warm invocations).
    pub params_key: String,
    pub params_digest: String,
    pub batch_keys: Vec<String>,
    pub output_key: String,
    /// The bucket the task's keys are in. A function whose store is another
    /// bucket refuses the task, naming both (absent: the function's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    /// Fault injection for tests: makes this invocation fail on purpose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReduceTask {
    pub run: String,
    pub peer: String,
    pub round: u64,
    pub numel: usize,
    pub input_keys: Vec<String>,
    pub output_key: String,
    /// The bucket the task's keys are in. A function whose store is another
    /// bucket refuses the task, naming both (absent: the function's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
}

/// Injected failures (tests and the fault-schedule experiments only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// The handler panics.
    Panic,
    /// The handler sleeps this long before answering (to trip timeouts).
    SleepMs(u64),
    /// The handler returns an error.
    Error,
}

/// What a successful invocation returns (JSON).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub output_key: String,
    pub samples: u64,
    pub loss_sum: f64,
    /// Whether the parameters came from the warm cache.
    pub params_cached: bool,
    pub fetch_ms: f64,
    pub decode_ms: f64,
    pub compute_ms: f64,
    pub encode_ms: f64,
    pub write_ms: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The first task of a new function environment (a cold start).
    #[serde(default)]
    pub cold: bool,
    /// The handler's whole time, event parsed to result ready (its stages and
    /// what lies between them).
    #[serde(default)]
    pub handler_ms: f64,
}

/// A task's output object: summed gradient, summed loss, sample count.
#[derive(Clone, Debug, PartialEq)]
pub struct GradOutput {
    pub samples: u64,
    pub loss_sum: f64,
    pub grad: Vec<f32>,
}

/// One batch of raw samples as stored in the object store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchObject {
    /// Sample shape C×H×W.
    pub shape: [u32; 3],
    /// N×C×H×W bytes, as in the data set.
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ObjectError {
    #[error("object is {0} bytes, too short for its header")]
    Short(usize),
    #[error("object does not start with the {0} magic")]
    Magic(&'static str),
    #[error("object holds {got} bytes, its header says {expected}")]
    Length { expected: usize, got: usize },
    #[error("gradient holds {got} values, expected {expected}")]
    Count { expected: usize, got: usize },
    #[error("value {0} is not finite")]
    NonFinite(usize),
    #[error("object is {0} bytes, over the cap")]
    TooLarge(usize),
}

const GRAD_MAGIC: &[u8; 4] = b"PGO1";
const BATCH_MAGIC: &[u8; 4] = b"PBA1";

/// `PGO1`, samples u64, loss_sum f64, count u64, then count f32 (all little-endian).
pub fn encode_grad_output(out: &GradOutput) -> Vec<u8> {
    let mut b = Vec::with_capacity(28 + out.grad.len() * 4);
    b.extend_from_slice(GRAD_MAGIC);
    b.extend_from_slice(&out.samples.to_le_bytes());
    b.extend_from_slice(&out.loss_sum.to_le_bytes());
    b.extend_from_slice(&(out.grad.len() as u64).to_le_bytes());
    crate::put_f32s(&mut b, &out.grad);
    b
}

/// Decodes a gradient output of exactly `numel` finite values.
pub fn decode_grad_output(bytes: &[u8], numel: usize) -> Result<GradOutput, ObjectError> {
    if bytes.len() < 28 {
        return Err(ObjectError::Short(bytes.len()));
    }
    if &bytes[..4] != GRAD_MAGIC {
        return Err(ObjectError::Magic("gradient output"));
    }
    let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
    let samples = u64_at(4);
    let loss_sum = f64::from_bits(u64_at(12));
    let count = u64_at(20);
    if count != numel as u64 {
        return Err(ObjectError::Count { expected: numel, got: usize::try_from(count).unwrap_or(usize::MAX) });
    }
    let expected = 28 + numel * 4;
    if bytes.len() != expected {
        return Err(ObjectError::Length { expected, got: bytes.len() });
    }
    let grad = crate::decode_f32(&bytes[28..], numel).map_err(|e| match e {
        crate::BlobError::NonFinite { index } => ObjectError::NonFinite(index),
        _ => ObjectError::Length { expected, got: bytes.len() },
    })?;
    if !loss_sum.is_finite() {
        return Err(ObjectError::NonFinite(usize::MAX));
    }
    Ok(GradOutput { samples, loss_sum, grad })
}

/// `PBA1`, n u32, c u32, h u32, w u32, then n·c·h·w image bytes and n labels.
pub fn encode_batch(batch: &BatchObject) -> Vec<u8> {
    let n = batch.labels.len() as u32;
    let mut b = Vec::with_capacity(20 + batch.images.len() + batch.labels.len());
    b.extend_from_slice(BATCH_MAGIC);
    for v in [n, batch.shape[0], batch.shape[1], batch.shape[2]] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&batch.images);
    b.extend_from_slice(&batch.labels);
    b
}

pub fn decode_batch(bytes: &[u8]) -> Result<BatchObject, ObjectError> {
    if bytes.len() > MAX_BATCH_BYTES {
        return Err(ObjectError::TooLarge(bytes.len()));
    }
    if bytes.len() < 20 {
        return Err(ObjectError::Short(bytes.len()));
    }
    if &bytes[..4] != BATCH_MAGIC {
        return Err(ObjectError::Magic("batch"));
    }
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes")) as usize;
    let (n, c, h, w) = (u32_at(4), u32_at(8), u32_at(12), u32_at(16));
    let sample = c.checked_mul(h).and_then(|x| x.checked_mul(w)).ok_or(ObjectError::TooLarge(usize::MAX))?;
    // Checked all the way: the header's dimensions are untrusted (c·h·w can be
    // usize::MAX, where `sample + 1` would overflow).
    let images_len = n.checked_mul(sample).ok_or(ObjectError::TooLarge(usize::MAX))?;
    let expected = images_len
        .checked_add(n)
        .and_then(|x| x.checked_add(20))
        .ok_or(ObjectError::TooLarge(usize::MAX))?;
    if bytes.len() != expected {
        return Err(ObjectError::Length { expected, got: bytes.len() });
    }
    let images = bytes[20..20 + images_len].to_vec();
    let labels = bytes[20 + images_len..].to_vec();
    Ok(BatchObject { shape: [c as u32, h as u32, w as u32], images, labels })
}

/// Key of the parameters with `digest` in `run`.
pub fn params_key(run: &str, digest: &str) -> String {
    format!("{run}/params/{digest}")
}

/// Key of batch `index` of `peer`'s shard in `epoch`.
pub fn batch_key(run: &str, peer: &str, epoch: u64, index: usize) -> String {
    format!("{run}/data/{peer}/e{epoch}/b{index}")
}

/// Key of task `task`'s output for `peer` in `round`.
pub fn output_key(run: &str, peer: &str, round: u64, task: &str) -> String {
    format!("{run}/grad/{peer}/r{round}/{task}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_dimensions_that_overflow_are_an_error_not_a_panic() {
        // c·h·w = 65535 · 42009217 · 6700417 = 2^64 - 1: the product fits, one more does not.
        for n in [0u32, 1, 7] {
            let mut b = BATCH_MAGIC.to_vec();
            for v in [n, 65535, 42_009_217, 6_700_417] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            let r = decode_batch(&b);
            // No samples: an empty batch, whatever its shape; any sample: too large.
            assert_eq!(r.is_ok(), n == 0, "n = {n}: {r:?}");
        }
    }

    #[test]
    fn grad_output_round_trip_and_rejects() {
        let out = GradOutput { samples: 64, loss_sum: 12.5, grad: vec![1.0, -2.0, 0.5] };
        let b = encode_grad_output(&out);
        assert_eq!(decode_grad_output(&b, 3).unwrap(), out);
        assert!(matches!(decode_grad_output(&b, 4), Err(ObjectError::Count { .. })));
        assert!(matches!(decode_grad_output(&b[..b.len() - 1], 3), Err(ObjectError::Length { .. })));
        assert!(matches!(decode_grad_output(&b[..10], 3), Err(ObjectError::Short(10))));
        let mut bad = b.clone();
        bad[0] = b'X';
        assert!(matches!(decode_grad_output(&bad, 3), Err(ObjectError::Magic(_))));
        let nan = GradOutput { samples: 1, loss_sum: 0.0, grad: vec![f32::NAN] };
        assert!(matches!(decode_grad_output(&encode_grad_output(&nan), 1), Err(ObjectError::NonFinite(0))));
    }

    #[test]
    fn batch_round_trip_and_rejects() {
        let b = BatchObject { shape: [1, 2, 2], images: (0..8).collect(), labels: vec![3, 7] };
        let bytes = encode_batch(&b);
        assert_eq!(decode_batch(&bytes).unwrap(), b);
        assert!(matches!(decode_batch(&bytes[..bytes.len() - 1]), Err(ObjectError::Length { .. })));
        let mut huge = bytes.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_batch(&huge).is_err());
    }

    #[test]
    fn task_json_is_tagged_and_strict() {
        let t = Task::Reduce(ReduceTask {
            run: "r".into(),
            peer: "p".into(),
            round: 3,
            numel: 10,
            input_keys: vec!["a".into()],
            bucket: None,
            output_key: "o".into(),
        });
        let j = serde_json::to_string(&t).unwrap();
        assert!(j.contains("\"op\":\"reduce\""));
        assert_eq!(serde_json::from_str::<Task>(&j).unwrap(), t);
        let missing = r#"{"op":"reduce","run":"r","peer":"p","round":3,"numel":10,"input_keys":[]}"#;
        let e = serde_json::from_str::<Task>(missing).unwrap_err().to_string();
        assert!(e.contains("output_key"), "{e}");
    }
}
