//! Flat f32 vectors as bytes: little-endian, no header (the announcement carries
//! the length and digest). The compressed encodings build on this.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlobError {
    #[error("blob of {0} bytes is not a whole number of f32 values")]
    Length(usize),
    #[error("blob holds {got} values, expected {expected}")]
    Count { expected: usize, got: usize },
    #[error("value {index} is not finite")]
    NonFinite { index: usize },
}

/// Encodes `values`; refuses NaN and infinities, which must never reach the wire.
pub fn encode_f32(values: &[f32]) -> Result<Vec<u8>, BlobError> {
    if let Some(index) = values.iter().position(|v| !v.is_finite()) {
        return Err(BlobError::NonFinite { index });
    }
    let mut out = Vec::with_capacity(values.len() * 4);
    put_f32s(&mut out, values);
    Ok(out)
}

/// Appends `values` little-endian to `out` (one pass the compiler vectorises).
pub fn put_f32s(out: &mut Vec<u8>, values: &[f32]) {
    let start = out.len();
    out.resize(start + values.len() * 4, 0);
    for (c, v) in out[start..].chunks_exact_mut(4).zip(values) {
        c.copy_from_slice(&v.to_le_bytes());
    }
}

/// Decodes a blob of exactly `expected` finite values.
pub fn decode_f32(bytes: &[u8], expected: usize) -> Result<Vec<f32>, BlobError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(BlobError::Length(bytes.len()));
    }
    if bytes.len() / 4 != expected {
        return Err(BlobError::Count { expected, got: bytes.len() / 4 });
    }
    let out: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    if let Some(index) = out.iter().position(|v| !v.is_finite()) {
        return Err(BlobError::NonFinite { index });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let v = [1.5f32, -0.0, 3e-7];
        assert_eq!(decode_f32(&encode_f32(&v).unwrap(), 3).unwrap(), v);
        assert_eq!(encode_f32(&[0.0, f32::NAN]), Err(BlobError::NonFinite { index: 1 }));
        assert_eq!(decode_f32(&[0; 7], 2), Err(BlobError::Length(7)));
        assert_eq!(decode_f32(&[0; 8], 3), Err(BlobError::Count { expected: 3, got: 2 }));
        assert_eq!(decode_f32(&f32::INFINITY.to_le_bytes(), 1), Err(BlobError::NonFinite { index: 0 }));
    }
}
