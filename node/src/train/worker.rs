//! The tch side of training. One thread owns the model, the optimizer and the
//! data ([`Trainer`]); the async side talks to it through a [`TrainerHandle`]:
//! compute, update, evaluate and load-state are messages with oneshot replies,
//! so tch work never runs on the async executor's threads and the trainer is
//! never moved back and forth.

use super::state::{apply_state, digest_of, state_blob, EpochInfo};
use crate::exec::TaskPlan;
use p2pml_lambda_grad::{Evaluation, Model, Optimizer, TensorData};
use p2pml_proto::task::GradOutput;
use p2pml_proto::wire::Digest;
use std::sync::Arc;
use tch::Tensor;
use tokio::sync::{mpsc, oneshot};

/// The work of one round: this peer's gradient, summed over its batches.
pub(crate) struct Computed {
    pub(crate) grad: Vec<f32>,
    pub(crate) loss_sum: f64,
    pub(crate) samples: u64,
    pub(crate) secs: f64,
}

/// Model, optimizer and data, owned by the trainer thread.
pub(crate) struct Trainer {
    pub(crate) model: Model,
    pub(crate) opt: Optimizer,
    pub(crate) train: TensorData,
    /// The test set, evaluated at every epoch's end.
    pub(crate) test: TensorData,
    pub(crate) eval_batch_size: usize,
}

/// One update of the parameters with an aggregated gradient, and the state after it.
#[derive(Debug)]
pub(crate) struct UpdateJob {
    /// The aggregated mean gradient (not applied when `samples` is 0).
    pub(crate) grad: Vec<f32>,
    pub(crate) samples: u64,
    /// Fault injection (--fault-perturb-round): corrupt one value after the step.
    pub(crate) perturb: bool,
    pub(crate) round: u64,
    pub(crate) epoch: u64,
    pub(crate) plateau: (f64, u64),
    pub(crate) stopping: (f64, u64),
    pub(crate) info: EpochInfo,
    /// Return the new parameters too (the function tier and the server serve them).
    pub(crate) keep_params: bool,
}

/// The parameters after an update: their digest, the state blob and (if asked) the values.
#[derive(Debug)]
pub(crate) struct Updated {
    pub(crate) digest: Digest,
    pub(crate) state: Vec<u8>,
    pub(crate) params: Option<Arc<Vec<f32>>>,
}

/// A state (synced or restored) to load into the model and optimizer.
pub(crate) struct LoadJob {
    pub(crate) params: Vec<f32>,
    pub(crate) opt: Vec<Vec<f32>>,
    pub(crate) lr: f64,
    pub(crate) steps: u64,
}

enum Job {
    /// Local tasks of a round; `params` first replaces the model's parameters
    /// (a worker computes at the server's).
    Compute { batches: Vec<Vec<usize>>, tasks: Vec<TaskPlan>, params: Option<Arc<Vec<f32>>>, reply: oneshot::Sender<Vec<(usize, GradOutput)>> },
    Update(Box<UpdateJob>, oneshot::Sender<Updated>),
    /// The test set, and a validation set when given.
    Evaluate { val: Option<(Tensor, Tensor)>, reply: oneshot::Sender<(Option<Evaluation>, Evaluation)> },
    Load(Box<LoadJob>, oneshot::Sender<Digest>),
    Params(oneshot::Sender<Arc<Vec<f32>>>),
    SetLr(f64),
    /// The handle is dropped: stop after the jobs queued before.
    Stop,
}

/// The trainer thread stopped (it panicked): the node cannot go on.
#[derive(Debug, thiserror::Error)]
#[error("the trainer thread stopped (see the panic above)")]
pub(crate) struct TrainerStopped;

/// The async side's owner of the trainer thread (the learning rate is the
/// core's to keep: the handle only forwards it).
pub(crate) struct TrainerHandle {
    link: TrainerLink,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A shareable link to the trainer thread, for tasks that await its answers
/// (the function tier's executor, a state sync); the thread stops when the
/// [`TrainerHandle`] is dropped.
#[derive(Clone)]
pub(crate) struct TrainerLink {
    tx: mpsc::UnboundedSender<Job>,
    numel: usize,
    opt_vectors: usize,
}

impl std::ops::Deref for TrainerHandle {
    type Target = TrainerLink;
    fn deref(&self) -> &TrainerLink {
        &self.link
    }
}

impl TrainerHandle {
    /// Starts the trainer thread with `t`.
    pub(crate) fn start(t: Trainer) -> TrainerHandle {
        let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
        let (numel, opt_vectors) = (t.model.numel(), t.opt.state_vectors());
        let thread = std::thread::Builder::new()
            .name("trainer".into())
            .spawn(move || {
                let mut t = t;
                while let Some(job) = rx.blocking_recv() {
                    if matches!(job, Job::Stop) {
                        break;
                    }
                    t.run(job);
                }
            })
            .expect("spawn the trainer thread");
        TrainerHandle { link: TrainerLink { tx, numel, opt_vectors }, thread: Some(thread) }
    }

    pub(crate) fn set_lr(&self, lr: f64) {
        let _ = self.link.tx.send(Job::SetLr(lr));
    }
    /// A link for a task.
    pub(crate) fn link(&self) -> TrainerLink {
        self.link.clone()
    }
}

impl TrainerLink {
    pub(crate) fn numel(&self) -> usize {
        self.numel
    }
    /// The optimizer's state vectors (a state to load must have as many).
    pub(crate) fn opt_vectors(&self) -> usize {
        self.opt_vectors
    }

    async fn ask<T>(&self, job: impl FnOnce(oneshot::Sender<T>) -> Job) -> Result<T, TrainerStopped> {
        self.submit(job)?.await.map_err(|_| TrainerStopped)
    }

    /// Queues a job; its answer comes on the receiver (a driver awaits it
    /// elsewhere, not in its loop).
    fn submit<T>(&self, job: impl FnOnce(oneshot::Sender<T>) -> Job) -> Result<oneshot::Receiver<T>, TrainerStopped> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(job(reply)).map_err(|_| TrainerStopped)?;
        Ok(rx)
    }

    /// [`Self::update`], answered on the receiver.
    pub(crate) fn submit_update(&self, job: UpdateJob) -> Result<oneshot::Receiver<Updated>, TrainerStopped> {
        self.submit(|reply| Job::Update(Box::new(job), reply))
    }

    /// [`Self::evaluate`], answered on the receiver.
    pub(crate) fn submit_evaluate(&self, val: Option<&TensorData>) -> Result<oneshot::Receiver<(Option<Evaluation>, Evaluation)>, TrainerStopped> {
        let val = val.map(|d| (d.x.shallow_clone(), d.y.shallow_clone()));
        self.submit(|reply| Job::Evaluate { val, reply })
    }

    pub(crate) async fn compute(&self, batches: Vec<Vec<usize>>, tasks: Vec<TaskPlan>, params: Option<Arc<Vec<f32>>>) -> Result<Vec<(usize, GradOutput)>, TrainerStopped> {
        self.ask(|reply| Job::Compute { batches, tasks, params, reply }).await
    }
    /// Loads a state; returns the digest of the parameters loaded.
    pub(crate) async fn load(&self, job: LoadJob) -> Result<Digest, TrainerStopped> {
        self.ask(|reply| Job::Load(Box::new(job), reply)).await
    }
    pub(crate) async fn params(&self) -> Result<Arc<Vec<f32>>, TrainerStopped> {
        self.ask(Job::Params).await
    }
    pub(crate) async fn digest(&self) -> Result<Digest, TrainerStopped> {
        Ok(digest_of(&self.params().await?))
    }
}

impl Drop for TrainerHandle {
    /// Closes the queue and waits for the job in progress.
    fn drop(&mut self) {
        // Links held by tasks keep the queue open: a stop job ends the thread.
        let _ = self.link.tx.send(Job::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Trainer {
    fn run(&mut self, job: Job) {
        match job {
            Job::Compute { batches, tasks, params, reply } => {
                if let Some(p) = params.filter(|_| !tasks.is_empty()) {
                    self.model.set_params(&p).expect("parameters of the model's length");
                }
                let _ = reply.send(compute_tasks(self, &batches, &tasks));
            }
            Job::Update(job, reply) => {
                let _ = reply.send(self.update(*job));
            }
            Job::Evaluate { val, reply } => {
                let bs = self.eval_batch_size;
                let v = val.map(|(x, y)| self.model.evaluate(&x, &y, bs));
                let te = self.model.evaluate(&self.test.x, &self.test.y, bs);
                let _ = reply.send((v, te));
            }
            Job::Load(job, reply) => {
                let LoadJob { params, opt, lr, steps } = *job;
                apply_state(&mut self.model, &mut self.opt, &params, &opt, lr, steps);
                let _ = reply.send(digest_of(&params));
            }
            Job::Params(reply) => {
                let _ = reply.send(Arc::new(self.model.params_vec()));
            }
            Job::SetLr(lr) => self.opt.set_lr(lr),
            Job::Stop => {}
        }
    }

    fn update(&mut self, j: UpdateJob) -> Updated {
        if j.samples > 0 {
            let g = Tensor::from_slice(&j.grad).to_device(self.model.device());
            self.opt.step(self.model.flat_params_mut(), &g);
        }
        if j.perturb {
            // Fault injection (--fault-perturb-round): silent corruption of one value.
            let mut v = self.model.params_vec();
            v[0] += 1e-3;
            self.model.set_params(&v).expect("same length");
        }
        // One copy of the parameters serves the digest and the state snapshot.
        let params = self.model.params_vec();
        let digest = digest_of(&params);
        let state = state_blob(self, &params, &j);
        Updated { digest, state, params: j.keep_params.then(|| Arc::new(params)) }
    }
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

