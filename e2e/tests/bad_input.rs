//! A bad-input sweep of the public SQL surface: every call fails at call
//! time with a precise SQLSTATE, writes nothing, and loses nothing queued.

use outbox_e2e::cluster::Cluster;
use postgres::Client;

/// A fingerprint of everything outbox stores.
fn state(c: &mut Client) -> String {
    c.query_one(
        "SELECT md5(coalesce((SELECT string_agg(k::text, '|' ORDER BY kind) FROM outbox.kinds k), '') ||
                    coalesce((SELECT string_agg(q::text, '|' ORDER BY job_id) FROM outbox.queue q), '') ||
                    coalesce((SELECT string_agg(i::text, '|' ORDER BY i::text) FROM outbox.inbox i), '') ||
                    coalesce((SELECT string_agg(tgname::text, '|' ORDER BY tgname) FROM pg_trigger WHERE NOT tgisinternal), ''))",
        &[],
    )
    .unwrap()
    .get(0)
}

fn sqlstate(c: &mut Client, sql: &str) -> String {
    match c.batch_execute(sql) {
        Ok(()) => "00000".into(),
        Err(e) => e.code().map(|s| s.code().to_string()).unwrap_or_else(|| format!("no code: {e}")),
    }
}

#[test]
fn bad_input_fails_cleanly_and_loses_nothing() {
    let db = Cluster::start();
    let mut c = db.client();
    c.batch_execute(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text);
         CREATE TABLE canary (x int);
         CREATE FUNCTION good_body(id text) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$;
         CREATE FUNCTION two_args(a text, b text) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$;
         CREATE FUNCTION int_arg(a int) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$;
         CREATE FUNCTION text_ret(a text) RETURNS text LANGUAGE sql AS $$ SELECT a $$;
         CREATE FUNCTION set_ret(a text) RETURNS SETOF jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$;
         CREATE PROCEDURE a_proc(a text) LANGUAGE sql AS $$ SELECT 1 $$;
         CREATE ROLE reader NOLOGIN;
         SELECT outbox.register('user', 'http://127.0.0.1:9/{id}', body => 'good_body(text)', run_as => 'reader');
         SELECT outbox.pause('user');
         SELECT outbox.track('users', 'user');
         INSERT INTO users SELECT g, 'n' FROM generate_series(1, 50) g;
         SELECT outbox.enqueue('user', g) FROM generate_series(100, 149) g;",
    )
    .unwrap();
    // Let the worker move the tracked changes into the queue first, so that
    // only the calls below could change the fingerprint.
    db.wait_for_worker();
    assert!(outbox_e2e::wait_until(std::time::Duration::from_secs(30), || {
        c.query_one("SELECT count(*) FROM outbox.inbox", &[]).unwrap().get::<_, i64>(0) == 0
    }));
    let before = state(&mut c);
    let huge = "x".repeat(1 << 20);
    let cases: Vec<(String, &str)> = vec![
        // NULLs
        ("SELECT outbox.register(NULL, 'http://h/{id}')".into(), "22004"),
        ("SELECT outbox.register('k', NULL)".into(), "22004"),
        ("SELECT outbox.register('k', 'http://h/{id}', timeout => NULL)".into(), "22004"),
        ("SELECT outbox.register('k', 'http://h/{id}', max_attempts => NULL)".into(), "22004"),
        ("SELECT outbox.register('k', 'http://h/{id}', on_missing => NULL)".into(), "22004"),
        ("SELECT outbox.unregister(NULL)".into(), "22004"),
        ("SELECT outbox.pause(NULL)".into(), "22004"),
        ("SELECT outbox.resume(NULL)".into(), "22004"),
        ("SELECT outbox.enqueue(NULL, 1)".into(), "22004"),
        ("SELECT outbox.enqueue('user', NULL::text)".into(), "22004"),
        ("SELECT outbox.track(NULL, 'user')".into(), "22004"),
        ("SELECT outbox.track('users', NULL)".into(), "22004"),
        ("SELECT outbox.untrack(NULL, 'user')".into(), "22004"),
        ("SELECT outbox.retry(NULL)".into(), "22004"),
        ("SELECT outbox.discard(NULL)".into(), "22004"),
        ("SELECT outbox.purge_dead(NULL)".into(), "22004"),
        // Empty and huge strings
        ("SELECT outbox.register('', 'http://h/{id}')".into(), "22023"),
        ("SELECT outbox.register('k', '')".into(), "22023"),
        (format!("SELECT outbox.register('{huge}', 'http://h/{{id}}')"), "22001"),
        (format!("SELECT outbox.register('k', 'http://h/{huge}')"), "22023"),
        ("SELECT outbox.enqueue('', 1)".into(), "22023"),
        ("SELECT outbox.enqueue('user', '')".into(), "22023"),
        (format!("SELECT outbox.enqueue('user', '{huge}')"), "22001"),
        (format!("SELECT outbox.enqueue('{huge}', 1)"), "22001"),
        ("SELECT outbox.pause('')".into(), "22023"),
        // Wrong types
        // An id whose text depends on settings; one of no type at all.
        ("SELECT outbox.enqueue('user', 1.5::float8)".into(), "0A000"),
        ("SELECT outbox.enqueue('user', now())".into(), "0A000"),
        ("SELECT outbox.enqueue('user', ARRAY[1])".into(), "0A000"),
        ("SELECT outbox.enqueue('user', 1, 2, 3)".into(), "42883"),
        ("SELECT outbox.enqueue('user', 1, 'soon')".into(), "22007"),
        ("SELECT outbox.register('k', 'http://h/{id}', headers => 'not json')".into(), "22P02"),
        ("SELECT outbox.register('k', 'http://h/{id}', max_attempts => 'many')".into(), "22P02"),
        ("SELECT outbox.retry('abc')".into(), "22P02"),
        ("SELECT outbox.purge_dead('-1 day')".into(), "22023"),
        // Things that look like SQL injection
        ("SELECT outbox.track('users; DROP TABLE canary', 'user')".into(), "42602"),
        ("SELECT outbox.enqueue('x''); DROP TABLE canary; --', 1)".into(), "42704"),
        ("SELECT outbox.track('users', 'user', id_column => 'id; DROP TABLE canary')".into(), "42703"),
        ("SELECT outbox.track('users', 'user', columns => ARRAY['name\"; DROP TABLE canary; --'])".into(), "42703"),
        ("SELECT outbox.untrack('users', 'nope''; DROP TABLE canary; --')".into(), "42704"),
        // URLs
        ("SELECT outbox.register('k', 'ftp://h/{id}')".into(), "22023"),
        ("SELECT outbox.register('k', 'javascript:alert(1)')".into(), "22023"),
        ("SELECT outbox.register('k', 'http:///{id}')".into(), "22023"),
        ("SELECT outbox.register('k', 'http://h /{id}')".into(), "22023"),
        ("SELECT outbox.register('k', '/relative/{id}')".into(), "22023"),
        ("SELECT outbox.register('k', 'http://h/{secret}')".into(), "22023"),
        // Body functions of the wrong shape
        ("SELECT outbox.register('k', 'http://h/{id}', body => 'two_args(text,text)')".into(), "42P13"),
        ("SELECT outbox.register('k', 'http://h/{id}', body => 'int_arg(int)')".into(), "42P13"),
        ("SELECT outbox.register('k', 'http://h/{id}', body => 'text_ret(text)')".into(), "42P13"),
        ("SELECT outbox.register('k', 'http://h/{id}', body => 'set_ret(text)')".into(), "42P13"),
        ("SELECT outbox.register('k', 'http://h/{id}', body => 'a_proc(text)')".into(), "42P13"),
        ("SELECT outbox.register('k', 'http://h/{id}', body => 'no_such(text)')".into(), "42883"),
        // Unknown things
        ("SELECT outbox.enqueue('nope', 1)".into(), "42704"),
        ("SELECT outbox.unregister('nope')".into(), "42704"),
        ("SELECT outbox.track('users', 'nope')".into(), "42704"),
        ("SELECT outbox.track('no_table', 'user')".into(), "42P01"),
        ("SELECT outbox.retry(999999)".into(), "42704"),
        ("SELECT outbox.discard(999999)".into(), "42704"),
        ("SELECT outbox.retry_dead('nope')".into(), "42704"),
        // Refusals
        ("SELECT outbox.unregister('user')".into(), "2BP01"),
    ];
    let mut wrong = Vec::new();
    for (sql, want) in &cases {
        let got = sqlstate(&mut c, sql);
        if got != *want {
            wrong.push(format!("{}: want {want}, got {got}", &sql[..sql.len().min(100)]));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(state(&mut c), before, "a failed call wrote something");
    let canary: i64 = c.query_one("SELECT count(*) FROM pg_class WHERE relname = 'canary'", &[]).unwrap().get(0);
    assert_eq!(canary, 1);
    let pending: i64 = c.query_one("SELECT count(*) FROM outbox.jobs WHERE state = 'pending'", &[]).unwrap().get(0);
    assert_eq!(pending, 100, "nothing queued was lost");
}

#[test]
fn errors_raised_under_the_statement_hooks_keep_their_fields() {
    // The extension hooks statement end (ExecutorFinish, ProcessUtility);
    // errors raised inside must reach clients as Postgres raised them.
    let db = Cluster::start();
    let mut c = db.client();
    c.batch_execute("CREATE TABLE parent (id int PRIMARY KEY); CREATE TABLE child (pid int REFERENCES parent)").unwrap();
    // A foreign key is checked by an AFTER trigger at the end of the statement.
    let e = c.batch_execute("INSERT INTO child VALUES (1)").unwrap_err();
    let e = e.as_db_error().expect("a server error");
    assert_eq!(e.code().code(), "23503");
    assert_eq!(e.schema(), Some("public"));
    assert_eq!(e.table(), Some("child"));
    assert_eq!(e.constraint(), Some("child_pid_fkey"));
    assert_eq!(e.detail(), Some("Key (pid)=(1) is not present in table \"parent\"."));
    let e = c.batch_execute("DROP TABLE parent").unwrap_err();
    let e = e.as_db_error().expect("a server error");
    assert_eq!(e.code().code(), "2BP01");
    assert_eq!(e.detail(), Some("constraint child_pid_fkey on table child depends on table parent"));
    assert_eq!(e.hint(), Some("Use DROP ... CASCADE to drop the dependent objects too."));
}
