//! A peer's training state as it travels and is stored: digests, the state
//! blob (parameters, optimizer, schedule), checks and restore.

use crate::checkpoint::Checkpoints;
use crate::report::*;
use crate::train::*;
use libp2p::PeerId;
use p2pml_lambda_grad::{Model, Optimizer};
use p2pml_proto::wire::Digest;

/// The seed of a peer's stochastic rounding in a round: distinct per peer and
/// round, reproducible from the run seed.
pub(crate) fn gradient_seed(run_seed: u64, round: u64, peer: &PeerId) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&run_seed.to_le_bytes());
    h.update(&round.to_le_bytes());
    h.update(&peer.to_bytes());
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
}

pub(crate) fn hex(d: &Digest) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}


pub(crate) fn digest_of(v: &[f32]) -> Digest {
    let mut bytes = Vec::with_capacity(v.len() * 4);
    for x in v {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    *blake3::hash(&bytes).as_bytes()
}

/// The epoch's schedule as a state records it.
#[derive(Clone, Debug)]
pub(crate) struct EpochInfo {
    pub(crate) first_round: u64,
    /// The epoch's members (shard i belongs to members[i]).
    pub(crate) members: Vec<PeerId>,
    /// Those not demoted.
    pub(crate) active: Vec<PeerId>,
    /// After the epoch's last round: the next epoch's members.
    pub(crate) next: Vec<PeerId>,
    /// Members demoted for withholding in this epoch.
    pub(crate) withheld: Vec<PeerId>,
}

pub(crate) fn ids(peers: &[PeerId]) -> Vec<serde_bytes::ByteBuf> {
    peers.iter().map(|p| serde_bytes::ByteBuf::from(p.to_bytes())).collect()
}

pub(crate) fn peer_ids(bytes: &[serde_bytes::ByteBuf]) -> Vec<PeerId> {
    bytes.iter().filter_map(|b| PeerId::from_bytes(b).ok()).collect()
}

/// A state's header must fit this run: the optimizer's vectors, a schedule that
/// starts at or before the state's round, members named.
/// Loads the newest checkpoint that verifies and fits this run into the model,
/// optimizer and convergence state (older ones stand in for damaged ones).
pub(crate) fn restore_checkpoint(
    ckpt: &Checkpoints,
    model: &mut Model,
    opt: &mut Optimizer,
    conv: &mut Convergence,
    stats: &mut CheckpointStats,
) -> Result<Option<crate::checkpoint::Restored>, crate::checkpoint::CheckpointError> {
    let Some(r) = ckpt.latest(model.numel() as u64)? else { return Ok(None) };
    if let Err(why) = check_state(&r.header, r.opt.len(), opt.state_vectors()) {
        tracing::warn!("checkpoint of round {} does not fit this run ({why}); starting without it", r.header.round);
        return Ok(None);
    }
    for (round, why) in &r.skipped {
        tracing::warn!("checkpoint of round {round} is unusable ({why}); using an older one");
    }
    apply_state(model, opt, &r.params, &r.opt, r.header.lr, r.header.opt_steps);
    conv.restore(r.header.plateau, r.header.stopping);
    let digest = hex(&digest_of(&r.params))[..16].to_string();
    println!("{}", p2pml_proto::line::Line::Restored { round: r.header.round, epoch: r.header.epoch + 1, digest, secs: r.load_secs });
    stats.restored_round = Some(r.header.round);
    stats.restore_secs = Some(r.load_secs);
    stats.restore_skipped = r.skipped.clone();
    Ok(Some(r))
}

pub(crate) fn check_state(h: &p2pml_proto::StateHeader, opt_vectors: usize, ours: usize) -> Result<(), String> {
    if opt_vectors != ours && !(opt_vectors == 0 && h.opt_steps == 0) {
        return Err(format!("state has {opt_vectors} optimizer vectors, this optimizer has {ours}"));
    }
    if h.epoch_start > h.round || h.epoch_members.is_empty() {
        return Err(format!("state schedule is inconsistent (epoch start {}, round {}, {} members)", h.epoch_start, h.round, h.epoch_members.len()));
    }
    Ok(())
}

/// Loads parameters and optimizer state into a model and optimizer.
pub(crate) fn apply_state(model: &mut Model, opt: &mut Optimizer, params: &[f32], state: &[Vec<f32>], lr: f64, steps: u64) {
    model.set_params(params).expect("length checked by decode_state");
    let device = model.device();
    let state = state.iter().map(|v| tch::Tensor::from_slice(v).to_device(device)).collect();
    opt.restore(lr, steps, state);
}

/// The state blob of the trainer after the update `j`.
pub(crate) fn state_blob(t: &Trainer, params: &[f32], j: &UpdateJob) -> Vec<u8> {
    let opt: Vec<Vec<f32>> = t
        .opt
        .state()
        .iter()
        .map(|x| Vec::<f32>::try_from(&x.to_device(tch::Device::Cpu)).expect("f32 state"))
        .collect();
    let h = j.header(t.opt.lr(), t.opt.steps(), t.model.numel() as u64, opt.len() as u32);
    p2pml_proto::encode_state(&h, params, &opt)
}

impl UpdateJob {
    /// The header of the state after this update, with the optimizer's figures.
    pub(crate) fn header(&self, lr: f64, opt_steps: u64, numel: u64, opt_vectors: u32) -> p2pml_proto::StateHeader {
        let sched = &self.info;
        p2pml_proto::StateHeader {
            round: self.round,
            epoch: self.epoch,
            lr,
            opt_steps,
            numel,
            opt_vectors,
            plateau: self.plateau,
            stopping: self.stopping,
            epoch_start: sched.first_round,
            epoch_members: ids(&sched.members),
            active: ids(&sched.active),
            next_members: ids(&sched.next),
            withheld: ids(&sched.withheld),
        }
    }
}

