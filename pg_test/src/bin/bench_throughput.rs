//! Delivery throughput with default settings: N jobs enqueued in one
//! transaction; the clock stops when the receiver has counted them all and
//! no job is left. Usage: bench-throughput [N]   (default 100000)

use outbox_e2e::cluster::{Cluster, Options};
use outbox_e2e::receiver::Receiver;
use outbox_e2e::wait_until;
use std::time::{Duration, Instant};

fn main() {
    let n: i64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    // BENCH_CONF: extra postgresql.conf lines separated by ';' (for profiling).
    let conf = std::env::var("BENCH_CONF").map(|v| v.split(';').map(str::to_string).collect()).unwrap_or_default();
    let db = Cluster::start_with(Options { conf, create_extension: true });
    let r = Receiver::start();
    let mut c = db.client();
    c.batch_execute(&format!("SELECT outbox.register('k', '{}')", r.url("/k/{id}"))).unwrap();
    db.wait_for_worker();
    let size = |c: &mut postgres::Client| -> i64 {
        c.query_one("SELECT pg_total_relation_size('outbox.queue') + pg_total_relation_size('outbox.inbox')", &[]).unwrap().get(0)
    };
    let before = size(&mut c);
    let start = Instant::now();
    c.execute("SELECT count(outbox.enqueue('k', g)) FROM generate_series(1, $1::bigint) g", &[&n]).unwrap();
    let enqueued = start.elapsed();
    let ok = wait_until(Duration::from_secs(600), || {
        r.count() as i64 >= n && c.query_one("SELECT count(*) FROM outbox.jobs", &[]).unwrap().get::<_, i64>(0) == 0
    });
    assert!(ok, "not all delivered: {} of {n}", r.count());
    let total = start.elapsed();
    let delivery = total - enqueued;
    c.batch_execute("VACUUM outbox.queue, outbox.inbox").unwrap();
    let after = size(&mut c);
    if let Ok(v) = std::env::var("BENCH_CONF") {
        println!("settings changed: {v}");
        if v.contains("pg_stat_statements") {
            c.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").unwrap();
            for row in c.query("SELECT round(total_exec_time)::bigint, calls, left(regexp_replace(query, '\\s+', ' ', 'g'), 90) FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 12", &[]).unwrap() {
                println!("  {:>8} ms {:>8} calls  {}", row.get::<_, i64>(0), row.get::<_, i64>(1), row.get::<_, String>(2));
            }
        }
    }
    println!("settings: default Postgres and outbox settings; receiver: outbox-e2e's Rust receiver, 201 at once");
    println!(
        "throughput: {n} jobs enqueued in one transaction in {:.2}s, delivered in {:.2}s after: {:.0} deliveries/s (target >= 30000); {} requests ({} duplicates)",
        enqueued.as_secs_f64(),
        delivery.as_secs_f64(),
        n as f64 / delivery.as_secs_f64(),
        r.count(),
        r.count() as i64 - n
    );
    println!("table health: queue+inbox {} kB before, {} kB after the run and a VACUUM", before / 1024, after / 1024);
    println!(
        "{{\"figure\":\"throughput\",\"jobs\":{n},\"deliveries_per_s\":{:.0},\"bytes_before\":{before},\"bytes_after\":{after}}}",
        n as f64 / delivery.as_secs_f64()
    );
}
