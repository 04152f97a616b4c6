//! The decoder: the header, then each bucket in its packing, with every length and
//! field checked (a malformed blob is an error, never a panic).

use super::*;

// ---------------------------------------------------------------------------------
// Decoding

pub(super) struct Header {
    pub(super) cfg: QsgdConfig,
    pub(super) n: usize,
}

/// How many buckets of each kind a decoded buffer held.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct ModeCounts {
    pub(super) zero: usize,
    pub(super) fixed: usize,
    pub(super) elias: usize,
}

pub(super) fn parse_header(bytes: &[u8]) -> Result<Header, QsgdError> {
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

pub(super) fn decode_inner(
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
pub(super) fn decode_body(bytes: &[u8], h: &Header, out: &mut [f32]) -> Result<ModeCounts, QsgdError> {
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
pub(super) fn unpack_fixed<const W: u32>(
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

/// A bit buffer for the Elias decoder (F. Giesen's branch-free refill): `buf` holds
/// the stream from bit `8 ptr - cnt` on, `cnt` bits of it valid and the bits above them
/// either zero or the stream's next bits. A refill tops it up to 56..=63 bits.
pub(super) struct BitBuf<'a> {
    pub(super) data: &'a [u8],
    pub(super) buf: u64,
    pub(super) cnt: u32,
    pub(super) ptr: usize,
}

impl<'a> BitBuf<'a> {
    pub(super) fn at(data: &'a [u8], pos: usize) -> Self {
        let skip = (pos & 7) as u32;
        BitBuf {
            data,
            buf: (load64(data, pos >> 3) & ((1 << 56) - 1)) >> skip,
            cnt: 56 - skip,
            ptr: (pos >> 3) + 7,
        }
    }

    #[inline(always)]
    pub(super) fn refill(&mut self) {
        self.buf |= load64(self.data, self.ptr) << self.cnt;
        self.ptr += ((63 - self.cnt) >> 3) as usize;
        self.cnt |= 56;
    }

    /// Drops `n` bits (`n <= cnt`).
    #[inline(always)]
    pub(super) fn consume(&mut self, n: u32) {
        self.buf >>= n;
        self.cnt -= n;
    }

    /// The stream position of `buf`'s first bit.
    pub(super) fn pos(&self) -> usize {
        8 * self.ptr - self.cnt as usize
    }
}

/// The symbol at the front of `buf` (at least 56 valid bits) if its run is below 2^14
/// and its level's gamma is valid (up to 255): (its bits, run, level, sign).
#[inline(always)]
pub(super) fn whole_symbol(buf: u64) -> Option<(u32, usize, u32, u32)> {
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
pub(super) fn zero_run(out: &mut [f32], from: usize, to: usize) {
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
pub(super) const SPARSE_BITS_PER_VALUE: f64 = 1.75;

/// Decodes the Elias coding of one bucket into `out`, writing every value; `SPARSE`
/// picks the table (see `DENSE_META`).
#[inline(never)]
pub(super) fn decode_elias<const SPARSE: bool>(
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
pub(super) fn elias_symbol(
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
