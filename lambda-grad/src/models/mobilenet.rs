//! MobileNetV2 (Sandler et al. 2018, width 1.0, torchvision's `mobilenet_v2`)
//! adapted to 32×32 CIFAR-style input: the stem 3×3 convolution has stride 1
//! instead of 2, and so does the second stage (t=6, c=24, n=2), so the network
//! downsamples 8× instead of 32× and ends at 4×4 before the 1×1 convolution to
//! 1280 channels, the global average pool, dropout 0.2 and the linear classifier.
//!
//! Parameter names are torchvision's: `features.0.{0,1}` (stem convolution and
//! batch norm), inverted residual blocks `features.{1..17}.conv.{j}` (expansion
//! `conv.0.{0,1}` where t ≠ 1, the depthwise `conv.{k}.{0,1}`, the linear
//! projection `conv.{k+1}` and its batch norm `conv.{k+2}`), `features.18.{0,1}`,
//! `classifier.1`.
//!
//! Initialization as torchvision: Kaiming-normal (fan-out) convolutions, batch
//! norms at weight 1 / bias 0, classifier N(0, 0.01) with zero bias.

use tch::{nn, Tensor};

/// The paper's table 2 as (t expansion, c channels, n repeats, s first stride),
/// with the CIFAR stride of 1 for the second stage.
const SETTINGS: [(i64, i64, usize, i64); 7] =
    [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)];

/// Output channels of the stem and of the last convolution.
const STEM: i64 = 32;
const LAST: i64 = 1280;

/// Kaiming-normal, fan-out: torchvision's MobileNetV2 convolution init.
const CONV_INIT: nn::Init = nn::Init::Kaiming {
    dist: nn::init::NormalOrUniform::Normal,
    fan: nn::init::FanInOut::FanOut,
    non_linearity: nn::init::NonLinearity::ReLU,
};

/// A bias-free convolution (each one is followed by a batch norm).
fn conv(p: nn::Path, i: i64, o: i64, k: i64, stride: i64, groups: i64) -> nn::Conv2D {
    let cfg = nn::ConvConfig { stride, padding: k / 2, groups, bias: false, ws_init: CONV_INIT, ..Default::default() };
    nn::conv2d(p, i, o, k, cfg)
}

/// PyTorch's `BatchNorm2d` (weight 1, bias 0).
fn bn(p: nn::Path, c: i64) -> nn::BatchNorm {
    nn::batch_norm2d(p, c, nn::BatchNormConfig { ws_init: nn::Init::Const(1.), ..Default::default() })
}

/// torchvision's `Conv2dNormActivation`: convolution `p.0`, batch norm `p.1`, ReLU6.
fn conv_bn_relu6(p: nn::Path, i: i64, o: i64, k: i64, stride: i64, groups: i64) -> nn::SequentialT {
    nn::seq_t().add(conv(&p / 0, i, o, k, stride, groups)).add(bn(&p / 1, o)).add_fn(|xs| xs.relu6())
}

/// An inverted residual block: 1×1 expansion (unless t = 1), 3×3 depthwise
/// convolution, linear 1×1 projection; a skip connection when the shape is kept.
#[derive(Debug)]
struct InvertedResidual {
    conv: nn::SequentialT,
    residual: bool,
}

impl InvertedResidual {
    fn new(p: nn::Path, i: i64, o: i64, stride: i64, t: i64) -> InvertedResidual {
        let p = &p / "conv";
        let hidden = i * t;
        let mut layers = nn::seq_t();
        let mut j = 0;
        if t != 1 {
            layers = layers.add(conv_bn_relu6(&p / j, i, hidden, 1, 1, 1));
            j += 1;
        }
        let layers = layers
            .add(conv_bn_relu6(&p / j, hidden, hidden, 3, stride, hidden))
            .add(conv(&p / (j + 1), hidden, o, 1, 1, 1))
            .add(bn(&p / (j + 2), o));
        InvertedResidual { conv: layers, residual: stride == 1 && i == o }
    }
}

impl nn::ModuleT for InvertedResidual {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let ys = xs.apply_t(&self.conv, train);
        if self.residual {
            ys + xs
        } else {
            ys
        }
    }
}

/// The convolutional part (`features`), from `c` channels to `LAST`.
fn features(f: &nn::Path, c: i64) -> nn::SequentialT {
    let mut net = nn::seq_t().add(conv_bn_relu6(f / 0, c, STEM, 3, 1, 1));
    let (mut i, mut idx) = (STEM, 1);
    for (t, o, n, s) in SETTINGS {
        for r in 0..n {
            let stride = if r == 0 { s } else { 1 };
            net = net.add(InvertedResidual::new(f / idx, i, o, stride, t));
            i = o;
            idx += 1;
        }
    }
    net.add(conv_bn_relu6(f / idx, i, LAST, 1, 1, 1))
}

/// MobileNetV2 for `c`-channel 32×32 input and `classes` outputs.
#[allow(clippy::implied_bounds_in_impls)] // `Send` is spelled out in the signature models/mod.rs expects.
pub(crate) fn mobilenet_v2(p: &nn::Path, c: i64, classes: i64) -> impl nn::ModuleT + Send + 'static {
    let lin = nn::LinearConfig {
        ws_init: nn::Init::Randn { mean: 0., stdev: 0.01 },
        bs_init: Some(nn::Init::Const(0.)),
        bias: true,
    };
    features(&(p / "features"), c)
        .add_fn_t(|xs, train| xs.adaptive_avg_pool2d([1, 1]).flatten(1, -1).dropout(0.2, train))
        .add(nn::linear(p / "classifier" / 1, LAST, classes, lin))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::ModuleT;
    use tch::{Device, Kind};

    fn check(c: i64, expected_params: i64) {
        let (vs, vars) = super::super::testing::run_net(|p| mobilenet_v2(p, c, 10), c, "features.0.0.weight");

        for name in [
            "features.0.0.weight",
            "features.0.1.weight",
            "features.0.1.running_mean",
            // t = 1: depthwise, projection, batch norm.
            "features.1.conv.0.0.weight",
            "features.1.conv.0.1.bias",
            "features.1.conv.1.weight",
            "features.1.conv.2.running_var",
            // t = 6: expansion, depthwise, projection, batch norm.
            "features.2.conv.0.0.weight",
            "features.2.conv.1.0.weight",
            "features.2.conv.2.weight",
            "features.2.conv.3.weight",
            "features.17.conv.3.running_mean",
            "features.18.0.weight",
            "features.18.1.weight",
            "classifier.1.weight",
            "classifier.1.bias",
        ] {
            assert!(vars.contains_key(name), "missing {name}");
        }
        assert!(!vars.contains_key("features.19.0.weight"));
        assert_eq!(vars["features.0.0.weight"].size(), [32, c, 3, 3]);
        assert_eq!(vars["features.1.conv.0.0.weight"].size(), [32, 1, 3, 3]);
        assert_eq!(vars["features.2.conv.1.0.weight"].size(), [96, 1, 3, 3]);
        assert_eq!(vars["features.17.conv.2.weight"].size(), [320, 960, 1, 1]);
        assert_eq!(vars["features.18.0.weight"].size(), [1280, 320, 1, 1]);
        assert_eq!(vars["classifier.1.weight"].size(), [10, 1280]);

        let params: i64 = vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
        assert_eq!(params, expected_params);
    }

    #[test]
    fn features_end_at_4x4() {
        let vs = nn::VarStore::new(Device::Cpu);
        let f = features(&(vs.root() / "features"), 3);
        let xs = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        assert_eq!(tch::no_grad(|| f.forward_t(&xs, false)).size(), [2, LAST, 4, 4]);
    }

    #[test]
    fn mobilenet_v2_rgb() {
        check(3, 2_236_682);
    }

    #[test]
    fn mobilenet_v2_gray() {
        check(1, 2_236_106);
    }
}
