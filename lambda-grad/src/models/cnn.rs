//! The PyTorch MNIST example network (DESIGN.md), with the same parameter names:
//! conv1(C→32, 3×3) ReLU, conv2(32→64, 3×3) ReLU, max-pool 2, dropout 0.25,
//! fc1(64·((H-4)/2)·((W-4)/2) → 128) ReLU, dropout 0.5, fc2(128 → classes).
//! On 28×28 input fc1 has 9216 inputs, as in PyTorch.

use tch::{nn, Tensor};

#[derive(Debug)]
pub(crate) struct Cnn {
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl Cnn {
    pub(crate) fn new(p: &nn::Path, shape: [usize; 3], classes: i64) -> Cnn {
        let [c, h, w] = shape.map(|d| d as i64);
        let flat = 64 * ((h - 4) / 2) * ((w - 4) / 2);
        Cnn {
            conv1: nn::conv2d(p / "conv1", c, 32, 3, conv_init(c * 9)),
            conv2: nn::conv2d(p / "conv2", 32, 64, 3, conv_init(32 * 9)),
            fc1: nn::linear(p / "fc1", flat, 128, linear_init(flat)),
            fc2: nn::linear(p / "fc2", 128, classes, linear_init(128)),
        }
    }
}

/// PyTorch's default initialisation of Conv2d and Linear: weights from
/// kaiming_uniform(a=√5), i.e. U(±1/√fan_in), and biases from U(±1/√fan_in).
/// (tch's default weight bound is √6 times larger, which costs accuracy here.)
fn pytorch_uniform(fan_in: i64) -> nn::Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    nn::Init::Uniform { lo: -bound, up: bound }
}

fn conv_init(fan_in: i64) -> nn::ConvConfig {
    nn::ConvConfig { ws_init: pytorch_uniform(fan_in), bs_init: pytorch_uniform(fan_in), ..Default::default() }
}

fn linear_init(fan_in: i64) -> nn::LinearConfig {
    nn::LinearConfig { ws_init: pytorch_uniform(fan_in), bs_init: Some(pytorch_uniform(fan_in)), bias: true }
}

impl nn::ModuleT for Cnn {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        xs.apply(&self.conv1)
            .relu()
            .apply(&self.conv2)
            .relu()
            .max_pool2d_default(2)
            .dropout(0.25, train)
            .flatten(1, -1)
            .apply(&self.fc1)
            .relu()
            .dropout(0.5, train)
            .apply(&self.fc2)
    }
}
