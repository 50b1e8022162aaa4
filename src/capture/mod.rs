//! The capture side: what runs in application backends as business
//! transactions change data. Every change, tracked or enqueued, becomes an
//! inbox row in the changing transaction; the worker takes it from there.
//!
//! - [`triggers`]: `track`, `untrack` and the row trigger they install.
//! - [`row_filter`]: `track`'s filter, checked and printed for the triggers' WHEN.
//! - [`ids`]: which key types name a record alike in every session.
//! - [`inbox`]: the per-transaction buffer and the inbox writer.
//! - [`hooks`]: executor and utility hooks (statement-end inbox writes,
//!   database DDL).
//! - [`wake`]: waking the worker when a transaction that gave it work commits.
//! - [`database_ddl`]: the worker steps aside for DDL that needs its database alone.
//! - [`restore`]: what a COPY into the extension's tables (`pg_restore`) needs fixed.

pub mod database_ddl;
pub mod hooks;
pub mod ids;
pub mod inbox;
pub mod restore;
pub mod row_filter;
pub mod triggers;
pub mod wake;
