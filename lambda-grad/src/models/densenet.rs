//! DenseNet-121 (Huang et al. 2016, torchvision's `densenet121`: growth rate 32,
//! blocks of 6, 12, 24 and 16 layers, bottleneck width 4 × 32, compression 0.5)
//! adapted to 32×32 CIFAR-style input: the 7×7 stride-2 stem convolution becomes
//! a 3×3 stride-1 one (64 channels, still followed by `norm0` and ReLU) and the
//! stem max-pool is dropped, so the dense blocks run at 32×32, 16×16, 8×8 and
//! 4×4 (the transitions' 2×2 average pools halve the size). Then `norm5`, ReLU,
//! global average pool and the linear classifier.
//!
//! Parameter names are torchvision's: `features.conv0`, `features.norm0`,
//! `features.denseblock{b}.denselayer{l}.{norm1,conv1,norm2,conv2}`,
//! `features.transition{t}.{norm,conv}`, `features.norm5`, `classifier`.
//!
//! Initialization as torchvision: Kaiming-normal (fan-in) convolutions, batch
//! norms at weight 1 / bias 0, classifier bias 0.

use tch::{nn, Tensor};

const GROWTH: i64 = 32;
const BLOCKS: [i64; 4] = [6, 12, 24, 16];
const BN_SIZE: i64 = 4;
const STEM: i64 = 64;

/// A bias-free convolution (each one follows a batch norm and a ReLU).
fn conv(p: nn::Path, i: i64, o: i64, k: i64) -> nn::Conv2D {
    let cfg =
        nn::ConvConfig { padding: k / 2, bias: false, ws_init: nn::init::DEFAULT_KAIMING_NORMAL, ..Default::default() };
    nn::conv2d(p, i, o, k, cfg)
}

/// PyTorch's `BatchNorm2d` (weight 1, bias 0).
fn bn(p: nn::Path, c: i64) -> nn::BatchNorm {
    nn::batch_norm2d(p, c, nn::BatchNormConfig { ws_init: nn::Init::Const(1.), ..Default::default() })
}

/// A dense layer: BN-ReLU-1×1 conv to `BN_SIZE × GROWTH`, BN-ReLU-3×3 conv to
/// `GROWTH`; its output is its input with the `GROWTH` new channels appended.
#[derive(Debug)]
struct DenseLayer {
    norm1: nn::BatchNorm,
    conv1: nn::Conv2D,
    norm2: nn::BatchNorm,
    conv2: nn::Conv2D,
}

impl DenseLayer {
    fn new(p: nn::Path, i: i64) -> DenseLayer {
        let width = BN_SIZE * GROWTH;
        DenseLayer {
            norm1: bn(&p / "norm1", i),
            conv1: conv(&p / "conv1", i, width, 1),
            norm2: bn(&p / "norm2", width),
            conv2: conv(&p / "conv2", width, GROWTH, 3),
        }
    }
}

impl nn::ModuleT for DenseLayer {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let ys = xs
            .apply_t(&self.norm1, train)
            .relu()
            .apply(&self.conv1)
            .apply_t(&self.norm2, train)
            .relu()
            .apply(&self.conv2);
        Tensor::cat(&[xs, &ys], 1)
    }
}

/// A transition: BN-ReLU-1×1 conv to `o` channels, 2×2 average pool.
fn transition(p: nn::Path, i: i64, o: i64) -> nn::SequentialT {
    nn::seq_t()
        .add(bn(&p / "norm", i))
        .add_fn(|xs| xs.relu())
        .add(conv(&p / "conv", i, o, 1))
        // Not `avg_pool2d_default`: tch passes it a divisor override of 1 (a sum pool).
        .add_fn(|xs| xs.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>))
}

/// The convolutional part (`features`), from `c` channels to the returned count.
fn features(f: &nn::Path, c: i64) -> (nn::SequentialT, i64) {
    let mut net = nn::seq_t().add(conv(f / "conv0", c, STEM, 3)).add(bn(f / "norm0", STEM)).add_fn(|xs| xs.relu());
    let mut i = STEM;
    for (b, &layers) in BLOCKS.iter().enumerate() {
        let block = f / format!("denseblock{}", b + 1);
        for l in 0..layers {
            net = net.add(DenseLayer::new(&block / format!("denselayer{}", l + 1), i));
            i += GROWTH;
        }
        if b + 1 < BLOCKS.len() {
            net = net.add(transition(f / format!("transition{}", b + 1), i, i / 2));
            i /= 2;
        }
    }
    (net.add(bn(f / "norm5", i)), i)
}

/// DenseNet-121 for `c`-channel 32×32 input and `classes` outputs.
#[allow(clippy::implied_bounds_in_impls)] // `Send` is spelled out in the signature models/mod.rs expects.
pub(crate) fn densenet121(p: &nn::Path, c: i64, classes: i64) -> impl nn::ModuleT + Send + 'static {
    let (features, i) = features(&(p / "features"), c);
    let bound = 1. / (i as f64).sqrt();
    let lin = nn::LinearConfig {
        ws_init: nn::Init::Uniform { lo: -bound, up: bound },
        bs_init: Some(nn::Init::Const(0.)),
        bias: true,
    };
    let classifier = nn::linear(p / "classifier", i, classes, lin);
    features.add_fn(|xs| xs.relu().adaptive_avg_pool2d([1, 1]).flatten(1, -1)).add(classifier)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::ModuleT;
    use tch::{Device, Kind};

    #[test]
    fn features_end_at_4x4_with_1024_channels() {
        let vs = nn::VarStore::new(Device::Cpu);
        let (f, i) = features(&(vs.root() / "features"), 3);
        assert_eq!(i, 1024);
        let xs = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        assert_eq!(tch::no_grad(|| f.forward_t(&xs, false)).size(), [2, 1024, 4, 4]);
    }

    #[test]
    fn transition_averages() {
        let vs = nn::VarStore::new(Device::Cpu);
        let t = transition(vs.root() / "t", 1, 1);
        let mut weight = vs.variables()["t.conv.weight"].shallow_clone();
        let _ = tch::no_grad(|| weight.fill_(1.));
        // Eval-mode batch norm with fresh statistics is the identity (up to eps).
        let xs = Tensor::ones([1, 1, 4, 4], (Kind::Float, Device::Cpu));
        let ys = tch::no_grad(|| t.forward_t(&xs, false));
        assert_eq!(ys.size(), [1, 1, 2, 2]);
        assert!((ys.mean(Kind::Float).double_value(&[]) - 1.).abs() < 1e-3);
    }

    fn check(c: i64, expected_params: i64) {
        let (vs, vars) = super::super::testing::run_net(|p| densenet121(p, c, 10), c, "features.conv0.weight");

        for name in [
            "features.conv0.weight",
            "features.norm0.weight",
            "features.norm0.running_mean",
            "features.denseblock1.denselayer1.norm1.weight",
            "features.denseblock1.denselayer1.conv1.weight",
            "features.denseblock1.denselayer6.norm2.running_var",
            "features.denseblock1.denselayer6.conv2.weight",
            "features.transition1.norm.weight",
            "features.transition1.conv.weight",
            "features.denseblock3.denselayer24.conv2.weight",
            "features.transition3.conv.weight",
            "features.denseblock4.denselayer16.conv2.weight",
            "features.norm5.weight",
            "features.norm5.running_var",
            "classifier.weight",
            "classifier.bias",
        ] {
            assert!(vars.contains_key(name), "missing {name}");
        }
        assert!(!vars.contains_key("features.denseblock1.denselayer7.conv1.weight"));
        assert!(!vars.contains_key("features.transition4.conv.weight"));
        assert!(!vars.contains_key("features.conv0.bias"));
        assert_eq!(vars["features.conv0.weight"].size(), [64, c, 3, 3]);
        assert_eq!(vars["features.denseblock1.denselayer6.conv1.weight"].size(), [128, 64 + 5 * 32, 1, 1]);
        assert_eq!(vars["features.denseblock1.denselayer6.conv2.weight"].size(), [32, 128, 3, 3]);
        assert_eq!(vars["features.transition1.conv.weight"].size(), [128, 256, 1, 1]);
        assert_eq!(vars["features.transition3.conv.weight"].size(), [512, 1024, 1, 1]);
        assert_eq!(vars["classifier.weight"].size(), [10, 1024]);

        let params: i64 = vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
        assert_eq!(params, expected_params);
    }

    #[test]
    fn densenet121_rgb() {
        check(3, 6_956_426);
    }

    #[test]
    fn densenet121_gray() {
        check(1, 6_955_274);
    }
}
