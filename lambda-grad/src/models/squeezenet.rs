//! SqueezeNet 1.1 (Iandola et al. 2016, torchvision's `squeezenet1_1`) adapted
//! to 32×32 CIFAR-style input: the stem is a 3×3 convolution with stride 1 and
//! padding 1 (64 outputs, as in 1.1) and the stem max-pool is dropped; the two
//! other 3×3 stride-2 ceil-mode max-pools stay where 1.1 has them, so the fire
//! modules run at 32×32, 16×16 and 8×8. The classifier is 1.1's: dropout 0.5,
//! 1×1 convolution to `classes`, ReLU, global average pool.
//!
//! Parameter names are torchvision's, indices included: `features.0` (stem),
//! fire modules `features.{3,4,6,7,9,10,11,12}.{squeeze,expand1x1,expand3x3}`
//! (index 2, the dropped stem pool, is skipped), `classifier.1`.
//!
//! Initialization as torchvision: Kaiming-uniform convolutions with zero bias,
//! the final convolution N(0, 0.01).

use tch::{nn, Tensor};

/// A convolution with bias, ReLU gain Kaiming-uniform weights and zero bias.
fn conv(p: nn::Path, i: i64, o: i64, k: i64) -> nn::Conv2D {
    nn::conv2d(p, i, o, k, nn::ConvConfig { padding: k / 2, ..Default::default() })
}

/// A fire module: a 1×1 squeeze convolution feeding 1×1 and 3×3 expand
/// convolutions whose outputs are concatenated, each followed by a ReLU.
#[derive(Debug)]
struct Fire {
    squeeze: nn::Conv2D,
    expand1x1: nn::Conv2D,
    expand3x3: nn::Conv2D,
}

impl Fire {
    fn new(p: nn::Path, i: i64, squeeze: i64, expand: i64) -> Fire {
        Fire {
            squeeze: conv(&p / "squeeze", i, squeeze, 1),
            expand1x1: conv(&p / "expand1x1", squeeze, expand, 1),
            expand3x3: conv(&p / "expand3x3", squeeze, expand, 3),
        }
    }
}

impl nn::Module for Fire {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let s = xs.apply(&self.squeeze).relu();
        Tensor::cat(&[s.apply(&self.expand1x1).relu(), s.apply(&self.expand3x3).relu()], 1)
    }
}

/// SqueezeNet 1.1's max-pool: 3×3, stride 2, ceil mode.
fn max_pool(xs: &Tensor) -> Tensor {
    xs.max_pool2d([3, 3], [2, 2], [0, 0], [1, 1], true)
}

/// SqueezeNet 1.1 for `c`-channel 32×32 input and `classes` outputs.
#[allow(clippy::implied_bounds_in_impls)] // `Send` is spelled out in the signature models/mod.rs expects.
pub(crate) fn squeezenet1_1(p: &nn::Path, c: i64, classes: i64) -> impl nn::ModuleT + Send + 'static {
    let f = p / "features";
    let fire = |idx: i64, i, s, e| Fire::new(&f / idx, i, s, e);
    let final_conv = nn::conv2d(
        p / "classifier" / 1,
        512,
        classes,
        1,
        nn::ConvConfig { ws_init: nn::Init::Randn { mean: 0., stdev: 0.01 }, ..Default::default() },
    );
    nn::seq_t()
        .add(conv(&f / 0, c, 64, 3))
        .add_fn(|xs| xs.relu())
        .add(fire(3, 64, 16, 64))
        .add(fire(4, 128, 16, 64))
        .add_fn(max_pool)
        .add(fire(6, 128, 32, 128))
        .add(fire(7, 256, 32, 128))
        .add_fn(max_pool)
        .add(fire(9, 256, 48, 192))
        .add(fire(10, 384, 48, 192))
        .add(fire(11, 384, 64, 256))
        .add(fire(12, 512, 64, 256))
        .add_fn_t(|xs, train| xs.dropout(0.5, train))
        .add(final_conv)
        .add_fn(|xs| xs.relu().adaptive_avg_pool2d([1, 1]).flatten(1, -1))
}

#[cfg(test)]
mod tests {
    use super::*;
    
    use tch::{Device, Kind};

    #[test]
    fn ceil_mode_pools_keep_the_expected_sizes() {
        let xs = Tensor::zeros([1, 1, 32, 32], (Kind::Float, Device::Cpu));
        let ys = max_pool(&xs);
        assert_eq!(ys.size(), [1, 1, 16, 16]);
        assert_eq!(max_pool(&ys).size(), [1, 1, 8, 8]);
    }

    fn check(c: i64, expected_params: i64) {
        let (vs, vars) = super::super::testing::run_net(|p| squeezenet1_1(p, c, 10), c, "features.0.weight");

        for name in [
            "features.0.weight",
            "features.0.bias",
            "features.3.squeeze.weight",
            "features.3.expand1x1.weight",
            "features.3.expand3x3.bias",
            "features.7.squeeze.weight",
            "features.12.expand3x3.weight",
            "classifier.1.weight",
            "classifier.1.bias",
        ] {
            assert!(vars.contains_key(name), "missing {name}");
        }
        assert_eq!(vars["features.0.weight"].size(), [64, c, 3, 3]);
        assert_eq!(vars["features.12.expand3x3.weight"].size(), [256, 64, 3, 3]);
        assert_eq!(vars["classifier.1.weight"].size(), [10, 512, 1, 1]);
        // Stem and final convolutions plus 8 fire modules of 3 convolutions, all with bias.
        assert_eq!(vars.len(), (2 + 8 * 3) * 2);

        let params: i64 = vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
        assert_eq!(params, expected_params);
    }

    #[test]
    fn squeezenet1_1_rgb() {
        check(3, 727_626);
    }

    #[test]
    fn squeezenet1_1_gray() {
        check(1, 726_474);
    }
}
