//! The IDX format of MNIST and Fashion-MNIST: a big-endian header
//! (`0x00 0x00 type ndims`, then one u32 per dimension) followed by the data.
//! Only unsigned bytes (type 0x08) occur in these data sets.

use super::DataError;
use flate2::read::GzDecoder;
use std::io::Read;
use std::path::Path;

/// The decoded contents of one IDX file of unsigned bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Idx {
    pub(crate) dims: Vec<usize>,
    pub(crate) data: Vec<u8>,
}

/// Reads a file, gunzipping it when it starts with the gzip magic bytes.
pub(crate) fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 4);
        GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::format(path, format!("corrupt gzip stream: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an IDX buffer with `expected_dims` dimensions.
pub(crate) fn parse(path: &Path, buf: &[u8], expected_dims: usize) -> Result<Idx, DataError> {
    let bad = |msg: String| DataError::format(path, msg);
    if buf.len() < 4 {
        return Err(bad(format!("{} bytes is too short for an IDX header", buf.len())));
    }
    if buf[0] != 0 || buf[1] != 0 {
        return Err(bad(format!(
            "wrong magic number {:02x}{:02x}{:02x}{:02x}: not an IDX file",
            buf[0], buf[1], buf[2], buf[3]
        )));
    }
    if buf[2] != 0x08 {
        return Err(bad(format!("element type 0x{:02x} is not unsigned byte (0x08)", buf[2])));
    }
    let ndims = buf[3] as usize;
    if ndims != expected_dims {
        return Err(bad(format!("{ndims} dimensions where {expected_dims} were expected")));
    }
    let header = 4 + 4 * ndims;
    if buf.len() < header {
        return Err(bad("truncated header".into()));
    }
    let dims: Vec<usize> = buf[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let len = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
    let body = &buf[header..];
    if body.len() < len {
        return Err(bad(format!(
            "truncated: header {dims:?} promises {len} bytes of data, the file has {}",
            body.len()
        )));
    }
    if body.len() > len {
        return Err(bad(format!(
            "{} trailing bytes after the {len} bytes that header {dims:?} promises",
            body.len() - len
        )));
    }
    Ok(Idx { dims, data: body.to_vec() })
}

/// Writes an IDX file of unsigned bytes (used by tests and by tools that cut subsets).
pub fn encode(dims: &[usize], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for &d in dims {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}
