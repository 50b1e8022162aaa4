//! Secret rotation (issue #25): during its overlap a request carries two
//! signatures, the new secret's and the replaced one's, so the official
//! Standard Webhooks verifier accepts it with either key; after it, only
//! with the new one.

use http::{HeaderMap, HeaderName, HeaderValue};
use outbox_e2e::cluster::Cluster;
use outbox_e2e::receiver::{Receiver, Recorded};
use outbox_e2e::wait_until;
use postgres::Client;
use standardwebhooks::Webhook;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(30);
const OLD: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const NEW: &str = "whsec_YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4";

/// Whether the official verifier accepts `req` with `secret`.
fn verifies(secret: &str, req: &Recorded) -> bool {
    let mut headers = HeaderMap::new();
    for (name, value) in &req.headers {
        headers.insert(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
    }
    Webhook::new(secret).unwrap().verify(&req.body, &headers).is_ok()
}

/// Enqueues record `id` of kind `k` and returns its delivery.
fn delivered(c: &mut Client, r: &Receiver, id: &str) -> Recorded {
    c.execute("SELECT outbox.enqueue('k', $1)", &[&id]).unwrap();
    let path = format!("/k/{id}");
    assert!(wait_until(LONG, || r.requests_for(&path).len() == 1), "{path} delivered");
    r.requests_for(&path).remove(0)
}

#[test]
fn during_the_overlap_either_secret_verifies_and_after_it_only_the_new_one() {
    let db = Cluster::start();
    let r = Receiver::start();
    let mut c = db.client();
    c.batch_execute(&format!("SELECT outbox.register('k', '{}', secret => '{OLD}')", r.url("/k/{id}"))).unwrap();
    db.wait_for_worker();
    let before = delivered(&mut c, &r, "1");
    assert!(verifies(OLD, &before) && !verifies(NEW, &before));

    c.batch_execute(&format!("SELECT outbox.rotate_secret('k', '{NEW}', '8 s')")).unwrap();
    // A turn that began before the rotation committed may still sign with
    // the kinds it had read; one that delivers a record enqueued after it
    // was delivered began after.
    delivered(&mut c, &r, "marker");
    let during = delivered(&mut c, &r, "2");
    let signatures = during.header("webhook-signature").unwrap().to_string();
    assert_eq!(signatures.split(' ').count(), 2, "{signatures}");
    assert!(verifies(NEW, &during), "the new secret verifies: {signatures}");
    assert!(verifies(OLD, &during), "the old secret verifies: {signatures}");

    // Once the overlap is over (by the server's clock), only the new one.
    let over = |c: &mut Client| c.query_one("SELECT previous_secret_until < now() FROM outbox.kinds", &[]).unwrap().get::<_, bool>(0);
    assert!(wait_until(LONG, || over(&mut c)));
    let after = delivered(&mut c, &r, "3");
    assert_eq!(after.header("webhook-signature").unwrap().split(' ').count(), 1);
    assert!(verifies(NEW, &after) && !verifies(OLD, &after));
}
