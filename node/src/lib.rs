//! p2pml-node: a peer of a decentralized training run.
//!
//! - [`config`]: the one serde `Config`, filled from the command line in `main`.
//! - [`standalone`]: training on one machine with no network (`p2pml-node train`).
//! - [`exec`]: where gradients are computed: locally or in the function tier.
//! - [`p2p`]: the decentralized run; [`ps`]: the parameter-server baseline.

pub mod checkpoint;
pub mod config;
pub mod exec;
pub mod fsutil;
pub mod metrics;
pub mod standalone;
pub mod net;
pub mod round;
pub mod p2p;
pub mod ps;
pub mod store;
