//! `PeerCore` with scripted inputs and a fake clock: what it does at the
//! barrier, behind the run, on a digest mismatch, at an epoch's boundary, in
//! asynchronous rounds, while joining, with a withholding member and with a
//! peer it has not admitted.

use super::core::*;
use crate::config::{run_spec, P2pConfig, TrainConfig};
use crate::train::{Convergence, UpdateJob, Updated};
use libp2p::gossipsub::MessageId;
use libp2p::{identity, PeerId};
use p2pml_proto::wire::{self, Announce, Gossip, Heartbeat, Response, SyncMode};
use p2pml_proto::Compression;

const NUMEL: usize = 4;

fn peer(i: u8) -> PeerId {
    let mut bytes = [i + 1; 32];
    identity::Keypair::ed25519_from_bytes(&mut bytes).expect("a key").public().to_peer_id()
}

/// A test world around one core: its peers, the clock, what it asked for.
struct World {
    core: PeerCore,
    ids: Vec<PeerId>,
    now: u64,
    out: Vec<Action>,
    msg: u64,
    cfg: TrainConfig,
    p2p: P2pConfig,
    /// The header of the last update asked for (what the trainer would write).
    update_header: Option<p2pml_proto::StateHeader>,
}

/// `peers` peers; the core is the one with the smallest id (`ids[0]`).
fn world(peers: usize, samples_per_peer: usize, tweak: impl FnOnce(&mut P2pConfig)) -> World {
    let cfg = TrainConfig { epochs: 3, batch_size: 4, val_size: 8, seed: 3, ..TrainConfig::default() };
    let mut p2p = P2pConfig {
        peers,
        min_peers: 2,
        batches_per_round: 1,
        compression: Compression::None,
        checkpoint_every: 0,
        start_grace_ms: 1000,
        metrics_addr: None,
        ..P2pConfig::default()
    };
    tweak(&mut p2p);
    let mut ids: Vec<PeerId> = (0..peers as u8 + 2).map(peer).collect();
    ids.sort();
    let n_train = samples_per_peer * peers + cfg.val_size;
    let s = PeerSettings {
        cfg: cfg.clone(),
        p2p: p2p.clone(),
        spec: run_spec(&cfg, &p2p),
        me: ids[0],
        incarnation: 1,
        boot: 7,
        n_train,
        val_all: (n_train - cfg.val_size..n_train).collect(),
        numel: NUMEL,
        compression: Compression::None,
        lr: 0.1,
        bootstrap: vec![],
        known: Default::default(),
        tier: false,
    };
    let mut core = PeerCore::new(s, Convergence::new(&p2p), None);
    let out = core.start(0, vec!["/ip4/127.0.0.1/tcp/1".into()]);
    World { core, ids, now: 0, out, msg: 0, cfg, p2p, update_header: None }
}

impl World {
    fn feed(&mut self, input: Input) -> &[Action] {
        self.out = self.core.on_input(self.now, input);
        if let Some(j) = self.update_job() {
            self.update_header = Some(j.header(0.1, 1, NUMEL as u64, 0));
        }
        &self.out
    }
    fn at(&mut self, ms: u64) -> &[Action] {
        self.now = ms;
        self.feed(Input::Tick)
    }
    fn gossip(&mut self, author: PeerId, g: Gossip) -> &[Action] {
        self.msg += 1;
        let id = MessageId::new(&self.msg.to_le_bytes());
        self.feed(Input::Gossip { id, propagated_by: author, author, data: wire::encode(&g) })
    }
    /// `p` connects and accepts our Hello.
    fn admit(&mut self, p: PeerId) {
        self.feed(Input::Connected(p));
        self.feed(Input::HelloAnswer { peer: p, result: Ok(Response::Hello { accepted: true, reason: None, round: 0 }) });
    }
    fn heartbeat(&mut self, p: PeerId, round: u64, f: impl FnOnce(&mut Heartbeat)) -> &[Action] {
        let mut h = Heartbeat {
            run_id: run_spec(&self.cfg, &self.p2p).run_id(),
            incarnation: 1,
            round,
            epoch: 0,
            last_digest: None,
            members: vec![],
            contributed: vec![],
            addrs: vec![],
            finished: false,
            ready: true,
            active: vec![],
            boot: 9,
        };
        f(&mut h);
        self.gossip(p, Gossip::Heartbeat(h))
    }
    fn announce(&mut self, p: PeerId, round: u64, samples: u64, f: impl FnOnce(&mut Announce)) -> &[Action] {
        let blob = p2pml_proto::encode_f32(&vec![samples as f32; NUMEL]).expect("f32");
        let mut a = crate::train::announcement(&run_spec(&self.cfg, &self.p2p).run_id(), round, 0, (samples, 1.0), &blob, None, vec![]);
        f(&mut a);
        self.gossip(p, Gossip::Announce(a))
    }
    /// Every other peer of the first `n` admitted and heard from, then the start.
    fn start_with(&mut self, n: usize) {
        for i in 1..n {
            let p = self.ids[i];
            self.admit(p);
            self.heartbeat(p, 0, |_| {});
        }
        let settle = 3 * self.p2p.heartbeat_ms + 1;
        self.at(self.now + settle);
    }
    fn compute_job(&self) -> Option<&ComputeJob> {
        self.out.iter().find_map(|a| if let Action::Compute(j) = a { Some(&**j) } else { None })
    }
    fn update_job(&self) -> Option<&UpdateJob> {
        self.out.iter().find_map(|a| if let Action::Update(j) = a { Some(&**j) } else { None })
    }
    fn syncs(&self) -> Vec<(PeerId, u64)> {
        self.out.iter().filter_map(|a| if let Action::Sync { peer, min_round } = a { Some((*peer, *min_round)) } else { None }).collect()
    }
    fn computed(&mut self, round: u64) -> &[Action] {
        let blob = p2pml_proto::encode_f32(&[1.0; NUMEL]).expect("f32");
        let g = OwnGradient { blob, parts: Vec::new(), samples: 4, loss_sum: 1.0, compute_secs: 0.0, upload_secs: 0.0, encode_secs: 0.0 };
        self.feed(Input::Computed { round, result: Ok(g) })
    }
    fn aggregated(&mut self, round: u64) -> &[Action] {
        self.feed(Input::Aggregated { round, grad: vec![0.5; NUMEL], samples: 12, loss: 3.0, decode_secs: 0.0, aggregate_secs: 0.0 })
    }
    /// Ticks at the core's deadlines (every other peer in `alive` heartbeating at
    /// `round` meanwhile) until an action matches `until`, for at most `max_ms`;
    /// returns every action asked for on the way.
    fn run_until(&mut self, alive: &[PeerId], round: u64, max_ms: u64, until: impl Fn(&Action) -> bool) -> Vec<Action> {
        let end = self.now + max_ms;
        let mut seen = Vec::new();
        while self.now < end {
            let at = self.core.next_deadline().clamp(self.now + 1, end);
            self.at(at);
            let done = self.out.iter().any(&until);
            seen.append(&mut self.out);
            if done {
                return seen;
            }
            for p in alive {
                self.heartbeat(*p, round, |_| {});
                seen.append(&mut self.out);
            }
        }
        panic!("nothing matched within {max_ms} ms: {seen:?}");
    }
    fn updated(&mut self, round: u64, digest: [u8; 32]) -> &[Action] {
        let header = self.update_header.take().expect("an update asked for");
        let state = p2pml_proto::encode_state(&header, &[0.0; NUMEL], &[]);
        self.feed(Input::Updated { round, updated: Updated { digest, state, params: None } })
    }
}

#[test]
fn a_released_barrier_leads_to_the_next_rounds_compute() {
    let mut w = world(3, 8, |_| {});
    w.start_with(3);
    assert!(w.out.iter().any(|a| matches!(a, Action::Ready { round: 0, epoch: 0 })), "{:?}", w.out);
    assert_eq!(w.compute_job().map(|j| (j.round, j.batch_ids.clone())), Some((0, 0..1)));
    w.computed(0);
    assert!(w.out.iter().any(|a| matches!(a, Action::Publish { topic, .. } if topic.ends_with("/epoch/0"))), "our announcement");
    assert_eq!(*w.core.phase(), Phase::Barrier { round: 0, quorum_ms: None }, "ours alone is no quorum");
    let (a, b) = (w.ids[1], w.ids[2]);
    w.announce(a, 0, 4, |_| {});
    assert!(!w.out.iter().any(|x| matches!(x, Action::Aggregate { .. })), "still waiting for {b}");
    assert_eq!(*w.core.phase(), Phase::Barrier { round: 0, quorum_ms: Some(w.now) }, "a quorum (2) is held, not everyone");
    w.announce(b, 0, 4, |_| {});
    let inputs = w.out.iter().find_map(|x| if let Action::Aggregate { round: 0, inputs } = x { Some(inputs.len()) } else { None });
    assert_eq!(inputs, Some(3), "released with every member's gradient");
    w.aggregated(0);
    let job = w.update_job().expect("update");
    assert_eq!((job.round, job.samples), (0, 12));
    w.updated(0, [1; 32]);
    assert!(w.out.iter().any(|a| matches!(a, Action::Round(r) if r.round == 0 && r.contributors == 3)));
    assert_eq!(w.compute_job().map(|j| j.round), Some(1), "the next round's compute");
}

#[test]
fn a_peer_two_rounds_behind_catches_up_by_state_sync_and_a_failed_sync_returns_to_the_barrier() {
    let mut w = world(3, 8, |_| {});
    w.start_with(3);
    w.computed(0);
    let ahead = w.ids[2];
    // One round ahead is not enough: it still waits for us.
    w.heartbeat(ahead, 1, |_| {});
    assert!(w.syncs().is_empty());
    w.heartbeat(ahead, 2, |_| {});
    assert_eq!(w.syncs(), vec![(ahead, 1)], "state after round 1 or later");
    assert_eq!(*w.core.phase(), Phase::CatchingUp { source: ahead });
    w.feed(Input::Synced { peer: ahead, result: Err("gone".into()) });
    assert!(matches!(w.core.phase(), Phase::Barrier { round: 0, .. }), "{:?}", w.core.phase());
    assert!(w.syncs().is_empty(), "a source that failed is skipped for a while");
}

#[test]
fn a_majority_digest_mismatch_resyncs_from_the_majority() {
    let mut w = world(4, 8, |_| {});
    w.start_with(4);
    w.computed(0);
    for i in 1..4 {
        let p = w.ids[i];
        w.announce(p, 0, 4, |_| {});
    }
    w.aggregated(0);
    for i in 1..4 {
        let p = w.ids[i];
        w.heartbeat(p, 1, |h| h.last_digest = Some((0, [9; 32])));
    }
    w.updated(0, [1; 32]);
    let syncs = w.syncs();
    assert_eq!(syncs.len(), 1, "{:?}", w.out);
    assert_eq!(syncs[0].1, 0, "the state of exactly the round we disagree on");
    assert_eq!(w.core.digest_mismatches, 1);
    // Once the state is loaded, the round's record gets its digest and the run goes on.
    let job_header = |w: &World| {
        let e = crate::train::EpochInfo { first_round: 0, members: w.ids[..4].to_vec(), active: w.ids[..4].to_vec(), next: vec![], withheld: vec![] };
        UpdateJob { grad: vec![], samples: 0, perturb: false, round: 0, epoch: 0, plateau: (0.0, 0), stopping: (0.0, 0), info: e, keep_params: false }
            .header(0.1, 1, NUMEL as u64, 0)
    };
    let header = job_header(&w);
    let bytes = std::sync::Arc::new(p2pml_proto::encode_state(&header, &[0.0; NUMEL], &[]));
    w.feed(Input::Synced { peer: syncs[0].0, result: Ok(SyncedState { header, digest: [9; 32], bytes }) });
    assert!(w.out.iter().any(|a| matches!(a, Action::RoundDigest(d) if *d == [9; 32])));
    assert_eq!(w.compute_job().map(|j| j.round), Some(1));
    assert_eq!(w.core.last_digest(), Some([9; 32]));
}

#[test]
fn an_epoch_boundary_takes_the_last_rounds_contributors_and_the_joiners_they_named() {
    // One batch per shard: every epoch is one round.
    let mut w = world(2, 4, |p| p.min_peers = 2);
    w.start_with(2);
    let (other, joiner) = (w.ids[1], w.ids[2]);
    // A ready peer joins during epoch 0: it is not a member of it.
    w.admit(joiner);
    w.heartbeat(joiner, 0, |_| {});
    w.computed(0);
    w.announce(other, 0, 4, |a| a.joiners = crate::train::ids(&[joiner]));
    w.aggregated(0);
    let job = w.update_job().expect("update");
    assert_eq!(job.info.next, {
        let mut v = vec![w.ids[0], other, joiner];
        v.sort();
        v
    }, "the next epoch: the contributors and the joiner they named");
    w.updated(0, [1; 32]);
    // The epoch's evaluation, then epoch 1 over three members.
    let val = w.out.iter().find_map(|a| if let Action::Evaluate { epoch: 0, val } = a { Some(val.len()) } else { None });
    assert_eq!(val, Some(4), "our half of the 8 validation samples");
    let test = p2pml_lambda_grad::Evaluation { loss: 1.0, accuracy: 0.5, samples: 10 };
    w.feed(Input::Evaluated { epoch: 0, val: Some(test.clone()), test });
    assert!(w.out.iter().any(|a| matches!(a, Action::Subscribe(t) if t.ends_with("/epoch/2"))));
    assert_eq!(w.core.sched.as_ref().map(|s| s.members.len()), Some(3));
    assert_eq!(w.compute_job().map(|j| (j.round, j.epoch)), Some((1, 1)));
}

#[test]
fn an_async_round_applies_each_peers_freshest_gradient_once_within_the_staleness_bound() {
    let mut w = world(3, 40, |p| p.sync = SyncMode::Async { max_staleness: 1 });
    w.start_with(3);
    let (a, b) = (w.ids[1], w.ids[2]);
    w.computed(0);
    w.announce(a, 0, 1, |_| {});
    assert!(!w.out.iter().any(|x| matches!(x, Action::Aggregate { .. })), "{b} has nothing within the bound");
    w.announce(b, 0, 2, |_| {});
    let sizes = |w: &World| w.out.iter().find_map(|x| if let Action::Aggregate { inputs, .. } = x { Some(inputs.iter().map(|i| i.0).collect::<Vec<_>>()) } else { None });
    assert_eq!(sizes(&w).map(|s| s.len()), Some(3));
    w.aggregated(0);
    w.updated(0, [1; 32]);
    // Round 1: a and b are one round behind, within the bound: no wait, and
    // their round-0 gradients, applied already, are not applied twice.
    w.computed(1);
    assert_eq!(sizes(&w), Some(vec![4]), "ours alone");
    w.announce(a, 1, 3, |_| {});
    w.aggregated(1);
    w.updated(1, [2; 32]);
    // Round 2: a's round-1 gradient is within the bound; b has nothing newer
    // than round 0, past the bound: wait for it.
    w.computed(2);
    assert_eq!(sizes(&w), None, "{b} is two rounds behind");
    w.announce(b, 2, 5, |_| {});
    let mut s = sizes(&w).expect("released once b is within the bound");
    s.sort();
    assert_eq!(s, vec![3, 4, 5], "ours, a's from round 1 and b's from round 2");
}

#[test]
fn a_joiner_at_an_epochs_last_round_waits_for_a_state_that_names_the_next_epoch() {
    let mut w = world(2, 8, |p| p.sync = SyncMode::Async { max_staleness: 0 });
    let src = w.ids[1];
    w.admit(src);
    w.heartbeat(src, 1, |_| {});
    let settled = 3 * w.p2p.heartbeat_ms + 1;
    w.at(settled);
    assert_eq!(w.syncs(), vec![(src, 0)], "the run is ahead: join it");
    // Two rounds an epoch (8 samples, 4 a batch, over 2 members): round 1 is the last.
    let info = crate::train::EpochInfo { first_round: 0, members: w.ids[..2].to_vec(), active: w.ids[..2].to_vec(), next: vec![], withheld: vec![] };
    let job = UpdateJob { grad: vec![], samples: 0, perturb: false, round: 1, epoch: 0, plateau: (0.0, 0), stopping: (0.0, 0), info, keep_params: false };
    let state = |job: &UpdateJob| {
        let h = job.header(0.1, 2, NUMEL as u64, 0);
        SyncedState { bytes: std::sync::Arc::new(p2pml_proto::encode_state(&h, &[0.0; NUMEL], &[])), header: h, digest: [2; 32] }
    };
    w.feed(Input::Synced { peer: src, result: Ok(state(&job)) });
    assert!(matches!(w.core.phase(), Phase::Joining { source: None, .. }), "{:?}", w.core.phase());
    assert!(w.at(settled + 100).iter().all(|a| !matches!(a, Action::Sync { .. })), "not before 200 ms");
    w.at(settled + 220);
    assert_eq!(w.syncs(), vec![(src, 0)], "asked again");
    let mut named = job;
    named.info.next = w.ids[..2].to_vec();
    w.feed(Input::Synced { peer: src, result: Ok(state(&named)) });
    assert!(w.out.iter().any(|a| matches!(a, Action::Ready { round: 2, .. })), "{:?}", w.out);
    // Epoch 0's evaluation, as every member does at its end, then epoch 1.
    let e = p2pml_lambda_grad::Evaluation { loss: 1.0, accuracy: 0.5, samples: 10 };
    w.feed(Input::Evaluated { epoch: 0, val: Some(e.clone()), test: e });
    assert_eq!(w.core.sched.as_ref().map(|s| (s.epoch, s.first_round)), Some((1, 2)), "it trains epoch 1 from round 2");
    assert_eq!(w.compute_job().map(|j| (j.round, j.epoch)), Some((2, 1)));
}

#[test]
fn a_withholding_member_is_closed_out_on_the_deadline_and_demoted_after_three_rounds() {
    let mut w = world(4, 40, |p| p.min_peers = 3);
    w.start_with(4);
    let quiet = w.ids[3];
    let mut demoted = false;
    for round in 0..3 {
        w.computed(round);
        for i in 1..3 {
            let p = w.ids[i];
            w.announce(p, round, 4, |_| {});
        }
        // It stays alive (heartbeats) but never announces.
        w.heartbeat(quiet, round, |_| {});
        assert!(!w.out.iter().any(|x| matches!(x, Action::Aggregate { .. })));
        let alive = [w.ids[1], w.ids[2], quiet];
        let seen = w.run_until(&alive, round, 60_000, |x| matches!(x, Action::Deadline { .. }));
        let deadline_line = seen.iter().any(|x| matches!(x, Action::Deadline { missing, .. } if missing == &vec![quiet.to_string()]));
        assert!(deadline_line, "round {round} closed without it: {seen:?}");
        demoted |= seen.iter().any(|x| matches!(x, Action::Membership { peer, event: p2pml_proto::line::MemberEvent::Withholding, .. } if *peer == quiet));
        w.aggregated(round);
        w.updated(round, [round as u8; 32]);
        for i in 1..3 {
            let p = w.ids[i];
            w.heartbeat(p, round + 1, |_| {});
        }
    }
    assert!(demoted, "three missed rounds in a row demote it");
    assert!(!w.core.rs.is_active(&quiet));
    assert_eq!(w.core.admission.deadline_rounds, vec![0, 1, 2]);
}

#[test]
fn an_unadmitted_peers_heartbeats_and_announcements_are_ignored_and_counted() {
    let mut w = world(3, 8, |_| {});
    let stranger = w.ids[4];
    w.feed(Input::Connected(stranger));
    assert!(w.out.iter().any(|a| matches!(a, Action::Hello { peer } if *peer == stranger)));
    // No answer to our Hello, and it never sent one: not admitted.
    for _ in 0..3 {
        w.heartbeat(stranger, 0, |_| {});
        assert!(w.out.iter().any(|a| matches!(a, Action::Verdict { verdict: Verdict::Ignore, .. })), "ignored, not forwarded");
    }
    w.announce(stranger, 0, 4, |_| {});
    assert!(w.out.iter().any(|a| matches!(a, Action::Verdict { verdict: Verdict::Ignore, .. })));
    assert!(!w.core.rs.members().contains_key(&stranger), "a heartbeat alone makes nobody a member");
    let report = w.core.unadmitted_report();
    assert_eq!((report.len(), report[0].heartbeats), (1, 3));
    // Our Hello is sent again (at most every 3 s) while it heartbeats unadmitted.
    w.now = 3500;
    w.heartbeat(stranger, 0, |_| {});
    assert!(w.out.iter().any(|a| matches!(a, Action::Hello { peer } if *peer == stranger)));
}
