//! Benchmark: samples/s of the Rust training core against PyTorch in Python,
//! same network (`cnn`), same data (Fashion-MNIST), same batch size, optimizer and
//! thread count, measured in one run. Prints both and the ratio (target ≥ 1.0).
//!
//!     cargo bench -p p2pml-node --bench train_vs_pytorch
//!
//! Environment: BENCH_LIMIT (training samples, default all 60000), BENCH_EPOCHS
//! (default 1), BENCH_THREADS (default: all cores), BENCH_ROUNDS (alternating
//! repetitions, best of each kept; default 2).

use p2pml_node::config::TrainConfig;
use std::path::PathBuf;
use std::process::Command;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let limit = env_usize("BENCH_LIMIT", 0);
    let epochs = env_usize("BENCH_EPOCHS", 1) as u64;
    let threads = env_usize("BENCH_THREADS", std::thread::available_parallelism().map_or(1, |n| n.get()));
    let rounds = env_usize("BENCH_ROUNDS", 2);
    let cfg = TrainConfig {
        epochs,
        val_size: 0,
        limit_train: limit,
        limit_test: 2000,
        threads,
        device: p2pml_lambda_grad::DeviceChoice::Cpu,
        ..TrainConfig::default()
    };
    let python = root.join(".venv/bin/python");
    let script = root.join("bench/pytorch_train.py");
    let (mut best_rust, mut best_py) = (0f64, 0f64);
    let (mut rust_acc, mut py_acc) = (0f64, 0f64);
    for round in 0..rounds {
        let report = p2pml_node::standalone::run(&cfg, None, false)?;
        let sps = report.epochs.iter().map(|e| e.samples_per_second).fold(0.0, f64::max);
        rust_acc = report.epochs.last().map_or(0.0, |e| e.test.accuracy);
        best_rust = best_rust.max(sps);

        let out = Command::new(&python)
            .arg(&script)
            .args(["--epochs", &epochs.to_string(), "--limit-train", &limit.to_string()])
            .args(["--limit-test", "2000", "--threads", &threads.to_string()])
            .output()?;
        anyhow::ensure!(out.status.success(), "PyTorch reference failed: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let eps = v["epochs"].as_array().cloned().unwrap_or_default();
        let sps = eps.iter().filter_map(|e| e["samples_per_second"].as_f64()).fold(0.0, f64::max);
        py_acc = eps.last().and_then(|e| e["test_accuracy"].as_f64()).unwrap_or(0.0);
        best_py = best_py.max(sps);
        println!("round {}: rust {:.0} samples/s, pytorch {:.0} samples/s", round + 1, best_rust, sps);
    }
    println!("cnn, fashion-mnist, batch 64, SGD(0.01, 0.9), {threads} threads, {epochs} epoch(s), {} samples",
        if limit == 0 { 60_000 } else { limit });
    println!("rust core  : {best_rust:>8.0} samples/s  (test acc on 2000: {:.2}%)", 100.0 * rust_acc);
    println!("pytorch    : {best_py:>8.0} samples/s  (test acc on 2000: {:.2}%)", 100.0 * py_acc);
    println!("ratio rust/pytorch: {:.3} (target >= 1.0)", best_rust / best_py);
    Ok(())
}
