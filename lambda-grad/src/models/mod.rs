//! The model zoo. Every model takes `[N, C, H, W]` float input and returns
//! `[N, classes]` logits; parameter names follow PyTorch's conventions
//! (`conv1.weight`, `features.0.bias`, `layer1.0.bn1.running_mean`, ...).
//!
//! `cnn` is built for the input size it is given. The seeds' ImageNet models
//! (vgg11, squeezenet1_1, mobilenet_v2, densenet121, resnet18) use their CIFAR
//! adaptations (see each module): a 3×3 stride-1 stem, no stem max-pool, and a
//! classifier sized for 32×32 input; 28×28 input is zero-padded to 32×32 and the
//! first convolution takes as many channels as the data set has.

mod cnn;
mod densenet;
mod mobilenet;
mod resnet;
mod squeezenet;
mod vgg;

use p2pml_proto::ModelKind;
use tch::nn;

/// A network of the zoo, ready for `forward_t`.
pub type Net = Box<dyn nn::ModuleT + Send>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    #[error("model {model} needs square input of at most 32×32 pixels, got {h}×{w}")]
    InputSize { model: ModelKind, h: usize, w: usize },
}

/// Zero-pads 28×28 (or any smaller square) input to 32×32 before `inner`.
#[derive(Debug)]
struct PadTo32<M> {
    pad: i64,
    inner: M,
}

impl<M: nn::ModuleT> nn::ModuleT for PadTo32<M> {
    fn forward_t(&self, xs: &tch::Tensor, train: bool) -> tch::Tensor {
        if self.pad == 0 {
            self.inner.forward_t(xs, train)
        } else {
            let p = self.pad;
            self.inner.forward_t(&xs.constant_pad_nd([p, p, p, p]), train)
        }
    }
}

/// Builds `kind` under `p` for inputs of `shape` (C, H, W) and `classes` outputs.
pub fn build(kind: ModelKind, p: &nn::Path, shape: [usize; 3], classes: usize) -> Result<Net, ModelError> {
    let [c, h, w] = shape;
    let (c, classes) = (c as i64, classes as i64);
    if kind == ModelKind::Cnn {
        return Ok(Box::new(cnn::Cnn::new(p, shape, classes)));
    }
    if h != w || !(8..=32).contains(&h) {
        return Err(ModelError::InputSize { model: kind, h, w });
    }
    let pad = ((32 - h) / 2) as i64;
    Ok(match kind {
        ModelKind::Cnn => unreachable!("handled above"),
        ModelKind::Vgg11 => Box::new(PadTo32 { pad, inner: vgg::vgg11(p, c, classes) }),
        ModelKind::Squeezenet1_1 => Box::new(PadTo32 { pad, inner: squeezenet::squeezenet1_1(p, c, classes) }),
        ModelKind::MobilenetV2 => Box::new(PadTo32 { pad, inner: mobilenet::mobilenet_v2(p, c, classes) }),
        ModelKind::Densenet121 => Box::new(PadTo32 { pad, inner: densenet::densenet121(p, c, classes) }),
        ModelKind::Resnet18 => Box::new(PadTo32 { pad, inner: resnet::resnet18(p, c, classes) }),
    })
}

/// What every zoo model's test checks first, written once.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::HashMap;
    use tch::nn::{self, ModuleT};
    use tch::{Device, Kind, Tensor};

    /// Builds a net (`build` under a fresh var store) for 2 inputs of `c`×32×32:
    /// in train mode it gives 10 logits each and a nonzero gradient reaches
    /// `first_weight`; in eval mode its logits are finite. Returns the var store
    /// and its variables, for the model's own checks.
    pub(crate) fn run_net<N: ModuleT>(build: impl FnOnce(&nn::Path) -> N, c: i64, first_weight: &str) -> (nn::VarStore, HashMap<String, Tensor>) {
        let vs = nn::VarStore::new(Device::Cpu);
        let net = build(&vs.root());
        let xs = Tensor::randn([2, c, 32, 32], (Kind::Float, Device::Cpu));
        let ys = net.forward_t(&xs, true);
        assert_eq!(ys.size(), [2, 10]);
        ys.sum(Kind::Float).backward();
        let vars = vs.variables();
        let grad = vars[first_weight].grad();
        assert!(grad.defined() && grad.abs().sum(Kind::Float).double_value(&[]) > 0., "no gradient at {first_weight}");
        let ys = tch::no_grad(|| net.forward_t(&xs, false));
        assert_eq!(ys.size(), [2, 10]);
        assert!(ys.isfinite().all().int64_value(&[]) == 1, "eval-mode logits are not finite");
        (vs, vars)
    }
}
