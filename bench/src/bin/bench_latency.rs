//! Commit-to-request latency: single-job transactions paced at about 200/s,
//! each one's COMMIT timed against the request's arrival at a local receiver:
//! from COMMIT sent (the figure; it includes the commit's WAL flush), and
//! from COMMIT acknowledged.
//! Usage: bench-latency [COUNT]   (default 2000)

use outbox_bench::latency::{paced, percentile};
use outbox_e2e::cluster::Cluster;
use outbox_e2e::receiver::Receiver;
use std::time::Duration;

fn main() {
    let count: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2000);
    let conf = outbox_bench::figure::conf_from_env();
    let db = Cluster::start_with(outbox_e2e::cluster::Options { conf: conf.clone(), create_extension: true, env: Vec::new() });
    let r = Receiver::start();
    let mut c = db.client();
    c.batch_execute(&format!("SELECT outbox.register('k', '{}')", r.url("/k/{id}"))).unwrap();
    db.wait_for_worker();
    let l = paced(&mut c, &r, "k", "", count, Duration::from_millis(5));
    let ack_pct = |p: f64| percentile(&l.from_ack, p);
    let commit_p50 = percentile(&l.commits, 0.5);
    outbox_bench::figure::print_settings(&conf, "the test suite's Rust receiver, 201 at once; timed from COMMIT sent to request received");
    println!("slowest: {} after {:.2} ms, of which its COMMIT took {:.2} ms", l.slowest.0, l.slowest.1, l.slowest.2);
    println!(
        "latency: commit->request over {} jobs at {:.0}/s: p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms (targets: p50 <= 1 ms, p99 <= 10 ms); COMMIT alone took p50 {commit_p50:.2} ms; from COMMIT acknowledged: p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms",
        l.from_commit.len(),
        l.rate,
        l.pct(0.50),
        l.pct(0.95),
        l.pct(0.99),
        l.from_commit[l.from_commit.len() - 1],
        ack_pct(0.50),
        ack_pct(0.95),
        ack_pct(0.99)
    );
    println!(
        "{{\"figure\":\"latency\",\"jobs\":{},\"p50_ms\":{:.3},\"p95_ms\":{:.3},\"p99_ms\":{:.3},\"commit_p50_ms\":{commit_p50:.3},\"after_ack_p50_ms\":{:.3},\"after_ack_p99_ms\":{:.3}}}",
        l.from_commit.len(),
        l.pct(0.50),
        l.pct(0.95),
        l.pct(0.99),
        ack_pct(0.50),
        ack_pct(0.99)
    );
}
