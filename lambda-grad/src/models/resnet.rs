//! ResNet-18 (He et al. 2015, torchvision's `resnet18`) adapted to 32×32
//! CIFAR-style input: the 7×7 stride-2 stem convolution becomes a 3×3
//! stride-1 one and the stem max-pool is dropped, so `layer1` runs at 32×32
//! and `layer4` at 4×4. Everything else, parameter names included, is
//! torchvision's: `conv1`, `bn1`, `layer{1..4}.{0,1}.{conv1,bn1,conv2,bn2}`,
//! `layer{2,3,4}.0.downsample.{0,1}`, `fc`.
//!
//! Initialization as torchvision: Kaiming-normal (fan-out, ReLU) convolutions,
//! batch norms at weight 1 / bias 0, PyTorch's default `Linear` init for `fc`.

use tch::{nn, Tensor};

/// Kaiming-normal, fan-out, ReLU gain: torchvision's ResNet convolution init.
const CONV_INIT: nn::Init = nn::Init::Kaiming {
    dist: nn::init::NormalOrUniform::Normal,
    fan: nn::init::FanInOut::FanOut,
    non_linearity: nn::init::NonLinearity::ReLU,
};

/// A bias-free convolution (each one is followed by a batch norm).
fn conv(p: nn::Path, i: i64, o: i64, k: i64, stride: i64) -> nn::Conv2D {
    let cfg = nn::ConvConfig { stride, padding: k / 2, bias: false, ws_init: CONV_INIT, ..Default::default() };
    nn::conv2d(p, i, o, k, cfg)
}

/// PyTorch's `BatchNorm2d` (weight 1, bias 0).
fn bn(p: nn::Path, c: i64) -> nn::BatchNorm {
    nn::batch_norm2d(p, c, nn::BatchNormConfig { ws_init: nn::Init::Const(1.), ..Default::default() })
}

/// torchvision's `BasicBlock`: two 3×3 convolutions and a shortcut, projected by
/// a 1×1 convolution and a batch norm where the shape changes.
#[derive(Debug)]
struct BasicBlock {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    conv2: nn::Conv2D,
    bn2: nn::BatchNorm,
    downsample: Option<(nn::Conv2D, nn::BatchNorm)>,
}

impl BasicBlock {
    fn new(p: nn::Path, i: i64, o: i64, stride: i64) -> BasicBlock {
        let downsample = (stride != 1 || i != o).then(|| {
            let d = &p / "downsample";
            (conv(&d / 0, i, o, 1, stride), bn(&d / 1, o))
        });
        BasicBlock {
            conv1: conv(&p / "conv1", i, o, 3, stride),
            bn1: bn(&p / "bn1", o),
            conv2: conv(&p / "conv2", o, o, 3, 1),
            bn2: bn(&p / "bn2", o),
            downsample,
        }
    }
}

impl nn::ModuleT for BasicBlock {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let ys = xs.apply(&self.conv1).apply_t(&self.bn1, train).relu().apply(&self.conv2).apply_t(&self.bn2, train);
        let shortcut = match &self.downsample {
            Some((c, b)) => xs.apply(c).apply_t(b, train),
            None => xs.shallow_clone(),
        };
        (ys + shortcut).relu()
    }
}

/// ResNet-18 for `c`-channel 32×32 input and `classes` outputs.
#[allow(clippy::implied_bounds_in_impls)] // `Send` is spelled out in the signature models/mod.rs expects.
pub(crate) fn resnet18(p: &nn::Path, c: i64, classes: i64) -> impl nn::ModuleT + Send + 'static {
    let mut net = nn::seq_t().add(conv(p / "conv1", c, 64, 3, 1)).add(bn(p / "bn1", 64)).add_fn(|xs| xs.relu());
    let mut i = 64;
    for (n, (o, stride)) in [(64, 1), (128, 2), (256, 2), (512, 2)].into_iter().enumerate() {
        let layer = p / format!("layer{}", n + 1);
        net = net.add(BasicBlock::new(&layer / 0, i, o, stride)).add(BasicBlock::new(&layer / 1, o, o, 1));
        i = o;
    }
    let bound = 1. / (i as f64).sqrt();
    let fc = nn::linear(
        p / "fc",
        i,
        classes,
        nn::LinearConfig { ws_init: nn::Init::Uniform { lo: -bound, up: bound }, ..Default::default() },
    );
    net.add_fn(|xs| xs.adaptive_avg_pool2d([1, 1]).flatten(1, -1)).add(fc)
}

#[cfg(test)]
mod tests {
    use super::*;
    
    

    fn check(c: i64, expected_params: i64) {
        let (vs, vars) = super::super::testing::run_net(|p| resnet18(p, c, 10), c, "conv1.weight");

        for name in [
            "conv1.weight",
            "bn1.weight",
            "bn1.running_mean",
            "bn1.running_var",
            "layer1.0.conv1.weight",
            "layer1.1.bn2.bias",
            "layer2.0.downsample.0.weight",
            "layer2.0.downsample.1.running_var",
            "layer4.1.conv2.weight",
            "fc.weight",
            "fc.bias",
        ] {
            assert!(vars.contains_key(name), "missing {name}");
        }
        assert!(!vars.contains_key("conv1.bias"), "conv1 is followed by bn1: no bias");
        assert!(!vars.contains_key("layer1.0.downsample.0.weight"), "layer1 keeps its shape");
        assert_eq!(vars["conv1.weight"].size(), [64, c, 3, 3]);
        assert_eq!(vars["layer4.0.downsample.0.weight"].size(), [512, 256, 1, 1]);
        assert_eq!(vars["fc.weight"].size(), [10, 512]);

        let params: i64 = vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
        assert_eq!(params, expected_params);
    }

    #[test]
    fn resnet18_rgb() {
        check(3, 11_173_962);
    }

    #[test]
    fn resnet18_gray() {
        check(1, 11_172_810);
    }
}
