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
            conv1: nn::conv2d(p / "conv1", c, 32, 3, Default::default()),
            conv2: nn::conv2d(p / "conv2", 32, 64, 3, Default::default()),
            fc1: nn::linear(p / "fc1", flat, 128, Default::default()),
            fc2: nn::linear(p / "fc2", 128, classes, Default::default()),
        }
    }
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
