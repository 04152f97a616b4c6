//! The P2P node's state and its event handlers: membership, admission,
//! heartbeats, gossip, fetches.

use crate::checkpoint::{CheckpointMeta, Checkpoints};
use crate::config::P2pConfig;
use crate::net::{Client, Event};
use crate::round::{Change, RoundState, Stragglers};
use crate::store::SharedStore;
use crate::report::*;
use crate::train::*;
use crate::fetch::*;
use super::decide;
use p2pml_proto::line::{Line, MemberEvent};
use anyhow::bail;
use libp2p::{Multiaddr, PeerId};
use p2pml_proto::wire::{self, Announce, Digest, Gossip, Heartbeat, MemberEntry, Request, Response, RunSpec};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Addresses kept (and dialed) per peer.
pub(super) const MAX_ADDRS_PER_PEER: usize = 8;

/// Where to find peers at start: the --bootstrap addresses, and the addresses
/// the restored checkpoint remembers for its members.
pub(super) fn known_addresses(bootstrap: &[(PeerId, Multiaddr)], meta: Option<&CheckpointMeta>, me: &PeerId) -> HashMap<PeerId, Vec<String>> {
    let mut known: HashMap<PeerId, Vec<String>> = HashMap::new();
    for m in meta.map(|m| m.members.as_slice()).unwrap_or_default() {
        if let Ok(p) = PeerId::from_bytes(&m.peer) {
            if &p != me && !m.addrs.is_empty() {
                known.insert(p, m.addrs.iter().take(MAX_ADDRS_PER_PEER).cloned().collect());
            }
        }
    }
    for (p, a) in bootstrap {
        let addrs = known.entry(*p).or_default();
        let a = a.to_string();
        if !addrs.contains(&a) {
            addrs.insert(0, a);
        }
    }
    known
}

pub(super) type PeerView = super::decide::PeerView<PeerId>;

pub(super) struct Node {
    pub(super) p2p: P2pConfig,
    pub(super) spec: RunSpec,
    pub(super) run_id: String,
    pub(super) client: Client,
    pub(super) events: mpsc::Receiver<Event>,
    pub(super) store: SharedStore,
    pub(super) rs: RoundState<PeerId>,
    pub(super) announces: HashMap<(u64, PeerId), Announce>,
    pub(super) fetching: HashSet<(u64, PeerId)>,
    pub(super) fetch_tx: mpsc::Sender<Fetched>,
    pub(super) fetch_rx: mpsc::Receiver<Fetched>,
    pub(super) digests: BTreeMap<u64, BTreeMap<PeerId, Digest>>,
    pub(super) views: HashMap<PeerId, PeerView>,
    pub(super) accepted: HashSet<PeerId>,
    pub(super) hello_tx: mpsc::Sender<(PeerId, Result<Response, String>)>,
    pub(super) hello_rx: mpsc::Receiver<(PeerId, Result<Response, String>)>,
    pub(super) round: u64,
    pub(super) epoch: u64,
    pub(super) last_digest: Option<(u64, Digest)>,
    pub(super) finished: bool,
    pub(super) start: Instant,
    pub(super) next_heartbeat: Instant,
    pub(super) gradient_bytes_sent: u64,
    pub(super) digest_mismatches: u64,
    /// Async mode: gradients already applied, never applied twice.
    pub(super) applied: HashSet<(u64, PeerId)>,
    /// This peer holds the run's state (it founded the run or has synced).
    pub(super) ready: bool,
    /// The highest round a Hello answer reported.
    pub(super) hello_round: u64,
    /// Whose gradients the last aggregation used.
    pub(super) last_contributors: Vec<PeerId>,
    /// The run's gradient encoding and the model's parameter count.
    pub(super) compression: p2pml_proto::Compression,
    pub(super) numel: usize,
    /// The peers named by --bootstrap.
    pub(super) bootstrap_peers: HashSet<PeerId>,
    /// Epoch topics subscribed to.
    pub(super) subscribed: HashSet<u64>,
    /// Announcements asked for over request-response, and the answers.
    pub(super) asked: HashSet<(u64, PeerId)>,
    pub(super) recovered_tx: mpsc::Sender<(PeerId, Announce)>,
    pub(super) recovered_rx: mpsc::Receiver<(PeerId, Announce)>,
    /// Training samples outside the validation set, and the batch size (to
    /// compute an epoch's rounds while joining).
    pub(super) n_train_minus_val: usize,
    pub(super) batch_size: usize,
    /// Peers connected now.
    pub(super) connected: HashSet<PeerId>,
    /// Gossipsub scores of the peers, lowest and latest.
    pub(super) scores: BTreeMap<PeerId, ScoreSeen>,
    /// Rogue mode (--fault-garbage): invalid messages published.
    pub(super) garbage_sent: u64,
    /// Membership changes, for the report.
    pub(super) membership: MembershipLog,
    /// The next epoch's members, fixed at the epoch's last round (or by a state).
    pub(super) planned_next: Option<Vec<PeerId>>,
    /// When we last dialed a known peer we are not connected to.
    pub(super) redialed: HashMap<PeerId, Instant>,
    /// When a not-yet-admitted peer was last dialed at its heartbeat's addresses
    /// (apart from `redialed`: the periodic redial of stale known addresses must
    /// not starve the dial at the fresh ones).
    pub(super) admission_dialed: HashMap<PeerId, Instant>,
    /// Every peer's last known addresses: from --bootstrap, the restored
    /// checkpoint and heartbeats. Peers not connected are redialed.
    pub(super) known: HashMap<PeerId, Vec<String>>,
    /// This process start (heartbeats carry it).
    pub(super) boot: u64,
    /// Catch-up sources whose state could not be had, and when (tried again after 10 s).
    pub(super) catch_up_failed: HashMap<PeerId, u64>,
    pub(super) ckpt: Arc<Checkpoints>,
    /// Why the last dial failed (said when no bootstrap peer can be reached).
    pub(super) last_dial_error: Option<String>,
    /// The straggler deadline and who keeps missing rounds.
    pub(super) stragglers: Stragglers<PeerId>,
    /// Members demoted for withholding, with the epoch: not named for the next one.
    pub(super) withheld: HashMap<PeerId, u64>,
    /// Deadline closures and withholding demotions, for the report.
    pub(super) admission: AdmissionReport,
    /// Heartbeats ignored because their sender is not admitted, by sender.
    pub(super) unadmitted_heartbeats: BTreeMap<PeerId, u64>,
    /// When we last sent each peer a Hello.
    pub(super) hello_sent: HashMap<PeerId, Instant>,
    /// Wake the event loop at this instant (a deadline being waited on).
    pub(super) wake: Option<Instant>,
}

impl Node {
    pub(super) fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// A peer counts (its heartbeats, readiness and announcements) once this node
    /// holds an accepted Hello for it, in either direction: ours accepted by it, or
    /// its own accepted by our responder. (The heartbeat-only rogue trusts everyone,
    /// only to follow the run.)
    pub(super) fn is_admitted(&self, p: &PeerId) -> bool {
        self.p2p.faults.heartbeat_only || self.accepted.contains(p) || self.store.lock().expect("store lock").admitted.contains(p)
    }

    /// Sends `peer` our Hello (the run spec); the answer comes back through `hello_rx`.
    pub(super) fn send_hello(&mut self, peer: PeerId) {
        if self.p2p.faults.heartbeat_only {
            return; // the outsider never asks to be admitted
        }
        self.hello_sent.insert(peer, Instant::now());
        let (client, spec, tx) = (self.client.clone(), self.spec.clone(), self.hello_tx.clone());
        tokio::spawn(async move {
            let r = client.request(peer, Request::Hello { spec }).await.map_err(|e| e.to_string());
            let _ = tx.send((peer, r)).await;
        });
    }

    /// A heartbeat from a peer we have not admitted: ignored (it costs the sender
    /// nothing more), counted for the report. If we are not connected to it we dial
    /// it (a Hello follows the connection); if we are and our Hello got no answer,
    /// we ask again, at most every 3 s.
    pub(super) async fn on_unadmitted_heartbeat(&mut self, author: PeerId, h: &Heartbeat) {
        *self.unadmitted_heartbeats.entry(author).or_insert(0) += 1;
        let now = Instant::now();
        let refused = self.store.lock().expect("store lock").refused.contains(&author);
        if refused {
            return;
        }
        if !self.connected.contains(&author) {
            // A peer we knew (from the checkpoint or --bootstrap) that came back
            // elsewhere: its signed heartbeat has its new addresses, and the
            // periodic redial should use them rather than the dead ones.
            if !h.addrs.is_empty() && self.known.contains_key(&author) {
                self.known.insert(author, h.addrs.iter().take(MAX_ADDRS_PER_PEER).cloned().collect());
            }
            if self.admission_dialed.get(&author).is_none_or(|t| now.duration_since(*t) >= Duration::from_secs(2)) {
                self.admission_dialed.insert(author, now);
                for a in h.addrs.iter().take(MAX_ADDRS_PER_PEER) {
                    if let Ok(addr) = a.parse::<Multiaddr>() {
                        let _ = self.client.dial(Some(author), addr).await;
                    }
                }
            }
        } else if self.hello_sent.get(&author).is_none_or(|t| now.duration_since(*t) >= Duration::from_secs(3)) {
            self.send_hello(author);
        }
    }

    /// Bookkeeping of a closed round: a full release feeds the deadline's median;
    /// a deadline closure is counted, and members missing `demote_after` such
    /// rounds in a row are demoted until the next epoch (not named for it).
    pub(super) fn close_round(&mut self, round: u64, epoch: u64, contributors: &[PeerId], missing: &[PeerId], deadline: Duration, took: Duration) {
        if missing.is_empty() {
            self.stragglers.observe(took.as_millis() as u64);
            self.stragglers.closed(contributors, &[]);
            return;
        }
        let names: Vec<String> = missing.iter().map(|p| p.to_string()).collect();
        tracing::warn!(
            "round {round}: closed on the straggler deadline ({} ms after a quorum) with {} contributors, without {}",
            deadline.as_millis(),
            contributors.len(),
            names.join(", ")
        );
        // testnet reads this line.
        println!("{}", Line::Deadline { round, missing: names });
        self.admission.deadline_rounds.push(round);
        if let Some(m) = crate::metrics::get() {
            m.deadline_rounds.inc();
        }
        for p in self.stragglers.closed(contributors, missing) {
            if !self.rs.demote(&p) {
                continue;
            }
            self.withheld.insert(p, epoch);
            let n = self.p2p.straggler.demote_after;
            tracing::warn!("peer {p} missed {n} rounds in a row while alive: demoted until the next epoch, which it will not be named for");
            let incarnation = self.rs.members().get(&p).map_or(0, |m| m.incarnation);
            self.membership.record(&p, MemberEvent::Withholding, incarnation);
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

    pub(super) fn control_topic(&self) -> String {
        format!("p2pml/{}/control", self.run_id)
    }
    pub(super) fn epoch_topic(&self, epoch: u64) -> String {
        format!("p2pml/{}/epoch/{epoch}", self.run_id)
    }

    /// For the round being waited on: asks for the announcements of expected
    /// peers we hold nothing from (a missed gossip message, or a peer that joined
    /// the topic late), from the owner and any peer that saw it.
    pub(super) fn recover_announcements(&mut self) {
        let round = self.round;
        for p in self.rs.expected() {
            if p == self.client.peer_id || self.rs.holds(round, &p) || self.announces.contains_key(&(round, p)) {
                continue;
            }
            if !self.asked.insert((round, p)) {
                continue;
            }
            let mut sources = vec![p];
            sources.extend(self.rs.live().into_iter().filter(|x| *x != p && *x != self.client.peer_id));
            let (client, tx) = (self.client.clone(), self.recovered_tx.clone());
            tokio::spawn(async move {
                for _ in 0..3 {
                    for src in &sources {
                        if let Ok(Response::Announcement(a)) =
                            client.request(*src, Request::Announcement { owner: p.to_bytes(), round }).await
                        {
                            let _ = tx.send((p, *a)).await;
                            return;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                // Not found: allow another attempt at the next heartbeat.
                let _ = tx.send((p, Announce::missing(round))).await;
            });
        }
    }

    pub(super) async fn heartbeat(&mut self) {
        if let Ok(scores) = self.client.peer_scores().await {
            for (p, s) in scores {
                let e = self.scores.entry(p).or_insert(ScoreSeen { min: s, last: s });
                e.min = e.min.min(s);
                e.last = s;
            }
        }
        if self.p2p.faults.garbage {
            // A rogue sends garbage where honest peers send heartbeats.
            let (round, epoch) = self.views.values().map(|v| (v.round, v.epoch)).max().unwrap_or((0, 0));
            self.publish_garbage(round, epoch).await;
            self.next_heartbeat = Instant::now() + Duration::from_millis(self.p2p.heartbeat_ms);
            return;
        }
        if self.p2p.faults.heartbeat_only {
            // The outsider claims the round the run is at, to look like a member.
            let (round, epoch) = self.views.values().map(|v| (v.round, v.epoch)).max().unwrap_or((0, 0));
            self.round = round;
            self.epoch = epoch;
        }
        if self.ready {
            self.recover_announcements();
        }
        let now = self.now_ms();
        for change in self.rs.tick(now) {
            self.on_change(change);
        }
        crate::metrics::membership(self.connected.len(), self.rs.live().len());
        let members = self
            .rs
            .members()
            .iter()
            .map(|(p, m)| MemberEntry { peer: p.to_bytes(), incarnation: m.incarnation, alive: m.alive })
            .collect();
        let contributed = self
            .rs
            .recent_contributions(self.round.saturating_sub(2))
            .into_iter()
            .map(|(r, ps)| (r, ps.iter().map(|p| serde_bytes::ByteBuf::from(p.to_bytes())).collect()))
            .collect();
        let addrs = self.client.listen_addrs().await.unwrap_or_default().iter().map(|a| a.to_string()).collect();
        self.redial().await;
        let hb = Heartbeat {
            run_id: self.run_id.clone(),
            incarnation: self.rs.incarnation(),
            round: self.round,
            epoch: self.epoch,
            last_digest: self.last_digest,
            members,
            contributed,
            addrs,
            finished: self.finished,
            ready: self.ready || self.p2p.faults.heartbeat_only,
            active: self.rs.active_members().iter().map(|p| serde_bytes::ByteBuf::from(p.to_bytes())).collect(),
            boot: self.boot,
        };
        let topic = self.control_topic();
        if let Err(e) = self.client.publish(&topic, wire::encode(&Gossip::Heartbeat(hb))).await {
            tracing::debug!("heartbeat: {e}");
        }
        self.next_heartbeat = Instant::now() + Duration::from_millis(self.p2p.heartbeat_ms);
    }

    pub(super) fn on_change(&mut self, c: Change<PeerId>) {
        let (peer, event, incarnation) = match &c {
            Change::Joined(p) => {
                tracing::info!("peer {p} joined");
                (*p, MemberEvent::Joined, self.rs.members().get(p).map_or(0, |m| m.incarnation))
            }
            Change::Rejoined { peer, incarnation } => {
                tracing::info!("peer {peer} rejoined (incarnation {incarnation}); it follows until the next epoch");
                (*peer, MemberEvent::Rejoined, *incarnation)
            }
            Change::Died(p) => {
                tracing::warn!("peer {p} declared dead (connection closed, or silent for {} ms)", self.p2p.failure_timeout_ms);
                (*p, MemberEvent::Died, self.rs.members().get(p).map_or(0, |m| m.incarnation))
            }
            Change::Refuted { incarnation } => {
                tracing::warn!("a peer declared this node dead: refuted with incarnation {incarnation}");
                // The next start must be higher still.
                if let Err(e) = self.ckpt.note_incarnation(*incarnation) {
                    tracing::warn!("cannot record incarnation {incarnation}: {e}");
                }
                (self.client.peer_id, MemberEvent::Refuted, *incarnation)
            }
        };
        // testnet reads this line to time failure detection.
        self.membership.record(&peer, event, incarnation);
    }

    /// Dials known peers we are not connected to (after a partition heals, or a
    /// peer restarted, or our bootstrap peer died), each at most every two seconds.
    pub(super) async fn redial(&mut self) {
        let now = Instant::now();
        let mut dial = Vec::new();
        for (p, addrs) in &self.known {
            if self.connected.contains(p) || self.views.get(p).is_some_and(|v| v.finished) {
                continue;
            }
            if self.redialed.get(p).is_some_and(|t| now.duration_since(*t) < Duration::from_secs(2)) {
                continue;
            }
            dial.push((*p, addrs.clone()));
        }
        for (p, addrs) in dial {
            self.redialed.insert(p, now);
            for a in addrs {
                if let Ok(addr) = a.parse::<Multiaddr>() {
                    let _ = self.client.dial(Some(p), addr).await;
                }
            }
        }
    }

    /// A live, ready peer at least two rounds ahead of us (we will not be waited
    /// for in the rounds between): the furthest one, to state-sync from.
    pub(super) fn catch_up_source(&self) -> Option<PeerId> {
        decide::catch_up_source(&self.views, self.round, &self.catch_up_failed, self.now_ms(), |p| self.rs.is_alive(p))
    }

    /// Handles one input: a network event, a finished fetch, a Hello answer or a timer.
    pub(super) async fn pump(&mut self) -> anyhow::Result<()> {
        let sleep = tokio::time::sleep_until(self.next_heartbeat.into());
        let wake = self.wake;
        tokio::select! {
            ev = self.events.recv() => match ev {
                Some(ev) => self.on_event(ev).await,
                None => bail!("the network task stopped"),
            },
            Some(f) = self.fetch_rx.recv() => self.on_fetched(f),
            Some((peer, r)) = self.hello_rx.recv() => self.on_hello(peer, r).await?,
            Some((owner, a)) = self.recovered_rx.recv() => {
                self.asked.remove(&(a.round, owner));
                // Signed by its author and well-formed: used like a gossiped one (a
                // bad gradient in it is dropped at aggregation, on every peer alike).
                let g = Gossip::Announce(a);
                if g.validate(&self.run_id, self.round).is_ok() && self.is_admitted(&owner) {
                    self.on_gossip(owner, g).await;
                }
            }
            _ = sleep => self.heartbeat().await,
            // A deadline the caller waits on (nothing to do but return to it).
            _ = async move {
                match wake {
                    Some(w) => tokio::time::sleep_until(w.into()).await,
                    None => std::future::pending().await,
                }
            } => self.wake = None,
        }
        Ok(())
    }

    /// Runs `fut` (blocking work on another thread) while keeping the node responsive.
    pub(super) async fn while_pumping<T>(&mut self, fut: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return Ok(out),
                r = self.pump() => r?,
            }
        }
    }

    pub(super) async fn on_hello(&mut self, peer: PeerId, r: Result<Response, String>) -> anyhow::Result<()> {
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
                    bail!(
                        "peer {peer} refused to let this node join: {reason}. Start the node with the run's settings or start a new run"
                    );
                }
                tracing::warn!("peer {peer} runs a different configuration ({reason}); ignoring it");
                // Disconnect a little later, so that our own refusal of its Hello
                // reaches it first (it exits with that reason instead of timing out).
                let client = self.client.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    let _ = client.disconnect(peer).await;
                });
            }
            Ok(other) => tracing::debug!("unexpected hello answer from {peer}: {other:?}"),
            Err(e) => tracing::debug!("hello to {peer} failed: {e}"),
        }
        Ok(())
    }

    pub(super) async fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Connected(peer) => {
                self.connected.insert(peer);
                self.rs.unsuspect(&peer);
                self.send_hello(peer);
            }
            Event::Disconnected(peer) => {
                self.connected.remove(&peer);
                let now = self.now_ms();
                self.rs.suspect(&peer, now);
                tracing::debug!("disconnected from {peer}");
            }
            Event::DialFailed { peer, error } => {
                tracing::debug!("dial {peer:?} failed: {error}");
                self.last_dial_error = Some(error);
            }
            Event::Gossip { id, propagated_by, author, data } => {
                let refused = self.store.lock().expect("store lock").refused.contains(&author);
                let msg = if refused {
                    Err(wire::WireError::Invalid("sender runs another configuration".into()))
                } else {
                    Gossip::decode_valid(&data, &self.run_id, self.round)
                };
                match msg {
                    // Only admitted peers count (an accepted Hello, either way): an
                    // outsider's heartbeat is dropped unforwarded and makes nobody a
                    // member; its announcements are dropped too.
                    Ok(Gossip::Heartbeat(h)) if author != self.client.peer_id && !self.is_admitted(&author) => {
                        tracing::debug!("ignored a heartbeat from {author}: not admitted (no accepted Hello)");
                        let _ = self.client.ignore(id, propagated_by).await;
                        self.on_unadmitted_heartbeat(author, &h).await;
                    }
                    // Gradients come from admitted members only (heartbeats make
                    // members): one from a peer we have not heard yet is fetched again
                    // once it is a member.
                    Ok(Gossip::Announce(_))
                        if author != self.client.peer_id && (!self.is_admitted(&author) || !self.rs.members().contains_key(&author)) =>
                    {
                        tracing::debug!("ignored an announcement from {author}: not an admitted member");
                        let _ = self.client.ignore(id, propagated_by).await;
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
                        let _ = self.client.validate(id, propagated_by, payload.is_ok()).await;
                        if author != self.client.peer_id {
                            self.on_gossip(author, g).await;
                        }
                    }
                    // A restarting node far behind the run drops announcements it cannot
                    // use yet, without lowering the score of the honest peers that sent them.
                    Err(e @ wire::WireError::OutOfWindow(_)) => {
                        tracing::debug!("ignored gossip from {author} via {propagated_by}: {e}");
                        let _ = self.client.ignore(id, propagated_by).await;
                    }
                    Err(e) => {
                        tracing::debug!("rejected gossip from {author} via {propagated_by}: {e}");
                        let _ = self.client.validate(id, propagated_by, false).await;
                    }
                }
            }
        }
    }

    /// Model-aware checks: at most a round's samples, and an inline gradient must
    /// decode to the model's length with the run's compression (fetched ones are
    /// checked after the fetch).
    pub(super) fn check_payload(&self, g: &Gossip) -> Result<(), wire::WireError> {
        if let Gossip::Announce(a) = g {
            // A round's gradient sums at most its batches: a larger count would
            // buy its sender more weight in the mean.
            let most = max_round_samples(&self.p2p, self.batch_size);
            if a.samples > most {
                return Err(wire::WireError::Invalid(format!("{} samples in a round of at most {most}", a.samples)));
            }
            if let Some(inline) = &a.inline {
                p2pml_proto::decode_gradient(inline, &self.compression, self.numel)
                    .map_err(|e| wire::WireError::Invalid(format!("inline gradient: {e}")))?;
            }
        }
        Ok(())
    }


    pub(super) async fn on_gossip(&mut self, author: PeerId, g: Gossip) {
        let now = self.now_ms();
        match g {
            Gossip::Heartbeat(h) => {
                if let Some(c) = self.rs.heard(author, h.incarnation, now) {
                    self.on_change(c);
                }
                for m in &h.members {
                    if let Ok(p) = PeerId::from_bytes(&m.peer) {
                        if let Some(c) = self.rs.merge_member(p, m.incarnation, m.alive, now) {
                            self.on_change(c);
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
                    if self.subscribed.insert(e) {
                        let _ = self.client.subscribe(&self.epoch_topic(e)).await;
                    }
                }
                let is_new = !self.views.contains_key(&author);
                if self.views.get(&author).is_some_and(|v| v.boot != 0 && v.boot != h.boot) && self.rs.demote(&author) {
                    tracing::info!("peer {author} restarted; it follows until the next epoch");
                }
                let active = h.active.iter().filter_map(|b| PeerId::from_bytes(b).ok()).collect();
                let view = PeerView { round: h.round, epoch: h.epoch, finished: h.finished, ready: h.ready, active, boot: h.boot };
                self.views.insert(author, view);
                if !h.addrs.is_empty() {
                    // A few addresses per peer: a heartbeat cannot make us dial a long list.
                    self.known.insert(author, h.addrs.iter().take(MAX_ADDRS_PER_PEER).cloned().collect());
                }
                if is_new {
                    for a in &h.addrs {
                        if let Ok(addr) = a.parse::<Multiaddr>() {
                            let _ = self.client.dial(Some(author), addr).await;
                        }
                    }
                }
            }
            Gossip::Announce(a) => {
                if let Some(c) = self.rs.heard(author, self.rs.members().get(&author).map_or(1, |m| m.incarnation), now) {
                    self.on_change(c);
                }
                let key = (a.round, author);
                if a.round < self.round || self.announces.contains_key(&key) {
                    return;
                }
                self.store.lock().expect("store lock").insert_announce(&author, a.clone());
                self.rs.contributed(a.round, author);
                if let Some(inline) = &a.inline {
                    let blob = inline.to_vec();
                    self.announces.insert(key, a.clone());
                    self.on_fetched(Fetched { round: a.round, owner: author, result: Ok(blob) });
                } else {
                    self.announces.insert(key, a.clone());
                    self.start_fetch(a.round, author);
                }
            }
        }
    }

    /// Fetches `owner`'s gradient for `round` in chunks, from the owner first and
    /// then from any other peer that has it.
    pub(super) fn start_fetch(&mut self, round: u64, owner: PeerId) {
        if !self.fetching.insert((round, owner)) {
            return;
        }
        let Some(a) = self.announces.get(&(round, owner)).cloned() else { return };
        let mut sources = vec![owner];
        sources.extend(self.rs.contributors(round).into_iter().filter(|p| *p != owner && *p != self.client.peer_id));
        let client = self.client.clone();
        let tx = self.fetch_tx.clone();
        tokio::spawn(async move {
            let mut last_err = String::from("no source");
            for attempt in 0..6 {
                let src = sources[attempt % sources.len()];
                match fetch_blob(&client, src, owner, round, a.len).await {
                    Ok(blob) if *blake3::hash(&blob).as_bytes() == a.digest => {
                        let _ = tx.send(Fetched { round, owner, result: Ok(blob) }).await;
                        return;
                    }
                    Ok(_) => last_err = format!("digest mismatch from {src}"),
                    Err(e) => last_err = e,
                }
                tokio::time::sleep(Duration::from_millis(100 << attempt.min(4))).await;
            }
            let _ = tx.send(Fetched { round, owner, result: Err(last_err) }).await;
        });
    }

    pub(super) fn on_fetched(&mut self, f: Fetched) {
        self.fetching.remove(&(f.round, f.owner));
        match f.result {
            Ok(blob) => {
                let Some(a) = self.announces.get(&(f.round, f.owner)) else { return };
                if *blake3::hash(&blob).as_bytes() != a.digest || blob.len() as u64 != a.len {
                    tracing::warn!("gradient of {} for round {} does not match its announcement", f.owner, f.round);
                    return;
                }
                self.store.lock().expect("store lock").insert(f.round, &f.owner, Arc::new(blob));
                self.rs.hold(f.round, f.owner);
            }
            Err(e) => {
                tracing::warn!("could not fetch the gradient of {} for round {}: {e}", f.owner, f.round);
                // Try again while the round is still ahead and its author alive.
                let wanted = f.round >= self.round && self.rs.is_alive(&f.owner);
                if wanted && self.announces.contains_key(&(f.round, f.owner)) {
                    self.start_fetch(f.round, f.owner);
                }
            }
        }
    }

    /// Waits until `ready` says so, pumping events; prints why while it waits.
    pub(super) async fn wait_until(&mut self, what: &str, mut ready: impl FnMut(&mut Node) -> bool) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let mut next_note = start + Duration::from_secs(10);
        while !ready(self) {
            self.pump().await?;
            if Instant::now() > next_note {
                tracing::info!("still waiting for {what} ({:.0} s)", start.elapsed().as_secs_f64());
                next_note = Instant::now() + Duration::from_secs(10);
            }
        }
        Ok(start.elapsed())
    }
}
