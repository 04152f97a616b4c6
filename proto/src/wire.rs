//! Messages between peers, their size limits and their validation.
//!
//! Gossip carries small things (heartbeats with the barrier's CRDT state, gradient
//! announcements); gradients larger than [`INLINE_MAX_BYTES`] are fetched in chunks
//! over request-response from any peer that holds them. Everything is CBOR
//! (cbor4ii through serde); byte strings are CBOR byte strings (`serde_bytes`).

use crate::spec::{DatasetKind, ModelKind, Normalization, OptimizerKind};
use serde::{Deserialize, Serialize};

/// Gossipsub's transmit cap for our topics.
pub const MAX_GOSSIP_BYTES: usize = 64 * 1024;
/// Gradients up to this size ride inline in their announcement.
pub const INLINE_MAX_BYTES: usize = 48 * 1024;
/// Size of one chunk of a fetched gradient or state blob.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Request-response caps: requests are tiny, responses at most one chunk plus framing.
pub const MAX_REQUEST_BYTES: u64 = 64 * 1024;
pub const MAX_RESPONSE_BYTES: u64 = CHUNK_BYTES as u64 + 64 * 1024;
/// Largest gradient or parameter blob accepted (256 Mi f32 values).
pub const MAX_BLOB_BYTES: u64 = 1 << 30;
/// How many rounds ahead of or behind our own a message may be.
pub const ROUND_WINDOW: u64 = 64;

/// How peers synchronise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncMode {
    /// Barrier every round; every fault-free peer holds bit-identical parameters.
    Sync,
    /// No barrier: apply the freshest gradient of each peer at most this many rounds old.
    Async { max_staleness: u64 },
}

/// What every peer of a run must agree on. A node whose spec differs is refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    pub model: ModelKind,
    pub dataset: DatasetKind,
    pub normalization: Normalization,
    pub seed: u64,
    pub peers: usize,
    pub min_peers: usize,
    pub batch_size: usize,
    pub batches_per_round: usize,
    pub epochs: u64,
    pub optimizer: OptimizerKind,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub val_size: usize,
    pub limit_train: usize,
    pub limit_test: usize,
    pub compression: String,
    pub sync: SyncMode,
    pub failure_timeout_ms: u64,
    /// The aggregation rule, in its canonical spelling ([`crate::Aggregation`]);
    /// `mean` when a peer of an older version leaves it out.
    #[serde(default = "mean")]
    pub aggregation: String,
    /// The straggler deadline's settings, canonical (`factor=4,floor_ms=3000,...`);
    /// empty when a peer of an older version leaves it out.
    #[serde(default)]
    pub straggler: String,
    /// How gradients travel; left out (all-to-all) by older peers, and when
    /// all-to-all, so that such runs keep their run id.
    #[serde(default, skip_serializing_if = "crate::Exchange::is_all_to_all")]
    pub exchange: crate::Exchange,
}

fn mean() -> String {
    "mean".into()
}

impl RunSpec {
    /// The run's identity: a hash of its canonical CBOR encoding, as hex.
    pub fn run_id(&self) -> String {
        let bytes = encode(self);
        // FNV-1a, 64 bit: an identifier, not a security boundary.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{h:016x}")
    }

    /// The fields where `other` differs, as "name: ours vs theirs".
    pub fn differences(&self, other: &RunSpec) -> Vec<String> {
        let a = serde_json_like(self);
        let b = serde_json_like(other);
        a.iter()
            .zip(b.iter())
            .filter(|(x, y)| x.1 != y.1)
            .map(|(x, y)| format!("{}: {} vs {}", x.0, x.1, y.1))
            .collect()
    }
}

fn serde_json_like(s: &RunSpec) -> Vec<(&'static str, String)> {
    vec![
        ("model", s.model.to_string()),
        ("dataset", s.dataset.to_string()),
        ("normalization", s.normalization.to_string()),
        ("seed", s.seed.to_string()),
        ("peers", s.peers.to_string()),
        ("min_peers", s.min_peers.to_string()),
        ("batch_size", s.batch_size.to_string()),
        ("batches_per_round", s.batches_per_round.to_string()),
        ("epochs", s.epochs.to_string()),
        ("optimizer", s.optimizer.to_string()),
        ("lr", s.lr.to_string()),
        ("momentum", s.momentum.to_string()),
        ("weight_decay", s.weight_decay.to_string()),
        ("val_size", s.val_size.to_string()),
        ("limit_train", s.limit_train.to_string()),
        ("limit_test", s.limit_test.to_string()),
        ("compression", s.compression.clone()),
        ("sync", format!("{:?}", s.sync)),
        ("failure_timeout_ms", s.failure_timeout_ms.to_string()),
        ("aggregation", s.aggregation.clone()),
        ("straggler", s.straggler.clone()),
        ("exchange", s.exchange.to_string()),
    ]
}

/// The validation statistics drive every peer's lr schedule and early stop.
fn check_val(v: &ValStats) -> Result<(), WireError> {
    if !v.loss_sum.is_finite() || v.correct > v.count {
        return Err(WireError::Invalid("validation statistics out of range".into()));
    }
    Ok(())
}

/// A 32-byte content digest (BLAKE3 of the bytes it names).
pub type Digest = [u8; 32];

/// One member as the sender sees it: the state-based CRDT of membership.
/// Merge: the higher incarnation wins; at equal incarnation `alive == false` wins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberEntry {
    #[serde(with = "serde_bytes")]
    pub peer: Vec<u8>,
    pub incarnation: u64,
    pub alive: bool,
}

/// Published on the control topic every heartbeat interval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub run_id: String,
    pub incarnation: u64,
    /// The round the sender is working on.
    pub round: u64,
    pub epoch: u64,
    /// Digest of the sender's parameters after its last completed round.
    pub last_digest: Option<(u64, Digest)>,
    /// The sender's view of the membership.
    pub members: Vec<MemberEntry>,
    /// The sender's view of the barrier: for recent rounds, who has contributed.
    pub contributed: Vec<(u64, Vec<serde_bytes::ByteBuf>)>,
    /// Listen addresses, so that peers learn each other through gossip as well as Kademlia.
    pub addrs: Vec<String>,
    /// Set when the sender has finished the run and is only serving data.
    pub finished: bool,
    /// Set when the sender holds the run's state (it started with the run or has
    /// synced) and can train from the next epoch on.
    pub ready: bool,
    /// The members of the sender's current epoch that still train in it (not
    /// demoted by a death or a restart): a peer that has just synced from the
    /// sender learns from this whether it is waited for.
    #[serde(default)]
    pub active: Vec<serde_bytes::ByteBuf>,
    /// Identifies this start of the sender's process: a change means it restarted
    /// (and lost its place in the epoch), even if nobody saw it die.
    #[serde(default)]
    pub boot: u64,
}

/// Validation statistics riding on the first announcement of an epoch.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValStats {
    pub epoch: u64,
    pub loss_sum: f64,
    pub correct: u64,
    pub count: u64,
}

/// A peer's gradient for one round, published on the epoch's topic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Announce {
    pub run_id: String,
    pub round: u64,
    pub epoch: u64,
    /// Samples the gradient sums over (0: the peer had no batch this round).
    pub samples: u64,
    pub loss_sum: f64,
    pub val: Option<ValStats>,
    /// Byte length and digest of the encoded gradient.
    pub len: u64,
    pub digest: Digest,
    /// The encoded gradient itself when it is small.
    pub inline: Option<serde_bytes::ByteBuf>,
    /// Ready peers the sender has seen that are not members of this epoch: on the
    /// last round of an epoch, the union over the contributors joins the next epoch.
    pub joiners: Vec<serde_bytes::ByteBuf>,
    /// Sharded exchange: the gradient's shards, each encoded on its own and
    /// fetched only by its owner (`len` and `digest` above then name nothing).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardRef>,
}

/// The length and digest of one encoded shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRef {
    pub len: u64,
    pub digest: Digest,
}

/// Sharded exchange: the owner of a shard has aggregated it (the small gossip
/// message; the aggregated shard itself is fetched over request-response).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ticket {
    pub run_id: String,
    pub round: u64,
    pub epoch: u64,
    pub shard: u32,
    /// How many shards the round's gradient was cut into.
    pub shards: u32,
    /// Whose shards the aggregate sums, sorted.
    pub contributors: Vec<serde_bytes::ByteBuf>,
    pub samples: u64,
    pub loss_sum: f64,
    /// The validation statistics the contributors' announcements carried, summed.
    pub val: Option<ValStats>,
    /// The ready joiners the contributors named (their union).
    pub joiners: Vec<serde_bytes::ByteBuf>,
    pub len: u64,
    pub digest: Digest,
}

/// Which part of a peer's round a chunk request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Part {
    pub shard: u32,
    /// The owner's aggregate of the shard, or the owner's own contribution to it.
    pub aggregated: bool,
}

impl Announce {
    /// A placeholder that marks "not found" inside a node (never sent).
    pub fn missing(round: u64) -> Announce {
        Announce {
            run_id: String::new(),
            round,
            epoch: 0,
            samples: 0,
            loss_sum: 0.0,
            val: None,
            len: 0,
            digest: [0; 32],
            inline: None,
            shards: Vec::new(),
            joiners: vec![],
        }
    }
}

/// Everything published on gossip topics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Gossip {
    Heartbeat(Heartbeat),
    Announce(Announce),
    Ticket(Ticket),
}

/// Requests over request-response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Sent on every new connection: "I want to join this run".
    Hello { spec: RunSpec },
    /// One chunk of `owner`'s gradient for `round`.
    Chunk {
        #[serde(with = "serde_bytes")]
        owner: Vec<u8>,
        round: u64,
        index: u32,
        /// Sharded exchange: a shard of the round (the whole gradient when absent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        part: Option<Part>,
    },
    /// One chunk of the responder's full state (parameters and optimizer) after `round`.
    State { round: u64, index: u32 },
    /// `owner`'s announcement for `round` (for a peer that missed the gossip).
    Announcement {
        #[serde(with = "serde_bytes")]
        owner: Vec<u8>,
        round: u64,
    },
    /// Parameter-server mode, worker to server: the work of `round` (or later).
    /// The server answers once it has reached that round, or within two seconds
    /// with where it is (a long poll).
    PsPoll { round: u64, incarnation: u64 },
    /// Worker to server: "I am alive" (every heartbeat, also while computing).
    PsHeartbeat { incarnation: u64 },
    /// Worker to server: my gradient for a round. The server fetches it in
    /// chunks from the worker unless it rides inline.
    PsPush(Box<Announce>),
    /// One chunk of the server's parameters at the start of `round` (plain f32,
    /// little-endian; the optimizer state stays on the server).
    Params { round: u64, index: u32 },
}

/// The parameter server's answer to a poll: the round it is on and the epoch's plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PsWork {
    pub round: u64,
    pub epoch: u64,
    /// The epoch's first round and its members (sorted peer ids; shard i is members[i]).
    pub first_round: u64,
    pub members: Vec<serde_bytes::ByteBuf>,
    /// Whether the polling worker trains in this round (a member not demoted).
    pub active: bool,
    /// Byte length and BLAKE3 digest of the parameters at the start of `round`.
    pub params_len: u64,
    pub params_digest: Digest,
    /// The run is over; `round` is the number of rounds it ran.
    pub finished: bool,
    /// The server is not taking gradients yet (starting, or evaluating between
    /// epochs): poll the same round again.
    pub waiting: bool,
}

/// Responses over request-response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Hello { accepted: bool, reason: Option<String>, round: u64 },
    Chunk { total_len: u64, data: serde_bytes::ByteBuf },
    /// The state blob's header rides with chunk 0.
    State { round: u64, epoch: u64, total_len: u64, data: serde_bytes::ByteBuf },
    Announcement(Box<Announce>),
    Missing,
    /// Parameter-server mode: the answer to a poll.
    PsWork(Box<PsWork>),
    /// Parameter-server mode: a push or heartbeat taken (or refused, and why).
    PsAck { accepted: bool, reason: Option<String> },
    /// One chunk of the parameters of `round`.
    Params { round: u64, total_len: u64, data: serde_bytes::ByteBuf },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("message of {0} bytes exceeds the {1}-byte cap")]
    TooLarge(usize, usize),
    #[error("malformed message: {0}")]
    Decode(String),
    #[error("invalid message: {0}")]
    Invalid(String),
    /// Well-formed, but for a round too far from ours to use: not the sender's
    /// fault (it may be far ahead of a restarting node), so dropped without blame.
    #[error("message out of the round window: {0}")]
    OutOfWindow(String),
}

/// CBOR encoding of any wire type.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    cbor4ii::serde::to_vec(Vec::new(), value).expect("wire types serialize")
}

/// CBOR decoding with a size cap checked before any parsing.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8], cap: usize) -> Result<T, WireError> {
    if bytes.len() > cap {
        return Err(WireError::TooLarge(bytes.len(), cap));
    }
    cbor4ii::serde::from_slice(bytes).map_err(|e| WireError::Decode(e.to_string()))
}

impl Gossip {
    /// Decodes and validates a gossip message of run `run_id` for a peer at `round`.
    pub fn decode_valid(bytes: &[u8], run_id: &str, round: u64) -> Result<Gossip, WireError> {
        let g: Gossip = decode(bytes, MAX_GOSSIP_BYTES)?;
        g.validate(run_id, round)?;
        Ok(g)
    }

    /// The checks of [`Gossip::decode_valid`] on a message that is already decoded
    /// (an announcement fetched over request-response gets the same scrutiny).
    pub fn validate(&self, run_id: &str, round: u64) -> Result<(), WireError> {
        let g = self;
        let (rid, r) = match &g {
            Gossip::Heartbeat(h) => (&h.run_id, h.round),
            Gossip::Announce(a) => (&a.run_id, a.round),
            Gossip::Ticket(t) => (&t.run_id, t.round),
        };
        if rid != run_id {
            return Err(WireError::Invalid(format!("run {rid} is not this run ({run_id})")));
        }
        if r > round.saturating_add(ROUND_WINDOW) || r.saturating_add(ROUND_WINDOW) < round {
            // A far-behind heartbeat is a restarting peer: still useful; announcements are not.
            if !matches!(g, Gossip::Heartbeat(_)) {
                return Err(WireError::OutOfWindow(format!("round {r} is outside the window around {round}")));
            }
        }
        if let Gossip::Announce(a) = &g {
            if a.len > MAX_BLOB_BYTES {
                return Err(WireError::Invalid(format!("gradient of {} bytes exceeds the cap", a.len)));
            }
            if let Some(i) = &a.inline {
                if i.len() as u64 != a.len {
                    return Err(WireError::Invalid("inline payload length differs from the announced length".into()));
                }
            }
            if !a.loss_sum.is_finite() {
                return Err(WireError::Invalid("non-finite loss".into()));
            }
            // The validation statistics drive every peer's lr schedule and early stop.
            if let Some(v) = &a.val {
                check_val(v)?;
            }
            if a.shards.len() > crate::shard::MAX_SHARDS || a.shards.iter().any(|s| s.len > MAX_BLOB_BYTES) {
                return Err(WireError::Invalid("too many shards, or a shard too large".into()));
            }
        }
        if let Gossip::Ticket(t) = &g {
            if t.shards == 0 || t.shards as usize > crate::shard::MAX_SHARDS || t.shard >= t.shards {
                return Err(WireError::Invalid(format!("shard {} of {} is out of range", t.shard, t.shards)));
            }
            if t.len > MAX_BLOB_BYTES || t.contributors.is_empty() || t.contributors.len() > crate::shard::MAX_SHARDS || t.joiners.len() > crate::shard::MAX_SHARDS {
                return Err(WireError::Invalid("ticket out of range (length, contributors or joiners)".into()));
            }
            if !t.loss_sum.is_finite() {
                return Err(WireError::Invalid("non-finite loss".into()));
            }
            if let Some(v) = &t.val {
                check_val(v)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RunSpec {
        RunSpec {
            model: ModelKind::Cnn,
            dataset: DatasetKind::FashionMnist,
            normalization: Normalization::MeanStd,
            seed: 1,
            peers: 4,
            min_peers: 4,
            batch_size: 64,
            batches_per_round: 10,
            epochs: 3,
            optimizer: OptimizerKind::Sgd,
            lr: 0.01,
            momentum: 0.9,
            weight_decay: 0.0,
            val_size: 5000,
            limit_train: 0,
            limit_test: 0,
            compression: "none".into(),
            sync: SyncMode::Sync,
            failure_timeout_ms: 2000,
            aggregation: "mean".into(),
            straggler: String::new(),
            exchange: crate::Exchange::AllToAll,
        }
    }

    #[test]
    fn an_all_to_all_spec_keeps_its_run_id_and_a_sharded_one_differs() {
        let a = spec();
        let bytes = encode(&a);
        assert!(!bytes.windows(8).any(|w| w == b"exchange"), "all-to-all is left out of the encoding");
        let b = RunSpec { exchange: crate::Exchange::Sharded, ..spec() };
        assert_ne!(a.run_id(), b.run_id());
        assert_eq!(a.differences(&b), vec!["exchange: all-to-all vs sharded".to_string()]);
        let back: RunSpec = decode(&encode(&b), 1 << 16).unwrap();
        assert_eq!(back, b);
    }

    #[test]
    fn tickets_are_validated() {
        let t = Ticket {
            run_id: spec().run_id(),
            round: 3,
            epoch: 0,
            shard: 1,
            shards: 4,
            contributors: vec![serde_bytes::ByteBuf::from(vec![1])],
            samples: 64,
            loss_sum: 1.0,
            val: None,
            joiners: vec![],
            len: 10,
            digest: [0; 32],
        };
        let ok = Gossip::Ticket(t.clone());
        assert!(ok.validate(&spec().run_id(), 3).is_ok());
        for bad in [Ticket { shard: 4, ..t.clone() }, Ticket { shards: 0, shard: 0, ..t.clone() }, Ticket { contributors: vec![], ..t.clone() }, Ticket { loss_sum: f64::NAN, ..t.clone() }] {
            assert!(matches!(Gossip::Ticket(bad).validate(&spec().run_id(), 3), Err(WireError::Invalid(_))));
        }
        assert!(matches!(Gossip::Ticket(Ticket { round: 1000, ..t }).validate(&spec().run_id(), 3), Err(WireError::OutOfWindow(_))));
    }

    #[test]
    fn run_id_and_differences() {
        let a = spec();
        let mut b = spec();
        assert_eq!(a.run_id(), b.run_id());
        b.lr = 0.02;
        assert_ne!(a.run_id(), b.run_id());
        assert_eq!(a.differences(&b), vec!["lr: 0.01 vs 0.02".to_string()]);
    }

    #[test]
    fn round_trip_and_validation() {
        let a = Announce {
            run_id: spec().run_id(),
            round: 5,
            epoch: 0,
            samples: 64,
            loss_sum: 10.0,
            val: None,
            len: 8,
            digest: [7; 32],
            inline: Some(serde_bytes::ByteBuf::from(vec![0u8; 8])),
            joiners: vec![],
            shards: Vec::new(),
        };
        let bytes = encode(&Gossip::Announce(a.clone()));
        assert_eq!(Gossip::decode_valid(&bytes, &spec().run_id(), 5).unwrap(), Gossip::Announce(a.clone()));
        assert!(Gossip::decode_valid(&bytes, "other", 5).is_err());
        assert!(matches!(Gossip::decode_valid(&bytes, &spec().run_id(), 500), Err(WireError::OutOfWindow(_))));
        let far = encode(&Gossip::Announce(Announce { round: u64::MAX, ..a.clone() }));
        assert!(Gossip::decode_valid(&far, &spec().run_id(), u64::MAX - 3).is_ok(), "no overflow at the top");
        assert!(matches!(Gossip::decode_valid(&far, &spec().run_id(), 5), Err(WireError::OutOfWindow(_))));
        // Mangled bytes are an error, never a panic.
        for cut in [0, 1, bytes.len() / 2, bytes.len() - 1] {
            assert!(Gossip::decode_valid(&bytes[..cut], &spec().run_id(), 5).is_err());
        }
        let mut flipped = bytes.clone();
        flipped[3] ^= 0xff;
        let _ = Gossip::decode_valid(&flipped, &spec().run_id(), 5);
        // Validation statistics steer every peer's schedule: NaN or impossible counts are refused.
        for val in [ValStats { epoch: 0, loss_sum: f64::NAN, correct: 1, count: 2 }, ValStats { epoch: 0, loss_sum: 1.0, correct: 3, count: 2 }] {
            let bytes = encode(&Gossip::Announce(Announce { val: Some(val), ..a.clone() }));
            assert!(Gossip::decode_valid(&bytes, &spec().run_id(), 5).is_err());
        }
        // A spec without the aggregation field (an older peer) reads as mean.
        let mut old: serde_json::Value = serde_json::to_value(spec()).unwrap();
        old.as_object_mut().unwrap().remove("aggregation");
        let older: RunSpec = decode(&encode(&old), 4096).unwrap();
        assert_eq!(older.aggregation, "mean");
        let mut bad = a;
        bad.inline = Some(serde_bytes::ByteBuf::from(vec![0u8; 4]));
        let bytes = encode(&Gossip::Announce(bad));
        assert!(Gossip::decode_valid(&bytes, &spec().run_id(), 5).is_err());
        assert!(matches!(decode::<Gossip>(&vec![0u8; MAX_GOSSIP_BYTES + 1], MAX_GOSSIP_BYTES), Err(WireError::TooLarge(..))));
    }
}
