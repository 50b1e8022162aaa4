//! Figure 4, backlog scaling: the drain rate with a deep backlog against a
//! shallow one. The kind is paused while jobs are enqueued, the clock starts
//! at `resume` and stops when the receiver has counted them all and no job
//! is left (polled every 2 ms: a shallow drain lasts well under a second).
//! This machine's speed drifts by tens of percent within minutes, so the
//! deep drain is compared with the mean of the shallow drains run just
//! before and just after it; a first shallow drain warms up and is not
//! counted.
//! Usage: bench-backlog [DEEP] [SHALLOW]   (defaults 1000000 and 10000)

use outbox_bench::figure::{self, Figure};
use outbox_bench::nginx::Nginx;
use outbox_e2e::wait_until_every;
use postgres::Client;
use std::time::{Duration, Instant};

/// Enqueues `n` jobs with the kind paused, then times their delivery.
fn drain(c: &mut Client, r: &Nginx, n: i64) -> f64 {
    c.batch_execute("SELECT outbox.pause('k')").unwrap();
    let chunk = 100_000i64;
    let mut from = 1i64;
    let enqueue_start = Instant::now();
    while from <= n {
        let to = (from + chunk - 1).min(n);
        c.execute("SELECT count(outbox.enqueue('k', g)) FROM generate_series($1::bigint, $2::bigint) g", &[&from, &to]).unwrap();
        from = to + 1;
    }
    c.batch_execute("VACUUM ANALYZE outbox.queue").unwrap();
    let enqueued = enqueue_start.elapsed();
    let counted = r.count();
    let start = Instant::now();
    c.batch_execute("SELECT outbox.resume('k')").unwrap();
    let every = Duration::from_millis(2);
    assert!(wait_until_every(every, Duration::from_secs(1800), || r.count() - counted >= n as u64), "not all delivered");
    assert!(wait_until_every(every, Duration::from_secs(60), || outbox_e2e::jobs_left(c) == 0), "jobs left after delivery");
    let took = start.elapsed();
    let rate = n as f64 / took.as_secs_f64();
    println!("  {n} pending (enqueued in {:.1}s): drained in {:.2}s, {rate:.0} deliveries/s", enqueued.as_secs_f64(), took.as_secs_f64());
    rate
}

fn main() {
    let deep: i64 = figure::arg(1, 1_000_000);
    let shallow: i64 = figure::arg(2, 10_000);
    let (_db, r, mut c, conf) = figure::start_delivery();
    drain(&mut c, &r, shallow);
    let before = drain(&mut c, &r, shallow);
    let deep_rate = drain(&mut c, &r, deep);
    let after = drain(&mut c, &r, shallow);
    let shallow_rate = (before + after) / 2.0;
    figure::print_settings(&conf, "nginx, one worker process, `return 201`");
    let ratio = deep_rate / shallow_rate;
    figure::report(Figure {
        name: "backlog scaling",
        summary: format!("{deep} pending drain at {deep_rate:.0}/s, {shallow} pending at {shallow_rate:.0}/s (mean of {before:.0} before and {after:.0} after): ratio {ratio:.2} (target >= 0.8)"),
        json: format!("\"deep\":{deep},\"shallow\":{shallow},\"deep_per_s\":{deep_rate:.0},\"shallow_per_s\":{shallow_rate:.0},\"shallow_before_per_s\":{before:.0},\"shallow_after_per_s\":{after:.0},\"ratio\":{ratio:.3}"),
    });
}
