//! The deterministic split of a training set: a validation set, then one disjoint
//! shard per peer, then each shard's batches for each epoch, all derived from one
//! seed so that every peer computes the same partition without talking.

use p2pml_proto::Rng;

const PARTITION_STREAM: u64 = 0x5041_5254; // "PART"
const EPOCH_STREAM: u64 = 0x4550_4f43; // "EPOC"

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PartitionError {
    #[error("cannot split {samples} training samples into a validation set of {val} and {peers} peer shards: lower --val-size or --peers")]
    TooSmall { samples: usize, val: usize, peers: usize },
    #[error("the number of peers must be at least 1")]
    NoPeers,
    #[error("peer index {peer} is out of range for {peers} peers")]
    PeerOutOfRange { peer: usize, peers: usize },
    #[error("batch size must be at least 1")]
    ZeroBatch,
}

/// Validation indices and per-peer shards of a training set of `samples` items.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    seed: u64,
    validation: Vec<usize>,
    shards: Vec<Vec<usize>>,
}

impl Partition {
    /// Shuffles `0..samples` with `seed`, takes the first `val` as the validation
    /// set and cuts the rest into `peers` contiguous shards whose sizes differ by at
    /// most one.
    pub fn new(samples: usize, val: usize, peers: usize, seed: u64) -> Result<Self, PartitionError> {
        if peers == 0 {
            return Err(PartitionError::NoPeers);
        }
        if samples < val + peers {
            return Err(PartitionError::TooSmall { samples, val, peers });
        }
        let mut perm: Vec<usize> = (0..samples).collect();
        Rng::derive(seed, &[PARTITION_STREAM]).shuffle(&mut perm);
        let validation = perm[..val].to_vec();
        let rest = &perm[val..];
        let (base, extra) = (rest.len() / peers, rest.len() % peers);
        let mut shards = Vec::with_capacity(peers);
        let mut start = 0;
        for p in 0..peers {
            let len = base + usize::from(p < extra);
            shards.push(rest[start..start + len].to_vec());
            start += len;
        }
        Ok(Partition { seed, validation, shards })
    }

    pub fn validation(&self) -> &[usize] {
        &self.validation
    }

    pub fn peers(&self) -> usize {
        self.shards.len()
    }

    pub fn shard(&self, peer: usize) -> Result<&[usize], PartitionError> {
        self.shards
            .get(peer)
            .map(Vec::as_slice)
            .ok_or(PartitionError::PeerOutOfRange { peer, peers: self.shards.len() })
    }

    /// The batches of `peer`'s shard in `epoch`: the shard reshuffled with a stream
    /// derived from (seed, epoch, peer), cut into batches of `batch_size` (the last
    /// one may be smaller, as PyTorch's DataLoader does by default).
    pub fn epoch_batches(&self, peer: usize, epoch: u64, batch_size: usize) -> Result<Vec<Vec<usize>>, PartitionError> {
        if batch_size == 0 {
            return Err(PartitionError::ZeroBatch);
        }
        let mut order = self.shard(peer)?.to_vec();
        Rng::derive(self.seed, &[EPOCH_STREAM, epoch, peer as u64]).shuffle(&mut order);
        Ok(order.chunks(batch_size).map(<[usize]>::to_vec).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn shards_are_disjoint_and_cover_the_training_set() {
        for (n, val, peers) in [(1000, 100, 4), (1003, 0, 3), (60_000, 5000, 8), (10, 2, 8)] {
            let p = Partition::new(n, val, peers, 7).unwrap();
            let mut seen = HashSet::new();
            for &i in p.validation() {
                assert!(seen.insert(i), "duplicate {i}");
            }
            let mut sizes = vec![];
            for s in 0..peers {
                let shard = p.shard(s).unwrap();
                sizes.push(shard.len());
                for &i in shard {
                    assert!(seen.insert(i), "index {i} in two places");
                }
            }
            assert_eq!(seen.len(), n, "every sample is used exactly once");
            assert!(seen.iter().all(|&i| i < n));
            assert_eq!(p.validation().len(), val);
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{sizes:?}");
        }
    }

    #[test]
    fn deterministic_in_the_seed() {
        let a = Partition::new(5000, 500, 4, 1).unwrap();
        assert_eq!(a, Partition::new(5000, 500, 4, 1).unwrap());
        assert_ne!(a, Partition::new(5000, 500, 4, 2).unwrap());
        assert_eq!(a.epoch_batches(2, 3, 64).unwrap(), a.epoch_batches(2, 3, 64).unwrap());
        assert_ne!(a.epoch_batches(2, 3, 64).unwrap(), a.epoch_batches(2, 4, 64).unwrap());
    }

    #[test]
    fn epoch_batches_cover_the_shard() {
        let p = Partition::new(1000, 0, 3, 5).unwrap();
        let batches = p.epoch_batches(1, 0, 64).unwrap();
        assert_eq!(batches.len(), 333usize.div_ceil(64));
        assert!(batches[..batches.len() - 1].iter().all(|b| b.len() == 64));
        let mut all: Vec<usize> = batches.concat();
        all.sort_unstable();
        let mut shard = p.shard(1).unwrap().to_vec();
        shard.sort_unstable();
        assert_eq!(all, shard);
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert_eq!(Partition::new(10, 0, 0, 1), Err(PartitionError::NoPeers));
        assert!(matches!(Partition::new(10, 8, 3, 1), Err(PartitionError::TooSmall { .. })));
        let p = Partition::new(10, 0, 2, 1).unwrap();
        assert!(p.shard(2).is_err());
        assert_eq!(p.epoch_batches(0, 0, 0), Err(PartitionError::ZeroBatch));
    }
}
