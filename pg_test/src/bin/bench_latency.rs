//! Commit-to-request latency: single-job transactions paced at about 200/s,
//! each one's COMMIT timed against the request's arrival at a local receiver.
//! Usage: bench-latency [COUNT]   (default 2000)

use outbox_e2e::cluster::Cluster;
use outbox_e2e::receiver::Receiver;
use outbox_e2e::wait_until;
use std::collections::HashMap;
use std::time::{Duration, Instant};

fn main() {
    let count: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2000);
    let db = Cluster::start_with(outbox_e2e::cluster::Options { conf: vec![], create_extension: true });
    let r = Receiver::start();
    let mut c = db.client();
    c.batch_execute(&format!("SELECT outbox.register('k', '{}')", r.url("/k/{id}"))).unwrap();
    db.wait_for_worker();
    let pace = Duration::from_millis(5);
    let mut sent: HashMap<String, Instant> = HashMap::new();
    // How long COMMIT itself took (its WAL flush): part of every latency.
    let mut commits: Vec<f64> = Vec::with_capacity(count);
    let start = Instant::now();
    for i in 0..count {
        let id = i.to_string();
        c.batch_execute("BEGIN").unwrap();
        c.execute("SELECT outbox.enqueue('k', $1::text)", &[&id]).unwrap();
        let t = Instant::now();
        sent.insert(format!("/k/{id}"), t);
        c.batch_execute("COMMIT").unwrap();
        commits.push(t.elapsed().as_secs_f64() * 1000.0);
        let next = start + pace * (i as u32 + 1);
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    assert!(wait_until(Duration::from_secs(60), || r.count() >= count), "not all delivered");
    let mut lat: Vec<f64> = r
        .requests()
        .iter()
        .filter_map(|q| sent.get(&q.path).map(|t| (q.at.saturating_duration_since(*t)).as_secs_f64() * 1000.0))
        .collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let rate = count as f64 / start.elapsed().as_secs_f64();
    commits.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let commit_p50 = commits[commits.len() / 2];
    println!("settings: default Postgres and outbox settings, receiver answers 201 at once; timed from COMMIT sent to request received");
    println!(
        "latency: commit->request over {} jobs at {:.0}/s: p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms (targets: p50 <= 1 ms, p99 <= 10 ms); COMMIT alone took p50 {commit_p50:.2} ms",
        lat.len(),
        rate,
        pct(0.50),
        pct(0.95),
        pct(0.99),
        lat[lat.len() - 1]
    );
    println!(
        "{{\"figure\":\"latency\",\"jobs\":{},\"p50_ms\":{:.3},\"p95_ms\":{:.3},\"p99_ms\":{:.3},\"commit_p50_ms\":{commit_p50:.3}}}",
        lat.len(),
        pct(0.50),
        pct(0.95),
        pct(0.99)
    );
}
