//! The `p2pml-node` binary as a user meets it: real processes, files the test writes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const NODE: &str = env!("CARGO_BIN_EXE_p2pml-node");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(args: &[&str]) -> Output {
    Command::new(NODE).args(args).env("RUST_LOG", "warn").output().expect("spawn p2pml-node")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A small learnable IDX data set: each class lights up its own 7×7 block (plus
/// noise), so a few hundred steps reach high accuracy.
fn write_dataset(dir: &Path, train: usize, test: usize) {
    let mut state = 12345u64;
    let mut noise = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 58) as u8
    };
    for (prefix, n) in [("train", train), ("t10k", test)] {
        let mut images = Vec::with_capacity(n * 784);
        let mut labels = Vec::with_capacity(n);
        for i in 0..n {
            let class = (i * 7 + i / 3) % 10;
            labels.push(class as u8);
            let (br, bc) = ((class / 4) * 7 + 3, (class % 4) * 7);
            for r in 0..28 {
                for c in 0..28 {
                    let lit = (br..br + 7).contains(&r) && (bc..bc + 7).contains(&c);
                    images.push(if lit { 200 + noise() } else { noise() * 2 });
                }
            }
        }
        let img = p2pml_lambda_grad::data::encode_idx(&[n, 28, 28], &images);
        let lab = p2pml_lambda_grad::data::encode_idx(&[n], &labels);
        std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), img).unwrap();
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), lab).unwrap();
    }
}

#[test]
fn missing_dataset_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere");
    let o = run(&["train", "--data-dir", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert_eq!(e.lines().count(), 1, "one line: {e}");
    assert!(e.starts_with("error: fashion-mnist not found"), "{e}");
    assert!(e.contains("dataset-fashion-mnist") && e.contains("--data-dir"), "{e}");
    assert!(!e.contains("panicked"));
}

#[test]
fn unknown_model_lists_the_models() {
    let o = run(&["train", "--model", "lenet"]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    for m in ["cnn", "vgg11", "squeezenet1_1", "mobilenet_v2", "densenet121", "resnet18"] {
        assert!(e.contains(m), "{m} missing from: {e}");
    }
    assert!(!e.contains("panicked"));
}

#[test]
fn bad_numbers_are_refused() {
    let o = run(&["train", "--batch-size", "0", "--data-dir", "/nonexistent"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--batch-size must be at least 1"), "{}", stderr(&o));
    let o = run(&["train", "--device", "tpu"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("expected cpu, cuda or auto"));
}

#[test]
fn train_writes_a_model_pytorch_loads() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path(), 1200, 300);
    let out = dir.path().join("out");
    let o = run(&[
        "train", "--data-dir", dir.path().to_str().unwrap(), "--epochs", "2", "--val-size", "200",
        "--device", "cpu", "--threads", "1", "--out", out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(stdout.lines().filter(|l| l.starts_with("epoch ")).count(), 2, "{stdout}");
    assert!(stdout.contains("samples/s") && stdout.contains("test_acc"));

    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let epochs = report["epochs"].as_array().unwrap();
    let acc = epochs.last().unwrap()["test"]["accuracy"].as_f64().unwrap();
    assert!(acc > 0.9, "the toy task is learnt: {acc}");
    assert_eq!(report["parameters"], 1_199_882);

    // The same file in PyTorch: strict state-dict load, same predictions.
    let python = root().join(".venv/bin/python");
    let py = Command::new(&python)
        .arg(root().join("scripts/pytorch_load.py"))
        .arg(out.join("model.safetensors"))
        .args(["--data-dir", dir.path().to_str().unwrap()])
        .output()
        .expect("run .venv/bin/python (scripts/setup.sh creates it)");
    assert!(py.status.success(), "{}", stderr(&py));
    let v: serde_json::Value = serde_json::from_slice(&py.stdout).unwrap();
    let py_acc = v["test_accuracy"].as_f64().unwrap();
    assert!((py_acc - acc).abs() <= 1.0 / 300.0 + 1e-9, "PyTorch {py_acc} vs p2pml {acc}");
    assert_eq!(v["metadata"]["mean"], "[0.286]");
    assert_eq!(v["metadata"]["input_shape"], "[1,28,28]");
}

#[test]
fn same_seed_same_model_file() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path(), 300, 50);
    let models: Vec<Vec<f32>> = ["a", "b"]
        .iter()
        .map(|name| {
            let out = dir.path().join(name);
            let o = run(&[
                "train", "--data-dir", dir.path().to_str().unwrap(), "--epochs", "1", "--val-size", "0",
                "--device", "cpu", "--threads", "2", "--seed", "9", "--out", out.to_str().unwrap(),
            ]);
            assert!(o.status.success(), "{}", stderr(&o));
            let (_, model) = p2pml_lambda_grad::export::load(&out.join("model.safetensors"), tch::Device::Cpu).unwrap();
            model.params_vec()
        })
        .collect();
    let same_bits = models[0].iter().zip(&models[1]).all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same_bits, "two runs with the same seed wrote different parameters");
}
