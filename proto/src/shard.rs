//! The sharded exchange's arithmetic, shared by every peer: how a gradient is
//! cut into one contiguous shard per member of the epoch (aligned to QSGD
//! buckets, so that encoding a shard on its own quantizes exactly the buckets
//! the whole vector would), and who owns which shard in which round (a
//! rotation over the sorted members, so that no peer always aggregates the
//! same slice, skipping the members that cannot serve).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::ops::Range;
use std::str::FromStr;

/// How a round's gradients travel (`--exchange`, part of the run spec).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Exchange {
    /// Every peer fetches every contributor's whole gradient and aggregates it all.
    #[default]
    AllToAll,
    /// Each shard is aggregated by its owner; every peer fetches the aggregated shards.
    Sharded,
}

impl Exchange {
    pub fn is_all_to_all(&self) -> bool {
        *self == Exchange::AllToAll
    }
}

impl fmt::Display for Exchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Exchange::AllToAll => "all-to-all",
            Exchange::Sharded => "sharded",
        })
    }
}

impl FromStr for Exchange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "all-to-all" => Ok(Exchange::AllToAll),
            "sharded" => Ok(Exchange::Sharded),
            other => Err(format!("unknown exchange '{other}': expected all-to-all or sharded")),
        }
    }
}

/// The most shards a gradient is cut into (and a ticket may name).
pub const MAX_SHARDS: usize = 4096;

/// Cuts `numel` values into `k` contiguous ranges that cover every index once,
/// each a whole number of `bucket`s (but the last), as even as that allows.
/// Shards past the buckets there are (more members than buckets) are empty.
pub fn cut(numel: usize, bucket: usize, k: usize) -> Vec<Range<usize>> {
    let k = k.clamp(1, MAX_SHARDS);
    let bucket = bucket.max(1);
    let buckets = numel.div_ceil(bucket);
    let (base, extra) = (buckets / k, buckets % k);
    let mut out = Vec::with_capacity(k);
    let mut b = 0;
    for j in 0..k {
        let n = base + usize::from(j < extra);
        let (lo, hi) = ((b * bucket).min(numel), ((b + n) * bucket).min(numel));
        out.push(lo..hi);
        b += n;
    }
    out
}

/// Shard `shard`'s owners of `round` in order of preference: the sorted
/// `members` rotated by round and shard. The owner is the first of them that
/// can serve; the next takes over when it dies or misses its deadline.
pub fn rotation<P: Clone>(members: &[P], round: u64, shard: usize) -> Vec<P> {
    let k = members.len();
    if k == 0 {
        return Vec::new();
    }
    let start = ((round % k as u64) as usize + shard) % k;
    (0..k).map(|i| members[(start + i) % k].clone()).collect()
}

/// The `skip`-th member of shard `shard`'s rotation that `can_own` (None if
/// there are not that many).
pub fn owner<P: Clone>(members: &[P], round: u64, shard: usize, skip: usize, can_own: impl Fn(&P) -> bool) -> Option<P> {
    rotation(members, round, shard).into_iter().filter(|p| can_own(p)).nth(skip)
}

/// The seed of the owner's encoding of an aggregated shard: the same on every
/// peer for (run seed, round, shard), whoever the owner.
pub fn aggregate_seed(run_seed: u64, round: u64, shard: usize) -> u64 {
    let mut h = mix(run_seed ^ 0x5a4d_a11e_d5ee_d000);
    for x in [round, shard as u64] {
        h = mix(h ^ x);
    }
    h
}

/// splitmix64's finalizer.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed of a contributor's encoding of one shard of its gradient.
pub fn contribution_seed(gradient_seed: u64, shard: usize) -> u64 {
    mix(gradient_seed ^ mix(shard as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_every_index_once_on_bucket_boundaries() {
        for (numel, bucket, k) in [(1_000_000, 512, 4), (1_199_882, 512, 32), (10, 4, 3), (7, 512, 5), (0, 512, 3), (4096, 1, 7), (100, 10, 10)] {
            let s = cut(numel, bucket, k);
            assert_eq!(s.len(), k);
            let mut next = 0;
            for r in &s {
                assert_eq!(r.start, next, "{numel} {bucket} {k}: contiguous");
                assert!(r.start % bucket == 0 || r.start == numel, "bucket-aligned start");
                assert!(r.end % bucket == 0 || r.end == numel, "bucket-aligned end");
                next = r.end;
            }
            assert_eq!(next, numel, "covers everything");
            let lens: Vec<usize> = s.iter().map(|r| r.len().div_ceil(bucket)).collect();
            assert!(lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1, "even: {lens:?}");
        }
    }

    #[test]
    fn ownership_rotates_and_skips_deterministically() {
        let m = ["a", "b", "c", "d"];
        // Every shard has a different owner in a round, and a shard's owner moves with the round.
        for round in 0..8 {
            let owners: std::collections::BTreeSet<_> = (0..4).map(|j| owner(&m, round, j, 0, |_| true).unwrap()).collect();
            assert_eq!(owners.len(), 4);
        }
        assert_ne!(owner(&m, 0, 0, 0, |_| true), owner(&m, 1, 0, 0, |_| true));
        // A dead owner: the next in the rotation; the same on every peer.
        let first = owner(&m, 5, 2, 0, |_| true).unwrap();
        let next = owner(&m, 5, 2, 0, |p| *p != first).unwrap();
        assert_eq!(next, rotation(&m, 5, 2)[1]);
        assert_eq!(owner(&m, 5, 2, 1, |_| true).unwrap(), next, "a missed deadline skips to the same peer");
        assert_eq!(owner(&m, 5, 2, 4, |_| true), None);
        assert_eq!(owner::<&str>(&[], 5, 2, 0, |_| true), None);
    }

    #[test]
    fn seeds_differ_by_shard_and_round() {
        assert_ne!(aggregate_seed(1, 2, 3), aggregate_seed(1, 2, 4));
        assert_ne!(aggregate_seed(1, 2, 3), aggregate_seed(1, 3, 3));
        assert_eq!(aggregate_seed(1, 2, 3), aggregate_seed(1, 2, 3));
        assert_ne!(contribution_seed(7, 0), contribution_seed(7, 1));
        assert_eq!("sharded".parse::<Exchange>(), Ok(Exchange::Sharded));
        assert!("ring".parse::<Exchange>().unwrap_err().contains("all-to-all or sharded"));
    }
}
