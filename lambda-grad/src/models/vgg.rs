//! VGG-11 (Simonyan & Zisserman 2014, configuration A) with batch norm, as
//! torchvision's `vgg11_bn`, adapted to 32×32 CIFAR-style input: the five
//! max-pools take 32×32 to 1×1, so the adaptive 7×7 average pool is dropped and
//! the classifier is 512→512→512→classes (ReLU and dropout 0.5 between) instead
//! of 25088→4096→4096→classes. Parameter names and indices are torchvision's
//! (`features.{0,4,8,11,15,18,22,25}` convolutions, the batch norm right after
//! each, `classifier.{0,3,6}`); the convolutions have no bias, as each is
//! followed by a batch norm (torchvision's `vgg11_bn` keeps a redundant one).
//!
//! Initialization as torchvision: Kaiming-normal (fan-out, ReLU) convolutions,
//! batch norms at weight 1 / bias 0, linear weights N(0, 0.01) with zero bias.

use tch::nn;

/// Configuration A: output channels of each 3×3 convolution, `None` for a 2×2 max-pool.
const CONFIG_A: [Option<i64>; 13] = [
    Some(64),
    None,
    Some(128),
    None,
    Some(256),
    Some(256),
    None,
    Some(512),
    Some(512),
    None,
    Some(512),
    Some(512),
    None,
];

/// Kaiming-normal, fan-out, ReLU gain: torchvision's VGG convolution init.
const CONV_INIT: nn::Init = nn::Init::Kaiming {
    dist: nn::init::NormalOrUniform::Normal,
    fan: nn::init::FanInOut::FanOut,
    non_linearity: nn::init::NonLinearity::ReLU,
};

/// Width of the hidden classifier layers at 32×32 input (4096 on ImageNet).
const HIDDEN: i64 = 512;

/// VGG-11 with batch norm for `c`-channel 32×32 input and `classes` outputs.
#[allow(clippy::implied_bounds_in_impls)] // `Send` is spelled out in the signature models/mod.rs expects.
pub(crate) fn vgg11(p: &nn::Path, c: i64, classes: i64) -> impl nn::ModuleT + Send + 'static {
    let f = p / "features";
    let mut net = nn::seq_t();
    let (mut i, mut idx) = (c, 0);
    for layer in CONFIG_A {
        match layer {
            Some(o) => {
                let cfg = nn::ConvConfig { padding: 1, bias: false, ws_init: CONV_INIT, ..Default::default() };
                let bn = nn::BatchNormConfig { ws_init: nn::Init::Const(1.), ..Default::default() };
                net = net
                    .add(nn::conv2d(&f / idx, i, o, 3, cfg))
                    .add(nn::batch_norm2d(&f / (idx + 1), o, bn))
                    .add_fn(|xs| xs.relu());
                i = o;
                idx += 3;
            }
            None => {
                net = net.add_fn(|xs| xs.max_pool2d_default(2));
                idx += 1;
            }
        }
    }
    let cl = p / "classifier";
    let lin = nn::LinearConfig {
        ws_init: nn::Init::Randn { mean: 0., stdev: 0.01 },
        bs_init: Some(nn::Init::Const(0.)),
        bias: true,
    };
    net.add_fn(|xs| xs.flatten(1, -1))
        .add(nn::linear(&cl / 0, i, HIDDEN, lin))
        .add_fn_t(|xs, train| xs.relu().dropout(0.5, train))
        .add(nn::linear(&cl / 3, HIDDEN, HIDDEN, lin))
        .add_fn_t(|xs, train| xs.relu().dropout(0.5, train))
        .add(nn::linear(&cl / 6, HIDDEN, classes, lin))
}

#[cfg(test)]
mod tests {
    use super::*;
    
    

    fn check(c: i64, expected_params: i64) {
        let (vs, vars) = super::super::testing::run_net(|p| vgg11(p, c, 10), c, "features.0.weight");

        for name in [
            "features.0.weight",
            "features.1.weight",
            "features.1.running_mean",
            "features.4.weight",
            "features.8.weight",
            "features.11.weight",
            "features.15.weight",
            "features.18.weight",
            "features.22.weight",
            "features.25.weight",
            "features.26.running_var",
            "classifier.0.weight",
            "classifier.3.bias",
            "classifier.6.weight",
            "classifier.6.bias",
        ] {
            assert!(vars.contains_key(name), "missing {name}");
        }
        assert!(!vars.contains_key("features.0.bias"), "convolutions followed by batch norm have no bias");
        assert_eq!(vars["features.0.weight"].size(), [64, c, 3, 3]);
        assert_eq!(vars["features.25.weight"].size(), [512, 512, 3, 3]);
        assert_eq!(vars["classifier.0.weight"].size(), [512, 512]);
        assert_eq!(vars["classifier.6.weight"].size(), [10, 512]);
        // 8 convolutions + 8 batch norms (4 tensors each) + 3 linears (2 each).
        assert_eq!(vars.len(), 8 + 8 * 4 + 3 * 2);

        let params: i64 = vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
        assert_eq!(params, expected_params);
    }

    #[test]
    fn vgg11_rgb() {
        check(3, 9_753_674);
    }

    #[test]
    fn vgg11_gray() {
        check(1, 9_752_522);
    }
}
