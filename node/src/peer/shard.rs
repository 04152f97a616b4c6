//! The sharded exchange (`--exchange sharded`) in the peer core. The round's
//! gradient is cut into one contiguous shard per member of the epoch
//! ([`shard::cut`], aligned to QSGD buckets). Every contributor encodes each
//! shard on its own and announces their digests (gossip: small); each shard
//! has an owner ([`shard::owner`]: the epoch's sorted members rotated by round
//! and shard, past the dead and the skipped), which fetches that shard's
//! contributions (request-response), waits at the shard's own barrier (every
//! expected member, or a quorum and the straggler deadline), aggregates them
//! in peer-id order and encodes the result with the shard's seed. Its ticket
//! (gossip) names the contributors and the aggregate's digest; every peer, the
//! owner too, fetches and decodes the same aggregated shards, so honest peers
//! stay bit-identical. An owner that dies is passed over at once (the failure
//! detector); one that is alive but sends no ticket in time is skipped, and
//! the next in the rotation fetches the contributions, which their authors
//! keep until the round is pruned. Per peer and round, a contributor sends
//! about one gradient's worth (K shards to K owners) and an owner one shard's
//! aggregate to each peer: the cost does not grow with the swarm.

use super::core::{Action, PeerCore, Phase};
use super::decide::{self, BarrierStep};
use crate::train::peer_ids;
use libp2p::PeerId;
use p2pml_proto::shard;
use p2pml_proto::wire::{self, Announce, Gossip, Part, Ticket, ValStats};
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::Arc;

/// The sharded exchange's state of the round being waited on.
#[derive(Debug, Default)]
pub(super) struct ShardWork {
    pub(super) round: Option<u64>,
    /// The epoch's members, sorted: one shard each, and the owners' rotation.
    pub(super) members: Vec<PeerId>,
    pub(super) ranges: Vec<Range<usize>>,
    /// Per shard: alive owners passed over because their ticket did not come in time.
    pub(super) skip: Vec<usize>,
    /// Per shard: the owner we wait for, and since when.
    pub(super) owner: Vec<Option<(PeerId, u64)>>,
    /// Shards we own: when a quorum of their contributions was first held.
    pub(super) quorum_ms: BTreeMap<usize, u64>,
    /// Shards we own being aggregated: the ticket to send once done.
    pub(super) pending: BTreeMap<usize, Ticket>,
    /// Shards we aggregated (or gave up on because another ticket came first).
    pub(super) aggregated: BTreeSet<usize>,
    /// When a quorum of the round's announcements was first held: an owner's
    /// ticket is waited for from then on.
    pub(super) announced_ms: Option<u64>,
    /// Parts being fetched, by (author, part).
    pub(super) fetching: BTreeSet<(PeerId, Part)>,
}

impl ShardWork {
    /// The wake-up the shard barrier needs: its owned shards' straggler
    /// deadlines and the tickets' deadlines.
    pub(super) fn deadline(&self, straggler_ms: u64) -> Option<u64> {
        let own = self.quorum_ms.iter().filter(|(j, _)| !self.aggregated.contains(j) && !self.pending.contains_key(j)).map(|(_, q)| q + straggler_ms);
        let tickets = self.owner.iter().flatten().map(|(_, since)| since + ticket_wait_ms(straggler_ms));
        own.chain(tickets).min()
    }
}

/// How long a shard's owner gets for its ticket once the round's
/// announcements are a quorum (or once it took the shard over): the straggler
/// deadline it grants its contributors, twice, and a second for the fetches.
pub(super) fn ticket_wait_ms(straggler_ms: u64) -> u64 {
    2 * straggler_ms + 1000
}

/// The part of a round that is a shard's contribution (`aggregated: false`) or aggregate.
fn part(j: usize, aggregated: bool) -> Part {
    Part { shard: j as u32, aggregated }
}

impl PeerCore {
    pub(super) fn sharded(&self) -> bool {
        !self.s.p2p.exchange.is_all_to_all()
    }

    /// The shards of a round of this epoch: one per member, on bucket boundaries.
    pub(super) fn shard_ranges(&self) -> Vec<Range<usize>> {
        let bucket = match &self.s.compression {
            p2pml_proto::Compression::Qsgd(q) => q.bucket,
            p2pml_proto::Compression::None => 1,
        };
        let members = self.sched.as_ref().map_or(1, |s| s.members.len());
        shard::cut(self.s.numel, bucket, members)
    }

    /// Our encoded shards are announced: they are served from the store to their owners.
    pub(super) fn announce_shards(&mut self, round: u64, parts: Vec<Vec<u8>>, a: &mut Announce) {
        let me = self.s.me;
        a.len = 0;
        a.inline = None;
        a.digest = [0; 32];
        a.shards = parts.iter().map(|p| wire::ShardRef { len: p.len() as u64, digest: *blake3::hash(p).as_bytes() }).collect();
        for (j, p) in parts.into_iter().enumerate() {
            self.store.insert_part(round, &me, Some(part(j, false)), Arc::new(p));
        }
    }

    /// An admitted member's ticket: the first for a round's shard is the one used.
    pub(super) fn on_ticket(&mut self, author: PeerId, t: Ticket) {
        if t.round < self.round {
            return;
        }
        self.tickets.entry((t.round, t.shard)).or_insert((author, t));
    }

    fn init_shards(&mut self, round: u64) {
        let members = self.sched.as_ref().map(|s| s.members.clone()).unwrap_or_default();
        let ranges = self.shard_ranges();
        let k = ranges.len();
        self.shards = ShardWork { round: Some(round), members, ranges, skip: vec![0; k], owner: vec![None; k], ..Default::default() };
    }

    /// The owner of shard `j` now: the first member of its rotation alive and
    /// active, past the ones skipped.
    fn shard_owner(&self, round: u64, j: usize) -> Option<PeerId> {
        let sh = &self.shards;
        shard::owner(&sh.members, round, j, sh.skip[j], |p| self.rs.is_alive(p) && self.rs.is_active(p))
    }

    /// The sharded barrier: own, fetch, wait for tickets, reassign, and once
    /// every aggregated shard is held, assemble the round's gradient.
    pub(super) fn sharded_barrier(&mut self, now: u64, round: u64, out: &mut Vec<Action>) {
        if self.shards.round != Some(round) {
            self.init_shards(round);
        }
        let k = self.shards.ranges.len();
        let straggler = self.stragglers.deadline_ms();
        if self.shards.announced_ms.is_none() && self.rs.quorum_held(round).is_some() {
            self.shards.announced_ms = Some(now);
        }
        let mut complete = true;
        for j in 0..k {
            if self.shards.ranges[j].is_empty() {
                continue;
            }
            if let Some((author, t)) = self.tickets.get(&(round, j as u32)).cloned() {
                if t.shards as usize != k {
                    tracing::warn!("round {round}: ticket for shard {j} from {author} cuts {} shards, not {k}: ignored", t.shards);
                    self.tickets.remove(&(round, j as u32));
                } else {
                    self.shards.owner[j] = None;
                    if !self.store.has_part(round, &author, Some(part(j, true))) {
                        complete = false;
                        self.fetch_aggregate(round, author, j, &t, out);
                    }
                    continue;
                }
            }
            complete = false;
            let Some(o) = self.shard_owner(round, j) else { continue };
            if o == self.s.me {
                self.own_shard(now, round, j, straggler, out);
                continue;
            }
            // The wait for an owner's ticket starts with a quorum of the
            // round's announcements, or when it takes the shard over.
            let Some(since) = self.shards.announced_ms else { continue };
            let t0 = match self.shards.owner[j] {
                Some((p, t)) if p == o => t,
                Some(_) => now,
                None => since,
            };
            self.shards.owner[j] = Some((o, t0));
            let wait = ticket_wait_ms(straggler);
            if now >= t0 + wait {
                tracing::warn!("round {round}: no ticket for shard {j} from its owner {o} within {wait} ms: the next member takes it over");
                self.shards.skip[j] += 1;
                self.shards.owner[j] = Some((o, now));
                self.shard_reassignments += 1;
            }
        }
        if complete {
            self.assemble(now, round, out);
            return;
        }
        if let Some(source) = self.catch_up_source(now) {
            let their = self.views.get(&source).map_or(0, |v| v.round);
            tracing::warn!("round {round}: peer {source} is at round {their}; catching up by state sync");
            self.set_phase(now, Phase::CatchingUp { source });
            out.push(Action::Sync { peer: source, min_round: round + 1 });
        }
    }

    /// A shard we own: fetch its contributions; at its barrier, aggregate them.
    fn own_shard(&mut self, now: u64, round: u64, j: usize, straggler: u64, out: &mut Vec<Action>) {
        if self.shards.aggregated.contains(&j) || self.shards.pending.contains_key(&j) {
            return;
        }
        let k = self.shards.ranges.len();
        let p = part(j, false);
        let me = self.s.me;
        let authors: Vec<(PeerId, wire::ShardRef)> = self
            .announces
            .iter()
            .filter(|((r, _), a)| *r == round && a.shards.len() == k)
            .map(|((_, a), ann)| (*a, ann.shards[j]))
            .collect();
        let mut held = BTreeSet::new();
        for (a, r) in &authors {
            if self.store.has_part(round, a, Some(p)) {
                held.insert(*a);
            } else if *a != me && self.shards.fetching.insert((*a, p)) {
                out.push(Action::Fetch { round, owner: *a, part: Some(p), sources: vec![*a], len: r.len, digest: r.digest });
            }
        }
        let mut quorum_at = self.shards.quorum_ms.get(&j).copied();
        let step = decide::barrier_step(self.rs.barrier_of(Some(&held)), self.rs.quorum_of(&held), &mut quorum_at, straggler, now, false);
        if let Some(q) = quorum_at {
            self.shards.quorum_ms.insert(j, q);
        }
        let BarrierStep::Release { contributors, missing } = step else { return };
        if !missing.is_empty() {
            tracing::info!("round {round}: shard {j} closed on the straggler deadline without {} of its contributions", missing.len());
        }
        let mut inputs = Vec::with_capacity(contributors.len());
        let (mut val, mut joiners) = (None::<ValStats>, BTreeSet::new());
        for c in &contributors {
            let (Some(a), Some(blob)) = (self.announces.get(&(round, *c)), self.store.get_part(round, c, Some(p))) else { continue };
            if let Some(v) = &a.val {
                let acc = val.get_or_insert(ValStats { epoch: v.epoch, loss_sum: 0.0, correct: 0, count: 0 });
                (acc.loss_sum, acc.correct, acc.count) = (acc.loss_sum + v.loss_sum, acc.correct + v.correct, acc.count + v.count);
            }
            joiners.extend(peer_ids(&a.joiners));
            inputs.push((a.samples, a.loss_sum, blob));
        }
        let ticket = Ticket {
            run_id: self.run_id.clone(),
            round,
            epoch: self.epoch,
            shard: j as u32,
            shards: k as u32,
            contributors: crate::train::ids(&contributors),
            samples: 0,
            loss_sum: 0.0,
            val,
            joiners: crate::train::ids(&joiners.into_iter().collect::<Vec<_>>()),
            len: 0,
            digest: [0; 32],
        };
        self.shards.pending.insert(j, ticket);
        let seed = shard::aggregate_seed(self.s.cfg.seed, round, j);
        out.push(Action::AggregateShard { round, shard: j, len: self.shards.ranges[j].len(), seed, inputs });
    }

    /// Our aggregate of a shard: held, served, and its ticket sent (unless
    /// another owner's ticket for the shard came first: that one is used).
    pub(super) fn on_shard_aggregated(&mut self, round: u64, j: usize, result: Result<crate::train::ShardAggregate, String>, out: &mut Vec<Action>) {
        if self.shards.round != Some(round) {
            return;
        }
        let Some(mut t) = self.shards.pending.remove(&j) else { return };
        self.shards.aggregated.insert(j);
        let agg = match result {
            Ok(a) => a,
            Err(e) => return self.fail(super::core::PeerError::Compute(format!("round {round}: {e}")), out),
        };
        self.work.stages.decode += agg.decode_secs;
        self.work.stages.aggregate += agg.aggregate_secs + agg.encode_secs;
        (t.samples, t.loss_sum, t.len, t.digest) = (agg.samples, agg.loss_sum, agg.blob.len() as u64, *blake3::hash(&agg.blob).as_bytes());
        let me = self.s.me;
        self.store.insert_part(round, &me, Some(part(j, true)), Arc::new(agg.blob));
        if self.tickets.contains_key(&(round, j as u32)) {
            tracing::info!("round {round}: another owner's ticket for shard {j} came first; ours is not sent");
            return;
        }
        self.tickets.insert((round, j as u32), (me, t.clone()));
        out.push(Action::Publish { topic: self.epoch_topic(self.epoch), data: wire::encode(&Gossip::Ticket(t)), gradient: false });
    }

    /// Fetches shard `j`'s aggregate named by `author`'s ticket: from the
    /// author, then from any live peer (every peer holds the aggregates it used).
    fn fetch_aggregate(&mut self, round: u64, author: PeerId, j: usize, t: &Ticket, out: &mut Vec<Action>) {
        let p = part(j, true);
        if !self.shards.fetching.insert((author, p)) {
            return;
        }
        let me = self.s.me;
        let mut sources = vec![author];
        sources.extend(self.rs.live().into_iter().filter(|x| *x != author && *x != me));
        out.push(Action::Fetch { round, owner: author, part: Some(p), sources, len: t.len, digest: t.digest });
    }

    /// A part fetched (or not): held if it matches what its announcement or ticket named.
    pub(super) fn on_part_fetched(&mut self, round: u64, owner: PeerId, p: Part, result: Result<Vec<u8>, String>) {
        self.shards.fetching.remove(&(owner, p));
        let j = p.shard as usize;
        let expect = if p.aggregated {
            self.tickets.get(&(round, p.shard)).filter(|(a, _)| *a == owner).map(|(_, t)| (t.len, t.digest))
        } else {
            self.announces.get(&(round, owner)).and_then(|a| a.shards.get(j)).map(|r| (r.len, r.digest))
        };
        match result {
            Ok(blob) => {
                let Some((len, digest)) = expect else { return };
                if *blake3::hash(&blob).as_bytes() != digest || blob.len() as u64 != len {
                    tracing::warn!("shard {j} of {owner} for round {round} does not match what was announced");
                    return;
                }
                self.store.insert_part(round, &owner, Some(p), Arc::new(blob));
            }
            Err(e) => {
                tracing::warn!("could not fetch shard {j} ({}) of {owner} for round {round}: {e}", if p.aggregated { "aggregate" } else { "contribution" });
                // The next pass of the barrier asks again while the round is
                // ahead (and, for a contribution, its author is alive).
                if !p.aggregated && !self.rs.is_alive(&owner) {
                    self.shards.fetching.insert((owner, p));
                }
            }
        }
    }

    /// Every aggregated shard is held: decode them into the round's gradient.
    fn assemble(&mut self, now: u64, round: u64, out: &mut Vec<Action>) {
        let k = self.shards.ranges.len();
        let mut parts = Vec::with_capacity(k);
        let mut contributors = BTreeSet::new();
        let mut joiners = BTreeSet::new();
        // The round's samples, loss and validation figures: the ticket with the
        // most contributors (the lowest shard of those), the same on every peer.
        let mut best: Option<&Ticket> = None;
        for j in 0..k {
            let r = self.shards.ranges[j].clone();
            if r.is_empty() {
                continue;
            }
            let Some((author, t)) = self.tickets.get(&(round, j as u32)) else { return };
            let Some(blob) = self.store.get_part(round, author, Some(part(j, true))) else { return };
            contributors.extend(peer_ids(&t.contributors));
            joiners.extend(peer_ids(&t.joiners));
            if best.is_none_or(|b| t.contributors.len() > b.contributors.len()) {
                best = Some(t);
            }
            parts.push((r, blob));
        }
        let (samples, loss, val) = best.map_or((0, 0.0, None), |t| (t.samples, t.loss_sum, t.val.clone()));
        let contributors: Vec<PeerId> = contributors.into_iter().collect();
        let missing: Vec<PeerId> = self.rs.expected().into_iter().filter(|p| !contributors.contains(p)).collect();
        let deadline = self.stragglers.deadline_ms();
        self.close_round(round, &contributors, &missing, deadline, now - self.work.started_ms, out);
        self.work.val = val.map_or((0.0, 0, 0, false), |v| (v.loss_sum, v.correct, v.count, true));
        self.work.contributors = contributors.len();
        self.work.stages.barrier_wait = (now - self.work.barrier_ms) as f64 / 1000.0;
        self.last_contributors = contributors;
        self.shard_joiners = joiners.into_iter().collect();
        let (first, rounds) = (self.sched().first_round, self.sched().rounds);
        if round + 1 == first + rounds {
            self.planned_next = Some(self.next_epoch_members(round));
        }
        self.set_phase(now, Phase::Aggregating { round });
        out.push(Action::Assemble { round, parts, samples, loss });
    }
}
