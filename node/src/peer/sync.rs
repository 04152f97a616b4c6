//! The peer core's state syncs: joining a run in progress, catching up when the
//! run is two rounds ahead, re-syncing on a majority digest mismatch; and the
//! schedule adopted from a state (restored or synced). The transfer itself
//! (chunks, decoding, loading into the trainer) is the driver's
//! ([`super::driver::sync_state`]); the core decides when and from whom, and
//! what the state means for the run.

use super::core::{Action, Phase, PeerCore, PeerError, SyncedState};
use super::decide;
use crate::store::StateBlob;
use crate::train::{hex, peer_ids, Schedule};
use libp2p::PeerId;
use p2pml_proto::StateHeader;

/// After a failed join sync, the next try.
const JOIN_RETRY_MS: u64 = 500;
/// A synced state that does not yet name the next epoch's members: ask again after this long.
const JOIN_AGAIN_MS: u64 = 200;

impl PeerCore {
    /// A state sync's result, for whichever phase asked for it.
    pub(super) fn on_synced(&mut self, now: u64, peer: PeerId, result: Result<SyncedState, String>, out: &mut Vec<Action>) {
        let header = match result {
            Ok(s) => Ok(self.adopt_state(peer, s)),
            Err(e) => Err(e),
        };
        match (self.phase.clone(), header) {
            (Phase::Joining { source: Some(s), .. }, Ok(h)) if s == peer => {
                self.state_syncs += 1;
                let rounds = self.epoch_rounds(h.epoch_members.len());
                if decide::state_lacks_next_epoch(h.round, h.epoch_start, rounds, !h.next_members.is_empty()) {
                    // The last round of an epoch whose next members the state does not name (asynchronous mode).
                    self.phase = Phase::Joining { source: None, retry_ms: now + JOIN_AGAIN_MS };
                    return;
                }
                self.round = h.round + 1;
                let active = self.views.get(&peer).map(|v| v.active.clone()).unwrap_or_default();
                match self.adopt_schedule(&h, &active) {
                    Ok(sched) => self.ready_to_train(now, sched, out),
                    Err(e) => self.fail(e, out),
                }
            }
            (Phase::Joining { source: Some(s), .. }, Err(e)) if s == peer => {
                tracing::warn!("state sync from {peer} failed: {e}; retrying");
                self.phase = Phase::Joining { source: None, retry_ms: now + JOIN_RETRY_MS };
            }
            (Phase::CatchingUp { source }, Ok(h)) if source == peer => {
                self.state_syncs += 1;
                self.catch_ups += 1;
                let active = self.views.get(&peer).map(|v| v.active.clone()).unwrap_or_default();
                self.round = h.round + 1;
                let sched = match self.adopt_schedule(&h, &active) {
                    Ok(s) => s,
                    Err(e) => return self.fail(e, out),
                };
                // The run's view of who trains wins over ours: peers we buried
                // while cut off (a partition) are not demoted when their
                // refutation reaches us.
                for p in peer_ids(&h.active).iter().filter(|p| active.contains(p)) {
                    self.rs.trust_alive(p, now);
                }
                for e in [sched.epoch, sched.epoch + 1] {
                    self.subscribe_epoch(e, out);
                }
                self.set_schedule(sched);
                self.phase = Phase::Next;
            }
            (Phase::CatchingUp { source }, Err(e)) if source == peer => {
                tracing::warn!("catching up from {source} failed: {e}");
                self.catch_up_failed.insert(source, now);
                // Back to the barrier: our own gradient of the round is held already.
                let round = self.round;
                self.phase = Phase::Barrier { round, quorum_ms: None };
            }
            (Phase::Resyncing { source }, r) if source == peer => {
                match r {
                    Ok(_) => {
                        self.state_syncs += 1;
                        if let Some((_, d)) = self.last_digest {
                            out.push(Action::RoundDigest(d));
                        }
                    }
                    Err(e) => tracing::warn!("state sync from {peer} failed: {e}"),
                }
                self.end_round(now, out);
            }
            // A late answer to a sync we no longer wait for: its state was
            // loaded all the same (the trainer holds it), which only happens
            // if the phase moved on by failing.
            _ => {}
        }
    }

    /// A state obtained from `peer` and loaded: the convergence state, the
    /// withholders it names, our digest, and the state to serve on.
    fn adopt_state(&mut self, peer: PeerId, s: SyncedState) -> StateHeader {
        let h = s.header;
        self.conv.restore(h.plateau, h.stopping);
        self.lr = h.lr;
        for p in peer_ids(&h.withheld) {
            self.withheld.insert(p, h.epoch);
        }
        self.last_digest = Some((h.round, s.digest));
        self.digests.entry(h.round).or_default().insert(self.s.me, s.digest);
        self.store.set_state(StateBlob { round: h.round, epoch: h.epoch, bytes: s.bytes });
        tracing::info!("state synced from {peer} at round {}: digest {}", h.round, &hex(&s.digest)[..16]);
        h
    }

    /// Rounds of an epoch with `members` members, as [`Schedule`] computes them.
    fn epoch_rounds(&self, members: usize) -> u64 {
        let s = &self.s;
        decide::epoch_rounds(s.n_train - s.cfg.val_size, s.cfg.batch_size, s.p2p.batches_per_round, members)
    }

    /// Takes the epoch's schedule from a state (restored or synced): its members
    /// keep their shards; those the state (or `source_active`, the sender's live
    /// view) does not list as active follow until the next epoch, this node too.
    pub(super) fn adopt_schedule(&mut self, h: &StateHeader, source_active: &[PeerId]) -> Result<Schedule, PeerError> {
        let me = self.s.me;
        let members = peer_ids(&h.epoch_members);
        let active = peer_ids(&h.active);
        let sched = self.schedule(h.epoch, h.epoch_start, members.clone())?;
        // Whoever the state says withheld in its epoch stays out of the next one.
        for p in peer_ids(&h.withheld) {
            self.withheld.insert(p, h.epoch);
        }
        self.stragglers.new_epoch();
        for p in &members {
            let mine = *p == me && !source_active.contains(&me);
            if !active.contains(p) || mine {
                self.rs.demote(p);
            }
        }
        if !self.rs.is_active(&me) && sched.my_index.is_some() {
            tracing::info!("following until the next epoch (this node restarted during epoch {})", h.epoch + 1);
        }
        let next = peer_ids(&h.next_members);
        self.planned_next = (!next.is_empty()).then_some(next);
        self.epoch = sched.epoch;
        Ok(sched)
    }

    /// Compares our parameter digests of recent rounds with the live members'.
    /// When a strict majority of the live members agree on a digest that is not
    /// ours, returns one of them to re-sync from.
    pub(super) fn check_digests(&mut self, current: u64) -> Option<PeerId> {
        let live = self.rs.live();
        let mismatch = decide::digest_mismatch(&self.digests, &self.s.me, &live, current);
        if let Some(m) = &mismatch {
            tracing::warn!("round {}: our parameters differ from the majority ({} of {} live peers): re-syncing", m.round, m.agreeing, live.len());
            self.digest_mismatches += 1;
            // Forget the evidence: after the sync our digest is the majority's.
            self.digests.clear();
        }
        self.digests = self.digests.split_off(&current.saturating_sub(8));
        mismatch.map(|m| m.source)
    }
}
