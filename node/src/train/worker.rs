//! The tch side of training: model, optimizer and data, and the gradient of a round's tasks.

use crate::exec::TaskPlan;
use p2pml_lambda_grad::{Model, Optimizer, TensorData};
use p2pml_proto::task::GradOutput;

/// The work of one round: this peer's gradient, summed over its batches.
pub(crate) struct Computed {
    pub(crate) grad: Vec<f32>,
    pub(crate) loss_sum: f64,
    pub(crate) samples: u64,
    pub(crate) secs: f64,
}

/// Model, optimizer and data: moved onto a blocking thread for each heavy step.
pub(crate) struct Trainer {
    pub(crate) model: Model,
    pub(crate) opt: Optimizer,
    pub(crate) train: TensorData,
}

/// Computes `tasks` of a round locally, each seeded as the function tier seeds
/// it: one summed gradient per task, in task order.
pub(crate) fn compute_tasks(t: &mut Trainer, batches: &[Vec<usize>], tasks: &[TaskPlan]) -> Vec<(usize, GradOutput)> {
    tasks
        .iter()
        .map(|task| {
            tch::manual_seed(task.dropout_seed as i64);
            let g = t.model.gradient_sum(batches[task.batches.clone()].iter().map(|b| t.train.batch(b)));
            let grad = Vec::<f32>::try_from(&g.grad.to_device(tch::Device::Cpu)).expect("f32 gradient");
            (task.index, GradOutput { samples: g.samples as u64, loss_sum: g.loss_sum, grad })
        })
        .collect()
}

/// Sums task outputs in task order (the same order wherever they were computed).
pub(crate) fn sum_outputs(mut outputs: Vec<(usize, GradOutput)>, numel: usize, secs: f64) -> Computed {
    outputs.sort_by_key(|(i, _)| *i);
    let mut grad = vec![0f32; numel];
    let (mut loss_sum, mut samples) = (0.0, 0u64);
    for (_, o) in &outputs {
        for (a, x) in grad.iter_mut().zip(&o.grad) {
            *a += *x;
        }
        loss_sum += o.loss_sum;
        samples += o.samples;
    }
    Computed { grad, loss_sum, samples, secs }
}

