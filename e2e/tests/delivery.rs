//! End to end: a real cluster with outbox preloaded, a real HTTP receiver.

use outbox_e2e::cluster::{Cluster, Options};
use outbox_e2e::receiver::{Action, Receiver};
use outbox_e2e::{jobs_left, wait_until, webhooks};
use postgres::Client;
use std::time::Duration;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const LONG: Duration = Duration::from_secs(30);

/// A tracked `users` table whose body function returns the row as JSON,
/// run as role `reader`, which may read every table and nothing more.
fn users(c: &mut Client, r: &Receiver, options: &str) {
    c.batch_execute(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text);
         CREATE ROLE reader NOLOGIN IN ROLE pg_read_all_data;
         CREATE FUNCTION user_body(id text) RETURNS jsonb LANGUAGE sql STABLE
             AS $$ SELECT to_jsonb(u) FROM public.users u WHERE u.id = $1::bigint $$;",
    )
    .unwrap();
    let url = r.url("/users/{id}");
    c.batch_execute(&format!(
        "SELECT outbox.register('user', '{url}', body => 'user_body(text)', run_as => 'reader', secret => '{SECRET}'{options});
         SELECT outbox.track('users', 'user');"
    ))
    .unwrap();
}

/// A cluster, a receiver, the tracked `users` table, and a running worker.
struct Setup {
    db: Cluster,
    r: Receiver,
    c: Client,
    pid: i32,
}

fn started(options: &str) -> Setup {
    started_with(Options::default(), options)
}

/// Like [`started`], on a cluster with these settings.
fn started_with(opts: Options, options: &str) -> Setup {
    let db = Cluster::start_with(opts);
    let r = Receiver::start();
    let mut c = db.client();
    users(&mut c, &r, options);
    let pid = db.wait_for_worker();
    Setup { db, r, c, pid }
}

fn job_row(c: &mut Client, id: &str) -> Option<(String, i32, Option<i32>, Option<String>)> {
    c.query_opt("SELECT state, attempts, last_status, last_error FROM outbox.jobs WHERE id = $1", &[&id])
        .unwrap()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
}

#[test]
fn commit_delivers_one_signed_put_with_the_current_body() {
    let Setup { db: _db, r, mut c, .. } = started("");
    c.batch_execute("INSERT INTO users VALUES (1, 'ann')").unwrap();
    assert!(wait_until(LONG, || r.count() >= 1 && jobs_left(&mut c) == 0));
    std::thread::sleep(Duration::from_millis(300));
    let reqs = r.requests();
    assert_eq!(reqs.len(), 1, "exactly one request");
    let q = &reqs[0];
    assert_eq!(q.method, "PUT");
    assert_eq!(q.path, "/users/1");
    assert_eq!(q.header("content-type"), Some("application/json"));
    assert_eq!(q.json(), serde_json::json!({"id": 1, "name": "ann"}));
    let (id, ts, sig) = (q.header("webhook-id").unwrap(), q.header("webhook-timestamp").unwrap(), q.header("webhook-signature").unwrap());
    webhooks::verify(SECRET, id, ts, &q.body, sig).unwrap();
    assert!(webhooks::verify("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", id, ts, &q.body, sig).is_err());
    assert!(q.header("outbox-sequence").unwrap().parse::<i64>().is_ok());
    let delivered: i64 = c.query_one("SELECT delivered FROM outbox.stats() WHERE kind = 'user'", &[]).unwrap().get(0);
    assert_eq!(delivered, 1);
}

#[test]
fn rollback_sends_nothing() {
    let Setup { db: _db, r, mut c, .. } = started("");
    c.batch_execute("BEGIN; INSERT INTO users VALUES (1, 'ann'); SELECT outbox.enqueue('user', 2); ROLLBACK;").unwrap();
    // A committed marker afterwards proves the worker was awake and done.
    c.batch_execute("INSERT INTO users VALUES (3, 'cid')").unwrap();
    assert!(wait_until(LONG, || r.count() >= 1 && jobs_left(&mut c) == 0));
    std::thread::sleep(Duration::from_millis(500));
    let paths: Vec<String> = r.requests().into_iter().map(|q| q.path).collect();
    assert_eq!(paths, ["/users/3"]);
}

#[test]
fn quick_updates_coalesce_and_the_last_request_has_the_final_state() {
    let Setup { db: _db, r, mut c, .. } = started("");
    // Slow receiver: updates pile up while a delivery is in flight.
    r.set_fallback(Some(Action::delayed(201, Duration::from_millis(300))));
    c.batch_execute("INSERT INTO users VALUES (1, 'v0')").unwrap();
    for i in 1..=10 {
        c.batch_execute(&format!("UPDATE users SET name = 'v{i}' WHERE id = 1")).unwrap();
    }
    assert!(wait_until(LONG, || jobs_left(&mut c) == 0));
    let reqs = r.requests_for("/users/1");
    assert!(reqs.len() < 11, "{} requests for 11 changes", reqs.len());
    assert_eq!(reqs.last().unwrap().json()["name"], "v10");
    let seqs: Vec<i64> = reqs.iter().map(|q| q.header("outbox-sequence").unwrap().parse().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "sequence must grow: {seqs:?}");
}

#[test]
fn a_record_never_has_two_deliveries_in_flight() {
    let Setup { db: _db, r, mut c, .. } = started("");
    // Each answer takes 300 ms; changes keep coming meanwhile, for this
    // record and for others (which may go out in parallel).
    let delay = Duration::from_millis(300);
    r.set_fallback(Some(Action::delayed(201, delay)));
    c.batch_execute("INSERT INTO users SELECT g, 'v0' FROM generate_series(1, 4) g").unwrap();
    for i in 1..=12 {
        c.batch_execute(&format!("UPDATE users SET name = 'v{i}'")).unwrap();
        std::thread::sleep(Duration::from_millis(60));
    }
    assert!(wait_until(LONG, || jobs_left(&mut c) == 0));
    for id in 1..=4 {
        let arrivals: Vec<_> = r.requests_for(&format!("/users/{id}")).iter().map(|q| q.at).collect();
        assert!(arrivals.len() >= 2, "record {id}: {} requests", arrivals.len());
        // The next request for a record is sent only after the last answer.
        for w in arrivals.windows(2) {
            assert!(w[1] - w[0] >= delay, "record {id}: requests {:?} apart", w[1] - w[0]);
        }
        assert_eq!(r.requests_for(&format!("/users/{id}")).last().unwrap().json()["name"], "v12");
    }
}

#[test]
fn server_errors_are_retried_with_backoff() {
    let Setup { db: _db, r, mut c, .. } = started("");
    r.script("/users/1", [Action::status(500), Action::status(503), Action::status(201)]);
    c.batch_execute("INSERT INTO users VALUES (1, 'ann')").unwrap();
    assert!(wait_until(LONG, || jobs_left(&mut c) == 0));
    let reqs = r.requests_for("/users/1");
    assert_eq!(reqs.len(), 3);
    // retry_base = 100ms, jitter keeps at least half: >= 50ms, then >= 100ms.
    let gap1 = reqs[1].at - reqs[0].at;
    let gap2 = reqs[2].at - reqs[1].at;
    assert!(gap1 >= Duration::from_millis(50), "{gap1:?}");
    assert!(gap2 >= Duration::from_millis(100), "{gap2:?}");
    // Same job, same webhook-id on every attempt.
    let ids: Vec<&str> = reqs.iter().map(|q| q.header("webhook-id").unwrap()).collect();
    assert!(ids.iter().all(|i| *i == ids[0]));
    let failed: i64 = c.query_one("SELECT failed_attempts FROM outbox.stats() WHERE kind = 'user'", &[]).unwrap().get(0);
    assert_eq!(failed, 2);
}

#[test]
fn retry_after_is_honoured() {
    let Setup { db: _db, r, mut c, .. } = started("");
    r.script("/users/1", [Action::with_header(429, "Retry-After", "1"), Action::status(201)]);
    c.batch_execute("INSERT INTO users VALUES (1, 'ann')").unwrap();
    assert!(wait_until(LONG, || jobs_left(&mut c) == 0));
    let reqs = r.requests_for("/users/1");
    assert_eq!(reqs.len(), 2);
    assert!(reqs[1].at - reqs[0].at >= Duration::from_millis(900));
}

#[test]
fn a_client_error_kills_the_job_and_retry_delivers_it() {
    let Setup { db: _db, r, mut c, .. } = started("");
    r.script("/users/1", [Action::with_body(400, "name is required")]);
    c.batch_execute("INSERT INTO users VALUES (1, 'ann')").unwrap();
    assert!(wait_until(LONG, || job_row(&mut c, "1").is_some_and(|j| j.0 == "dead")));
    let (_, attempts, status, error) = job_row(&mut c, "1").unwrap();
    assert_eq!((attempts, status), (1, Some(400)));
    assert!(error.unwrap().contains("name is required"));
    let dead: i64 = c.query_one("SELECT dead FROM outbox.stats() WHERE kind = 'user'", &[]).unwrap().get(0);
    assert_eq!(dead, 1);
    let job: i64 = c.query_one("SELECT job_id FROM outbox.jobs", &[]).unwrap().get(0);
    c.execute("SELECT outbox.retry($1)", &[&job]).unwrap();
    assert!(wait_until(LONG, || jobs_left(&mut c) == 0));
    assert_eq!(r.requests_for("/users/1").len(), 2);
}

#[test]
fn max_attempts_then_dead() {
    let Setup { db: _db, r, mut c, .. } = started(", max_attempts => 3");
    r.set_fallback(Some(Action::status(502)));
    c.batch_execute("INSERT INTO users VALUES (1, 'ann')").unwrap();
    assert!(wait_until(LONG, || job_row(&mut c, "1").is_some_and(|j| j.0 == "dead")));
    assert_eq!(job_row(&mut c, "1").unwrap().1, 3);
    assert_eq!(r.requests_for("/users/1").len(), 3);
}

#[test]
fn a_timeout_is_retried() {
    let Setup { db: _db, r, mut c, .. } = started(", timeout => '300 ms'");
    r.script("/users/1", [Action::delayed(201, Duration::from_secs(3)), Action::status(201)]);
    c.batch_execute("INSERT INTO users VALUES (1, 'ann')").unwrap();
    assert!(wait_until(LONG, || r.requests_for("/users/1").len() >= 2 && jobs_left(&mut c) == 0));
    let reqs = r.requests_for("/users/1");
    assert!(reqs[1].at - reqs[0].at < Duration::from_secs(2), "retried after the timeout, not the slow answer");
}

#[test]
fn an_unreachable_host_is_retried_and_the_worker_lives() {
    let db = Cluster::start();
    let mut c = db.client();
    let closed = outbox_e2e::cluster::free_port();
    c.batch_execute(&format!("SELECT outbox.register('gone', 'http://127.0.0.1:{closed}/{{id}}')")).unwrap();
    let pid = db.wait_for_worker();
    c.batch_execute("SELECT outbox.enqueue('gone', 'x')").unwrap();
    // Attempted twice and waiting for a third: retried, not dead. (While an
    // attempt is in flight the job reads 'running'.)
    assert!(wait_until(LONG, || job_row(&mut c, "x").is_some_and(|j| j.1 >= 2 && j.0 == "pending")));
    let (_, _, status, error) = job_row(&mut c, "x").unwrap();
    assert_eq!(status, None);
    assert!(error.is_some_and(|e| !e.is_empty()));
    assert_eq!(db.worker_pid(), Some(pid), "the worker did not restart");
}

#[test]
fn a_raising_body_function_fails_only_its_job() {
    let db = Cluster::start();
    let r = Receiver::start();
    let mut c = db.client();
    c.batch_execute(&format!(
        "CREATE FUNCTION picky(id text) RETURNS json LANGUAGE plpgsql AS $$
         BEGIN IF id = 'bad' THEN RAISE EXCEPTION 'no body for %', id; END IF;
               RETURN json_build_object('id', id); END $$;
         CREATE ROLE reader NOLOGIN;
         SELECT outbox.register('p', '{}', body => 'picky(text)', run_as => 'reader');",
        r.url("/p/{id}")
    ))
    .unwrap();
    let pid = db.wait_for_worker();
    c.batch_execute("SELECT outbox.enqueue('p', 'bad'); SELECT outbox.enqueue('p', 'good');").unwrap();
    assert!(wait_until(LONG, || {
        r.requests_for("/p/good").len() == 1 && job_row(&mut c, "bad").is_some_and(|j| j.0 == "pending" && j.3.is_some())
    }));
    let (_, _, _, error) = job_row(&mut c, "bad").unwrap();
    assert!(error.unwrap().contains("no body for bad"));
    assert!(r.requests_for("/p/bad").is_empty());
    assert_eq!(db.worker_pid(), Some(pid));
}

/// A body function stuck behind a lock (a migration's ALTER TABLE; here a
/// LOCK TABLE) fails its kind's jobs for a retry; other kinds go on.
#[test]
fn a_body_function_waiting_for_a_lock_holds_up_only_its_kind() {
    let Setup { db, r, mut c, pid } = started("");
    c.batch_execute(&format!("SELECT outbox.register('other', '{}')", r.url("/other/{id}"))).unwrap();
    c.batch_execute("INSERT INTO users VALUES (1, 'a')").unwrap();
    assert!(wait_until(LONG, || r.count() == 1));
    let mut migration = db.client();
    migration.batch_execute("BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE;").unwrap();
    // One transaction: both jobs are claimed in one batch.
    c.batch_execute("BEGIN; SELECT outbox.enqueue('user', 1); SELECT outbox.enqueue('other', 'x'); COMMIT;").unwrap();
    assert!(wait_until(LONG, || r.requests_for("/other/x").len() == 1), "the other kind is delivered meanwhile");
    assert!(wait_until(LONG, || job_row(&mut c, "1").is_some_and(|j| j.3.is_some())));
    let (state, _, _, error) = job_row(&mut c, "1").unwrap();
    assert_eq!(state, "pending");
    assert!(error.as_deref().unwrap().contains("longer than the kind's render_timeout"), "{error:?}");
    migration.batch_execute("COMMIT").unwrap();
    assert!(wait_until(LONG, || r.requests_for("/users/1").len() == 2 && jobs_left(&mut c) == 0));
    assert_eq!(db.worker_pid(), Some(pid));
}

#[test]
fn a_deleted_record_is_sent_as_delete_or_skipped() {
    let Setup { db: _db, r, mut c, .. } = started("");
    r.script("/users/1", [Action::status(404)]);
    c.batch_execute("SELECT outbox.pause('user'); INSERT INTO users VALUES (1, 'a'); DELETE FROM users; SELECT outbox.resume('user');")
        .unwrap();
    assert!(wait_until(LONG, || jobs_left(&mut c) == 0));
    let reqs = r.requests_for("/users/1");
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].method, "DELETE");
    assert!(reqs[0].body.is_empty());
    // on_missing = 'skip': nothing is sent, the job is done.
    c.batch_execute("SELECT outbox.register('user', 'http://127.0.0.1:9/{id}', body => 'user_body(text)', run_as => 'reader', on_missing => 'skip')").unwrap();
    c.batch_execute("SELECT outbox.enqueue('user', 2)").unwrap();
    assert!(wait_until(LONG, || jobs_left(&mut c) == 0));
    assert_eq!(r.count(), 1);
}

#[test]
fn a_paused_kind_waits_until_resumed() {
    let Setup { db: _db, r, mut c, .. } = started("");
    c.batch_execute("SELECT outbox.pause('user'); INSERT INTO users VALUES (1, 'a');").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(r.count(), 0);
    assert_eq!(jobs_left(&mut c), 1);
    c.batch_execute("SELECT outbox.resume('user')").unwrap();
    assert!(wait_until(LONG, || jobs_left(&mut c) == 0 && r.count() == 1));
}

/// Enqueueing a record that has a fresh job coalesces into that job at
/// every isolation level. An enqueue reads no job, so a fresh job committed
/// after a repeatable-read transaction's snapshot is no conflict either:
/// both changes end in one job.
#[test]
fn enqueue_coalesces_at_every_isolation_level() {
    use postgres::IsolationLevel::{ReadCommitted, RepeatableRead, Serializable};
    let Setup { db, r: _r, mut c, .. } = started("");
    c.batch_execute("SELECT outbox.pause('user')").unwrap();
    c.batch_execute("SELECT outbox.enqueue('user', 7)").unwrap();
    let absorbed = |c: &mut Client| -> bool { c.query_one("SELECT NOT EXISTS (SELECT FROM outbox.inbox)", &[]).unwrap().get(0) };
    let job_of = |c: &mut Client, id: &str| -> Vec<i64> {
        assert!(wait_until(LONG, || absorbed(c)), "the inbox was not absorbed");
        c.query("SELECT job_id FROM outbox.queue WHERE id = $1", &[&id]).unwrap().iter().map(|r| r.get(0)).collect()
    };
    let first = job_of(&mut c, "7");
    assert_eq!(first.len(), 1);
    for level in [ReadCommitted, RepeatableRead, Serializable] {
        let mut t = c.build_transaction().isolation_level(level).start().unwrap();
        t.batch_execute("SELECT outbox.enqueue('user', 7)").unwrap();
        t.commit().unwrap();
        assert_eq!(job_of(&mut c, "7"), first, "{level:?}");
    }
    let mut other = db.client();
    let mut t = c.build_transaction().isolation_level(RepeatableRead).start().unwrap();
    t.query_one("SELECT 1", &[]).unwrap();
    other.query_one("SELECT outbox.enqueue('user', 8)", &[]).unwrap();
    assert_eq!(job_of(&mut other, "8").len(), 1);
    t.query_one("SELECT outbox.enqueue('user', 8)", &[]).unwrap();
    t.commit().unwrap();
    assert_eq!(job_of(&mut c, "8").len(), 1, "one job for both changes");
    assert_eq!(jobs_left(&mut c), 2);
    c.batch_execute("SELECT outbox.resume('user')").unwrap();
    assert!(wait_until(LONG, || jobs_left(&mut c) == 0));
}

#[test]
fn kill_9_of_the_worker_mid_batch_loses_nothing() {
    let Setup { db, r, mut c, pid } = started("");
    r.set_fallback(Some(Action::delayed(201, Duration::from_millis(20))));
    c.batch_execute("INSERT INTO users SELECT g, 'n' || g FROM generate_series(1, 500) g").unwrap();
    assert!(wait_until(LONG, || r.count() >= 50));
    // SAFETY: signalling a process of the test's own cluster.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(wait_until(Duration::from_secs(60), || db.worker_pid().is_some_and(|p| p != pid)));
    assert!(wait_until(Duration::from_secs(60), || db.try_client().is_some_and(|mut c| jobs_left(&mut c) == 0)));
    assert_eq!(r.distinct_paths(), 500, "every record delivered");
}

#[test]
fn restarts_with_a_backlog_lose_nothing_and_leave_nothing_running() {
    let Setup { mut db, r, mut c, .. } = started("");
    r.set_fallback(Some(Action::delayed(201, Duration::from_millis(10))));
    c.batch_execute("INSERT INTO users SELECT g, 'n' || g FROM generate_series(1, 600) g").unwrap();
    drop(c);
    assert!(wait_until(LONG, || r.count() >= 30));
    db.restart("fast");
    assert!(wait_until(LONG, || r.count() >= 200));
    db.restart("immediate");
    let mut c = db.client();
    // All drain, so none is stuck in 'running'.
    assert!(wait_until(Duration::from_secs(60), || jobs_left(&mut c) == 0));
    assert_eq!(r.distinct_paths(), 600);
    assert!(db.log().contains("pending again"), "recovery of running jobs is logged");
}

/// With `outbox.database` set: the launcher waits for the database, a
/// worker that finds no extension says so once and exits, `CREATE
/// EXTENSION` starts one, and `DROP EXTENSION` stops it until the next.
#[test]
fn the_worker_waits_for_the_database_and_the_extension() {
    let opts = Options { create_extension: false, ..Default::default() };
    let db = Cluster::start_with(opts);
    let r = Receiver::start();
    std::thread::sleep(Duration::from_millis(2500));
    let log = db.log();
    assert_eq!(log.matches("does not exist yet").count(), 1, "said once:\n{log}");
    db.admin("postgres").batch_execute("CREATE DATABASE outbox_e2e").unwrap();
    let not_installed = || db.log().matches("is not installed in database \"outbox_e2e\"").count();
    assert!(wait_until(LONG, || not_installed() == 1));
    // Three launcher rounds: no worker is started there again.
    std::thread::sleep(Duration::from_millis(3000));
    assert_eq!(not_installed(), 1);
    assert_eq!(db.worker_pid(), None);
    let mut c = db.client();
    c.batch_execute(&format!("CREATE EXTENSION outbox; SELECT outbox.register('k', '{}')", r.url("/k/{id}"))).unwrap();
    c.batch_execute("SELECT outbox.enqueue('k', 'a')").unwrap();
    assert!(wait_until(LONG, || r.count() == 1));
    // DROP EXTENSION stops the worker, without a crash, and none starts.
    assert!(db.worker_pid().is_some());
    c.batch_execute("DROP EXTENSION outbox").unwrap();
    assert!(wait_until(LONG, || db.worker_pid().is_none()));
    assert_eq!(not_installed(), 2, "said when the worker found it gone");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(db.worker_pid(), None);
    c.batch_execute(&format!("CREATE EXTENSION outbox; SELECT outbox.register('k', '{}')", r.url("/k/{id}"))).unwrap();
    c.batch_execute("SELECT outbox.enqueue('k', 'b')").unwrap();
    assert!(wait_until(LONG, || r.count() == 2));
    assert!(!db.log().contains("terminated by signal"), "no crash");
}

/// A session remembers where the inbox is from one transaction to the next:
/// after the extension is dropped and created again under it, its tracked
/// changes go to the new inbox, and none is lost or fails.
#[test]
fn a_session_records_changes_into_the_inbox_of_an_extension_created_again() {
    let db = Cluster::start();
    let r = Receiver::start();
    let mut c = db.client();
    let setup = format!(
        "SELECT outbox.register('item', '{}'); SELECT outbox.track('items', 'item');",
        r.url("/item/{id}")
    );
    c.batch_execute(&format!("CREATE TABLE items (id int PRIMARY KEY, v int); {setup}")).unwrap();
    db.wait_for_worker();
    c.batch_execute("INSERT INTO items VALUES (1, 0)").unwrap();
    assert!(wait_until(LONG, || r.requests_for("/item/1").len() == 1));
    // The same session: the trigger goes with the extension (CASCADE).
    c.batch_execute(&format!("DROP EXTENSION outbox CASCADE; CREATE EXTENSION outbox; {setup}")).unwrap();
    c.batch_execute("INSERT INTO items VALUES (2, 0); UPDATE items SET v = 1 WHERE id = 1").unwrap();
    assert!(wait_until(LONG, || r.requests_for("/item/2").len() == 1 && r.requests_for("/item/1").len() == 2));
    assert_eq!(r.count(), 3);
}

/// Without the worker stepping aside, each of these statements would wait
/// five seconds for it to leave the database, then fail.
#[test]
fn the_served_database_can_be_copied_renamed_moved_and_dropped_while_the_worker_runs() {
    let Setup { db, r, c, pid } = started("");
    drop(c);
    let mut admin = db.admin("postgres");
    let worker = |admin: &mut Client| -> Option<i32> {
        admin
            .query_opt("SELECT pid FROM pg_stat_activity WHERE backend_type = 'outbox worker'", &[])
            .unwrap()
            .map(|r| r.get(0))
    };
    // Not the owner: the statement fails as it would anyway, and the worker
    // is left alone.
    admin.batch_execute("CREATE ROLE stranger CREATEDB; SET ROLE stranger").unwrap();
    let err = admin.batch_execute("DROP DATABASE outbox_e2e").unwrap_err();
    assert!(format!("{err:?}").contains("must be owner"), "{err:?}");
    admin.batch_execute("RESET ROLE").unwrap();
    // In a transaction block, DROP DATABASE fails before it waits for
    // anyone: the worker is left alone too.
    admin.batch_execute("BEGIN").unwrap();
    let err = admin.batch_execute("DROP DATABASE outbox_e2e").unwrap_err();
    assert!(format!("{err:?}").contains("cannot run inside a transaction block"), "{err:?}");
    admin.batch_execute("ROLLBACK").unwrap();
    assert_eq!(worker(&mut admin), Some(pid));

    admin.batch_execute("CREATE DATABASE outbox_copy TEMPLATE outbox_e2e").unwrap();
    let log = db.log();
    assert!(log.contains("stopping the worker of database \"outbox_e2e\" for CREATE DATABASE ... TEMPLATE"), "{log}");
    let again = db.wait_for_worker();
    assert_ne!(again, pid, "a new worker");
    // Delivers row `n` and leaves the database (a session in it would hold
    // up the next statement).
    let delivers = |n: usize| {
        let mut c = db.client();
        c.batch_execute(&format!("INSERT INTO users VALUES ({n}, 'x')")).unwrap();
        assert!(wait_until(LONG, || r.count() == n && jobs_left(&mut c) == 0));
    };
    delivers(1);

    // Renamed away (a RENAME may run in a transaction block), the worker
    // waits for its database, as at startup. The launcher may already have
    // said so once at cluster start, before the database was created.
    let missing = || db.log().matches("does not exist yet").count();
    let said = missing();
    admin.batch_execute("BEGIN; ALTER DATABASE outbox_e2e RENAME TO outbox_elsewhere; COMMIT").unwrap();
    assert!(wait_until(LONG, || missing() == said + 1));
    admin.batch_execute("ALTER DATABASE outbox_elsewhere RENAME TO outbox_e2e").unwrap();
    db.wait_for_worker();
    delivers(2);

    // Moved to another tablespace: its files are copied while nobody is in.
    let space = db.dir.join("space");
    outbox_e2e::cluster::server_dir(&space);
    admin.batch_execute(&format!("CREATE TABLESPACE space LOCATION '{}'", space.display())).unwrap();
    admin.batch_execute("ALTER DATABASE outbox_e2e SET TABLESPACE space").unwrap();
    db.wait_for_worker();
    delivers(3);

    admin.batch_execute("DROP DATABASE outbox_e2e").unwrap();
    assert!(wait_until(LONG, || missing() == said + 2));
    assert_eq!(worker(&mut admin), None);
    // The copy was taken while the worker was stopped, and is whole.
    let mut copy = db.admin("outbox_copy");
    assert_eq!(copy.query_one("SELECT count(*) FROM outbox.kinds", &[]).unwrap().get::<_, i64>(0), 1);
}

/// A database closed to connections (`ALLOW_CONNECTIONS false`, say for
/// maintenance) is waited for, said once, instead of a worker failing to
/// connect every second.
#[test]
fn a_database_closed_to_connections_is_waited_for_quietly() {
    let Setup { db, r, c, pid } = started("");
    drop(c);
    let mut admin = db.admin("postgres");
    admin.batch_execute("ALTER DATABASE outbox_e2e ALLOW_CONNECTIONS false").unwrap();
    admin.execute("SELECT pg_terminate_backend($1)", &[&pid]).unwrap();
    assert!(wait_until(LONG, || db.log().contains("does not allow connections")));
    // Three launcher rounds.
    std::thread::sleep(Duration::from_millis(3000));
    let log = db.log();
    assert_eq!(log.matches("does not allow connections").count(), 1, "{log}");
    assert!(!log.contains("is not currently accepting connections"), "no worker tried to connect: {log}");
    admin.batch_execute("ALTER DATABASE outbox_e2e ALLOW_CONNECTIONS true").unwrap();
    db.wait_for_worker();
    db.client().batch_execute("INSERT INTO users VALUES (1, 'a')").unwrap();
    assert!(wait_until(LONG, || r.count() == 1));
}

/// `outbox.role`: the worker connects as it. A role that is missing, can't
/// log in, may not connect to the database, or lacks privileges on the
/// extension's tables is waited for, each said once, instead of a worker
/// failing every second. The grants the
/// README lists are enough.
#[test]
fn the_worker_connects_as_outbox_role_once_it_can() {
    let mut opts = Options::default();
    opts.conf.push("outbox.role = 'outbox_worker'".into());
    let db = Cluster::start_with(opts);
    let r = Receiver::start();
    let mut c = db.client();
    users(&mut c, &r, "");
    c.batch_execute("INSERT INTO users VALUES (1, 'a')").unwrap();
    let said_once = |what: &str| {
        assert!(wait_until(LONG, || db.log().contains(what)), "{what}");
        // Three launcher rounds, or worker turns.
        std::thread::sleep(Duration::from_millis(3000));
        let log = db.log();
        assert_eq!(log.matches(what).count(), 1, "{log}");
        assert!(!log.contains("FATAL:  role") && !log.contains("permission denied"), "nothing failed: {log}");
    };
    said_once("role \"outbox_worker\" (outbox.role) does not exist");
    c.batch_execute("CREATE ROLE outbox_worker NOLOGIN").unwrap();
    said_once("(outbox.role) cannot log in");
    c.batch_execute("REVOKE CONNECT ON DATABASE outbox_e2e FROM PUBLIC; ALTER ROLE outbox_worker LOGIN").unwrap();
    said_once("(outbox.role) may not connect to database \"outbox_e2e\"");
    c.batch_execute("GRANT CONNECT ON DATABASE outbox_e2e TO outbox_worker").unwrap();
    said_once("its role may not DELETE on outbox.inbox, INSERT on outbox.inbox, SELECT on outbox.inbox, SELECT on outbox.kind_stats");
    assert_eq!(db.log().matches("outbox worker started").count(), 1, "the same worker waits");
    let state: String = c.query_one("SELECT state FROM outbox.worker_status()", &[]).unwrap().get(0);
    assert_eq!(state, "waiting for privileges");
    c.batch_execute(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON outbox.queue TO outbox_worker;
         GRANT SELECT, INSERT, DELETE ON outbox.inbox TO outbox_worker;
         GRANT SELECT ON outbox.kinds TO outbox_worker;
         GRANT SELECT, UPDATE ON outbox.kind_stats TO outbox_worker;
         GRANT INSERT ON outbox.rejected TO outbox_worker;",
    )
    .unwrap();
    assert!(wait_until(LONG, || r.count() == 1 && jobs_left(&mut c) == 0));
    assert!(db.log().contains("its role has the privileges it needs"));
    let user: String = c.query_one("SELECT usename::text FROM pg_stat_activity WHERE backend_type = 'outbox worker'", &[]).unwrap().get(0);
    assert_eq!(user, "outbox_worker");
    assert_eq!(r.requests_for("/users/1")[0].json()["name"], "a", "the body function ran, as its run_as");
}

/// A database whose sessions default to serializable, read-only
/// transactions (as a cautious DBA may set it, or a role's settings) keeps
/// its deliveries: the worker's own session is read-write READ COMMITTED.
/// Without that, every turn failed and the worker restarted over and over.
#[test]
fn serializable_read_only_defaults_do_not_stop_the_worker() {
    let Setup { db, r, mut c, pid } = started("");
    c.batch_execute(
        "ALTER DATABASE outbox_e2e SET default_transaction_isolation = 'serializable';
         ALTER DATABASE outbox_e2e SET default_transaction_read_only = on;",
    )
    .unwrap();
    c.execute("SELECT pg_terminate_backend($1)", &[&pid]).unwrap();
    // The old worker shows until it has exited.
    assert!(wait_until(LONG, || db.worker_pid().is_some_and(|p| p != pid)), "a new worker");
    let worker = db.wait_for_worker();
    assert_ne!(worker, pid);
    // This session connected before the ALTERs: it still writes.
    c.batch_execute("INSERT INTO users SELECT g, 'n' FROM generate_series(1, 50) g").unwrap();
    c.batch_execute("UPDATE users SET name = 'm' WHERE id <= 10").unwrap();
    assert!(wait_until(LONG, || jobs_left(&mut c) == 0 && r.distinct_paths() == 50));
    assert_eq!(db.worker_pid(), Some(worker), "no restart");
    assert!(!db.log().contains("read-only transaction"), "{}", db.log());
}

/// A backup taken while a delivery is in flight, restored into a new
/// database in sections (the worker is already running there when the data
/// arrives), loses nothing: kinds, jobs and job ids come back, and the job
/// that was `running` when dumped is delivered.
#[test]
fn pg_dump_and_pg_restore_keep_kinds_and_jobs() {
    let Setup { db, r, mut c, .. } = started("");
    c.batch_execute(&format!("SELECT outbox.register('other', '{}'); SELECT outbox.pause('other')", r.url("/other/{id}"))).unwrap();
    // Held by the receiver: still running when dumped.
    r.set_fallback(Some(Action::delayed(201, Duration::from_secs(600))));
    c.batch_execute("INSERT INTO users VALUES (1, 'held'); SELECT outbox.enqueue('other', 'x')").unwrap();
    assert!(wait_until(LONG, || job_row(&mut c, "1").is_some_and(|j| j.0 == "running")));
    let dump = db.dir.join("outbox_e2e.dump");
    let dump = dump.to_str().unwrap();
    db.tool("pg_dump", &["-Fc", "-f", dump, "outbox_e2e"]);
    drop(c);

    let mut admin = db.admin("postgres");
    admin.batch_execute("DROP DATABASE outbox_e2e").unwrap();
    admin.batch_execute("CREATE DATABASE outbox_e2e").unwrap();
    r.set_fallback(None);
    db.tool("pg_restore", &["--section=pre-data", "-d", "outbox_e2e", dump]);
    db.wait_for_worker();
    db.tool("pg_restore", &["--section=data", "-d", "outbox_e2e", dump]);
    db.tool("pg_restore", &["--section=post-data", "-d", "outbox_e2e", dump]);

    let mut c = db.client();
    let kinds: i64 = c.query_one("SELECT count(*) FROM outbox.kinds", &[]).unwrap().get(0);
    assert_eq!(kinds, 2);
    assert!(wait_until(LONG, || r.requests_for("/users/1").iter().any(|q| q.json()["name"] == "held") && job_row(&mut c, "1").is_none()));
    assert_eq!(job_row(&mut c, "x").map(|j| j.0), Some("pending".to_string()), "the paused kind's job is kept");
    // New jobs take ids after the restored ones.
    c.batch_execute("INSERT INTO users VALUES (2, 'new')").unwrap();
    assert!(wait_until(LONG, || r.requests_for("/users/2").len() == 1 && job_row(&mut c, "2").is_none()));
}

#[test]
fn commit_wakes_the_worker_without_polling() {
    // A poll interval of a minute: only the commit wake-up can explain a
    // prompt delivery.
    let mut opts = Options::default();
    opts.conf.push("outbox.poll_interval = '60s'".into());
    let Setup { db: _db, r, mut c, .. } = started_with(opts, "");
    std::thread::sleep(Duration::from_millis(500));
    for i in 1..=5 {
        c.batch_execute(&format!("INSERT INTO users VALUES ({i}, 'x')")).unwrap();
        assert!(wait_until(Duration::from_secs(5), || r.count() == i), "delivery {i} came late");
    }
}

#[test]
fn sighup_reloads_settings_and_response_reads_are_bounded() {
    let Setup { db, r, mut c, pid } = started("");
    let long = "x".repeat(5000);
    r.script("/users/1", [Action::with_body(400, &long)]);
    r.script("/users/2", [Action::with_body(400, &long)]);
    c.batch_execute("INSERT INTO users VALUES (1, 'a')").unwrap();
    assert!(wait_until(LONG, || job_row(&mut c, "1").is_some_and(|j| j.0 == "dead")));
    let excerpt = job_row(&mut c, "1").unwrap().3.unwrap();
    assert!(excerpt.len() < 600, "the kept excerpt is bounded: {} bytes", excerpt.len());
    c.batch_execute("ALTER SYSTEM SET outbox.max_response_bytes = 10").unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    c.batch_execute("INSERT INTO users VALUES (2, 'b')").unwrap();
    assert!(wait_until(LONG, || job_row(&mut c, "2").is_some_and(|j| j.0 == "dead")));
    assert_eq!(job_row(&mut c, "2").unwrap().3.unwrap(), "HTTP 400: xxxxxxxxxx");
    assert_eq!(db.worker_pid(), Some(pid), "reloaded in place");
}

#[test]
fn a_bulk_statement_on_a_tracked_table_delivers_every_row() {
    let Setup { db: _db, r, mut c, .. } = started("");
    c.batch_execute("INSERT INTO users SELECT g, 'n' FROM generate_series(1, 20000) g").unwrap();
    // More rows than one turn absorbs: the inbox drains over several turns.
    assert!(wait_until(Duration::from_secs(120), || jobs_left(&mut c) == 0 && r.count() >= 20000));
    assert_eq!(r.distinct_paths(), 20000);
    c.batch_execute("UPDATE users SET name = 'm' WHERE id % 2 = 0").unwrap();
    assert!(wait_until(Duration::from_secs(120), || jobs_left(&mut c) == 0 && r.count() >= 30000));
    let mut updated: Vec<String> = r.requests().into_iter().filter(|q| q.json()["name"] == "m").map(|q| q.path).collect();
    updated.sort();
    updated.dedup();
    assert_eq!(updated.len(), 10000, "every updated row, with its new state");
}

#[test]
fn truncate_of_a_tracked_table_sends_every_row_as_gone() {
    let Setup { db: _db, r, mut c, .. } = started("");
    c.batch_execute("INSERT INTO users SELECT g, 'n' FROM generate_series(1, 300) g").unwrap();
    assert!(wait_until(LONG, || jobs_left(&mut c) == 0 && r.count() >= 300));
    c.batch_execute("TRUNCATE users").unwrap();
    assert!(wait_until(LONG, || jobs_left(&mut c) == 0 && r.count() >= 600));
    for id in 1..=300 {
        let reqs = r.requests_for(&format!("/users/{id}"));
        assert_eq!(reqs.iter().map(|q| q.method.as_str()).collect::<Vec<_>>(), ["PUT", "DELETE"], "/users/{id}");
    }
}

/// A TRUNCATE that waited for a writer's lock removes that writer's rows
/// too, though its statement's snapshot predates their commit: they are
/// handed over all the same. (No worker here: the inbox keeps what each
/// transaction wrote, one row each.)
#[test]
fn a_truncate_that_waited_for_a_writer_hands_over_its_rows() {
    let db = Cluster::start_with(Options { conf: vec!["outbox.database = 'none'".into()], ..Options::default() });
    let mut c = db.client();
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY);
         SELECT outbox.register('t', 'http://127.0.0.1:9/{id}');
         SELECT outbox.track('t', 't');",
    )
    .unwrap();
    c.batch_execute("BEGIN; INSERT INTO t VALUES (1)").unwrap();
    let mut truncating = db.client();
    let pid: i32 = truncating.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let truncate = std::thread::spawn(move || truncating.batch_execute("TRUNCATE t").unwrap());
    let mut watch = db.client();
    assert!(wait_until(LONG, || {
        watch.query_one("SELECT EXISTS (SELECT FROM pg_locks WHERE pid = $1 AND NOT granted)", &[&pid]).unwrap().get(0)
    }));
    c.batch_execute("COMMIT").unwrap();
    truncate.join().unwrap();
    let writes: i64 = c.query_one("SELECT count(*) FROM outbox.jobs WHERE id = '1'", &[]).unwrap().get(0);
    assert_eq!(writes, 2, "the insert's change and the TRUNCATE's");
}

#[test]
fn a_dropped_connection_is_retried() {
    let Setup { db: _db, r, mut c, .. } = started("");
    r.script("/users/1", [Action::Drop, Action::status(201)]);
    c.batch_execute("INSERT INTO users VALUES (1, 'a')").unwrap();
    assert!(wait_until(LONG, || jobs_left(&mut c) == 0));
    assert_eq!(r.requests_for("/users/1").len(), 2);
}

/// A transaction that changes a record and enqueues it, still open while
/// the record's pending job is delivered: its change is in nobody's job yet
/// (the inbox row it wrote is not committed), so the job carries the old
/// state and takes nothing of the open transaction's with it. Its commit
/// then makes a job of its own, delivered with the new state.
#[test]
fn an_open_transactions_enqueue_is_delivered_after_its_commit() {
    let Setup { db, r, mut c, .. } = started("");
    c.batch_execute("INSERT INTO users VALUES (1, 'old')").unwrap();
    assert!(wait_until(LONG, || r.count() == 1));
    // A pending job for record 1 while the kind is paused.
    c.batch_execute("SELECT outbox.pause('user'); SELECT outbox.enqueue('user', 1);").unwrap();
    let mut t = db.client();
    t.batch_execute("BEGIN; UPDATE users SET name = 'new' WHERE id = 1; SELECT outbox.enqueue('user', 1);").unwrap();
    c.batch_execute("SELECT outbox.resume('user')").unwrap();
    assert!(wait_until(LONG, || r.count() == 2 && jobs_left(&mut c) == 0), "the pending job is not held up");
    assert_eq!(r.requests()[1].json()["name"], "old", "the state committed when it was sent");
    t.batch_execute("COMMIT").unwrap();
    assert!(wait_until(LONG, || r.count() == 3 && jobs_left(&mut c) == 0));
    assert_eq!(r.requests()[2].json()["name"], "new");
}

/// A change to a record whose fresh job the worker made (and so knows
/// where it is) while an open transaction deletes that job: the change must
/// not coalesce into the job being deleted. Once the delete commits, the
/// change gets a job of its own and is delivered.
#[test]
fn a_change_is_not_coalesced_into_a_fresh_job_an_open_transaction_deletes() {
    let Setup { db, r, mut c, .. } = started("");
    c.batch_execute("SELECT outbox.pause('user'); INSERT INTO users VALUES (1, 'old');").unwrap();
    let queued = |c: &mut Client| c.query_one("SELECT count(*) FROM outbox.queue WHERE id = '1'", &[]).unwrap().get::<_, i64>(0);
    assert!(wait_until(LONG, || queued(&mut c) == 1), "the worker made record 1's fresh job");
    let mut t = db.client();
    t.batch_execute("BEGIN; DELETE FROM outbox.queue WHERE id = '1';").unwrap();
    c.batch_execute("UPDATE users SET name = 'new' WHERE id = 1").unwrap();
    // The worker meets the job while the delete is open.
    std::thread::sleep(Duration::from_millis(1000));
    t.batch_execute("COMMIT").unwrap();
    c.batch_execute("SELECT outbox.resume('user')").unwrap();
    assert!(wait_until(LONG, || jobs_left(&mut c) == 0 && r.count() == 1), "the change was delivered");
    assert_eq!(r.requests()[0].json()["name"], "new");
}

/// As above, after the worker has met the job several times: another
/// session's DELETE of the job, committed or still open, is seen by the next
/// change, which gets a job of its own.
#[test]
fn a_change_is_not_coalesced_into_a_fresh_job_met_before_that_another_session_deletes() {
    let Setup { db, r, mut c, .. } = started("");
    c.batch_execute("SELECT outbox.pause('user'); INSERT INTO users VALUES (1, 'old'), (2, 'old');").unwrap();
    let queued = |c: &mut Client| c.query_one("SELECT count(*) FROM outbox.queue", &[]).unwrap().get::<_, i64>(0);
    let inbox_empty = |c: &mut Client| c.query_one("SELECT NOT EXISTS (SELECT FROM outbox.inbox)", &[]).unwrap().get::<_, bool>(0);
    assert!(wait_until(LONG, || queued(&mut c) == 2), "the worker made both records' fresh jobs");
    // Changes that coalesce into both jobs, one absorb after another.
    for name in ["b", "c", "d"] {
        c.batch_execute(&format!("UPDATE users SET name = '{name}'")).unwrap();
        assert!(wait_until(LONG, || inbox_empty(&mut c)));
    }
    assert_eq!(queued(&mut c), 2, "the changes coalesced");
    let mut t = db.client();
    // Record 1: deleted and committed before the change.
    t.batch_execute("DELETE FROM outbox.queue WHERE id = '1'").unwrap();
    c.batch_execute("UPDATE users SET name = 'new' WHERE id = 1").unwrap();
    // Record 2: deleted by a transaction still open when the worker meets it.
    t.batch_execute("BEGIN; DELETE FROM outbox.queue WHERE id = '2';").unwrap();
    c.batch_execute("UPDATE users SET name = 'new' WHERE id = 2").unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    t.batch_execute("COMMIT").unwrap();
    c.batch_execute("SELECT outbox.resume('user')").unwrap();
    assert!(wait_until(LONG, || jobs_left(&mut c) == 0 && r.count() == 2), "both changes were delivered");
    for path in ["/users/1", "/users/2"] {
        assert_eq!(r.requests_for(path).len(), 1, "{path}");
        assert_eq!(r.requests_for(path)[0].json()["name"], "new", "{path}");
    }
}

/// An open transaction that enqueued a record, while tracked changes of it
/// and of other records commit: nothing waits for it. Its enqueue is an
/// uncommitted inbox row, which the worker can't see; the committed changes
/// are delivered meanwhile, and its own after its commit.
#[test]
fn an_open_transaction_s_enqueue_does_not_hold_up_the_inbox() {
    let Setup { db, r, mut c, pid } = started("");
    let mut t = db.client();
    t.batch_execute("BEGIN; SELECT outbox.enqueue('user', 1);").unwrap();
    c.batch_execute("INSERT INTO users VALUES (1, 'a')").unwrap();
    c.batch_execute("INSERT INTO users SELECT g, 'b' FROM generate_series(2, 50) g").unwrap();
    assert!(wait_until(LONG, || r.distinct_paths() == 50), "records 1..50 are delivered meanwhile");
    c.batch_execute("UPDATE users SET name = 'c' WHERE id = 2").unwrap();
    assert!(wait_until(LONG, || r.requests_for("/users/2").len() == 2));
    assert_eq!(r.requests_for("/users/1").len(), 1);
    t.batch_execute("COMMIT").unwrap();
    assert!(wait_until(LONG, || jobs_left(&mut c) == 0 && r.requests_for("/users/1").len() == 2));
    assert_eq!(r.requests_for("/users/1").last().unwrap().json()["name"], "a");
    assert_eq!(db.worker_pid(), Some(pid));
}

#[test]
fn a_prepared_transaction_is_delivered_after_commit_prepared_only() {
    // No commit callback runs for COMMIT PREPARED, so it is the worker's
    // periodic look at the inbox (and the poll) that finds these rows.
    let mut opts = Options::default();
    opts.conf.push("max_prepared_transactions = 2".into());
    let Setup { db: _db, r, mut c, .. } = started_with(opts, "");
    c.batch_execute("BEGIN; INSERT INTO users VALUES (1, 'kept'); PREPARE TRANSACTION 'keep'").unwrap();
    c.batch_execute("BEGIN; INSERT INTO users VALUES (2, 'dropped'); PREPARE TRANSACTION 'drop'").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(r.count(), 0, "a prepared, uncommitted change was delivered");
    c.batch_execute("COMMIT PREPARED 'keep'").unwrap();
    c.batch_execute("ROLLBACK PREPARED 'drop'").unwrap();
    assert!(wait_until(LONG, || r.count() >= 1 && jobs_left(&mut c) == 0), "the committed prepared change was not delivered");
    std::thread::sleep(Duration::from_millis(1500));
    let paths: Vec<String> = r.requests().into_iter().map(|q| q.path).collect();
    assert_eq!(paths, vec!["/users/1".to_string()]);
    assert_eq!(r.requests()[0].json()["name"], "kept");
}

#[test]
fn copy_into_a_tracked_table_is_visible_at_once_and_delivered() {
    use std::io::Write;
    let Setup { db: _db, r, mut c, .. } = started("");
    let mut t = c.transaction().unwrap();
    let mut w = t.copy_in("COPY users FROM STDIN").unwrap();
    for i in 1..=1000 {
        writeln!(w, "{i}\tcopied").unwrap();
    }
    w.finish().unwrap();
    // COPY has no executor of its own: what its triggers buffered must still
    // reach the inbox when it ends, for the next statement to see.
    let pending: i64 = t.query_one("SELECT count(DISTINCT id) FROM outbox.jobs WHERE kind = 'user'", &[]).unwrap().get(0);
    assert_eq!(pending, 1000);
    t.commit().unwrap();
    assert!(wait_until(Duration::from_secs(60), || jobs_left(&mut c) == 0 && r.count() >= 1000));
    assert_eq!(r.distinct_paths(), 1000);
}

#[test]
fn kind_changes_reach_the_worker_at_once() {
    let Setup { db: _db, r, mut c, .. } = started("");
    c.batch_execute("INSERT INTO users VALUES (1, 'a')").unwrap();
    assert!(wait_until(LONG, || r.count() == 1));
    // The worker keeps the kinds between turns; register() tells it when
    // they change.
    let v2 = r.url("/v2/{id}");
    c.batch_execute(&format!("SELECT outbox.register('user', '{v2}', body => 'user_body(text)', run_as => 'reader', secret => '{SECRET}')"))
        .unwrap();
    c.batch_execute("INSERT INTO users VALUES (2, 'b')").unwrap();
    assert!(wait_until(LONG, || r.count() == 2));
    // A direct UPDATE tells it nothing: the kinds are read again every second.
    let v3 = r.url("/v3/{id}");
    c.batch_execute(&format!("UPDATE outbox.kinds SET url = '{v3}' WHERE kind = 'user'")).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    c.batch_execute("INSERT INTO users VALUES (3, 'c')").unwrap();
    assert!(wait_until(LONG, || r.count() == 3));
    let paths: Vec<String> = r.requests().into_iter().map(|q| q.path).collect();
    assert_eq!(paths, ["/users/1", "/v2/2", "/v3/3"]);
}

#[test]
fn the_worker_reports_its_table_statistics() {
    // Autovacuum only cleans up after the worker if it hears of the rows the
    // worker inserts into the queue and deletes from it and from the inbox.
    let Setup { db: _db, r, mut c, .. } = started("");
    c.batch_execute("INSERT INTO users SELECT g, 'n' FROM generate_series(1, 2000) g").unwrap();
    assert!(wait_until(LONG, || jobs_left(&mut c) == 0 && r.count() >= 2000));
    let counts = |c: &mut Client| -> (i64, i64, i64) {
        let row = c
            .query_one(
                "SELECT q.n_tup_ins, q.n_tup_del, i.n_tup_del
                   FROM pg_stat_user_tables q, pg_stat_user_tables i
                  WHERE q.relid = 'outbox.queue'::regclass AND i.relid = 'outbox.inbox'::regclass",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    // Reported at most once a second, and at the latest by the next idle
    // turn (outbox.poll_interval, 10 s).
    let reported = wait_until(LONG, || {
        let (queue_ins, queue_del, inbox_del) = counts(&mut c);
        queue_ins >= 2000 && queue_del >= 2000 && inbox_del >= 1
    });
    assert!(reported, "queue inserts, queue deletes, inbox deletes: {:?}", counts(&mut c));
}
