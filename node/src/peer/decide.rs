//! The P2P node's decisions above [`RoundState`](crate::round::RoundState), as
//! pure functions of what the node knows and the time (ms): who to catch up
//! from, who joins the next epoch, whose digest is the majority's, whether a
//! round closes, which stale gradients an asynchronous round applies, when the
//! run may start and when a finished node may leave. No clock, network or
//! channel here: the node's handlers gather the inputs and act on the answers,
//! and the tests below script them.
//!
//! Generic over the peer id (`PeerId` in the node, small integers in the tests).
//! Ties are broken by the smallest id, so that the same inputs give the same
//! answer on every run (maps iterate in arbitrary order).

use crate::round::Barrier;
use p2pml_proto::wire::{Digest, SyncMode};
use std::collections::{BTreeMap, BTreeSet};
use std::hash::Hash;

/// A catch-up source that could not give its state is skipped this long.
pub(crate) const CATCH_UP_RETRY_MS: u64 = 10_000;

/// What a peer's last heartbeat said.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PeerView<P> {
    pub(crate) round: u64,
    pub(crate) epoch: u64,
    pub(crate) finished: bool,
    pub(crate) ready: bool,
    /// The sender's active members of its current epoch.
    pub(crate) active: Vec<P>,
    /// The sender's process start (a change means it restarted).
    pub(crate) boot: u64,
}

/// A live, ready peer at least two rounds ahead of `round` (it will not wait
/// for us in the rounds between): the furthest, to state-sync from. A finished
/// peer holds the run's final state, so a peer left behind (the minority side
/// of a partition) catches up from it too. Sources that failed less than
/// [`CATCH_UP_RETRY_MS`] ago are skipped.
pub(crate) fn catch_up_source<P: Ord + Copy + Hash>(
    views: &BTreeMap<P, PeerView<P>>,
    round: u64,
    failed: &BTreeMap<P, u64>,
    now_ms: u64,
    alive: impl Fn(&P) -> bool,
) -> Option<P> {
    views
        .iter()
        .filter(|(p, _)| failed.get(p).is_none_or(|t| now_ms.saturating_sub(*t) > CATCH_UP_RETRY_MS))
        .filter(|(p, v)| v.ready && v.round >= round + 2 && alive(p))
        .max_by(|(a, va), (b, vb)| va.round.cmp(&vb.round).then(b.cmp(a)))
        .map(|(p, _)| *p)
}

/// The peer to join a run in progress from: the furthest live, ready peer that
/// has not finished.
pub(crate) fn join_source<P: Ord + Copy + Hash>(views: &BTreeMap<P, PeerView<P>>, alive: impl Fn(&P) -> bool) -> Option<P> {
    views
        .iter()
        .filter(|(p, v)| v.ready && !v.finished && alive(p))
        .max_by(|(a, va), (b, vb)| va.round.cmp(&vb.round).then(b.cmp(a)))
        .map(|(p, _)| *p)
}

/// The furthest round anybody told us about (heartbeats, Hello answers).
pub(crate) fn remote_round<P>(views: &BTreeMap<P, PeerView<P>>, hello_round: u64) -> u64 {
    views.values().map(|v| v.round).max().unwrap_or(0).max(hello_round)
}

/// Live, ready peers that do not train in this epoch (joiners, and members
/// demoted by a death or restart, but not those demoted for withholding in it):
/// a contributor names them for the next epoch.
pub(crate) fn ready_joiners<P: Ord + Copy + Hash>(
    live: Vec<P>,
    is_active: impl Fn(&P) -> bool,
    withheld: &BTreeMap<P, u64>,
    epoch: u64,
    views: &BTreeMap<P, PeerView<P>>,
) -> Vec<P> {
    live.into_iter()
        .filter(|p| !is_active(p) && withheld.get(p) != Some(&epoch) && views.get(p).is_some_and(|v| v.ready && !v.finished))
        .collect()
}

/// The next epoch's members: the last round's contributors and the joiners
/// they named (the same announcements on every peer), sorted. When nobody
/// contributed (every member died or restarted), the live ready peers (and
/// this one).
pub(crate) fn next_epoch_members<P: Ord + Copy + Hash>(
    last_contributors: &[P],
    named_joiners: impl Fn(&P) -> Vec<P>,
    live: Vec<P>,
    me: P,
    views: &BTreeMap<P, PeerView<P>>,
) -> Vec<P> {
    let mut members: Vec<P> = last_contributors.to_vec();
    for c in last_contributors {
        members.extend(named_joiners(c));
    }
    members.sort();
    members.dedup();
    if members.is_empty() {
        members = live.into_iter().filter(|p| *p == me || views.get(p).is_some_and(|v| v.ready && !v.finished)).collect();
    }
    members
}

/// The members of the epoch that starts now: fixed at the last round (or by
/// a state) when planned; otherwise, in synchronous mode, computed from the
/// last round; in asynchronous mode, the live peers.
pub(crate) fn epoch_members<P>(planned: Option<Vec<P>>, sync: SyncMode, from_last_round: impl FnOnce() -> Vec<P>, live: impl FnOnce() -> Vec<P>) -> Vec<P> {
    match (planned, sync) {
        (Some(m), _) => m,
        (None, SyncMode::Sync) => from_last_round(),
        (None, SyncMode::Async { .. }) => live(),
    }
}

/// A round of recent parameter digests where a strict majority of the live
/// members agree on a digest that is not ours.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Mismatch<P> {
    pub(crate) round: u64,
    pub(crate) agreeing: usize,
    /// One of the majority, to re-sync from.
    pub(crate) source: P,
}

/// Compares our digests of rounds `current - 4 ..= current` with the live members'.
pub(crate) fn digest_mismatch<P: Ord + Copy>(digests: &BTreeMap<u64, BTreeMap<P, Digest>>, me: &P, live: &[P], current: u64) -> Option<Mismatch<P>> {
    for (round, ds) in digests.range(current.saturating_sub(4)..=current) {
        let Some(mine) = ds.get(me) else { continue };
        let mut counts: BTreeMap<Digest, Vec<P>> = BTreeMap::new();
        for (p, d) in ds {
            if live.contains(p) {
                counts.entry(*d).or_default().push(*p);
            }
        }
        // The largest group; among equal ones the smallest digest (BTreeMap order).
        let major = counts.iter().rev().max_by_key(|(_, ps)| ps.len());
        if let Some((major, peers)) = major {
            if major != mine && peers.len() > live.len() / 2 {
                return Some(Mismatch { round: *round, agreeing: peers.len(), source: peers[0] });
            }
        }
    }
    None
}

/// What a synchronous round does now.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum BarrierStep<P> {
    /// Aggregate these contributors' gradients; `missing` were waited for in
    /// vain (the straggler deadline closed the round).
    Release { contributors: Vec<P>, missing: Vec<P> },
    /// Peers two rounds ahead went on without us: state-sync instead.
    CatchUp,
    /// Keep waiting; wake at this time (the straggler deadline) if nothing comes first.
    Wait { wake_at_ms: Option<u64> },
}

/// The synchronous barrier with the straggler deadline: once a quorum of the
/// round's gradients is held (`quorum_held`, first seen at `quorum_at`), the
/// missing members get `deadline_ms`; then the round closes on what arrived.
pub(crate) fn barrier_step<P>(
    barrier: Barrier<P>,
    quorum_held: Option<Vec<P>>,
    quorum_at: &mut Option<u64>,
    deadline_ms: u64,
    now_ms: u64,
    can_catch_up: bool,
) -> BarrierStep<P> {
    match barrier {
        Barrier::Release(contributors) => BarrierStep::Release { contributors, missing: Vec::new() },
        Barrier::Waiting(missing) => {
            let mut wake_at_ms = None;
            if let Some(held) = quorum_held {
                let at = *quorum_at.get_or_insert(now_ms);
                if now_ms.saturating_sub(at) >= deadline_ms {
                    return BarrierStep::Release { contributors: held, missing };
                }
                wake_at_ms = Some(at + deadline_ms);
            }
            if can_catch_up {
                BarrierStep::CatchUp
            } else {
                BarrierStep::Wait { wake_at_ms }
            }
        }
        Barrier::BelowMinPeers { .. } if can_catch_up => BarrierStep::CatchUp,
        Barrier::BelowMinPeers { .. } => BarrierStep::Wait { wake_at_ms: None },
    }
}

/// Bounded staleness: the round may go on once every expected peer has a
/// gradient of some round in `floor..=round`.
pub(crate) fn async_ready<P>(expected: &[P], holds: impl Fn(u64, &P) -> bool, floor: u64, round: u64) -> bool {
    expected.iter().all(|p| (floor..=round).any(|r| holds(r, p)))
}

/// Bounded staleness: each expected peer's freshest gradient in `floor..=round`
/// not yet applied (recorded in `applied`, which forgets rounds below `floor`).
pub(crate) fn async_select<P: Copy + Ord + Hash>(
    expected: &[P],
    holds: impl Fn(u64, &P) -> bool,
    applied: &mut BTreeSet<(u64, P)>,
    floor: u64,
    round: u64,
) -> Vec<(P, u64)> {
    let mut chosen = Vec::new();
    for p in expected {
        let fresh = (floor..=round).rev().find(|r| holds(*r, p) && !applied.contains(&(*r, *p)));
        if let Some(r) = fresh {
            applied.insert((r, *p));
            chosen.push((*p, r));
        }
    }
    applied.retain(|(r, _)| *r >= floor);
    chosen
}

/// How long a finished node waits for members it lost (declared dead, not
/// finished) to come back and take the final state: a partitioned peer that
/// returns within it catches up instead of waiting for a run that is gone.
pub(crate) const LOST_MEMBER_GRACE_MS: u64 = 10_000;

/// A finished node may leave once every other live peer has finished or passed
/// its last round (it served them what they needed), and, if members it lost
/// (`lost`: dead, not seen finished) may still come back, once it has waited
/// [`LOST_MEMBER_GRACE_MS`] since it finished (`finished_for_ms`).
pub(crate) fn may_leave<P: Ord + Hash>(live: &[P], lost: &[P], me: &P, views: &BTreeMap<P, PeerView<P>>, last: u64, finished_for_ms: u64) -> bool {
    let served = live.iter().filter(|p| *p != me).all(|p| views.get(p).is_some_and(|v| v.finished || v.round >= last));
    served && (lost.is_empty() || finished_for_ms >= LOST_MEMBER_GRACE_MS)
}

/// Members declared dead that were not seen finished: they may be partitioned away.
pub(crate) fn lost_members<P: Ord + Copy + Hash>(members: impl IntoIterator<Item = (P, bool)>, views: &BTreeMap<P, PeerView<P>>) -> Vec<P> {
    members.into_iter().filter(|(p, alive)| !alive && !views.get(p).is_some_and(|v| v.finished)).map(|(p, _)| p).collect()
}

/// Rounds of an epoch with `members` members, as [`Schedule`](crate::train::Schedule) computes them.
pub(crate) fn epoch_rounds(n_train_minus_val: usize, batch_size: usize, batches_per_round: usize, members: usize) -> u64 {
    let shard = n_train_minus_val.div_ceil(members.max(1));
    shard.div_ceil(batch_size).div_ceil(batches_per_round).max(1) as u64
}

/// A synced state after an epoch's last round that does not name the next
/// epoch's members (asynchronous mode) cannot be joined from: ask again.
pub(crate) fn state_lacks_next_epoch(round: u64, epoch_start: u64, rounds_in_epoch: u64, next_members_named: bool) -> bool {
    round + 1 >= epoch_start + rounds_in_epoch && !next_members_named
}

/// When a run starts: once `all` peers are live, or `min` are and have been
/// for `grace_ms`. Shared by the peers and the parameter server.
#[derive(Clone, Debug)]
pub(crate) struct StartRule {
    all: usize,
    min: usize,
    grace_ms: u64,
    quorum_since: Option<u64>,
}

impl StartRule {
    pub(crate) fn new(all: usize, min: usize, grace_ms: u64) -> Self {
        StartRule { all, min, grace_ms, quorum_since: None }
    }

    /// Whether to start, with `live` peers at `now_ms`. A quorum that breaks
    /// starts the grace again.
    pub(crate) fn ready(&mut self, live: usize, now_ms: u64) -> bool {
        self.quorum_since = if live >= self.min { self.quorum_since.or(Some(now_ms)) } else { None };
        live >= self.all || self.quorum_since.is_some_and(|t| now_ms.saturating_sub(t) >= self.grace_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(round: u64, ready: bool, finished: bool) -> PeerView<u32> {
        PeerView { round, epoch: 0, finished, ready, active: vec![], boot: 1 }
    }

    #[test]
    fn a_peer_two_rounds_behind_catches_up_from_the_furthest_live_ready_peer() {
        let views = BTreeMap::from([(1, view(7, true, false)), (2, view(9, true, false)), (3, view(9, true, false)), (4, view(20, false, false))]);
        let none = BTreeMap::new();
        let all = |_: &u32| true;
        assert_eq!(catch_up_source(&views, 8, &none, 0, all), None, "one round behind: it will be waited for");
        assert_eq!(catch_up_source(&views, 7, &none, 0, all), Some(2), "the furthest ready one; ties go to the smallest id");
        assert_eq!(catch_up_source(&views, 7, &none, 0, |p| *p != 2), Some(3), "only live peers");
        let failed = BTreeMap::from([(2, 1_000)]);
        assert_eq!(catch_up_source(&views, 7, &failed, 5_000, all), Some(3), "a source that just failed is skipped");
        assert_eq!(catch_up_source(&views, 7, &failed, 1_000 + CATCH_UP_RETRY_MS + 1, all), Some(2), "and tried again later");
        let finished = BTreeMap::from([(5, view(30, true, true))]);
        assert_eq!(catch_up_source(&finished, 10, &none, 0, all), Some(5), "a finished peer holds the final state");
        assert_eq!(join_source(&finished, all), None, "but nobody joins a finished run from it");
        assert_eq!(join_source(&views, all), Some(2));
        assert_eq!(remote_round(&views, 3), 20);
        assert_eq!(remote_round(&BTreeMap::<u32, PeerView<u32>>::new(), 3), 3);
    }

    #[test]
    fn the_next_epoch_is_the_last_contributors_and_the_joiners_they_named() {
        let views = BTreeMap::from([(1, view(5, true, false)), (2, view(5, true, false)), (5, view(5, true, false)), (6, view(5, false, false)), (7, view(5, true, true))]);
        // 5 is a ready joiner; 6 is not ready; 7 finished; 4 withheld this epoch.
        let active = |p: &u32| *p <= 3;
        let withheld = BTreeMap::from([(4, 2)]);
        let live = vec![1, 2, 3, 4, 5, 6, 7];
        assert_eq!(ready_joiners(live.clone(), active, &withheld, 2, &views), vec![5]);
        let views4 = BTreeMap::from([(4, view(5, true, false))]);
        assert_eq!(ready_joiners(vec![4], active, &withheld, 3, &views4), vec![4], "withholding keeps a peer out of one epoch only");
        let named = |c: &u32| if *c == 2 { vec![5] } else { vec![] };
        assert_eq!(next_epoch_members(&[3, 1, 2], named, live.clone(), 1, &views), vec![1, 2, 3, 5]);
        assert_eq!(next_epoch_members(&[], named, live, 9, &views), vec![1, 2, 5], "nobody trained: the live ready peers");
        let planned = Some(vec![8, 9]);
        assert_eq!(epoch_members(planned, SyncMode::Sync, || unreachable!(), || unreachable!()), vec![8, 9]);
        assert_eq!(epoch_members(None, SyncMode::Sync, || vec![1], || vec![2]), vec![1]);
        assert_eq!(epoch_members(None, SyncMode::Async { max_staleness: 2 }, || vec![1], || vec![2]), vec![2]);
    }

    #[test]
    fn a_strict_majority_digest_that_is_not_ours_asks_for_a_sync() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let mut d: BTreeMap<u64, BTreeMap<u32, Digest>> = BTreeMap::new();
        d.insert(10, BTreeMap::from([(0, b), (1, a), (2, a), (3, b)]));
        let live = [0, 1, 2, 3];
        assert_eq!(digest_mismatch(&d, &0, &live, 10), None, "two against two is no majority");
        d.get_mut(&10).unwrap().insert(3, a);
        assert_eq!(digest_mismatch(&d, &0, &live, 10), Some(Mismatch { round: 10, agreeing: 3, source: 1 }));
        assert_eq!(digest_mismatch(&d, &1, &live, 10), None, "we are the majority");
        assert_eq!(digest_mismatch(&d, &0, &live, 15), None, "too old to matter");
        assert_eq!(digest_mismatch(&d, &0, &[0, 1], 10), None, "dead peers do not vote: 1 of 2 is no strict majority");
    }

    #[test]
    fn the_barrier_releases_closes_on_the_deadline_or_catches_up() {
        let mut at = None;
        assert_eq!(
            barrier_step(Barrier::Release(vec![1, 2]), None, &mut at, 1000, 0, true),
            BarrierStep::Release { contributors: vec![1, 2], missing: vec![] }
        );
        // A quorum held from t=100: the deadline runs from there.
        assert_eq!(barrier_step(Barrier::Waiting(vec![3]), None, &mut at, 1000, 50, false), BarrierStep::Wait { wake_at_ms: None });
        assert_eq!(barrier_step(Barrier::Waiting(vec![3]), Some(vec![1, 2]), &mut at, 1000, 100, false), BarrierStep::Wait { wake_at_ms: Some(1100) });
        assert_eq!(barrier_step(Barrier::Waiting(vec![3]), Some(vec![1, 2]), &mut at, 1000, 900, false), BarrierStep::Wait { wake_at_ms: Some(1100) });
        assert_eq!(
            barrier_step(Barrier::Waiting(vec![3]), Some(vec![1, 2]), &mut at, 1000, 1100, false),
            BarrierStep::Release { contributors: vec![1, 2], missing: vec![3] }
        );
        let mut at = None;
        assert_eq!(barrier_step(Barrier::Waiting(vec![3]), None, &mut at, 1000, 0, true), BarrierStep::CatchUp);
        assert_eq!(barrier_step(Barrier::<u32>::BelowMinPeers { live: 1, min: 2 }, None, &mut at, 1000, 0, false), BarrierStep::Wait { wake_at_ms: None });
        assert_eq!(barrier_step(Barrier::<u32>::BelowMinPeers { live: 1, min: 2 }, None, &mut at, 1000, 0, true), BarrierStep::CatchUp);
    }

    #[test]
    fn an_asynchronous_round_applies_each_freshest_gradient_once() {
        let held: BTreeSet<(u64, u32)> = BTreeSet::from([(3, 1), (5, 1), (4, 2), (1, 3)]);
        let holds = |r: u64, p: &u32| held.contains(&(r, *p));
        assert!(!async_ready(&[1, 2, 3], holds, 3, 5), "peer 3 is more than the staleness behind");
        assert!(async_ready(&[1, 2], holds, 3, 5));
        let mut applied = BTreeSet::new();
        assert_eq!(async_select(&[1, 2], holds, &mut applied, 3, 5), vec![(1, 5), (2, 4)]);
        assert_eq!(async_select(&[1, 2], holds, &mut applied, 3, 6), vec![(1, 3)], "never the same gradient twice; an older one is still fresh");
        assert_eq!(async_select(&[1, 2], holds, &mut applied, 6, 6), vec![]);
        assert!(applied.is_empty(), "applied forgets rounds below the floor");
    }

    #[test]
    fn the_start_rule_waits_for_everyone_or_a_quorum_and_its_grace() {
        let mut s = StartRule::new(4, 2, 1000);
        assert!(!s.ready(1, 0));
        assert!(!s.ready(2, 100), "a quorum: the grace starts");
        assert!(!s.ready(3, 1000));
        assert!(s.ready(2, 1100), "quorum for the grace");
        let mut s = StartRule::new(4, 2, 1000);
        assert!(!s.ready(2, 0));
        assert!(!s.ready(1, 500), "the quorum broke");
        assert!(!s.ready(2, 1200), "the grace starts again");
        assert!(s.ready(4, 1201), "everyone is here");
    }

    #[test]
    fn a_joiner_asks_again_for_a_state_at_an_epoch_end_without_its_successors_and_a_finished_node_lingers() {
        assert_eq!(epoch_rounds(1000, 64, 1, 4), 4, "250 samples each: 4 batches");
        assert_eq!(epoch_rounds(1000, 64, 3, 4), 2);
        assert_eq!(epoch_rounds(10, 64, 1, 0), 1);
        assert!(state_lacks_next_epoch(13, 10, 4, false), "round 13 is the last of 10..14");
        assert!(!state_lacks_next_epoch(13, 10, 4, true));
        assert!(!state_lacks_next_epoch(12, 10, 4, false));
        let views = BTreeMap::from([(1, view(9, true, false)), (2, view(3, true, true))]);
        assert!(may_leave(&[0, 1, 2], &[], &0, &views, 9, 0), "1 passed our last round, 2 finished");
        assert!(!may_leave(&[0, 1, 2, 3], &[], &0, &views, 9, 0), "3 is live and silent");
        assert!(!may_leave(&[0, 1], &[], &0, &views, 10, 0));
        // 4 was declared dead (a partition?): it gets the grace to come back.
        let lost = lost_members([(0, true), (1, true), (2, false), (4, false)], &views);
        assert_eq!(lost, vec![4], "2 finished before it went");
        assert!(!may_leave(&[0, 1], &lost, &0, &views, 9, LOST_MEMBER_GRACE_MS - 1));
        assert!(may_leave(&[0, 1], &lost, &0, &views, 9, LOST_MEMBER_GRACE_MS));
    }
}
