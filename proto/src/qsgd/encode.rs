//! The encoder: per bucket, the scale, the stochastic levels and the cheapest of
//! the packings (fixed width, Elias runs, Elias groups).

use super::*;

// ---------------------------------------------------------------------------------
// Encoding

/// Buffers reused across the buckets of one `encode` call.
pub(super) struct Scratch {
    pub(super) rnd: Vec<u32>,
    pub(super) fields: Vec<u32>,
    pub(super) masks: Vec<u64>,
}

/// What the quantizer tells the mode choice.
pub(super) struct Quantized {
    /// Nonzero levels.
    pub(super) nnz: u32,
    /// Levels of 2 or more.
    pub(super) above_one: u32,
    /// The OR of all levels.
    pub(super) levels_or: u32,
}

impl Quantized {
    /// The sum over nonzero levels of `1 + gamma_len(level)` (sign and level in Elias
    /// mode): from the counts when every level is at most 3, else from `fields`.
    pub(super) fn level_bits(&self, fields: &[u32]) -> usize {
        if self.levels_or <= 3 {
            2 * (self.nnz + self.above_one) as usize
        } else {
            level_bits(fields)
        }
    }
}

/// The sum over the nonzero levels of `fields` of `1 + gamma_len(level)`.
#[inline(never)]
pub(super) fn level_bits(fields: &[u32]) -> usize {
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

pub(super) fn encode_bucket(
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
pub(super) const LANES: usize = 2;
/// Bits of each uniform: three of them from one `next_u64`.
pub(super) const NOISE_BITS: u32 = 21;

/// The noise of bucket `b`: 21-bit uniforms, three from each u64 word (bits 0..21,
/// 21..42, 42..63 for values 3m, 3m + 1, 3m + 2), word m drawn from stream `m % LANES`,
/// `Rng::derive(seed, &[STREAM, b, m % LANES])`.
#[inline(never)]
pub(super) fn fill_noise(seed: u64, b: u64, rnd: &mut [u32]) {
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
pub(super) fn nonzero_masks(fields: &[u32], masks: &mut [u64]) {
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
pub(super) const NORM_LANES: usize = 32;

/// How many nonzero values follow a zero (in Elias mode, their runs are not empty).
pub(super) fn runs_after_zeros(masks: &[u64]) -> usize {
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
pub(super) fn l2_norm(v: &[f32], first: usize) -> Result<f32, QsgdError> {
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
pub(super) fn max_abs(v: &[f32], first: usize) -> Result<f32, QsgdError> {
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
pub(super) const ROUND: f32 = 8_388_608.0;

/// Fractional bits of the fixed-point `s |v_i| / scale` that the stochastic rounding
/// compares with the noise: as many as f32 holds below `s` (23 - bits), at most the
/// noise's 21.
pub(super) fn frac_bits(bits: u8) -> u32 {
    (23 - bits as u32).min(NOISE_BITS)
}

/// Stochastic rounding of `r_i = min(|v_i| * inv, s)` to a level in `0..=s`, written as
/// `level << 1 | sign` into `fields`. With `k` fractional bits, `t = round(r_i 2^k)` and
/// the k-bit uniform `u`, the level is `(t + u) >> k`: `floor(r)`, plus one with
/// probability `frac(t / 2^k)`. The rounding of `r_i` to 2^-k is within f32's own
/// precision of it. Written to vectorize: no branches, tables or saturating casts.
#[inline(never)]
pub(super) fn quantize_f32(v: &[f32], rnd: &[u32], inv: f32, s: u32, k: u32, fields: &mut [u32]) -> Quantized {
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
pub(super) fn quantize_f64(v: &[f32], rnd: &[u32], inv: f64, s: u32, k: u32, fields: &mut [u32]) -> Quantized {
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
pub(super) const WRITER_SLACK: usize = 8 + 64 * 67 / 8 + 8;

/// Writes the Elias coding of a bucket. Returns false as soon as it has taken `budget`
/// bits or more (the caller then rewinds the writer); true if it took fewer.
#[inline(never)]
pub(super) fn write_elias(
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

/// Takes the lowest set bit `j` of `m` (bit j: `fw[j]`, at position `base + j` of the
/// bucket, is nonzero) and returns its symbol's `SYM_CODE` index; a symbol that is not
/// there, as `(run, field)`.
#[inline(always)]
pub(super) fn next_symbol(
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
pub(super) fn long_symbol((run, field): (usize, u32)) -> [(u64, u32); 2] {
    let (c1, l1) = gamma(run as u64 + 1);
    let (c2, l2) = gamma(field as u64 >> 1);
    [(c1, l1), ((field as u64 & 1) | c2 << 1, l2 + 1)]
}

#[inline(always)]
pub(super) fn write_elias_into(
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

/// Largest bucket for `write_elias_groups`: a run's gamma (at most 2 * 17 + 1 bits)
/// and a group's code (at most 19) fit one `put_flush`.
pub(super) const GROUP_MAX_BUCKET: usize = 1 << 17;

/// `write_elias` for a bucket of at most `GROUP_MAX_BUCKET` values whose levels are all
/// at most 3: four fields a lookup.
#[inline(never)]
pub(super) fn write_elias_groups(fields: &[u32], budget: usize, wr: &mut BitWriter<'_>) -> bool {
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
pub(super) fn gamma_cold(x: u64) -> (u64, u32) {
    gamma(x)
}

/// The code of the group `g` of four fields (levels up to 3) after `zeros` zeros, and
/// its length (0 for four zeros); `zeros` becomes the zeros after it.
#[inline(always)]
pub(super) fn group_code(g: &[u32], zeros: &mut usize) -> (u64, u32) {
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
pub(super) fn write_groups_into(fields: &[u32], budget: usize, wr: &mut BitWriter<'_>) -> bool {
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
pub(super) fn pack_fixed<const W: u32>(fields: &[u32], wr: &mut BitWriter<'_>) {
    let mut w = wr.local();
    pack_fixed_into::<W>(fields, &mut w);
    let m = w.mark();
    wr.set(m);
}

#[inline(always)]
pub(super) fn pack_fixed_into<const W: u32>(fields: &[u32], wr: &mut BitWriter<'_>) {
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
