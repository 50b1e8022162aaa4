//! outbox: a transactional outbox for PostgreSQL whose delivery worker runs
//! inside the server.
//!
//! # Layout
//! - [`schema`]: tables, indexes, the `jobs` view and privileges (DDL).
//! - [`errors`]: user-facing errors with a SQLSTATE and a hint.
//! - [`kinds`]: `register`, `unregister`, `pause`, `resume`.
//! - [`roles`]: who body functions run as (`run_as`), and running code as that role.
//! - [`enqueue_grants`]: who may call `enqueue` (`grant_enqueue`, `revoke_enqueue`).
//! - [`enqueue`]: `enqueue(kind, id [, delay])`, into the inbox.
//! - [`triggers`]: `track`, `untrack` and the `enqueue_trigger` trigger function.
//! - [`ids`]: which key types name a record alike in every session.
//! - [`fresh_key`]: fresh jobs looked up by (kind, id) on their unique index, not through the planner.
//! - [`inbox`]: buffers every change (tracked or enqueued) and writes it to `outbox.inbox`.
//! - [`hooks`]: the executor and utility hooks (statement-end inbox writes, database DDL).
//! - [`database_ddl`]: the worker steps aside for DDL that needs its database alone.
//! - [`restore`]: what a COPY into the extension's tables (`pg_restore`) needs fixed.
//! - [`inspection`]: `stats`, `worker_status`, `retry`, `retry_dead`, `discard`, `purge_dead`.
//! - [`gucs`]: the `outbox.*` settings.
//! - [`syscache`]: catalog lookups.
//! - [`xact`]: transaction ends, handed to the modules that keep state per transaction.
//! - [`wake`]: the worker's latch set when a transaction that gave it work commits.
//! - [`shmem`]: what backends and the worker share (the worker's latch, its status).
//! - [`worker`]: the background worker: claim, render, deliver from an HTTP thread, record.
//! - [`layout_check`] (tests only): no module imports one that imports it back.
//! - [`sql_check`] (tests only): every statement names the schema of its functions and operators.
//! - Pure decisions, no Postgres: [`template`] (URLs), [`policy`] (classification
//!   and backoff), [`signing`] (Standard Webhooks HMAC).
#![deny(unsafe_op_in_unsafe_fn)]

use pgrx::prelude::*;

pub mod database_ddl;
pub mod enqueue;
pub mod enqueue_grants;
pub mod errors;
pub mod fresh_key;
pub mod gucs;
pub mod hooks;
pub mod ids;
pub mod inbox;
pub mod inspection;
pub mod kinds;
#[cfg(test)]
mod layout_check;
pub mod policy;
pub mod restore;
pub mod roles;
pub mod schema;
pub mod shmem;
pub mod signing;
#[cfg(test)]
pub mod sql_check;
pub mod subxact;
pub mod syscache;
pub mod template;
#[cfg(any(test, feature = "pg_test"))]
pub mod testing;
pub mod triggers;
pub mod wake;
pub mod worker;
pub mod xact;

::pgrx::pg_module_magic!(name, version);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: reading a plain global flag set by the postmaster while it loads
    // shared_preload_libraries; we are on the main thread.
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    gucs::init(preloading);
    hooks::install();
    xact::install(&XACT_HANDLERS);
    if preloading {
        shmem::init();
        worker::register();
    }
}

/// What each module does as a transaction ends, in this order: the inbox
/// writes what is buffered before anything else looks at the commit.
static XACT_HANDLERS: [xact::Handlers; 3] = [inbox::XACT, wake::XACT, enqueue_grants::XACT];

/// Used by `cargo pgrx test`: the cluster it starts preloads the extension.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'outbox'", "outbox.database = 'pgrx_tests'"]
    }
}
