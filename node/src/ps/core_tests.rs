use super::*;
use crate::config::run_spec;

fn pid(i: u64) -> PeerId {
    crate::net::key_from_seed(i).public().to_peer_id()
}

/// Two workers of 20 samples each in batches of 10: two rounds an epoch, two epochs.
fn settings() -> ServerSettings {
    let cfg = TrainConfig { val_size: 100, batch_size: 10, epochs: 2, ..TrainConfig::default() };
    let p2p = P2pConfig { peers: 2, min_peers: 2, batches_per_round: 1, compression: Compression::None, checkpoint_every: 1, ..P2pConfig::default() };
    let spec = run_spec(&cfg, &p2p);
    ServerSettings { spec, me: pid(100), incarnation: 1, n_train: 140, val_all: (0..100).collect(), numel: 4, compression: Compression::None, lr: 0.01, cfg, p2p }
}

/// A core with its fake clock and request ids.
struct Script {
    core: ServerCore,
    now: u64,
    id: RequestId,
}

impl Script {
    fn new(resume: Option<StateHeader>) -> Self {
        let s = settings();
        let conv = Convergence::new(&s.p2p);
        Script { core: ServerCore::new(s, vec![0.0; 4], conv, resume), now: 0, id: 0 }
    }
    fn input(&mut self, at: u64, i: Input) -> Vec<Action> {
        self.now = at;
        self.core.on_input(at, i)
    }
    fn ask(&mut self, at: u64, peer: u64, request: Request) -> Vec<Action> {
        self.id += 1;
        let id = self.id;
        self.input(at, Input::Request { id, peer: pid(peer), request })
    }
    fn join(&mut self, at: u64, peer: u64) -> Vec<Action> {
        let spec = self.core.s.spec.clone();
        let mut out = self.ask(at, peer, Request::Hello { spec });
        out.extend(self.ask(at, peer, Request::PsHeartbeat { incarnation: 1 }));
        out
    }
    fn push(&mut self, at: u64, peer: u64, round: u64, grad: &[f32]) -> Vec<Action> {
        let epoch = self.core.sched.as_ref().map_or(0, |s| s.epoch);
        let blob = p2pml_proto::encode_f32(grad).unwrap();
        let a = Announce {
            run_id: self.core.run_id.clone(),
            round,
            epoch,
            samples: 10,
            loss_sum: 2.0,
            val: None,
            len: blob.len() as u64,
            digest: *blake3::hash(&blob).as_bytes(),
            inline: Some(serde_bytes::ByteBuf::from(blob)),
            joiners: vec![],
            shards: Vec::new(),
        };
        self.ask(at, peer, Request::PsPush(Box::new(a)))
    }
}

fn acks(out: &[Action]) -> Vec<bool> {
    out.iter()
        .filter_map(|a| match a {
            Action::Respond { response: Response::PsAck { accepted, .. }, .. } => Some(*accepted),
            _ => None,
        })
        .collect()
}

fn aggregate_inputs(out: &[Action]) -> Option<usize> {
    out.iter().find_map(|a| match a {
        Action::Aggregate { inputs, .. } => Some(inputs.len()),
        _ => None,
    })
}

fn updated(digest: u8) -> Input {
    Input::Updated(Updated { digest: [digest; 32], state: vec![1, 2, 3], params: Some(Arc::new(vec![0.5; 4])) })
}

#[test]
fn the_run_starts_with_every_worker_and_the_barrier_releases_on_their_pushes() {
    let mut s = Script::new(None);
    assert!(s.join(10, 1).iter().any(|a| matches!(a, Action::Membership { event: MemberEvent::Joined, .. })));
    assert_eq!(s.core.phase(), Phase::Starting, "one of two workers");
    let out = s.join(20, 2);
    assert!(out.iter().any(|a| matches!(a, Action::Ready { round: 0, epoch: 0 })), "{out:?}");
    assert_eq!(s.core.phase(), Phase::Open);
    // A poll for round 0 is answered at once.
    let out = s.ask(30, 1, Request::PsPoll { round: 0, incarnation: 1 });
    assert!(matches!(&out[..], [Action::Respond { response: Response::PsWork(w), .. }] if w.round == 0 && w.active && !w.waiting));
    let out = s.push(100, 1, 0, &[1.0; 4]);
    assert_eq!(acks(&out), [true]);
    assert_eq!(aggregate_inputs(&out), None, "worker 2 is still expected");
    assert_eq!(acks(&s.push(110, 1, 0, &[1.0; 4])), [false], "one push a round");
    // Worker 1 pushed: its poll for round 1 is held (until the round comes, or
    // the hold expires: then it is told to wait and ask again).
    assert!(s.ask(120, 1, Request::PsPoll { round: 1, incarnation: 1 }).is_empty());
    assert!(s.core.next_deadline() <= 120 + POLL_HOLD_MS);
    // (Both stay alive: heartbeats within the failure timeout.)
    s.ask(1500, 1, Request::PsHeartbeat { incarnation: 1 });
    s.ask(1500, 2, Request::PsHeartbeat { incarnation: 1 });
    let out = s.input(120 + POLL_HOLD_MS, Input::Tick);
    assert!(matches!(&out[..], [Action::Respond { response: Response::PsWork(w), .. }] if w.waiting), "{out:?}");
    let hold_from = 120 + POLL_HOLD_MS;
    assert!(s.ask(hold_from + 1, 1, Request::PsPoll { round: 1, incarnation: 1 }).is_empty(), "asked again: held again");
    let out = s.push(hold_from + 30, 2, 0, &[3.0; 4]);
    assert_eq!(aggregate_inputs(&out), Some(2));
    assert_eq!(s.core.phase(), Phase::Aggregating);
    let out = s.input(hold_from + 40, Input::Aggregated { round: 0, grad: vec![0.1; 4], samples: 20, loss: 4.0, decode_secs: 0.0, aggregate_secs: 0.0 });
    let Some(Action::Update(job)) = out.iter().find(|a| matches!(a, Action::Update(_))) else { panic!("{out:?}") };
    assert_eq!((job.round, job.samples, job.keep_params), (0, 20, true));
    let out = s.input(hold_from + 80, updated(7));
    assert!(out.iter().any(|a| matches!(a, Action::Checkpoint { meta, .. } if meta.round == 0)));
    let round = out.iter().find_map(|a| if let Action::Round(r) = a { Some(r) } else { None }).expect("a round record");
    assert_eq!((round.round, round.contributors, round.samples, round.loss_total), (0, 2, 20, 4.0));
    assert!((round.stages.barrier_wait - (hold_from + 10) as f64 / 1e3).abs() < 1e-9, "opened at 20");
    assert!((round.stages.update - 0.04).abs() < 1e-9);
    assert_eq!((s.core.round(), s.core.phase()), (1, Phase::Open));
    // The poll held since then is answered: round 1 has come.
    assert!(out.iter().any(|a| matches!(a, Action::Respond { response: Response::PsWork(w), .. } if w.round == 1 && !w.waiting)), "{out:?}");
    assert_eq!(s.core.last_digest(), [7; 32]);
}

#[test]
fn a_gradient_that_does_not_decode_demotes_its_worker_and_a_silent_one_is_declared_dead() {
    let mut s = Script::new(None);
    s.join(0, 1);
    s.join(0, 2);
    // Three floats for a model of four: accepted as a push, refused at decoding.
    let out = s.push(50, 1, 0, &[1.0; 3]);
    assert!(out.iter().any(|a| matches!(a, Action::InvalidPush)), "{out:?}");
    assert_eq!(aggregate_inputs(&out), None);
    let out = s.push(60, 2, 0, &[1.0; 4]);
    assert_eq!(aggregate_inputs(&out), Some(1), "the demoted worker is not waited for");
    s.input(70, Input::Aggregated { round: 0, grad: vec![0.0; 4], samples: 10, loss: 2.0, decode_secs: 0.0, aggregate_secs: 0.0 });
    s.input(80, updated(1));
    let out = s.push(90, 1, 1, &[1.0; 4]);
    assert_eq!(acks(&out), [false], "it sits out the rest of the epoch");
    // Worker 2 falls silent: after the failure timeout it is dead and round 1
    // waits for nobody (worker 1 is demoted): the barrier releases empty.
    let out = s.input(90 + 2_500, Input::Tick);
    assert!(out.iter().any(|a| matches!(a, Action::Membership { event: MemberEvent::Died, .. })), "{out:?}");
}

#[test]
fn the_same_inputs_at_the_same_times_give_the_same_actions() {
    let trace = || {
        let mut s = Script::new(None);
        let mut all = Vec::new();
        all.extend(s.join(0, 1));
        all.extend(s.join(5, 2));
        all.extend(s.push(50, 1, 0, &[1.0; 4]));
        all.extend(s.push(60, 2, 0, &[2.0; 4]));
        all.extend(s.input(70, Input::Aggregated { round: 0, grad: vec![0.0; 4], samples: 20, loss: 4.0, decode_secs: 0.0, aggregate_secs: 0.0 }));
        all.extend(s.input(80, updated(3)));
        all.extend(s.input(3000, Input::Tick));
        format!("{all:?}")
    };
    assert_eq!(trace(), trace());
}

#[test]
fn a_restarted_server_resumes_after_its_checkpoint_with_its_demotions() {
    let h = StateHeader {
        round: 2,
        epoch: 1,
        lr: 0.01,
        opt_steps: 3,
        numel: 4,
        opt_vectors: 1,
        plateau: (1.0, 0),
        stopping: (1.0, 0),
        epoch_start: 2,
        epoch_members: ids(&[pid(1), pid(2)]),
        active: ids(&[pid(2)]),
        next_members: vec![],
        withheld: vec![],
    };
    let mut s = Script::new(Some(h));
    s.join(0, 1);
    let out = s.join(0, 2);
    assert!(out.iter().any(|a| matches!(a, Action::Ready { round: 3, epoch: 1 })), "{out:?}");
    let out = s.ask(10, 1, Request::PsPoll { round: 3, incarnation: 1 });
    assert!(matches!(&out[..], [Action::Respond { response: Response::PsWork(w), .. }] if w.round == 3 && !w.active), "{out:?}");
    // Round 3 is the epoch's last: its update leads to the evaluation, and the
    // second epoch is the run's last: the run finishes.
    assert_eq!(acks(&s.push(20, 1, 3, &[1.0; 4])), [false], "worker 1 follows until the next epoch");
    let out = s.push(20, 2, 3, &[1.0; 4]);
    assert_eq!(aggregate_inputs(&out), Some(1), "{out:?}");
    s.input(30, Input::Aggregated { round: 3, grad: vec![0.0; 4], samples: 10, loss: 2.0, decode_secs: 0.0, aggregate_secs: 0.0 });
    let out = s.input(40, updated(9));
    assert!(out.iter().any(|a| matches!(a, Action::Evaluate)), "round 3 ends the epoch: {out:?}");
    let e = Evaluation { loss: 1.0, accuracy: 0.5, samples: 100 };
    let out = s.input(50, Input::Evaluated { val: e, test: e });
    assert!(out.iter().any(|a| matches!(a, Action::Epoch { epoch: 1, .. })), "{out:?}");
    assert!(matches!(s.core.phase(), Phase::Finishing { .. }), "the second epoch was the last");
    // Each worker hears the run is over; then the server is done.
    let out = s.ask(60, 1, Request::PsPoll { round: 4, incarnation: 1 });
    assert!(matches!(&out[..], [Action::Respond { response: Response::PsWork(w), .. }] if w.finished), "{out:?}");
    assert!(matches!(s.core.phase(), Phase::Finishing { .. }));
    let out = s.ask(70, 2, Request::PsPoll { round: 4, incarnation: 1 });
    assert!(out.iter().any(|a| matches!(a, Action::Done)), "{out:?}");
}
