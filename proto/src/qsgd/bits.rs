//! Bit I/O: the writer and reader of the packed fields, and Elias gamma codes.


// ---------------------------------------------------------------------------------
// Bit I/O

/// LSB-first bit writer into a buffer with at least 8 bytes of slack past the end of
/// the stream: every flush stores a whole u64 and advances by the whole bytes in it.
pub(super) struct BitWriter<'a> {
    pub(super) buf: &'a mut [u8],
    pub(super) byte: usize,
    pub(super) acc: u64,
    /// Bits in `acc`; at most 7 after a flush, at most 63 after a put.
    pub(super) fill: u32,
}

impl<'a> BitWriter<'a> {
    pub(super) fn new(buf: &'a mut [u8]) -> Self {
        BitWriter {
            buf,
            byte: 0,
            acc: 0,
            fill: 0,
        }
    }

    /// Appends the low `n` bits of `v` (`n <= 56`, `v < 2^n`).
    #[inline(always)]
    pub(super) fn put(&mut self, v: u64, n: u32) {
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
    pub(super) fn put_flush(&mut self, v: u64, n: u32) {
        debug_assert!(self.fill <= 7 && n <= 56 && v >> n == 0);
        self.acc |= v << self.fill;
        self.fill += n;
        self.flush();
    }

    #[inline(always)]
    pub(super) fn flush(&mut self) {
        self.buf[self.byte..self.byte + 8].copy_from_slice(&self.acc.to_le_bytes());
        let whole = self.fill >> 3;
        self.byte += whole as usize;
        self.acc >>= whole * 8;
        self.fill &= 7;
    }

    /// The writer, borrowed for a hot loop: a local copy whose state stays in registers.
    /// Give its state back with `set(local.mark())`.
    pub(super) fn local(&mut self) -> BitWriter<'_> {
        BitWriter {
            buf: &mut *self.buf,
            byte: self.byte,
            acc: self.acc,
            fill: self.fill,
        }
    }

    pub(super) fn mark(&self) -> (usize, u64, u32) {
        (self.byte, self.acc, self.fill)
    }

    /// Goes back to `mark` (what was written since is overwritten by what comes next),
    /// or takes over the state of a `local` copy.
    pub(super) fn set(&mut self, mark: (usize, u64, u32)) {
        (self.byte, self.acc, self.fill) = mark;
    }

    /// Flushes and returns the length of the stream in bytes (the last one zero-padded).
    pub(super) fn finish(mut self) -> usize {
        self.flush();
        self.byte + (self.fill > 0) as usize
    }
}

/// LSB-first bit reader. Reads past the end see zero bits; callers check `pos <= end`.
pub(super) struct BitReader<'a> {
    pub(super) data: &'a [u8],
    pub(super) pos: usize,
    pub(super) end: usize,
}

impl BitReader<'_> {
    /// The next bits of the stream: at least 57 of them are valid.
    #[inline(always)]
    pub(super) fn peek(&self) -> u64 {
        load64(self.data, self.pos >> 3) >> (self.pos & 7)
    }

    #[inline(always)]
    pub(super) fn remaining(&self) -> usize {
        self.end.saturating_sub(self.pos)
    }
}

/// The 8 bytes of `data` from `i` on as a little-endian u64, zero past the end.
#[inline(always)]
pub(super) fn load64(data: &[u8], i: usize) -> u64 {
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
pub(super) fn load64_tail(data: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(t) = data.get(i..) {
        let k = t.len().min(8);
        a[..k].copy_from_slice(&t[..k]);
    }
    u64::from_le_bytes(a)
}

/// Elias gamma code of `x >= 1`: (code, length in bits), LSB-first.
#[inline(always)]
pub(super) fn gamma(x: u64) -> (u64, u32) {
    let z = 63 - x.leading_zeros();
    ((((x - (1u64 << z)) << 1) | 1) << z, 2 * z + 1)
}
