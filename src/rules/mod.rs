//! Pure decisions, with no Postgres in them, tested as plain Rust.
//!
//! - [`template`]: URL templates, validated at `register` and rendered per job.
//! - [`policy`]: how a response is classified, and when a failed job runs again.
//! - [`signing`]: Standard Webhooks HMAC signatures.

pub mod policy;
pub mod signing;
pub mod template;
