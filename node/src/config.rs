//! Configuration: one serde struct with defaults, filled once from clap in `main`.

use clap::Args;
use p2pml_lambda_grad::{DeviceChoice, OptimizerConfig};
use p2pml_proto::{DatasetKind, ModelKind, Normalization, OptimizerKind};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Everything that decides what is trained and how.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    pub model: ModelKind,
    pub dataset: DatasetKind,
    /// Directory with the data set's files (default: where the Debian package puts them).
    pub data_dir: Option<PathBuf>,
    pub normalization: Normalization,
    pub epochs: u64,
    pub batch_size: usize,
    pub optimizer: OptimizerConfig,
    pub seed: u64,
    /// Training samples held out for validation (taken before sharding).
    pub val_size: usize,
    /// Use only the first N training samples (0: all).
    pub limit_train: usize,
    /// Use only the first N test samples (0: all).
    pub limit_test: usize,
    pub eval_batch_size: usize,
    pub device: DeviceChoice,
    /// libtorch intra-op threads (0: libtorch's default, one per core).
    pub threads: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: ModelKind::Cnn,
            dataset: DatasetKind::FashionMnist,
            data_dir: None,
            normalization: Normalization::MeanStd,
            epochs: 3,
            batch_size: 64,
            optimizer: OptimizerConfig::default(),
            seed: 1,
            val_size: 5000,
            limit_train: 0,
            limit_test: 0,
            eval_batch_size: 1000,
            device: DeviceChoice::Auto,
            threads: 0,
        }
    }
}

fn parse_model(s: &str) -> Result<ModelKind, String> {
    s.parse().map_err(|e: p2pml_proto::ParseSpecError| e.to_string())
}
fn parse_dataset(s: &str) -> Result<DatasetKind, String> {
    s.parse().map_err(|e: p2pml_proto::ParseSpecError| e.to_string())
}
fn parse_norm(s: &str) -> Result<Normalization, String> {
    s.parse().map_err(|e: p2pml_proto::ParseSpecError| e.to_string())
}
fn parse_opt(s: &str) -> Result<OptimizerKind, String> {
    s.parse().map_err(|e: p2pml_proto::ParseSpecError| e.to_string())
}
fn parse_device(s: &str) -> Result<DeviceChoice, String> {
    s.parse().map_err(|e: p2pml_lambda_grad::DeviceError| e.to_string())
}

/// The command-line form of [`TrainConfig`]; every flag also reads `P2PML_<NAME>`.
#[derive(Args, Clone, Debug)]
pub struct TrainArgs {
    /// Model: cnn, vgg11, squeezenet1_1, mobilenet_v2, densenet121, resnet18.
    #[arg(long, env = "P2PML_MODEL", default_value = "cnn", value_parser = parse_model)]
    pub model: ModelKind,
    /// Data set: mnist, fashion-mnist, cifar10.
    #[arg(long, env = "P2PML_DATASET", default_value = "fashion-mnist", value_parser = parse_dataset)]
    pub dataset: DatasetKind,
    /// Directory with the data set's files [default: /usr/share/datasets/<dataset>].
    #[arg(long, env = "P2PML_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Preprocessing: mean-std, min-max, standardize.
    #[arg(long, env = "P2PML_NORMALIZATION", default_value = "mean-std", value_parser = parse_norm)]
    pub normalization: Normalization,
    #[arg(long, env = "P2PML_EPOCHS", default_value_t = 3)]
    pub epochs: u64,
    #[arg(long, env = "P2PML_BATCH_SIZE", default_value_t = 64)]
    pub batch_size: usize,
    /// Optimizer: sgd, adam.
    #[arg(long, env = "P2PML_OPTIMIZER", default_value = "sgd", value_parser = parse_opt)]
    pub optimizer: OptimizerKind,
    #[arg(long, env = "P2PML_LR", default_value_t = 0.01)]
    pub lr: f64,
    #[arg(long, env = "P2PML_MOMENTUM", default_value_t = 0.9)]
    pub momentum: f64,
    #[arg(long, env = "P2PML_WEIGHT_DECAY", default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, env = "P2PML_SEED", default_value_t = 1)]
    pub seed: u64,
    /// Training samples held out for validation.
    #[arg(long, env = "P2PML_VAL_SIZE", default_value_t = 5000)]
    pub val_size: usize,
    /// Use only the first N training samples (0: all).
    #[arg(long, env = "P2PML_LIMIT_TRAIN", default_value_t = 0)]
    pub limit_train: usize,
    /// Use only the first N test samples (0: all).
    #[arg(long, env = "P2PML_LIMIT_TEST", default_value_t = 0)]
    pub limit_test: usize,
    /// Device: cpu, cuda, auto (CUDA when present).
    #[arg(long, env = "P2PML_DEVICE", default_value = "auto", value_parser = parse_device)]
    pub device: DeviceChoice,
    /// libtorch threads for this process (0: one per core).
    #[arg(long, env = "P2PML_THREADS", default_value_t = 0)]
    pub threads: usize,
}

impl TrainArgs {
    pub fn to_config(&self) -> TrainConfig {
        let d = TrainConfig::default();
        TrainConfig {
            model: self.model,
            dataset: self.dataset,
            data_dir: self.data_dir.clone(),
            normalization: self.normalization,
            epochs: self.epochs,
            batch_size: self.batch_size,
            optimizer: OptimizerConfig {
                kind: self.optimizer,
                lr: self.lr,
                momentum: self.momentum,
                weight_decay: self.weight_decay,
                ..d.optimizer
            },
            seed: self.seed,
            val_size: self.val_size,
            limit_train: self.limit_train,
            limit_test: self.limit_test,
            device: self.device,
            threads: self.threads,
            ..d
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--batch-size must be at least 1")]
    BatchSize,
    #[error("--lr must be a positive number, got {0}")]
    Lr(String),
    #[error("--epochs must be at least 1")]
    Epochs,
}

impl TrainConfig {
    /// Checks what clap's types cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.batch_size == 0 {
            return Err(ConfigError::BatchSize);
        }
        if !(self.optimizer.lr > 0.0 && self.optimizer.lr.is_finite()) {
            return Err(ConfigError::Lr(self.optimizer.lr.to_string()));
        }
        if self.epochs == 0 {
            return Err(ConfigError::Epochs);
        }
        Ok(())
    }
}
