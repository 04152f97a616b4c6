//! The peer core's vocabulary: its inputs and actions, its phases, its
//! settings, what it hands the report, and why it fails.

use crate::fetch::Fetched;
use crate::report::{AdmissionReport, ScoreSeen};
use crate::train::{UpdateJob, Updated};
use crate::checkpoint::CheckpointMeta;
use crate::config::{P2pConfig, TrainConfig};
use crate::report::RoundDone;
use libp2p::gossipsub::MessageId;
use libp2p::{Multiaddr, PeerId};
use p2pml_lambda_grad::Evaluation;
use p2pml_proto::line::MemberEvent;
use p2pml_proto::wire::{Announce, Digest, Part, Request, Response, RunSpec};
use p2pml_proto::{Compression, StateHeader};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The driver's handle on a request it must answer (its response channel).
pub(crate) type RequestId = u64;

/// This peer's gradient of a round, computed and encoded by the driver.
#[derive(Debug)]
pub(crate) struct OwnGradient {
    /// The whole gradient encoded (all-to-all; empty when sharded).
    pub(crate) blob: Vec<u8>,
    /// Sharded exchange: each shard of the gradient encoded on its own.
    pub(crate) parts: Vec<Vec<u8>>,
    pub(crate) samples: u64,
    pub(crate) loss_sum: f64,
    pub(crate) compute_secs: f64,
    pub(crate) upload_secs: f64,
    pub(crate) encode_secs: f64,
}

/// A state obtained from a peer and loaded into the trainer.
#[derive(Debug)]
pub(crate) struct SyncedState {
    pub(crate) header: StateHeader,
    /// The digest of the parameters loaded.
    pub(crate) digest: Digest,
    /// The state as received (served on to others).
    pub(crate) bytes: Arc<Vec<u8>>,
}

/// What happens to the peer.
#[derive(Debug)]
pub(crate) enum Input {
    Tick,
    /// Stop now (the driver was asked to): finish after this round's bookkeeping.
    Shutdown,
    /// The network task is gone.
    NetStopped,
    Connected(PeerId),
    Disconnected(PeerId),
    DialFailed { error: String },
    Gossip { id: MessageId, propagated_by: PeerId, author: PeerId, data: Vec<u8> },
    Request { id: RequestId, peer: PeerId, request: Request },
    /// The answer to our Hello (or why there was none).
    HelloAnswer { peer: PeerId, result: Result<Response, String> },
    Fetched(Fetched),
    /// An announcement asked for over request-response ([`Announce::missing`] if none was found).
    Recovered { owner: PeerId, announce: Announce },
    /// The swarm's peer scores and listen addresses (asked for at each heartbeat).
    NetInfo { scores: Vec<(PeerId, f64)>, addrs: Vec<String> },
    /// This peer's gradient of `round`, or why it could not be had (fatal).
    Computed { round: u64, result: Result<OwnGradient, String> },
    /// Sharded exchange: our aggregate of a shard we own (or why there is none).
    ShardAggregated { round: u64, shard: usize, result: Result<crate::train::ShardAggregate, String> },
    /// The round's aggregation.
    Aggregated { round: u64, grad: Vec<f32>, samples: u64, loss: f64, decode_secs: f64, aggregate_secs: f64 },
    Updated { round: u64, updated: Updated },
    Evaluated { epoch: u64, val: Option<Evaluation>, test: Evaluation },
    /// A state sync from `peer` (see [`Action::Sync`]).
    Synced { peer: PeerId, result: Result<SyncedState, String> },
    /// The trainer's parameters' digest at the end.
    FinalDigest(Digest),
}

/// A gossip message's fate: forwarded, rejected (its sender scored down) or ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Accept,
    Reject,
    Ignore,
}

/// Where this peer's gradient of a round is computed and how (for the driver).
#[derive(Debug)]
pub(crate) struct ComputeJob {
    pub(crate) round: u64,
    pub(crate) epoch: u64,
    /// The whole epoch's batches of this peer, and the indices of this round's.
    pub(crate) epoch_batches: Arc<Vec<Vec<usize>>>,
    pub(crate) batch_ids: std::ops::Range<usize>,
    /// The digest of the parameters the gradient is computed at.
    pub(crate) params_digest: Option<Digest>,
    /// The epoch's active members (who uploads the parameters to the tier).
    pub(crate) members: Vec<PeerId>,
    /// The seed of the gradient's encoding.
    pub(crate) seed: u64,
    /// Sharded exchange: the ranges encoded each on its own (empty: the whole gradient).
    pub(crate) shards: Vec<std::ops::Range<usize>>,
}

/// What the driver does for the core, without awaiting anything in its loop.
#[derive(Debug)]
pub(crate) enum Action {
    /// `gradient`: our announcement, whose send time is the round's "send" stage.
    Publish { topic: String, data: Vec<u8>, gradient: bool },
    Verdict { id: MessageId, propagated_by: PeerId, verdict: Verdict },
    Subscribe(String),
    Unsubscribe(String),
    Dial { peer: PeerId, addr: Multiaddr },
    /// Close the connections to `peer` after `after_ms`.
    Disconnect { peer: PeerId, after_ms: u64 },
    /// Send `peer` our Hello; the answer comes back as [`Input::HelloAnswer`].
    Hello { peer: PeerId },
    Respond { id: RequestId, response: Response },
    /// Leave a request unanswered (it fails at its sender).
    Drop { id: RequestId },
    /// Fetch `owner`'s gradient of `round` (`len` bytes, blake3 `digest`) from
    /// these sources in turn, with the fetch's retry policy: [`Input::Fetched`].
    /// `part`: a shard's contribution or aggregate (sharded exchange).
    Fetch { round: u64, owner: PeerId, part: Option<Part>, sources: Vec<PeerId>, len: u64, digest: Digest },
    /// Ask these sources for `owner`'s announcement of `round`: [`Input::Recovered`].
    Recover { round: u64, owner: PeerId, sources: Vec<PeerId> },
    /// Ask the swarm for its peer scores and listen addresses: [`Input::NetInfo`].
    NetInfo,
    Compute(Box<ComputeJob>),
    /// Aggregate these (samples, loss, blob) inputs, in this order: [`Input::Aggregated`].
    Aggregate { round: u64, inputs: Vec<(u64, f64, Arc<Vec<u8>>)> },
    /// Sharded exchange: aggregate shard `shard` (`len` values) from these
    /// contributions, in this order, and encode it with `seed`: [`Input::ShardAggregated`].
    AggregateShard { round: u64, shard: usize, len: usize, seed: u64, inputs: Vec<(u64, f64, Arc<Vec<u8>>)> },
    /// Sharded exchange: decode the aggregated shards into the round's
    /// gradient: [`Input::Aggregated`] with these samples and loss.
    Assemble { round: u64, parts: Vec<(std::ops::Range<usize>, Arc<Vec<u8>>)>, samples: u64, loss: f64 },
    Update(Box<UpdateJob>),
    /// Evaluate the test set, and these validation samples: [`Input::Evaluated`].
    Evaluate { epoch: u64, val: Vec<usize> },
    SetLr(f64),
    /// Fetch `peer`'s state after round `min_round` or later and load it: [`Input::Synced`].
    Sync { peer: PeerId, min_round: u64 },
    /// Write a checkpoint (the driver stamps the wall-clock time).
    Checkpoint { meta: CheckpointMeta, state: Arc<Vec<u8>> },
    /// A peer declared us dead: the next start must have a higher incarnation.
    NoteIncarnation(u64),
    /// The peer holds the run's state and trains (the `ready` line).
    Ready { round: u64, epoch: u64 },
    Round(Box<RoundDone>),
    /// The last round's digest after a re-sync replaced its state.
    RoundDigest(Digest),
    Epoch { epoch: u64, test: Evaluation, lr: f64 },
    /// The validation figures of the epoch just reported.
    Validation { loss: f64, accuracy: f64 },
    Membership { peer: PeerId, event: MemberEvent, incarnation: u64 },
    /// A round closed on the straggler deadline without these members (the `deadline` line).
    Deadline { round: u64, missing: Vec<String> },
    /// Connected peers and live members, for the metrics.
    Gauges { connected: usize, live: usize },
    /// A round is over: the function tier's costs into the metrics.
    Costs { state_syncs: u64 },
    /// Ask the trainer for its parameters' digest: [`Input::FinalDigest`].
    FinalDigest,
    /// The run is over for this peer: stop.
    Done,
    /// The run cannot go on.
    Fail(PeerError),
}

/// Why a peer cannot go on (one line that says what to do).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub(crate) enum PeerError {
    #[error("cannot reach any bootstrap peer ({addrs}) within 30 s{why}: check the address, that the peer runs, and that both use the same --swarm-key (or neither)")]
    Unreachable { addrs: String, why: String },
    #[error("peer {peer} refused to let this node join: {reason}. Start the node with the run's settings or start a new run")]
    Refused { peer: PeerId, reason: String },
    #[error("could not obtain the run's state within 120 s")]
    JoinTimeout,
    #[error("{0}")]
    Schedule(String),
    #[error("{0}")]
    Compute(String),
    #[error("the network task stopped")]
    NetStopped,
}

/// Where the peer is in the run.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Phase {
    /// Waiting to be admitted by a bootstrap peer (or a peer the checkpoint knows).
    Connecting,
    /// Waiting for the start rule (or for a peer ahead of us).
    Gathering,
    /// Late heartbeats get a moment, so that every peer starts from the same membership.
    Settling { until_ms: u64 },
    /// Joining a run in progress: a state sync is out (`syncing`) or is tried again at `retry_ms`.
    Joining { source: Option<PeerId>, retry_ms: u64 },
    /// The next round (or the epoch's end) is to be taken.
    Next,
    /// The epoch's evaluation is out.
    Evaluating { epoch: u64 },
    /// This peer's gradient of `round` is being computed.
    Computing { round: u64 },
    /// Waiting for the round's gradients; `quorum_ms`: when a quorum was first held.
    Barrier { round: u64, quorum_ms: Option<u64> },
    /// The run is two rounds ahead: a state sync from `source` is out.
    CatchingUp { source: PeerId },
    Aggregating { round: u64 },
    Updating { round: u64 },
    /// Our digest differs from the majority's: a state sync from `source` is out.
    Resyncing { source: PeerId },
    /// Finished: serving the others until they have passed our last round.
    Lingering { since_ms: u64 },
    /// The final digest is being asked for.
    Closing,
    /// Fault injection (--fault-garbage, --fault-heartbeat-only): no training,
    /// until the run's peers have finished or gone.
    Rogue { alone_ms: Option<u64> },
    Done,
    Failed,
}

/// The peer's fixed settings.
pub(crate) struct PeerSettings {
    pub(crate) cfg: TrainConfig,
    pub(crate) p2p: P2pConfig,
    pub(crate) spec: RunSpec,
    pub(crate) me: PeerId,
    pub(crate) incarnation: u64,
    /// This process's start (unix ms; heartbeats carry it, a change means a restart).
    pub(crate) boot: u64,
    pub(crate) n_train: usize,
    pub(crate) val_all: Vec<usize>,
    pub(crate) numel: usize,
    pub(crate) compression: Compression,
    pub(crate) lr: f64,
    /// The --bootstrap peers and addresses.
    pub(crate) bootstrap: Vec<(PeerId, Multiaddr)>,
    /// Every peer's addresses the restored checkpoint remembers.
    pub(crate) known: BTreeMap<PeerId, Vec<String>>,
    /// The function tier computes (the update keeps the parameters for it).
    pub(crate) tier: bool,
}

/// A checkpoint this peer resumes from.
pub(crate) struct Resumed {
    pub(crate) header: StateHeader,
    pub(crate) digest: Digest,
    pub(crate) state: Arc<Vec<u8>>,
}

/// What the core hands the report at the end.
#[derive(Debug, Default)]
pub(crate) struct PeerOutcome {
    pub(crate) rounds: u64,
    pub(crate) final_digest: Option<Digest>,
    pub(crate) stopped_early: bool,
    pub(crate) gradient_bytes_sent: u64,
    pub(crate) digest_mismatches: u64,
    pub(crate) state_syncs: u64,
    pub(crate) catch_ups: u64,
    pub(crate) garbage_sent: u64,
    pub(crate) rogue: bool,
    pub(crate) peer_scores: BTreeMap<String, ScoreSeen>,
    pub(crate) admission: AdmissionReport,
}

