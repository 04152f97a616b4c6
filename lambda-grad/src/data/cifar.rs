//! The CIFAR-10 binary format: records of one label byte followed by 3072 pixel
//! bytes (1024 red, 1024 green, 1024 blue, each row-major 32×32).

use super::DataError;
use std::path::Path;

pub(crate) const RECORD: usize = 1 + 3 * 32 * 32;

/// Appends the records of one CIFAR-10 batch file to `images` and `labels`.
pub(crate) fn parse_into(
    path: &Path,
    buf: &[u8],
    images: &mut Vec<u8>,
    labels: &mut Vec<u8>,
) -> Result<(), DataError> {
    if buf.is_empty() || !buf.len().is_multiple_of(RECORD) {
        return Err(DataError::format(
            path,
            format!(
                "{} bytes is not a whole number of {RECORD}-byte CIFAR-10 records (truncated or not CIFAR-10 binary)",
                buf.len()
            ),
        ));
    }
    for (i, rec) in buf.chunks_exact(RECORD).enumerate() {
        if rec[0] > 9 {
            return Err(DataError::format(
                path,
                format!("label {} of record {i} is not a CIFAR-10 class (0-9); the file is damaged or not CIFAR-10", rec[0]),
            ));
        }
        labels.push(rec[0]);
        images.extend_from_slice(&rec[1..]);
    }
    Ok(())
}
