//! Gossip as a peer receives it: CBOR under the size cap, then validation
//! (run id, round window, field bounds). Nothing may panic; what validates must
//! re-encode to a message that validates again.
#![no_main]
use libfuzzer_sys::fuzz_target;
use p2pml_proto::wire::{self, Gossip};

fuzz_target!(|data: &[u8]| {
    // The peer's own round comes from the input too, so that the window is explored.
    let (round, bytes) = match data.split_first() {
        Some((r, rest)) => (*r as u64 * 3, rest),
        None => (0, data),
    };
    for run in ["0123456789abcdef", ""] {
        if let Ok(g) = Gossip::decode_valid(bytes, run, round) {
            let again = wire::encode(&g);
            let g2 = Gossip::decode_valid(&again, run, round).expect("a valid message re-encodes to a valid one");
            assert_eq!(again, wire::encode(&g2), "and to the same bytes again");
        }
    }
});
