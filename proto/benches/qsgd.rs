//! QSGD codec throughput and compression ratio on Gaussian "gradients".
//!
//! `cargo bench -p p2pml-proto --bench qsgd`. One thread. Two sizes: 25,000,000 values
//! (100 MB; QSGD_BENCH_N changes it) and 1,199,882, the gradient of the `cnn` model
//! (4.8 MB). GB/s is f32 input bytes (n * 4) per second, for encoding and decoding
//! alike. Every round measures every scheme once, in turn, and each figure is the best
//! round (QSGD_BENCH_RUNS rounds at the large size, 5 times as many at the small one):
//! on a machine shared with other work the schemes see the same interference, and the
//! f32 little-endian copy (the `none` compression) measured in the same rounds is the
//! reference to compare with.
//!
//! Decoding is measured twice: into a new vector (what `decode` and `decode_expect`
//! return) and into a reused buffer (`decode_into`: the codec alone). At 100 MB a new
//! vector is fresh memory from the kernel, and its page faults cap both the codec and
//! the plain f32 copy; at the gradient's size the allocator reuses freed memory.
//!
//! The default scheme (4 bits, buckets of 512, L2 norm) is what the targets are about:
//! its levels are mostly 0 and 1 and nearly every bucket is sent in Elias mode. The
//! max-norm row shows the fixed-width mode: there levels spread over the whole range
//! and (almost) every bucket is sent fixed width.

use p2pml_proto::qsgd::{decode_expect, decode_into, encode, Norm, QsgdConfig};
use p2pml_proto::{decode_f32, encode_f32, Rng};
use std::hint::black_box;
use std::time::{Duration, Instant};

const TARGET_RATIO_4BIT: f64 = 7.0;
const TARGET_ENCODE_GBS: f64 = 1.0;
const TARGET_DECODE_GBS: f64 = 2.0;
/// Parameters of the `cnn` model (1 channel, 10 classes).
const CNN_GRADIENT: usize = 1_199_882;

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

/// Times `f`, keeping the best time in `best`.
fn time<T>(best: &mut Duration, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = black_box(f());
    *best = (*best).min(t.elapsed());
    r
}

fn gbs(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e9
}

/// One row of a table: the best times of its encode, decode and decode_into.
struct Row {
    /// `None`: the f32 copy.
    cfg: Option<QsgdConfig>,
    bytes: usize,
    encode: Duration,
    decode: Duration,
    decode_into: Duration,
}

impl Row {
    fn name(&self) -> String {
        match self.cfg {
            None => "f32 little-endian copy (none)".into(),
            Some(c) => c.to_string(),
        }
    }
}

/// The f32 copy and every scheme of `configs` on `values`, `runs` rounds.
fn measure(values: &[f32], configs: &[QsgdConfig], runs: usize) -> Vec<Row> {
    let n = values.len();
    let mut rows: Vec<Row> = std::iter::once(None)
        .chain(configs.iter().copied().map(Some))
        .map(|cfg| Row {
            cfg,
            bytes: 0,
            encode: Duration::MAX,
            decode: Duration::MAX,
            decode_into: Duration::MAX,
        })
        .collect();
    let mut buf = vec![0f32; n];
    for _ in 0..runs {
        for row in &mut rows {
            let (bytes, decoded) = match row.cfg {
                None => {
                    let enc = time(&mut row.encode, || encode_f32(values).expect("finite"));
                    let dec = time(&mut row.decode, || decode_f32(&enc, n).expect("valid"));
                    time(&mut row.decode_into, || {
                        // The same little-endian read, into a reused buffer.
                        for (x, c) in buf.iter_mut().zip(enc.chunks_exact(4)) {
                            *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                        }
                    });
                    assert!(dec == values && buf == values);
                    (enc.len(), dec)
                }
                Some(cfg) => {
                    let enc = time(&mut row.encode, || encode(values, &cfg, 7).expect("finite"));
                    let dec = time(&mut row.decode, || decode_expect(&enc, n).expect("valid"));
                    time(&mut row.decode_into, || {
                        decode_into(&enc, &mut buf).expect("valid")
                    });
                    assert!(buf == dec);
                    (enc.len(), dec)
                }
            };
            row.bytes = bytes;
            // Freed outside the timed sections.
            drop(decoded);
        }
    }
    rows
}

/// Prints the table of `rows` and the targets of the default scheme (row 1).
fn report(n: usize, rows: &[Row]) {
    let in_bytes = n * 4;
    println!(
        "{:<34} {:>8} {:>11} {:>8} {:>11} {:>12}",
        "scheme", "ratio", "bytes", "encode", "decode", "decode_into"
    );
    println!(
        "{:<34} {:>8} {:>11} {:>8} {:>11} {:>12}",
        "", "vs f32", "", "GB/s", "GB/s", "GB/s"
    );
    for row in rows {
        println!(
            "{:<34} {:>7.2}x {:>11} {:>8.2} {:>11.2} {:>12.2}",
            row.name(),
            in_bytes as f64 / row.bytes as f64,
            row.bytes,
            gbs(in_bytes, row.encode),
            gbs(in_bytes, row.decode),
            gbs(in_bytes, row.decode_into)
        );
    }
    let d = &rows[1];
    let ratio = in_bytes as f64 / d.bytes as f64;
    let (e, dn, di) = (
        gbs(in_bytes, d.encode),
        gbs(in_bytes, d.decode),
        gbs(in_bytes, d.decode_into),
    );
    let mark = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "targets, {}: ratio >= {TARGET_RATIO_4BIT}x: {ratio:.2}x, {}; encode >= {TARGET_ENCODE_GBS} GB/s: {e:.2}, {}; \
         decode >= {TARGET_DECODE_GBS} GB/s: decode_into {di:.2}, {}, into a new vector {dn:.2}, {} \
         (the f32 copy into a new vector: {:.2})",
        d.name(),
        mark(ratio >= TARGET_RATIO_4BIT),
        mark(e >= TARGET_ENCODE_GBS),
        mark(di >= TARGET_DECODE_GBS),
        mark(dn >= TARGET_DECODE_GBS),
        gbs(in_bytes, rows[0].decode)
    );
}

fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes --bench; nothing else is understood.
    let n = env_or("QSGD_BENCH_N", 25_000_000);
    let runs = env_or("QSGD_BENCH_RUNS", 7).max(1);
    let default = QsgdConfig::default();
    let configs = [
        default,
        QsgdConfig { bits: 2, ..default },
        QsgdConfig { bits: 8, ..default },
        QsgdConfig {
            norm: Norm::Max,
            ..default
        },
    ];
    println!("qsgd bench: Gaussian f32 values, one thread; each round runs every scheme in turn");
    println!(
        "throughput = f32 input bytes (n * 4) per second; timings on a shared machine are noisy"
    );
    for (n, runs) in [(n, runs), (CNN_GRADIENT, 5 * runs)] {
        let values = gaussian(n, 42);
        println!();
        println!(
            "{n} values ({:.1} MB{}), best of {runs} rounds:",
            n as f64 * 4e-6,
            if n == CNN_GRADIENT {
                ", the cnn model's gradient"
            } else {
                ""
            }
        );
        report(n, &measure(&values, &configs, runs));
    }
}
