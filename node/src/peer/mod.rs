//! The decentralized role (`--role peer`): one node of a run with no coordinator.
//!
//! - [`core`]: the peer as a sans-I/O state machine (`PeerCore`: inputs in,
//!   actions out, a fake clock in its tests): the round's flow.
//! - [`io`]: the core's inputs, actions, phases, settings and errors.
//! - [`members`]: the core's network handlers (admission, heartbeats and
//!   membership, gossip validation, fetches, requests).
//! - [`sync`]: the core's state syncs (join, catch up, re-sync) and the schedule a state carries.
//! - [`decide`]: the decisions the core takes, as pure functions.
//! - [`rogue`]: fault injection, the messages a node that only misbehaves sends.
//! - [`driver`]: set-up and the one loop that feeds the core and executes its actions.

mod core;
mod decide;
mod driver;
mod io;
mod members;
mod rogue;
mod shard;
mod sync;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod sim;

pub use driver::run;
pub(crate) use decide::StartRule;
