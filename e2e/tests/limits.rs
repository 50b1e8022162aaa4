//! Per-kind limits (issue #25): a kind's `max_in_flight` bounds its
//! requests in flight, so a receiver that hangs can't take every slot of
//! `outbox.concurrency` from the other kinds.

use outbox_e2e::cluster::{Cluster, Options};
use outbox_e2e::receiver::{Action, Gate, Receiver};
use outbox_e2e::{jobs_left, wait_until};
use std::time::Duration;

const LONG: Duration = Duration::from_secs(30);

#[test]
fn a_hanging_receiver_holds_only_its_kinds_share_of_the_slots() {
    let mut opts = Options::default();
    opts.conf.push("outbox.concurrency = 4".into());
    let db = Cluster::start_with(opts);
    let r = Receiver::start();
    let mut c = db.client();
    c.batch_execute(&format!(
        "SELECT outbox.register('slow', '{}'); SELECT outbox.register('fast', '{}');
         SELECT outbox.set_max_in_flight('slow', 2);",
        r.url("/slow/{id}"),
        r.url("/fast/{id}")
    ))
    .unwrap();
    db.wait_for_worker();
    // The slow kind's receiver holds every request until the gate opens.
    let gate = Gate::new();
    for i in 0..10 {
        r.script(&format!("/slow/{i}"), [Action::held(&gate, 200)]);
    }
    c.batch_execute("SELECT count(outbox.enqueue('slow', g)) FROM generate_series(0, 9) g").unwrap();
    let slow_seen = || (0..10).filter(|i| !r.requests_for(&format!("/slow/{i}")).is_empty()).count();
    assert!(wait_until(LONG, || slow_seen() == 2), "two slow requests in flight");
    // The fast kind is delivered meanwhile, record after record.
    for i in 0..20 {
        c.execute("SELECT outbox.enqueue('fast', $1)", &[&i.to_string()]).unwrap();
    }
    assert!(wait_until(LONG, || (0..20).all(|i| r.requests_for(&format!("/fast/{i}")).len() == 1)), "fast delivered");
    assert_eq!(slow_seen(), 2, "still no more than two slow requests in flight");
    // Released, the slow kind drains, never more than two at once.
    gate.open();
    assert!(wait_until(LONG, || jobs_left(&mut c) == 0));
    assert_eq!(slow_seen(), 10);
    // Without the limit, the slow kind takes every slot.
    let gate = Gate::new();
    for i in 10..20 {
        r.script(&format!("/slow/{i}"), [Action::held(&gate, 200)]);
    }
    c.batch_execute("SELECT outbox.set_max_in_flight('slow', NULL); SELECT count(outbox.enqueue('slow', g)) FROM generate_series(10, 19) g")
        .unwrap();
    let held = || (10..20).filter(|i| !r.requests_for(&format!("/slow/{i}")).is_empty()).count();
    assert!(wait_until(LONG, || held() == 4), "as many as outbox.concurrency: {}", held());
    gate.open();
    assert!(wait_until(LONG, || jobs_left(&mut c) == 0));
}

/// A kind's `rate_limit` spaces its requests evenly: 40 records at 20 a
/// second take about two seconds, never a burst; another kind is not slowed.
#[test]
fn a_rate_limit_spreads_requests_evenly() {
    let db = Cluster::start();
    let r = Receiver::start();
    let mut c = db.client();
    c.batch_execute(&format!(
        "SELECT outbox.register('paced', '{}'); SELECT outbox.register('free', '{}');
         SELECT outbox.set_rate_limit('paced', 20);",
        r.url("/paced/{id}"),
        r.url("/free/{id}")
    ))
    .unwrap();
    db.wait_for_worker();
    c.batch_execute(
        "SELECT count(outbox.enqueue('paced', g)) FROM generate_series(1, 40) g;
         SELECT count(outbox.enqueue('free', g)) FROM generate_series(1, 40) g;",
    )
    .unwrap();
    assert!(wait_until(LONG, || jobs_left(&mut c) == 0));
    let at = |prefix: &str| {
        let mut at: Vec<_> = r.requests().into_iter().filter(|q| q.path.starts_with(prefix)).map(|q| q.at).collect();
        at.sort();
        at
    };
    let (paced, free) = (at("/paced/"), at("/free/"));
    assert_eq!((paced.len(), free.len()), (40, 40));
    // At 20 a second, from a bucket of two: 38 more after the first two.
    let span = paced[39] - paced[0];
    assert!(span >= Duration::from_millis(1800), "40 requests in {span:?}");
    // No burst: in any quarter of a second, about the bucket and the
    // quarter's share (2 + 5; 9 allows for the HTTP threads' jitter),
    // whatever the machine's speed.
    for (i, start) in paced.iter().enumerate() {
        let within = paced[i..].iter().take_while(|t| **t - *start < Duration::from_millis(250)).count();
        assert!(within <= 9, "{within} requests within 250 ms of request {i}");
    }
    assert!(free[39] - free[0] < span, "the other kind is not paced");
}
