//! p2pml-proto: the types that cross process boundaries, and nothing that does I/O.
//!
//! - [`spec`]: names of models, data sets, optimizers and preprocessing, shared by
//!   the node, the gradient function and the testnet.
//! - [`rng`]: the deterministic random number generator every peer derives the same
//!   streams from (data partitioning, shuffling, stochastic rounding).
//! - [`wire`]: gossip and request-response messages, size caps, validation.
//! - [`blob`]: the encoding of gradient and parameter vectors.
//! - [`state`]: a peer's full training state, for state sync.

mod blob;
mod rng;
mod spec;
mod state;
pub mod wire;

pub use blob::{decode_f32, encode_f32, BlobError};
pub use rng::Rng;
pub use state::{decode_state, encode_state, StateError, StateHeader};
pub use spec::{DatasetKind, ModelKind, Normalization, OptimizerKind, ParseSpecError};
