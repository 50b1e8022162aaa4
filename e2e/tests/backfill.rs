//! Backfills (issue #25): `outbox.backfill` delivers every row of a table,
//! or every row a filter holds for, a chunk at a time, read as the role
//! that started it, without starving live changes, and goes on after a
//! worker restart.

use outbox_e2e::cluster::{Cluster, Options};
use outbox_e2e::receiver::{Action, Receiver};
use outbox_e2e::{jobs_left, wait_until};
use std::collections::HashMap;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(120);
/// `worker::backfills::CHUNK`.
const CHUNK: usize = 1000;

fn backfill_row(c: &mut postgres::Client, id: i64) -> (String, i64, Option<String>) {
    let r = c.query_one("SELECT state, enqueued, error FROM outbox.backfills WHERE backfill_id = $1", &[&id]).unwrap();
    (r.get(0), r.get(1), r.get(2))
}

fn pending(c: &mut postgres::Client) -> i64 {
    c.query_one("SELECT count(*) FROM outbox.queue WHERE state = 'pending'", &[]).unwrap().get(0)
}

/// Every row the filter holds for, once; the queue never holds much more
/// than a chunk of them; the progress row says what was done.
#[test]
fn a_backfill_delivers_each_row_the_filter_holds_for_once_a_chunk_at_a_time() {
    let db = Cluster::start();
    let r = Receiver::start();
    let mut c = db.client();
    c.batch_execute(&format!(
        "SELECT outbox.register('item', '{}');
         CREATE TABLE public.items (id bigint PRIMARY KEY, status text NOT NULL);
         INSERT INTO public.items SELECT g, CASE WHEN g % 5 = 0 THEN 'draft' ELSE 'live' END FROM generate_series(1, 6000) g;
         ANALYZE public.items;",
        r.url("/items/{id}")
    ))
    .unwrap();
    db.wait_for_worker();
    let id: i64 = c.query_one("SELECT outbox.backfill('public.items', 'item', filter => 'status <> ''draft''')", &[]).unwrap().get(0);
    let mut most = 0;
    assert!(wait_until(LONG, || {
        most = most.max(pending(&mut c));
        backfill_row(&mut c, id).0 == "done" && jobs_left(&mut c) == 0
    }));
    assert!(most <= 2 * CHUNK as i64, "{most} jobs pending at once");
    assert_eq!(backfill_row(&mut c, id), ("done".to_string(), 4800, None));
    let r2: (i64, String) = {
        let row = c.query_one("SELECT rows_estimate, last_id FROM outbox.backfills WHERE backfill_id = $1", &[&id]).unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(r2, (6000, "5999".to_string()));
    let mut seen: HashMap<String, usize> = HashMap::new();
    for q in r.requests() {
        *seen.entry(q.path).or_default() += 1;
    }
    assert_eq!(seen.len(), 4800);
    assert!(seen.values().all(|n| *n == 1), "a row delivered twice");
    assert!(!seen.contains_key("/items/5"), "a draft was delivered");
}

/// Live changes of the kind wait behind at most about a chunk of backfilled
/// jobs, not behind the table: the worker adds a chunk only when few jobs
/// are due.
#[test]
fn live_changes_are_not_starved_by_a_backfill() {
    let mut opts = Options::default();
    opts.conf.push("outbox.concurrency = 4".into());
    let db = Cluster::start_with(opts);
    let r = Receiver::start();
    r.set_fallback(Some(Action::delayed(204, Duration::from_millis(2))));
    let mut c = db.client();
    c.batch_execute(&format!(
        "SELECT outbox.register('item', '{}');
         CREATE TABLE public.items (id bigint PRIMARY KEY);
         INSERT INTO public.items SELECT g FROM generate_series(1, 20000) g;",
        r.url("/items/{id}")
    ))
    .unwrap();
    db.wait_for_worker();
    let id: i64 = c.query_one("SELECT outbox.backfill('public.items', 'item')", &[]).unwrap().get(0);
    assert!(wait_until(LONG, || r.count() >= 3000), "the backfill is under way");
    c.execute("SELECT outbox.enqueue('item', 'live')", &[]).unwrap();
    let before = r.count();
    assert!(wait_until(LONG, || !r.requests_for("/items/live").is_empty()));
    let between = r.requests().iter().position(|q| q.path == "/items/live").unwrap() - before;
    assert_ne!(backfill_row(&mut c, id).0, "done", "the backfill was still going");
    assert!(between < 2 * CHUNK + 100, "{between} backfilled requests went out before the live change");
    assert!(wait_until(LONG, || backfill_row(&mut c, id).0 == "done" && jobs_left(&mut c) == 0));
    assert_eq!(r.distinct_paths(), 20001);
}

/// A restarted worker goes on from where the last one stood, not from the
/// start; a cancelled backfill stops, and resumed, finishes.
#[test]
fn a_backfill_goes_on_after_a_restart_and_stops_when_cancelled() {
    let mut opts = Options::default();
    opts.conf.push("outbox.concurrency = 4".into());
    let db = Cluster::start_with(opts);
    let r = Receiver::start();
    r.set_fallback(Some(Action::delayed(204, Duration::from_millis(1))));
    let mut c = db.client();
    c.batch_execute(&format!(
        "SELECT outbox.register('item', '{}');
         CREATE TABLE public.items (code text PRIMARY KEY);
         INSERT INTO public.items SELECT 'c' || g FROM generate_series(1, 8000) g;",
        r.url("/items/{id}")
    ))
    .unwrap();
    let pid = db.wait_for_worker();
    let id: i64 = c.query_one("SELECT outbox.backfill('public.items', 'item')", &[]).unwrap().get(0);
    assert!(wait_until(LONG, || backfill_row(&mut c, id).1 >= 3000));
    c.execute("SELECT pg_terminate_backend($1)", &[&pid]).unwrap();
    assert!(wait_until(LONG, || backfill_row(&mut c, id).0 == "done" && jobs_left(&mut c) == 0));
    assert_eq!(r.distinct_paths(), 8000);
    // Sent again: at most what was in flight or claimed at the restart.
    assert!(r.count() <= 8000 + 300, "{} requests for 8000 rows", r.count());
    assert_eq!(backfill_row(&mut c, id).1, 8000);

    // Cancelled, it makes no more jobs; resumed, it goes on from there.
    r.clear();
    c.batch_execute("INSERT INTO public.items SELECT 'd' || g FROM generate_series(1, 8000) g").unwrap();
    let id: i64 = c.query_one("SELECT outbox.backfill('public.items', 'item')", &[]).unwrap().get(0);
    assert!(wait_until(LONG, || backfill_row(&mut c, id).1 >= 2000));
    c.execute("SELECT outbox.cancel_backfill($1)", &[&id]).unwrap();
    let at_cancel = backfill_row(&mut c, id).1;
    assert!(wait_until(LONG, || jobs_left(&mut c) == 0));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(backfill_row(&mut c, id), ("cancelled".to_string(), at_cancel, None));
    assert_eq!(r.distinct_paths() as i64, at_cancel);
    c.execute("SELECT outbox.resume_backfill($1)", &[&id]).unwrap();
    assert!(wait_until(LONG, || backfill_row(&mut c, id).0 == "done" && jobs_left(&mut c) == 0));
    assert_eq!(r.distinct_paths(), 16000);
}

/// The table is read with the rights of the role that started the
/// backfill, row-level security included; a backfill whose table goes away
/// fails, with the error, and the others go on.
#[test]
fn a_backfill_reads_as_its_starter_and_fails_alone() {
    let db = Cluster::start();
    let r = Receiver::start();
    let mut c = db.client();
    c.batch_execute(&format!(
        "SELECT outbox.register('item', '{}');
         CREATE TABLE public.items (id int PRIMARY KEY, tenant text NOT NULL);
         INSERT INTO public.items SELECT g, CASE WHEN g <= 30 THEN 'a' ELSE 'b' END FROM generate_series(1, 50) g;
         ALTER TABLE public.items ENABLE ROW LEVEL SECURITY;
         CREATE ROLE tenant_a_admin;
         CREATE POLICY only_a ON public.items TO tenant_a_admin USING (tenant = 'a');
         GRANT SELECT ON public.items TO tenant_a_admin;
         GRANT USAGE ON SCHEMA outbox TO tenant_a_admin;
         GRANT EXECUTE ON FUNCTION outbox.backfill(regclass, text, name, text) TO tenant_a_admin;
         GRANT SELECT, INSERT ON outbox.backfills TO tenant_a_admin;
         GRANT SELECT ON outbox.kinds TO tenant_a_admin;
         CREATE TABLE public.doomed (id int PRIMARY KEY);
         INSERT INTO public.doomed SELECT generate_series(1, 5000);",
        r.url("/items/{id}")
    ))
    .unwrap();
    db.wait_for_worker();
    c.batch_execute("SET ROLE tenant_a_admin").unwrap();
    let a: i64 = c.query_one("SELECT outbox.backfill('public.items', 'item')", &[]).unwrap().get(0);
    c.batch_execute("RESET ROLE").unwrap();
    assert!(wait_until(LONG, || backfill_row(&mut c, a).0 == "done" && jobs_left(&mut c) == 0));
    assert_eq!(r.distinct_paths(), 30, "only the rows the starter may see");
    assert!(r.requests_for("/items/31").is_empty());

    // A role that may not read the table can't start one.
    c.batch_execute("CREATE ROLE nosy; GRANT USAGE ON SCHEMA outbox TO nosy; GRANT EXECUTE ON FUNCTION outbox.backfill(regclass, text, name, text) TO nosy; GRANT SELECT ON outbox.kinds TO nosy; SET ROLE nosy").unwrap();
    let err = c.query_one("SELECT outbox.backfill('public.doomed', 'item')", &[]).unwrap_err();
    assert_eq!(err.code().map(|s| s.code()), Some("42501"), "{err}");
    c.batch_execute("RESET ROLE").unwrap();

    // The table goes while its backfill runs: it fails, with the error.
    r.set_fallback(Some(Action::delayed(204, Duration::from_millis(2))));
    let doomed: i64 = c.query_one("SELECT outbox.backfill('public.doomed', 'item')", &[]).unwrap().get(0);
    assert!(wait_until(LONG, || backfill_row(&mut c, doomed).1 >= 1000));
    c.batch_execute("DROP TABLE public.doomed").unwrap();
    assert!(wait_until(LONG, || backfill_row(&mut c, doomed).0 == "failed"));
    let (_, _, error) = backfill_row(&mut c, doomed);
    assert!(error.as_deref().is_some_and(|e| e.contains("gone") || e.contains("does not exist")), "{error:?}");
    assert!(wait_until(LONG, || jobs_left(&mut c) == 0), "what it enqueued is delivered");
}
