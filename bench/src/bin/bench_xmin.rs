//! Figure 8, under a held-back xmin: JOBS jobs (default 500,000) flow
//! through the queue, enqueued 10,000 a transaction while the worker
//! delivers them, three times: with nothing holding vacuum back; while
//! another session holds a REPEATABLE READ snapshot open for the whole
//! flow (vacuum can then remove none of the queue's dead tuples); and once
//! that transaction has ended and autovacuum has had its turn. Each run's
//! throughput, and the queue's size and dead tuples after it.
//! Usage: bench-xmin [JOBS]   (default 500000)

use outbox_bench::figure::{self, Figure};
use outbox_e2e::wait_until;
use postgres::Client;
use std::time::{Duration, Instant};

const PER_TRANSACTION: i64 = 10_000;

/// What one flow did: deliveries a second, and the queue after it.
struct Flow {
    rate: f64,
    bytes: i64,
    dead: i64,
}

fn dead_tuples(c: &mut Client) -> i64 {
    c.query_one("SELECT coalesce(sum(n_dead_tup), 0)::bigint FROM pg_stat_user_tables WHERE schemaname = 'outbox'", &[]).unwrap().get(0)
}

/// Enqueues `jobs` in transactions of PER_TRANSACTION, each once fewer than
/// two of them are waiting, and waits until all are delivered.
fn flow(c: &mut Client, count: &dyn Fn() -> u64, jobs: i64, label: &str) -> Flow {
    let start = Instant::now();
    let before = count();
    let mut sent = 0;
    while sent < jobs {
        let n = PER_TRANSACTION.min(jobs - sent);
        assert!(wait_until(Duration::from_secs(600), || (sent as u64) < (count() - before) + 2 * PER_TRANSACTION as u64), "the worker stalled");
        c.execute("SELECT count(outbox.enqueue('k', g)) FROM generate_series($1::bigint, $2::bigint) g", &[&(sent + 1), &(sent + n)]).unwrap();
        sent += n;
    }
    assert!(wait_until(Duration::from_secs(600), || count() - before >= jobs as u64), "not all delivered");
    assert!(wait_until(Duration::from_secs(60), || outbox_e2e::jobs_left(c) == 0), "jobs left after delivery");
    let rate = jobs as f64 / start.elapsed().as_secs_f64();
    c.batch_execute("SELECT pg_stat_force_next_flush()").ok();
    std::thread::sleep(Duration::from_millis(700));
    let f = Flow { rate, bytes: figure::queue_bytes(c), dead: dead_tuples(c) };
    println!("  {label}: {jobs} jobs at {rate:.0} deliveries/s; queue {} kB, {} dead tuples; {}", f.bytes / 1024, f.dead, figure::relation_sizes(c));
    f
}

fn main() {
    let jobs: i64 = figure::arg(1, 500_000);
    let (db, r, mut c, conf) = figure::start_delivery();
    let count = || r.count();
    let free = flow(&mut c, &count, jobs, "nothing held");

    let mut holder = db.client();
    holder.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM outbox.kinds").unwrap();
    let held = flow(&mut c, &count, jobs, "a REPEATABLE READ snapshot held open");
    holder.batch_execute("COMMIT").unwrap();

    // Autovacuum's turn: the queue's dead tuples go.
    let ended = Instant::now();
    let cleaned = wait_until(Duration::from_secs(300), || dead_tuples(&mut c) < held.dead / 10);
    let cleanup = ended.elapsed().as_secs_f64();
    let after = flow(&mut c, &count, jobs, "after it ended");
    drop(db);
    figure::print_settings(&conf, "nginx, one worker process, `return 201`");
    figure::report(Figure {
        name: "held xmin",
        summary: format!(
            "{jobs} jobs under a held-back xmin: {:.0} deliveries/s, x{:.2} of the {:.0}/s with nothing held; queue {} kB with {} dead tuples, against {} kB; {} in {cleanup:.0}s after it ended, then {:.0}/s and {} kB",
            held.rate,
            held.rate / free.rate,
            free.rate,
            held.bytes / 1024,
            held.dead,
            free.bytes / 1024,
            if cleaned { "autovacuum cleaned up" } else { "autovacuum had not cleaned up" },
            after.rate,
            after.bytes / 1024
        ),
        json: format!(
            "\"jobs\":{jobs},\"free_per_s\":{:.0},\"held_per_s\":{:.0},\"ratio\":{:.3},\"free_kb\":{},\"held_kb\":{},\"held_dead\":{},\"cleanup_s\":{cleanup:.1},\"after_per_s\":{:.0},\"after_kb\":{}",
            free.rate,
            held.rate,
            held.rate / free.rate,
            free.bytes / 1024,
            held.bytes / 1024,
            held.dead,
            after.rate,
            after.bytes / 1024
        ),
    });
}
