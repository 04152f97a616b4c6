//! The training core against first principles: finite differences, bit-for-bit
//! determinism, safetensors round trips.

use p2pml_lambda_grad::export::{self, ExportMeta};
use p2pml_lambda_grad::{Model, ModelSpec, Optimizer, OptimizerConfig};
use p2pml_proto::{DatasetKind, ModelKind, Normalization, OptimizerKind, Rng};
use std::sync::{Mutex, MutexGuard};
use tch::{Device, Kind, Tensor};

/// libtorch's default generator (initialisation, dropout) is process-global and
/// the test harness runs tests on parallel threads: tests that reseed it hold this.
static TORCH_RNG: Mutex<()> = Mutex::new(());

fn torch_rng() -> MutexGuard<'static, ()> {
    TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner())
}

/// The `cnn` on 8×8 single-channel input with 3 classes: the same code path as
/// the real network, small enough for finite differences.
fn tiny() -> ModelSpec {
    ModelSpec { model: ModelKind::Cnn, shape: [1, 8, 8], classes: 3 }
}

fn batch(n: i64, seed: u64, kind: Kind) -> (Tensor, Tensor) {
    let mut rng = Rng::new(seed);
    let xs: Vec<f64> = (0..n * 64).map(|_| rng.next_f32() as f64 * 2.0 - 1.0).collect();
    let ys: Vec<i64> = (0..n).map(|_| rng.below(3) as i64).collect();
    (Tensor::from_slice(&xs).view([n, 1, 8, 8]).to_kind(kind), Tensor::from_slice(&ys))
}

#[test]
fn batch_gradient_matches_finite_differences() {
    let _rng = torch_rng();
    let mut model = Model::with_kind(tiny(), Device::Cpu, 3, Kind::Double).unwrap();
    let (x, y) = batch(4, 11, Kind::Double);
    // Dropout draws from libtorch's generator: reseed before every evaluation so
    // that each one sees the same masks and the loss is a fixed function.
    let loss_at = |m: &mut Model| {
        tch::manual_seed(99);
        m.batch_gradient(&x, &y)
    };
    let g = loss_at(&mut model);
    assert_eq!(g.samples, 4);
    let analytic = Vec::<f64>::try_from(&g.grad).unwrap();
    assert_eq!(analytic.len(), model.numel());
    let base = Vec::<f64>::try_from(model.flat_params()).unwrap();
    let mut rng = Rng::new(5);
    let layout = model.layout();
    // Check coordinates of every parameter tensor, plus random ones.
    let mut coords: Vec<usize> = layout.iter().map(|(_, _, off)| *off).collect();
    coords.extend((0..16).map(|_| rng.below(base.len() as u64) as usize));
    let eps = 1e-6;
    let mut checked_nonzero = 0;
    for &i in &coords {
        let mut plus = base.clone();
        plus[i] += eps;
        model.set_params_tensor(&Tensor::from_slice(&plus)).unwrap();
        let lp = loss_at(&mut model).loss_sum;
        let mut minus = base.clone();
        minus[i] -= eps;
        model.set_params_tensor(&Tensor::from_slice(&minus)).unwrap();
        let lm = loss_at(&mut model).loss_sum;
        let numeric = (lp - lm) / (2.0 * eps);
        let a = analytic[i];
        assert!(
            (numeric - a).abs() <= 1e-6 + 1e-4 * a.abs().max(numeric.abs()),
            "coordinate {i}: analytic {a}, finite differences {numeric}"
        );
        if a.abs() > 1e-8 {
            checked_nonzero += 1;
        }
    }
    assert!(checked_nonzero >= coords.len() / 3, "too few non-zero gradients checked: {checked_nonzero}");
}

fn train_steps(seed: u64, steps: usize, kind: OptimizerKind) -> Vec<f32> {
    let mut model = Model::new(tiny(), Device::Cpu, seed).unwrap();
    let mut opt = Optimizer::new(OptimizerConfig { kind, lr: 0.05, ..Default::default() });
    for s in 0..steps {
        let (x, y) = batch(16, 100 + s as u64, Kind::Float);
        let g = model.batch_gradient(&x, &y);
        opt.step(model.flat_params_mut(), &g.mean_grad());
    }
    model.params_vec()
}

#[test]
fn same_seed_same_parameters_bit_for_bit() {
    let _rng = torch_rng();
    for kind in [OptimizerKind::Sgd, OptimizerKind::Adam] {
        let a = train_steps(7, 5, kind);
        let b = train_steps(7, 5, kind);
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{kind}: runs differ");
        let c = train_steps(8, 5, kind);
        assert_ne!(a, c, "a different seed gives different parameters");
        let init = Model::new(tiny(), Device::Cpu, 7).unwrap().params_vec();
        assert_ne!(a, init, "training moved the parameters");
    }
}

#[test]
fn training_lowers_the_loss() {
    let _rng = torch_rng();
    let mut model = Model::new(tiny(), Device::Cpu, 1).unwrap();
    let mut opt = Optimizer::new(OptimizerConfig { lr: 0.05, ..Default::default() });
    let (x, y) = batch(32, 1, Kind::Float);
    let before = model.evaluate(&x, &y, 8);
    for _ in 0..60 {
        let g = model.batch_gradient(&x, &y);
        opt.step(model.flat_params_mut(), &g.mean_grad());
    }
    let after = model.evaluate(&x, &y, 8);
    assert!(after.loss < before.loss * 0.5, "{before:?} -> {after:?}");
    assert!(after.accuracy > before.accuracy);
}

#[test]
fn flat_parameters_are_the_model_parameters() {
    let _rng = torch_rng();
    let mut model = Model::new(tiny(), Device::Cpu, 1).unwrap();
    let (x, _) = batch(2, 1, Kind::Float);
    let zeros = vec![0f32; model.numel()];
    model.set_params(&zeros).unwrap();
    // With every weight and bias zero the logits are zero: the flat buffer is
    // really what the layers compute with.
    let e = model.evaluate(&x, &Tensor::from_slice(&[0i64, 1]), 2);
    assert!((e.loss - 3f64.ln()).abs() < 1e-6, "{e:?}");
    assert!(model.set_params(&zeros[1..]).is_err());
    let names: Vec<String> = model.layout().into_iter().map(|(n, _, _)| n).collect();
    assert_eq!(names, ["conv1.bias", "conv1.weight", "conv2.bias", "conv2.weight", "fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]);
}

#[test]
fn safetensors_round_trip() {
    let _rng = torch_rng();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let spec = ModelSpec::for_dataset(ModelKind::Cnn, DatasetKind::FashionMnist);
    let model = Model::new(spec, Device::Cpu, 42).unwrap();
    let meta = ExportMeta::new(ModelKind::Cnn, DatasetKind::FashionMnist, Normalization::MeanStd);
    export::save(&model, &meta, &path).unwrap();
    let (meta2, loaded) = export::load(&path, Device::Cpu).unwrap();
    assert_eq!(meta2, meta);
    assert_eq!(meta2.classes[9], "Ankle boot");
    assert_eq!(meta2.input_shape, [1, 28, 28]);
    assert_eq!(loaded.params_vec(), model.params_vec());
    let shapes: Vec<(String, Vec<i64>)> = loaded.named_tensors().iter().map(|(n, t)| (n.clone(), t.size())).collect();
    assert!(shapes.contains(&("fc1.weight".to_string(), vec![128, 9216])), "{shapes:?}");

    // A corrupt file is an error, not a panic.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&path, &bytes).unwrap();
    let e = export::load(&path, Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("not a valid safetensors file"), "{e}");
}

#[test]
fn local_step_matches_the_flat_gradient_step() {
    // The fused path differentiates the mean loss, the flat path the summed loss
    // scaled by 1/n: equal up to float rounding, and the same training.
    let _rng = torch_rng();
    for kind in [OptimizerKind::Sgd, OptimizerKind::Adam] {
        let cfg = OptimizerConfig { kind, lr: 0.05, weight_decay: 1e-3, ..Default::default() };
        let mut a = Model::new(tiny(), Device::Cpu, 4).unwrap();
        let mut b = Model::new(tiny(), Device::Cpu, 4).unwrap();
        let (mut oa, mut ob) = (Optimizer::new(cfg), Optimizer::new(cfg));
        for s in 0..4 {
            let (x, y) = batch(8, 50 + s, Kind::Float);
            tch::manual_seed(s as i64);
            let g = a.batch_gradient(&x, &y);
            oa.step(a.flat_params_mut(), &g.mean_grad());
            tch::manual_seed(s as i64);
            let (loss, n) = b.local_step(&x, &y, &mut ob);
            assert_eq!(n, g.samples);
            assert!((loss - g.loss_sum).abs() <= 1e-4 * g.loss_sum.abs(), "{loss} vs {}", g.loss_sum);
        }
        let (pa, pb) = (a.params_vec(), b.params_vec());
        let max_diff = pa.iter().zip(&pb).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(max_diff < 1e-5, "{kind}: the two paths differ by up to {max_diff}");
        assert_ne!(pa, Model::new(tiny(), Device::Cpu, 4).unwrap().params_vec());
    }
}
