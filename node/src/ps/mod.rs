//! The parameter-server baseline: `--role ps` holds the parameters and the
//! optimizer state and checkpoints them to sled; `--role worker --ps ADDR`
//! computes gradients (locally or in the function tier) and pushes them over
//! request-response. Synchronous: the server waits at a barrier over the live
//! workers (the same failure detector as the P2P mode: heartbeats, connection
//! events, a timeout, incarnations), averages, updates, and serves the new
//! parameters to the workers' long polls. While the server is down the workers
//! retry with backoff and stall; a restarted server resumes from its checkpoint.
//!
//! Same models, data, shards, compression, seeds and executors as P2P mode, so
//! a comparison between the two measures only the architecture.
//!
//! - [`core`]: the server as a sans-I/O core (`on_input`, `next_deadline`), unit-tested.
//! - [`server`]: its driver: set-up and the one select loop.
//! - [`worker`]: a worker's link to the server and its compute loop.

mod core;
mod server;
mod worker;

pub use server::run_server;
pub use worker::run_worker;
