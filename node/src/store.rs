//! What this peer can serve to others: gradient blobs of recent rounds (its own
//! and those it fetched), its latest full state, and the answer to Hello.
//! Shared between the training loop (writer) and the responder task (reader).

use libp2p::PeerId;
use p2pml_proto::wire::{Announce, Part, Request, Response, RunSpec, CHUNK_BYTES};
use serde_bytes::ByteBuf;
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

/// A serialized state: parameters and optimizer state after `round`.
#[derive(Clone, Debug)]
pub struct StateBlob {
    pub round: u64,
    pub epoch: u64,
    pub bytes: Arc<Vec<u8>>,
}

#[derive(Debug, Default)]
pub struct Store {
    /// By (round, author, part): a whole gradient (no part), or in the sharded
    /// exchange a contribution to a shard or an owner's aggregate of one.
    blobs: BTreeMap<(u64, Vec<u8>, Option<Part>), Arc<Vec<u8>>>,
    announces: BTreeMap<(u64, Vec<u8>), Announce>,
    /// The latest states by round (a few, so that a peer fetching one state's
    /// chunks is not cut off when the next round's state replaces it).
    states: BTreeMap<u64, StateBlob>,
    /// Parameter server: the parameters at the start of recent rounds (plain f32).
    params: BTreeMap<u64, Arc<Vec<u8>>>,
    /// The round this peer is on (for Hello answers).
    pub round: u64,
    /// Peers whose Hello was refused: their gossip is rejected.
    pub refused: HashSet<PeerId>,
    /// Peers whose Hello we accepted (the inbound half of admission; the node
    /// holds the outbound half, the Hellos it sent that were accepted).
    pub admitted: HashSet<PeerId>,
}

pub type SharedStore = Arc<Mutex<Store>>;

/// States kept for peers that are fetching one.
const STATES_KEPT: usize = 3;

impl Store {
    pub fn insert(&mut self, round: u64, owner: &PeerId, blob: Arc<Vec<u8>>) {
        self.insert_part(round, owner, None, blob);
    }
    pub fn get(&self, round: u64, owner: &PeerId) -> Option<Arc<Vec<u8>>> {
        self.get_part(round, owner, None)
    }
    pub fn insert_part(&mut self, round: u64, owner: &PeerId, part: Option<Part>, blob: Arc<Vec<u8>>) {
        self.blobs.insert((round, owner.to_bytes(), part), blob);
    }
    pub fn get_part(&self, round: u64, owner: &PeerId, part: Option<Part>) -> Option<Arc<Vec<u8>>> {
        self.blobs.get(&(round, owner.to_bytes(), part)).cloned()
    }
    pub fn has_part(&self, round: u64, owner: &PeerId, part: Option<Part>) -> bool {
        self.blobs.contains_key(&(round, owner.to_bytes(), part))
    }
    pub fn insert_announce(&mut self, owner: &PeerId, a: Announce) {
        self.announces.insert((a.round, owner.to_bytes()), a);
    }
    /// Drops blobs and announcements of rounds before `round`.
    pub fn prune(&mut self, round: u64) {
        self.blobs = self.blobs.split_off(&(round, Vec::new(), None));
        self.announces = self.announces.split_off(&(round, Vec::new()));
    }
    pub fn set_state(&mut self, s: StateBlob) {
        // A re-sync or restore may go back in rounds: newer states are not ours any more.
        self.states.retain(|r, _| *r < s.round);
        self.states.insert(s.round, s);
        while self.states.len() > STATES_KEPT {
            self.states.pop_first();
        }
    }

    /// Parameter server: the parameters workers fetch for `round`.
    pub fn set_params(&mut self, round: u64, bytes: Arc<Vec<u8>>) {
        self.params.retain(|r, _| *r < round);
        self.params.insert(round, bytes);
        while self.params.len() > STATES_KEPT {
            self.params.pop_first();
        }
    }

    /// The answer to an inbound request.
    pub fn answer(&mut self, spec: &RunSpec, peer: PeerId, req: Request) -> Response {
        match req {
            Request::Hello { spec: theirs } => {
                if theirs == *spec {
                    self.refused.remove(&peer);
                    self.admitted.insert(peer);
                    Response::Hello { accepted: true, reason: None, round: self.round }
                } else {
                    self.refused.insert(peer);
                    self.admitted.remove(&peer);
                    let diff = spec.differences(&theirs).join(", ");
                    Response::Hello {
                        accepted: false,
                        reason: Some(format!("run config differs ({diff}; ours vs yours)")),
                        round: self.round,
                    }
                }
            }
            Request::Chunk { owner, round, index, part } => {
                let Ok(owner) = PeerId::from_bytes(&owner) else { return Response::Missing };
                match self.get_part(round, &owner, part) {
                    Some(blob) => chunk(&blob, index)
                        .map(|data| Response::Chunk { total_len: blob.len() as u64, data })
                        .unwrap_or(Response::Missing),
                    None => Response::Missing,
                }
            }
            Request::Announcement { owner, round } => self
                .announces
                .get(&(round, owner))
                .map(|a| Response::Announcement(Box::new(a.clone())))
                .unwrap_or(Response::Missing),
            // The first chunk comes from the newest state at or after `round`; later
            // chunks of a transfer from the state of exactly `round`.
            Request::State { round, index } => match if index == 0 { None } else { self.states.get(&round) }.or_else(|| self.states.values().next_back()) {
                Some(s) if s.round >= round => chunk(&s.bytes, index)
                    .map(|data| Response::State { round: s.round, epoch: s.epoch, total_len: s.bytes.len() as u64, data })
                    .unwrap_or(Response::Missing),
                _ => Response::Missing,
            },
            Request::Params { round, index } => match self.params.get(&round) {
                Some(p) => chunk(p, index)
                    .map(|data| Response::Params { round, total_len: p.len() as u64, data })
                    .unwrap_or(Response::Missing),
                None => Response::Missing,
            },
            // Answered by the parameter server's own loop, never from a store.
            Request::PsPoll { .. } | Request::PsHeartbeat { .. } | Request::PsPush(_) => {
                Response::PsAck { accepted: false, reason: Some("this node is not a parameter server".into()) }
            }
        }
    }
}

fn chunk(blob: &[u8], index: u32) -> Option<ByteBuf> {
    let start = (index as usize).checked_mul(CHUNK_BYTES)?;
    if start >= blob.len() && !(start == 0 && blob.is_empty()) {
        return None;
    }
    let end = (start + CHUNK_BYTES).min(blob.len());
    Some(ByteBuf::from(blob[start..end].to_vec()))
}

/// Number of chunks of a blob of `len` bytes.
pub fn chunks(len: u64) -> u32 {
    (len.div_ceil(CHUNK_BYTES as u64)).max(1) as u32
}
