//! Upgrades in place. Version 0.1.0, installed from its script
//! (`sql/outbox--0.1.0.sql`) with jobs in every state and changes still in
//! the inbox, is updated with `ALTER EXTENSION outbox UPDATE`: every job is
//! then delivered as it would have been, and the kinds, secrets and grants
//! are as they were. And the updated schema is exactly a fresh install's,
//! so that no schema change lands without its upgrade script.

use outbox_e2e::cluster::{Cluster, Options, DATABASE};
use outbox_e2e::receiver::{Action, Receiver};
use outbox_e2e::{jobs_left, wait_until};
use postgres::Client;
use std::collections::BTreeSet;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(30);

/// Every object of the extension with its definition and privileges, the
/// indexes, constraints and triggers of its tables, its schema's privileges
/// and the tables pg_dump keeps: what a fresh install and an updated one
/// must agree on. One line each, sorted.
const CATALOG: &str = r#"
SELECT pg_catalog.pg_describe_object(d.classid, d.objid, 0) || ': ' || coalesce(CASE d.classid
    WHEN 'pg_catalog.pg_proc'::pg_catalog.regclass THEN
        (SELECT pg_catalog.pg_get_functiondef(p.oid) || ' acl ' || coalesce(p.proacl::text, '-')
           FROM pg_catalog.pg_proc p WHERE p.oid = d.objid)
    WHEN 'pg_catalog.pg_class'::pg_catalog.regclass THEN
        (SELECT c.relkind::text || ' acl ' || coalesce(c.relacl::text, '-') || ' options ' || coalesce(c.reloptions::text, '-')
                || ' columns ' || coalesce((
                   SELECT pg_catalog.string_agg(a.attname || ' ' || pg_catalog.format_type(a.atttypid, a.atttypmod)
                          || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
                          || coalesce(' default ' || pg_catalog.pg_get_expr(ad.adbin, ad.adrelid), '')
                          || coalesce(' identity ' || nullif(a.attidentity::text, ''), '')
                          || coalesce(' collate ' || co.collname, ''), ', ' ORDER BY a.attnum)
                     FROM pg_catalog.pg_attribute a
                     LEFT JOIN pg_catalog.pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
                     LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation AND a.attcollation <> 0
                    WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '-')
                || coalesce(' view ' || pg_catalog.pg_get_viewdef(c.oid), '')
           FROM pg_catalog.pg_class c WHERE c.oid = d.objid)
    WHEN 'pg_catalog.pg_type'::pg_catalog.regclass THEN
        (SELECT t.typtype::text || ' base ' || t.typbasetype::pg_catalog.regtype::text || ' acl ' || coalesce(t.typacl::text, '-')
                || coalesce(' not null ' || t.typnotnull::text, '')
           FROM pg_catalog.pg_type t WHERE t.oid = d.objid)
    END, '')
  FROM pg_catalog.pg_depend d
 WHERE d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass
   AND d.refobjid = (SELECT oid FROM pg_catalog.pg_extension WHERE extname = 'outbox')
   AND d.deptype = 'e'
UNION ALL
SELECT 'index ' || pg_catalog.pg_get_indexdef(i.indexrelid)
  FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indrelid
 WHERE c.relnamespace = 'outbox'::pg_catalog.regnamespace
UNION ALL
SELECT 'constraint ' || co.conname || ' on ' || coalesce(co.conrelid::pg_catalog.regclass::text, co.contypid::pg_catalog.regtype::text)
       || ': ' || pg_catalog.pg_get_constraintdef(co.oid)
  FROM pg_catalog.pg_constraint co WHERE co.connamespace = 'outbox'::pg_catalog.regnamespace
UNION ALL
SELECT 'trigger ' || pg_catalog.pg_get_triggerdef(tg.oid)
  FROM pg_catalog.pg_trigger tg JOIN pg_catalog.pg_class c ON c.oid = tg.tgrelid
 WHERE c.relnamespace = 'outbox'::pg_catalog.regnamespace AND NOT tg.tgisinternal
UNION ALL
SELECT 'schema acl ' || coalesce(n.nspacl::text, '-') FROM pg_catalog.pg_namespace n WHERE n.nspname = 'outbox'
UNION ALL
SELECT 'dumped ' || (SELECT pg_catalog.string_agg(x, ', ' ORDER BY x)
                       FROM pg_catalog.unnest(e.extconfig::pg_catalog.regclass[]::text[]) AS x)
  FROM pg_catalog.pg_extension e WHERE e.extname = 'outbox'
"#;

fn catalog(c: &mut Client) -> BTreeSet<String> {
    c.query(CATALOG, &[]).unwrap().iter().map(|r| r.get::<_, String>(0)).collect()
}

fn texts(c: &mut Client, sql: &str) -> Vec<String> {
    c.query(sql, &[]).unwrap().iter().map(|r| r.get::<_, String>(0)).collect()
}

#[test]
fn version_0_1_0_updated_in_place_delivers_everything_and_equals_a_fresh_install() {
    // The worker serves another database until the update is done, so the
    // changes made on 0.1.0 wait in the inbox and the queue.
    let mut opts = Options::default();
    opts.conf.push("outbox.database = 'not_yet'".into());
    opts.create_extension = false;
    let mut db = Cluster::start_with(opts);
    let r = Receiver::start();
    db.admin("postgres").batch_execute(&format!("CREATE DATABASE {DATABASE}")).unwrap();
    let mut c = db.client();
    let url = r.url("/u/{id}");
    c.batch_execute(&format!(
        "CREATE EXTENSION outbox VERSION '0.1.0';
         CREATE TABLE users (id bigint PRIMARY KEY, name text);
         SELECT outbox.register('user', '{url}', secret => 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw',
                                headers => '{{\"x-team\": \"blue\"}}', max_attempts => 3);
         SELECT outbox.track('users', 'user');
         CREATE ROLE app LOGIN;
         SELECT outbox.grant_enqueue('app', 'user');
         -- Inbox rows: a tracked write and 0.1.0's enqueue(text, bigint).
         INSERT INTO users VALUES (1, 'ann'), (2, 'bob');
         SELECT outbox.enqueue('user', 7);
         SELECT outbox.enqueue('user', '8'::text);
         SELECT outbox.enqueue('user', 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'::uuid);
         -- Jobs as a worker of 0.1.0 would have left them.
         INSERT INTO outbox.queue (kind, id, state) VALUES ('user', '100', 'pending');
         INSERT INTO outbox.queue (kind, id, state, claim, attempts, last_attempt_at)
              VALUES ('user', '101', 'running', 1, 1, now());
         INSERT INTO outbox.queue (kind, id, state, attempts, last_attempt_at, last_error)
              VALUES ('user', '102', 'dead', 3, now(), 'HTTP 500');"
    ))
    .unwrap();
    assert_eq!(texts(&mut c, "SELECT extversion FROM pg_extension WHERE extname = 'outbox'"), ["0.1.0"]);
    let inbox: i64 = c.query_one("SELECT count(*) FROM outbox.inbox", &[]).unwrap().get(0);
    assert!(inbox >= 3, "changes wait in the inbox: {inbox}");
    // Less the columns later versions add, NULL after the update.
    let kinds_sql =
        "SELECT (to_jsonb(k) - 'created_at' - 'previous_secret' - 'previous_secret_until' - 'max_in_flight' - 'rate_limit')::text FROM outbox.kinds k ORDER BY kind";
    let grants_sql = "SELECT (to_jsonb(e))::text FROM outbox.enqueuers e ORDER BY 1";
    let (kinds, grants) = (texts(&mut c, kinds_sql), texts(&mut c, grants_sql));

    c.batch_execute("ALTER EXTENSION outbox UPDATE").unwrap();
    assert_eq!(texts(&mut c, "SELECT extversion FROM pg_extension WHERE extname = 'outbox'"), [outbox_e2e::extension_version()]);
    assert_eq!(texts(&mut c, kinds_sql), kinds, "kinds and secrets as they were");
    assert_eq!(texts(&mut c, grants_sql), grants, "grants as they were");

    // The schema is a fresh install's.
    db.admin("postgres").batch_execute("CREATE DATABASE fresh").unwrap();
    let mut fresh = db.admin("fresh");
    fresh.batch_execute("CREATE EXTENSION outbox").unwrap();
    let (updated, installed) = (catalog(&mut c), catalog(&mut fresh));
    let only_updated: Vec<_> = updated.difference(&installed).collect();
    let only_fresh: Vec<_> = installed.difference(&updated).collect();
    assert!(
        only_updated.is_empty() && only_fresh.is_empty(),
        "0.1.0 + the upgrade scripts differs from a fresh install:\nonly updated: {only_updated:#?}\nonly fresh: {only_fresh:#?}"
    );
    assert!(updated.len() > 40, "the catalog query sees the extension: {updated:?}");
    drop(fresh);

    // The worker serves the database now (a restart: its code is loaded at
    // server start) and delivers what 0.1.0 left, the running job again.
    c.batch_execute(&format!("ALTER SYSTEM SET outbox.database = '{DATABASE}'")).unwrap();
    drop(c);
    db.restart("fast");
    let mut c = db.client();
    for id in ["1", "2", "7", "8", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "100", "101"] {
        let path = format!("/u/{id}");
        assert!(wait_until(LONG, || !r.requests_for(&path).is_empty()), "{path} delivered");
    }
    let dead: i64 = c.query_one("SELECT job_id FROM outbox.jobs WHERE id = '102' AND state = 'dead'", &[]).unwrap().get(0);
    c.execute("SELECT outbox.retry($1)", &[&dead]).unwrap();
    assert!(wait_until(LONG, || !r.requests_for("/u/102").is_empty()), "the dead job, retried, delivered");
    // The grant made on 0.1.0 lets its role call 0.2.0's enqueue.
    let mut app = Client::connect(&format!("{} user=app", db.conninfo(DATABASE)), postgres::NoTls).unwrap();
    app.batch_execute("SELECT outbox.enqueue('user', 9)").unwrap();
    assert!(wait_until(LONG, || !r.requests_for("/u/9").is_empty()), "enqueued by the granted role");
    let first = r.requests_for("/u/1").remove(0);
    assert_eq!(first.header("x-team"), Some("blue"), "headers kept");
    assert!(first.header("webhook-signature").is_some(), "signed with the kept secret");
    assert!(wait_until(LONG, || jobs_left(&mut c) == 0), "nothing left");
}

/// An admin who narrowed who may call 0.1.0's enqueue keeps it so: the
/// update gives 0.2.0's functions the old ones' privileges.
#[test]
fn an_enqueue_revoked_from_public_stays_revoked_after_the_update() {
    let mut opts = Options::default();
    opts.create_extension = false;
    let db = Cluster::start_with(opts);
    db.admin("postgres").batch_execute(&format!("CREATE DATABASE {DATABASE}")).unwrap();
    let mut c = db.client();
    c.batch_execute(
        "CREATE EXTENSION outbox VERSION '0.1.0';
         CREATE ROLE app; CREATE ROLE other;
         REVOKE EXECUTE ON FUNCTION outbox.enqueue(text, text, interval) FROM PUBLIC;
         REVOKE EXECUTE ON FUNCTION outbox.enqueue(text, bigint, interval) FROM PUBLIC;
         REVOKE EXECUTE ON FUNCTION outbox.enqueue(text, uuid, interval) FROM PUBLIC;
         GRANT EXECUTE ON FUNCTION outbox.enqueue(text, text, interval) TO app;
         ALTER EXTENSION outbox UPDATE;",
    )
    .unwrap();
    let may = |c: &mut Client, role: &str, f: &str| -> bool {
        c.query_one("SELECT has_function_privilege($1, $2::text, 'EXECUTE')", &[&role, &f]).unwrap().get(0)
    };
    for f in ["outbox.enqueue(text, anycompatible)", "outbox.enqueue(text, anycompatible, interval)"] {
        assert!(may(&mut c, "app", f), "app keeps {f}");
        assert!(!may(&mut c, "other", f), "PUBLIC stays revoked from {f}");
    }
}


/// A database still on 0.2.0 works with this version's library (the server
/// restarted on the new files before `ALTER EXTENSION outbox UPDATE`):
/// kinds register, records are delivered and signed. After the update,
/// `rotate_secret` works there, its requests signed with both secrets; the
/// counters kept on 0.2.0 carry over into 0.3.0's `stats()`, which keeps
/// the grant an admin gave on 0.2.0's, and `metrics()`.
#[test]
fn a_database_on_0_2_0_is_served_before_its_update_and_rotates_after_it() {
    const OLD: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const NEW: &str = "whsec_YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4";
    let db = Cluster::start_with(Options { create_extension: false, ..Options::default() });
    let r = Receiver::start();
    db.admin("postgres").batch_execute(&format!("CREATE DATABASE {DATABASE}")).unwrap();
    let mut c = db.client();
    let url = r.url("/u/{id}");
    c.batch_execute(&format!(
        "CREATE EXTENSION outbox VERSION '0.2.0';
         SELECT outbox.register('user', '{url}', secret => '{OLD}');
         SELECT outbox.register('user', '{url}', secret => '{OLD}', max_attempts => 5);
         SELECT outbox.enqueue('user', 1);"
    ))
    .unwrap();
    assert!(wait_until(LONG, || r.requests_for("/u/1").len() == 1), "delivered on 0.2.0");
    let verify = |req: &outbox_e2e::receiver::Recorded, secret: &str| {
        let h = |name: &str| req.header(name).unwrap().to_string();
        outbox_e2e::webhooks::verify(secret, &h("webhook-id"), &h("webhook-timestamp"), &req.body, &h("webhook-signature"))
    };
    verify(&r.requests_for("/u/1")[0], OLD).unwrap();
    let err = c.batch_execute(&format!("SELECT outbox.rotate_secret('user', '{NEW}')")).unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("42883"), "no rotate_secret on 0.2.0: {err}");
    // 0.2.0's track, without a filter, runs on this library.
    c.batch_execute("CREATE TABLE public.items (id int PRIMARY KEY, status text); SELECT outbox.track('public.items', 'user')").unwrap();
    // A failure, then a delivery: counted in 0.2.0's kind_stats.
    r.script("/u/3", [Action::status(500), Action::status(204)]);
    c.batch_execute("SELECT outbox.enqueue('user', 3); CREATE ROLE outbox_monitor;
         GRANT EXECUTE ON FUNCTION outbox.stats() TO outbox_monitor; GRANT SELECT ON ALL TABLES IN SCHEMA outbox TO outbox_monitor")
        .unwrap();
    assert!(wait_until(LONG, || jobs_left(&mut c) == 0), "delivered on 0.2.0 after a retry");
    assert_eq!(texts(&mut c, "SELECT delivered || ' ' || failed_attempts FROM outbox.stats()"), ["2 1"]);

    c.batch_execute("ALTER EXTENSION outbox UPDATE").unwrap();
    assert_eq!(texts(&mut c, "SELECT extversion FROM pg_extension WHERE extname = 'outbox'"), [outbox_e2e::extension_version()]);
    c.batch_execute(&format!("SELECT outbox.rotate_secret('user', '{NEW}', '1 hour'); SELECT outbox.enqueue('user', 2)"))
        .unwrap();
    assert!(wait_until(LONG, || r.requests_for("/u/2").len() == 1), "delivered after the update");
    let req = &r.requests_for("/u/2")[0];
    verify(req, NEW).unwrap();
    verify(req, OLD).unwrap();
    assert!(wait_until(LONG, || jobs_left(&mut c) == 0));
    c.batch_execute("SET ROLE outbox_monitor").unwrap();
    let stats = "SELECT delivered || ' ' || failed_attempts || ' ' || breaker FROM outbox.stats()";
    assert!(wait_until(LONG, || texts(&mut c, stats) == ["3 1 closed"]), "{:?}", texts(&mut c, stats));
    c.batch_execute("RESET ROLE").unwrap();
    // After the update, track takes a filter.
    c.batch_execute(
        "SELECT outbox.track('public.items', 'user', filter => 'status = ''live''');
         INSERT INTO public.items VALUES (40, 'draft'), (41, 'live');",
    )
    .unwrap();
    assert!(wait_until(LONG, || r.requests_for("/u/41").len() == 1), "the live item is delivered");
    assert!(wait_until(LONG, || jobs_left(&mut c) == 0));
    assert!(r.requests_for("/u/40").is_empty(), "the draft is not");
    let metrics = texts(&mut c, "SELECT outbox.metrics()").concat();
    let line = format!("outbox_kind_delivered_total{{database=\"{DATABASE}\",kind=\"user\"}} 4");
    assert!(metrics.lines().any(|l| l == line), "no {line} in\n{metrics}");
    // Only the deliveries made on 0.3.0 are in its latency histogram.
    let line = format!("outbox_delivery_latency_seconds_count{{database=\"{DATABASE}\",kind=\"user\"}} 2");
    assert!(metrics.lines().any(|l| l == line), "no {line} in\n{metrics}");
}
