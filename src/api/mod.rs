//! The SQL interface, as the README's reference lists it. Each function
//! checks its input and privileges here, then hands over to `capture` or to
//! the queue's statements in `worker::queue`.
//!
//! - [`kinds`]: `register`, `unregister`, `pause`, `resume`.
//! - [`enqueue`]: `enqueue(kind, id [, delay])`.
//! - [`grants`]: `grant_enqueue`, `revoke_enqueue`: who may call `enqueue`.
//! - [`legacy`]: earlier versions' entry points, until `ALTER EXTENSION UPDATE`.
//! - [`admin`]: `stats`, `worker_status`, `retry`, `retry_dead`, `discard`,
//!   `purge_dead`.
//! - [`backfill`]: `backfill`, `cancel_backfill`, `resume_backfill`.
//! - [`metrics`]: `metrics()`, the Prometheus exposition.
//!
//! `track` and `untrack` live with the triggers they create, in
//! [`crate::capture::triggers`].

pub mod admin;
pub mod backfill;
pub mod enqueue;
pub mod grants;
pub mod kinds;
pub mod metrics;
mod legacy;
