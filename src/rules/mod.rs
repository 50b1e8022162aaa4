//! Pure decisions, with no Postgres in them, tested as plain Rust.
//!
//! - [`template`]: URL templates, validated at `register` and rendered per job.
//! - [`policy`]: how a response is classified, and when a failed job runs again.
//! - [`signing`]: Standard Webhooks HMAC signatures.
//! - [`placement`]: which databases the launcher starts a worker in.
//! - [`rate`]: a kind's rate limit, a token bucket.
//! - [`metrics`]: the Prometheus exposition, and the latency histogram.
//! - [`breaker`]: a kind's circuit breaker, which probes a receiver that is down.

pub mod breaker;
pub mod metrics;
pub mod placement;
pub mod policy;
pub mod rate;
pub mod signing;
pub mod template;
