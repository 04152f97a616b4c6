//! p2pml-proto: the types that cross process boundaries, and nothing that does I/O.
//!
//! - [`spec`]: names of models, data sets, optimizers and preprocessing, shared by
//!   the node, the gradient function and the testnet.
//! - [`rng`]: the deterministic random number generator every peer derives the same
//!   streams from (data partitioning, shuffling, stochastic rounding).

mod rng;
mod spec;

pub use rng::Rng;
pub use spec::{DatasetKind, ModelKind, Normalization, OptimizerKind, ParseSpecError};
