//! A worker for every database that has the extension (issue #24).
//!
//! Without `outbox.database`, the launcher serves each database where
//! `outbox` is installed, and only those. It follows `CREATE EXTENSION`,
//! `DROP EXTENSION`, `CREATE DATABASE` from a template that has it, `DROP
//! DATABASE` (never blocked, no FORCE), `ALTER DATABASE ... RENAME` and
//! `ALLOW_CONNECTIONS false`; `outbox.max_workers` bounds the workers and
//! says which databases wait; and one database's trouble does not hold up
//! another's deliveries.

use outbox_e2e::cluster::{Cluster, Options};
use outbox_e2e::receiver::{Action, Gate, Receiver};
use outbox_e2e::{jobs_left, wait_until};
use postgres::Client;
use std::collections::BTreeMap;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(30);

/// A cluster that serves every database, with none created yet.
fn cluster(extra: &[&str]) -> Cluster {
    let mut opts = Options { create_extension: false, ..Options::default() };
    opts.conf.push("outbox.database = ''".into());
    opts.conf.extend(extra.iter().map(|s| s.to_string()));
    Cluster::start_with(opts)
}

/// Creates database `name` with the extension and kind `k`, whose records
/// go to `/name/{id}`.
fn with_extension(db: &Cluster, r: &Receiver, name: &str) -> Client {
    db.admin("postgres").batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    let mut c = db.admin(name);
    c.batch_execute(&format!("CREATE EXTENSION outbox; SELECT outbox.register('k', '{}')", r.url(&format!("/{name}/{{id}}"))))
        .unwrap();
    c
}

/// `worker_status()` as seen from `c`: state by database.
fn status(c: &mut Client) -> BTreeMap<String, String> {
    c.query("SELECT database, state FROM outbox.worker_status()", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, Option<String>>(0).unwrap_or_default(), r.get(1)))
        .collect()
}

/// The databases whose worker is past its start-up.
fn serving(c: &mut Client) -> Vec<String> {
    status(c).into_iter().filter(|(_, s)| s == "idle" || s == "delivering").map(|(d, _)| d).collect()
}

/// The outbox worker backends, by database.
fn workers(admin: &mut Client) -> Vec<(String, i32)> {
    admin
        .query("SELECT datname::text, pid FROM pg_stat_activity WHERE backend_type = 'outbox worker' ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Enqueues record `id` in the database `c` is connected to, and waits
/// until `path` received it.
fn delivers(c: &mut Client, r: &Receiver, id: &str, path: &str) {
    c.execute("SELECT outbox.enqueue('k', $1)", &[&id]).unwrap();
    assert!(wait_until(LONG, || r.requests_for(path).len() == 1), "{path} delivered");
    assert!(wait_until(LONG, || jobs_left(c) == 0));
}

/// How many times the log says a worker found no extension in `name`.
fn looked_in(db: &Cluster, name: &str) -> usize {
    db.log().matches(&format!("is not installed in database \"{name}\"")).count()
}

#[test]
fn every_database_with_the_extension_is_served_and_followed() {
    // DEBUG1: a worker that only looked says so at that level.
    let db = cluster(&["log_min_messages = debug1"]);
    let r = Receiver::start();
    let mut admin = db.admin("postgres");
    let mut a = with_extension(&db, &r, "a");
    let mut b = with_extension(&db, &r, "b");
    admin.batch_execute("CREATE DATABASE c").unwrap();
    delivers(&mut a, &r, "1", "/a/1");
    delivers(&mut b, &r, "1", "/b/1");
    assert!(wait_until(LONG, || serving(&mut a) == ["a", "b"]), "{:?}", status(&mut a));

    // A database without the extension is looked at once, and then left
    // alone: no worker is started there again and again.
    assert!(wait_until(LONG, || looked_in(&db, "c") == 1 && looked_in(&db, "postgres") == 1), "{}", db.log());
    assert!(wait_until(LONG, || workers(&mut admin).iter().all(|w| w.0 == "a" || w.0 == "b")));
    std::thread::sleep(Duration::from_millis(3000));
    assert_eq!((looked_in(&db, "c"), looked_in(&db, "postgres")), (1, 1), "three launcher rounds later");
    let in_c = status(&mut a);
    assert!(!in_c.contains_key("c") && !in_c.contains_key("postgres"), "{in_c:?}");

    // CREATE EXTENSION starts a worker; the launcher was told, as it would
    // not look again by itself.
    let mut c = db.admin("c");
    c.batch_execute(&format!("CREATE EXTENSION outbox; SELECT outbox.register('k', '{}')", r.url("/c/{id}"))).unwrap();
    assert!(wait_until(LONG, || serving(&mut c).contains(&"c".to_string())), "{:?}", status(&mut c));
    delivers(&mut c, &r, "1", "/c/1");

    // DROP DATABASE of a served database, without FORCE, while its worker
    // runs; the others go on.
    drop(b);
    admin.batch_execute("DROP DATABASE b").unwrap();
    assert!(wait_until(LONG, || serving(&mut a) == ["a", "c"]), "{:?}", status(&mut a));
    delivers(&mut a, &r, "2", "/a/2");

    // Renamed, it is served under its new name.
    drop(a);
    admin.batch_execute("ALTER DATABASE a RENAME TO a2").unwrap();
    let mut a2 = db.admin("a2");
    assert!(wait_until(LONG, || serving(&mut a2) == ["a2", "c"]), "{:?}", status(&mut a2));
    delivers(&mut a2, &r, "3", "/a/3");

    // A copy of a database that has the extension gets a worker of its own.
    drop(c);
    admin.batch_execute("CREATE DATABASE d TEMPLATE c").unwrap();
    let mut d = db.admin("d");
    assert!(wait_until(LONG, || serving(&mut d) == ["a2", "c", "d"]), "{:?}", status(&mut d));
    d.batch_execute(&format!("SELECT outbox.register('k', '{}')", r.url("/d/{id}"))).unwrap();
    delivers(&mut d, &r, "1", "/d/1");

    // DROP EXTENSION stops the worker, for good: the log says why.
    let mut c = db.admin("c");
    c.batch_execute("DROP EXTENSION outbox").unwrap();
    assert!(wait_until(LONG, || !workers(&mut admin).iter().any(|w| w.0 == "c")), "{:?}", workers(&mut admin));
    assert_eq!(looked_in(&db, "c"), 2, "said when the worker found it gone");
    drop(c);

    // A database closed to connections is skipped.
    admin.batch_execute("ALTER DATABASE d ALLOW_CONNECTIONS false").unwrap();
    let pid = workers(&mut admin).into_iter().find(|w| w.0 == "d").unwrap().1;
    admin.execute("SELECT pg_terminate_backend($1)", &[&pid]).unwrap();
    assert!(wait_until(LONG, || serving(&mut a2) == ["a2"]), "{:?}", status(&mut a2));
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(workers(&mut admin).into_iter().map(|w| w.0).collect::<Vec<_>>(), ["a2"]);
    assert!(!db.log().contains("is not currently accepting connections"), "no worker tried to connect");
    drop(d);
    admin.batch_execute("ALTER DATABASE d ALLOW_CONNECTIONS true").unwrap();
    let mut d = db.admin("d");
    assert!(wait_until(LONG, || serving(&mut d) == ["a2", "d"]), "{:?}", status(&mut d));
}

#[test]
fn databases_beyond_max_workers_wait_and_say_so() {
    let db = cluster(&["outbox.max_workers = 1"]);
    let r = Receiver::start();
    let mut a = with_extension(&db, &r, "a");
    let mut b = with_extension(&db, &r, "b");
    // The lower oid, a, holds the one slot; b waits, and says so.
    assert!(
        wait_until(LONG, || {
            let s = status(&mut a);
            s.get("a").map(String::as_str) == Some("idle") && s.get("b").map(String::as_str) == Some("waiting for a worker slot")
        }),
        "{:?}",
        status(&mut a)
    );
    assert!(db.log().contains("wait for a worker, all 1 allowed (outbox.max_workers) being busy: \"b\""), "{}", db.log());
    delivers(&mut a, &r, "1", "/a/1");
    b.execute("SELECT outbox.enqueue('k', '1')", &[]).unwrap();
    // Once a's worker is gone, b gets the slot and delivers what waited.
    a.batch_execute("DROP EXTENSION outbox").unwrap();
    assert!(wait_until(LONG, || r.requests_for("/b/1").len() == 1));
    assert_eq!(serving(&mut b), ["b"]);
}

#[test]
fn one_database_in_trouble_does_not_hold_up_another() {
    let db = cluster(&[]);
    let r = Receiver::start();
    let mut a = with_extension(&db, &r, "a");
    let mut b = with_extension(&db, &r, "b");
    assert!(wait_until(LONG, || serving(&mut a) == ["a", "b"]), "{:?}", status(&mut a));
    // a's receiver holds every request, and a's queue is locked.
    let gate = Gate::new();
    r.script("/a/1", [Action::held(&gate, 200)]);
    a.execute("SELECT outbox.enqueue('k', '1')", &[]).unwrap();
    assert!(wait_until(LONG, || r.requests_for("/a/1").len() == 1));
    let mut locker = db.admin("a");
    locker.batch_execute("BEGIN; LOCK TABLE outbox.queue IN ACCESS EXCLUSIVE MODE").unwrap();
    a.execute("SELECT outbox.enqueue('k', '2')", &[]).unwrap();
    // b delivers all the same.
    for i in 0..20 {
        b.execute("SELECT outbox.enqueue('k', $1)", &[&i.to_string()]).unwrap();
    }
    assert!(wait_until(LONG, || (0..20).all(|i| r.requests_for(&format!("/b/{i}")).len() == 1)));
    assert!(wait_until(LONG, || jobs_left(&mut b) == 0));
    assert!(r.requests_for("/a/2").is_empty(), "a is held up");
    gate.open();
    locker.batch_execute("COMMIT").unwrap();
    assert!(wait_until(LONG, || r.requests_for("/a/2").len() == 1 && jobs_left(&mut a) == 0));
}

/// A worker that can't connect (its database locked by a rename left open)
/// is stopped once it has waited its time, and gives its slot up, so that
/// the other databases are served meanwhile.
#[test]
fn a_database_locked_by_an_open_rename_does_not_hold_the_only_slot() {
    let db = cluster(&["outbox.max_workers = 1"]);
    let r = Receiver::start();
    let mut x = with_extension(&db, &r, "x");
    assert!(wait_until(LONG, || serving(&mut x) == ["x"]), "{:?}", status(&mut x));
    drop(x);
    let mut b = with_extension(&db, &r, "b");
    assert!(wait_until(LONG, || status(&mut b).get("b").map(String::as_str) == Some("waiting for a worker slot")));
    // The rename stops x's worker; the next one waits for the lock.
    let mut renaming = db.admin("postgres");
    renaming.batch_execute("BEGIN; ALTER DATABASE x RENAME TO y").unwrap();
    assert!(wait_until(LONG, || db.log().contains("did not begin within 10 s")), "{}", db.log());
    assert!(wait_until(LONG, || serving(&mut b) == ["b"]), "{:?}", status(&mut b));
    delivers(&mut b, &r, "1", "/b/1");
    // Its back-off over, x waits for the slot b holds.
    renaming.batch_execute("ROLLBACK").unwrap();
    let x_waits = |b: &mut Client| status(b).get("x").map(String::as_str) == Some("waiting for a worker slot");
    assert!(wait_until(LONG, || x_waits(&mut b)), "{:?}", status(&mut b));
}
