//! Per-kind circuit breakers (issue #25): a receiver that is down gets a
//! probe now and then, not a failing request for every job of its backlog
//! at every retry; the backlog flows again as soon as a probe is answered.

use outbox_e2e::cluster::{Cluster, Options};
use outbox_e2e::receiver::{Action, Receiver};
use outbox_e2e::{jobs_left, wait_until};
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(60);

fn breaker(c: &mut postgres::Client, kind: &str) -> (String, Option<String>, bool) {
    let row = c
        .query_one("SELECT breaker, breaker_error, breaker_opened_at IS NOT NULL FROM outbox.stats() WHERE kind = $1", &[&kind])
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

fn opened_at(c: &mut postgres::Client, kind: &str) -> String {
    c.query_one("SELECT breaker_opened_at::text FROM outbox.kind_stats WHERE kind = $1", &[&kind]).unwrap().get(0)
}

/// The case: a receiver down for 60 s under a backlog of 10,000
/// jobs receives the requests already out when it went down and a few
/// probes, then everything once it is back. Another kind is not held up,
/// and a worker restarted meanwhile keeps the breaker open.
#[test]
fn a_receiver_down_for_a_minute_gets_probes_not_the_backlog() {
    // Probes every 5 s at most (after 0.1 s, 0.2 s, ...: the harness's
    // retry_base), so that the test ends soon after the receiver is back.
    let mut opts = Options::default();
    opts.conf.push("outbox.breaker_max_interval = '5s'".into());
    let db = Cluster::start_with(opts);
    let down = Receiver::start();
    let healthy = Receiver::start();
    down.set_fallback(Some(Action::status(503)));
    let mut c = db.client();
    c.batch_execute(&format!(
        "SELECT outbox.register('flaky', '{}'); SELECT outbox.register('fine', '{}');",
        down.url("/flaky/{id}"),
        healthy.url("/fine/{id}")
    ))
    .unwrap();
    db.wait_for_worker();
    let went_down = Instant::now();
    c.batch_execute("SELECT count(outbox.enqueue('flaky', g)) FROM generate_series(1, 10000) g").unwrap();
    assert!(wait_until(LONG, || breaker(&mut c, "flaky").0 != "closed"), "the breaker opens");
    let (_, error, since) = breaker(&mut c, "flaky");
    assert_eq!(error.as_deref(), Some("HTTP 503"));
    assert!(since);
    let opened = opened_at(&mut c, "flaky");

    // The other kind flows meanwhile.
    c.batch_execute("SELECT count(outbox.enqueue('fine', g)) FROM generate_series(1, 100) g").unwrap();
    assert!(wait_until(LONG, || healthy.distinct_paths() == 100), "the healthy kind is delivered");
    assert_eq!(breaker(&mut c, "fine").0, "closed");

    // A new worker starts from the breaker the last one left: open, since
    // the same moment, and it probes rather than sends the backlog.
    let pid = db.wait_for_worker();
    c.execute("SELECT pg_terminate_backend($1)", &[&pid]).unwrap();
    assert!(wait_until(LONG, || db.worker_pid().is_some_and(|p| p != pid)));
    std::thread::sleep(Duration::from_secs(60).saturating_sub(went_down.elapsed()));
    let while_down = down.count();
    assert_eq!(opened_at(&mut c, "flaky"), opened, "still open since it first opened");
    // What went out before it opened (a batch, and as many more as
    // outbox.concurrency), then a probe per interval: 7 up to the cap, then
    // one each 5 s, and again after the restart.
    assert!(while_down < 256 + 32 + 40, "{while_down} requests in a minute down, for 10,000 jobs");
    let dead: i64 = c.query_one("SELECT dead FROM outbox.stats() WHERE kind = 'flaky'", &[]).unwrap().get(0);
    assert_eq!(dead, 0, "no job gave up");

    // Back: a probe is answered, and the backlog flows at full speed.
    down.set_fallback(None);
    let back = Instant::now();
    assert!(wait_until(Duration::from_secs(120), || jobs_left(&mut c) == 0), "{} jobs left", jobs_left(&mut c));
    println!("{while_down} requests while down; the backlog drained {:?} after the receiver came back", back.elapsed());
    assert_eq!(breaker(&mut c, "flaky"), ("closed".to_string(), None, false));
    let delivered: std::collections::HashSet<String> =
        down.requests().into_iter().filter(|r| r.answered.is_some_and(|s| s < 300)).map(|r| r.path).collect();
    assert_eq!(delivered.len(), 10_000);
    // The log names each opening and closing once, not every probe.
    let log = db.log();
    assert_eq!(log.matches("kind \"flaky\": 10 failed requests in a row").count(), 1, "{log}");
    assert_eq!(log.matches("kind \"flaky\": its receiver answered a probe").count(), 1, "{log}");
}

/// A receiver that answers, even to refuse, is up: a kind whose every
/// request is rejected goes dead job by job, its breaker closed.
#[test]
fn refusals_do_not_open_the_breaker() {
    let db = Cluster::start();
    let r = Receiver::start();
    r.set_fallback(Some(Action::status(422)));
    let mut c = db.client();
    c.batch_execute(&format!("SELECT outbox.register('strict', '{}')", r.url("/s/{id}"))).unwrap();
    db.wait_for_worker();
    c.batch_execute("SELECT count(outbox.enqueue('strict', g)) FROM generate_series(1, 50) g").unwrap();
    assert!(wait_until(LONG, || {
        let dead: i64 = c.query_one("SELECT dead FROM outbox.stats() WHERE kind = 'strict'", &[]).unwrap().get(0);
        dead == 50
    }));
    assert_eq!(r.count(), 50);
    assert_eq!(breaker(&mut c, "strict").0, "closed");
}

/// `outbox.breaker_threshold = 0` turns the breaker off: after a run of
/// failures, new jobs are still tried at once, as before it existed (with
/// it on, they would wait for probes: one a second, then fewer).
#[test]
fn a_threshold_of_zero_turns_the_breaker_off() {
    let mut opts = Options::default();
    opts.conf.push("outbox.breaker_threshold = 0".into());
    opts.conf.push("outbox.retry_base = '10s'".into());
    let db = Cluster::start_with(opts);
    let r = Receiver::start();
    r.set_fallback(Some(Action::status(500)));
    let mut c = db.client();
    c.batch_execute(&format!("SELECT outbox.register('k', '{}')", r.url("/k/{id}"))).unwrap();
    db.wait_for_worker();
    c.batch_execute("SELECT count(outbox.enqueue('k', g)) FROM generate_series(1, 40) g").unwrap();
    assert!(wait_until(LONG, || r.distinct_paths() == 40), "each job tried once: {}", r.distinct_paths());
    c.batch_execute("SELECT count(outbox.enqueue('k', g)) FROM generate_series(41, 80) g").unwrap();
    assert!(wait_until(LONG, || r.distinct_paths() == 80), "the new jobs tried too: {}", r.distinct_paths());
    assert_eq!(breaker(&mut c, "k").0, "closed");
}
