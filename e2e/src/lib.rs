//! Test tooling for outbox's end-to-end suite: a throwaway cluster with the
//! extension preloaded ([`cluster`]), a programmable HTTP receiver
//! ([`receiver`]) and a forward proxy ([`proxy`]). Everything started here is
//! stopped on drop.

pub mod cluster;
pub mod listener;
pub mod proxy;
pub mod receiver;
pub mod webhooks;

use std::time::{Duration, Instant};

/// The extension's version: the crate's, in the repository's Cargo.toml.
pub fn extension_version() -> String {
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml")).unwrap();
    manifest.lines().find_map(|l| l.strip_prefix("version = \"")).unwrap().trim_end_matches('"').to_string()
}

/// Jobs not yet delivered: the queue, dead ones included, and the inbox.
pub fn jobs_left(c: &mut postgres::Client) -> i64 {
    c.query_one("SELECT count(*) FROM outbox.jobs", &[]).unwrap().get(0)
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns
/// whether it held.
pub fn wait_until(timeout: Duration, cond: impl FnMut() -> bool) -> bool {
    wait_until_every(Duration::from_millis(20), timeout, cond)
}

/// [`wait_until`], polling every `every`: for clocks stopped by a condition,
/// where the polling interval is part of what is measured.
pub fn wait_until_every(every: Duration, timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(every);
    }
}
