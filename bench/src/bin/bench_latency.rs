//! Commit-to-request latency: single-job transactions paced at about 200/s,
//! each one's COMMIT timed against the request's arrival at a local receiver:
//! from COMMIT sent (the figure; it includes the commit's WAL flush), and
//! from COMMIT acknowledged.
//! Usage: bench-latency [COUNT]   (default 2000)

use outbox_e2e::cluster::Cluster;
use outbox_e2e::receiver::Receiver;
use outbox_e2e::wait_until;
use std::collections::HashMap;
use std::time::{Duration, Instant};

fn main() {
    let count: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2000);
    let conf = outbox_bench::figure::conf_from_env();
    let db = Cluster::start_with(outbox_e2e::cluster::Options { conf: conf.clone(), create_extension: true, env: Vec::new() });
    let r = Receiver::start();
    let mut c = db.client();
    c.batch_execute(&format!("SELECT outbox.register('k', '{}')", r.url("/k/{id}"))).unwrap();
    db.wait_for_worker();
    let pace = Duration::from_millis(5);
    // When COMMIT was sent, and when it was acknowledged.
    let mut sent: HashMap<String, (Instant, Instant)> = HashMap::new();
    // How long COMMIT itself took (its WAL flush): part of every latency.
    let mut commits: Vec<f64> = Vec::with_capacity(count);
    let start = Instant::now();
    for i in 0..count {
        let id = i.to_string();
        c.batch_execute("BEGIN").unwrap();
        c.execute("SELECT outbox.enqueue('k', $1::text)", &[&id]).unwrap();
        let t = Instant::now();
        c.batch_execute("COMMIT").unwrap();
        sent.insert(format!("/k/{id}"), (t, Instant::now()));
        commits.push(t.elapsed().as_secs_f64() * 1000.0);
        let next = start + pace * (i as u32 + 1);
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    assert!(wait_until(Duration::from_secs(60), || r.count() >= count), "not all delivered");
    // Milliseconds from COMMIT sent, and from COMMIT acknowledged (negative
    // when the request arrived before the client heard back).
    let mut lat = Vec::new();
    let mut after_ack = Vec::new();
    // The slowest job, and how long its COMMIT took: whether an outlier was
    // the commit's flush or the delivery.
    let mut slowest = (f64::MIN, String::new(), 0.0);
    for q in r.requests() {
        if let Some(&(t, ack)) = sent.get(&q.path) {
            let ms = signed_ms(t, q.at);
            if ms > slowest.0 {
                slowest = (ms, q.path.clone(), signed_ms(t, ack));
            }
            lat.push(ms);
            after_ack.push(signed_ms(ack, q.at));
        }
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    after_ack.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| percentile(&lat, p);
    let ack_pct = |p: f64| percentile(&after_ack, p);
    let rate = count as f64 / start.elapsed().as_secs_f64();
    commits.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let commit_p50 = commits[commits.len() / 2];
    outbox_bench::figure::print_settings(&conf, "the test suite's Rust receiver, 201 at once; timed from COMMIT sent to request received");
    println!("slowest: {} after {:.2} ms, of which its COMMIT took {:.2} ms", slowest.1, slowest.0, slowest.2);
    println!(
        "latency: commit->request over {} jobs at {:.0}/s: p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms (targets: p50 <= 1 ms, p99 <= 10 ms); COMMIT alone took p50 {commit_p50:.2} ms; from COMMIT acknowledged: p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms",
        lat.len(),
        rate,
        pct(0.50),
        pct(0.95),
        pct(0.99),
        lat[lat.len() - 1],
        ack_pct(0.50),
        ack_pct(0.95),
        ack_pct(0.99)
    );
    println!(
        "{{\"figure\":\"latency\",\"jobs\":{},\"p50_ms\":{:.3},\"p95_ms\":{:.3},\"p99_ms\":{:.3},\"commit_p50_ms\":{commit_p50:.3},\"after_ack_p50_ms\":{:.3},\"after_ack_p99_ms\":{:.3}}}",
        lat.len(),
        pct(0.50),
        pct(0.95),
        pct(0.99),
        ack_pct(0.50),
        ack_pct(0.99)
    );
}

/// Milliseconds from `from` to `to`, negative if `to` came first.
fn signed_ms(from: Instant, to: Instant) -> f64 {
    match to.checked_duration_since(from) {
        Some(d) => d.as_secs_f64() * 1000.0,
        None => -(from - to).as_secs_f64() * 1000.0,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}
