//! A peer's full training state as one blob, for state sync over
//! request-response: a CBOR header, then the parameters and each optimizer state
//! vector as little-endian f32.

use crate::blob::{decode_f32, BlobError};
use serde::{Deserialize, Serialize};

/// Everything besides the vectors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateHeader {
    /// The state is the one after this round's update.
    pub round: u64,
    pub epoch: u64,
    pub lr: f64,
    pub opt_steps: u64,
    pub numel: u64,
    pub opt_vectors: u32,
    /// Convergence bookkeeping: (best loss, bad epochs) for the LR schedule and for early stopping.
    pub plateau: (f64, u64),
    pub stopping: (f64, u64),
    /// The epoch's schedule: its first round and its members (peer ids as bytes).
    pub epoch_start: u64,
    pub epoch_members: Vec<serde_bytes::ByteBuf>,
    /// The epoch members still training in it (not demoted by a death or restart).
    #[serde(default)]
    pub active: Vec<serde_bytes::ByteBuf>,
    /// After the epoch's last round: the next epoch's members (else empty).
    #[serde(default)]
    pub next_members: Vec<serde_bytes::ByteBuf>,
    /// Members demoted for withholding in this epoch: not named for the next one.
    #[serde(default)]
    pub withheld: Vec<serde_bytes::ByteBuf>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StateError {
    #[error("state blob truncated")]
    Truncated,
    #[error("state header: {0}")]
    Header(String),
    #[error("state holds {got} parameters, the model has {expected}")]
    Numel { expected: u64, got: u64 },
    #[error("state vectors: {0}")]
    Blob(#[from] BlobError),
}

/// Encodes a state: 4-byte header length, CBOR header, then 1 + opt_vectors vectors.
pub fn encode_state(h: &StateHeader, params: &[f32], opt: &[Vec<f32>]) -> Vec<u8> {
    let header = crate::wire::encode(h);
    let mut out = Vec::with_capacity(4 + header.len() + 4 * params.len() * (1 + opt.len()));
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    for v in std::iter::once(params).chain(opt.iter().map(Vec::as_slice)) {
        for x in v {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out
}

/// A decoded state: header, parameters, optimizer state vectors.
pub(crate) type DecodedState = (StateHeader, Vec<f32>, Vec<Vec<f32>>);

/// Decodes a state of a model with `numel` parameters.
pub fn decode_state(bytes: &[u8], numel: u64) -> Result<DecodedState, StateError> {
    let len = bytes.get(..4).ok_or(StateError::Truncated)?;
    let hlen = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    let header = bytes.get(4..4 + hlen).ok_or(StateError::Truncated)?;
    let h: StateHeader = crate::wire::decode(header, 64 * 1024).map_err(|e| StateError::Header(e.to_string()))?;
    if h.numel != numel {
        return Err(StateError::Numel { expected: numel, got: h.numel });
    }
    if h.opt_vectors > 2 {
        return Err(StateError::Header(format!("{} optimizer vectors", h.opt_vectors)));
    }
    let body = &bytes[4 + hlen..];
    let vec_bytes = numel as usize * 4;
    if body.len() != vec_bytes * (1 + h.opt_vectors as usize) {
        return Err(StateError::Truncated);
    }
    let mut vectors = body.chunks_exact(vec_bytes.max(1)).map(|c| decode_f32(c, numel as usize));
    let params = vectors.next().ok_or(StateError::Truncated)??;
    let opt = vectors.collect::<Result<Vec<_>, _>>()?;
    Ok((h, params, opt))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let h = StateHeader { round: 9, epoch: 1, lr: 0.01, opt_steps: 10, numel: 3, opt_vectors: 1, plateau: (0.5, 1), stopping: (0.4, 0), epoch_start: 6, epoch_members: vec![serde_bytes::ByteBuf::from(vec![1, 2])], active: vec![], next_members: vec![], withheld: vec![] };
        let bytes = encode_state(&h, &[1.0, 2.0, 3.0], &[vec![0.1, 0.2, 0.3]]);
        let (h2, p, o) = decode_state(&bytes, 3).unwrap();
        assert_eq!((h2, p, o), (h.clone(), vec![1.0, 2.0, 3.0], vec![vec![0.1, 0.2, 0.3]]));
        assert_eq!(decode_state(&bytes, 4).unwrap_err(), StateError::Numel { expected: 4, got: 3 });
        for cut in [0, 3, 10, bytes.len() - 1] {
            assert!(decode_state(&bytes[..cut], 3).is_err());
        }
        let mut huge = bytes.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_state(&huge, 3).unwrap_err(), StateError::Truncated);
    }
}
