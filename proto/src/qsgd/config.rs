//! The codec's settings and their spelling (`qsgd:bits=4,bucket=512,norm=l2`), and its errors.

use super::*;

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

pub(super) const MIN_BITS: u8 = 1;
pub(super) const MAX_BITS: u8 = 8;
pub(super) const DEFAULT_BITS: u8 = 4;
pub(super) const DEFAULT_BUCKET: usize = 512;
/// Label of the quantization noise stream ("qsgd" in ASCII).
pub(super) const STREAM: u64 = 0x7173_6764;
/// `floor(log2(MAX_BUCKET + 1))`: the longest run gamma code has this many leading zeros.
pub(super) const MAX_RUN_Z: u32 = 20;
/// `floor(log2(255))`: the longest level gamma code.
pub(super) const MAX_LEVEL_Z: u32 = 7;
pub(super) const VALID_KEYS: &str = "bits=1..8, bucket=1..1048576, norm=l2|max";

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

    pub(super) fn code(self) -> u8 {
        match self {
            Norm::L2 => 0,
            Norm::Max => 1,
        }
    }

    pub(super) fn from_code(c: u8) -> Option<Norm> {
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

pub(super) fn spec_error(spec: &str, reason: String) -> QsgdError {
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
