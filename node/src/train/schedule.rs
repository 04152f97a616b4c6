//! One epoch's plan, the same on every peer.

use crate::config::{P2pConfig, TrainConfig};
use libp2p::PeerId;
use p2pml_lambda_grad::data::Partition;
use std::collections::HashSet;

/// One epoch's plan, the same on every peer: who trains, on which shard, for how many rounds.
pub(crate) struct Schedule {
    pub(crate) epoch: u64,
    pub(crate) first_round: u64,
    pub(crate) rounds: u64,
    /// Sorted peer ids; shard i belongs to members[i].
    pub(crate) members: Vec<PeerId>,
    pub(crate) my_index: Option<usize>,
    /// This peer's batches (indices into the training split) when it is a member.
    pub(crate) batches: Vec<Vec<usize>>,
}

impl Schedule {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cfg: &TrainConfig,
        p2p: &P2pConfig,
        n_train: usize,
        val_all: &[usize],
        epoch: u64,
        first_round: u64,
        mut members: Vec<PeerId>,
        me: PeerId,
    ) -> Result<Schedule, p2pml_lambda_grad::data::PartitionError> {
        members.sort();
        members.dedup();
        let p = members.len().max(1);
        // Shards index into the training samples that are not validation samples.
        let partition = Partition::new(n_train - cfg.val_size, 0, p, cfg.seed ^ 0x5eed)?;
        let bs = cfg.batch_size;
        let max_batches = (0..p).map(|i| partition.shard(i).map(|s| s.len().div_ceil(bs)).unwrap_or(0)).max().unwrap_or(0);
        let rounds = max_batches.div_ceil(p2p.batches_per_round).max(1) as u64;
        let my_index = members.iter().position(|x| *x == me);
        let batches = match my_index {
            Some(i) => {
                let val_set: HashSet<usize> = val_all.iter().copied().collect();
                let train_idx: Vec<usize> = (0..n_train).filter(|i| !val_set.contains(i)).collect();
                partition
                    .epoch_batches(i, epoch, bs)?
                    .into_iter()
                    .map(|b| b.into_iter().map(|i| train_idx[i]).collect())
                    .collect()
            }
            None => Vec::new(),
        };
        tracing::info!(
            "epoch {} from round {first_round}: {} members, {rounds} rounds{}",
            epoch + 1,
            members.len(),
            my_index.map(|i| format!(", shard {i} of {} batches", batches.len())).unwrap_or_default()
        );
        Ok(Schedule { epoch, first_round, rounds, members, my_index, batches })
    }
}

