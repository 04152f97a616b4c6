//! p2pml-node: a peer of a decentralized training run.
//!
//! - [`config`]: the one serde `Config`, filled from the command line in `main`.
//! - [`standalone`]: training on one machine with no network (`p2pml-node train`).
//! - [`exec`]: where gradients are computed: locally or in the function tier.
//! - [`peer`]: the decentralized run; [`ps`]: the parameter-server baseline.
//! - [`report`]: what a node reports at the end of a run.

pub mod checkpoint;
pub mod config;
pub mod exec;
pub mod fsutil;
pub mod link;
pub mod metrics;
pub mod standalone;
pub mod net;
pub mod round;
pub mod peer;
pub mod ps;
pub mod report;
mod fetch;
mod setup;
mod train;
pub mod store;
