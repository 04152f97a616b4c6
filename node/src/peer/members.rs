//! The peer core's network handlers: connections, admission (Hello),
//! heartbeats and membership, gossip validation, gradient fetches and
//! announcement recovery, requests served from the store. Pure like the rest
//! of [`PeerCore`]: each handler pushes the actions it needs.

use super::core::{Action, PeerCore, RequestId, Verdict};
use super::decide;
use crate::fetch::Fetched;
use crate::report::{Unadmitted, WithholdingDemotion};
use crate::round::Change;
use crate::train::{max_round_samples, peer_ids};
use libp2p::gossipsub::MessageId;
use libp2p::{Multiaddr, PeerId};
use p2pml_proto::line::MemberEvent;
use p2pml_proto::wire::{self, Announce, Gossip, Heartbeat, MemberEntry, Request, Response};
use std::sync::Arc;

/// Addresses kept (and dialed) per peer.
pub(super) const MAX_ADDRS_PER_PEER: usize = 8;
/// A not-yet-admitted peer is dialed at its heartbeat's addresses at most this often.
const ADMISSION_DIAL_MS: u64 = 2000;
/// A Hello that got no answer is sent again after this long.
const HELLO_AGAIN_MS: u64 = 3000;
/// A known peer we are not connected to is redialed at most this often.
const REDIAL_MS: u64 = 2000;

impl PeerCore {
    /// A peer counts (its heartbeats, readiness and announcements) once this node
    /// holds an accepted Hello for it, in either direction: ours accepted by it, or
    /// its own accepted by us. (The heartbeat-only rogue trusts everyone, only to
    /// follow the run.)
    pub(super) fn is_admitted(&self, p: &PeerId) -> bool {
        self.s.p2p.faults.heartbeat_only || self.accepted.contains(p) || self.store.admitted.contains(p)
    }

    pub(super) fn on_connected(&mut self, now: u64, peer: PeerId, out: &mut Vec<Action>) {
        self.connected.insert(peer);
        self.rs.unsuspect(&peer);
        self.send_hello(now, peer, out);
    }

    pub(super) fn on_disconnected(&mut self, now: u64, peer: PeerId) {
        self.connected.remove(&peer);
        self.rs.suspect(&peer, now);
        tracing::debug!("disconnected from {peer}");
    }

    /// Sends `peer` our Hello (the run spec); the answer comes back as an input.
    fn send_hello(&mut self, now: u64, peer: PeerId, out: &mut Vec<Action>) {
        if self.s.p2p.faults.heartbeat_only {
            return; // the outsider never asks to be admitted
        }
        self.hello_sent.insert(peer, now);
        out.push(Action::Hello { peer });
    }

    /// An inbound request, answered from the store (the outsider answers nothing).
    pub(super) fn on_request(&mut self, id: RequestId, peer: PeerId, request: Request, out: &mut Vec<Action>) {
        if self.s.p2p.faults.heartbeat_only {
            out.push(Action::Drop { id });
            return;
        }
        let response = self.store.answer(&self.s.spec, peer, request);
        out.push(Action::Respond { id, response });
    }

    pub(super) fn on_hello(&mut self, peer: PeerId, r: Result<Response, String>, out: &mut Vec<Action>) {
        match r {
            Ok(Response::Hello { accepted: true, round, .. }) => {
                if self.accepted.insert(peer) {
                    tracing::debug!("peer {peer} admitted (it accepted our Hello)");
                }
                self.hello_round = self.hello_round.max(round);
            }
            Ok(Response::Hello { accepted: false, reason, .. }) => {
                self.accepted.remove(&peer);
                let reason = reason.unwrap_or_default();
                // Only the node that asked to join (through this bootstrap peer)
                // gives up; a run's member just ignores a stranger.
                if self.accepted.is_empty() && self.bootstrap_peers.contains(&peer) {
                    return self.fail(super::core::PeerError::Refused { peer, reason }, out);
                }
                tracing::warn!("peer {peer} runs a different configuration ({reason}); ignoring it");
                // Disconnect a little later, so that our own refusal of its Hello
                // reaches it first (it exits with that reason instead of timing out).
                out.push(Action::Disconnect { peer, after_ms: 2000 });
            }
            Ok(other) => tracing::debug!("unexpected hello answer from {peer}: {other:?}"),
            Err(e) => tracing::debug!("hello to {peer} failed: {e}"),
        }
    }

    /// A gossip message: validated (its fate is the verdict), then handled.
    pub(super) fn on_gossip_message(&mut self, now: u64, id: MessageId, propagated_by: PeerId, author: PeerId, data: &[u8], out: &mut Vec<Action>) {
        let me = self.s.me;
        let msg = if self.store.refused.contains(&author) {
            Err(wire::WireError::Invalid("sender runs another configuration".into()))
        } else {
            Gossip::decode_valid(data, &self.run_id, self.round)
        };
        let mut verdict = |v| out.push(Action::Verdict { id: id.clone(), propagated_by, verdict: v });
        match msg {
            // Only admitted peers count (an accepted Hello, either way): an
            // outsider's heartbeat is dropped unforwarded and makes nobody a
            // member; its announcements are dropped too.
            Ok(Gossip::Heartbeat(h)) if author != me && !self.is_admitted(&author) => {
                tracing::debug!("ignored a heartbeat from {author}: not admitted (no accepted Hello)");
                verdict(Verdict::Ignore);
                self.on_unadmitted_heartbeat(now, author, &h, out);
            }
            // Gradients come from admitted members only (heartbeats make
            // members): one from a peer we have not heard yet is fetched again
            // once it is a member.
            Ok(Gossip::Announce(_) | Gossip::Ticket(_)) if author != me && (!self.is_admitted(&author) || !self.rs.members().contains_key(&author)) => {
                tracing::debug!("ignored an announcement from {author}: not an admitted member");
                verdict(Verdict::Ignore);
            }
            Ok(g) => {
                let payload = self.check_payload(&g);
                if let Err(e) = &payload {
                    // Signed and well-formed, but its gradient is unusable: not
                    // forwarded, and its sender is scored down. It still counts at
                    // the barrier (aggregation drops it on every peer alike), so
                    // that a byzantine peer cannot stall the round.
                    tracing::debug!("rejected gossip from {author} via {propagated_by}: {e}");
                }
                verdict(if payload.is_ok() { Verdict::Accept } else { Verdict::Reject });
                if author != me {
                    self.on_gossip(now, author, g, out);
                }
            }
            // A restarting node far behind the run drops announcements it cannot
            // use yet, without lowering the score of the honest peers that sent them.
            Err(e @ wire::WireError::OutOfWindow(_)) => {
                tracing::debug!("ignored gossip from {author} via {propagated_by}: {e}");
                verdict(Verdict::Ignore);
            }
            Err(e) => {
                tracing::debug!("rejected gossip from {author} via {propagated_by}: {e}");
                verdict(Verdict::Reject);
            }
        }
    }

    /// Model-aware checks: at most a round's samples, and an inline gradient must
    /// decode to the model's length with the run's compression (fetched ones are
    /// checked after the fetch).
    fn check_payload(&self, g: &Gossip) -> Result<(), wire::WireError> {
        if let Gossip::Announce(a) = g {
            // A round's gradient sums at most its batches: a larger count would
            // buy its sender more weight in the mean.
            let most = max_round_samples(&self.s.p2p, self.s.cfg.batch_size);
            if a.samples > most {
                return Err(wire::WireError::Invalid(format!("{} samples in a round of at most {most}", a.samples)));
            }
            if let Some(inline) = &a.inline {
                p2pml_proto::decode_gradient(inline, &self.s.compression, self.s.numel)
                    .map_err(|e| wire::WireError::Invalid(format!("inline gradient: {e}")))?;
            }
        }
        Ok(())
    }

    /// A heartbeat from a peer we have not admitted: ignored (it costs the sender
    /// nothing more), counted for the report. If we are not connected to it we dial
    /// it (a Hello follows the connection); if we are and our Hello got no answer,
    /// we ask again, at most every 3 s.
    fn on_unadmitted_heartbeat(&mut self, now: u64, author: PeerId, h: &Heartbeat, out: &mut Vec<Action>) {
        *self.unadmitted_heartbeats.entry(author).or_insert(0) += 1;
        if self.store.refused.contains(&author) {
            return;
        }
        if !self.connected.contains(&author) {
            // A peer we knew (from the checkpoint or --bootstrap) that came back
            // elsewhere: its signed heartbeat has its new addresses, and the
            // periodic redial should use them rather than the dead ones.
            if !h.addrs.is_empty() && self.known.contains_key(&author) {
                self.known.insert(author, h.addrs.iter().take(MAX_ADDRS_PER_PEER).cloned().collect());
            }
            if self.admission_dialed.get(&author).is_none_or(|t| now.saturating_sub(*t) >= ADMISSION_DIAL_MS) {
                self.admission_dialed.insert(author, now);
                dial(author, &h.addrs, out);
            }
        } else if self.hello_sent.get(&author).is_none_or(|t| now.saturating_sub(*t) >= HELLO_AGAIN_MS) {
            self.send_hello(now, author, out);
        }
    }

    /// An admitted peer's valid message.
    fn on_gossip(&mut self, now: u64, author: PeerId, g: Gossip, out: &mut Vec<Action>) {
        match g {
            Gossip::Heartbeat(h) => {
                if let Some(c) = self.rs.heard(author, h.incarnation, now) {
                    self.on_change(c, out);
                }
                for m in &h.members {
                    if let Ok(p) = PeerId::from_bytes(&m.peer) {
                        if let Some(c) = self.rs.merge_member(p, m.incarnation, m.alive, now) {
                            self.on_change(c, out);
                        }
                    }
                }
                for (r, ps) in &h.contributed {
                    for p in ps {
                        if let Ok(p) = PeerId::from_bytes(p) {
                            self.rs.contributed(*r, p);
                        }
                    }
                }
                if let Some((r, d)) = h.last_digest {
                    self.digests.entry(r).or_default().insert(author, d);
                }
                for e in [h.epoch, h.epoch + 1] {
                    self.subscribe_epoch(e, out);
                }
                let is_new = !self.views.contains_key(&author);
                if self.views.get(&author).is_some_and(|v| v.boot != 0 && v.boot != h.boot) && self.rs.demote(&author) {
                    tracing::info!("peer {author} restarted; it follows until the next epoch");
                }
                let active = peer_ids(&h.active);
                let view = decide::PeerView { round: h.round, epoch: h.epoch, finished: h.finished, ready: h.ready, active, boot: h.boot };
                self.views.insert(author, view);
                if !h.addrs.is_empty() {
                    // A few addresses per peer: a heartbeat cannot make us dial a long list.
                    self.known.insert(author, h.addrs.iter().take(MAX_ADDRS_PER_PEER).cloned().collect());
                }
                if is_new {
                    dial(author, &h.addrs, out);
                }
            }
            Gossip::Announce(a) => {
                if let Some(c) = self.rs.heard(author, self.rs.members().get(&author).map_or(1, |m| m.incarnation), now) {
                    self.on_change(c, out);
                }
                let key = (a.round, author);
                if a.round < self.round || self.announces.contains_key(&key) {
                    return;
                }
                self.store.insert_announce(&author, a.clone());
                if self.sharded() {
                    // Its shards are fetched by their owners: the announcement is what counts here.
                    self.rs.hold(a.round, author);
                    self.announces.insert(key, a);
                    return;
                }
                self.rs.contributed(a.round, author);
                let inline = a.inline.as_ref().map(|b| b.to_vec());
                self.announces.insert(key, a);
                match inline {
                    Some(blob) => self.on_fetched(Fetched { round: key.0, owner: author, part: None, result: Ok(blob) }, out),
                    None => self.start_fetch(key.0, author, out),
                }
            }
            Gossip::Ticket(t) => self.on_ticket(author, t),
        }
    }

    /// An announcement asked for over request-response: signed by its author
    /// and well-formed, it is used like a gossiped one (a bad gradient in it is
    /// dropped at aggregation, on every peer alike).
    pub(super) fn on_recovered(&mut self, now: u64, owner: PeerId, a: Announce, out: &mut Vec<Action>) {
        self.asked.remove(&(a.round, owner));
        let g = Gossip::Announce(a);
        if g.validate(&self.run_id, self.round).is_ok() && self.is_admitted(&owner) {
            self.on_gossip(now, owner, g, out);
        }
    }

    /// Fetches `owner`'s gradient for `round`, from the owner first and then
    /// from any other peer that has it.
    fn start_fetch(&mut self, round: u64, owner: PeerId, out: &mut Vec<Action>) {
        let Some(a) = self.announces.get(&(round, owner)) else { return };
        if !self.fetching.insert((round, owner)) {
            return;
        }
        let mut sources = vec![owner];
        sources.extend(self.rs.contributors(round).into_iter().filter(|p| *p != owner && *p != self.s.me));
        out.push(Action::Fetch { round, owner, part: None, sources, len: a.len, digest: a.digest });
    }

    pub(super) fn on_fetched(&mut self, f: Fetched, out: &mut Vec<Action>) {
        self.fetching.remove(&(f.round, f.owner));
        match f.result {
            Ok(blob) => {
                let Some(a) = self.announces.get(&(f.round, f.owner)) else { return };
                if *blake3::hash(&blob).as_bytes() != a.digest || blob.len() as u64 != a.len {
                    tracing::warn!("gradient of {} for round {} does not match its announcement", f.owner, f.round);
                    return;
                }
                self.store.insert(f.round, &f.owner, Arc::new(blob));
                self.rs.hold(f.round, f.owner);
            }
            Err(e) => {
                tracing::warn!("could not fetch the gradient of {} for round {}: {e}", f.owner, f.round);
                // Try again while the round is still ahead and its author alive.
                if f.round >= self.round && self.rs.is_alive(&f.owner) {
                    self.start_fetch(f.round, f.owner, out);
                }
            }
        }
    }

    /// For the round being waited on: asks for the announcements of expected
    /// peers we hold nothing from (a missed gossip message, or a peer that joined
    /// the topic late), from the owner and any peer that saw it.
    fn recover_announcements(&mut self, out: &mut Vec<Action>) {
        let (round, me) = (self.round, self.s.me);
        for p in self.rs.expected() {
            if p == me || self.rs.holds(round, &p) || self.announces.contains_key(&(round, p)) || !self.asked.insert((round, p)) {
                continue;
            }
            let mut sources = vec![p];
            sources.extend(self.rs.live().into_iter().filter(|x| *x != p && *x != me));
            out.push(Action::Recover { round, owner: p, sources });
        }
    }

    /// The heartbeat: failure detection, then our view of the run on the control topic.
    pub(super) fn heartbeat(&mut self, now: u64, out: &mut Vec<Action>) {
        self.next_heartbeat_ms = now + self.s.p2p.heartbeat_ms;
        out.push(Action::NetInfo);
        if self.s.p2p.faults.garbage {
            // A rogue sends garbage where honest peers send heartbeats.
            let (round, epoch) = self.views.values().map(|v| (v.round, v.epoch)).max().unwrap_or((0, 0));
            for data in self.garbage(round, epoch) {
                self.garbage_sent += 1;
                out.push(Action::Publish { topic: self.epoch_topic(epoch), data, gradient: false });
            }
            return;
        }
        if self.s.p2p.faults.heartbeat_only {
            // The outsider claims the round the run is at, to look like a member.
            (self.round, self.epoch) = self.views.values().map(|v| (v.round, v.epoch)).max().unwrap_or((0, 0));
        }
        if self.ready {
            self.recover_announcements(out);
        }
        for change in self.rs.tick(now) {
            self.on_change(change, out);
        }
        out.push(Action::Gauges { connected: self.connected.len(), live: self.rs.live().len() });
        let members = self.rs.members().iter().map(|(p, m)| MemberEntry { peer: p.to_bytes(), incarnation: m.incarnation, alive: m.alive }).collect();
        let contributed = self
            .rs
            .recent_contributions(self.round.saturating_sub(2))
            .into_iter()
            .map(|(r, ps)| (r, ps.iter().map(|p| serde_bytes::ByteBuf::from(p.to_bytes())).collect()))
            .collect();
        self.redial(now, out);
        let hb = Heartbeat {
            run_id: self.run_id.clone(),
            incarnation: self.rs.incarnation(),
            round: self.round,
            epoch: self.epoch,
            last_digest: self.last_digest,
            members,
            contributed,
            addrs: self.listen_addrs.clone(),
            finished: self.finished,
            ready: self.ready || self.s.p2p.faults.heartbeat_only,
            active: crate::train::ids(&self.rs.active_members()),
            boot: self.s.boot,
        };
        out.push(Action::Publish { topic: self.control_topic(), data: wire::encode(&Gossip::Heartbeat(hb)), gradient: false });
    }

    pub(super) fn on_change(&mut self, c: Change<PeerId>, out: &mut Vec<Action>) {
        let incarnation_of = |p: &PeerId| self.rs.members().get(p).map_or(0, |m| m.incarnation);
        let (peer, event, incarnation) = match &c {
            Change::Joined(p) => {
                tracing::info!("peer {p} joined");
                (*p, MemberEvent::Joined, incarnation_of(p))
            }
            Change::Rejoined { peer, incarnation } => {
                tracing::info!("peer {peer} rejoined (incarnation {incarnation}); it follows until the next epoch");
                (*peer, MemberEvent::Rejoined, *incarnation)
            }
            Change::Died(p) => {
                tracing::warn!("peer {p} declared dead (connection closed, or silent for {} ms)", self.s.p2p.failure_timeout_ms);
                (*p, MemberEvent::Died, incarnation_of(p))
            }
            Change::Refuted { incarnation } => {
                tracing::warn!("a peer declared this node dead: refuted with incarnation {incarnation}");
                // The next start must be higher still.
                out.push(Action::NoteIncarnation(*incarnation));
                (self.s.me, MemberEvent::Refuted, *incarnation)
            }
        };
        out.push(Action::Membership { peer, event, incarnation });
    }

    /// Dials known peers we are not connected to (after a partition heals, or a
    /// peer restarted, or our bootstrap peer died), each at most every two seconds.
    fn redial(&mut self, now: u64, out: &mut Vec<Action>) {
        for (p, addrs) in &self.known {
            if self.connected.contains(p) || self.views.get(p).is_some_and(|v| v.finished) {
                continue;
            }
            if self.redialed.get(p).is_some_and(|t| now.saturating_sub(*t) < REDIAL_MS) {
                continue;
            }
            self.redialed.insert(*p, now);
            dial(*p, addrs, out);
        }
    }

    /// Bookkeeping of a closed round: a full release feeds the deadline's median;
    /// a deadline closure is counted, and members missing `demote_after` such
    /// rounds in a row are demoted until the next epoch (not named for it).
    pub(super) fn close_round(&mut self, round: u64, contributors: &[PeerId], missing: &[PeerId], deadline_ms: u64, took_ms: u64, out: &mut Vec<Action>) {
        if missing.is_empty() {
            self.stragglers.observe(took_ms);
            self.stragglers.closed(contributors, &[]);
            return;
        }
        let names: Vec<String> = missing.iter().map(|p| p.to_string()).collect();
        tracing::warn!(
            "round {round}: closed on the straggler deadline ({deadline_ms} ms after a quorum) with {} contributors, without {}",
            contributors.len(),
            names.join(", ")
        );
        out.push(Action::Deadline { round, missing: names });
        self.admission.deadline_rounds.push(round);
        let epoch = self.epoch;
        for p in self.stragglers.closed(contributors, missing) {
            if !self.rs.demote(&p) {
                continue;
            }
            self.withheld.insert(p, epoch);
            let n = self.s.p2p.straggler.demote_after;
            tracing::warn!("peer {p} missed {n} rounds in a row while alive: demoted until the next epoch, which it will not be named for");
            let incarnation = self.rs.members().get(&p).map_or(0, |m| m.incarnation);
            out.push(Action::Membership { peer: p, event: MemberEvent::Withholding, incarnation });
            self.admission.withholding_demotions.push(WithholdingDemotion { peer: p.to_string(), round, epoch });
        }
    }

    /// The admission part of the report: peers that heartbeat and were never admitted.
    pub(super) fn unadmitted_report(&self) -> Vec<Unadmitted> {
        self.unadmitted_heartbeats
            .iter()
            .filter(|(p, _)| !self.is_admitted(p))
            .map(|(p, n)| Unadmitted { peer: p.to_string(), heartbeats: *n })
            .collect()
    }

    /// A live, ready peer at least two rounds ahead of us (we will not be waited
    /// for in the rounds between): the furthest one, to state-sync from.
    pub(super) fn catch_up_source(&self, now: u64) -> Option<PeerId> {
        decide::catch_up_source(&self.views, self.round, &self.catch_up_failed, now, |p| self.rs.is_alive(p))
    }

    /// Live, ready peers that do not train in this epoch: they are named for the next epoch.
    pub(super) fn ready_joiners(&self) -> Vec<PeerId> {
        decide::ready_joiners(self.rs.live(), |p| self.rs.is_active(p), &self.withheld, self.epoch, &self.views)
    }

    /// The members of the next epoch: the last round's contributors and the
    /// joiners they named (the same announcements on every peer).
    pub(super) fn next_epoch_members(&self, last_round: u64) -> Vec<PeerId> {
        // Sharded: the joiners the round's tickets named (the same tickets on every peer).
        let named = |c: &PeerId| {
            if self.sharded() {
                return self.shard_joiners.clone();
            }
            self.announces.get(&(last_round, *c)).map(|a| peer_ids(&a.joiners)).unwrap_or_default()
        };
        decide::next_epoch_members(&self.last_contributors, named, self.rs.live(), self.s.me, &self.views)
    }
}

/// Dials `peer` at a few of `addrs` (those that parse).
fn dial(peer: PeerId, addrs: &[String], out: &mut Vec<Action>) {
    for a in addrs.iter().take(MAX_ADDRS_PER_PEER) {
        if let Ok(addr) = a.parse::<Multiaddr>() {
            out.push(Action::Dial { peer, addr });
        }
    }
}
