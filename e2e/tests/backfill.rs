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
    // It stands at the last row it read, a draft.
    assert_eq!(r2, (6000, "6000".to_string()));
    let mut seen: HashMap<String, usize> = HashMap::new();
    for q in r.requests() {
        *seen.entry(q.path).or_default() += 1;
    }
    assert_eq!(seen.len(), 4800);
    assert!(seen.values().all(|n| *n == 1), "a row delivered twice");
    assert!(!seen.contains_key("/items/5"), "a draft was delivered");
}

fn requests_before(r: &Receiver, path: &str, from: usize) -> usize {
    assert!(wait_until(LONG, || !r.requests_for(path).is_empty()), "{path} was delivered");
    r.requests().iter().position(|q| q.path == path).unwrap() - from
}

/// Live changes of the kind go before its backfilled jobs: a new record's,
/// and one that joins a record's backfilled job, which becomes live. What
/// goes out before them is only what was in flight or claimed already.
#[test]
fn live_changes_go_before_a_backfill() {
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
    let backfilled_due = |c: &mut postgres::Client| -> i64 {
        c.query_one("SELECT count(*) FROM outbox.queue WHERE backfilled AND state = 'pending'", &[]).unwrap().get(0)
    };
    assert!(wait_until(LONG, || r.count() >= 3000 && backfilled_due(&mut c) >= 500), "the backfill is under way");
    let before = r.count();
    c.execute("SELECT outbox.enqueue('item', 'live')", &[]).unwrap();
    let between = requests_before(&r, "/items/live", before);
    assert!(between < 50, "{between} backfilled requests went out before the live change");

    assert!(wait_until(LONG, || backfilled_due(&mut c) >= 500));
    let last: String = c
        .query_one("SELECT id FROM outbox.queue WHERE backfilled AND state = 'pending' ORDER BY job_id DESC LIMIT 1", &[])
        .unwrap()
        .get(0);
    let before = r.count();
    c.execute("SELECT outbox.enqueue('item', $1::text)", &[&last]).unwrap();
    let between = requests_before(&r, &format!("/items/{last}"), before);
    assert!(between < 50, "{between} backfilled requests went out before the change that joined a backfilled job");

    assert_ne!(backfill_row(&mut c, id).0, "done", "the backfill was still going");
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

/// Who may start a backfill: a role that may read the table, without
/// row-level security restricting it (the worker reads as the table's
/// owner). A backfill whose table goes away fails, with the error.
#[test]
fn a_backfill_is_for_roles_that_may_read_the_table_and_fails_alone() {
    let db = Cluster::start();
    let r = Receiver::start();
    let mut c = db.client();
    c.batch_execute(&format!(
        "SELECT outbox.register('item', '{}');
         CREATE TABLE public.items (id int PRIMARY KEY, tenant text NOT NULL);
         INSERT INTO public.items SELECT g, CASE WHEN g <= 30 THEN 'a' ELSE 'b' END FROM generate_series(1, 50) g;
         ALTER TABLE public.items ENABLE ROW LEVEL SECURITY;
         CREATE POLICY only_a ON public.items USING (tenant = 'a');
         CREATE ROLE tenant_a_admin;
         CREATE ROLE auditor BYPASSRLS;
         CREATE ROLE nosy;
         GRANT SELECT ON public.items TO tenant_a_admin, auditor;
         GRANT USAGE ON SCHEMA outbox TO tenant_a_admin, auditor, nosy;
         GRANT EXECUTE ON FUNCTION outbox.backfill(regclass, text, name, text) TO tenant_a_admin, auditor, nosy;
         CREATE TABLE public.doomed (id int PRIMARY KEY);
         INSERT INTO public.doomed SELECT generate_series(1, 5000);",
        r.url("/items/{id}")
    ))
    .unwrap();
    db.wait_for_worker();
    let code = |c: &mut postgres::Client, role: &str, table: &str| {
        c.batch_execute(&format!("SET ROLE {role}")).unwrap();
        let got = c.query_one(&format!("SELECT outbox.backfill('{table}', 'item')"), &[]).err().and_then(|e| e.code().map(|s| s.code().to_string()));
        c.batch_execute("RESET ROLE").unwrap();
        got
    };
    assert_eq!(code(&mut c, "tenant_a_admin", "public.items").as_deref(), Some("0A000"), "row-level security applies to it");
    assert_eq!(code(&mut c, "nosy", "public.items").as_deref(), Some("42501"), "it may not read the table");
    // A role that may read it all needs no privilege on outbox's tables.
    assert_eq!(code(&mut c, "auditor", "public.items"), None);
    assert!(wait_until(LONG, || r.distinct_paths() == 50 && jobs_left(&mut c) == 0));
    let run_as: String = c.query_one("SELECT run_as::text FROM outbox.backfills", &[]).unwrap().get(0);
    assert_eq!(run_as, "auditor");

    // The table goes while its backfill runs: it fails, with the error.
    r.set_fallback(Some(Action::delayed(204, Duration::from_millis(2))));
    let doomed: i64 = c.query_one("SELECT outbox.backfill('public.doomed', 'item')", &[]).unwrap().get(0);
    assert!(wait_until(LONG, || backfill_row(&mut c, doomed).1 >= 1000));
    c.batch_execute("DROP TABLE public.doomed").unwrap();
    assert!(wait_until(LONG, || backfill_row(&mut c, doomed).0 == "failed"));
    let (_, _, error) = backfill_row(&mut c, doomed);
    assert!(error.as_deref().is_some_and(|e| e.contains("gone")), "{error:?}");
    assert!(wait_until(LONG, || jobs_left(&mut c) == 0), "what it enqueued is delivered");
}

/// The owner of a table a superuser backfills can't have its own code run
/// with the superuser's rights: an id column made a domain whose check
/// calls the owner's function, which tries to make it a superuser. The
/// worker reads as the owner, and never runs the check.
#[test]
fn a_tables_owner_gains_nothing_from_a_superusers_backfill() {
    let db = Cluster::start();
    let r = Receiver::start();
    let mut c = db.client();
    c.batch_execute(&format!(
        "SELECT outbox.register('item', '{}');
         CREATE ROLE app LOGIN;
         CREATE SCHEMA app AUTHORIZATION app;
         CREATE TABLE public.seen (who text);
         GRANT INSERT ON public.seen TO PUBLIC;
         SET ROLE app;
         CREATE TABLE app.items (id bigint PRIMARY KEY);
         INSERT INTO app.items SELECT generate_series(1, 3000);
         CREATE FUNCTION app.pwn(bigint) RETURNS boolean LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO public.seen VALUES (current_user);
             IF current_setting('is_superuser') = 'on' THEN EXECUTE 'ALTER ROLE app SUPERUSER'; END IF;
             RETURN true;
         END $$;
         CREATE DOMAIN app.k AS bigint CHECK (app.pwn(VALUE));
         RESET ROLE;",
        r.url("/items/{id}")
    ))
    .unwrap();
    db.wait_for_worker();
    r.set_fallback(Some(Action::delayed(204, Duration::from_millis(1))));
    let id: i64 = c.query_one("SELECT outbox.backfill('app.items', 'item')", &[]).unwrap().get(0);
    assert!(wait_until(LONG, || backfill_row(&mut c, id).1 >= 1000));
    // Between two chunks, the owner changes the column's type.
    c.batch_execute("SET ROLE app; ALTER TABLE app.items ALTER COLUMN id TYPE app.k; RESET ROLE; TRUNCATE public.seen").unwrap();
    assert!(wait_until(LONG, || backfill_row(&mut c, id).0 == "done" && jobs_left(&mut c) == 0));
    assert_eq!(r.distinct_paths(), 3000);
    let superuser: bool = c.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = 'app'", &[]).unwrap().get(0);
    assert!(!superuser, "the owner made itself a superuser");
    let seen: Vec<String> = c.query("SELECT DISTINCT who FROM public.seen", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert!(seen.iter().all(|w| w == "app"), "the owner's function ran as {seen:?}");
}
