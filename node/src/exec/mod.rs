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
//!
//! Layout: `config` (flags), `plan` (tasks of a round), `stats` (counters and
//! cost), `breaker`, `lambda` (the executor), `invoke` (one task's attempts).

use clap::Args;
use p2pml_lambda_grad::data::Split;
use p2pml_lambda_grad::objstore::{ObjectStore, StoreConfig, StoreError};
use p2pml_proto::task::{self, BatchObject, Fault, GradOutput, GradTask, ReduceTask, Task, TaskResult};
use p2pml_proto::{DatasetKind, ModelKind, Normalization};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod breaker;
mod config;
mod invoke;
mod lambda;
mod plan;
mod stats;
#[cfg(test)]
mod tests;

pub use breaker::*;
pub use config::*;
pub use lambda::*;
pub use plan::*;
pub use stats::*;
#[allow(unused_imports)]
use invoke::*;
