//! Request-response messages as the CBOR codec hands them over (the size caps
//! are the codec's), and the announcement check applied to fetched announcements.
#![no_main]
use libfuzzer_sys::fuzz_target;
use p2pml_proto::wire::{self, Gossip, Request, Response};

fuzz_target!(|data: &[u8]| {
    let _ = wire::decode::<Request>(data, wire::MAX_REQUEST_BYTES as usize);
    if let Ok(r) = wire::decode::<Response>(data, wire::MAX_RESPONSE_BYTES as usize) {
        if let Response::Announcement(a) = r {
            let _ = Gossip::Announce(*a).validate("0123456789abcdef", 7);
        }
    }
});
