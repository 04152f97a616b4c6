//! Fault injection: the invalid messages a rogue node (--fault-garbage)
//! publishes where honest peers send heartbeats, until the run's peers have
//! finished or gone (the core's [`Phase::Rogue`](super::core::Phase::Rogue)).

use super::core::PeerCore;
use crate::train::max_round_samples;
use p2pml_proto::wire::{self, Announce, Gossip};

impl PeerCore {
    /// Invalid messages of every kind the validation must stop.
    pub(super) fn garbage(&self, round: u64, epoch: u64) -> Vec<Vec<u8>> {
        let mut bad = vec![
            vec![0xff, 0x00, 0x13, 0x37],             // not CBOR
            wire::encode(&"a string, not a message"), // CBOR, wrong type
        ];
        let honest = Announce {
            run_id: self.run_id.clone(),
            round: round + 1,
            epoch,
            samples: 64,
            loss_sum: 1.0,
            val: None,
            len: 8,
            digest: *blake3::hash(&[0u8; 8]).as_bytes(),
            inline: Some(serde_bytes::ByteBuf::from(vec![0u8; 8])),
            joiners: vec![],
            shards: Vec::new(),
        };
        // A gradient of the wrong length (8 bytes for a model of many parameters).
        bad.push(wire::encode(&Gossip::Announce(honest.clone())));
        // A round far ahead of everyone.
        bad.push(wire::encode(&Gossip::Announce(Announce { round: round + 10_000, ..honest.clone() })));
        // An honest announcement cut short.
        let mut cut = wire::encode(&Gossip::Announce(honest.clone()));
        cut.truncate(cut.len() / 2);
        bad.push(cut);
        if self.s.p2p.faults.forge {
            // Forged (unsigned, "from" the first bootstrap peer): a well-formed
            // announcement of the next round's gradient that, were it accepted
            // first, would stand in for that peer's real one.
            let plain = self.s.numel as u64 * 4;
            bad.push(wire::encode(&Gossip::Announce(Announce {
                round: round + 1,
                samples: max_round_samples(&self.s.p2p, self.s.cfg.batch_size),
                len: plain,
                digest: *blake3::hash(b"forged").as_bytes(),
                inline: None,
                ..honest.clone()
            })));
        }
        // Another run's message.
        bad.push(wire::encode(&Gossip::Announce(Announce { run_id: "0000000000000000".into(), ..honest })));
        bad
    }
}
