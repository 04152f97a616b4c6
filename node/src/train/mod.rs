//! Training parts shared by every role: the schedule of an epoch, the trainer
//! (model, optimizer, data), aggregation, convergence decisions and the state
//! that state sync and checkpoints carry.

mod aggregate;
mod convergence;
mod schedule;
mod state;
mod worker;

pub(crate) use aggregate::*;
pub(crate) use convergence::*;
pub(crate) use schedule::*;
pub(crate) use state::*;
pub(crate) use worker::*;
