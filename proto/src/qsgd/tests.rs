//! The codec's tests: round trips, unbiasedness, variance bounds, malformed blobs.

use super::*;

fn gaussian(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    let mut v = Vec::with_capacity(n + 1);
    while v.len() < n {
        let u1 = 1.0 - r.next_f32() as f64;
        let u2 = r.next_f32() as f64;
        let m = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        v.push((m * t.cos()) as f32);
        v.push((m * t.sin()) as f32);
    }
    v.truncate(n);
    v
}

fn cfg(bits: u8, bucket: usize, norm: Norm) -> QsgdConfig {
    QsgdConfig { bits, bucket, norm }
}

/// The scale the encoder uses for one bucket, in f64.
fn scale_of(v: &[f32], norm: Norm) -> f64 {
    match norm {
        Norm::L2 => v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt(),
        Norm::Max => v.iter().fold(0f64, |m, &x| m.max(x.abs() as f64)),
    }
}

fn header_bytes(bits: u8, norm: u8, bucket: u32, n: u64) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(&[VERSION, bits, norm, 0]);
    h.extend_from_slice(&bucket.to_le_bytes());
    h.extend_from_slice(&n.to_le_bytes());
    h
}

/// A hand-made encoding: header, then `write` on the bit stream.
fn craft(bits: u8, bucket: u32, n: u64, write: impl FnOnce(&mut BitWriter<'_>)) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let mut w = BitWriter::new(&mut buf);
    write(&mut w);
    let len = w.finish();
    let mut out = header_bytes(bits, 0, bucket, n);
    out.extend_from_slice(&buf[..len]);
    out
}

#[test]
fn config_parse_and_print() {
    let d = QsgdConfig::default();
    assert_eq!(d, cfg(4, 512, Norm::L2));
    assert_eq!(d.to_string(), "qsgd:bits=4,bucket=512,norm=l2");
    for s in [
        "qsgd",
        "qsgd:",
        " QSGD ",
        "qsgd:bits=4",
        "qsgd:norm=L2,bucket=512",
    ] {
        assert_eq!(s.parse::<QsgdConfig>().unwrap(), d, "{s}");
    }
    let c: QsgdConfig = "qsgd:bits=2,bucket=8192,norm=max".parse().unwrap();
    assert_eq!(c, cfg(2, 8192, Norm::Max));
    assert_eq!(c.to_string().parse::<QsgdConfig>().unwrap(), c);
    assert_eq!(
        "qsgd: bucket = 64 , bits=8".parse::<QsgdConfig>().unwrap(),
        cfg(8, 64, Norm::L2)
    );
    for bits in 1..=8 {
        let c = cfg(bits, 100, Norm::Max);
        assert_eq!(c.to_string().parse::<QsgdConfig>().unwrap(), c);
        assert_eq!(c.levels(), (1 << bits) - 1);
    }

    let err = |s: &str| s.parse::<QsgdConfig>().unwrap_err().to_string();
    assert_eq!(
        err("qsgd:bits=9"),
        "invalid compression 'qsgd:bits=9': bits must be an integer in 1..=8, got '9'"
    );
    assert!(err("qsgd:bits=0").contains("bits must be an integer in 1..=8"));
    assert!(err("qsgd:bits=four").contains("got 'four'"));
    assert!(err("qsgd:bucket=0").contains("bucket must be an integer in 1..=1048576"));
    assert!(err("qsgd:bucket=16777217").contains("bucket must be"));
    assert!(err("qsgd:norm=l1").contains("norm must be l2 or max, got 'l1'"));
    assert_eq!(
        err("qsgd:level=4"),
        "invalid compression 'qsgd:level=4': unknown key 'level' (valid keys: bits=1..8, bucket=1..1048576, norm=l2|max)"
    );
    assert!(err("qsgd:bits=4,bits=2").contains("key 'bits' is given twice"));
    assert!(err("qsgd:bits").contains("'bits' is not KEY=VALUE"));
    assert!(err("qsgd:bits=4,,norm=max").contains("empty KEY=VALUE pair"));
    assert!(err("qsgdx").contains("expected ':' after 'qsgd'"));
    assert!(err("topk").contains("expected 'qsgd'"));
    assert!(matches!(
        cfg(0, 512, Norm::L2).validate(),
        Err(QsgdError::Config(_))
    ));
    assert!(matches!(
        cfg(4, 0, Norm::L2).validate(),
        Err(QsgdError::Config(_))
    ));
    assert_eq!("MAX".parse::<Norm>().unwrap(), Norm::Max);
    assert!("l1".parse::<Norm>().is_err());

    assert_eq!("none".parse::<Compression>().unwrap(), Compression::None);
    assert_eq!(Compression::default().to_string(), "none");
    assert_eq!("qsgd".parse::<Compression>().unwrap(), Compression::Qsgd(d));
    let q = Compression::Qsgd(cfg(3, 1024, Norm::Max));
    assert_eq!(q.to_string(), "qsgd:bits=3,bucket=1024,norm=max");
    assert_eq!(q.to_string().parse::<Compression>().unwrap(), q);
    let e = "gzip".parse::<Compression>().unwrap_err().to_string();
    assert_eq!(
        e,
        "invalid compression 'gzip': expected 'none' or 'qsgd[:KEY=VALUE,...]' with keys bits=1..8, bucket=1..1048576, norm=l2|max"
    );
    assert!("qsgd:bits=12"
        .parse::<Compression>()
        .unwrap_err()
        .to_string()
        .contains("1..=8"));
}

#[test]
fn exact_round_trip_on_the_grid() {
    // Values k * 2^-4 whose norm is 15 * 2^-4 (or 255 * 2^-4): s / scale is a power
    // of two, every s |v_i| / scale is an integer, and scale / s is exact.
    let l2_4: Vec<f32> = [
        9.0f32, -12.0, 0.0, 0.0, 2.0, 10.0, -11.0, 0.0, -5.0, 14.0, 2.0, 0.0,
    ]
    .iter()
    .map(|k| k / 16.0)
    .collect(); // buckets of 4: 9²+12², 2²+10²+11², 5²+14²+2² are all 15²
    let l2_8: Vec<f32> = [120.0f32, -225.0, 0.0, -255.0, 0.0, 0.0]
        .iter()
        .map(|k| k / 16.0)
        .collect(); // buckets of 3
                    // Every bucket of 16 holds -15/16 and k/16 for k in -7..=7.
    let max_4: Vec<f32> = (0..64)
        .map(|i| {
            if i % 16 == 0 {
                -15.0 / 16.0
            } else {
                ((i % 16) as f32 - 8.0) / 16.0
            }
        })
        .collect();
    for (v, c) in [
        (&l2_4, cfg(4, 4, Norm::L2)),
        (&l2_8, cfg(8, 3, Norm::L2)),
        (&max_4, cfg(4, 16, Norm::Max)),
        (&max_4, cfg(4, 64, Norm::Max)),
    ] {
        for seed in 0..5 {
            let bytes = encode(v, &c, seed).unwrap();
            assert_eq!(&decode(&bytes).unwrap(), v, "{c}");
            assert_eq!(&decode_expect(&bytes, v.len()).unwrap(), v);
        }
    }
}

#[test]
fn unbiased() {
    // Each coordinate of Q(v) takes one of two neighbouring levels, `step` apart, so
    // its variance is step² p (1 - p) <= step² / 4 (the paper's Lemma 3.1). The mean of
    // N independent quantizations is then within 5 sd = 5 step / (2 sqrt N) of v_i.
    for c in [
        cfg(2, 64, Norm::L2),
        cfg(4, 64, Norm::L2),
        cfg(3, 32, Norm::Max),
    ] {
        let v = gaussian(512, 11);
        let runs = 400;
        let mut sum = vec![0f64; v.len()];
        for seed in 0..runs {
            let q = decode(&encode(&v, &c, seed).unwrap()).unwrap();
            for (a, x) in sum.iter_mut().zip(&q) {
                *a += *x as f64;
            }
        }
        let mut signed_bias = 0f64;
        let mut var_sum = 0f64;
        for (bv, bs) in v.chunks(c.bucket).zip(sum.chunks(c.bucket)) {
            let step = scale_of(bv, c.norm) / c.levels() as f64;
            let sd = step / 2.0 / (runs as f64).sqrt();
            for (&x, &a) in bv.iter().zip(bs) {
                let mean = a / runs as f64;
                assert!(
                    (mean - x as f64).abs() <= 5.0 * sd + 1e-6 * step,
                    "{c}: {mean} vs {x}, sd {sd}"
                );
                // A systematic pull away from or towards zero adds up over coordinates.
                signed_bias += (mean - x as f64) * (x as f64).signum();
                var_sum += sd * sd;
            }
        }
        assert!(
            signed_bias.abs() <= 5.0 * var_sum.sqrt(),
            "{c}: bias {signed_bias}, sd {}",
            var_sum.sqrt()
        );
    }
}

#[test]
fn variance_within_the_paper_bound() {
    // E||Q(v) - v||² <= min(d / s², sqrt(d) / s) ||v||² per bucket (L2 norm), and every
    // single realisation is at most d step² = d / s² ||v||² (each coordinate moves by
    // less than one step).
    for (bits, d) in [(1u8, 512usize), (2, 512), (4, 512), (4, 64), (8, 512)] {
        let c = cfg(bits, d, Norm::L2);
        let s = c.levels() as f64;
        let v = gaussian(4 * d, 5 + bits as u64);
        let runs = 50;
        for (bi, bv) in v.chunks(d).enumerate() {
            let norm2: f64 = bv.iter().map(|&x| x as f64 * x as f64).sum();
            let step = norm2.sqrt() / s;
            // The exact expectation: sum of step² p (1 - p) over coordinates.
            let expected: f64 = bv
                .iter()
                .map(|&x| {
                    let r = (x.abs() as f64) / step;
                    let p = r - r.floor();
                    step * step * p * (1.0 - p)
                })
                .sum();
            let bound = (d as f64 / (s * s)).min((d as f64).sqrt() / s) * norm2;
            assert!(expected <= bound);
            let mut mean = 0f64;
            for seed in 0..runs {
                let q = decode(&encode(bv, &c, seed * 1000 + bi as u64).unwrap()).unwrap();
                let err: f64 = q
                    .iter()
                    .zip(bv)
                    .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
                    .sum();
                assert!(err <= d as f64 / (s * s) * norm2 * (1.0 + 1e-5));
                mean += err / runs as f64;
            }
            assert!(mean <= bound, "bits {bits}, d {d}: {mean} > {bound}");
            // And the empirical mean matches the exact expectation (the error of one
            // coordinate is at most step², so its variance is at most step^4 / 4).
            let sd = (d as f64).sqrt() * step * step / 2.0 / (runs as f64).sqrt();
            assert!(
                (mean - expected).abs() <= 5.0 * sd,
                "bits {bits}: {mean} vs {expected}"
            );
        }
    }
}

#[test]
fn decoded_values_lie_on_the_grid_next_to_the_input() {
    for bits in 1..=8u8 {
        for norm in [Norm::L2, Norm::Max] {
            for bucket in [1usize, 7, 64, 512] {
                let c = cfg(bits, bucket, norm);
                let mut v = gaussian(1000, bits as u64);
                v[3] = 0.0;
                v[4] = -0.0;
                v[5] = 1e-30;
                let bytes = encode(&v, &c, 99).unwrap();
                let (q, _) = decode_inner(&bytes, Some(v.len())).unwrap();
                assert_eq!(q.len(), v.len());
                for (bv, bq) in v.chunks(bucket).zip(q.chunks(bucket)) {
                    let step = scale_of(bv, norm) / c.levels() as f64;
                    for (&x, &y) in bv.iter().zip(bq) {
                        assert!(y.is_finite());
                        assert!(y == 0.0 || (y > 0.0) == (x > 0.0), "{c}: {x} -> {y}");
                        assert!(
                            ((y - x).abs() as f64) <= step * (1.0 + 1e-5),
                            "{c}: {x} -> {y}, step {step}"
                        );
                        if step == 0.0 {
                            assert_eq!(y, 0.0);
                            continue;
                        }
                        let k = y.abs() as f64 / step;
                        assert!(
                            (k - k.round()).abs() < 1e-3,
                            "{c}: {y} is not on the grid of {step}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn decode_into_reuses_a_buffer() {
    let v = gaussian(5000, 21);
    let mut buf = vec![f32::NAN; 5000];
    for c in [
        cfg(4, 512, Norm::L2),
        cfg(4, 512, Norm::Max),
        cfg(2, 100, Norm::L2),
    ] {
        let mut z = v.clone();
        z[1000..2000].fill(0.0); // zero buckets must be written too
        let bytes = encode(&z, &c, 1).unwrap();
        decode_into(&bytes, &mut buf).unwrap();
        assert_eq!(buf, decode(&bytes).unwrap());
    }
    assert_eq!(
        decode_into(
            &encode(&v, &QsgdConfig::default(), 1).unwrap(),
            &mut buf[..10]
        ),
        Err(QsgdError::Count {
            expected: 10,
            got: 5000
        })
    );
}

#[test]
fn deterministic_per_seed() {
    let v = gaussian(3000, 1);
    let c = QsgdConfig::default();
    assert_eq!(encode(&v, &c, 7).unwrap(), encode(&v, &c, 7).unwrap());
    assert_ne!(encode(&v, &c, 7).unwrap(), encode(&v, &c, 8).unwrap());
}

#[test]
fn non_finite_refused() {
    for c in [
        cfg(4, 512, Norm::L2),
        cfg(4, 16, Norm::Max),
        cfg(1, 1, Norm::L2),
    ] {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0usize, 17, 999] {
                let mut v = gaussian(1000, 3);
                v[at] = bad;
                assert_eq!(
                    encode(&v, &c, 0),
                    Err(QsgdError::NonFinite { index: at }),
                    "{c} {bad} at {at}"
                );
            }
        }
    }
    // Finite but with a norm that f32 cannot hold: refused as well.
    let big = vec![f32::MAX / 4.0; 16];
    assert_eq!(
        encode(&big, &cfg(4, 16, Norm::L2), 0),
        Err(QsgdError::NormOverflow { bucket: 0 })
    );
    assert_eq!(
        encode(&[f32::MAX], &cfg(4, 16, Norm::Max), 0),
        Err(QsgdError::NormOverflow { bucket: 0 })
    );
    // Large squares that overflow f32 while the norm does not: handled in f64.
    let v = vec![1e20f32, -3e20, 2e20];
    let q = decode(&encode(&v, &cfg(8, 512, Norm::L2), 0).unwrap()).unwrap();
    for (a, b) in q.iter().zip(&v) {
        assert!((a - b).abs() <= 3.8e20 / 255.0 * 1.001);
    }
    // Subnormal inputs: the f64 quantizer.
    let tiny = vec![1e-44f32, -3e-45, 0.0, 7e-45];
    for c in [cfg(8, 4, Norm::Max), cfg(4, 4, Norm::L2)] {
        let q = decode(&encode(&tiny, &c, 1).unwrap()).unwrap();
        assert!(q.iter().all(|x| x.is_finite()) && q.len() == 4);
    }
}

#[test]
fn zeros_cost_a_few_bytes() {
    assert_eq!(
        decode(&encode(&[], &QsgdConfig::default(), 0).unwrap()).unwrap(),
        Vec::<f32>::new()
    );
    assert_eq!(
        encode(&[], &QsgdConfig::default(), 0).unwrap().len(),
        HEADER_BYTES
    );
    let z = vec![0f32; 10_000];
    let bytes = encode(&z, &QsgdConfig::default(), 0).unwrap();
    assert_eq!(bytes.len(), HEADER_BYTES + 20 * 4); // 20 buckets of 4 bytes each
    assert_eq!(decode(&bytes).unwrap(), z);
    // Zero buckets among others, and a bucket too small to survive rounding at 1 bit.
    let mut v = gaussian(4096, 2);
    v[512..1536].fill(0.0);
    v[4000..].fill(-0.0);
    let bytes = encode(&v, &QsgdConfig::default(), 0).unwrap();
    let (q, counts) = decode_inner(&bytes, None).unwrap();
    assert_eq!(counts.zero, 2);
    assert!(q[512..1536].iter().all(|&x| x == 0.0));
    // Far fewer bytes than the 4096 * 4 of f32.
    assert!(bytes.len() < 4096 * 4 / 8, "{}", bytes.len());
}

#[test]
fn both_modes_are_used_and_round_trip() {
    // Gaussian, L2 norm, 4 bits: levels are mostly 0 and 1, Elias wins.
    let v = gaussian(64 * 512, 8);
    let c = QsgdConfig::default();
    let bytes = encode(&v, &c, 3).unwrap();
    let (q, counts) = decode_inner(&bytes, Some(v.len())).unwrap();
    assert_eq!(
        counts,
        ModeCounts {
            zero: 0,
            fixed: 0,
            elias: 64
        }
    );
    // The compression ratio target: at least 7x against f32 at 4 bits, bucket 512.
    let ratio = (v.len() * 4) as f64 / bytes.len() as f64;
    assert!(ratio >= 7.0, "ratio {ratio}");
    // Uniform values under the max norm spread over all levels: fixed width wins.
    let mut r = Rng::new(4);
    let u: Vec<f32> = (0..64 * 512).map(|_| r.next_f32() * 2.0 - 1.0).collect();
    let cm = cfg(4, 512, Norm::Max);
    let ub = encode(&u, &cm, 3).unwrap();
    let (uq, ucounts) = decode_inner(&ub, Some(u.len())).unwrap();
    assert_eq!(
        ucounts,
        ModeCounts {
            zero: 0,
            fixed: 64,
            elias: 0
        }
    );
    assert_eq!(ub.len(), HEADER_BYTES + (64 * (33 + 512 * 5)) / 8);
    // A mix in one buffer: sparse buckets go Elias, dense ones fixed.
    let mut m = u.clone();
    for x in m[..8 * 512].iter_mut().skip(1) {
        *x *= 0.001;
    }
    let mb = encode(&m, &cm, 3).unwrap();
    let (mq, mcounts) = decode_inner(&mb, None).unwrap();
    assert!(mcounts.elias >= 1 && mcounts.fixed >= 1, "{mcounts:?}");
    // Both modes decode to values within one step of the input.
    for (input, output, c) in [(&v, &q, c), (&u, &uq, cm), (&m, &mq, cm)] {
        for (bx, by) in input.chunks(c.bucket).zip(output.chunks(c.bucket)) {
            let step = scale_of(bx, c.norm) / c.levels() as f64;
            for (x, y) in bx.iter().zip(by) {
                assert!(((x - y).abs() as f64) <= step * (1.0 + 1e-5), "{x} {y}");
            }
        }
    }
    // The same levels in either mode decode to the same values: force each mode on
    // one bucket by hand.
    let levels: [(u64, u64); 6] = [(0, 0), (1, 0), (3, 1), (0, 0), (0, 0), (15, 1)];
    let scale = 1.5f32;
    let fixed = craft(4, 6, 6, |w| {
        w.put(scale.to_bits() as u64, 33);
        for (l, s) in levels {
            w.put(l << 1 | s, 5);
        }
    });
    let elias = craft(4, 6, 6, |w| {
        w.put(scale.to_bits() as u64 | 1 << 32, 33);
        let mut next = 0;
        for (p, (l, s)) in levels.iter().enumerate() {
            if *l != 0 {
                let (c, n) = gamma((p - next + 1) as u64);
                w.put(c, n);
                w.put(*s, 1);
                let (c, n) = gamma(*l);
                w.put(c, n);
                next = p + 1;
            }
        }
    });
    let a = decode_inner(&fixed, None).unwrap();
    let b = decode_inner(&elias, None).unwrap();
    assert_eq!(a.0, b.0);
    assert_eq!((a.1.fixed, b.1.elias), (1, 1));
    assert_eq!(a.0, vec![0.0, 0.1, -0.3, 0.0, 0.0, -1.5]);
}

/// Levels to a bucket's Elias stream, by the format's definition (`gamma` per field).
fn elias_bucket(w: &mut BitWriter<'_>, scale: f32, levels: &[i32]) {
    w.put(scale.to_bits() as u64 | 1 << 32, 33);
    elias_symbols(w, levels);
}

/// The Elias symbols of `levels`, by the format's definition.
fn elias_symbols(w: &mut BitWriter<'_>, levels: &[i32]) {
    let mut next = 0;
    for (p, &l) in levels.iter().enumerate() {
        if l != 0 {
            let (c, n) = gamma((p - next + 1) as u64);
            w.put(c, n);
            w.put((l < 0) as u64, 1);
            let (c, n) = gamma(l.unsigned_abs() as u64);
            w.put(c, n);
            next = p + 1;
        }
    }
    if next < levels.len() {
        let (c, n) = gamma((levels.len() - next + 1) as u64);
        w.put(c, n);
    }
}

/// `count` random levels in -s..=s: mostly 0 and ±1, with long runs of zeros.
fn random_levels(r: &mut Rng, count: usize, s: i32) -> Vec<i32> {
    let zero_in_16 = r.below(17);
    let mut levels = Vec::with_capacity(count);
    while levels.len() < count {
        if r.below(32) == 0 {
            levels.extend(std::iter::repeat_n(0, r.below(300) as usize));
        } else if r.below(16) < zero_in_16 {
            levels.push(0);
        } else {
            let l = if r.below(4) == 0 {
                1 + r.below(s as u64) as i32
            } else {
                1
            };
            levels.push(if r.below(2) == 0 { -l } else { l });
        }
    }
    levels.truncate(count);
    levels
}

#[test]
fn level_bits_from_counts_or_fields() {
    // The lower bound of the Elias size: sign and gamma(level) of every nonzero,
    // from the quantizer's counts (levels up to 3) or from the fields.
    let mut r = Rng::new(9);
    for s in [1, 3, 15, 255] {
        let levels = random_levels(&mut r, 1000, s);
        let fields: Vec<u32> = levels
            .iter()
            .map(|&l| l.unsigned_abs() << 1 | (l < 0) as u32)
            .collect();
        let want: usize = levels
            .iter()
            .filter(|&&l| l != 0)
            .map(|&l| 1 + gamma(l.unsigned_abs() as u64).1 as usize)
            .sum();
        let q = Quantized {
            nnz: levels.iter().filter(|&&l| l != 0).count() as u32,
            above_one: levels.iter().filter(|&&l| l.abs() > 1).count() as u32,
            levels_or: levels.iter().fold(0, |a, &l| a | l.unsigned_abs()),
        };
        assert_eq!(q.level_bits(&fields), want, "s {s}");
        assert_eq!(level_bits(&fields), want, "s {s}");
    }
}

#[test]
fn elias_writers_match_the_format() {
    // Both Elias writers (four fields a lookup for levels up to 3, one symbol a
    // lookup otherwise) write exactly the format's symbols, whatever the runs
    // (long ones included) and the bucket's length.
    let mut r = Rng::new(5);
    for round in 0..400 {
        let s = [1, 3, 7, 255][round % 4];
        let d = 1 + r.below(700) as usize;
        let levels = random_levels(&mut r, d, s);
        let fields: Vec<u32> = levels
            .iter()
            .map(|&l| l.unsigned_abs() << 1 | (l < 0) as u32)
            .collect();
        let written = |write: &dyn Fn(&mut BitWriter<'_>) -> bool| {
            let mut buf = vec![0u8; 16 * d + 64];
            let mut w = BitWriter::new(&mut buf);
            w.put(1, 3); // not byte-aligned
            assert!(write(&mut w));
            let len = w.finish();
            buf.truncate(len);
            buf
        };
        let want = written(&|w| {
            elias_symbols(w, &levels);
            true
        });
        let mut masks = vec![0u64; d.div_ceil(64)];
        nonzero_masks(&fields, &mut masks);
        let by_symbol = written(&|w| write_elias(&fields, &masks, d, usize::MAX, w));
        assert_eq!(by_symbol, want, "one symbol a lookup, s {s}, d {d}");
        if s <= 3 {
            let by_group = written(&|w| write_elias_groups(&fields, usize::MAX, w));
            assert_eq!(by_group, want, "four fields a lookup, d {d}");
        }
    }
}

#[test]
fn elias_decoder_matches_the_format() {
    // Hand-made Elias buckets of every density, changing from bucket to bucket (the
    // decoder's dense and sparse modes, long runs, the table's 8-position window
    // and the bucket's tail, levels that need the slow path) decode to exactly
    // ±level * (scale / s), and every position is written (the buffer starts NaN).
    let mut r = Rng::new(31);
    for round in 0..300 {
        let bits = 1 + (round % 8) as u8;
        let s = (1i32 << bits) - 1;
        let d = [1usize, 7, 8, 9, 15, 17, 64, 100, 513][round % 9];
        let n = d * 5 - (round % 2) * (d / 2);
        let mut levels = Vec::with_capacity(n);
        while levels.len() < n {
            let more = random_levels(&mut r, d.min(n - levels.len()), s);
            levels.extend(more);
        }
        let scale = 0.75f32;
        let mut buf = vec![0u8; 64 + n * 8];
        let mut w = BitWriter::new(&mut buf);
        for c in levels.chunks(d) {
            if c.iter().all(|&l| l == 0) {
                w.put(0, 32);
            } else {
                elias_bucket(&mut w, scale, c);
            }
        }
        let len = w.finish();
        let mut bytes = header_bytes(bits, 0, d as u32, n as u64);
        bytes.extend_from_slice(&buf[..len]);
        let step = scale / s as f32;
        let want: Vec<f32> = levels
            .iter()
            .map(|&l| {
                if l < 0 {
                    -(-l as f32 * step)
                } else {
                    l as f32 * step
                }
            })
            .collect();
        let mut got = vec![f32::NAN; n];
        decode_into(&bytes, &mut got).unwrap();
        assert_eq!(got, want, "bits {bits}, bucket {d}");
    }
}

#[test]
fn truncated_buffers_are_rejected() {
    let v = gaussian(700, 9);
    for c in [
        cfg(4, 128, Norm::L2),
        cfg(8, 100, Norm::Max),
        cfg(2, 512, Norm::L2),
    ] {
        let bytes = encode(&v, &c, 1).unwrap();
        for cut in 0..bytes.len() {
            assert!(
                decode(&bytes[..cut]).is_err(),
                "{c}: prefix of {cut} of {} decoded",
                bytes.len()
            );
        }
        assert!(decode(&bytes).is_ok());
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode(&longer), Err(QsgdError::Trailing(1)));
        assert_eq!(
            decode_expect(&bytes, 699),
            Err(QsgdError::Count {
                expected: 699,
                got: 700
            })
        );
    }
}

#[test]
fn mutated_buffers_never_panic() {
    let v = gaussian(2000, 12);
    let mut r = Rng::new(77);
    let mut decoded = 0;
    for c in [
        cfg(4, 512, Norm::L2),
        cfg(4, 64, Norm::Max),
        cfg(1, 33, Norm::L2),
        cfg(8, 256, Norm::L2),
    ] {
        let bytes = encode(&v, &c, 5).unwrap();
        for _ in 0..1000 {
            let mut m = bytes.clone();
            for _ in 0..1 + r.below(4) {
                let i = r.below(m.len() as u64) as usize;
                m[i] ^= 1 << r.below(8);
            }
            if r.below(8) == 0 {
                m.truncate(r.below(m.len() as u64) as usize);
            }
            if let Ok(q) = decode(&m) {
                assert!(q.iter().all(|x| x.is_finite()));
                decoded += 1;
            }
        }
    }
    // Flips in the fixed-width fields decode to other values: some must get through.
    assert!(decoded > 0);
}

#[test]
fn corrupt_headers_and_scales_are_rejected() {
    // A header that claims huge n on a tiny buffer: refused from the header alone,
    // before the output is allocated.
    let mut h = header_bytes(4, 0, 512, MAX_LEN as u64);
    h.extend_from_slice(&[0; 8]);
    assert!(matches!(decode(&h), Err(QsgdError::TooShort { .. })));
    assert!(matches!(
        decode_expect(&h, MAX_LEN),
        Err(QsgdError::TooShort { .. })
    ));
    assert!(matches!(
        decode_expect(&h, 10),
        Err(QsgdError::TooShort { .. })
    ));
    let h = header_bytes(4, 0, 1, u64::MAX);
    assert!(matches!(decode(&h), Err(QsgdError::TooLong { .. })));
    let h = header_bytes(4, 0, MAX_BUCKET as u32, MAX_LEN as u64);
    assert!(matches!(decode(&h), Err(QsgdError::TooShort { .. })));

    let good = encode(&gaussian(100, 1), &cfg(4, 50, Norm::L2), 0).unwrap();
    let mut bad = good.clone();
    bad[0] = b'X';
    assert_eq!(decode(&bad), Err(QsgdError::BadMagic));
    for (i, val) in [(4usize, 2u8), (5, 0), (5, 9), (6, 2), (7, 1), (8, 0)] {
        let mut bad = good.clone();
        bad[i] = val;
        if i == 8 {
            bad[8..12].fill(0);
        }
        assert!(decode(&bad).is_err(), "byte {i} = {val}");
    }
    assert_eq!(header(&good).unwrap(), (cfg(4, 50, Norm::L2), 100));

    for scale in [f32::NAN, f32::INFINITY, -1.0, -0.0, f32::MAX] {
        let b = craft(4, 4, 4, |w| {
            w.put(scale.to_bits() as u64, 33);
            w.put(0, 20);
        });
        assert!(
            matches!(decode(&b), Err(QsgdError::Corrupt { .. })),
            "scale {scale}"
        );
    }
    // A level above s in Elias mode (gamma codes can say anything).
    let b = craft(2, 4, 4, |w| {
        w.put(1f32.to_bits() as u64 | 1 << 32, 33);
        w.put(1, 1); // run 0
        w.put(0, 1); // sign
        let (c, n) = gamma(4); // s = 3
        w.put(c, n);
        let (c, n) = gamma(4); // trailing run of 3
        w.put(c, n);
    });
    assert_eq!(
        decode(&b),
        Err(QsgdError::Corrupt {
            bucket: 0,
            reason: "level out of range"
        })
    );
    // The same in codes too long for the decoder's fast path: level 64 (13 bits) at
    // 2 bits, level 256 (17 bits) at 8 bits, after a long run.
    for (bits, level) in [(2u8, 64u64), (8, 256)] {
        let b = craft(bits, 100, 100, |w| {
            w.put(1f32.to_bits() as u64 | 1 << 32, 33);
            let (c, n) = gamma(41); // run 40
            w.put(c, n);
            w.put(1, 1); // sign
            let (c, n) = gamma(level);
            w.put(c, n);
            let (c, n) = gamma(60); // trailing run of 59
            w.put(c, n);
        });
        assert_eq!(
            decode(&b),
            Err(QsgdError::Corrupt {
                bucket: 0,
                reason: "level out of range"
            }),
            "{bits}"
        );
    }
    // ... and a valid one through the slow path decodes.
    let b = craft(8, 100, 100, |w| {
        w.put(2f32.to_bits() as u64 | 1 << 32, 33);
        let (c, n) = gamma(41);
        w.put(c, n);
        w.put(1, 1);
        let (c, n) = gamma(255);
        w.put(c, n);
        let (c, n) = gamma(60);
        w.put(c, n);
    });
    let q = decode(&b).unwrap();
    assert_eq!(q[40], -2.0);
    assert_eq!(q.iter().filter(|&&x| x != 0.0).count(), 1);
    // A run past the end of the bucket.
    let b = craft(2, 4, 4, |w| {
        w.put(1f32.to_bits() as u64 | 1 << 32, 33);
        let (c, n) = gamma(6);
        w.put(c, n);
    });
    assert!(matches!(decode(&b), Err(QsgdError::Corrupt { .. })));
    // Nonzero padding bits.
    let mut b = encode(&[1.0, 0.5], &cfg(4, 2, Norm::Max), 0).unwrap();
    let stream_bits = (b.len() - HEADER_BYTES) * 8;
    let used = 33 + 2 * 5;
    assert!(used < stream_bits);
    *b.last_mut().unwrap() |= 0x80;
    assert_eq!(decode(&b), Err(QsgdError::Padding));
}
