//! `p2pml-node train`: one peer, no network. The reference point every
//! distributed mode is compared with, and the quickest check of a set-up.

use crate::config::TrainConfig;
use indicatif::{ProgressBar, ProgressStyle};
use p2pml_lambda_grad::data::Partition;
use p2pml_lambda_grad::export::{self, ExportMeta};
use p2pml_lambda_grad::{device_name, Evaluation, Model, ModelSpec, Optimizer, TensorData};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// What one epoch achieved.
#[derive(Clone, Debug, Serialize)]
pub struct EpochReport {
    pub epoch: u64,
    pub train_loss: f64,
    pub val: Option<Evaluation>,
    pub test: Evaluation,
    pub samples: usize,
    pub train_seconds: f64,
    pub samples_per_second: f64,
    pub lr: f64,
}

/// The whole run.
#[derive(Clone, Debug, Serialize)]
pub struct TrainReport {
    pub config: TrainConfig,
    pub device: String,
    pub threads: i32,
    pub parameters: usize,
    pub epochs: Vec<EpochReport>,
}

/// Trains as `cfg` says, printing a line per epoch; writes `out/model.safetensors`
/// and `out/report.json` when `out` is given.
pub fn run(cfg: &TrainConfig, out: Option<&Path>, progress: bool) -> anyhow::Result<TrainReport> {
    cfg.validate()?;
    if cfg.threads > 0 {
        p2pml_lambda_grad::set_torch_threads(cfg.threads);
    }
    let device = cfg.device.resolve()?;
    if let Some(out) = out {
        crate::fsutil::check_writable(out, "--out").map_err(anyhow::Error::msg)?;
    }
    let ds = cfg.load_dataset()?;
    let partition = Partition::new(ds.train.len(), cfg.val_size, 1, cfg.seed)?;
    let train = TensorData::new(&ds.train, cfg.dataset, cfg.normalization, device);
    let val = (cfg.val_size > 0)
        .then(|| TensorData::new(&ds.train.select(partition.validation()), cfg.dataset, cfg.normalization, device));
    let test = TensorData::new(&ds.test, cfg.dataset, cfg.normalization, device);

    let spec = ModelSpec::for_dataset(cfg.model, cfg.dataset);
    let mut model = Model::new(spec, device, cfg.seed)?;
    let mut opt = Optimizer::new(cfg.optimizer);
    eprintln!(
        "training {} ({} parameters) on {} ({} train, {} validation, {} test) on {}, {} threads",
        cfg.model,
        model.numel(),
        cfg.dataset,
        partition.shard(0)?.len(),
        partition.validation().len(),
        test.len(),
        device_name(device),
        tch::get_num_threads()
    );

    let mut report = TrainReport {
        config: cfg.clone(),
        device: device_name(device),
        threads: tch::get_num_threads(),
        parameters: model.numel(),
        epochs: Vec::new(),
    };
    for epoch in 0..cfg.epochs {
        let batches = partition.epoch_batches(0, epoch, cfg.batch_size)?;
        let bar = if progress { ProgressBar::new(batches.len() as u64) } else { ProgressBar::hidden() };
        bar.set_style(
            ProgressStyle::with_template("epoch {msg} [{bar:30}] {pos}/{len} batches, {per_sec}, eta {eta}")
                .expect("static template")
                .progress_chars("=> "),
        );
        bar.set_message(format!("{}/{}", epoch + 1, cfg.epochs));
        let start = Instant::now();
        let (mut loss_sum, mut samples) = (0f64, 0usize);
        for b in &batches {
            let (x, y) = train.batch(b);
            let (loss, n) = model.local_step(&x, &y, &mut opt);
            loss_sum += loss;
            samples += n;
            bar.inc(1);
        }
        let secs = start.elapsed().as_secs_f64();
        bar.finish_and_clear();
        let val_eval = val.as_ref().map(|v| model.evaluate(&v.x, &v.y, cfg.eval_batch_size));
        let test_eval = model.evaluate(&test.x, &test.y, cfg.eval_batch_size);
        let e = EpochReport {
            epoch: epoch + 1,
            train_loss: loss_sum / samples.max(1) as f64,
            val: val_eval,
            test: test_eval,
            samples,
            train_seconds: secs,
            samples_per_second: samples as f64 / secs.max(1e-9),
            lr: opt.lr(),
        };
        println!(
            "epoch {}/{}  train_loss {:.4}  val_loss {}  test_loss {:.4}  test_acc {:.2}%  {:.0} samples/s",
            e.epoch,
            cfg.epochs,
            e.train_loss,
            e.val.map(|v| format!("{:.4}", v.loss)).unwrap_or_else(|| "-".into()),
            e.test.loss,
            100.0 * e.test.accuracy,
            e.samples_per_second
        );
        report.epochs.push(e);
    }
    if let Some(out) = out {
        let path = out.join("model.safetensors");
        export::save(&model, &ExportMeta::new(cfg.model, cfg.dataset, cfg.normalization), &path)?;
        let json = serde_json::to_string_pretty(&report)?;
        crate::fsutil::write_atomic(&out.join("report.json"), json.as_bytes())
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.join("report.json").display()))?;
        eprintln!("wrote {} and {}", path.display(), out.join("report.json").display());
    }
    Ok(report)
}
