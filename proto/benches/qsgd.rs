//! QSGD codec throughput and compression ratio on Gaussian "gradients".
//!
//! `cargo bench -p p2pml-proto --bench qsgd` (set QSGD_BENCH_N to change the size).
//! One thread; each figure is the best of 5 runs; GB/s is f32 input bytes (n * 4) per
//! second, for encoding and decoding alike. The f32 little-endian copy (the `none`
//! compression) is measured in the same run as a reference. Decoding is measured twice:
//! into a new vector (what `decode` returns: the kernel's page faults on 100 MB of fresh
//! memory are part of it) and into a reused buffer (`decode_into`: the codec alone).
//!
//! The 4-bit max-norm row shows the fixed-width packing: with the max norm, levels
//! spread over the whole range and (almost) every bucket is sent fixed width. With the
//! L2 norm most levels are 0 or 1 and the Elias mode wins (slower, but far smaller).

use p2pml_proto::qsgd::{decode_expect, decode_into, encode, Norm, QsgdConfig};
use p2pml_proto::{decode_f32, encode_f32, Rng};
use std::hint::black_box;
use std::time::{Duration, Instant};

const RUNS: usize = 5;
const TARGET_RATIO_4BIT: f64 = 7.0;
const TARGET_ENCODE_GBS: f64 = 1.0;
const TARGET_DECODE_GBS: f64 = 2.0;

/// Standard normal values by Box-Muller on the crate's RNG.
fn gaussian(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    let mut v = Vec::with_capacity(n + 1);
    while v.len() < n {
        let u1 = 1.0 - r.next_f32(); // (0, 1]
        let u2 = r.next_f32();
        let m = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f32::consts::TAU * u2).sin_cos();
        v.push(m * c);
        v.push(m * s);
    }
    v.truncate(n);
    v
}

fn best<T>(mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut out = None;
    for _ in 0..RUNS {
        let t = Instant::now();
        let r = black_box(f());
        best = best.min(t.elapsed());
        out = Some(r);
    }
    (best, out.expect("RUNS > 0"))
}

fn gbs(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e9
}

fn main() {
    // `cargo bench` passes --bench; nothing else is understood.
    let n: usize = std::env::var("QSGD_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(25_000_000);
    let t = Instant::now();
    let values = gaussian(n, 42);
    let in_bytes = n * 4;
    println!(
        "qsgd bench: {n} Gaussian f32 values ({:.1} MB), one thread, best of {RUNS} (input generated in {:.2}s)",
        in_bytes as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    println!(
        "throughput = f32 input bytes (n * 4) per second; timings on a shared machine are noisy"
    );
    println!();
    println!(
        "{:<34} {:>8} {:>11} {:>8} {:>11} {:>12}",
        "scheme", "ratio", "bytes", "encode", "decode", "decode_into"
    );
    println!(
        "{:<34} {:>8} {:>11} {:>8} {:>11} {:>12}",
        "", "vs f32", "", "GB/s", "GB/s", "GB/s"
    );

    let (te, enc) = best(|| encode_f32(black_box(&values)).expect("finite"));
    let (td, dec) = best(|| decode_f32(black_box(&enc), n).expect("valid"));
    assert_eq!(dec.len(), n);
    let mut buf = vec![0f32; n];
    let (ti, ()) = best(|| {
        // The same little-endian read, into a reused buffer.
        for (x, c) in buf.iter_mut().zip(enc.chunks_exact(4)) {
            *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        black_box(&buf);
    });
    println!(
        "{:<34} {:>7.2}x {:>11} {:>8.2} {:>11.2} {:>12.2}",
        "f32 little-endian copy (none)",
        in_bytes as f64 / enc.len() as f64,
        enc.len(),
        gbs(in_bytes, te),
        gbs(in_bytes, td),
        gbs(in_bytes, ti)
    );
    drop((enc, dec));

    let configs = [
        QsgdConfig {
            bits: 4,
            bucket: 512,
            norm: Norm::L2,
        },
        QsgdConfig {
            bits: 2,
            bucket: 512,
            norm: Norm::L2,
        },
        QsgdConfig {
            bits: 8,
            bucket: 512,
            norm: Norm::L2,
        },
        QsgdConfig {
            bits: 4,
            bucket: 512,
            norm: Norm::Max,
        },
    ];
    let mut ratio_4bit = 0.0;
    let mut fixed = (0.0, 0.0);
    for cfg in configs {
        let (te, enc) = best(|| encode(black_box(&values), &cfg, 7).expect("finite"));
        let (td, dec) = best(|| decode_expect(black_box(&enc), n).expect("valid"));
        assert_eq!(dec.len(), n);
        let (ti, ()) = best(|| decode_into(black_box(&enc), &mut buf).expect("valid"));
        assert!(buf == dec);
        let ratio = in_bytes as f64 / enc.len() as f64;
        if cfg == QsgdConfig::default() {
            ratio_4bit = ratio;
        }
        let (e, d, i) = (gbs(in_bytes, te), gbs(in_bytes, td), gbs(in_bytes, ti));
        if cfg.norm == Norm::Max {
            fixed = (e, i);
        }
        println!(
            "{:<34} {:>7.2}x {:>11} {:>8.2} {:>11.2} {:>12.2}",
            cfg.to_string(),
            ratio,
            enc.len(),
            e,
            d,
            i
        );
    }
    println!();
    let mark = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "target: ratio >= {TARGET_RATIO_4BIT}x at qsgd:bits=4,bucket=512,norm=l2: {ratio_4bit:.2}x, {}",
        mark(ratio_4bit >= TARGET_RATIO_4BIT)
    );
    println!(
        "target: fixed-width path (norm=max row) encode >= {TARGET_ENCODE_GBS} GB/s: {:.2}, {}; decode_into >= {TARGET_DECODE_GBS} GB/s: {:.2}, {}",
        fixed.0,
        mark(fixed.0 >= TARGET_ENCODE_GBS),
        fixed.1,
        mark(fixed.1 >= TARGET_DECODE_GBS)
    );
    println!("(the Elias rows are expected to be slower; a new vector's page faults cap `decode` near the f32 copy's figure)");
}
