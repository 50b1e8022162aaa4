//! Figure 7, live latency during a backfill: commit-to-request latency of
//! single-change transactions of a kind (paced at 100/s, as figure 2
//! measures it), first alone, then while `outbox.backfill` of a ROWS-row
//! table (default 1,000,000) of the same kind drains, side by side in one
//! run; and how fast the backfill went.
//! Usage: bench-backfill [ROWS] [LIVE]   (defaults 1000000 and 1000)

use outbox_bench::figure::{self, Figure};
use outbox_bench::latency::{paced, percentile};
use outbox_e2e::cluster::{Cluster, Options};
use outbox_e2e::receiver::Receiver;
use outbox_e2e::wait_until;
use std::time::{Duration, Instant};

fn main() {
    let rows: i64 = figure::arg(1, 1_000_000);
    let live: usize = figure::arg(2, 1000);
    let conf = figure::conf_from_env();
    let db = Cluster::start_with(Options { conf: conf.clone(), create_extension: true, env: Vec::new() });
    let r = Receiver::start();
    // A million backfilled requests are counted, not kept.
    r.keep_only("/k/live-");
    let mut c = db.client();
    c.batch_execute(&format!("SELECT outbox.register('k', '{}')", r.url("/k/{id}"))).unwrap();
    c.execute("CREATE TABLE items (id bigint PRIMARY KEY)", &[]).unwrap();
    c.execute("INSERT INTO items SELECT generate_series(1, $1::bigint)", &[&rows]).unwrap();
    c.batch_execute("VACUUM ANALYZE items").unwrap();
    db.wait_for_worker();
    let pace = Duration::from_millis(10);
    let alone = paced(&mut c, &r, "k", "live-a-", live, pace);

    let start = Instant::now();
    let id: i64 = c.query_one("SELECT outbox.backfill('items', 'k')", &[]).unwrap().get(0);
    let progress = |c: &mut postgres::Client| -> (String, i64) {
        let row = c.query_one("SELECT state, enqueued FROM outbox.backfills WHERE backfill_id = $1", &[&id]).unwrap();
        (row.get(0), row.get(1))
    };
    assert!(wait_until(Duration::from_secs(60), || progress(&mut c).1 > 0), "the backfill did not start");
    let during = paced(&mut c, &r, "k", "live-b-", live, pace);
    let (state, enqueued) = progress(&mut c);
    assert_eq!(state, "running", "the backfill ended before the live changes did: use more ROWS");
    assert!(wait_until(Duration::from_secs(3600), || progress(&mut c).0 == "done" && outbox_e2e::jobs_left(&mut c) == 0));
    let took = start.elapsed().as_secs_f64();
    println!(
        "  live alone: p50 {:.2} ms, p99 {:.2} ms; during the backfill ({enqueued} of {rows} rows enqueued by their end): p50 {:.2} ms, p99 {:.2} ms",
        alone.pct(0.5),
        alone.pct(0.99),
        during.pct(0.5),
        during.pct(0.99)
    );
    // The COMMIT's own WAL flush is part of every latency, and the
    // backfill's WAL makes it longer for any write: apart from it, what
    // the worker adds.
    for (name, l) in [("alone", &alone), ("during", &during)] {
        println!(
            "  {name}: COMMIT p50 {:.2} ms, p99 {:.2} ms; from its acknowledgement to the request p50 {:.2} ms, p99 {:.2} ms",
            percentile(&l.commits, 0.5),
            percentile(&l.commits, 0.99),
            percentile(&l.from_ack, 0.5),
            percentile(&l.from_ack, 0.99)
        );
    }
    figure::print_settings(&conf, "the test suite's Rust receiver, 201 at once");
    figure::report(Figure {
        name: "backfill",
        summary: format!(
            "live changes at 100/s during a backfill of {rows} rows: p50 {:.2} ms, p99 {:.2} ms, against p50 {:.2} ms, p99 {:.2} ms alone (p99 x{:.2}); the backfill delivered {:.0} rows/s ({took:.1}s)",
            during.pct(0.5),
            during.pct(0.99),
            alone.pct(0.5),
            alone.pct(0.99),
            during.pct(0.99) / alone.pct(0.99),
            rows as f64 / took
        ),
        json: format!(
            "\"rows\":{rows},\"live\":{live},\"alone_p50_ms\":{:.3},\"alone_p99_ms\":{:.3},\"during_p50_ms\":{:.3},\"during_p99_ms\":{:.3},\"rows_per_s\":{:.0}",
            alone.pct(0.5),
            alone.pct(0.99),
            during.pct(0.5),
            during.pct(0.99),
            rows as f64 / took
        ),
    });
}
