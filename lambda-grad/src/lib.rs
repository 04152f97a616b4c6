//! p2pml-lambda-grad: everything a gradient computation needs.
//!
//! - [`data`]: IDX and CIFAR-10 readers, preprocessing, deterministic partitioning.
//! - [`models`]: the model zoo (cnn and the seeds' ImageNet models adapted to 28/32 px).
//! - [`Model`]: parameters in one flat buffer, batch gradients, evaluation.
//! - [`Optimizer`]: SGD (momentum, weight decay) and Adam over the flat parameters.
//! - [`export`]: safetensors files that PyTorch loads, preprocessing in the metadata.
//! - [`objstore`]: the S3 object store client (AWS or `testnet s3`).
//! - [`handler`]: the gradient function's tasks (gradients, reduce) on the object store.
//! - [`host`]: a local function host serving Lambda's Invoke and Runtime APIs.

pub mod data;
mod device;
pub mod export;
pub mod fsio;
pub mod handler;
pub mod host;
pub mod models;
pub mod objstore;
mod optim;
mod train;

pub use device::{device_name, DeviceChoice, DeviceError};
pub use optim::{Optimizer, OptimizerConfig};
pub use train::{BatchGrad, Evaluation, Model, ModelSpec, TensorData, TrainError};

/// Sets the number of threads libtorch uses for intra-op parallelism in this
/// process (inter-op threads are left alone: libtorch allows setting them only
/// once, before any parallel work, and the training loop does not use them).
pub fn set_torch_threads(n: usize) {
    tch::set_num_threads(n.max(1) as i32);
}
