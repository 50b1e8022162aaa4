//! Benchmarks for outbox: each figure of `make bench` is a binary here
//! (`src/bin/`), run by `scripts/bench.sh`. They start their clusters and
//! receivers through the end-to-end suite's tooling (`outbox-e2e`).
//!
//! - [`figure`]: settings from the environment, and one way to report a figure.
//! - [`nginx`]: a fast receiver that counts requests and records nothing.
//! - [`cpu`]: where a benchmark's CPU went, read from /proc.
//! - [`latency`]: commit-to-request latency of paced single-change transactions.

pub mod cpu;
pub mod figure;
pub mod latency;
pub mod nginx;
