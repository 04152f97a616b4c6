//! The training core: a model whose trainable parameters live in one flat f32
//! buffer, batch gradients as flat vectors, evaluation.
//!
//! Every trainable variable of the VarStore is re-pointed (as PyTorch's
//! `p.data = flat[a:b].view_as(p)`) into a single contiguous tensor ordered by
//! variable name. Flattening the parameters is therefore free, unflattening is one
//! copy, and the optimizer updates the whole model with a handful of vector ops.

use crate::data::{self, Split};
use crate::models::{self, ModelError, Net};
use p2pml_proto::{DatasetKind, ModelKind, Normalization};
use tch::{nn, Device, Kind, Reduction, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("parameter vector has {got} values, model {model} has {expected}")]
    Length { model: ModelKind, expected: usize, got: usize },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// What a model is: architecture, input shape and number of classes. Two peers
/// with the same spec and seed build bit-identical initial parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelSpec {
    pub model: ModelKind,
    pub shape: [usize; 3],
    pub classes: usize,
}

impl ModelSpec {
    /// The spec of `model` on data set `dataset`.
    pub fn for_dataset(model: ModelKind, dataset: DatasetKind) -> Self {
        let i = data::info(dataset);
        ModelSpec { model, shape: i.shape, classes: i.classes.len() }
    }
}

/// The gradient of the summed loss over one or more batches.
#[derive(Debug)]
pub struct BatchGrad {
    /// d(sum of per-sample losses)/d(params), flat, in the model's layout.
    pub grad: Tensor,
    /// Sum of per-sample cross-entropy losses.
    pub loss_sum: f64,
    /// Number of samples the sums run over.
    pub samples: usize,
}

impl BatchGrad {
    /// The mean gradient (what PyTorch's mean-reduced loss would give).
    pub fn mean_grad(&self) -> Tensor {
        // Multiplication by the reciprocal, as the optimizer's fused path does.
        &self.grad * (1.0 / self.samples.max(1) as f64)
    }
    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.samples.max(1) as f64
    }
}

/// Loss and accuracy over a data set.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Evaluation {
    pub loss: f64,
    pub accuracy: f64,
    pub samples: usize,
}

/// One named tensor of the model, with its place in the flat parameter vector.
#[derive(Debug)]
struct Slot {
    name: String,
    var: Tensor,
    offset: i64,
    numel: i64,
}

/// A model of the zoo with its parameters in one flat buffer.
pub struct Model {
    spec: ModelSpec,
    vs: nn::VarStore,
    net: Net,
    flat: Tensor,
    params: Vec<Slot>,
    buffers: Vec<(String, Tensor)>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("spec", &self.spec).field("params", &self.numel()).finish()
    }
}

impl Model {
    /// Builds the model on `device` with initial parameters drawn from `seed`.
    pub fn new(spec: ModelSpec, device: Device, seed: u64) -> Result<Self, TrainError> {
        Self::with_kind(spec, device, seed, Kind::Float)
    }

    /// As [`Model::new`] with parameters of `kind` (Double for gradient checks).
    pub fn with_kind(spec: ModelSpec, device: Device, seed: u64, kind: Kind) -> Result<Self, TrainError> {
        tch::manual_seed(seed as i64);
        let mut vs = nn::VarStore::new(device);
        let net = models::build(spec.model, &vs.root(), spec.shape, spec.classes)?;
        vs.set_kind(kind);
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let (trainable, buffers): (Vec<_>, Vec<_>) = named.into_iter().partition(|(_, t)| t.requires_grad());
        let flat = if trainable.is_empty() {
            Tensor::zeros([0], (kind, device))
        } else {
            let parts: Vec<Tensor> = trainable.iter().map(|(_, t)| t.detach().reshape([-1])).collect();
            Tensor::cat(&parts, 0)
        };
        let mut params = Vec::with_capacity(trainable.len());
        let mut offset = 0i64;
        for (name, mut var) in trainable {
            let numel = var.numel() as i64;
            let shape = var.size();
            var.set_data(&flat.narrow(0, offset, numel).view(shape.as_slice()));
            params.push(Slot { name, var, offset, numel });
            offset += numel;
        }
        Ok(Model { spec, vs, net, flat, params, buffers })
    }

    pub fn spec(&self) -> ModelSpec {
        self.spec
    }
    pub fn device(&self) -> Device {
        self.vs.device()
    }
    /// Number of trainable parameters (the length of gradients and flat parameters).
    pub fn numel(&self) -> usize {
        self.flat.numel()
    }

    /// The flat parameter vector (shares storage with the model: do not resize).
    pub fn flat_params(&self) -> &Tensor {
        &self.flat
    }
    /// Mutable access for in-place updates by an optimizer.
    pub fn flat_params_mut(&mut self) -> &mut Tensor {
        &mut self.flat
    }

    /// Copies the parameters out as a flat `Vec<f32>`.
    pub fn params_vec(&self) -> Vec<f32> {
        Vec::<f32>::try_from(&self.flat.to_device(Device::Cpu)).expect("flat parameters are f32")
    }

    /// Overwrites the parameters with `values` (in the layout of [`Model::params_vec`]).
    pub fn set_params(&mut self, values: &[f32]) -> Result<(), TrainError> {
        self.check_len(values.len())?;
        let src = Tensor::from_slice(values).to_device(self.device());
        tch::no_grad(|| self.flat.copy_(&src));
        Ok(())
    }

    /// Overwrites the parameters with a flat tensor.
    pub fn set_params_tensor(&mut self, values: &Tensor) -> Result<(), TrainError> {
        self.check_len(values.numel())?;
        tch::no_grad(|| self.flat.copy_(&values.to_device(self.device())));
        Ok(())
    }

    pub(crate) fn check_len(&self, got: usize) -> Result<(), TrainError> {
        if got != self.numel() {
            return Err(TrainError::Length { model: self.spec.model, expected: self.numel(), got });
        }
        Ok(())
    }

    /// Non-trainable state (batch-norm running statistics), by name.
    pub fn buffers(&self) -> &[(String, Tensor)] {
        &self.buffers
    }

    /// Every named tensor (parameters and buffers), sorted by name.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut all: Vec<(String, Tensor)> = self
            .params
            .iter()
            .map(|s| (s.name.clone(), s.var.shallow_clone()))
            .chain(self.buffers.iter().map(|(n, t)| (n.clone(), t.shallow_clone())))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Names, shapes and offsets of the trainable parameters in the flat layout.
    pub fn layout(&self) -> Vec<(String, Vec<i64>, usize)> {
        self.params.iter().map(|s| (s.name.clone(), s.var.size(), s.offset as usize)).collect()
    }

    /// The gradient of the summed cross-entropy over `x`, `y` (train mode: dropout on).
    pub fn batch_gradient(&mut self, x: &Tensor, y: &Tensor) -> BatchGrad {
        for s in &mut self.params {
            s.var.zero_grad();
        }
        let logits = self.net.forward_t(x, true);
        let loss = logits.cross_entropy_loss::<Tensor>(y, None, Reduction::Sum, -100, 0.0);
        loss.backward();
        let grads: Vec<Tensor> = self
            .params
            .iter()
            .map(|s| {
                let g = s.var.grad();
                if g.defined() {
                    g.reshape([-1])
                } else {
                    Tensor::zeros([s.numel], (self.flat.kind(), self.device()))
                }
            })
            .collect();
        let grad = if grads.is_empty() { self.flat.zeros_like() } else { Tensor::cat(&grads, 0) };
        BatchGrad { grad, loss_sum: loss.double_value(&[]), samples: y.size()[0] as usize }
    }

    /// The gradient of the summed loss over several batches, taken in order (so
    /// dropout masks follow the RNG from its current state). No batch: zeros.
    pub fn gradient_sum(&mut self, batches: impl IntoIterator<Item = (Tensor, Tensor)>) -> BatchGrad {
        let mut acc: Option<Tensor> = None;
        let (mut loss_sum, mut samples) = (0.0, 0);
        for (x, y) in batches {
            let g = self.batch_gradient(&x, &y);
            loss_sum += g.loss_sum;
            samples += g.samples;
            acc = Some(match acc {
                None => g.grad,
                Some(a) => a + g.grad,
            });
        }
        BatchGrad { grad: acc.unwrap_or_else(|| self.flat.zeros_like()), loss_sum, samples }
    }

    /// One local SGD/Adam step on the mean loss of `x`, `y`, without flattening
    /// the gradient: the optimizer reads each parameter's `.grad` where it lies.
    /// Returns the summed loss and the sample count.
    pub fn local_step(&mut self, x: &Tensor, y: &Tensor, opt: &mut crate::Optimizer) -> (f64, usize) {
        for s in &mut self.params {
            s.var.zero_grad();
        }
        let logits = self.net.forward_t(x, true);
        // The mean loss gives the mean gradient directly: no extra pass to scale it.
        let loss = logits.cross_entropy_loss::<Tensor>(y, None, Reduction::Mean, -100, 0.0);
        loss.backward();
        let n = y.size()[0] as usize;
        let parts: Vec<(i64, Tensor)> = self
            .params
            .iter()
            .map(|s| {
                let g = s.var.grad();
                (s.offset, if g.defined() { g } else { Tensor::zeros([s.numel], (self.flat.kind(), self.device())) })
            })
            .collect();
        let numel = self.flat.numel() as i64;
        opt.step_parts(&mut self.flat, &parts, 1.0, numel);
        (loss.double_value(&[]) * n as f64, n)
    }

    /// Mean loss and accuracy over `x`, `y` in eval mode, `batch` samples at a time.
    pub fn evaluate(&self, x: &Tensor, y: &Tensor, batch: usize) -> Evaluation {
        let n = y.size()[0];
        let (mut loss, mut correct) = (0f64, 0i64);
        tch::no_grad(|| {
            let mut start = 0;
            while start < n {
                let len = (batch as i64).min(n - start);
                let xb = x.narrow(0, start, len);
                let yb = y.narrow(0, start, len);
                let logits = self.net.forward_t(&xb, false);
                loss += logits
                    .cross_entropy_loss::<Tensor>(&yb, None, Reduction::Sum, -100, 0.0)
                    .double_value(&[]);
                correct += logits.argmax(-1, false).eq_tensor(&yb).sum(Kind::Int64).int64_value(&[]);
                start += len;
            }
        });
        let samples = n.max(0) as usize;
        let denom = samples.max(1) as f64;
        Evaluation { loss: loss / denom, accuracy: correct as f64 / denom, samples }
    }

    /// Copies the values of every named tensor in `tensors` into the model.
    pub fn load_named(&mut self, tensors: &[(String, Tensor)]) -> Result<(), TrainError> {
        let mut mine = self.named_tensors();
        for (name, dst) in &mut mine {
            let src = tensors
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| tch::TchError::TensorNameNotFound(name.clone(), "input".into()))?;
            if src.size() != dst.size() {
                return Err(tch::TchError::Shape(format!(
                    "{name}: model has {:?}, input has {:?}",
                    dst.size(),
                    src.size()
                ))
                .into());
            }
            tch::no_grad(|| dst.copy_(&src.to_device(self.device())));
        }
        Ok(())
    }
}

/// A split turned into tensors once, ready to be indexed by batches.
pub struct TensorData {
    pub x: Tensor,
    pub y: Tensor,
}

impl TensorData {
    pub fn new(split: &Split, kind: DatasetKind, norm: Normalization, device: Device) -> Self {
        let (x, y) = data::to_tensor(split, kind, norm, device);
        TensorData { x, y }
    }
    pub fn len(&self) -> usize {
        self.y.size()[0] as usize
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The samples at `indices`.
    pub fn batch(&self, indices: &[usize]) -> (Tensor, Tensor) {
        let idx: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
        let idx = Tensor::from_slice(&idx).to_device(self.x.device());
        (self.x.index_select(0, &idx), self.y.index_select(0, &idx))
    }
}
