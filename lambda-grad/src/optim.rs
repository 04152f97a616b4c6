//! Optimizers over the flat parameter vector, with PyTorch's update rules
//! (torch.optim.SGD and torch.optim.Adam, weight decay as L2 added to the gradient).

use p2pml_proto::OptimizerKind;
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// Hyper-parameters of the update rule.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    pub lr: f64,
    /// SGD momentum (0 disables the buffer).
    pub momentum: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig { kind: OptimizerKind::Sgd, lr: 0.01, momentum: 0.9, weight_decay: 0.0, beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

/// An optimizer and its state (momentum buffer, or Adam's moments and step).
#[derive(Debug)]
pub struct Optimizer {
    cfg: OptimizerConfig,
    lr: f64,
    step: u64,
    /// SGD: [momentum]; Adam: [exp_avg, exp_avg_sq]. Empty until the first step.
    state: Vec<Tensor>,
}

impl Optimizer {
    pub fn new(cfg: OptimizerConfig) -> Self {
        Optimizer { cfg, lr: cfg.lr, step: 0, state: Vec::new() }
    }

    pub fn config(&self) -> &OptimizerConfig {
        &self.cfg
    }
    pub fn lr(&self) -> f64 {
        self.lr
    }
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// How many state vectors this optimizer keeps once it has stepped.
    pub fn state_vectors(&self) -> usize {
        match self.cfg.kind {
            OptimizerKind::Sgd if self.cfg.momentum != 0.0 => 1,
            OptimizerKind::Sgd => 0,
            OptimizerKind::Adam => 2,
        }
    }

    /// The state tensors, for checkpoints.
    pub fn state(&self) -> &[Tensor] {
        &self.state
    }
    /// Restores state saved from [`Optimizer::state`] and [`Optimizer::steps`].
    pub fn restore(&mut self, lr: f64, step: u64, state: Vec<Tensor>) {
        self.lr = lr;
        self.step = step;
        self.state = state;
    }

    /// Applies one update with the averaged gradient `grad` to `params` in place.
    pub fn step(&mut self, params: &mut Tensor, grad: &Tensor) {
        let n = params.numel() as i64;
        self.step_parts(params, &[(0, grad.shallow_clone())], 1.0, n);
    }

    /// Applies one update whose gradient is `scale` times the gradient given in
    /// parts: `(offset, tensor)` pairs covering the flat parameter vector (for
    /// example each parameter's `.grad`, which saves concatenating them). The
    /// result is bit-identical to [`Optimizer::step`] on the concatenated,
    /// scaled gradient: every operation is element-wise.
    pub fn step_parts(&mut self, params: &mut Tensor, parts: &[(i64, Tensor)], scale: f64, numel: i64) {
        let cfg = self.cfg;
        let lr = self.lr;
        let t = (self.step + 1) as i32;
        tch::no_grad(|| {
            let opts = (params.kind(), params.device());
            if self.state.is_empty() {
                let n = self.state_vectors();
                self.state = (0..n).map(|_| Tensor::zeros([numel], opts)).collect();
            }
            let first = self.step == 0;
            let scalar = |v: f64| Tensor::from(v).to_kind(opts.0).to_device(opts.1);
            for (offset, g) in parts {
                let g = g.reshape([-1]);
                let len = g.numel() as i64;
                let mut p = params.narrow(0, *offset, len);
                // d = scale·g (+ wd·p), each product rounded on its own so that the
                // result does not depend on how the gradient was split.
                let g = if scale != 1.0 { &g * scale } else { g };
                let d = if cfg.weight_decay != 0.0 {
                    let mut d = &p * cfg.weight_decay;
                    let _ = d.g_add_(&g);
                    d
                } else {
                    g
                };
                match cfg.kind {
                    OptimizerKind::Sgd => {
                        if cfg.momentum != 0.0 {
                            let mut buf = self.state[0].narrow(0, *offset, len);
                            if first {
                                buf.copy_(&d);
                            } else {
                                let _ = buf.g_mul_scalar_(cfg.momentum);
                                let _ = buf.g_add_(&d);
                            }
                            let _ = p.addcmul_(&buf, &scalar(-lr));
                        } else {
                            let _ = p.addcmul_(&d, &scalar(-lr));
                        }
                    }
                    OptimizerKind::Adam => {
                        let (b1, b2) = (cfg.beta1, cfg.beta2);
                        let mut m = self.state[0].narrow(0, *offset, len);
                        let mut v = self.state[1].narrow(0, *offset, len);
                        let _ = m.g_mul_scalar_(b1);
                        let _ = m.addcmul_(&d, &scalar(1.0 - b1));
                        let _ = v.g_mul_scalar_(b2);
                        let _ = v.addcmul_(&(&d * &d), &scalar(1.0 - b2));
                        let bc1 = 1.0 - b1.powi(t);
                        let bc2 = 1.0 - b2.powi(t);
                        let denom = (v.sqrt() / bc2.sqrt()) + cfg.eps;
                        let _ = p.addcmul_(&(&m / denom), &scalar(-(lr / bc1)));
                    }
                }
            }
        });
        self.step += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn vec(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t).unwrap()
    }

    #[test]
    fn sgd_momentum_matches_the_pytorch_rule() {
        let mut p = Tensor::from_slice(&[1.0f32, -2.0]);
        let g = Tensor::from_slice(&[0.5f32, 0.25]);
        let mut opt = Optimizer::new(OptimizerConfig { lr: 0.1, momentum: 0.9, weight_decay: 0.1, ..Default::default() });
        opt.step(&mut p, &g);
        // d = g + 0.1 p = [0.6, 0.05]; buf = d; p -= 0.1 d
        let after1 = vec(&p);
        assert!((after1[0] - 0.94).abs() < 1e-6 && (after1[1] + 2.005).abs() < 1e-6, "{after1:?}");
        opt.step(&mut p, &g);
        // d = [0.5 + 0.094, 0.25 - 0.2005]; buf = 0.9 buf + d
        let d = [0.594f32, 0.0495];
        let buf = [0.9 * 0.6 + d[0], 0.9 * 0.05 + d[1]];
        let want = [after1[0] - 0.1 * buf[0], after1[1] - 0.1 * buf[1]];
        let got = vec(&p);
        assert!((got[0] - want[0]).abs() < 1e-6 && (got[1] - want[1]).abs() < 1e-6, "{got:?} vs {want:?}");
    }

    #[test]
    fn adam_first_step_moves_by_lr() {
        let mut p = Tensor::zeros([3], (Kind::Float, Device::Cpu));
        let g = Tensor::from_slice(&[1.0f32, -3.0, 0.0]);
        let mut opt = Optimizer::new(OptimizerConfig { kind: OptimizerKind::Adam, lr: 0.01, ..Default::default() });
        opt.step(&mut p, &g);
        let got = vec(&p);
        assert!((got[0] + 0.01).abs() < 1e-6 && (got[1] - 0.01).abs() < 1e-6 && got[2] == 0.0, "{got:?}");
        assert_eq!(opt.steps(), 1);
    }
}
