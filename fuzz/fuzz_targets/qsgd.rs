//! The QSGD decoder on arbitrary bytes, and on arbitrary bytes behind a valid
//! header; what decodes must be finite, of the announced length, and decode the
//! same through every entry point.
#![no_main]
use libfuzzer_sys::fuzz_target;
use p2pml_proto::qsgd;

fuzz_target!(|data: &[u8]| {
    check(data);
    // The same bytes as the stream of a small valid header (bits, norm, bucket, n
    // taken from the first bytes), so that the bit-stream decoder is reached often.
    if data.len() >= 4 {
        let bits = 1 + data[0] % 8;
        let norm = data[1] % 2;
        let bucket = 1 + u32::from(data[2]) * 4;
        let n = u64::from(data[3]) * 5;
        let mut b = Vec::with_capacity(20 + data.len());
        b.extend_from_slice(&qsgd::MAGIC);
        b.extend_from_slice(&[qsgd::VERSION, bits, norm, 0]);
        b.extend_from_slice(&bucket.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&data[4..]);
        check(&b);
    }
});

fn check(bytes: &[u8]) {
    if let Ok(v) = qsgd::decode(bytes) {
        assert!(v.iter().all(|x| x.is_finite()), "decoded values are finite");
        let (_, n) = qsgd::header(bytes).expect("a decodable blob has a header");
        assert_eq!(v.len(), n);
        let w = qsgd::decode_expect(bytes, n).expect("decode_expect agrees with decode");
        assert_eq!(v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), w.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
    }
    let _ = qsgd::decode_expect(bytes, 1000);
}
