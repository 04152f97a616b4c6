//! Joining a run in progress, state sync, digest checks and schedules adopted from a state.

use crate::config::{P2pConfig, TrainConfig};
use crate::store::{chunks, StateBlob};
use crate::report::*;
use crate::train::*;
use anyhow::bail;
use libp2p::PeerId;
use p2pml_proto::wire::{self, Request, Response};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use super::node::*;
use super::decide;

impl Node {
    /// The furthest round another peer has told us about.
    pub(super) fn scores_report(&self) -> BTreeMap<String, ScoreSeen> {
        self.scores.iter().map(|(p, s)| (p.to_string(), *s)).collect()
    }

    pub(super) fn remote_round(&self) -> u64 {
        decide::remote_round(&self.views, self.hello_round)
    }

    /// Live, ready peers that do not train in this epoch: they are named for the next epoch.
    pub(super) fn ready_joiners(&self) -> Vec<PeerId> {
        decide::ready_joiners(self.rs.live(), |p| self.rs.is_active(p), &self.withheld, self.epoch, &self.views)
    }

    /// The members of the next epoch: the last round's contributors and the
    /// joiners they named (the same announcements on every peer).
    pub(super) fn next_epoch_members(&self, last_round: u64) -> Vec<PeerId> {
        let named = |c: &PeerId| self.announces.get(&(last_round, *c)).map(|a| peer_ids(&a.joiners)).unwrap_or_default();
        decide::next_epoch_members(&self.last_contributors, named, self.rs.live(), self.client.peer_id, &self.views)
    }

    /// Joins a run in progress: adopts the furthest running peer's latest state.
    /// Returns the state's header and that peer's active members of the epoch
    /// (a restarted member is not among them: it follows until the next epoch).
    pub(super) async fn join_running(&mut self, t: &mut TrainerHandle, conv: &mut Convergence) -> anyhow::Result<(p2pml_proto::StateHeader, Vec<PeerId>)> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if Instant::now() > deadline {
                bail!("could not obtain the run's state within 120 s");
            }
            let source = decide::join_source(&self.views, |p| self.rs.is_alive(p));
            let Some(source) = source else {
                self.pump().await?;
                continue;
            };
            tracing::info!("the run is in progress: syncing state from {source}");
            let r = self.sync_state(source, 0, t, conv).await?;
            let header = match r {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!("state sync from {source} failed: {e}; retrying");
                    let pause = tokio::time::sleep(Duration::from_millis(500));
                    self.while_pumping(pause).await?;
                    continue;
                }
            };
            let rounds = self.epoch_rounds(header.epoch_members.len());
            if decide::state_lacks_next_epoch(header.round, header.epoch_start, rounds, !header.next_members.is_empty()) {
                // The last round of an epoch whose next members the state does not name (asynchronous mode).
                let pause = tokio::time::sleep(Duration::from_millis(200));
                self.while_pumping(pause).await?;
                continue;
            }
            self.round = header.round + 1;
            let active = self.views.get(&source).map(|v| v.active.clone()).unwrap_or_default();
            return Ok((header, active));
        }
    }

    /// Rounds of an epoch with `members` members, as [`Schedule`] computes them.
    pub(super) fn epoch_rounds(&self, members: usize) -> u64 {
        decide::epoch_rounds(self.n_train_minus_val, self.batch_size, self.p2p.batches_per_round, members)
    }

    /// Takes the epoch's schedule from a state (restored or synced): its members
    /// keep their shards; those the state (or `source_active`, the sender's live
    /// view) does not list as active follow until the next epoch, this node too.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn adopt_schedule(
        &mut self,
        cfg: &TrainConfig,
        p2p: &P2pConfig,
        n_train: usize,
        val_all: &[usize],
        h: &p2pml_proto::StateHeader,
        source_active: &[PeerId],
    ) -> anyhow::Result<Schedule> {
        let me = self.client.peer_id;
        let members = peer_ids(&h.epoch_members);
        let active = peer_ids(&h.active);
        let sched = Schedule::new(cfg, p2p, n_train, val_all, h.epoch, h.epoch_start, members.clone(), me)?;
        self.rs.set_epoch_members(sched.members.clone());
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
        let mismatch = decide::digest_mismatch(&self.digests, &self.client.peer_id, &live, current);
        if let Some(m) = &mismatch {
            tracing::warn!("round {}: our parameters differ from the majority ({} of {} live peers): re-syncing", m.round, m.agreeing, live.len());
            self.digest_mismatches += 1;
        }
        let resync = mismatch.map(|m| m.source);
        if resync.is_some() {
            // Forget the evidence: after the sync our digest is the majority's.
            self.digests.clear();
        }
        self.digests = self.digests.split_off(&current.saturating_sub(8));
        resync
    }

    /// Replaces our state with `peer`'s state after round `min_round` or later
    /// (exactly `min_round` when re-syncing: the peer cannot pass round + 1
    /// before we announce it). Returns the adopted state's header.
    pub(super) async fn sync_state(
        &mut self,
        peer: PeerId,
        min_round: u64,
        t: &mut TrainerHandle,
        conv: &mut Convergence,
    ) -> anyhow::Result<Result<p2pml_proto::StateHeader, String>> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let (round, total_len, data) = loop {
            let client = self.client.clone();
            let r = async move { client.request(peer, Request::State { round: min_round, index: 0 }).await };
            match self.while_pumping(r).await? {
                Ok(Response::State { round: r, total_len, data, .. }) if r >= min_round => break (r, total_len, data),
                Ok(_) | Err(_) if Instant::now() < deadline => {
                    let pause = tokio::time::sleep(Duration::from_millis(100));
                    self.while_pumping(pause).await?;
                }
                Ok(other) => return Ok(Err(format!("no state for round {min_round}: {other:?}"))),
                Err(e) => return Ok(Err(e.to_string())),
            }
        };
        if total_len > wire::MAX_BLOB_BYTES * 3 {
            return Ok(Err(format!("state of {total_len} bytes is too large")));
        }
        let mut bytes = data.into_vec();
        for index in 1..chunks(total_len) {
            let client = self.client.clone();
            let r = async move { client.request(peer, Request::State { round, index }).await };
            match self.while_pumping(r).await? {
                Ok(Response::State { round: r, data, .. }) if r == round => bytes.extend_from_slice(&data),
                other => return Ok(Err(format!("state chunk {index}: {other:?}"))),
            }
        }
        let numel = t.numel() as u64;
        let (h, params, opt) = match p2pml_proto::decode_state(&bytes, numel) {
            Ok(x) => x,
            Err(e) => return Ok(Err(e.to_string())),
        };
        if h.round != round {
            return Ok(Err(format!("state header says round {}, chunks say {round}", h.round)));
        }
        if let Err(e) = check_state(&h, opt.len(), t.opt_vectors()) {
            return Ok(Err(e));
        }
        let (lr, steps) = (h.lr, h.opt_steps);
        let digest = self.while_pumping(t.load(LoadJob { params, opt, lr, steps })).await??;
        conv.restore(h.plateau, h.stopping);
        for p in peer_ids(&h.withheld) {
            self.withheld.insert(p, h.epoch);
        }
        self.last_digest = Some((round, digest));
        self.digests.entry(round).or_default().insert(self.client.peer_id, digest);
        self.store.lock().expect("store lock").set_state(StateBlob { round, epoch: h.epoch, bytes: Arc::new(bytes) });
        tracing::info!("state synced from {peer} at round {round}: digest {}", &hex(&digest)[..16]);
        Ok(Ok(h))
    }
}

