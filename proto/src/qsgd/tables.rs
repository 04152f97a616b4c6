//! Tables built at compile time: the encoder's symbol codes and the decoder's fast lookup.


/// Runs shorter than this, before levels up to 31, have their whole symbol in
/// `SYM_CODE` and `SYM_LEN`.
pub(super) const SHORT_RUN: usize = 64;

/// `gamma(run + 1), sign, gamma(level)` at `run << 6 | field` for every `run <
/// SHORT_RUN` and field `level << 1 | sign` with `1 <= level <= 31`: at most 13 + 1 + 9
/// bits, so that two fit one `put_flush`.
pub(super) static SYM_CODE: [u32; SHORT_RUN << 6] = sym_codes().0;
pub(super) static SYM_LEN: [u8; SHORT_RUN << 6] = sym_codes().1;

pub(super) const fn gamma_const(x: u64) -> (u64, u32) {
    let z = 63 - x.leading_zeros();
    ((((x - (1u64 << z)) << 1) | 1) << z, 2 * z + 1)
}

pub(super) const fn sym_codes() -> ([u32; SHORT_RUN << 6], [u8; SHORT_RUN << 6]) {
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

/// `gamma(run + 1)` for `run < 64`, as `code | len << 16`.
pub(super) static RUN_GAMMA: [u32; 64] = run_gammas();

pub(super) const fn run_gammas() -> [u32; 64] {
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
pub(super) const GROUP: usize = 4;

/// For four consecutive fields `level << 1 | sign` with levels up to 3, at `f0 | f1 <<
/// 3 | f2 << 6 | f3 << 9`: the Elias coding of the group from its first nonzero's sign
/// on (the run before it depends on the groups before), as `code | len << 20 | lead <<
/// 25 | trail << 28`, with `lead` the zeros before its first nonzero (4: none) and
/// `trail` the zeros after its last. At most 4 + 3 * 5 bits.
pub(super) static GROUP_CODES: [u32; 1 << (3 * GROUP)] = group_codes();

pub(super) const fn group_codes() -> [u32; 1 << (3 * GROUP)] {
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

/// Bits the Elias fast path looks at.
pub(super) const FAST_BITS: u32 = 12;
/// Output positions one fast-path lookup writes.
pub(super) const FAST_SLOTS: usize = 8;

/// For every value of the next `FAST_BITS` bits of an Elias stream: the whole symbols
/// `gamma(run + 1), sign, gamma(level)` that they hold, as many as fit in the bits and
/// whose positions fit in a window of `FAST_SLOTS`, with levels up to 31. `*_SLOTS`
/// holds the signed levels of the window's positions (0 for a zero, and past the
/// symbols); `*_META` says where they are, as `fast_meta`. Dense: the window starts at
/// the current position (its zeros are written with the values). Sparse: it starts at
/// the first symbol's value (the bucket was zeroed first), so that a run of up to 31
/// zeros costs nothing. No positions: the first symbol does not fit (a long code, or
/// the bucket's trailing run, which has no sign).
pub(super) static DENSE_META: [u32; 1 << FAST_BITS] = elias_fast_table(false).0;
pub(super) static DENSE_SLOTS: [[i16; FAST_SLOTS]; 1 << FAST_BITS] = elias_fast_table(false).1;
pub(super) static SPARSE_META: [u32; 1 << FAST_BITS] = elias_fast_table(true).0;
pub(super) static SPARSE_SLOTS: [[i16; FAST_SLOTS]; 1 << FAST_BITS] = elias_fast_table(true).1;

/// An entry of `*_META`: its symbols take `bits` bits and `positions` output
/// positions, the window starting `skip` positions on; `levels` is the OR of their
/// levels. The first symbol alone takes `first_bits` bits (0: it has no entry) and its
/// value is `first_run` positions on.
#[derive(Clone, Copy)]
pub(super) struct FastMeta {
    pub(super) bits: u32,
    pub(super) positions: usize,
    pub(super) skip: usize,
    pub(super) levels: u32,
    pub(super) first_bits: u32,
    pub(super) first_run: usize,
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
    pub(super) fn unpack(e: u32) -> Self {
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

pub(super) const fn elias_fast_table(
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
