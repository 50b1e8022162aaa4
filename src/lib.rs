//! outbox: a transactional outbox for PostgreSQL whose delivery worker runs
//! inside the server.
//!
//! # Layout
//! The folders follow a change from a business transaction to a receiver:
//! - [`api`]: the SQL interface (`register`, `enqueue`, grants, admin).
//! - [`capture`]: what runs in application backends: tracking triggers,
//!   the per-transaction buffer and the inbox writer, hooks, restores.
//! - [`schema`]: the tables, indexes, view and privileges, and the fresh-job
//!   lookup on their unique index.
//! - [`worker`]: the launcher and the delivery worker: its turn of named steps
//!   (record, absorb, claim, render, dispatch), every job transition
//!   ([`worker::queue`]), HTTP and signals.
//! - [`rules`]: pure decisions, no Postgres: URL templates, retry policy,
//!   signing, where workers run, rate limits.
//! - [`pg`]: plumbing: errors, subtransactions, catalog lookups, transaction
//!   callbacks, settings, GUCs, shared memory, roles.
//! - `testing` (tests only): helpers, and the checks that every statement is
//!   qualified and that no module imports one that imports it back.
//!
//! Modules are private to the crate, so an item no other module uses is
//! flagged as dead code.
#![deny(unsafe_op_in_unsafe_fn)]

use pgrx::prelude::*;

mod api;
mod capture;
mod pg;
mod rules;
mod schema;
#[cfg(any(test, feature = "pg_test"))]
mod testing;
mod worker;

::pgrx::pg_module_magic!(name, version);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: reading a plain global flag set by the postmaster while it loads
    // shared_preload_libraries; we are on the main thread.
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    pg::gucs::init(preloading);
    capture::hooks::install();
    pg::xact::install(&XACT_HANDLERS);
    if preloading {
        pg::shmem::init();
        worker::register();
    }
}

/// What each module does as a transaction ends, in this order: the inbox
/// writes what is buffered before anything else looks at the commit.
static XACT_HANDLERS: [pg::xact::Handlers; 3] = [capture::inbox::XACT, capture::wake::XACT, api::grants::XACT];

/// Used by `cargo pgrx test`: the cluster it starts preloads the extension.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'outbox'"]
    }
}
