//! QSGD gradient compression (Alistarh et al., 2017, "QSGD: Communication-Efficient
//! SGD via Gradient Quantization and Encoding").
//!
//! A vector is cut into buckets of `bucket` values. Each bucket `v` (of `d` values) is
//! sent as its scale (`||v||_2`, or `max |v_i|`) and, per coordinate, a sign and a level
//! `xi_i` in `0..=s` with `s = 2^bits - 1`; it decodes to `sign(v_i) * scale * xi_i / s`.
//! The level is `floor(s |v_i| / scale)`, rounded up with probability equal to the
//! fractional part, so that the quantization is unbiased: `E[Q(v)] = v`, and (L2 norm)
//! `E||Q(v) - v||^2 <= min(d / s^2, sqrt(d) / s) ||v||^2` (the paper's Lemma 3.1).
//!
//! # Wire format (version 1)
//!
//! All integers little-endian. A 20-byte header:
//!
//! | bytes  | field                                          |
//! |--------|------------------------------------------------|
//! | 0..4   | magic `b"QSGD"`                                |
//! | 4      | version, 1                                     |
//! | 5      | `bits`, 1..=8 (level bits; each value also has a sign bit) |
//! | 6      | norm: 0 = L2, 1 = max                          |
//! | 7      | reserved, 0                                    |
//! | 8..12  | `bucket` (u32), 1..=[`MAX_BUCKET`]             |
//! | 12..20 | `n`, the number of values (u64), 0..=[`MAX_LEN`] |
//!
//! Then one bit stream, read least significant bit first from each byte in turn (a
//! field of k bits written at bit position p holds its bit j at stream bit p + j). For
//! each of the `ceil(n / bucket)` buckets (the last one may be shorter):
//!
//! - 32 bits: the scale, as the bits of an f32. `+0.0` means "every value of the bucket
//!   is zero" and nothing else follows for this bucket. Otherwise the scale must be
//!   positive, finite and at most `f32::MAX / 2`.
//! - 1 bit: the mode, 0 = fixed width, 1 = Elias.
//! - Fixed width: `d` fields of `bits + 1` bits, `field = level << 1 | sign` (sign 1 =
//!   negative), packed contiguously.
//! - Elias: for each nonzero level, in order: `gamma(zeros before it + 1)`, one sign
//!   bit, `gamma(level)`; then, if the bucket ends with zeros, `gamma(trailing zeros +
//!   1)`. `gamma(x)` for `x >= 1` with `z = floor(log2 x)` is `z` zero bits, a one bit,
//!   then the low `z` bits of `x`. A run that reaches the end of the bucket ends it.
//!
//! The stream is padded with zero bits to a whole byte, and nothing follows it.
//!
//! The encoder picks, per bucket, whichever mode is smaller (fixed on a tie), and
//! sends a bucket whose levels all rounded to zero as a zero scale. Both modes decode
//! to exactly the same values (`±level * (scale / s)` in f32), so the choice never
//! changes what a peer sees.
//!
//! # Quantization noise
//!
//! Deterministic for a seed: bucket `b` draws from two streams
//! `Rng::derive(seed, &[STREAM, b, lane])`, lane 0 and 1 alternating by u64 word, each
//! word giving the 21-bit uniforms of three consecutive values. With `k = min(23 - bits,
//! 21)` fractional bits, `t = round(s |v_i| / scale * 2^k)` and a k-bit uniform `u`, the
//! level is `(t + u) >> k`: `floor`, plus one with probability equal to the fractional
//! part (to 2^-k, below f32's own precision of `s |v_i| / scale`).
//!
//! # Speed
//!
//! Every pass is a tight loop over one bucket held in L1: the norm (32 independent
//! accumulators), the noise (two interleaved generators), the quantization (branch-free,
//! vectorized), then 64-bit bit packing. The Elias mode is tried only when a lower bound
//! of its size beats the fixed width, and abandoned as soon as it stops being smaller.
//! When a bucket's levels are all at most 3 and at least a third of them nonzero (the
//! usual case of the default scheme), the Elias writer codes four fields with one table
//! lookup, two groups a store; otherwise it visits the nonzeros only, one symbol a
//! lookup, two symbols a store.
//!
//! The Elias decoder resolves every whole symbol in the next 12 bits with one table
//! lookup and writes a window of 8 output positions at once, converted from small
//! integers: no per-symbol branches. In dense buckets the window starts at the current
//! position and carries the zeros; after a sparse bucket the next is zeroed first and
//! the window starts at the first value, so that runs of up to 31 zeros are free.
//!
//! Layout: `config` (settings and errors), `bits` (bit I/O), `encode`,
//! `decode`, `tables` (compile-time tables), `tests`.

use crate::Rng;
use std::fmt;
use std::str::FromStr;


mod bits;
mod config;
mod decode;
mod encode;
mod tables;
#[cfg(test)]
mod tests;

use bits::*;
use tables::*;
pub use config::*;
pub use decode::{decode, decode_expect, decode_into, header};
pub use encode::encode;
#[allow(unused_imports)]
use decode::*;
#[allow(unused_imports)]
use encode::*;
