//! Plumbing between the extension and Postgres, with no outbox policy in it.
//! Every other module builds on these; none of them imports from above.
//!
//! - [`errors`]: user-facing errors, each with a SQLSTATE and a hint.
//! - [`subxact`]: running work so that its ERROR is caught and rolled back alone.
//! - [`syscache`]: catalog lookups.
//! - [`xact`]: transaction and subtransaction ends, registered once and handed
//!   to the modules that keep state per transaction.
//! - [`gucs`]: the `outbox.*` settings.
//! - [`settings`]: running a piece of work under other (user-settable) settings.
//! - [`shmem`]: what backends and the worker share.
//! - [`roles`]: who a body function runs as, and running code as that role.

pub mod errors;
pub mod gucs;
pub mod roles;
pub mod settings;
pub mod shmem;
pub mod subxact;
pub mod syscache;
pub mod xact;
