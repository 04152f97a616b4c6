//! Byzantine-robust aggregation rules, and the attacks a testnet uses to try them.
//!
//! A rule combines the round's per-peer mean gradients (each peer's summed gradient
//! divided by its sample count) into one gradient. Every rule is deterministic: the
//! inputs come in the order of the contributors' peer ids, every reduction runs in a
//! fixed order, and ties go to the earlier input, so that every fault-free peer
//! applies bit-identical updates.
//!
//! - `mean`: the sample-weighted mean (the node computes it by streaming; it is not
//!   robust: one peer can move it anywhere).
//! - `median`: the coordinate-wise median (Yin et al., 2018); for an even count, the
//!   mean of the two middle values.
//! - `trimmed-mean:BETA`: per coordinate, drop the `floor(BETA * n)` largest and
//!   smallest values and average the rest (Yin et al., 2018); `0 <= BETA < 0.5`.
//! - `krum:F`: the input whose summed squared distance to its `n - F - 2` nearest
//!   other inputs is smallest (Blanchard et al., 2017). It tolerates `F` byzantine
//!   inputs when `n >= 2F + 3`; with fewer inputs (peers died) it scores each input
//!   against its nearest `max(n - F - 2, 1)` others.

use crate::rng::Rng;
use std::fmt;
use std::str::FromStr;

/// Largest byzantine count Krum accepts (it needs 2F+3 peers).
pub const MAX_KRUM_F: usize = 1 << 20;

/// A rule or attack spelled wrongly on the command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RobustError {
    #[error("unknown aggregation '{0}': expected mean, median, trimmed-mean:BETA (0 <= BETA < 0.5) or krum:F")]
    Aggregation(String),
    #[error("unknown byzantine mode '{0}': expected sign-flip:K, gaussian:SIGMA, constant:C or nan")]
    Attack(String),
}

/// How a round's gradients become one update.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Aggregation {
    #[default]
    Mean,
    Median,
    TrimmedMean { beta: f64 },
    Krum { f: usize },
}

impl fmt::Display for Aggregation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Aggregation::Mean => f.write_str("mean"),
            Aggregation::Median => f.write_str("median"),
            Aggregation::TrimmedMean { beta } => write!(f, "trimmed-mean:{beta}"),
            Aggregation::Krum { f: n } => write!(f, "krum:{n}"),
        }
    }
}

impl FromStr for Aggregation {
    type Err = RobustError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || RobustError::Aggregation(s.to_string());
        let lower = s.trim().to_ascii_lowercase();
        let (name, arg) = match lower.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (lower.as_str(), None),
        };
        match (name, arg) {
            ("mean", None) => Ok(Aggregation::Mean),
            ("median", None) => Ok(Aggregation::Median),
            ("trimmed-mean", Some(a)) => {
                let beta: f64 = a.parse().map_err(|_| err())?;
                if !(0.0..0.5).contains(&beta) {
                    return Err(err());
                }
                Ok(Aggregation::TrimmedMean { beta })
            }
            ("krum", Some(a)) => match a.parse::<usize>() {
                Ok(f) if f <= MAX_KRUM_F => Ok(Aggregation::Krum { f }),
                _ => Err(err()),
            },
            _ => Err(err()),
        }
    }
}

impl Aggregation {
    /// Whether the node may stream the sample-weighted mean instead of calling [`combine`].
    pub fn is_mean(&self) -> bool {
        matches!(self, Aggregation::Mean)
    }
}

/// Combines per-peer mean gradients (all of one length, in contributor order) with
/// `rule`. `weights` (sample counts) are used by `mean` only. Returns the combined
/// gradient and, for krum, the index of the chosen input.
pub fn combine(rule: &Aggregation, grads: &[Vec<f32>], weights: &[u64]) -> (Vec<f32>, Option<usize>) {
    let n = grads.len();
    let Some(numel) = grads.first().map(Vec::len) else { return (Vec::new(), None) };
    debug_assert!(grads.iter().all(|g| g.len() == numel));
    match *rule {
        Aggregation::Mean => {
            let total: f64 = weights.iter().map(|w| *w as f64).sum::<f64>().max(1.0);
            let mut out = vec![0f64; numel];
            for (g, w) in grads.iter().zip(weights) {
                for (o, x) in out.iter_mut().zip(g) {
                    *o += *w as f64 * *x as f64;
                }
            }
            (out.into_iter().map(|x| (x / total) as f32).collect(), None)
        }
        Aggregation::Median => (per_coordinate(grads, numel, median), None),
        Aggregation::TrimmedMean { beta } => {
            let cut = ((beta * n as f64).floor() as usize).min((n - 1) / 2);
            (per_coordinate(grads, numel, |v| mean(&v[cut..v.len() - cut])), None)
        }
        Aggregation::Krum { f } => {
            let i = krum_choice(grads, f);
            (grads[i].clone(), Some(i))
        }
    }
}

/// Applies `reduce` to each coordinate's values, sorted ascending (total order).
fn per_coordinate(grads: &[Vec<f32>], numel: usize, reduce: impl Fn(&[f32]) -> f32) -> Vec<f32> {
    let mut column = vec![0f32; grads.len()];
    (0..numel)
        .map(|j| {
            for (c, g) in column.iter_mut().zip(grads) {
                *c = g[j];
            }
            column.sort_unstable_by(f32::total_cmp);
            reduce(&column)
        })
        .collect()
}

fn median(sorted: &[f32]) -> f32 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        ((sorted[n / 2 - 1] as f64 + sorted[n / 2] as f64) / 2.0) as f32
    }
}

fn mean(v: &[f32]) -> f32 {
    (v.iter().map(|x| *x as f64).sum::<f64>() / v.len().max(1) as f64) as f32
}

/// Krum's choice: the input with the smallest sum of squared distances to its
/// nearest `max(n - f - 2, 1)` other inputs; the first such input on a tie.
pub fn krum_choice(grads: &[Vec<f32>], f: usize) -> usize {
    let n = grads.len();
    if n <= 2 {
        return 0;
    }
    let mut d = vec![vec![0f64; n]; n];
    for i in 0..n {
        for j in i + 1..n {
            let s: f64 = grads[i].iter().zip(&grads[j]).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum();
            d[i][j] = s;
            d[j][i] = s;
        }
    }
    let k = n.saturating_sub(f + 2).max(1);
    let mut best = (f64::INFINITY, 0);
    for (i, row) in d.iter().enumerate() {
        let mut others: Vec<f64> = row.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, x)| *x).collect();
        others.sort_unstable_by(f64::total_cmp);
        let score: f64 = others[..k].iter().sum();
        if score < best.0 {
            best = (score, i);
        }
    }
    best.1
}

/// What a byzantine peer does to its gradient before it sends it (testnet's
/// `--byzantine PEER:MODE`, the node's `--byzantine MODE`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Attack {
    /// Sends `-k` times its gradient.
    SignFlip { k: f32 },
    /// Sends Gaussian noise of standard deviation `sigma` instead of its gradient.
    Gaussian { sigma: f32 },
    /// Sends `c` in every coordinate.
    Constant { c: f32 },
    /// Sends a payload that decodes to NaN (validation must refuse it).
    Nan,
    /// Stays alive (heartbeats, follows the rounds) but never sends its gradient:
    /// the straggler deadline must close the round without it.
    Withhold,
}

impl fmt::Display for Attack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attack::SignFlip { k } => write!(f, "sign-flip:{k}"),
            Attack::Gaussian { sigma } => write!(f, "gaussian:{sigma}"),
            Attack::Constant { c } => write!(f, "constant:{c}"),
            Attack::Nan => f.write_str("nan"),
            Attack::Withhold => f.write_str("withhold"),
        }
    }
}

impl FromStr for Attack {
    type Err = RobustError;
    /// `sign-flip:K` (also `sign-flipxK` and `sign-flip×K`), `gaussian:SIGMA`,
    /// `constant:C`, `nan`, `withhold`; every number finite.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || RobustError::Attack(s.to_string());
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "nan" => return Ok(Attack::Nan),
            "withhold" => return Ok(Attack::Withhold),
            _ => {}
        }
        let (name, arg) = if let Some(rest) = lower.strip_prefix("sign-flip") {
            ("sign-flip", rest.trim_start_matches([':', 'x', '×']))
        } else {
            lower.split_once(':').ok_or_else(err)?
        };
        let x: f32 = arg.parse().map_err(|_| err())?;
        if !x.is_finite() {
            return Err(err());
        }
        match name {
            "sign-flip" => Ok(Attack::SignFlip { k: x }),
            "gaussian" if x >= 0.0 => Ok(Attack::Gaussian { sigma: x }),
            "constant" => Ok(Attack::Constant { c: x }),
            _ => Err(err()),
        }
    }
}

impl Attack {
    /// Replaces `grad` (a peer's summed gradient over `samples` samples) with the
    /// attack's. Scales are per sample, so that the poisoned gradient has the
    /// weight of an honest one: constant `c` means `c` per sample. `seed` drives
    /// the noise. NaN is applied to the encoded payload instead ([`Attack::poison`]).
    pub fn apply(&self, grad: &mut [f32], samples: u64, seed: u64) {
        let s = samples.max(1) as f32;
        match *self {
            Attack::SignFlip { k } => grad.iter_mut().for_each(|x| *x *= -k),
            Attack::Constant { c } => grad.iter_mut().for_each(|x| *x = c * s),
            Attack::Gaussian { sigma } => {
                let mut rng = Rng::derive(seed, &[0x6279_7a61]); // "byza"
                for x in grad.iter_mut() {
                    *x = sigma * s * standard_normal(&mut rng);
                }
            }
            Attack::Nan | Attack::Withhold => {}
        }
    }

    /// Turns an encoded gradient into one that decodes to NaN (the NaN attack;
    /// encoders refuse NaN, so the payload is forged after encoding): every value of
    /// a plain f32 blob, or the first bucket's scale of a QSGD encoding.
    pub fn poison(&self, blob: &mut [u8]) {
        if !matches!(self, Attack::Nan) {
            return;
        }
        let nan = f32::NAN.to_le_bytes();
        if blob.starts_with(&crate::qsgd::MAGIC) {
            if let Some(scale) = blob.get_mut(crate::qsgd::HEADER_BYTES..crate::qsgd::HEADER_BYTES + 4) {
                scale.copy_from_slice(&nan);
            }
        } else {
            for c in blob.chunks_exact_mut(4) {
                c.copy_from_slice(&nan);
            }
        }
    }
}

/// Box–Muller from two uniforms in (0, 1].
fn standard_normal(rng: &mut Rng) -> f32 {
    let u1 = 1.0 - rng.next_f32() as f64;
    let u2 = rng.next_f32() as f64;
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn honest(n: usize, numel: usize) -> Vec<Vec<f32>> {
        let mut rng = Rng::new(7);
        (0..n).map(|_| (0..numel).map(|j| 1.0 + j as f32 * 0.01 + 0.05 * (rng.next_f32() - 0.5)).collect()).collect()
    }

    fn dist(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f32>().sqrt()
    }

    #[test]
    fn parse_and_print_round_trip() {
        for s in ["mean", "median", "trimmed-mean:0.125", "krum:1"] {
            assert_eq!(s.parse::<Aggregation>().unwrap().to_string(), s);
        }
        assert_eq!("Krum:2".parse::<Aggregation>().unwrap(), Aggregation::Krum { f: 2 });
        for bad in ["avg", "trimmed-mean", "trimmed-mean:0.5", "trimmed-mean:-0.1", "krum", "krum:x", "median:1", "krum:18446744073709551615"] {
            let e = bad.parse::<Aggregation>().unwrap_err().to_string();
            assert!(e.contains("expected mean, median"), "{bad}: {e}");
        }
        assert_eq!("sign-flip:10".parse::<Attack>().unwrap(), Attack::SignFlip { k: 10.0 });
        assert_eq!("sign-flipx10".parse::<Attack>().unwrap(), Attack::SignFlip { k: 10.0 });
        assert_eq!("sign-flip×10".parse::<Attack>().unwrap(), Attack::SignFlip { k: 10.0 });
        assert_eq!("NaN".parse::<Attack>().unwrap(), Attack::Nan);
        for s in ["sign-flip:10", "gaussian:2", "constant:-1.5", "nan"] {
            assert_eq!(s.parse::<Attack>().unwrap().to_string(), s);
        }
        for bad in ["flip", "gaussian:-1", "constant:inf", "gaussian", "sign-flip:", "nan:1"] {
            assert!(bad.parse::<Attack>().is_err(), "{bad}");
        }
    }

    #[test]
    fn robust_rules_resist_one_sign_flipped_peer_and_mean_does_not() {
        let numel = 64;
        let mut grads = honest(8, numel);
        let truth = combine(&Aggregation::Mean, &grads, &[1; 8]).0;
        Attack::SignFlip { k: 10.0 }.apply(&mut grads[3], 1, 0);
        let mean = combine(&Aggregation::Mean, &grads, &[1; 8]).0;
        assert!(dist(&mean, &truth) > dist(&truth, &vec![0.0; numel]), "mean is dragged past zero");
        for rule in [Aggregation::Median, Aggregation::TrimmedMean { beta: 0.125 }, Aggregation::Krum { f: 1 }] {
            let (g, chosen) = combine(&rule, &grads, &[1; 8]);
            assert!(dist(&g, &truth) < 0.05 * dist(&truth, &vec![0.0; numel]), "{rule}: {}", dist(&g, &truth));
            if let Some(i) = chosen {
                assert_ne!(i, 3, "krum never picks the byzantine input");
            }
        }
    }

    #[test]
    fn median_and_trimmed_mean_by_hand() {
        let g = |v: &[f32]| v.iter().map(|x| vec![*x]).collect::<Vec<_>>();
        assert_eq!(combine(&Aggregation::Median, &g(&[3.0, -1.0, 2.0]), &[]).0, [2.0]);
        assert_eq!(combine(&Aggregation::Median, &g(&[3.0, -1.0, 2.0, 10.0]), &[]).0, [2.5]);
        // beta 0.25 of 4 cuts one from each end: mean of 2 and 3.
        assert_eq!(combine(&Aggregation::TrimmedMean { beta: 0.25 }, &g(&[3.0, -100.0, 2.0, 100.0]), &[]).0, [2.5]);
        // beta 0 is the plain mean.
        assert_eq!(combine(&Aggregation::TrimmedMean { beta: 0.0 }, &g(&[1.0, 2.0, 6.0]), &[]).0, [3.0]);
        // Trimming never empties a column.
        assert_eq!(combine(&Aggregation::TrimmedMean { beta: 0.49 }, &g(&[1.0, 2.0]), &[]).0, [1.5]);
        assert_eq!(combine(&Aggregation::Mean, &g(&[1.0, 4.0]), &[3, 1]).0, [1.75]);
        assert_eq!(combine(&Aggregation::Median, &[], &[]).0, Vec::<f32>::new());
    }

    #[test]
    fn krum_picks_from_the_cluster_and_breaks_ties_by_order() {
        let g = |v: &[f32]| v.iter().map(|x| vec![*x]).collect::<Vec<_>>();
        // n = 5, f = 1: two nearest others. 1.0, 1.1 and 1.2 cluster; 1.1 is closest to both.
        assert_eq!(krum_choice(&g(&[1.0, 50.0, 1.1, 1.2, -40.0]), 1), 2);
        assert_eq!(krum_choice(&g(&[2.0, 2.0, 2.0]), 0), 0);
        // Too few inputs for the guarantee: still a choice, never a panic.
        assert_eq!(krum_choice(&g(&[5.0, 6.0]), 3), 0);
        assert_eq!(krum_choice(&g(&[5.0, 6.0, 100.0]), 3), 0);
    }

    #[test]
    fn rules_are_deterministic_and_order_only_matters_for_krum_ties() {
        let grads = honest(7, 257);
        for rule in [Aggregation::Median, Aggregation::TrimmedMean { beta: 0.2 }, Aggregation::Krum { f: 2 }] {
            let a = combine(&rule, &grads, &[1; 7]).0;
            let b = combine(&rule, &grads, &[1; 7]).0;
            assert_eq!(a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), b.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        }
        let mut rev = grads.clone();
        rev.reverse();
        assert_eq!(combine(&Aggregation::Median, &grads, &[]).0, combine(&Aggregation::Median, &rev, &[]).0);
    }

    #[test]
    fn attacks_change_the_gradient_as_named() {
        let mut v = vec![1.0f32, -2.0];
        Attack::SignFlip { k: 10.0 }.apply(&mut v, 4, 0);
        assert_eq!(v, [-10.0, 20.0]);
        Attack::Constant { c: 0.5 }.apply(&mut v, 4, 0);
        assert_eq!(v, [2.0, 2.0]);
        let mut a = vec![0f32; 10_000];
        let mut b = a.clone();
        Attack::Gaussian { sigma: 2.0 }.apply(&mut a, 1, 9);
        Attack::Gaussian { sigma: 2.0 }.apply(&mut b, 1, 9);
        assert_eq!(a, b, "seeded");
        let var = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / a.len() as f64;
        assert!((var.sqrt() - 2.0).abs() < 0.1, "sigma {}", var.sqrt());

        let mut plain = crate::encode_f32(&[1.0, 2.0]).unwrap();
        Attack::Nan.poison(&mut plain);
        assert!(crate::decode_f32(&plain, 2).is_err());
        let cfg: crate::Compression = "qsgd:bits=4,bucket=4".parse().unwrap();
        let mut q = crate::encode_gradient(&[1.0, 2.0, 3.0, 4.0, 5.0], &cfg, 1).unwrap();
        Attack::Nan.poison(&mut q);
        assert!(crate::decode_gradient(&q, &cfg, 5).is_err(), "a NaN scale never decodes");
        let mut untouched = plain.clone();
        Attack::SignFlip { k: 1.0 }.poison(&mut untouched);
        assert_eq!(untouched, plain);
    }
}
