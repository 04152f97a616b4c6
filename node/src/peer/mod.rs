//! The decentralized role (`--role peer`): one node of a run with no coordinator.
//!
//! - [`decide`]: the node's decisions as pure functions (unit-tested).
//! - [`node`]: the node's state and its handlers of network events.
//! - [`run`]: the training loop (rounds, barrier, update, epochs, linger).
//! - [`sync`]: joining a run in progress and state sync.
//! - [`rogue`]: fault injection, a node that only misbehaves.

mod decide;
mod node;
mod rogue;
mod run;
mod sync;

pub use run::run;
pub(crate) use decide::StartRule;
