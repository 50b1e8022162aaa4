//! The background workers.
//!
//! - [`launcher`]: one per cluster, connected to no database. It keeps a
//!   delivery worker in every database that has the extension (or only in
//!   `outbox.database`), within `outbox.max_workers`, and starts it again if
//!   it exits.
//! - [`delivery`]: the delivery worker's loop: a turn of named steps
//!   (record, absorb, claim, render), dispatch to the [`http`] threads, and
//!   one rest.
//! - [`backfills`]: `outbox.backfill`'s work, a chunk of a table per turn.
//! - [`breakers`]: the kinds' circuit breakers, fed every outcome and
//!   asked before every claim.
//! - [`connect`]: how the HTTP threads reach receivers, directly or through a
//!   proxy.
//! - [`queue`]: every transition of a job, one named statement each.
//! - [`render`]: jobs into requests, bodies run as the kind's role within
//!   its time limit. [`quarantine`]: inbox rows that can't be absorbed are
//!   set aside, not retried forever.
//! - [`plans`]: the worker's prepared statements, kept for its life.
//! - [`in_flux`]: which records' fresh jobs an open transaction is
//!   changing (the absorb leaves their changes for later rather than wait).
//! - [`signals`]: signal handlers, waiting, transactions. [`watchdog`]: ends
//!   the worker when a render outlives its cancel.

pub mod backfills;
pub mod breakers;
pub mod connect;
pub mod delivery;
pub mod http;
pub mod in_flux;
pub mod launcher;
pub mod plans;
pub mod quarantine;
pub mod queue;
pub mod render;
pub mod signals;
pub mod watchdog;

use pgrx::bgworkers::{BackgroundWorkerBuilder, BgWorkerStartTime};
use std::time::Duration;

/// Registers the launcher; called from `_PG_init` while preloading.
pub fn register() {
    BackgroundWorkerBuilder::new("outbox launcher")
        .set_type("outbox launcher")
        .set_library("outbox")
        .set_function("outbox_launcher_main")
        .enable_shmem_access(None)
        .enable_spi_access()
        // Also on a hot standby, so the worker can report that it idles there.
        .set_start_time(BgWorkerStartTime::ConsistentState)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}
