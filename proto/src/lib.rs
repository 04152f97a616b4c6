//! p2pml-proto: the types that cross process boundaries, and nothing that does I/O.
//!
//! - [`spec`]: names of models, data sets, optimizers and preprocessing, shared by
//!   the node, the gradient function and the testnet.
//! - [`rng`]: the deterministic random number generator every peer derives the same
//!   streams from (data partitioning, shuffling, stochastic rounding).
//! - [`wire`]: gossip and request-response messages, size caps, validation.
//! - [`blob`]: the encoding of gradient and parameter vectors.
//! - [`state`]: a peer's full training state, for state sync.
//! - [`qsgd`]: QSGD gradient compression (bucketed, stochastic, bit-packed).
//! - [`task`]: the function tier's events, results and stored objects.
//! - [`robust`]: byzantine-robust aggregation rules and the attacks that test them.
//! - [`line`]: the lines a node prints on stdout for the tools that drive it.

mod blob;
pub mod line;
pub mod qsgd;
pub mod robust;
pub mod link;
pub mod shard;
mod rng;
mod spec;
mod state;
pub mod task;
pub mod wire;

pub use blob::{decode_f32, encode_f32, put_f32s, BlobError};

/// Encodes a gradient for the wire as `compression` says; `seed` drives QSGD's
/// stochastic rounding (derive it from run, round and peer).
pub fn encode_gradient(values: &[f32], compression: &Compression, seed: u64) -> Result<Vec<u8>, GradientCodecError> {
    Ok(match compression {
        Compression::None => encode_f32(values)?,
        Compression::Qsgd(cfg) => qsgd::encode(values, cfg, seed)?,
    })
}

/// Decodes a gradient of exactly `numel` values.
pub fn decode_gradient(bytes: &[u8], compression: &Compression, numel: usize) -> Result<Vec<f32>, GradientCodecError> {
    Ok(match compression {
        Compression::None => decode_f32(bytes, numel)?,
        Compression::Qsgd(_) => qsgd::decode_expect(bytes, numel)?,
    })
}

/// A gradient that cannot be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum GradientCodecError {
    #[error(transparent)]
    Plain(#[from] BlobError),
    #[error(transparent)]
    Qsgd(#[from] QsgdError),
}
pub use qsgd::{Compression, Norm, QsgdConfig, QsgdError};
pub use robust::{Aggregation, Attack};
pub use link::LinkSpec;
pub use shard::Exchange;
pub use rng::Rng;
pub use state::{decode_state, encode_state, StateError, StateHeader};
pub use spec::{DatasetKind, ModelKind, Normalization, OptimizerKind, ParseSpecError};
