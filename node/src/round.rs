//! The round logic as a pure state machine: membership with incarnation numbers,
//! a timeout failure detector, and the barrier's CRDT. It takes time (ms) and
//! events as inputs and never touches the network or a clock, so churn and
//! timeouts are tested without either.
//!
//! CRDT state, merged by union:
//! - membership: peer → (incarnation, alive). The higher incarnation wins; at equal
//!   incarnation a death wins over life. A peer that comes back joins with a
//!   higher incarnation and so overrides its own death.
//! - contributions: round → set of peers that announced a gradient for it.
//!
//! The barrier of round r releases when this peer *holds* the gradient of every
//! live member of the current epoch for r (holding implies the contribution).
//! Members silent for longer than the failure timeout are declared dead, so a
//! dead peer holds the others at most that long. A closed connection makes a
//! peer *suspected*: unless it is heard again (first-hand, after the messages
//! already in flight) within the suspicion grace, it is declared dead then,
//! well before the timeout. Below `min_peers` live peers (a quorum: the
//! minority side of a partition never trains on its own) nothing releases.
//! Peers that join during an epoch are members (they are heard, they follow the
//! rounds) but are expected to contribute only from the next epoch on, once the
//! epoch's member set names them. An epoch member that dies or comes back with a
//! higher incarnation is *demoted* for the rest of the epoch: it lost its place
//! in the epoch's rounds, follows like a joiner and is named for the next epoch.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Liveness of a member as this peer sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub incarnation: u64,
    pub alive: bool,
    /// When we last heard from it (ms); `None` for entries learnt second-hand.
    pub last_heard: Option<u64>,
    /// When we last heard from it first-hand (ms).
    pub direct: Option<u64>,
}

/// What happened to the membership on an input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change<P> {
    Joined(P),
    Rejoined { peer: P, incarnation: u64 },
    Died(P),
    /// Somebody declared us dead; we refuted it with this incarnation.
    Refuted { incarnation: u64 },
}

/// The barrier's verdict for a round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Barrier<P> {
    /// Aggregate these contributors' gradients (sorted).
    Release(Vec<P>),
    /// Still waiting for these live members.
    Waiting(Vec<P>),
    /// Fewer live members than `min_peers`.
    BelowMinPeers { live: usize, min: usize },
}

#[derive(Clone, Debug)]
pub struct RoundState<P: Ord + Clone> {
    me: P,
    min_peers: usize,
    timeout_ms: u64,
    members: BTreeMap<P, Member>,
    contributed: BTreeMap<u64, BTreeSet<P>>,
    held: BTreeMap<u64, BTreeSet<P>>,
    /// Who trains in the current epoch; `None` before the first epoch is fixed.
    epoch_members: Option<BTreeSet<P>>,
    /// Epoch members that died or restarted during this epoch.
    demoted: BTreeSet<P>,
    /// Suspected peers (connection closed): since when (ms).
    suspected: BTreeMap<P, u64>,
    suspect_grace_ms: u64,
}

impl<P: Ord + Clone + std::fmt::Debug> RoundState<P> {
    pub fn new(me: P, incarnation: u64, min_peers: usize, timeout_ms: u64) -> Self {
        let mut members = BTreeMap::new();
        members.insert(me.clone(), Member { incarnation, alive: true, last_heard: None, direct: None });
        RoundState {
            me,
            min_peers,
            timeout_ms,
            members,
            contributed: BTreeMap::new(),
            held: BTreeMap::new(),
            epoch_members: None,
            demoted: BTreeSet::new(),
            suspected: BTreeMap::new(),
            suspect_grace_ms: (timeout_ms / 4).max(1),
        }
    }

    pub fn me(&self) -> &P {
        &self.me
    }
    pub fn members(&self) -> &BTreeMap<P, Member> {
        &self.members
    }
    /// Live members, sorted (this peer included).
    pub fn live(&self) -> Vec<P> {
        self.members.iter().filter(|(_, m)| m.alive).map(|(p, _)| p.clone()).collect()
    }
    /// Fixes who trains in the current epoch (and forgets the last epoch's demotions).
    pub fn set_epoch_members(&mut self, members: impl IntoIterator<Item = P>) {
        self.epoch_members = Some(members.into_iter().collect());
        self.demoted.clear();
    }
    /// Named by the current epoch's member set (demoted or not).
    pub fn is_epoch_member(&self, p: &P) -> bool {
        self.epoch_members.as_ref().is_none_or(|m| m.contains(p))
    }
    /// An epoch member that has not been demoted: it trains in this epoch's rounds.
    pub fn is_active(&self, p: &P) -> bool {
        self.is_epoch_member(p) && !self.demoted.contains(p)
    }
    /// The current epoch's members that still train in it (for state sync).
    pub fn active_members(&self) -> Vec<P> {
        self.epoch_members
            .as_ref()
            .map(|m| m.iter().filter(|p| !self.demoted.contains(*p)).cloned().collect())
            .unwrap_or_default()
    }
    /// The run says `p` trains in this epoch (a state adopted by a catch-up
    /// lists it active): a death we recorded for it while cut off from the run
    /// is stale. It is alive again at the incarnation we knew, so that its next
    /// heartbeat (a higher incarnation: it refuted our rumour) is no news and
    /// does not demote it. If it is really dead, the failure detector says so again.
    pub fn trust_alive(&mut self, p: &P, now: u64) {
        if *p == self.me {
            return;
        }
        if let Some(m) = self.members.get_mut(p).filter(|m| !m.alive) {
            m.alive = true;
            m.last_heard = Some(now);
            self.suspected.remove(p);
        }
    }

    /// Takes `p` out of the current epoch's rounds (it follows until the next epoch).
    pub fn demote(&mut self, p: &P) -> bool {
        self.is_epoch_member(p) && self.epoch_members.is_some() && self.demoted.insert(p.clone())
    }
    /// Live members expected to contribute (this epoch's active members that are alive).
    pub fn expected(&self) -> Vec<P> {
        self.members
            .iter()
            .filter(|(p, m)| m.alive && self.is_active(p))
            .map(|(p, _)| p.clone())
            .collect()
    }
    pub fn is_alive(&self, p: &P) -> bool {
        self.members.get(p).is_some_and(|m| m.alive)
    }
    pub fn incarnation(&self) -> u64 {
        self.members[&self.me].incarnation
    }

    /// Direct evidence that `peer` (at `incarnation`) is alive: a heartbeat or message.
    pub fn heard(&mut self, peer: P, incarnation: u64, now: u64) -> Option<Change<P>> {
        if peer == self.me {
            return None;
        }
        let rejoined = match self.members.get_mut(&peer) {
            None => {
                self.members.insert(peer.clone(), Member { incarnation, alive: true, last_heard: Some(now), direct: Some(now) });
                return Some(Change::Joined(peer));
            }
            Some(m) if incarnation > m.incarnation || (incarnation == m.incarnation && m.alive) => {
                // Back from the dead; a higher incarnation of a live peer (it refuted
                // a rumour) is no news.
                let rejoined = !m.alive;
                m.incarnation = incarnation;
                m.alive = true;
                m.last_heard = Some(now);
                m.direct = Some(now);
                rejoined
            }
            // A message from an incarnation we already buried: stale, ignore.
            Some(_) => return None,
        };
        if !rejoined {
            return None;
        }
        self.suspected.remove(&peer);
        self.demote(&peer);
        Some(Change::Rejoined { peer, incarnation })
    }

    /// Merges another peer's view of the membership (second-hand knowledge).
    /// Deaths are adopted; second-hand life never revives a peer we buried at the
    /// same incarnation, and an unknown live peer is learnt but must still be heard.
    /// A rumour of our own death is refuted with a higher incarnation. A rumour of
    /// the death of a peer we heard first-hand within the suspicion grace is
    /// ignored: our evidence is fresher (the stale view of a healed partition's
    /// other side must not bury the peers we train with).
    pub fn merge_member(&mut self, peer: P, incarnation: u64, alive: bool, now: u64) -> Option<Change<P>> {
        if peer == self.me {
            let mine = self.members.get_mut(&self.me).expect("self is a member");
            if !alive && incarnation >= mine.incarnation {
                mine.incarnation = incarnation + 1;
                return Some(Change::Refuted { incarnation: incarnation + 1 });
            }
            return None;
        }
        let grace = self.suspect_grace_ms;
        let change = match self.members.get_mut(&peer) {
            None if alive => {
                self.members.insert(peer.clone(), Member { incarnation, alive, last_heard: Some(now), direct: None });
                return Some(Change::Joined(peer));
            }
            None => {
                self.members.insert(peer, Member { incarnation, alive, last_heard: None, direct: None });
                return None;
            }
            Some(m) if !alive && m.alive && m.direct.is_some_and(|d| now.saturating_sub(d) < grace) => return None,
            Some(m) if incarnation > m.incarnation || (incarnation == m.incarnation && !alive && m.alive) => {
                let was_alive = m.alive;
                m.incarnation = incarnation;
                m.alive = alive;
                if alive {
                    m.last_heard = Some(now);
                }
                match (was_alive, alive) {
                    (true, false) => Change::Died(peer.clone()),
                    (false, true) => Change::Rejoined { peer: peer.clone(), incarnation },
                    (true, true) | (false, false) => return None,
                }
            }
            Some(_) => return None,
        };
        self.suspected.remove(&peer);
        self.demote(&peer);
        Some(change)
    }

    /// Runs the failure detector: members silent past the timeout die, and so do
    /// suspected members not heard since the first half of their grace.
    pub fn tick(&mut self, now: u64) -> Vec<Change<P>> {
        let mut changes = Vec::new();
        let grace = self.suspect_grace_ms;
        for (p, m) in self.members.iter_mut() {
            if *p == self.me || !m.alive {
                continue;
            }
            let last = m.last_heard.unwrap_or(now);
            if m.last_heard.is_none() {
                m.last_heard = Some(now);
            }
            let suspected_dead = match self.suspected.get(p) {
                Some(&since) if now >= since + grace => {
                    // Messages already in flight when the connection closed arrive
                    // within the first half of the grace; only later ones clear it.
                    if last > since + grace / 2 {
                        self.suspected.remove(p);
                        false
                    } else {
                        true
                    }
                }
                _ => false,
            };
            if suspected_dead || now.saturating_sub(last) > self.timeout_ms {
                m.alive = false;
                self.suspected.remove(p);
                changes.push(Change::Died(p.clone()));
            }
        }
        for c in &changes {
            if let Change::Died(p) = c {
                self.demote(p);
            }
        }
        changes
    }

    /// The connection to `peer` closed: suspect it (see [`RoundState::tick`]).
    pub fn suspect(&mut self, peer: &P, now: u64) {
        if *peer != self.me && self.is_alive(peer) {
            self.suspected.entry(peer.clone()).or_insert(now);
        }
    }

    /// A connection to `peer` is open again: no longer suspected.
    pub fn unsuspect(&mut self, peer: &P) {
        self.suspected.remove(peer);
    }

    /// Marks `peer` dead at once; it may come back with a higher incarnation.
    pub fn declare_dead(&mut self, peer: &P) -> Option<Change<P>> {
        let m = self.members.get_mut(peer)?;
        if *peer == self.me || !m.alive {
            return None;
        }
        m.alive = false;
        self.suspected.remove(peer);
        self.demote(peer);
        Some(Change::Died(peer.clone()))
    }

    /// `peer` announced a gradient for `round` (first- or second-hand).
    pub fn contributed(&mut self, round: u64, peer: P) {
        self.contributed.entry(round).or_default().insert(peer);
    }

    /// We now hold `peer`'s gradient for `round`.
    pub fn hold(&mut self, round: u64, peer: P) {
        self.contributed(round, peer.clone());
        self.held.entry(round).or_default().insert(peer);
    }

    pub fn holds(&self, round: u64, peer: &P) -> bool {
        self.held.get(&round).is_some_and(|s| s.contains(peer))
    }

    /// Who contributed to `round`, as far as we know.
    pub fn contributors(&self, round: u64) -> Vec<P> {
        self.contributed.get(&round).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }

    /// The barrier of `round`.
    pub fn barrier(&self, round: u64) -> Barrier<P> {
        self.barrier_of(self.held.get(&round))
    }

    /// The barrier over a set of held inputs (a round's gradients, or in the
    /// sharded exchange the contributions to one shard).
    pub fn barrier_of(&self, held: Option<&BTreeSet<P>>) -> Barrier<P> {
        let quorum = self.members.values().filter(|m| m.alive).count();
        if quorum < self.min_peers {
            return Barrier::BelowMinPeers { live: quorum, min: self.min_peers };
        }
        let live = self.expected();
        let missing: Vec<P> = live.iter().filter(|p| !held.is_some_and(|h| h.contains(*p))).cloned().collect();
        if !missing.is_empty() {
            return Barrier::Waiting(missing);
        }
        // Everything held from members (live or dead since) counts: a gradient that
        // arrived before its sender died is as good as any other.
        let contributors = held
            .map(|h| h.iter().filter(|p| self.members.contains_key(*p)).cloned().collect())
            .unwrap_or_default();
        Barrier::Release(contributors)
    }

    /// The round's held contributors (sorted) when they are a quorum (at least
    /// `min_peers`, and at least `min_peers` members alive): what a round closed on
    /// its straggler deadline aggregates. `None` below the quorum.
    pub fn quorum_held(&self, round: u64) -> Option<Vec<P>> {
        self.quorum_of(self.held.get(&round)?)
    }

    /// [`Self::quorum_held`] over a set of held inputs.
    pub fn quorum_of(&self, held: &BTreeSet<P>) -> Option<Vec<P>> {
        let live = self.members.values().filter(|m| m.alive).count();
        let held: Vec<P> = held.iter().filter(|p| self.members.contains_key(*p)).cloned().collect();
        (live >= self.min_peers && held.len() >= self.min_peers.max(1)).then_some(held)
    }

    /// Forgets rounds before `round`.
    pub fn prune(&mut self, round: u64) {
        self.contributed = self.contributed.split_off(&round);
        self.held = self.held.split_off(&round);
    }

    /// Rounds with known contributors at or after `from` (for heartbeats).
    pub fn recent_contributions(&self, from: u64) -> Vec<(u64, Vec<P>)> {
        self.contributed.range(from..).map(|(r, s)| (*r, s.iter().cloned().collect())).collect()
    }
}

/// The straggler deadline: how long a round waits for its missing members once
/// a quorum of its gradients is held, and who keeps missing rounds.
///
/// The deadline is `factor` × the median duration of the last [`Stragglers::WINDOW`]
/// rounds that released with every expected member (round start to release),
/// clamped to `[floor_ms, cap_ms]`; before any round was observed it is the floor.
/// A member missing from `demote_after` deadline-closed rounds in a row (no round
/// it contributed to in between) is to be demoted until the next epoch.
#[derive(Clone, Debug)]
pub struct Stragglers<P: Ord + Clone> {
    factor: f64,
    floor_ms: u64,
    cap_ms: u64,
    demote_after: u32,
    recent: VecDeque<u64>,
    misses: BTreeMap<P, u32>,
}

impl<P: Ord + Clone> Stragglers<P> {
    /// Full rounds the median is taken over.
    pub const WINDOW: usize = 16;

    pub fn new(factor: f64, floor_ms: u64, cap_ms: u64, demote_after: u32) -> Self {
        Stragglers { factor, floor_ms, cap_ms: cap_ms.max(floor_ms), demote_after: demote_after.max(1), recent: VecDeque::new(), misses: BTreeMap::new() }
    }

    /// The current deadline (ms after the quorum was held).
    pub fn deadline_ms(&self) -> u64 {
        if self.recent.is_empty() {
            return self.floor_ms;
        }
        let mut v: Vec<u64> = self.recent.iter().copied().collect();
        v.sort_unstable();
        let median = v[v.len() / 2] as f64;
        ((self.factor * median).round() as u64).clamp(self.floor_ms, self.cap_ms)
    }

    /// A round that released with every expected member took `round_ms`.
    pub fn observe(&mut self, round_ms: u64) {
        if self.recent.len() == Self::WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(round_ms);
    }

    /// A round closed on `contributors`; `missing` were expected and not held
    /// (empty for a full release). Returns the members that missed
    /// `demote_after` rounds in a row (their count starts again).
    pub fn closed(&mut self, contributors: &[P], missing: &[P]) -> Vec<P> {
        for c in contributors {
            self.misses.remove(c);
        }
        let mut demote = Vec::new();
        for m in missing {
            let n = self.misses.entry(m.clone()).or_insert(0);
            *n += 1;
            if *n >= self.demote_after {
                self.misses.remove(m);
                demote.push(m.clone());
            }
        }
        demote
    }

    /// Consecutive rounds `p` has missed.
    pub fn misses(&self, p: &P) -> u32 {
        self.misses.get(p).copied().unwrap_or(0)
    }

    /// A new epoch: everyone starts with a clean record.
    pub fn new_epoch(&mut self) {
        self.misses.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_follows_the_median_full_round_within_floor_and_cap() {
        let mut s: Stragglers<u32> = Stragglers::new(4.0, 1000, 10_000, 3);
        assert_eq!(s.deadline_ms(), 1000, "nothing observed yet: the floor");
        for ms in [100, 120, 5000, 110, 130] {
            s.observe(ms); // one slow round does not move the median
        }
        assert_eq!(s.deadline_ms(), 1000, "4 x 120 ms is under the floor");
        for _ in 0..Stragglers::<u32>::WINDOW {
            s.observe(900);
        }
        assert_eq!(s.deadline_ms(), 3600, "only the last rounds count");
        for _ in 0..Stragglers::<u32>::WINDOW {
            s.observe(60_000);
        }
        assert_eq!(s.deadline_ms(), 10_000, "capped");
    }

    #[test]
    fn a_member_missing_k_rounds_in_a_row_is_demoted_and_a_contribution_resets_the_count() {
        let mut s: Stragglers<u32> = Stragglers::new(4.0, 1000, 10_000, 3);
        assert!(s.closed(&[0, 1, 2], &[3]).is_empty());
        assert!(s.closed(&[0, 1, 2], &[3]).is_empty());
        assert!(s.closed(&[0, 1, 2, 3], &[]).is_empty(), "it contributed: the count starts again");
        assert_eq!(s.misses(&3), 0);
        assert!(s.closed(&[0, 1, 2], &[3]).is_empty());
        assert!(s.closed(&[0, 1, 2], &[3]).is_empty());
        assert_eq!(s.closed(&[0, 1, 2], &[3]), vec![3]);
        assert_eq!(s.misses(&3), 0);
        s.closed(&[0, 1], &[2]);
        s.new_epoch();
        assert_eq!(s.misses(&2), 0);
    }

    #[test]
    fn a_quorum_of_held_gradients_closes_a_round_without_the_withholder() {
        let mut s = state(); // min_peers 3, members 0..4
        s.set_epoch_members([0, 1, 2, 3]);
        s.hold(4, 0);
        s.hold(4, 1);
        assert_eq!(s.quorum_held(4), None, "two of the three needed");
        s.hold(4, 2);
        assert_eq!(s.barrier(4), Barrier::Waiting(vec![3]), "the barrier itself still waits for the live member");
        assert_eq!(s.quorum_held(4), Some(vec![0, 1, 2]));
        s.declare_dead(&1);
        s.declare_dead(&2);
        assert_eq!(s.quorum_held(4), None, "below min_peers live: no quorum whatever is held");
    }

    fn state() -> RoundState<u32> {
        let mut s = RoundState::new(0, 1, 3, 2000);
        for p in 1..4 {
            assert_eq!(s.heard(p, 1, 0), Some(Change::Joined(p)));
        }
        s
    }

    #[test]
    fn releases_when_every_live_member_is_held() {
        let mut s = state();
        for p in [0, 2, 1] {
            s.hold(7, p);
            assert!(matches!(s.barrier(7), Barrier::Waiting(_)));
        }
        s.hold(7, 3);
        assert_eq!(s.barrier(7), Barrier::Release(vec![0, 1, 2, 3]));
        assert_eq!(s.barrier(8), Barrier::Waiting(vec![0, 1, 2, 3]));
    }

    #[test]
    fn a_silent_peer_is_dropped_after_the_timeout_and_never_waited_for_longer() {
        let mut s = state();
        for p in [0, 1, 2] {
            s.hold(1, p);
        }
        for t in (0..=2000).step_by(250) {
            for p in [1, 2] {
                s.heard(p, 1, t);
            }
            assert!(s.tick(t).is_empty(), "nobody dies before the timeout");
            assert_eq!(s.barrier(1), Barrier::Waiting(vec![3]));
        }
        s.heard(1, 1, 2001);
        s.heard(2, 1, 2001);
        assert_eq!(s.tick(2001), vec![Change::Died(3)]);
        assert_eq!(s.barrier(1), Barrier::Release(vec![0, 1, 2]));
        assert_eq!(s.live(), vec![0, 1, 2]);
    }

    #[test]
    fn below_min_peers_waits_instead_of_training_alone() {
        let mut s = state();
        s.declare_dead(&2);
        s.declare_dead(&3);
        s.hold(0, 0);
        s.hold(0, 1);
        assert_eq!(s.barrier(0), Barrier::BelowMinPeers { live: 2, min: 3 });
    }

    #[test]
    fn rejoin_needs_a_higher_incarnation() {
        let mut s = state();
        s.declare_dead(&3);
        assert_eq!(s.heard(3, 1, 10), None, "a late message of the dead incarnation");
        assert!(!s.is_alive(&3));
        assert_eq!(s.heard(3, 2, 20), Some(Change::Rejoined { peer: 3, incarnation: 2 }));
        assert!(s.is_alive(&3));
    }

    #[test]
    fn membership_merge_is_a_crdt() {
        // Merging the same facts in any order gives the same state.
        let facts = [(5u32, 1u64, true), (5, 1, false), (6, 2, true), (5, 2, true), (6, 1, false)];
        let mut views = Vec::new();
        for perm in [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 4, 1, 3], [1, 3, 0, 4, 2]] {
            let mut s: RoundState<u32> = RoundState::new(0, 1, 1, 1000);
            for i in perm {
                let (p, inc, alive) = facts[i];
                s.merge_member(p, inc, alive, 0);
                s.merge_member(p, inc, alive, 0); // idempotent
            }
            views.push(s.members().iter().map(|(p, m)| (*p, m.incarnation, m.alive)).collect::<Vec<_>>());
        }
        assert!(views.windows(2).all(|w| w[0] == w[1]), "{views:?}");
        assert_eq!(views[0], vec![(0, 1, true), (5, 2, true), (6, 2, true)]);
    }

    #[test]
    fn a_rumour_of_our_death_is_refuted() {
        let mut s = state();
        s.merge_member(0, 1, false, 5);
        assert_eq!(s.incarnation(), 2);
        assert!(s.is_alive(&0));
    }

    #[test]
    fn a_peer_joining_mid_epoch_is_not_waited_for_until_it_is_an_epoch_member() {
        let mut s = state();
        s.set_epoch_members([0, 1, 2, 3]);
        assert_eq!(s.heard(4, 1, 10), Some(Change::Joined(4)));
        for p in 0..4 {
            s.hold(5, p);
        }
        assert_eq!(s.barrier(5), Barrier::Release(vec![0, 1, 2, 3]));
        s.set_epoch_members([0, 1, 2, 3, 4]);
        assert_eq!(s.barrier(5), Barrier::Waiting(vec![4]));
        s.declare_dead(&1);
        assert_eq!(s.expected(), vec![0, 2, 3, 4]);
    }

    #[test]
    fn gradients_from_peers_that_died_after_sending_still_count() {
        let mut s = state();
        for p in 0..4 {
            s.hold(3, p);
        }
        s.declare_dead(&2);
        assert_eq!(s.barrier(3), Barrier::Release(vec![0, 1, 2, 3]));
        s.prune(4);
        assert!(s.contributors(3).is_empty());
    }

    #[test]
    fn a_closed_connection_is_suspected_and_dead_after_the_grace_unless_heard_later() {
        // Timeout 2000 ms: grace 500 ms.
        let mut s = state();
        s.suspect(&3, 1000);
        s.heard(3, 1, 1100); // in flight when the connection closed
        assert!(s.tick(1400).is_empty(), "not before the grace");
        assert_eq!(s.tick(1500), vec![Change::Died(3)]);
        // Heard (through others) after the first half of the grace: still alive.
        s.suspect(&2, 3000);
        s.heard(2, 1, 3300);
        s.heard(1, 1, 3300);
        assert!(s.tick(3600).is_empty());
        assert!(s.is_alive(&2));
        s.suspect(&1, 4000);
        s.unsuspect(&1);
        s.heard(2, 1, 4500);
        assert!(s.tick(4600).is_empty(), "reconnected");
        assert!(s.is_alive(&1));
    }

    #[test]
    fn a_member_that_dies_or_restarts_is_demoted_until_the_next_epoch() {
        let mut s = state();
        s.set_epoch_members([0, 1, 2, 3]);
        s.declare_dead(&3);
        assert_eq!(s.heard(3, 2, 10), Some(Change::Rejoined { peer: 3, incarnation: 2 }));
        assert!(s.is_alive(&3) && !s.is_active(&3));
        assert_eq!(s.expected(), vec![0, 1, 2], "a revived peer follows; nobody waits for it");
        assert_eq!(s.active_members(), vec![0, 1, 2]);
        s.set_epoch_members([0, 1, 2, 3]);
        assert_eq!(s.expected(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn a_peer_the_run_says_is_active_is_not_demoted_by_our_stale_record_of_its_death() {
        let mut s = state();
        s.set_epoch_members([0, 1, 2, 3]);
        // We (0) were cut off and buried 3; the run went on with it, and we
        // adopt the run's schedule by a catch-up state sync.
        s.declare_dead(&3);
        s.set_epoch_members([0, 1, 2, 3]);
        assert!(!s.is_alive(&3) && !s.expected().contains(&3), "without trust it would wait for nobody, then demote it");
        s.trust_alive(&3, 100);
        assert!(s.is_alive(&3) && s.is_active(&3));
        // It refuted our rumour: a higher incarnation of a live peer is no news.
        assert_eq!(s.heard(3, 2, 110), None);
        assert!(s.is_active(&3), "still waited for: it trains in this epoch");
        // Really dead after all: the detector buries it again.
        assert!(s.tick(110 + 10_000).contains(&Change::Died(3)));
    }

    #[test]
    fn the_quorum_counts_live_peers_not_active_ones() {
        let mut s = state(); // min_peers 3
        s.set_epoch_members([0, 1, 2, 3]);
        s.declare_dead(&3);
        s.declare_dead(&2);
        assert!(matches!(s.barrier(1), Barrier::BelowMinPeers { live: 2, min: 3 }));
        s.heard(3, 2, 50);
        s.hold(1, 0);
        s.hold(1, 1);
        assert_eq!(s.barrier(1), Barrier::Release(vec![0, 1]), "3 live (one following): quorum, two contributors");
    }

    #[test]
    fn refuting_a_rumour_keeps_us_active_and_fresh_evidence_beats_a_rumour() {
        let mut s = state();
        s.set_epoch_members([0, 1, 2, 3]);
        assert_eq!(s.merge_member(0, 1, false, 5), Some(Change::Refuted { incarnation: 2 }));
        assert!(s.is_active(&0));
        assert_eq!(s.merge_member(0, 1, false, 6), None, "an old rumour");
        // Peer 1 was heard first-hand 100 ms ago: a rumour of its death is stale.
        s.heard(1, 1, 1000);
        assert_eq!(s.merge_member(1, 1, false, 1100), None);
        assert!(s.is_alive(&1) && s.is_active(&1));
        // It refutes with a higher incarnation: no news, still active.
        assert_eq!(s.heard(1, 2, 1200), None);
        assert!(s.is_active(&1));
        // Not heard for longer than the grace: the rumour is adopted.
        assert_eq!(s.merge_member(1, 2, false, 2000), Some(Change::Died(1)));
        assert!(!s.is_active(&1));
    }
}
