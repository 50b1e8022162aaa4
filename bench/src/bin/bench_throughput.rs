//! Figures 1 and 6. Delivery throughput with default settings: N jobs
//! enqueued in one transaction; the clock starts at its commit and stops when
//! the receiver has counted them all and no job is left. Also end to end,
//! from the enqueue statement's start: where the work is done (the enqueue
//! or the worker) changes the first figure, not this one. Table health: the
//! queue's size (table + indexes + inbox) after each round and a VACUUM,
//! against its size before the first; a second round shows whether the
//! space is reused or grows. Usage: bench-throughput [N] [ROUNDS]
//! (defaults 100000 and 3). Each round also says where the CPU went per
//! delivery (worker threads, nginx, the rest of Postgres): what bounds the
//! rate on this machine.

use outbox_bench::figure::{self, Figure};
use outbox_bench::cpu;
use outbox_e2e::wait_until;
use std::time::{Duration, Instant};

fn main() {
    let n: i64 = figure::arg(1, 100_000);
    let rounds: usize = figure::arg(2, 3);
    let (db, r, mut c, conf) = figure::start_delivery();
    let parties = cpu::Parties {
        worker: db.worker_pid().expect("the worker's pid"),
        postmaster: db.postmaster_pid().expect("the postmaster's pid"),
        receiver: r.pid(),
    };
    let before = figure::queue_bytes(&mut c);
    let mut cpu_rounds = Vec::new();
    let mut sizes = Vec::new();
    let mut rates = Vec::new();
    let mut end_to_end = Vec::new();
    for round in 1..=rounds {
        let counted = r.count();
        let start = Instant::now();
        c.execute("SELECT count(outbox.enqueue('k', g)) FROM generate_series(1, $1::bigint) g", &[&n]).unwrap();
        let enqueued = start.elapsed();
        let committed = Instant::now();
        let cpu_before = parties.sample();
        // The receiver's count is cheap to poll; the queue only at the end.
        assert!(wait_until(Duration::from_secs(600), || r.count() - counted >= n as u64), "not all delivered");
        assert!(wait_until(Duration::from_secs(60), || outbox_e2e::jobs_left(&mut c) == 0), "jobs left after delivery");
        let delivery = committed.elapsed();
        let whole = start.elapsed();
        let spent = cpu_before.until(&parties.sample());
        let requests = r.count() - counted;
        c.batch_execute("VACUUM outbox.queue, outbox.inbox").unwrap();
        let size = figure::queue_bytes(&mut c);
        let rate = n as f64 / delivery.as_secs_f64();
        let overall = n as f64 / whole.as_secs_f64();
        println!(
            "round {round}: {n} jobs enqueued in one transaction in {:.2}s; delivered in {:.2}s: {rate:.0} deliveries/s ({overall:.0}/s from the enqueue's start); {requests} requests ({} duplicates); queue {} kB after VACUUM",
            enqueued.as_secs_f64(),
            delivery.as_secs_f64(),
            requests as i64 - n,
            size / 1024
        );
        println!("  {}", figure::relation_sizes(&mut c));
        println!("  {}", cpu::per_unit(&spent, n as u64, "delivery"));
        cpu_rounds.push(spent);
        rates.push(rate);
        end_to_end.push(overall);
        sizes.push(size);
    }
    figure::print_settings(&conf, "nginx, one worker process, `return 201`");
    figure::report(Figure {
        name: "throughput",
        summary: format!(
            "{:.0} deliveries/s (round 1 of {rounds}; target >= 30000), {:.0}/s from the enqueue's start; {}",
            rates[0],
            end_to_end[0],
            cpu::per_unit(&cpu_rounds[0], n as u64, "delivery")
        ),
        json: format!(
            "\"jobs\":{n},\"deliveries_per_s\":{:.0},\"end_to_end_per_s\":{:.0},\"rounds\":{rates:.0?},{}",
            rates[0],
            end_to_end[0],
            cpu::json(&cpu_rounds[0], n as u64)
        ),
    });
    // Index pages emptied in one round are reusable only after the next
    // VACUUM, so round 2 may add to round 1; compounding would show after.
    // It takes three rounds to tell; with fewer, there is no figure (JSON null).
    let growth = (sizes.len() >= 3).then(|| sizes[sizes.len() - 1] as f64 / sizes[sizes.len() - 2] as f64);
    figure::report(Figure {
        name: "table health",
        summary: format!(
            "queue {} kB before, {} kB after each round and a VACUUM; last round against the one before {} (target: no growth that compounds)",
            before / 1024,
            sizes.iter().map(|s| (s / 1024).to_string()).collect::<Vec<_>>().join(" kB, "),
            growth.map_or("n/a (needs 3 rounds)".to_string(), |g| format!("x{g:.2}")),
        ),
        json: format!(
            "\"bytes_before\":{before},\"bytes_after_rounds\":{sizes:?},\"last_round_growth\":{}",
            growth.map_or("null".to_string(), |g| format!("{g:.3}"))
        ),
    });
    figure::pg_stat_statements(&mut c, &conf);
}
