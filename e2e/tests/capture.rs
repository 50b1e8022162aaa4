//! One capture path (issue #22): `outbox.enqueue()` writes to the same
//! per-transaction buffer and inbox as tracked tables, and the worker
//! coalesces what arrives either way. So a record is one record whatever the
//! spelling of its id, a later change without delay brings a delayed job
//! forward, an enqueue is invisible until it commits and never makes a second
//! delivery of a record while one is in flight, and COMMIT PREPARED wakes the
//! worker as COMMIT does.
//!
//! "Nothing was sent" is shown without sleeping: a marker record committed
//! afterwards is delivered and recorded first ([`settle`]).

use outbox_e2e::cluster::{Cluster, Options};
use outbox_e2e::receiver::{Action, Gate, Receiver, Recorded};
use outbox_e2e::{jobs_left, wait_until};
use postgres::Client;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(30);
/// How soon a change must be delivered when it is due at once.
const PROMPT: Duration = Duration::from_secs(5);

/// A cluster, a receiver, and a running worker, with the tracked `users`
/// table (kind `user`, its body the row as JSON, read as role `reader`) and
/// kind `mark` (no body) for markers.
struct Setup {
    db: Cluster,
    r: Receiver,
    c: Client,
}

fn started() -> Setup {
    started_with(Options::default())
}

fn started_with(opts: Options) -> Setup {
    let db = Cluster::start_with(opts);
    let r = Receiver::start();
    let mut c = db.client();
    c.batch_execute(&format!(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text);
         CREATE ROLE reader NOLOGIN IN ROLE pg_read_all_data;
         CREATE FUNCTION user_body(id text) RETURNS jsonb LANGUAGE sql STABLE
             AS $$ SELECT to_jsonb(u) FROM public.users u WHERE u.id = $1::bigint $$;
         SELECT outbox.register('user', '{}', body => 'user_body(text)', run_as => 'reader');
         SELECT outbox.track('users', 'user');
         SELECT outbox.register('mark', '{}');",
        r.url("/users/{id}"),
        r.url("/mark/{id}")
    ))
    .unwrap();
    db.wait_for_worker();
    Setup { db, r, c }
}

/// Jobs of record (kind, id) in outbox.jobs, as this session sees them.
fn jobs_of(c: &mut Client, kind: &str, id: &str) -> i64 {
    c.query_one("SELECT count(*) FROM outbox.jobs WHERE kind = $1 AND id = $2", &[&kind, &id]).unwrap().get(0)
}

/// Commits an enqueue of a new marker record and waits until it is
/// delivered and its outcome recorded: whatever the worker was to do with
/// what was committed before, it has had its turns to do it.
fn settle(c: &mut Client, r: &Receiver) {
    let id = format!("m{}", r.requests().iter().filter(|q| q.path.starts_with("/mark/")).count());
    c.execute("SELECT outbox.enqueue('mark', $1::text)", &[&id]).unwrap();
    let path = format!("/mark/{id}");
    let done = wait_until(LONG, || !r.requests_for(&path).is_empty() && jobs_of(c, "mark", &id) == 0);
    assert!(done, "marker {id} was not delivered");
}

/// COMMIT PREPARED runs in another session than the one that prepared, and
/// runs no commit callback of the latter: it must wake the worker all the
/// same. With a poll interval of a minute, only that wake-up explains a
/// prompt delivery. A tracked change, then an enqueue.
#[test]
fn commit_prepared_wakes_the_worker() {
    let mut opts = Options::default();
    opts.conf.push("max_prepared_transactions = 5".into());
    opts.conf.push("outbox.poll_interval = '60s'".into());
    let Setup { db, r, mut c } = started_with(opts);
    c.batch_execute("INSERT INTO users VALUES (1, 'a'), (2, 'b')").unwrap();
    assert!(wait_until(LONG, || r.count() == 2 && jobs_left(&mut c) == 0));
    let cases = [
        ("p1", "/users/1", "UPDATE users SET name = 'prepared' WHERE id = 1"),
        ("p2", "/users/2", "SELECT outbox.enqueue('user', 2)"),
    ];
    for (gid, path, change) in cases {
        let before = r.requests_for(path).len();
        db.client().batch_execute(&format!("BEGIN; {change}; PREPARE TRANSACTION '{gid}'")).unwrap();
        settle(&mut c, &r);
        assert_eq!(r.requests_for(path).len(), before, "{gid}: nothing is sent before COMMIT PREPARED");
        c.batch_execute(&format!("COMMIT PREPARED '{gid}'")).unwrap();
        let delivered = wait_until(PROMPT, || r.requests_for(path).len() == before + 1);
        assert!(delivered, "{gid}: not delivered within {PROMPT:?} of COMMIT PREPARED");
    }
    assert_eq!(r.requests_for("/users/1").last().unwrap().json()["name"], "prepared");
}

/// `enqueue(kind, id, delay)` means "not before now + delay"; a later change
/// of the record without delay (a tracked UPDATE, an enqueue, or an enqueue
/// in the same transaction) moves the job to now: it is delivered promptly,
/// with the current state, and no delayed job is left beside it.
#[test]
fn a_change_without_delay_moves_a_delayed_job_to_now() {
    let Setup { db: _db, r, mut c } = started();
    c.batch_execute("INSERT INTO users VALUES (1, 'a'), (2, 'b'), (3, 'c')").unwrap();
    assert!(wait_until(LONG, || r.count() == 3 && jobs_left(&mut c) == 0));
    let delayed = |c: &mut Client, id: &str| -> bool {
        c.query_one(
            "SELECT count(*) = 1 FROM outbox.jobs WHERE kind = 'user' AND id = $1 AND run_at > now() + interval '50 minutes'",
            &[&id],
        )
        .unwrap()
        .get(0)
    };
    let cases = [("1", "UPDATE users SET name = 'now' WHERE id = 1"), ("2", "SELECT outbox.enqueue('user', 2)")];
    for (id, change) in cases {
        let path = format!("/users/{id}");
        c.execute("SELECT outbox.enqueue('user', $1::text, '1 hour')", &[&id]).unwrap();
        assert!(delayed(&mut c, id), "record {id}: due in an hour");
        settle(&mut c, &r);
        assert_eq!(r.requests_for(&path).len(), 1, "record {id}: the delayed job is not sent");
        assert!(delayed(&mut c, id), "record {id}: the worker keeps it due in an hour");
        c.batch_execute(change).unwrap();
        assert!(wait_until(PROMPT, || r.requests_for(&path).len() == 2), "record {id}: not delivered promptly after `{change}`");
        assert!(wait_until(LONG, || jobs_of(&mut c, "user", id) == 0), "record {id}: a job is left: {}", jobs_of(&mut c, "user", id));
        assert_eq!(r.requests_for(&path).len(), 2, "record {id}: one delivery");
    }
    assert_eq!(r.requests_for("/users/1")[1].json()["name"], "now", "the state as of the change");

    c.batch_execute("BEGIN; SELECT outbox.enqueue('user', 3, '1 hour'); SELECT outbox.enqueue('user', 3); COMMIT;").unwrap();
    assert!(wait_until(PROMPT, || r.requests_for("/users/3").len() == 2), "record 3: not delivered promptly");
    assert!(wait_until(LONG, || jobs_of(&mut c, "user", "3") == 0), "record 3: a job is left");
    assert_eq!(r.requests_for("/users/3").len(), 2, "record 3: one delivery");
}

const UUID: &str = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";

/// An id is canonical: enqueue('k', 7), enqueue('k', '7') and a tracked
/// bigint or int key 7 are one record, and so are a tracked uuid key and
/// enqueues of the uuid (in any case, through the cast) or of its text. The
/// changes of each record are one transaction, so that exactly one delivery
/// is right (a change arriving while a delivery is in flight would rightly
/// make another).
#[test]
fn a_record_is_one_record_whatever_the_spelling_of_its_id() {
    let Setup { db: _db, r, mut c } = started();
    // The rows are there before the tables are tracked: nothing is sent for
    // them.
    c.batch_execute(&format!(
        "CREATE TABLE big (id bigint PRIMARY KEY, v text);
         CREATE TABLE small (id int PRIMARY KEY, v text);
         CREATE TABLE uu (id uuid PRIMARY KEY, v text);
         INSERT INTO big VALUES (7, 'old');
         INSERT INTO small VALUES (7, 'old');
         INSERT INTO uu VALUES ('{UUID}', 'old');"
    ))
    .unwrap();
    for (table, key) in [("big", "bigint"), ("small", "int"), ("uu", "uuid")] {
        c.batch_execute(&format!(
            "CREATE FUNCTION {table}_body(id text) RETURNS jsonb LANGUAGE sql STABLE
                 AS $$ SELECT to_jsonb(t) FROM public.{table} t WHERE t.id = $1::{key} $$;
             SELECT outbox.register('{table}', '{}', body => '{table}_body(text)', run_as => 'reader');
             SELECT outbox.track('{table}', '{table}');",
            r.url(&format!("/{table}/{{id}}"))
        ))
        .unwrap();
    }
    let upper = UUID.to_uppercase();
    let cases = [
        ("big", "7", "SELECT outbox.enqueue('big', 7); SELECT outbox.enqueue('big', '7'::text);".to_string()),
        ("small", "7", "SELECT outbox.enqueue('small', 7); SELECT outbox.enqueue('small', '7'::text);".to_string()),
        ("uu", UUID, format!("SELECT outbox.enqueue('uu', '{upper}'::uuid); SELECT outbox.enqueue('uu', '{UUID}'::text);")),
    ];
    for (kind, id, enqueues) in cases {
        c.batch_execute(&format!("BEGIN; {enqueues} UPDATE {kind} SET v = 'new' WHERE id = '{id}'; COMMIT;")).unwrap();
        let prefix = format!("/{kind}/");
        let sent = || -> Vec<Recorded> { r.requests().into_iter().filter(|q| q.path.starts_with(&prefix)).collect() };
        assert!(wait_until(LONG, || !sent().is_empty() && jobs_left(&mut c) == 0), "{kind}: delivered");
        let paths: Vec<String> = sent().into_iter().map(|q| q.path).collect();
        assert_eq!(paths, [format!("/{kind}/{id}")], "{kind}: one request for one record");
        assert_eq!(sent()[0].json()["v"], "new", "{kind}: the current state");
    }
}

/// enqueue() against the worker's claim, step by step. An enqueue not yet
/// committed is invisible, to the worker and to an admin alike; its commit
/// delivers it. A change committed while that delivery is in flight (held by
/// the receiver) is not sent until the delivery ends: never two requests for
/// a record at once. Then it is sent, with its state.
#[test]
fn an_enqueue_waits_for_its_commit_and_a_change_for_the_delivery_in_flight() {
    let Setup { db, r, mut c } = started();
    c.batch_execute("INSERT INTO users VALUES (1, 'a')").unwrap();
    assert!(wait_until(LONG, || r.count() == 1 && jobs_left(&mut c) == 0));
    let held = Gate::new();
    r.script("/users/1", [Action::held(&held, 200)]);

    let mut a = db.client();
    a.batch_execute("BEGIN; SELECT outbox.enqueue('user', 1);").unwrap();
    assert_eq!(jobs_of(&mut c, "user", "1"), 0, "an uncommitted enqueue shows no job");
    settle(&mut c, &r);
    assert_eq!(r.requests_for("/users/1").len(), 1, "nothing is sent before the commit");
    a.batch_execute("COMMIT").unwrap();
    assert!(wait_until(LONG, || r.requests_for("/users/1").len() == 2), "sent once committed");

    // That request is held: in flight. Another session's change becomes a
    // pending job of its own beside the running one...
    let mut b = db.client();
    b.batch_execute("UPDATE users SET name = 'b' WHERE id = 1").unwrap();
    let queued = |c: &mut Client| -> i64 {
        c.query_one("SELECT count(*) FROM outbox.jobs WHERE id = '1' AND state = 'pending' AND job_id IS NOT NULL", &[])
            .unwrap()
            .get(0)
    };
    assert!(wait_until(LONG, || queued(&mut c) == 1), "the change is a pending job");
    // ...which the worker, having had turns since, has not sent.
    settle(&mut c, &r);
    assert_eq!(r.requests_for("/users/1").len(), 2, "no second request while the first is in flight");

    held.open();
    assert!(wait_until(LONG, || r.requests_for("/users/1").len() == 3 && jobs_left(&mut c) == 0), "sent after the first ended");
    let names: Vec<serde_json::Value> = r.requests_for("/users/1").iter().map(|q| q.json()["name"].clone()).collect();
    assert_eq!(names, ["a", "a", "b"]);
    assert!(r.overlaps().is_empty(), "two requests for a record at once: {:?}", r.overlaps());
}

/// Coalescing rests on no invariant that another writer of the queue can
/// break: a job deleted by another session, with the queue's triggers
/// disabled or as a subscription's apply worker would (replica role), is
/// gone for the next change of its record too, which gets a job of its own.
/// (The worker once trusted where it had seen a record's job, and dropped
/// that change.)
#[test]
fn a_change_after_its_job_was_deleted_behind_the_workers_back_is_kept() {
    let Setup { db, r, mut c } = started();
    c.batch_execute("SELECT outbox.pause('user'); INSERT INTO users VALUES (1, 'a'), (2, 'b')").unwrap();
    let absorbed = |c: &mut Client| -> bool { c.query_one("SELECT NOT EXISTS (SELECT FROM outbox.inbox)", &[]).unwrap().get(0) };
    // Changes that coalesce into the waiting jobs, each moved into the queue
    // before the next: the worker has seen the jobs standing, more than once.
    for name in ["b", "c", "d"] {
        c.execute("UPDATE users SET name = $1", &[&name]).unwrap();
        assert!(wait_until(LONG, || absorbed(&mut c)), "the inbox was not absorbed");
    }
    assert_eq!((jobs_of(&mut c, "user", "1"), jobs_of(&mut c, "user", "2")), (1, 1));
    let mut other = db.client();
    other
        .batch_execute(
            "BEGIN; ALTER TABLE outbox.queue DISABLE TRIGGER ALL; DELETE FROM outbox.queue WHERE id = '1';
             ALTER TABLE outbox.queue ENABLE TRIGGER ALL; COMMIT;
             SET session_replication_role = replica; DELETE FROM outbox.queue WHERE id = '2';",
        )
        .unwrap();
    c.execute("UPDATE users SET name = 'kept'", &[]).unwrap();
    assert!(wait_until(LONG, || absorbed(&mut c)), "the inbox was not absorbed");
    assert_eq!((jobs_of(&mut c, "user", "1"), jobs_of(&mut c, "user", "2")), (1, 1), "a change was dropped");
    c.execute("SELECT outbox.resume('user')", &[]).unwrap();
    assert!(wait_until(LONG, || jobs_left(&mut c) == 0), "not delivered");
    for path in ["/users/1", "/users/2"] {
        assert_eq!(r.requests_for(path).last().unwrap().json()["name"], "kept", "{path}");
    }
}

/// A delayed job that another session holds locked (an admin's `SELECT ...
/// FOR UPDATE`) can't be moved to now while the lock lasts: the change
/// that asks for it waits in the inbox, nothing else waits at all, and once
/// the lock is gone the change moves the job and it is delivered.
#[test]
fn a_locked_delayed_job_holds_up_only_its_own_record() {
    let Setup { db, r, mut c } = started();
    c.batch_execute("SELECT outbox.enqueue('user', 1, '1 hour')").unwrap();
    let queued = |c: &mut Client| -> bool {
        c.query_one("SELECT count(*) = 1 FROM outbox.queue WHERE id = '1' AND run_at > now() + interval '50 minutes'", &[])
            .unwrap()
            .get(0)
    };
    assert!(wait_until(LONG, || queued(&mut c)), "the delayed job is in the queue");
    let mut admin = db.client();
    admin.batch_execute("BEGIN; SELECT FROM outbox.queue WHERE id = '1' FOR UPDATE").unwrap();
    c.batch_execute("INSERT INTO users VALUES (1, 'a'); INSERT INTO users VALUES (2, 'b');").unwrap();
    assert!(wait_until(PROMPT, || r.requests_for("/users/2").len() == 1), "record 2 is not held up");
    settle(&mut c, &r);
    assert!(r.requests_for("/users/1").is_empty(), "record 1's job is still delayed");
    admin.batch_execute("COMMIT").unwrap();
    assert!(wait_until(PROMPT, || r.requests_for("/users/1").len() == 1), "record 1 is delivered once the lock is gone");
    assert_eq!(r.requests_for("/users/1")[0].json()["name"], "a");
    assert!(wait_until(LONG, || jobs_left(&mut c) == 0));
}
