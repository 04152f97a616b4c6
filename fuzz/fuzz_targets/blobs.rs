//! Every other decoder of bytes from peers or the object store: plain f32
//! gradient blobs, training states (state sync, checkpoints), gradient outputs
//! and batch objects of the function tier.
#![no_main]
use libfuzzer_sys::fuzz_target;
use p2pml_proto::task::{decode_batch, decode_grad_output};
use p2pml_proto::{decode_f32, decode_state};

fuzz_target!(|data: &[u8]| {
    let numel = data.first().map_or(0, |b| *b as usize);
    for expected in [data.len() / 4, numel] {
        if let Ok(v) = decode_f32(data, expected) {
            assert!(v.iter().all(|x| x.is_finite()));
        }
    }
    let _ = decode_state(data, numel as u64);
    let _ = decode_state(data, 0);
    let _ = decode_grad_output(data, numel);
    let _ = decode_batch(data);
});
