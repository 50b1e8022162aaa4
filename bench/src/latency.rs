//! Commit-to-request latency, as figure 2 measures it: single-change
//! transactions paced at a steady rate, each COMMIT timed against its
//! request's arrival at the test receiver.

use outbox_e2e::receiver::Receiver;
use outbox_e2e::wait_until;
use postgres::Client;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What one paced run saw, in milliseconds, each list sorted.
pub struct Latencies {
    /// From COMMIT sent to the request's arrival (the figure).
    pub from_commit: Vec<f64>,
    /// From COMMIT acknowledged (negative when the request came first).
    pub from_ack: Vec<f64>,
    /// How long each COMMIT took (its WAL flush, part of every latency).
    pub commits: Vec<f64>,
    /// Transactions a second, as paced.
    pub rate: f64,
    /// The slowest request: its path, its latency, and its COMMIT's time.
    pub slowest: (String, f64, f64),
}

impl Latencies {
    /// The `p` quantile of `from_commit`.
    pub fn pct(&self, p: f64) -> f64 {
        percentile(&self.from_commit, p)
    }
}

/// Enqueues `count` records `<prefix><i>` of `kind`, one a transaction,
/// one every `pace`, and times each against its request at `r`, whose
/// path is `/<kind>/<prefix><i>`.
pub fn paced(c: &mut Client, r: &Receiver, kind: &str, prefix: &str, count: usize, pace: Duration) -> Latencies {
    let mut sent: HashMap<String, (Instant, Instant)> = HashMap::new();
    let mut commits = Vec::with_capacity(count);
    let start = Instant::now();
    for i in 0..count {
        let id = format!("{prefix}{i}");
        c.batch_execute("BEGIN").unwrap();
        c.execute("SELECT outbox.enqueue($1::text, $2::text)", &[&kind, &id]).unwrap();
        let t = Instant::now();
        c.batch_execute("COMMIT").unwrap();
        sent.insert(format!("/{kind}/{id}"), (t, Instant::now()));
        commits.push(t.elapsed().as_secs_f64() * 1000.0);
        let next = start + pace * (i as u32 + 1);
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    let rate = count as f64 / start.elapsed().as_secs_f64();
    let arrived = || r.requests().iter().filter(|q| sent.contains_key(&q.path)).count();
    assert!(wait_until(Duration::from_secs(600), || arrived() >= count), "not all delivered");
    let (mut from_commit, mut from_ack) = (Vec::new(), Vec::new());
    let mut slowest = (String::new(), f64::MIN, 0.0);
    for q in r.requests() {
        if let Some(&(t, ack)) = sent.get(&q.path) {
            let ms = signed_ms(t, q.at);
            if ms > slowest.1 {
                slowest = (q.path.clone(), ms, signed_ms(t, ack));
            }
            from_commit.push(ms);
            from_ack.push(signed_ms(ack, q.at));
        }
    }
    for v in [&mut from_commit, &mut from_ack, &mut commits] {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    }
    Latencies { from_commit, from_ack, commits, rate, slowest }
}

/// Milliseconds from `from` to `to`, negative if `to` came first.
fn signed_ms(from: Instant, to: Instant) -> f64 {
    match to.checked_duration_since(from) {
        Some(d) => d.as_secs_f64() * 1000.0,
        None => -(from - to).as_secs_f64() * 1000.0,
    }
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}
