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

use crate::Rng;
use std::fmt;
use std::str::FromStr;

/// The first four bytes of every encoding.
pub const MAGIC: [u8; 4] = *b"QSGD";
/// The format version this module writes and reads.
pub const VERSION: u8 = 1;
/// Size of the fixed header.
pub const HEADER_BYTES: usize = 20;
/// Largest bucket size.
pub const MAX_BUCKET: usize = 1 << 20;
/// Most values in one encoding (1 GiB of f32, as `wire::MAX_BLOB_BYTES`).
pub const MAX_LEN: usize = 1 << 28;
/// Largest scale on the wire: `level * (scale / s)` stays finite for every level.
pub const MAX_SCALE: f32 = f32::MAX / 2.0;

const MIN_BITS: u8 = 1;
const MAX_BITS: u8 = 8;
const DEFAULT_BITS: u8 = 4;
const DEFAULT_BUCKET: usize = 512;
/// Label of the quantization noise stream ("qsgd" in ASCII).
const STREAM: u64 = 0x7173_6764;
/// `floor(log2(MAX_BUCKET + 1))`: the longest run gamma code has this many leading zeros.
const MAX_RUN_Z: u32 = 20;
/// `floor(log2(255))`: the longest level gamma code.
const MAX_LEVEL_Z: u32 = 7;
const VALID_KEYS: &str = "bits=1..8, bucket=1..1048576, norm=l2|max";

/// What a bucket is scaled by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Norm {
    /// `||v||_2`, as in the paper: most levels are 0 or 1, which Elias coding exploits.
    #[default]
    L2,
    /// `max |v_i|`: lower variance, levels spread over the whole range.
    Max,
}

impl Norm {
    /// The command-line spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Norm::L2 => "l2",
            Norm::Max => "max",
        }
    }

    fn code(self) -> u8 {
        match self {
            Norm::L2 => 0,
            Norm::Max => 1,
        }
    }

    fn from_code(c: u8) -> Option<Norm> {
        match c {
            0 => Some(Norm::L2),
            1 => Some(Norm::Max),
            _ => None,
        }
    }
}

impl fmt::Display for Norm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Norm {
    type Err = QsgdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "l2" => Ok(Norm::L2),
            "max" => Ok(Norm::Max),
            _ => Err(spec_error(
                s,
                format!("unknown norm '{}': expected l2 or max", s.trim()),
            )),
        }
    }
}

/// The QSGD scheme: `qsgd:bits=4,bucket=512,norm=l2` on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QsgdConfig {
    /// Bits of the level magnitude, 1..=8 (`s = 2^bits - 1` levels); a sign bit comes on top.
    pub bits: u8,
    /// Values per bucket, 1..=[`MAX_BUCKET`].
    pub bucket: usize,
    pub norm: Norm,
}

impl Default for QsgdConfig {
    fn default() -> Self {
        QsgdConfig {
            bits: DEFAULT_BITS,
            bucket: DEFAULT_BUCKET,
            norm: Norm::L2,
        }
    }
}

impl QsgdConfig {
    /// The number of nonzero levels, `s = 2^bits - 1`.
    pub fn levels(&self) -> u32 {
        (1u32 << self.bits) - 1
    }

    /// Checks the ranges of the fields (they are public, so any value can be built).
    pub fn validate(&self) -> Result<(), QsgdError> {
        if !(MIN_BITS..=MAX_BITS).contains(&self.bits) {
            return Err(QsgdError::Config(format!(
                "bits must be in {MIN_BITS}..={MAX_BITS}, got {}",
                self.bits
            )));
        }
        if !(1..=MAX_BUCKET).contains(&self.bucket) {
            return Err(QsgdError::Config(format!(
                "bucket must be in 1..={MAX_BUCKET}, got {}",
                self.bucket
            )));
        }
        Ok(())
    }
}

impl fmt::Display for QsgdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "qsgd:bits={},bucket={},norm={}",
            self.bits, self.bucket, self.norm
        )
    }
}

fn spec_error(spec: &str, reason: String) -> QsgdError {
    QsgdError::Spec {
        spec: spec.to_string(),
        reason,
    }
}

impl FromStr for QsgdConfig {
    type Err = QsgdError;

    /// Parses `qsgd`, `qsgd:` or `qsgd:key=value,...` with any subset of the keys
    /// `bits`, `bucket` and `norm`; the others keep their defaults.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let t = spec.trim();
        let rest = match t.get(..4) {
            Some(p) if p.eq_ignore_ascii_case("qsgd") => &t[4..],
            _ => {
                return Err(spec_error(
                    spec,
                    format!("expected 'qsgd' or 'qsgd:KEY=VALUE,...' with keys {VALID_KEYS}"),
                ));
            }
        };
        let body = if rest.is_empty() {
            ""
        } else if let Some(b) = rest.strip_prefix(':') {
            b
        } else {
            return Err(spec_error(
                spec,
                format!("expected ':' after 'qsgd', then KEY=VALUE pairs with keys {VALID_KEYS}"),
            ));
        };
        let mut cfg = QsgdConfig::default();
        let mut seen = [false; 3];
        for item in body.split(',') {
            let item = item.trim();
            if item.is_empty() {
                if body.trim().is_empty() {
                    continue;
                }
                return Err(spec_error(spec, "empty KEY=VALUE pair".into()));
            }
            let Some((k, v)) = item.split_once('=') else {
                return Err(spec_error(
                    spec,
                    format!("'{item}' is not KEY=VALUE (valid keys: {VALID_KEYS})"),
                ));
            };
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            let slot = match k.as_str() {
                "bits" => {
                    cfg.bits = match v.parse::<u8>() {
                        Ok(b) if (MIN_BITS..=MAX_BITS).contains(&b) => b,
                        _ => {
                            return Err(spec_error(
                                spec,
                                format!(
                                    "bits must be an integer in {MIN_BITS}..={MAX_BITS}, got '{v}'"
                                ),
                            ));
                        }
                    };
                    0
                }
                "bucket" => {
                    cfg.bucket = match v.parse::<usize>() {
                        Ok(b) if (1..=MAX_BUCKET).contains(&b) => b,
                        _ => {
                            return Err(spec_error(
                                spec,
                                format!("bucket must be an integer in 1..={MAX_BUCKET}, got '{v}'"),
                            ));
                        }
                    };
                    1
                }
                "norm" => {
                    cfg.norm = match v.to_ascii_lowercase().as_str() {
                        "l2" => Norm::L2,
                        "max" => Norm::Max,
                        _ => {
                            return Err(spec_error(
                                spec,
                                format!("norm must be l2 or max, got '{v}'"),
                            ))
                        }
                    };
                    2
                }
                _ => {
                    return Err(spec_error(
                        spec,
                        format!("unknown key '{k}' (valid keys: {VALID_KEYS})"),
                    ))
                }
            };
            if std::mem::replace(&mut seen[slot], true) {
                return Err(spec_error(spec, format!("key '{k}' is given twice")));
            }
        }
        Ok(cfg)
    }
}

/// How gradients are encoded on the wire: `none` (little-endian f32) or `qsgd:...`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Compression {
    #[default]
    None,
    Qsgd(QsgdConfig),
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::None => f.write_str("none"),
            Compression::Qsgd(c) => c.fmt(f),
        }
    }
}

impl FromStr for Compression {
    type Err = QsgdError;
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let t = spec.trim();
        if t.eq_ignore_ascii_case("none") {
            return Ok(Compression::None);
        }
        if t.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("qsgd")) {
            return t.parse().map(Compression::Qsgd).map_err(|e| match e {
                QsgdError::Spec { reason, .. } => spec_error(spec, reason),
                other => other,
            });
        }
        Err(spec_error(
            spec,
            format!("expected 'none' or 'qsgd[:KEY=VALUE,...]' with keys {VALID_KEYS}"),
        ))
    }
}

/// Everything that can go wrong in this module.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum QsgdError {
    #[error("invalid compression '{spec}': {reason}")]
    Spec { spec: String, reason: String },
    #[error("invalid QSGD configuration: {0}")]
    Config(String),
    #[error("value {index} is not finite")]
    NonFinite { index: usize },
    #[error("the norm of bucket {bucket} is too large to encode (the limit is f32::MAX / 2)")]
    NormOverflow { bucket: usize },
    #[error("{n} values exceed the limit of {max}")]
    TooLong { n: u64, max: u64 },
    #[error("not a QSGD encoding (bad magic)")]
    BadMagic,
    #[error("unsupported QSGD version {0} (this build reads version {VERSION})")]
    Version(u8),
    #[error("corrupt QSGD header: {0}")]
    Header(String),
    #[error("QSGD header claims {n} values, which need at least {needed} bytes, but the buffer holds {got}")]
    TooShort { n: u64, needed: u64, got: u64 },
    #[error("QSGD encoding holds {got} values, expected {expected}")]
    Count { expected: usize, got: usize },
    #[error("QSGD encoding truncated in bucket {bucket}")]
    Truncated { bucket: usize },
    #[error("corrupt QSGD bucket {bucket}: {reason}")]
    Corrupt { bucket: usize, reason: &'static str },
    #[error("QSGD encoding has {0} trailing bytes")]
    Trailing(usize),
    #[error("QSGD encoding has nonzero padding bits")]
    Padding,
}

// ---------------------------------------------------------------------------------
// Bit I/O

/// LSB-first bit writer into a buffer with at least 8 bytes of slack past the end of
/// the stream: every flush stores a whole u64 and advances by the whole bytes in it.
struct BitWriter<'a> {
    buf: &'a mut [u8],
    byte: usize,
    acc: u64,
    /// Bits in `acc`; at most 7 after a flush, at most 63 after a put.
    fill: u32,
}

impl<'a> BitWriter<'a> {
    fn new(buf: &'a mut [u8]) -> Self {
        BitWriter {
            buf,
            byte: 0,
            acc: 0,
            fill: 0,
        }
    }

    /// Appends the low `n` bits of `v` (`n <= 56`, `v < 2^n`).
    #[inline(always)]
    fn put(&mut self, v: u64, n: u32) {
        debug_assert!(n <= 56 && v >> n == 0);
        if self.fill + n > 63 {
            self.flush();
        }
        self.acc |= v << self.fill;
        self.fill += n;
    }

    /// `put` then `flush`, without a branch: the caller keeps `fill <= 7` on entry (true
    /// after any flush) and `n <= 56`.
    #[inline(always)]
    fn put_flush(&mut self, v: u64, n: u32) {
        debug_assert!(self.fill <= 7 && n <= 56 && v >> n == 0);
        self.acc |= v << self.fill;
        self.fill += n;
        self.flush();
    }

    #[inline(always)]
    fn flush(&mut self) {
        self.buf[self.byte..self.byte + 8].copy_from_slice(&self.acc.to_le_bytes());
        let whole = self.fill >> 3;
        self.byte += whole as usize;
        self.acc >>= whole * 8;
        self.fill &= 7;
    }

    /// The writer, borrowed for a hot loop: a local copy whose state stays in registers.
    /// Give its state back with `set(local.mark())`.
    fn local(&mut self) -> BitWriter<'_> {
        BitWriter {
            buf: &mut *self.buf,
            byte: self.byte,
            acc: self.acc,
            fill: self.fill,
        }
    }

    fn mark(&self) -> (usize, u64, u32) {
        (self.byte, self.acc, self.fill)
    }

    /// Goes back to `mark` (what was written since is overwritten by what comes next),
    /// or takes over the state of a `local` copy.
    fn set(&mut self, mark: (usize, u64, u32)) {
        (self.byte, self.acc, self.fill) = mark;
    }

    /// Flushes and returns the length of the stream in bytes (the last one zero-padded).
    fn finish(mut self) -> usize {
        self.flush();
        self.byte + (self.fill > 0) as usize
    }
}

/// LSB-first bit reader. Reads past the end see zero bits; callers check `pos <= end`.
struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
    end: usize,
}

impl BitReader<'_> {
    /// The next bits of the stream: at least 57 of them are valid.
    #[inline(always)]
    fn peek(&self) -> u64 {
        load64(self.data, self.pos >> 3) >> (self.pos & 7)
    }

    #[inline(always)]
    fn remaining(&self) -> usize {
        self.end.saturating_sub(self.pos)
    }
}

/// The 8 bytes of `data` from `i` on as a little-endian u64, zero past the end.
#[inline(always)]
fn load64(data: &[u8], i: usize) -> u64 {
    match data.get(i..i + 8) {
        Some(s) => {
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            u64::from_le_bytes(a)
        }
        None => load64_tail(data, i),
    }
}

#[cold]
fn load64_tail(data: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(t) = data.get(i..) {
        let k = t.len().min(8);
        a[..k].copy_from_slice(&t[..k]);
    }
    u64::from_le_bytes(a)
}

/// Elias gamma code of `x >= 1`: (code, length in bits), LSB-first.
#[inline(always)]
fn gamma(x: u64) -> (u64, u32) {
    let z = 63 - x.leading_zeros();
    ((((x - (1u64 << z)) << 1) | 1) << z, 2 * z + 1)
}

// ---------------------------------------------------------------------------------
// Encoding

/// Buffers reused across the buckets of one `encode` call.
struct Scratch {
    rnd: Vec<u32>,
    fields: Vec<u32>,
    masks: Vec<u64>,
}

/// What the quantizer tells the mode choice.
struct Quantized {
    /// Nonzero levels.
    nnz: u32,
    /// Levels of 2 or more.
    above_one: u32,
    /// The OR of all levels.
    levels_or: u32,
}

impl Quantized {
    /// The sum over nonzero levels of `1 + gamma_len(level)` (sign and level in Elias
    /// mode): from the counts when every level is at most 3, else from `fields`.
    fn level_bits(&self, fields: &[u32]) -> usize {
        if self.levels_or <= 3 {
            2 * (self.nnz + self.above_one) as usize
        } else {
            level_bits(fields)
        }
    }
}

/// The sum over the nonzero levels of `fields` of `1 + gamma_len(level)`.
#[inline(never)]
fn level_bits(fields: &[u32]) -> usize {
    let mut sum = 0u32;
    for &f in fields {
        let lvl = f >> 1;
        // 1 + gamma_len(lvl) = 2 * (floor(log2 lvl) + 1), read off the f32 exponent.
        let e = ((lvl as i32 as f32).to_bits() >> 23).wrapping_sub(126);
        sum += if lvl != 0 { 2 * e } else { 0 };
    }
    sum as usize
}

/// Quantizes `values` (finite) with `cfg` and the quantization noise of `seed`.
///
/// Refuses NaN and infinities (and a bucket whose norm exceeds [`MAX_SCALE`]), so that
/// they never reach the wire. The same input, configuration and seed always give the
/// same bytes.
pub fn encode(values: &[f32], cfg: &QsgdConfig, seed: u64) -> Result<Vec<u8>, QsgdError> {
    cfg.validate()?;
    let n = values.len();
    if n > MAX_LEN {
        return Err(QsgdError::TooLong {
            n: n as u64,
            max: MAX_LEN as u64,
        });
    }
    let w = cfg.bits as u32 + 1;
    let buckets = n.div_ceil(cfg.bucket);
    // Worst case: every bucket in fixed mode; plus slack for the writer's 8-byte stores
    // and for an Elias attempt that overshoots its budget before it gives up.
    let max_bits = buckets * 33 + n * w as usize;
    let mut out = vec![0u8; HEADER_BYTES + max_bits.div_ceil(8) + WRITER_SLACK];
    out[0..4].copy_from_slice(&MAGIC);
    out[4] = VERSION;
    out[5] = cfg.bits;
    out[6] = cfg.norm.code();
    out[7] = 0;
    out[8..12].copy_from_slice(&(cfg.bucket as u32).to_le_bytes());
    out[12..20].copy_from_slice(&(n as u64).to_le_bytes());

    let d_max = cfg.bucket.min(n);
    let mut sc = Scratch {
        rnd: vec![0; d_max],
        fields: vec![0; d_max],
        masks: vec![0; d_max.div_ceil(64)],
    };
    let mut wr = BitWriter::new(&mut out[HEADER_BYTES..]);
    for (b, v) in values.chunks(cfg.bucket).enumerate() {
        encode_bucket(v, b, cfg, seed, &mut sc, &mut wr)?;
    }
    let len = HEADER_BYTES + wr.finish();
    out.truncate(len);
    if out.capacity() - len > len / 4 {
        out.shrink_to_fit();
    }
    Ok(out)
}

fn encode_bucket(
    v: &[f32],
    b: usize,
    cfg: &QsgdConfig,
    seed: u64,
    sc: &mut Scratch,
    wr: &mut BitWriter<'_>,
) -> Result<(), QsgdError> {
    let d = v.len();
    let first = b * cfg.bucket;
    let scale = match cfg.norm {
        Norm::L2 => l2_norm(v, first)?,
        Norm::Max => max_abs(v, first)?,
    };
    if scale.is_nan() || scale > MAX_SCALE {
        return Err(QsgdError::NormOverflow { bucket: b });
    }
    if scale == 0.0 {
        wr.put(0, 32);
        return Ok(());
    }
    let s = cfg.levels();
    let rnd = &mut sc.rnd[..d];
    fill_noise(seed, b as u64, rnd);
    let fields = &mut sc.fields[..d];
    let inv = s as f32 / scale;
    let k = frac_bits(cfg.bits);
    let q = if (inv * (1u32 << k) as f32).is_finite() {
        quantize_f32(v, rnd, inv, s, k, fields)
    } else {
        // A tiny (subnormal) scale: s 2^k / scale overflows f32.
        quantize_f64(v, rnd, s as f64 / scale as f64, s, k, fields)
    };
    if q.nnz == 0 {
        wr.put(0, 32);
        return Ok(());
    }
    let w = cfg.bits as u32 + 1;
    let fixed_bits = d * w as usize;
    let masks = &mut sc.masks[..d.div_ceil(64)];
    // Every nonzero costs at least one more bit for its run: skip Elias when even that
    // lower bound loses (many nonzeros, large levels). Otherwise write the Elias coding
    // and, should it reach the size of the fixed-width one, rewind and write that.
    let lower_bound = q.level_bits(fields) + q.nnz as usize;
    if lower_bound < fixed_bits {
        // Levels up to 3, a third of them nonzero or more (the usual case of the
        // default scheme): four fields a lookup. Otherwise the nonzeros only, one
        // symbol a lookup, tried only if a run of one zero or more costing 3 bits or
        // more still leaves it smaller (a tighter bound, from the masks of nonzeros).
        let small = q.levels_or <= 3 && d <= GROUP_MAX_BUCKET && 3 * q.nnz as usize >= d;
        if small || {
            nonzero_masks(fields, masks);
            lower_bound + 2 * runs_after_zeros(masks) < fixed_bits
        } {
            let mark = wr.mark();
            wr.put(scale.to_bits() as u64 | 1 << 32, 33);
            let smaller = if small {
                write_elias_groups(fields, fixed_bits, wr)
            } else {
                write_elias(fields, masks, d, fixed_bits, wr)
            };
            if smaller {
                return Ok(());
            }
            wr.set(mark);
        }
    }
    wr.put(scale.to_bits() as u64, 33);
    match w {
        2 => pack_fixed::<2>(fields, wr),
        3 => pack_fixed::<3>(fields, wr),
        4 => pack_fixed::<4>(fields, wr),
        5 => pack_fixed::<5>(fields, wr),
        6 => pack_fixed::<6>(fields, wr),
        7 => pack_fixed::<7>(fields, wr),
        8 => pack_fixed::<8>(fields, wr),
        _ => pack_fixed::<9>(fields, wr),
    }
    Ok(())
}

/// Independent noise streams per bucket, interleaved so that the CPU overlaps them.
const LANES: usize = 2;
/// Bits of each uniform: three of them from one `next_u64`.
const NOISE_BITS: u32 = 21;

/// The noise of bucket `b`: 21-bit uniforms, three from each u64 word (bits 0..21,
/// 21..42, 42..63 for values 3m, 3m + 1, 3m + 2), word m drawn from stream `m % LANES`,
/// `Rng::derive(seed, &[STREAM, b, m % LANES])`.
#[inline(never)]
fn fill_noise(seed: u64, b: u64, rnd: &mut [u32]) {
    const MASK: u64 = (1 << NOISE_BITS) - 1;
    let words = rnd.len().div_ceil(3);
    let lanes = words.min(LANES);
    let mut rng: [Rng; LANES] = std::array::from_fn(|j| Rng::derive(seed, &[STREAM, b, j as u64]));
    let mut groups = rnd.chunks_exact_mut(3 * LANES);
    if lanes == LANES {
        for g in &mut groups {
            for (j, r) in rng.iter_mut().enumerate() {
                let x = r.next_u64();
                g[3 * j] = (x & MASK) as u32;
                g[3 * j + 1] = (x >> NOISE_BITS & MASK) as u32;
                g[3 * j + 2] = (x >> (2 * NOISE_BITS) & MASK) as u32;
            }
        }
    }
    let rest = if lanes == LANES {
        groups.into_remainder()
    } else {
        rnd
    };
    for (m, t) in rest.chunks_mut(3).enumerate() {
        let mut x = rng[m % LANES].next_u64();
        for u in t {
            *u = (x & MASK) as u32;
            x >>= NOISE_BITS;
        }
    }
}

/// Bit j of `masks[i]` is set when `fields[64 i + j]` is nonzero.
#[inline(never)]
fn nonzero_masks(fields: &[u32], masks: &mut [u64]) {
    for (m, c) in masks.iter_mut().zip(fields.chunks(64)) {
        let mut flags = [0u8; 64];
        for (g, &f) in flags.iter_mut().zip(c) {
            *g = (f != 0) as u8;
        }
        // Eight 0/1 bytes to eight bits: the multiply moves byte j's bit to bit 56 + j,
        // with no carries into the top byte.
        let mut bits = 0u64;
        for (k, ch) in flags.chunks_exact(8).enumerate() {
            let mut a = [0u8; 8];
            a.copy_from_slice(ch);
            bits |= (u64::from_le_bytes(a).wrapping_mul(0x0102_0408_1020_4080) >> 56) << (8 * k);
        }
        *m = bits;
    }
}

/// Accumulators of the norms: enough independent chains to hide the adds' latency.
const NORM_LANES: usize = 32;

/// How many nonzero values follow a zero (in Elias mode, their runs are not empty).
fn runs_after_zeros(masks: &[u64]) -> usize {
    let mut carry = 1u64; // the bucket starts as if after a nonzero
    let mut count = 0;
    for &m in masks {
        count += (m & !(m << 1 | carry)).count_ones() as usize;
        carry = m >> 63;
    }
    count
}

/// `||v||_2`; `NonFinite` for NaN or infinite values.
#[inline(never)]
fn l2_norm(v: &[f32], first: usize) -> Result<f32, QsgdError> {
    // NORM_LANES independent sums (a fixed order, so the result is reproducible), folded
    // pairwise at the end.
    let mut acc = [0f32; NORM_LANES];
    let mut chunks = v.chunks_exact(NORM_LANES);
    for c in &mut chunks {
        for j in 0..NORM_LANES {
            acc[j] += c[j] * c[j];
        }
    }
    for (j, &x) in chunks.remainder().iter().enumerate() {
        acc[j] += x * x;
    }
    let mut width = NORM_LANES;
    while width > 1 {
        width /= 2;
        for j in 0..width {
            acc[j] += acc[j + width];
        }
    }
    let sum = acc[0];
    // Not finite: a NaN or infinite value, or squares that overflow f32. Tiny: squares
    // that may have underflowed. Both redo the sum in f64, which neither can affect.
    if sum.is_finite() && sum >= 1e-30 {
        return Ok(sum.sqrt());
    }
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(QsgdError::NonFinite { index: first + i });
    }
    let sum: f64 = v.iter().map(|&x| x as f64 * x as f64).sum();
    Ok(sum.sqrt() as f32)
}

/// `max |v_i|`; `NonFinite` for NaN or infinite values.
#[inline(never)]
fn max_abs(v: &[f32], first: usize) -> Result<f32, QsgdError> {
    // On the bits of |x| integer order is float order, and NaN and infinity are the
    // largest of all.
    let mut acc = [0i32; NORM_LANES];
    let mut chunks = v.chunks_exact(NORM_LANES);
    for c in &mut chunks {
        for j in 0..NORM_LANES {
            acc[j] = acc[j].max((c[j].to_bits() & 0x7fff_ffff) as i32);
        }
    }
    for (j, &x) in chunks.remainder().iter().enumerate() {
        acc[j] = acc[j].max((x.to_bits() & 0x7fff_ffff) as i32);
    }
    let m = acc.iter().copied().max().unwrap_or(0) as u32;
    if m >= 0x7f80_0000 {
        let i = v.iter().position(|x| !x.is_finite()).unwrap_or(0);
        return Err(QsgdError::NonFinite { index: first + i });
    }
    Ok(f32::from_bits(m))
}

/// 2^23: adding it to an f32 in [0, 2^23) rounds it to an integer held in the low
/// mantissa bits (a float-to-int conversion that vectorizes without saturation checks).
const ROUND: f32 = 8_388_608.0;

/// Fractional bits of the fixed-point `s |v_i| / scale` that the stochastic rounding
/// compares with the noise: as many as f32 holds below `s` (23 - bits), at most the
/// noise's 21.
fn frac_bits(bits: u8) -> u32 {
    (23 - bits as u32).min(NOISE_BITS)
}

/// Stochastic rounding of `r_i = min(|v_i| * inv, s)` to a level in `0..=s`, written as
/// `level << 1 | sign` into `fields`. With `k` fractional bits, `t = round(r_i 2^k)` and
/// the k-bit uniform `u`, the level is `(t + u) >> k`: `floor(r)`, plus one with
/// probability `frac(t / 2^k)`. The rounding of `r_i` to 2^-k is within f32's own
/// precision of it. Written to vectorize: no branches, tables or saturating casts.
#[inline(never)]
fn quantize_f32(v: &[f32], rnd: &[u32], inv: f32, s: u32, k: u32, fields: &mut [u32]) -> Quantized {
    let scale_k = (1u32 << k) as f32;
    let inv_k = inv * scale_k; // exact: a power of two (the caller checked it is finite)
    let top = (s << k) as f32; // exact: below 2^23
    let shift = NOISE_BITS - k;
    let mut nnz = 0u32;
    let mut above_one = 0u32;
    let mut levels_or = 0u32;
    for ((&x, &u), f) in v.iter().zip(rnd).zip(fields.iter_mut()) {
        let r = x.abs() * inv_k;
        let r = if r < top { r } else { top };
        let t = (r + ROUND).to_bits() & 0x7f_ffff; // round(r), exactly
        let lvl = (t + (u >> shift)) >> k;
        let nz = lvl != 0;
        let neg = (x.to_bits() >> 31) & nz as u32;
        *f = (lvl << 1) | neg;
        nnz += nz as u32;
        above_one += (lvl as i32 > 1) as u32; // lvl < 2^9: a signed compare
        levels_or |= lvl;
    }
    Quantized {
        nnz,
        above_one,
        levels_or,
    }
}

/// `quantize_f32` for buckets whose scale is so small that `s / scale` overflows f32.
fn quantize_f64(v: &[f32], rnd: &[u32], inv: f64, s: u32, k: u32, fields: &mut [u32]) -> Quantized {
    let mut nnz = 0u32;
    let mut above_one = 0u32;
    let mut levels_or = 0u32;
    let top = (s << k) as f64;
    for ((&x, &u), f) in v.iter().zip(rnd).zip(fields.iter_mut()) {
        let t = (x.abs() as f64 * inv * (1u32 << k) as f64).min(top).round() as u32;
        let lvl = (t + (u >> (NOISE_BITS - k))) >> k;
        let neg = (x.to_bits() >> 31) & (lvl != 0) as u32;
        *f = (lvl << 1) | neg;
        nnz += (lvl != 0) as u32;
        above_one += (lvl > 1) as u32;
        levels_or |= lvl;
    }
    Quantized {
        nnz,
        above_one,
        levels_or,
    }
}

/// Bytes past the worst-case size that the encoder's buffer has: the writer stores 8
/// bytes at a time, and an Elias attempt checks its budget once per 64 values, so it
/// may overshoot by up to 64 symbols of at most 67 bits.
const WRITER_SLACK: usize = 8 + 64 * 67 / 8 + 8;

/// Writes the Elias coding of a bucket. Returns false as soon as it has taken `budget`
/// bits or more (the caller then rewinds the writer); true if it took fewer.
#[inline(never)]
fn write_elias(
    fields: &[u32],
    masks: &[u64],
    d: usize,
    budget: usize,
    wr: &mut BitWriter<'_>,
) -> bool {
    let mut w = wr.local();
    let ok = write_elias_into(fields, masks, d, budget, &mut w);
    let m = w.mark();
    wr.set(m);
    ok
}

/// Runs shorter than this, before levels up to 31, have their whole symbol in
/// `SYM_CODE` and `SYM_LEN`.
const SHORT_RUN: usize = 64;

/// `gamma(run + 1), sign, gamma(level)` at `run << 6 | field` for every `run <
/// SHORT_RUN` and field `level << 1 | sign` with `1 <= level <= 31`: at most 13 + 1 + 9
/// bits, so that two fit one `put_flush`.
static SYM_CODE: [u32; SHORT_RUN << 6] = sym_codes().0;
static SYM_LEN: [u8; SHORT_RUN << 6] = sym_codes().1;

const fn gamma_const(x: u64) -> (u64, u32) {
    let z = 63 - x.leading_zeros();
    ((((x - (1u64 << z)) << 1) | 1) << z, 2 * z + 1)
}

const fn sym_codes() -> ([u32; SHORT_RUN << 6], [u8; SHORT_RUN << 6]) {
    let mut code = [0u32; SHORT_RUN << 6];
    let mut len = [0u8; SHORT_RUN << 6];
    let mut run = 0;
    while run < SHORT_RUN {
        let (c1, l1) = gamma_const(run as u64 + 1);
        let mut f = 2;
        while f < 64 {
            let (c2, l2) = gamma_const(f as u64 >> 1);
            code[run << 6 | f] = (c1 | ((f as u64 & 1) | c2 << 1) << l1) as u32;
            len[run << 6 | f] = (l1 + 1 + l2) as u8;
            f += 1;
        }
        run += 1;
    }
    (code, len)
}

/// Takes the lowest set bit `j` of `m` (bit j: `fw[j]`, at position `base + j` of the
/// bucket, is nonzero) and returns its symbol's `SYM_CODE` index; a symbol that is not
/// there, as `(run, field)`.
#[inline(always)]
fn next_symbol(
    m: &mut u64,
    base: usize,
    next: &mut usize,
    fw: &[u32],
) -> Result<usize, (usize, u32)> {
    let j = m.trailing_zeros() as usize;
    *m &= *m - 1;
    let run = base + j - *next;
    *next = base + j + 1;
    let f = fw[j];
    if run < SHORT_RUN && f < 64 {
        Ok(run << 6 | f as usize)
    } else {
        Err((run, f))
    }
}

/// A symbol that is not in `SYM_CODE` (up to 41 + 1 + 15 bits): the run's gamma, then
/// the sign and the level's gamma, as (code, length) pairs for `put_flush`.
#[cold]
#[inline(never)]
fn long_symbol((run, field): (usize, u32)) -> [(u64, u32); 2] {
    let (c1, l1) = gamma(run as u64 + 1);
    let (c2, l2) = gamma(field as u64 >> 1);
    [(c1, l1), ((field as u64 & 1) | c2 << 1, l2 + 1)]
}

#[inline(always)]
fn write_elias_into(
    fields: &[u32],
    masks: &[u64],
    d: usize,
    budget: usize,
    wr: &mut BitWriter<'_>,
) -> bool {
    wr.flush();
    let start = wr.byte * 8 + wr.fill as usize;
    let mut next = 0usize;
    for (wi, (&m0, fw)) in masks.iter().zip(fields.chunks(64)).enumerate() {
        let base = wi * 64;
        let mut m = m0;
        // Two symbols a store.
        while m != 0 {
            let i1 = match next_symbol(&mut m, base, &mut next, fw) {
                Ok(i) => i,
                Err(long) => {
                    for (c, l) in long_symbol(long) {
                        wr.put_flush(c, l);
                    }
                    continue;
                }
            };
            let (c1, l1) = (SYM_CODE[i1] as u64, SYM_LEN[i1] as u32);
            if m == 0 {
                wr.put_flush(c1, l1);
                break;
            }
            match next_symbol(&mut m, base, &mut next, fw) {
                Ok(i2) => wr.put_flush(c1 | (SYM_CODE[i2] as u64) << l1, l1 + SYM_LEN[i2] as u32),
                Err(long) => {
                    wr.put_flush(c1, l1);
                    for (c, l) in long_symbol(long) {
                        wr.put_flush(c, l);
                    }
                }
            }
        }
        if wr.byte * 8 + wr.fill as usize - start >= budget {
            return false;
        }
    }
    if next < d {
        let (c, l) = gamma((d - next + 1) as u64);
        wr.put(c, l);
    }
    wr.byte * 8 + wr.fill as usize - start < budget
}

/// `gamma(run + 1)` for `run < 64`, as `code | len << 16`.
static RUN_GAMMA: [u32; 64] = run_gammas();

const fn run_gammas() -> [u32; 64] {
    let mut t = [0u32; 64];
    let mut run = 0;
    while run < 64 {
        let (c, l) = gamma_const(run as u64 + 1);
        t[run] = c as u32 | l << 16;
        run += 1;
    }
    t
}

/// Fields a lookup of `GROUP_CODES`.
const GROUP: usize = 4;

/// For four consecutive fields `level << 1 | sign` with levels up to 3, at `f0 | f1 <<
/// 3 | f2 << 6 | f3 << 9`: the Elias coding of the group from its first nonzero's sign
/// on (the run before it depends on the groups before), as `code | len << 20 | lead <<
/// 25 | trail << 28`, with `lead` the zeros before its first nonzero (4: none) and
/// `trail` the zeros after its last. At most 4 + 3 * 5 bits.
static GROUP_CODES: [u32; 1 << (3 * GROUP)] = group_codes();

const fn group_codes() -> [u32; 1 << (3 * GROUP)] {
    let mut t = [0u32; 1 << (3 * GROUP)];
    let mut i = 0;
    while i < t.len() {
        let (mut code, mut len) = (0u64, 0u32);
        let mut last = GROUP; // the position of the last nonzero, none yet
        let mut lead = GROUP;
        let mut j = 0;
        while j < GROUP {
            let f = (i >> (3 * j)) & 7;
            if f >> 1 != 0 {
                if last == GROUP {
                    lead = j;
                } else {
                    let (c, l) = gamma_const((j - last) as u64);
                    code |= c << len;
                    len += l;
                }
                let (c, l) = gamma_const(f as u64 >> 1);
                code |= ((f as u64 & 1) | c << 1) << len;
                len += l + 1;
                last = j;
            }
            j += 1;
        }
        let trail = if last == GROUP { 0 } else { GROUP - 1 - last };
        t[i] = code as u32 | len << 20 | (lead as u32) << 25 | (trail as u32) << 28;
        i += 1;
    }
    t
}

/// Largest bucket for `write_elias_groups`: a run's gamma (at most 2 * 17 + 1 bits)
/// and a group's code (at most 19) fit one `put_flush`.
const GROUP_MAX_BUCKET: usize = 1 << 17;

/// `write_elias` for a bucket of at most `GROUP_MAX_BUCKET` values whose levels are all
/// at most 3: four fields a lookup.
#[inline(never)]
fn write_elias_groups(fields: &[u32], budget: usize, wr: &mut BitWriter<'_>) -> bool {
    debug_assert!(fields.len() <= GROUP_MAX_BUCKET);
    let mut w = wr.local();
    let ok = write_groups_into(fields, budget, &mut w);
    let m = w.mark();
    wr.set(m);
    ok
}

/// `gamma(x)` off the hot path.
#[cold]
#[inline(never)]
fn gamma_cold(x: u64) -> (u64, u32) {
    gamma(x)
}

/// The code of the group `g` of four fields (levels up to 3) after `zeros` zeros, and
/// its length (0 for four zeros); `zeros` becomes the zeros after it.
#[inline(always)]
fn group_code(g: &[u32], zeros: &mut usize) -> (u64, u32) {
    let i = (g[0] | g[1] << 3 | g[2] << 6 | g[3] << 9) as usize;
    let e = GROUP_CODES[i & ((1 << (3 * GROUP)) - 1)];
    let lead = ((e >> 25) & 7) as usize;
    if lead == GROUP {
        *zeros += GROUP;
        return (0, 0);
    }
    let run = *zeros + lead;
    let (rc, rl) = match RUN_GAMMA.get(run) {
        Some(&r) => ((r & 0xffff) as u64, r >> 16),
        None => gamma_cold(run as u64 + 1),
    };
    *zeros = (e >> 28) as usize;
    (rc | ((e & 0xf_ffff) as u64) << rl, rl + ((e >> 20) & 31))
}

#[inline(always)]
fn write_groups_into(fields: &[u32], budget: usize, wr: &mut BitWriter<'_>) -> bool {
    wr.flush();
    let start = wr.byte * 8 + wr.fill as usize;
    let mut zeros = 0usize; // since the last nonzero
    let mut chunks = fields.chunks_exact(64);
    for c in &mut chunks {
        // Two groups a store when they fit (nearly always).
        for g in c.chunks_exact(2 * GROUP) {
            let (c1, l1) = group_code(&g[..GROUP], &mut zeros);
            let (c2, l2) = group_code(&g[GROUP..], &mut zeros);
            if l1 + l2 <= 56 {
                wr.put_flush(c1 | c2 << l1, l1 + l2);
            } else {
                wr.put_flush(c1, l1);
                wr.put_flush(c2, l2);
            }
        }
        if wr.byte * 8 + wr.fill as usize - start >= budget {
            return false;
        }
    }
    let mut groups = chunks.remainder().chunks_exact(GROUP);
    for g in &mut groups {
        let (c, l) = group_code(g, &mut zeros);
        wr.put_flush(c, l);
    }
    for &f in groups.remainder() {
        if f >> 1 == 0 {
            zeros += 1;
            continue;
        }
        let (c1, l1) = gamma(zeros as u64 + 1);
        let (c2, l2) = gamma(f as u64 >> 1);
        wr.put_flush(c1 | ((f as u64 & 1) | c2 << 1) << l1, l1 + l2 + 1);
        zeros = 0;
    }
    if zeros > 0 {
        let (c, l) = gamma(zeros as u64 + 1);
        wr.put(c, l);
    }
    wr.byte * 8 + wr.fill as usize - start < budget
}

#[inline(never)]
fn pack_fixed<const W: u32>(fields: &[u32], wr: &mut BitWriter<'_>) {
    let mut w = wr.local();
    pack_fixed_into::<W>(fields, &mut w);
    let m = w.mark();
    wr.set(m);
}

#[inline(always)]
fn pack_fixed_into<const W: u32>(fields: &[u32], wr: &mut BitWriter<'_>) {
    let k = (56 / W) as usize;
    let mut chunks = fields.chunks_exact(k);
    for c in &mut chunks {
        let mut g = 0u64;
        for (j, &f) in c.iter().enumerate() {
            g |= (f as u64) << (j as u32 * W);
        }
        wr.put(g, k as u32 * W);
    }
    let rem = chunks.remainder();
    if !rem.is_empty() {
        let mut g = 0u64;
        for (j, &f) in rem.iter().enumerate() {
            g |= (f as u64) << (j as u32 * W);
        }
        wr.put(g, rem.len() as u32 * W);
    }
}

// ---------------------------------------------------------------------------------
// Decoding

struct Header {
    cfg: QsgdConfig,
    n: usize,
}

/// How many buckets of each kind a decoded buffer held.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct ModeCounts {
    zero: usize,
    fixed: usize,
    elias: usize,
}

fn parse_header(bytes: &[u8]) -> Result<Header, QsgdError> {
    let Some(h) = bytes.get(..HEADER_BYTES) else {
        return Err(QsgdError::Header(format!(
            "buffer of {} bytes is shorter than the {HEADER_BYTES}-byte header",
            bytes.len()
        )));
    };
    if h[0..4] != MAGIC {
        return Err(QsgdError::BadMagic);
    }
    if h[4] != VERSION {
        return Err(QsgdError::Version(h[4]));
    }
    let bits = h[5];
    if !(MIN_BITS..=MAX_BITS).contains(&bits) {
        return Err(QsgdError::Header(format!(
            "bits {bits} is not in {MIN_BITS}..={MAX_BITS}"
        )));
    }
    let Some(norm) = Norm::from_code(h[6]) else {
        return Err(QsgdError::Header(format!("unknown norm code {}", h[6])));
    };
    if h[7] != 0 {
        return Err(QsgdError::Header(format!(
            "reserved byte is {}, not 0",
            h[7]
        )));
    }
    let bucket = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
    if !(1..=MAX_BUCKET).contains(&bucket) {
        return Err(QsgdError::Header(format!(
            "bucket {bucket} is not in 1..={MAX_BUCKET}"
        )));
    }
    let n = u64::from_le_bytes([h[12], h[13], h[14], h[15], h[16], h[17], h[18], h[19]]);
    if n > MAX_LEN as u64 {
        return Err(QsgdError::TooLong {
            n,
            max: MAX_LEN as u64,
        });
    }
    let n = n as usize;
    // Every bucket carries at least its 4-byte scale: checked before anything is allocated.
    let needed = n.div_ceil(bucket) as u64 * 4;
    let got = (bytes.len() - HEADER_BYTES) as u64;
    if got < needed || got > (usize::MAX / 8) as u64 {
        return Err(QsgdError::TooShort {
            n: n as u64,
            needed: HEADER_BYTES as u64 + needed,
            got: bytes.len() as u64,
        });
    }
    Ok(Header {
        cfg: QsgdConfig { bits, bucket, norm },
        n,
    })
}

/// The scheme and the number of values of an encoding, from its header alone.
pub fn header(bytes: &[u8]) -> Result<(QsgdConfig, usize), QsgdError> {
    parse_header(bytes).map(|h| (h.cfg, h.n))
}

/// Decodes an encoding made by [`encode`]. Truncated or corrupt input is an error, never
/// a panic; the output is allocated only once the header's length has been checked
/// against the buffer's size, and every decoded value is finite.
pub fn decode(bytes: &[u8]) -> Result<Vec<f32>, QsgdError> {
    decode_inner(bytes, None).map(|(v, _)| v)
}

/// [`decode`], refusing (before any allocation) an encoding of other than `expected_len` values.
pub fn decode_expect(bytes: &[u8], expected_len: usize) -> Result<Vec<f32>, QsgdError> {
    decode_inner(bytes, Some(expected_len)).map(|(v, _)| v)
}

/// [`decode`] into a buffer the caller reuses, of exactly the encoding's length: saves
/// the allocation (and the page faults of a fresh large vector). On an error the
/// contents of `out` are unspecified.
pub fn decode_into(bytes: &[u8], out: &mut [f32]) -> Result<(), QsgdError> {
    let h = parse_header(bytes)?;
    if h.n != out.len() {
        return Err(QsgdError::Count {
            expected: out.len(),
            got: h.n,
        });
    }
    decode_body(bytes, &h, out).map(|_| ())
}

fn decode_inner(
    bytes: &[u8],
    expected: Option<usize>,
) -> Result<(Vec<f32>, ModeCounts), QsgdError> {
    let h = parse_header(bytes)?;
    if let Some(e) = expected {
        if e != h.n {
            return Err(QsgdError::Count {
                expected: e,
                got: h.n,
            });
        }
    }
    let mut out = vec![0f32; h.n];
    let counts = decode_body(bytes, &h, &mut out)?;
    Ok((out, counts))
}

/// Decodes the bit stream of a checked header into `out` (of length `h.n`), writing
/// every value.
fn decode_body(bytes: &[u8], h: &Header, out: &mut [f32]) -> Result<ModeCounts, QsgdError> {
    let data = &bytes[HEADER_BYTES..];
    let mut rd = BitReader {
        data,
        pos: 0,
        end: data.len() * 8,
    };
    let s = h.cfg.levels();
    let w = h.cfg.bits as u32 + 1;
    // tab[field] = ±level; a sign on level 0 reads as +0.
    let mut tab = [0f32; 512];
    for (f, t) in tab.iter_mut().enumerate().take(1 << w) {
        let lvl = (f >> 1) as f32;
        *t = if f & 1 == 1 && f > 1 { -lvl } else { lvl };
    }
    let mut counts = ModeCounts::default();
    // Whether the last Elias bucket was sparse: the next is likely to be too.
    let mut sparse = false;
    for (b, o) in out.chunks_mut(h.cfg.bucket).enumerate() {
        let d = o.len();
        if rd.remaining() < 33 {
            if rd.remaining() >= 32 && rd.peek() & 0xffff_ffff == 0 {
                rd.pos += 32;
                o.fill(0.0);
                counts.zero += 1;
                continue;
            }
            return Err(QsgdError::Truncated { bucket: b });
        }
        let head = rd.peek();
        let bits = head as u32;
        if bits == 0 {
            rd.pos += 32;
            o.fill(0.0);
            counts.zero += 1;
            continue;
        }
        let scale = f32::from_bits(bits);
        if !(scale > 0.0 && scale <= MAX_SCALE) {
            return Err(QsgdError::Corrupt {
                bucket: b,
                reason: "scale is negative, NaN, infinite or too large",
            });
        }
        rd.pos += 33;
        let step = scale / s as f32;
        if (head >> 32) & 1 == 0 {
            if rd.remaining() < d * w as usize {
                return Err(QsgdError::Truncated { bucket: b });
            }
            match w {
                2 => unpack_fixed::<2>(&mut rd, o, &tab, step),
                3 => unpack_fixed::<3>(&mut rd, o, &tab, step),
                4 => unpack_fixed::<4>(&mut rd, o, &tab, step),
                5 => unpack_fixed::<5>(&mut rd, o, &tab, step),
                6 => unpack_fixed::<6>(&mut rd, o, &tab, step),
                7 => unpack_fixed::<7>(&mut rd, o, &tab, step),
                8 => unpack_fixed::<8>(&mut rd, o, &tab, step),
                _ => unpack_fixed::<9>(&mut rd, o, &tab, step),
            }
            counts.fixed += 1;
        } else {
            let start = rd.pos;
            if sparse {
                decode_elias::<true>(&mut rd, o, s, step, b)?;
            } else {
                decode_elias::<false>(&mut rd, o, s, step, b)?;
            }
            sparse = ((rd.pos - start) as f64) < SPARSE_BITS_PER_VALUE * d as f64;
            counts.elias += 1;
        }
    }
    let used = rd.pos.div_ceil(8);
    if used < data.len() {
        return Err(QsgdError::Trailing(data.len() - used));
    }
    if rd.pos & 7 != 0 && data[used - 1] >> (rd.pos & 7) != 0 {
        return Err(QsgdError::Padding);
    }
    Ok(counts)
}

#[inline(never)]
fn unpack_fixed<const W: u32>(
    rd: &mut BitReader<'_>,
    out: &mut [f32],
    tab: &[f32; 512],
    step: f32,
) {
    let k = (56 / W) as usize;
    let mask = (1u64 << W) - 1;
    let mut chunks = out.chunks_exact_mut(k);
    for c in &mut chunks {
        let win = rd.peek();
        for (j, x) in c.iter_mut().enumerate() {
            *x = tab[((win >> (j as u32 * W)) & mask) as usize] * step;
        }
        rd.pos += k * W as usize;
    }
    let rem = chunks.into_remainder();
    if !rem.is_empty() {
        let win = rd.peek();
        for (j, x) in rem.iter_mut().enumerate() {
            *x = tab[((win >> (j as u32 * W)) & mask) as usize] * step;
        }
        rd.pos += rem.len() * W as usize;
    }
}

/// Bits the Elias fast path looks at.
const FAST_BITS: u32 = 12;
/// Output positions one fast-path lookup writes.
const FAST_SLOTS: usize = 8;

/// For every value of the next `FAST_BITS` bits of an Elias stream: the whole symbols
/// `gamma(run + 1), sign, gamma(level)` that they hold, as many as fit in the bits and
/// whose positions fit in a window of `FAST_SLOTS`, with levels up to 31. `*_SLOTS`
/// holds the signed levels of the window's positions (0 for a zero, and past the
/// symbols); `*_META` says where they are, as `fast_meta`. Dense: the window starts at
/// the current position (its zeros are written with the values). Sparse: it starts at
/// the first symbol's value (the bucket was zeroed first), so that a run of up to 31
/// zeros costs nothing. No positions: the first symbol does not fit (a long code, or
/// the bucket's trailing run, which has no sign).
static DENSE_META: [u32; 1 << FAST_BITS] = elias_fast_table(false).0;
static DENSE_SLOTS: [[i16; FAST_SLOTS]; 1 << FAST_BITS] = elias_fast_table(false).1;
static SPARSE_META: [u32; 1 << FAST_BITS] = elias_fast_table(true).0;
static SPARSE_SLOTS: [[i16; FAST_SLOTS]; 1 << FAST_BITS] = elias_fast_table(true).1;

/// An entry of `*_META`: its symbols take `bits` bits and `positions` output
/// positions, the window starting `skip` positions on; `levels` is the OR of their
/// levels. The first symbol alone takes `first_bits` bits (0: it has no entry) and its
/// value is `first_run` positions on.
#[derive(Clone, Copy)]
struct FastMeta {
    bits: u32,
    positions: usize,
    skip: usize,
    levels: u32,
    first_bits: u32,
    first_run: usize,
}

impl FastMeta {
    const fn pack(self) -> u32 {
        self.bits
            | (self.positions as u32) << 4
            | (self.skip as u32) << 10
            | self.levels << 15
            | self.first_bits << 20
            | (self.first_run as u32) << 24
    }

    #[inline(always)]
    fn unpack(e: u32) -> Self {
        FastMeta {
            bits: e & 15,
            positions: ((e >> 4) & 63) as usize,
            skip: ((e >> 10) & 31) as usize,
            levels: (e >> 15) & 31,
            first_bits: (e >> 20) & 15,
            first_run: ((e >> 24) & 31) as usize,
        }
    }
}

const fn elias_fast_table(
    sparse: bool,
) -> ([u32; 1 << FAST_BITS], [[i16; FAST_SLOTS]; 1 << FAST_BITS]) {
    let mut meta = [0u32; 1 << FAST_BITS];
    let mut slots = [[0i16; FAST_SLOTS]; 1 << FAST_BITS];
    let mut i = 0;
    while i < meta.len() {
        let mut x = i as u64;
        let mut m = FastMeta {
            bits: 0,
            positions: 0,
            skip: 0,
            levels: 0,
            first_bits: 0,
            first_run: 0,
        };
        let mut end = 0; // window positions taken
        loop {
            let room = FAST_BITS - m.bits;
            // The run's gamma, the sign and at least the one bit of gamma(1).
            let z1 = x.trailing_zeros();
            if 2 * z1 + 3 > room {
                break;
            }
            let run = (((x >> (z1 + 1)) & ((1 << z1) - 1)) | (1 << z1)) as usize - 1;
            let at = 2 * z1 + 1;
            let sign = (x >> at) & 1;
            let rest = x >> (at + 1);
            let z2 = rest.trailing_zeros();
            let len = at + 2 * z2 + 2;
            if len > room {
                break;
            }
            let level = (((rest >> (z2 + 1)) & ((1 << z2) - 1)) | (1 << z2)) as u32;
            if level > 31 {
                break;
            }
            let first = m.bits == 0;
            if first {
                (m.first_bits, m.first_run) = (len, run);
                if sparse {
                    m.skip = run;
                }
            }
            // The window slot of the value.
            let slot = if first { run - m.skip } else { end + run };
            if slot >= FAST_SLOTS {
                break;
            }
            slots[i][slot] = if sign == 1 {
                -(level as i16)
            } else {
                level as i16
            };
            m.levels |= level;
            end = slot + 1;
            m.bits += len;
            x >>= len;
        }
        if end > 0 {
            m.positions = m.skip + end;
        } else {
            m.bits = 0;
        }
        meta[i] = m.pack();
        i += 1;
    }
    (meta, slots)
}

/// A bit buffer for the Elias decoder (F. Giesen's branch-free refill): `buf` holds
/// the stream from bit `8 ptr - cnt` on, `cnt` bits of it valid and the bits above them
/// either zero or the stream's next bits. A refill tops it up to 56..=63 bits.
struct BitBuf<'a> {
    data: &'a [u8],
    buf: u64,
    cnt: u32,
    ptr: usize,
}

impl<'a> BitBuf<'a> {
    fn at(data: &'a [u8], pos: usize) -> Self {
        let skip = (pos & 7) as u32;
        BitBuf {
            data,
            buf: (load64(data, pos >> 3) & ((1 << 56) - 1)) >> skip,
            cnt: 56 - skip,
            ptr: (pos >> 3) + 7,
        }
    }

    #[inline(always)]
    fn refill(&mut self) {
        self.buf |= load64(self.data, self.ptr) << self.cnt;
        self.ptr += ((63 - self.cnt) >> 3) as usize;
        self.cnt |= 56;
    }

    /// Drops `n` bits (`n <= cnt`).
    #[inline(always)]
    fn consume(&mut self, n: u32) {
        self.buf >>= n;
        self.cnt -= n;
    }

    /// The stream position of `buf`'s first bit.
    fn pos(&self) -> usize {
        8 * self.ptr - self.cnt as usize
    }
}

/// The symbol at the front of `buf` (at least 56 valid bits) if its run is below 2^14
/// and its level's gamma is valid (up to 255): (its bits, run, level, sign).
#[inline(always)]
fn whole_symbol(buf: u64) -> Option<(u32, usize, u32, u32)> {
    let z1 = buf.trailing_zeros();
    if z1 > 13 {
        return None;
    }
    let run = (((buf >> (z1 + 1)) & ((1 << z1) - 1)) | 1 << z1) as usize - 1;
    let rest = buf >> (2 * z1 + 1);
    let z2 = (rest >> 1).trailing_zeros();
    if z2 > MAX_LEVEL_Z {
        return None;
    }
    let level = (((rest >> (z2 + 2)) & ((1 << z2) - 1)) | 1 << z2) as u32;
    Some((2 * z1 + 2 * z2 + 3, run, level, (rest & 1) as u32))
}

/// Writes zeros over `out[from..to]`, 8 at a time while they fit in `out` (the last 8
/// may reach past `to`).
#[inline(always)]
fn zero_run(out: &mut [f32], from: usize, to: usize) {
    let mut q = from;
    while q < to {
        match out
            .get_mut(q..)
            .and_then(|o| o.first_chunk_mut::<FAST_SLOTS>())
        {
            Some(c) => *c = [0.0; FAST_SLOTS],
            None => {
                out[q..to].fill(0.0);
                return;
            }
        }
        q += FAST_SLOTS;
    }
}

/// Elias buckets that took fewer bits than this per value are followed by one decoded
/// in sparse mode (either mode decodes any bucket; this only picks the faster).
const SPARSE_BITS_PER_VALUE: f64 = 1.75;

/// Decodes the Elias coding of one bucket into `out`, writing every value; `SPARSE`
/// picks the table (see `DENSE_META`).
#[inline(never)]
fn decode_elias<const SPARSE: bool>(
    rd: &mut BitReader<'_>,
    out: &mut [f32],
    s: u32,
    step: f32,
    b: usize,
) -> Result<(), QsgdError> {
    const INDEX: u64 = (1 << FAST_BITS) - 1;
    let (meta, slots) = if SPARSE {
        out.fill(0.0);
        (&SPARSE_META, &SPARSE_SLOTS)
    } else {
        (&DENSE_META, &DENSE_SLOTS)
    };
    let d = out.len();
    let mut p = 0usize;
    // The OR of the levels decoded, and of the fast path's whole `*_META` entries, for
    // one check at the end.
    let mut levels = 0u32;
    let mut entries = 0u32;
    let mut pos = rd.pos;
    loop {
        let mut bits = BitBuf::at(rd.data, pos);
        // Whole entries while their windows lie inside the bucket: every symbol of one
        // does too. A refill is enough for four.
        'fast: loop {
            bits.refill();
            for _ in 0..4 {
                let i = (bits.buf & INDEX) as usize;
                let e = FastMeta::unpack(meta[i]);
                // (A dense window starts where it is.)
                let skip = if SPARSE { e.skip } else { 0 };
                if e.positions == 0 {
                    // A long run or a long level: one symbol, if it ends inside the
                    // bucket.
                    bits.refill();
                    let Some((len, run, level, sign)) = whole_symbol(bits.buf) else {
                        break 'fast;
                    };
                    if run >= d - p {
                        break 'fast;
                    }
                    if !SPARSE {
                        zero_run(out, p, p + run);
                    }
                    p += run;
                    out[p] = f32::from_bits((level as f32 * step).to_bits() | sign << 31);
                    p += 1;
                    levels |= level;
                    bits.consume(len);
                    continue 'fast;
                }
                let Some(dst) = out
                    .get_mut(p + skip..)
                    .and_then(|o| o.first_chunk_mut::<FAST_SLOTS>())
                else {
                    break 'fast;
                };
                for (x, &l) in dst.iter_mut().zip(&slots[i]) {
                    *x = l as f32 * step;
                }
                entries |= meta[i];
                p += e.positions;
                bits.consume(e.bits);
            }
        }
        // The bucket's last positions: first symbols that end inside it, and the
        // trailing run.
        while p < d {
            bits.refill();
            let left = d - p;
            let i = (bits.buf & INDEX) as usize;
            let e = FastMeta::unpack(meta[i]);
            // The first symbol's value, if it has one inside the bucket (its slot is 0
            // in a sparse window, its run in a dense one: then below 8).
            let first = slots[i]
                .get(e.first_run.wrapping_sub(e.skip))
                .filter(|_| e.first_bits != 0 && e.first_run < left);
            let len = if let Some(&l) = first {
                if !SPARSE {
                    out[p..p + e.first_run].fill(0.0);
                }
                out[p + e.first_run] = l as f32 * step;
                levels |= l.unsigned_abs() as u32;
                p += e.first_run + 1;
                e.first_bits
            } else {
                // Only the trailing run, gamma(left + 1), fits what is left.
                let (code, len) = gamma(left as u64 + 1);
                if bits.buf & ((1 << len) - 1) != code {
                    break;
                }
                if !SPARSE {
                    out[p..].fill(0.0);
                }
                p = d;
                len
            };
            bits.consume(len);
        }
        pos = bits.pos();
        if p == d {
            break;
        }
        // A long code or corrupt input: one symbol the slow way.
        let mut slow = BitReader {
            data: rd.data,
            pos,
            end: rd.end,
        };
        let ended = elias_symbol(&mut slow, out, &mut p, s, step, b)?;
        pos = slow.pos;
        if ended {
            break;
        }
    }
    rd.pos = pos;
    // s = 2^bits - 1: a level above s has a bit at or above `bits`.
    if (levels | FastMeta::unpack(entries).levels) & !s != 0 {
        return Err(QsgdError::Corrupt {
            bucket: b,
            reason: "level out of range",
        });
    }
    if rd.pos > rd.end {
        return Err(QsgdError::Truncated { bucket: b });
    }
    Ok(())
}

/// Decodes one Elias symbol at `rd.pos`, any length: true if it was the bucket's
/// trailing run (the bucket is complete).
#[inline(never)]
fn elias_symbol(
    rd: &mut BitReader<'_>,
    out: &mut [f32],
    p: &mut usize,
    s: u32,
    step: f32,
    b: usize,
) -> Result<bool, QsgdError> {
    let corrupt = |reason| QsgdError::Corrupt { bucket: b, reason };
    let d = out.len();
    let win = rd.peek();
    let z = win.trailing_zeros();
    if z > MAX_RUN_Z {
        return Err(corrupt("run length out of range"));
    }
    let run = ((win >> (z + 1)) & ((1u64 << z) - 1)) as usize + (1usize << z) - 1;
    rd.pos += 2 * z as usize + 1;
    if run > d - *p {
        return Err(corrupt("run past the end of the bucket"));
    }
    out[*p..*p + run].fill(0.0);
    *p += run;
    if *p == d {
        return Ok(true); // the trailing run
    }
    let lw = rd.peek();
    let sign = (lw & 1) as u32;
    let lw = lw >> 1;
    let z = lw.trailing_zeros();
    if z > MAX_LEVEL_Z {
        return Err(corrupt("level out of range"));
    }
    let level = ((lw >> (z + 1)) & ((1u64 << z) - 1)) as u32 | (1u32 << z);
    if level > s {
        return Err(corrupt("level out of range"));
    }
    rd.pos += 2 * z as usize + 2;
    out[*p] = f32::from_bits((level as f32 * step).to_bits() | sign << 31);
    *p += 1;
    Ok(*p == d)
}

#[cfg(test)]
mod tests {
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
}
