//! Graceful shutdown in the middle of a large backlog: `pg_ctl stop -m fast`
//! ends the worker promptly; after a restart nothing is stuck in `running`
//! and every job is delivered.

use outbox_e2e::cluster::Cluster;
use outbox_e2e::receiver::Receiver;
use outbox_e2e::wait_until;
use std::time::{Duration, Instant};

const JOBS: i64 = 50_000;

#[test]
fn fast_shutdown_during_a_50k_backlog_loses_nothing() {
    let mut db = Cluster::start();
    let r = Receiver::start();
    let mut c = db.client();
    c.batch_execute(&format!("SELECT outbox.register('k', '{}')", r.url("/k/{id}"))).unwrap();
    db.wait_for_worker();
    c.execute("SELECT count(outbox.enqueue('k', g)) FROM generate_series(1, $1::bigint) g", &[&JOBS]).unwrap();
    drop(c);
    assert!(wait_until(Duration::from_secs(60), || r.count() >= 2_000));
    let t = Instant::now();
    db.stop("fast");
    let stop_took = t.elapsed();
    assert!(stop_took < Duration::from_secs(10), "fast shutdown took {stop_took:?}");
    let delivered_before = r.count();
    db.pg_ctl_start();
    assert!(
        wait_until(Duration::from_secs(240), || db.drained()),
        "the backlog drained after the restart"
    );
    assert_eq!(r.distinct_paths() as i64, JOBS, "every job delivered");
    eprintln!(
        "fast stop after {delivered_before} requests took {stop_took:?}; {} requests in all for {JOBS} jobs",
        r.count()
    );
    assert!(db.log().contains("pending again"), "jobs left running were recovered");
}
