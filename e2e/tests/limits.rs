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
