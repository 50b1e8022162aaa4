//! Attacks on outbox by real NOSUPERUSER roles, each over its own
//! connection. The rule (DESIGN.md, Security): no role gains any privilege
//! through outbox, and nothing a role writes stops the worker. So each
//! attack either fails at its first step with the expected SQLSTATE, or ends
//! with the attacker as unprivileged as it started and the worker still
//! delivering another kind, as the same process.

use outbox_e2e::cluster::Cluster;
use outbox_e2e::receiver::{Action, Receiver};
use outbox_e2e::{jobs_left, wait_until};
use postgres::{Client, NoTls};
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(30);

/// A cluster with kind `good` (to `good`) and a running worker.
struct Setup {
    db: Cluster,
    good: Receiver,
    pid: i32,
}

fn started() -> Setup {
    let db = Cluster::start();
    let good = Receiver::start();
    clean(&db).batch_execute(&format!("SELECT outbox.register('good', '{}')", good.url("/good/{id}"))).unwrap();
    let pid = db.wait_for_worker();
    Setup { db, good, pid }
}

/// A connection to database `dbname` as `role` (trust on loopback).
fn connect(db: &Cluster, role: &str, dbname: &str) -> Client {
    let conninfo = format!("host=127.0.0.1 port={} user={role} dbname={dbname} connect_timeout=10", db.port);
    Client::connect(&conninfo, NoTls).unwrap_or_else(|e| panic!("connect as {role} to {dbname}: {e}"))
}

/// A connection to the outbox database as `role`.
fn client_as(db: &Cluster, role: &str) -> Client {
    connect(db, role, &db.database)
}

/// A superuser connection that no shadow can reach, for setup and checks:
/// everything it creates is schema-qualified.
fn clean(db: &Cluster) -> Client {
    let mut c = db.client();
    c.batch_execute("SET search_path = pg_catalog, pg_temp").unwrap();
    c
}

/// Runs `sql`, which must fail with SQLSTATE `code`; returns the message.
#[track_caller]
fn refused(c: &mut Client, sql: &str, code: &str) -> String {
    match c.batch_execute(sql) {
        Ok(()) => panic!("{sql}: succeeded, expected SQLSTATE {code}"),
        Err(e) => {
            assert_eq!(e.code().map(|s| s.code()), Some(code), "{sql}: {e:?}");
            e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default()
        }
    }
}

/// The state, attempts and last error of the most tried job of (kind, id).
fn job(c: &mut Client, kind: &str, id: &str) -> Option<(String, i32, Option<String>)> {
    c.query_opt(
        "SELECT state, attempts, last_error FROM outbox.jobs WHERE kind = $1 AND id = $2 ORDER BY attempts DESC LIMIT 1",
        &[&kind, &id],
    )
    .unwrap()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
}

/// What `role` may do: its attributes, its memberships, and every privilege
/// granted to it or to PUBLIC on an object it does not own.
fn privileges(db: &Cluster, role: &str) -> String {
    let sql = format!(
        r#"
WITH r AS (SELECT oid FROM pg_roles WHERE rolname = '{role}'),
acl AS (
    SELECT format('table %s', c.oid::regclass) AS object, c.relowner AS owner, c.relacl AS acl FROM pg_class c
    UNION ALL
    SELECT format('column %s.%I', c.oid::regclass, a.attname), c.relowner, a.attacl
      FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid WHERE a.attacl IS NOT NULL
    UNION ALL
    SELECT format('function %s', p.oid::regprocedure), p.proowner, p.proacl FROM pg_proc p
    UNION ALL
    SELECT format('schema %I', n.nspname), n.nspowner, n.nspacl FROM pg_namespace n
    UNION ALL
    SELECT format('database %I', d.datname), d.datdba, d.datacl FROM pg_database d
    UNION ALL
    SELECT format('type %s', t.oid::regtype), t.typowner, t.typacl FROM pg_type t
    UNION ALL
    SELECT format('language %I', l.lanname), l.lanowner, l.lanacl FROM pg_language l
    UNION ALL
    SELECT format('tablespace %I', s.spcname), s.spcowner, s.spcacl FROM pg_tablespace s
    UNION ALL
    SELECT format('parameter %s', p.parname), 0::oid, p.paracl FROM pg_parameter_acl p
),
granted AS (
    SELECT format('%s: %s to %s', acl.object, e.privilege_type,
                  CASE WHEN e.grantee = 0::oid THEN 'PUBLIC' ELSE e.grantee::regrole::text END) AS line
      FROM acl CROSS JOIN r CROSS JOIN LATERAL aclexplode(acl.acl) e
     WHERE acl.owner <> r.oid AND e.grantee = ANY (ARRAY[0::oid, r.oid])
)
SELECT concat_ws(E'\n',
    (SELECT format('superuser %s, createrole %s, createdb %s, replication %s, bypassrls %s',
                   rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls)
       FROM pg_roles WHERE rolname = '{role}'),
    (SELECT 'member of ' || string_agg(m.roleid::regrole::text, ', ' ORDER BY m.roleid::regrole::text)
       FROM pg_auth_members m JOIN r ON m.member = r.oid),
    (SELECT string_agg(line, E'\n' ORDER BY line) FROM granted))
"#
    );
    clean(db).query_one(&sql, &[]).unwrap().get(0)
}

/// `role` is no superuser, and may do exactly what it could `before`.
#[track_caller]
fn assert_unprivileged(db: &Cluster, role: &str, before: &str) {
    let superuser: bool =
        clean(db).query_one(&format!("SELECT rolsuper FROM pg_roles WHERE rolname = '{role}'"), &[]).unwrap().get(0);
    assert!(!superuser, "{role} became a superuser");
    let now = privileges(db, role);
    let gained: Vec<&str> = now.lines().filter(|l| !before.lines().any(|b| b == *l)).collect();
    let lost: Vec<&str> = before.lines().filter(|b| !now.lines().any(|l| l == *b)).collect();
    assert!(gained.is_empty() && lost.is_empty(), "{role}'s privileges changed: gained {gained:#?}, lost {lost:#?}");
}

/// An admin connection, and one of role `attacker`, which owns schema `att`
/// and whose privileges are as `before` says.
fn attacker_with_schema(db: &Cluster) -> (Client, Client, String) {
    let mut admin = clean(db);
    admin.batch_execute("CREATE ROLE attacker LOGIN NOSUPERUSER; CREATE SCHEMA att AUTHORIZATION attacker;").unwrap();
    let before = privileges(db, "attacker");
    (admin, client_as(db, "attacker"), before)
}

/// Kind `good` is still delivered and recorded, by the worker process `pid`.
#[track_caller]
fn still_healthy(db: &Cluster, good: &Receiver, pid: i32) {
    let mut c = clean(db);
    let id = format!("after{}", good.count());
    c.batch_execute(&format!("SELECT outbox.enqueue('good', '{id}')")).unwrap();
    let path = format!("/good/{id}");
    assert!(wait_until(LONG, || good.requests_for(&path).len() == 1), "kind good is still delivered");
    assert!(wait_until(LONG, || job(&mut c, "good", &id).is_none()), "and its outcome recorded");
    assert_eq!(db.worker_pid(), Some(pid), "the worker did not restart");
}

/// Objects in `public` that careless SQL would resolve instead of
/// pg_catalog's: functions with exact argument types (which beat
/// pg_catalog's polymorphic ones wherever public is on the path), operators
/// on the types of outbox's columns and of the catalogs, aggregates, and
/// (for a path that puts public first) `now()` and views named like
/// catalogs. Each calls `public.trap`, which logs who ran it and tries to
/// make the attacker a superuser, then does what the shadowed object does.
///
/// Not shadowed, because the harness' own queries use them from sessions
/// with the database's default path: `=` on text, and pg_stat_activity.
const SHADOWS: &str = r#"
CREATE TABLE public.trap_log (who name, backend text, what text, query text);
GRANT INSERT ON public.trap_log TO PUBLIC;
CREATE FUNCTION public.trap(what text) RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    BEGIN
        INSERT INTO public.trap_log
        SELECT current_user, a.backend_type, what, current_query()
          FROM pg_stat_get_activity(pg_backend_pid()) a;
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
    BEGIN
        ALTER ROLE attacker SUPERUSER;
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
    BEGIN
        GRANT pg_read_all_data TO attacker;
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
END $$;
CREATE FUNCTION public.tripped(what text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap(what); RETURN true; END $$;

CREATE FUNCTION public.cardinality(a text[]) RETURNS integer LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('cardinality(text[])'); RETURN pg_catalog.cardinality(a); END $$;
CREATE FUNCTION public.cardinality(a bigint[]) RETURNS integer LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('cardinality(bigint[])'); RETURN pg_catalog.cardinality(a); END $$;
CREATE FUNCTION public.unnest(a text[]) RETURNS SETOF text LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('unnest(text[])'); RETURN QUERY SELECT pg_catalog.unnest(a); END $$;
CREATE FUNCTION public.unnest(a bigint[]) RETURNS SETOF bigint LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('unnest(bigint[])'); RETURN QUERY SELECT pg_catalog.unnest(a); END $$;
CREATE FUNCTION public.unnest(a integer[]) RETURNS SETOF integer LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('unnest(integer[])'); RETURN QUERY SELECT pg_catalog.unnest(a); END $$;
CREATE FUNCTION public.unnest(a anyarray) RETURNS SETOF anyelement LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('unnest(anyarray)'); RETURN QUERY SELECT pg_catalog.unnest(a); END $$;
CREATE FUNCTION public.format(f text, a text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('format(text, text)'); RETURN pg_catalog.format(f, a); END $$;
CREATE FUNCTION public.format(f text, a text, b text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('format(text, text, text)'); RETURN pg_catalog.format(f, a, b); END $$;
CREATE FUNCTION public.format(f text, a name) RETURNS text LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('format(text, name)'); RETURN pg_catalog.format(f, a); END $$;
CREATE FUNCTION public.format(f text, a regclass) RETURNS text LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('format(text, regclass)'); RETURN pg_catalog.format(f, a); END $$;
CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('now()'); RETURN pg_catalog.now(); END $$;

CREATE FUNCTION public.agg_step(s text[], v text) RETURNS text[] LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('array_agg(text)'); RETURN pg_catalog.array_append(s, v); END $$;
CREATE AGGREGATE public.array_agg(text) (SFUNC = public.agg_step, STYPE = text[]);
CREATE FUNCTION public.agg_step(s bigint[], v bigint) RETURNS bigint[] LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('array_agg(bigint)'); RETURN pg_catalog.array_append(s, v); END $$;
CREATE AGGREGATE public.array_agg(bigint) (SFUNC = public.agg_step, STYPE = bigint[]);
CREATE FUNCTION public.max_step(s tid, v tid) RETURNS tid LANGUAGE plpgsql AS $$
BEGIN
    PERFORM public.trap('max(tid)');
    RETURN CASE WHEN s IS NULL OR v OPERATOR(pg_catalog.>) s THEN v ELSE s END;
END $$;
CREATE AGGREGATE public.max(tid) (SFUNC = public.max_step, STYPE = tid);

CREATE FUNCTION public.eq(a oid, b oid) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('=(oid, oid)'); RETURN a OPERATOR(pg_catalog.=) b; END $$;
CREATE OPERATOR public.= (LEFTARG = oid, RIGHTARG = oid, FUNCTION = public.eq);
CREATE FUNCTION public.eq(a regprocedure, b regprocedure) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('=(regprocedure, regprocedure)'); RETURN a::oid OPERATOR(pg_catalog.=) b::oid; END $$;
CREATE OPERATOR public.= (LEFTARG = regprocedure, RIGHTARG = regprocedure, FUNCTION = public.eq);
CREATE FUNCTION public.eq(a regclass, b regclass) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('=(regclass, regclass)'); RETURN a::oid OPERATOR(pg_catalog.=) b::oid; END $$;
CREATE OPERATOR public.= (LEFTARG = regclass, RIGHTARG = regclass, FUNCTION = public.eq);
CREATE FUNCTION public.eq(a regrole, b regrole) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('=(regrole, regrole)'); RETURN a::oid OPERATOR(pg_catalog.=) b::oid; END $$;
CREATE OPERATOR public.= (LEFTARG = regrole, RIGHTARG = regrole, FUNCTION = public.eq);
CREATE FUNCTION public.eq(a name, b name) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('=(name, name)'); RETURN a OPERATOR(pg_catalog.=) b; END $$;
CREATE OPERATOR public.= (LEFTARG = name, RIGHTARG = name, FUNCTION = public.eq);
CREATE FUNCTION public.eq(a bigint, b bigint) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('=(bigint, bigint)'); RETURN a OPERATOR(pg_catalog.=) b; END $$;
CREATE OPERATOR public.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = public.eq);
CREATE FUNCTION public.le(a timestamptz, b timestamptz) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('<=(timestamptz, timestamptz)'); RETURN a OPERATOR(pg_catalog.<=) b; END $$;
CREATE OPERATOR public.<= (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = public.le);
CREATE FUNCTION public.lt(a timestamptz, b timestamptz) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('<(timestamptz, timestamptz)'); RETURN a OPERATOR(pg_catalog.<) b; END $$;
CREATE OPERATOR public.< (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = public.lt);
CREATE FUNCTION public.plus(a timestamptz, b interval) RETURNS timestamptz LANGUAGE plpgsql AS $$
BEGIN PERFORM public.trap('+(timestamptz, interval)'); RETURN a OPERATOR(pg_catalog.+) b; END $$;
CREATE OPERATOR public.+ (LEFTARG = timestamptz, RIGHTARG = interval, FUNCTION = public.plus);

CREATE VIEW public.pg_class AS SELECT * FROM pg_catalog.pg_class WHERE (SELECT public.tripped('pg_class'));
CREATE VIEW public.pg_attribute AS
    SELECT attrelid, attname, atttypid, attlen, attnum, atttypmod, attnotnull, atthasdef, attidentity,
           attgenerated, attisdropped, attislocal, attinhcount, attcollation
      FROM pg_catalog.pg_attribute WHERE (SELECT public.tripped('pg_attribute'));
CREATE VIEW public.pg_index AS SELECT * FROM pg_catalog.pg_index WHERE (SELECT public.tripped('pg_index'));
CREATE VIEW public.pg_trigger AS SELECT * FROM pg_catalog.pg_trigger WHERE (SELECT public.tripped('pg_trigger'));
CREATE VIEW public.pg_proc AS SELECT * FROM pg_catalog.pg_proc WHERE (SELECT public.tripped('pg_proc'));
CREATE VIEW public.pg_namespace AS SELECT * FROM pg_catalog.pg_namespace WHERE (SELECT public.tripped('pg_namespace'));
CREATE VIEW public.pg_constraint AS SELECT * FROM pg_catalog.pg_constraint WHERE (SELECT public.tripped('pg_constraint'));
CREATE VIEW public.pg_inherits AS SELECT * FROM pg_catalog.pg_inherits WHERE (SELECT public.tripped('pg_inherits'));
CREATE VIEW public.pg_depend AS SELECT * FROM pg_catalog.pg_depend WHERE (SELECT public.tripped('pg_depend'));
CREATE VIEW public.pg_database AS SELECT * FROM pg_catalog.pg_database WHERE (SELECT public.tripped('pg_database'));
CREATE VIEW public.pg_roles AS SELECT * FROM pg_catalog.pg_roles WHERE (SELECT public.tripped('pg_roles'));
CREATE VIEW public.pg_type AS SELECT * FROM pg_catalog.pg_type WHERE (SELECT public.tripped('pg_type'));
CREATE VIEW public.pg_extension AS SELECT * FROM pg_catalog.pg_extension WHERE (SELECT public.tripped('pg_extension'));
CREATE VIEW public.pg_locks AS SELECT * FROM pg_catalog.pg_locks WHERE (SELECT public.tripped('pg_locks'));
"#;

/// No object of [`SHADOWS`] ran as a superuser.
#[track_caller]
fn assert_no_shadow_ran_as_a_superuser(db: &Cluster) {
    let ran: Vec<(String, String, String, String)> = clean(db)
        .query(
            "SELECT who::text, coalesce(backend, ''), what, coalesce(query, '') FROM public.trap_log
              WHERE who IN (SELECT rolname FROM pg_roles WHERE rolsuper)",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert!(ran.is_empty(), "shadows ran as a superuser (who, backend, what, query): {ran:#?}");
}

/// Finding: any role could call `enqueue` for any kind, and it returned the
/// job id (other sessions' jobs among them). Now a role enqueues only the
/// kinds an admin granted it, directly or through a role it is a member of;
/// without a grant it gets 42501 whether or not the kind exists, and it
/// learns nothing back. It can do nothing else either.
#[test]
fn enqueue_takes_a_grant_for_the_kind_and_returns_nothing() {
    let s = started();
    let r = Receiver::start();
    let mut admin = clean(&s.db);
    admin
        .batch_execute(&format!(
            "CREATE ROLE app LOGIN NOSUPERUSER;
             CREATE ROLE boss LOGIN SUPERUSER;
             CREATE ROLE team NOLOGIN NOSUPERUSER;
             CREATE ROLE member LOGIN NOSUPERUSER IN ROLE team;
             SELECT outbox.register('user', '{}');
             SELECT outbox.register('other', '{}');",
            r.url("/user/{id}"),
            r.url("/other/{id}")
        ))
        .unwrap();
    let (app_before, member_before) = (privileges(&s.db, "app"), privileges(&s.db, "member"));
    let mut app = client_as(&s.db, "app");
    let uuid = "6f1c1c4e-8c4b-4a55-9d1e-2f0e0b6c7d8a";
    // No grant: every overload is refused, for a kind that exists and for
    // one that doesn't alike.
    for sql in [
        "SELECT outbox.enqueue('user', 1)".to_string(),
        "SELECT outbox.enqueue('user', 'a'::text)".into(),
        format!("SELECT outbox.enqueue('user', '{uuid}'::uuid)"),
        "SELECT outbox.enqueue('user', 1, '1 s')".into(),
        "SELECT outbox.enqueue('nope', 1)".into(),
    ] {
        refused(&mut app, &sql, "42501");
    }
    // Nor anything else of outbox.
    for sql in [
        "SELECT * FROM outbox.jobs",
        "SELECT * FROM outbox.stats()",
        "SELECT outbox.grant_enqueue('app')",
        "SELECT outbox.grant_enqueue('app', 'user')",
        "SELECT outbox.register('mine', 'http://127.0.0.1:9/{id}')",
        "INSERT INTO outbox.inbox (kind, id, enqueued_at) VALUES ('user', '1', now())",
    ] {
        refused(&mut app, sql, "42501");
    }

    admin.batch_execute("SELECT outbox.grant_enqueue('app', 'user')").unwrap();
    app.batch_execute(&format!(
        "SELECT outbox.enqueue('user', 1);
         SELECT outbox.enqueue('user', 'a'::text);
         SELECT outbox.enqueue('user', '{uuid}'::uuid);"
    ))
    .unwrap();
    let returned: String = app.query_one("SELECT pg_typeof(outbox.enqueue('user', 2))::text", &[]).unwrap().get(0);
    assert_eq!(returned, "void", "enqueue hands back nothing");
    refused(&mut app, "SELECT outbox.enqueue('other', 1)", "42501");
    refused(&mut app, "SELECT outbox.enqueue('nope', 1)", "42501");
    refused(&mut app, "SELECT outbox.enqueue('user', 3, NULL)", "22004");
    refused(&mut app, "SELECT outbox.enqueue('user', 4, '-1 s')", "22023");
    refused(&mut app, "SELECT * FROM outbox.jobs", "42501");
    let not_void: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_proc WHERE pronamespace = 'outbox'::regnamespace AND proname = 'enqueue'
                AND prorettype <> 'void'::regtype",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(not_void, 0, "no overload of enqueue returns anything");

    // Through membership.
    admin.batch_execute("SELECT outbox.grant_enqueue('team', 'other')").unwrap();
    let mut member = client_as(&s.db, "member");
    member.batch_execute("SELECT outbox.enqueue('other', 'm')").unwrap();
    refused(&mut member, "SELECT outbox.enqueue('user', 1)", "42501");

    // What a session found allowed in one transaction is looked at again
    // in the next: a grant made anew still allows; a membership taken
    // back, or the superuser attribute, no longer does.
    admin.batch_execute("SELECT outbox.revoke_enqueue('app', 'user'); SELECT outbox.grant_enqueue('app', 'user');").unwrap();
    app.batch_execute("SELECT outbox.enqueue('user', 'r')").unwrap();
    admin.batch_execute("REVOKE team FROM member").unwrap();
    refused(&mut member, "SELECT outbox.enqueue('other', 'm2')", "42501");
    admin.batch_execute("GRANT team TO member").unwrap();
    let mut boss = client_as(&s.db, "boss");
    boss.batch_execute("SELECT outbox.enqueue('user', 'b')").unwrap();
    admin.batch_execute("ALTER ROLE boss NOSUPERUSER").unwrap();
    refused(&mut boss, "SELECT outbox.enqueue('user', 'b2')", "42501");

    // Every kind, then taken back.
    admin.batch_execute("SELECT outbox.grant_enqueue('app')").unwrap();
    app.batch_execute("SELECT outbox.enqueue('other', 'o')").unwrap();
    admin.batch_execute("SELECT outbox.revoke_enqueue('app'); SELECT outbox.revoke_enqueue('app', 'user');").unwrap();
    refused(&mut app, "SELECT outbox.enqueue('user', 5)", "42501");
    refused(&mut app, "SELECT outbox.enqueue('other', 5)", "42501");

    let expected: Vec<String> =
        ["/user/1", "/user/a", &format!("/user/{uuid}"), "/user/2", "/other/m", "/user/r", "/user/b", "/other/o"]
            .iter()
            .map(|p| p.to_string())
            .collect();
    assert!(
        wait_until(LONG, || expected.iter().all(|p| r.requests_for(p).len() == 1) && jobs_left(&mut admin) == 0),
        "delivered: {:?}",
        r.requests().iter().map(|q| q.path.clone()).collect::<Vec<_>>()
    );
    assert_eq!(r.count(), expected.len(), "nothing refused was sent");
    assert_unprivileged(&s.db, "app", &app_before);
    assert_unprivileged(&s.db, "member", &member_before);
    still_healthy(&s.db, &s.good, s.pid);
}

/// Finding: ids `.` and `..` went into the URL as they were, and anything
/// that resolves dot segments on the way sent `PUT /docs/..` to `/`: an
/// application that may enqueue could aim a kind's request at another path
/// of the receiver. They are sent percent-encoded (`%2E`, `%2E%2E`), and no
/// id makes a path segment of its own.
#[test]
fn dot_and_dot_dot_ids_are_sent_percent_encoded() {
    let s = started();
    let r = Receiver::start();
    let mut admin = clean(&s.db);
    admin
        .batch_execute(&format!(
            "CREATE ROLE app LOGIN NOSUPERUSER;
             SELECT outbox.register('docs', '{}');
             SELECT outbox.grant_enqueue('app', 'docs');",
            r.url("/docs/{id}")
        ))
        .unwrap();
    let before = privileges(&s.db, "app");
    let ids = ["..", ".", "../admin", "...", "./x", "%2E%2E"];
    let mut app = client_as(&s.db, "app");
    for id in ids {
        app.execute("SELECT outbox.enqueue('docs', $1::text)", &[&id]).unwrap();
    }
    assert!(wait_until(LONG, || r.count() == ids.len() && jobs_left(&mut admin) == 0));
    let dotdot = r.requests_for("/docs/%2E%2E");
    assert_eq!(dotdot.len(), 1, "{:?}", r.requests().iter().map(|q| q.path.clone()).collect::<Vec<_>>());
    assert_eq!(dotdot[0].json()["id"], "..");
    let dot = r.requests_for("/docs/%2E");
    assert_eq!(dot.len(), 1);
    assert_eq!(dot[0].json()["id"], ".");
    let mut sent: Vec<String> = Vec::new();
    for q in r.requests() {
        let segment = q.path.strip_prefix("/docs/").unwrap_or_else(|| panic!("{} left /docs/", q.path));
        assert!(!segment.contains('/') && segment != "." && segment != "..", "{} is not one segment", q.path);
        sent.push(q.json()["id"].as_str().unwrap().to_string());
    }
    sent.sort();
    let mut ids = ids.map(String::from).to_vec();
    ids.sort();
    assert_eq!(sent, ids, "every id, as it was enqueued");
    assert_unprivileged(&s.db, "app", &before);
    still_healthy(&s.db, &s.good, s.pid);
}

/// Finding: `outbox.enqueue_trigger()` was executable by PUBLIC, so any role
/// could attach it to a table of its own, even a temporary one, and enqueue
/// what it liked without a grant. Attaching it is for admins
/// (`outbox.track`); the tables they track keep working for the application
/// roles that write them, with no enqueue grant.
#[test]
fn a_plain_role_cannot_attach_enqueue_trigger_but_tracked_tables_work() {
    let s = started();
    let r = Receiver::start();
    let mut admin = clean(&s.db);
    admin
        .batch_execute(&format!(
            "CREATE ROLE attacker LOGIN NOSUPERUSER;
             CREATE ROLE app LOGIN NOSUPERUSER;
             CREATE SCHEMA att AUTHORIZATION attacker;
             CREATE TABLE public.items (id int PRIMARY KEY, v text);
             GRANT SELECT, INSERT, UPDATE, DELETE ON public.items TO app;
             SELECT outbox.register('item', '{}');
             SELECT outbox.track('public.items', 'item');",
            r.url("/item/{id}")
        ))
        .unwrap();
    let (attacker_before, app_before) = (privileges(&s.db, "attacker"), privileges(&s.db, "app"));
    let mut attacker = client_as(&s.db, "attacker");
    attacker.batch_execute("CREATE TEMP TABLE t (id int PRIMARY KEY); CREATE TABLE att.t (id int PRIMARY KEY);").unwrap();
    for sql in [
        "CREATE TRIGGER x AFTER INSERT ON pg_temp.t FOR EACH ROW EXECUTE FUNCTION outbox.enqueue_trigger('item', 'id')",
        "CREATE TRIGGER x AFTER INSERT ON att.t FOR EACH ROW EXECUTE FUNCTION outbox.enqueue_trigger('item', 'id')",
        "CREATE TRIGGER x AFTER INSERT ON att.t REFERENCING NEW TABLE AS n
             FOR EACH STATEMENT EXECUTE FUNCTION outbox.enqueue_trigger('item', 'id')",
        "CREATE CONSTRAINT TRIGGER x AFTER INSERT ON att.t DEFERRABLE
             FOR EACH ROW EXECUTE FUNCTION outbox.enqueue_trigger('item', 'id')",
        "SELECT outbox.track('att.t', 'item')",
        "SELECT outbox.untrack('public.items', 'item')",
        "INSERT INTO outbox.inbox (kind, id, enqueued_at) VALUES ('item', '1', now())",
        "SELECT * FROM outbox.jobs",
    ] {
        refused(&mut attacker, sql, "42501");
    }
    attacker.batch_execute("INSERT INTO pg_temp.t VALUES (7); INSERT INTO att.t VALUES (8);").unwrap();

    let mut app = client_as(&s.db, "app");
    refused(&mut app, "SELECT outbox.enqueue('item', 1)", "42501");
    app.batch_execute(
        "INSERT INTO public.items VALUES (1, 'a'), (2, 'b');
         UPDATE public.items SET v = 'c' WHERE id = 1;
         DELETE FROM public.items WHERE id = 2;",
    )
    .unwrap();
    assert!(wait_until(LONG, || {
        !r.requests_for("/item/1").is_empty() && !r.requests_for("/item/2").is_empty() && jobs_left(&mut admin) == 0
    }));
    assert!(r.requests().iter().all(|q| q.path == "/item/1" || q.path == "/item/2"), "nothing of the attacker's tables");
    assert_unprivileged(&s.db, "attacker", &attacker_before);
    assert_unprivileged(&s.db, "app", &app_before);
    still_healthy(&s.db, &s.good, s.pid);
}

/// Finding: one inbox row the worker could not move into the queue (a kind
/// over the btree limit of the queue's index) failed every absorb, and the
/// worker restarted over it every second while nothing was delivered. Such
/// a row is set aside in `outbox.rejected` with the reason, shown in
/// `outbox.jobs` as dead with no job id, and logged; the changes that came
/// with it are delivered, by the same worker. Rows written by a superuser
/// here (no role can write the inbox otherwise), and one that an
/// application role's write to a tracked table could make.
#[test]
fn an_inbox_row_the_worker_cannot_absorb_is_set_aside() {
    let s = started();
    let r = Receiver::start();
    let mut admin = clean(&s.db);
    admin
        .batch_execute(&format!(
            "CREATE ROLE app LOGIN NOSUPERUSER;
             CREATE TABLE public.refs (n int PRIMARY KEY, ref text);
             GRANT INSERT ON public.refs TO app;
             SELECT outbox.register('ref', '{}');
             SELECT outbox.track('public.refs', 'ref', id_column => 'ref');",
            r.url("/ref/{id}")
        ))
        .unwrap();
    let before = privileges(&s.db, "app");
    // The tracked column has no index of its own, so the row goes in; its
    // 3,200-byte id is as incompressible as text gets. Refused at once (an
    // id over the limit) or set aside by the worker: either way, not the
    // worker's end.
    let app_write = client_as(&s.db, "app")
        .batch_execute("INSERT INTO public.refs SELECT 1, string_agg(md5(g::text), '') FROM generate_series(1, 100) g");
    eprintln!("the application's write of a 3,200-byte id: {app_write:?}");
    // Among good changes of one transaction: a 3,000-byte kind that can't
    // be compressed below the btree limit; the same length, compressible
    // (it fits the index, and its kind is not registered); a NULL id; no id.
    let wide = "(SELECT string_agg(md5(g::text), '') FROM generate_series(1, 94) g)";
    admin
        .batch_execute(&format!(
            "BEGIN;
             SELECT outbox.enqueue('good', 'before');
             INSERT INTO outbox.inbox (kind, id, enqueued_at) VALUES ({wide}, '1', now());
             INSERT INTO outbox.inbox (kind, id, enqueued_at) VALUES (repeat('k', 3000), '1', now());
             INSERT INTO outbox.inbox (kind, ids, enqueued_at) VALUES ('good', ARRAY['x', NULL], now());
             INSERT INTO outbox.inbox (kind, ids, enqueued_at) VALUES ('good', '{{}}', now());
             SELECT outbox.enqueue('good', 'behind');
             COMMIT;"
        ))
        .unwrap();
    let inbox = |c: &mut Client| c.query_one("SELECT count(*) FROM outbox.inbox", &[]).unwrap().get::<_, i64>(0);
    assert!(wait_until(LONG, || inbox(&mut admin) == 0), "the inbox drains");
    assert!(wait_until(LONG, || {
        s.good.requests_for("/good/before").len() == 1 && s.good.requests_for("/good/behind").len() == 1
    }));
    let reason: String = admin
        .query_opt(&format!("SELECT reason FROM outbox.rejected WHERE kind = {wide} AND id = '1'"), &[])
        .unwrap()
        .expect("the row is in outbox.rejected")
        .get(0);
    assert!(!reason.is_empty());
    let (job_id, state, error): (Option<i64>, String, Option<String>) = admin
        .query_one(&format!("SELECT job_id, state, last_error FROM outbox.jobs WHERE kind = {wide}"), &[])
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .unwrap();
    assert_eq!((job_id, state.as_str(), error.as_deref()), (None, "dead", Some(reason.as_str())));
    assert!(s.db.log().contains(&reason), "the reason is logged: {reason}");
    // The compressible one: set aside, or a dead job of an unknown kind.
    let state: String =
        admin.query_one("SELECT state FROM outbox.jobs WHERE kind = repeat('k', 3000)", &[]).unwrap().get(0);
    assert_eq!(state, "dead");
    assert_unprivileged(&s.db, "app", &before);
    still_healthy(&s.db, &s.good, s.pid);
}

/// Finding: a render had no bound. A body waiting for a lock another
/// session held (here the attacker, who owns the table its body reads and
/// leaves a LOCK TABLE open), or one that just ran long, stalled the
/// worker's turn, and every other kind with it. A kind's renders are bounded
/// by its render_timeout, lock waits included, even for a body that turns
/// its own timeouts off: its job fails, to be retried, and other kinds flow.
#[test]
fn a_blocked_or_slow_body_fails_its_job_while_other_kinds_flow() {
    let s = started();
    let r = Receiver::start();
    let (mut admin, mut attacker, before) = attacker_with_schema(&s.db);
    attacker
        .batch_execute(
            "CREATE TABLE att.docs (id text PRIMARY KEY, v text);
             INSERT INTO att.docs VALUES ('1', 'one');
             CREATE FUNCTION att.doc_body(id text) RETURNS jsonb LANGUAGE sql
                 AS $$ SELECT to_jsonb(d) FROM att.docs d WHERE d.id = $1 $$;
             CREATE FUNCTION att.sneaky_body(id text) RETURNS jsonb LANGUAGE sql
                 SET lock_timeout = 0 SET statement_timeout = 0
                 AS $$ SELECT to_jsonb(d) FROM att.docs d WHERE d.id = $1 $$;
             CREATE FUNCTION att.slow_body(id text) RETURNS jsonb LANGUAGE sql
                 AS $$ SELECT jsonb_build_object('id', $1) $$;",
        )
        .unwrap();
    admin
        .batch_execute(&format!(
            "SELECT outbox.register('locked', '{}', body => 'att.doc_body(text)', render_timeout => '200 ms', max_attempts => 1000);
             SELECT outbox.register('sneaky', '{}', body => 'att.sneaky_body(text)', render_timeout => '200 ms', max_attempts => 1000);
             SELECT outbox.register('slow', '{}', body => 'att.slow_body(text)', render_timeout => '200 ms', max_attempts => 1000);",
            r.url("/locked/{id}"),
            r.url("/sneaky/{id}"),
            r.url("/slow/{id}")
        ))
        .unwrap();
    // Registered: now the body sleeps, and the table is held.
    attacker
        .batch_execute(
            "CREATE OR REPLACE FUNCTION att.slow_body(id text) RETURNS jsonb LANGUAGE plpgsql SET statement_timeout = 0
                 AS $$ BEGIN PERFORM pg_sleep(30); RETURN jsonb_build_object('id', id); END $$;",
        )
        .unwrap();
    attacker.batch_execute("BEGIN; LOCK TABLE att.docs IN ACCESS EXCLUSIVE MODE;").unwrap();
    admin.batch_execute("SELECT outbox.enqueue('locked', '1'), outbox.enqueue('sneaky', '1'), outbox.enqueue('slow', '1')").unwrap();
    for kind in ["locked", "sneaky", "slow"] {
        assert!(
            wait_until(LONG, || job(&mut admin, kind, "1").is_some_and(|j| j.1 >= 1 && j.2.is_some())),
            "{kind} failed: {:?}",
            job(&mut admin, kind, "1")
        );
    }
    // Each delivery of the good kind arrives in a fraction of the time one
    // stuck render (30 s, or for ever) would hold a turn.
    let mut slowest = Duration::ZERO;
    for n in 1..=20 {
        let start = Instant::now();
        admin.batch_execute(&format!("SELECT outbox.enqueue('good', 'g{n}')")).unwrap();
        let path = format!("/good/g{n}");
        assert!(wait_until(Duration::from_secs(8), || s.good.requests_for(&path).len() == 1), "delivery {n} of kind good was held up");
        slowest = slowest.max(start.elapsed());
    }
    eprintln!("slowest of 20 deliveries of kind good beside the stuck kinds: {slowest:?}");
    for kind in ["locked", "sneaky", "slow"] {
        let (_, attempts, error) = job(&mut admin, kind, "1").unwrap();
        let error = error.unwrap();
        assert!(["lock", "timeout", "canceling statement"].iter().any(|w| error.contains(w)), "{kind}: {error}");
        assert!(attempts >= 1, "{kind}");
    }
    assert!(r.requests_for("/slow/1").is_empty());
    // Released, the blocked ones go through on a retry.
    attacker.batch_execute("COMMIT").unwrap();
    assert!(wait_until(LONG, || r.requests_for("/locked/1").len() == 1 && r.requests_for("/sneaky/1").len() == 1));
    assert_eq!(r.requests_for("/locked/1")[0].json()["v"], "one");
    assert_unprivileged(&s.db, "attacker", &before);
    still_healthy(&s.db, &s.good, s.pid);
}

/// Finding: statements of the worker, of the triggers and of the admin
/// functions resolved functions, operators and relations through the
/// session's search_path. A role that may create objects in public could
/// plant `public.cardinality(text[])` and the like (an exact argument type
/// beats pg_catalog's polymorphic one) and have them run as a superuser.
/// Here the attacker plants such shadows; the database's owner (no
/// superuser) puts public before pg_catalog for every new session; an admin
/// restarts the worker so that it starts afresh under that path; and an
/// admin session with that path registers, tracks, enqueues, retries,
/// truncates, untracks and unregisters while deliveries flow. No shadow runs
/// as a superuser.
#[test]
fn shadows_in_public_never_run_as_the_worker_or_an_admin() {
    let s = started();
    let r = Receiver::start();
    let mut admin = clean(&s.db);
    admin
        .batch_execute(
            "CREATE ROLE attacker LOGIN NOSUPERUSER;
             CREATE ROLE dbowner LOGIN NOSUPERUSER NOCREATEDB;
             CREATE ROLE reader NOLOGIN NOSUPERUSER;
             GRANT CREATE ON SCHEMA public TO attacker;
             ALTER DATABASE outbox_e2e OWNER TO dbowner;
             CREATE TABLE public.items (id int PRIMARY KEY, name text);
             GRANT SELECT ON public.items TO reader;
             CREATE FUNCTION public.item_body(id text) RETURNS jsonb LANGUAGE sql
                 AS $$ SELECT to_jsonb(i) FROM public.items i WHERE i.id = $1::int $$;",
        )
        .unwrap();
    let mut attacker = client_as(&s.db, "attacker");
    attacker.batch_execute(SHADOWS).unwrap();
    // Taken once the traps are set: their own log's PUBLIC grant is theirs.
    let (attacker_before, owner_before) = (privileges(&s.db, "attacker"), privileges(&s.db, "dbowner"));
    // The shadows are live: in the attacker's own session, with the default
    // path, they win over pg_catalog's.
    attacker.batch_execute("SELECT cardinality(ARRAY['a']), 'pg_class'::regclass = 'pg_class'::regclass").unwrap();
    let live: i64 = admin
        .query_one("SELECT count(DISTINCT what) FROM public.trap_log WHERE who = 'attacker'", &[])
        .unwrap()
        .get(0);
    assert_eq!(live, 2, "the shadows resolve");

    client_as(&s.db, "dbowner").batch_execute("ALTER DATABASE outbox_e2e SET search_path = public, pg_catalog").unwrap();
    admin.execute("SELECT pg_terminate_backend($1)", &[&s.pid]).unwrap();
    assert!(wait_until(LONG, || s.db.worker_pid().is_some_and(|p| p != s.pid)), "a new worker");
    let pid = s.db.wait_for_worker();
    assert_ne!(pid, s.pid);

    // Only outbox calls and writes of the tracked table in this session:
    // its path is the hostile one.
    let mut hostile = s.db.client();
    hostile.batch_execute("SET search_path = public, pg_catalog").unwrap();
    r.script("/flaky/f1", [Action::status(400)]);
    hostile
        .batch_execute(&format!(
            "SELECT outbox.register('item', '{}', body => 'public.item_body(text)', run_as => 'reader');
             SELECT outbox.register('plain', '{}');
             SELECT outbox.register('flaky', '{}');
             SELECT outbox.track('public.items', 'item');
             SELECT outbox.grant_enqueue('reader', 'plain');
             INSERT INTO public.items SELECT g, 'n' FROM generate_series(1, 50) g;
             UPDATE public.items SET name = 'm' WHERE id <= 10;
             DELETE FROM public.items WHERE id = 50;
             SELECT outbox.enqueue('plain', 'p1');
             SELECT outbox.enqueue('flaky', 'f1');",
            r.url("/items/{id}"),
            r.url("/plain/{id}"),
            r.url("/flaky/{id}")
        ))
        .unwrap();
    assert!(wait_until(LONG, || job(&mut admin, "flaky", "f1").is_some_and(|j| j.0 == "dead")));
    hostile
        .batch_execute(
            "SELECT outbox.retry_dead('flaky');
             SELECT outbox.pause('plain');
             SELECT outbox.resume('plain');
             SELECT * FROM outbox.stats();
             SELECT * FROM outbox.worker_status();
             SELECT count(*) FROM outbox.jobs;",
        )
        .unwrap();
    let last = |path: &str| r.requests_for(path).last().map(|q| (q.method.clone(), q.json()));
    assert!(
        wait_until(LONG, || {
            jobs_left(&mut admin) == 0
                && r.requests_for("/flaky/f1").len() == 2
                && r.requests_for("/plain/p1").len() == 1
                && last("/items/50").is_some_and(|(m, _)| m == "DELETE")
                && (1..=10).all(|n| last(&format!("/items/{n}")).is_some_and(|(_, b)| b["name"] == "m"))
                && (11..=49).all(|n| last(&format!("/items/{n}")).is_some_and(|(_, b)| b["name"] == "n"))
        }),
        "left: {}",
        jobs_left(&mut admin)
    );
    hostile.batch_execute("TRUNCATE public.items").unwrap();
    assert!(wait_until(LONG, || {
        jobs_left(&mut admin) == 0 && (1..=49).all(|n| last(&format!("/items/{n}")).is_some_and(|(m, _)| m == "DELETE"))
    }));
    hostile
        .batch_execute(
            "SELECT outbox.untrack('public.items', 'item');
             SELECT outbox.revoke_enqueue('reader', 'plain');
             SELECT outbox.unregister('flaky');
             SELECT outbox.unregister('item');
             SELECT outbox.purge_dead('0 s');",
        )
        .unwrap();

    assert_no_shadow_ran_as_a_superuser(&s.db);
    assert_unprivileged(&s.db, "attacker", &attacker_before);
    assert_unprivileged(&s.db, "dbowner", &owner_before);
    still_healthy(&s.db, &s.good, pid);
    assert_no_shadow_ran_as_a_superuser(&s.db);
}

/// Finding: the hook that stops the worker for DDL needing the database to
/// itself did so for any owner of the database, before Postgres checked the
/// rest: an owner without CREATEDB could bounce the worker at will with a
/// RENAME (or a copy, or a move to a tablespace it may not use) that then
/// failed. The statement fails as it would anyway, and the worker stays.
#[test]
fn a_database_owner_without_createdb_cannot_bounce_the_worker() {
    let s = started();
    clean(&s.db)
        .batch_execute(
            "CREATE ROLE dbowner LOGIN NOSUPERUSER NOCREATEDB;
             ALTER DATABASE outbox_e2e OWNER TO dbowner;",
        )
        .unwrap();
    let before = privileges(&s.db, "dbowner");
    // From another database: from inside its own one, each fails earlier.
    let mut owner = connect(&s.db, "dbowner", "postgres");
    refused(&mut owner, "ALTER DATABASE outbox_e2e RENAME TO outbox_renamed", "42501");
    still_healthy(&s.db, &s.good, s.pid);
    refused(&mut owner, "ALTER DATABASE outbox_e2e SET TABLESPACE pg_default", "42501");
    still_healthy(&s.db, &s.good, s.pid);
    refused(&mut owner, "CREATE DATABASE outbox_copy TEMPLATE outbox_e2e", "42501");
    still_healthy(&s.db, &s.good, s.pid);
    assert_unprivileged(&s.db, "dbowner", &before);
}

/// Finding: bodies ran as the worker's role, a superuser by default, so the
/// owner of a body function, who may replace it at any time, ran code as a
/// superuser. A body runs as the kind's run_as, by default the function's
/// owner at register time, in a security-restricted operation: it can't
/// change its role or session authorization, and what it sets in the
/// session (search_path towards its shadows, read-only, timeouts) is put
/// back before the worker's own statements run.
#[test]
fn an_attacker_s_body_function_runs_as_the_attacker() {
    let s = started();
    let r = Receiver::start();
    let mut admin = clean(&s.db);
    admin.batch_execute("CREATE ROLE attacker LOGIN NOSUPERUSER; GRANT CREATE ON SCHEMA public TO attacker;").unwrap();
    let before = privileges(&s.db, "attacker");
    let mut attacker = client_as(&s.db, "attacker");
    attacker.batch_execute(SHADOWS).unwrap();
    attacker
        .batch_execute(
            "CREATE FUNCTION public.evil_body(id text) RETURNS jsonb LANGUAGE plpgsql AS $$
             BEGIN
                 ALTER ROLE attacker SUPERUSER;
                 RETURN pg_catalog.jsonb_build_object('id', id);
             END $$;",
        )
        .unwrap();
    admin
        .batch_execute(&format!(
            "SELECT outbox.register('evil', '{}', body => 'public.evil_body(text)', max_attempts => 1000);
             SELECT outbox.enqueue('evil', '1');",
            r.url("/evil/{id}")
        ))
        .unwrap();
    assert!(wait_until(LONG, || job(&mut admin, "evil", "1").is_some_and(|j| j.1 >= 1 && j.2.is_some())));
    assert!(r.requests_for("/evil/1").is_empty(), "the ALTER ROLE failed, and the body with it");
    assert_unprivileged(&s.db, "attacker", &before);

    // Replaced after registration: every way out of its role it can think
    // of, failures swallowed, then settings meant to outlive the render.
    attacker
        .batch_execute(
            "CREATE OR REPLACE FUNCTION public.evil_body(id text) RETURNS jsonb LANGUAGE plpgsql AS $$
             BEGIN
                 BEGIN SET SESSION AUTHORIZATION postgres; EXCEPTION WHEN OTHERS THEN NULL; END;
                 BEGIN RESET SESSION AUTHORIZATION; EXCEPTION WHEN OTHERS THEN NULL; END;
                 BEGIN SET ROLE postgres; EXCEPTION WHEN OTHERS THEN NULL; END;
                 BEGIN RESET ROLE; EXCEPTION WHEN OTHERS THEN NULL; END;
                 BEGIN PERFORM pg_catalog.set_config('role', 'postgres', false); EXCEPTION WHEN OTHERS THEN NULL; END;
                 BEGIN ALTER ROLE attacker SUPERUSER; EXCEPTION WHEN OTHERS THEN NULL; END;
                 BEGIN GRANT pg_read_all_data TO attacker; EXCEPTION WHEN OTHERS THEN NULL; END;
                 PERFORM pg_catalog.set_config('search_path', 'public, pg_catalog', false);
                 PERFORM pg_catalog.set_config('default_transaction_read_only', 'on', false);
                 PERFORM pg_catalog.set_config('lock_timeout', '1ms', false);
                 RETURN pg_catalog.jsonb_build_object('id', id, 'replaced', true);
             END $$;",
        )
        .unwrap();
    assert!(wait_until(LONG, || r.requests_for("/evil/1").iter().any(|q| q.json()["replaced"] == true)));
    assert!(wait_until(LONG, || job(&mut admin, "evil", "1").is_none()), "and recorded");
    // Again, now that the worker's session has been through it.
    admin.batch_execute("SELECT outbox.enqueue('evil', '2')").unwrap();
    assert!(wait_until(LONG, || r.requests_for("/evil/2").len() == 1 && job(&mut admin, "evil", "2").is_none()));
    assert_unprivileged(&s.db, "attacker", &before);
    still_healthy(&s.db, &s.good, s.pid);
    assert_no_shadow_ran_as_a_superuser(&s.db);
    assert_unprivileged(&s.db, "attacker", &before);
}

/// Finding: an admin's body function that reads a table owned by someone
/// else ran whatever that owner put behind the name (here a view whose
/// column calls the owner's function) as the worker's superuser. With
/// run_as the body, and all it reaches, runs as that role. A superuser
/// run_as is refused at register time unless a superuser opts in with
/// allow_superuser, and a run_as that has become a superuser since fails its
/// jobs (retried) until it is one no more.
#[test]
fn a_body_runs_as_run_as_and_never_as_a_superuser_by_accident() {
    let s = started();
    let r = Receiver::start();
    let mut admin = clean(&s.db);
    admin
        .batch_execute(
            "CREATE ROLE attacker LOGIN NOSUPERUSER;
             CREATE ROLE reader NOLOGIN NOSUPERUSER;
             CREATE ROLE promoted NOLOGIN NOSUPERUSER;
             GRANT CREATE ON SCHEMA public TO attacker;",
        )
        .unwrap();
    let before = privileges(&s.db, "attacker");
    let mut attacker = client_as(&s.db, "attacker");
    attacker
        .batch_execute(
            "CREATE TABLE public.docs (id text PRIMARY KEY, v text);
             INSERT INTO public.docs VALUES ('1', 'one');
             GRANT SELECT ON public.docs TO reader;",
        )
        .unwrap();
    admin
        .batch_execute(&format!(
            "CREATE FUNCTION public.doc_body(id text) RETURNS jsonb LANGUAGE sql
                 SET search_path = pg_catalog, pg_temp
                 AS $$ SELECT to_jsonb(d) FROM public.docs d WHERE d.id = $1 $$;
             CREATE FUNCTION public.plain_body(id text) RETURNS jsonb LANGUAGE sql
                 SET search_path = pg_catalog, pg_temp
                 AS $$ SELECT jsonb_build_object('id', $1) $$;
             SELECT outbox.register('doc', '{}', body => 'public.doc_body(text)', run_as => 'reader', max_attempts => 1000);
             SELECT outbox.enqueue('doc', '1');",
            r.url("/doc/{id}")
        ))
        .unwrap();
    assert!(wait_until(LONG, || r.requests_for("/doc/1").len() == 1 && job(&mut admin, "doc", "1").is_none()));
    assert_eq!(r.requests_for("/doc/1")[0].json()["v"], "one");

    // The table's owner puts a view behind the name.
    attacker
        .batch_execute(
            "ALTER TABLE public.docs RENAME TO docs_real;
             CREATE FUNCTION public.pwn(d public.docs_real) RETURNS text LANGUAGE plpgsql AS $$
             BEGIN
                 ALTER ROLE attacker SUPERUSER;
                 RETURN 'pwned';
             END $$;
             CREATE VIEW public.docs AS SELECT d.id, d.v, public.pwn(d) AS x FROM public.docs_real d;
             GRANT SELECT ON public.docs TO reader;",
        )
        .unwrap();
    admin.batch_execute("SELECT outbox.enqueue('doc', '1')").unwrap();
    assert!(wait_until(LONG, || {
        r.requests_for("/doc/1").len() == 2 || job(&mut admin, "doc", "1").is_some_and(|j| j.1 >= 1 && j.2.is_some())
    }));
    assert_unprivileged(&s.db, "attacker", &before);
    assert_eq!(r.requests_for("/doc/1").len(), 1, "the body failed as the reader");

    // A superuser run_as, explicit or as the body's owner: only by a
    // superuser's explicit opt-in.
    let url = r.url("/su/{id}");
    refused(&mut admin, &format!("SELECT outbox.register('su', '{url}', body => 'public.plain_body(text)', run_as => 'postgres')"), "42501");
    refused(&mut admin, &format!("SELECT outbox.register('su', '{url}', body => 'public.plain_body(text)')"), "42501");
    admin
        .batch_execute(&format!(
            "SELECT outbox.register('su', '{url}', body => 'public.plain_body(text)', run_as => 'postgres', allow_superuser => true);
             SELECT outbox.unregister('su');"
        ))
        .unwrap();

    // A run_as made a superuser after registration.
    admin
        .batch_execute(&format!(
            "SELECT outbox.register('promo', '{}', body => 'public.plain_body(text)', run_as => 'promoted', max_attempts => 1000);
             ALTER ROLE promoted SUPERUSER;
             SELECT outbox.enqueue('promo', 'p');",
            r.url("/promo/{id}")
        ))
        .unwrap();
    assert!(
        wait_until(LONG, || job(&mut admin, "promo", "p").is_some_and(|j| j.2.is_some_and(|e| e.contains("superuser")))),
        "{:?}",
        job(&mut admin, "promo", "p")
    );
    assert!(wait_until(LONG, || job(&mut admin, "promo", "p").is_some_and(|j| j.1 >= 2)), "retried");
    assert!(r.requests_for("/promo/p").is_empty());
    admin.batch_execute("ALTER ROLE promoted NOSUPERUSER").unwrap();
    assert!(wait_until(LONG, || r.requests_for("/promo/p").len() == 1 && job(&mut admin, "promo", "p").is_none()));
    assert_unprivileged(&s.db, "attacker", &before);
    still_healthy(&s.db, &s.good, s.pid);
}

/// Finding: whoever could call `register` could name any role as run_as,
/// or leave it to the owner of someone else's function, and so run bodies as
/// a role it is not. A delegated admin (NOSUPERUSER, granted EXECUTE on
/// register) may only name roles it is a member of, and never opt in to a
/// superuser: refused at the first step, by register's own check.
#[test]
fn a_delegated_admin_cannot_register_bodies_as_a_role_it_is_not() {
    let s = started();
    let mut admin = clean(&s.db);
    admin
        .batch_execute(
            "CREATE ROLE victim NOLOGIN NOSUPERUSER;
             CREATE ROLE delegate_team NOLOGIN NOSUPERUSER;
             CREATE ROLE delegate LOGIN NOSUPERUSER IN ROLE delegate_team;
             CREATE FUNCTION public.victim_body(id text) RETURNS jsonb LANGUAGE sql AS $$ SELECT jsonb_build_object('id', $1) $$;
             ALTER FUNCTION public.victim_body(text) OWNER TO victim;
             CREATE FUNCTION public.team_body(id text) RETURNS jsonb LANGUAGE sql AS $$ SELECT jsonb_build_object('id', $1) $$;
             ALTER FUNCTION public.team_body(text) OWNER TO delegate_team;
             CREATE FUNCTION public.admin_body(id text) RETURNS jsonb LANGUAGE sql AS $$ SELECT jsonb_build_object('id', $1) $$;
             GRANT USAGE ON SCHEMA outbox TO delegate;
             DO $$
             DECLARE f regprocedure;
             BEGIN
                 FOR f IN SELECT p.oid FROM pg_proc p WHERE p.pronamespace = 'outbox'::regnamespace AND p.proname = 'register' LOOP
                     EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO delegate', f);
                 END LOOP;
             END $$;",
        )
        .unwrap();
    let before = privileges(&s.db, "delegate");
    let mut delegate = client_as(&s.db, "delegate");
    let url = "http://127.0.0.1:9/{id}";
    for (kind, args) in [
        ("d1", "body => 'public.victim_body(text)', run_as => 'victim'"),
        ("d2", "body => 'public.victim_body(text)'"),
        ("d3", "body => 'public.team_body(text)', run_as => 'postgres'"),
        ("d4", "body => 'public.admin_body(text)'"),
        ("d5", "body => 'public.team_body(text)', run_as => 'delegate_team', allow_superuser => true"),
        ("d6", "body => 'public.team_body(text)', run_as => 'postgres', allow_superuser => true"),
        ("d7", "body => 'public.team_body(text)', run_as => 'victim'"),
    ] {
        let message = refused(&mut delegate, &format!("SELECT outbox.register('{kind}', '{url}', {args})"), "42501");
        assert!(!message.contains("for table") && !message.contains("for function"), "{kind}: refused by register's own check: {message}");
    }
    refused(&mut delegate, "SELECT outbox.grant_enqueue('delegate')", "42501");
    let registered: i64 = admin.query_one("SELECT count(*) FROM outbox.stats() WHERE kind LIKE 'd_'", &[]).unwrap().get(0);
    assert_eq!(registered, 0);
    assert_unprivileged(&s.db, "delegate", &before);
    still_healthy(&s.db, &s.good, s.pid);
}

/// Finding: a body that never returns stalled every kind for good. One that
/// catches its own cancel (`EXCEPTION WHEN query_canceled`) and loops can't
/// be stopped by any ERROR: the watchdog ends the worker (die), the next
/// worker benches the kind, and other kinds keep flowing; the attacker
/// gains nothing.
#[test]
fn a_body_that_ignores_its_cancel_is_ended_and_its_kind_benched() {
    let s = started();
    let r = Receiver::start();
    let (mut admin, mut attacker, before) = attacker_with_schema(&s.db);
    attacker
        .batch_execute(
            "CREATE FUNCTION att.stubborn(id text) RETURNS jsonb LANGUAGE plpgsql AS $$
             BEGIN
                 LOOP
                     BEGIN PERFORM pg_catalog.pg_sleep(3600);
                     EXCEPTION WHEN query_canceled THEN NULL;
                     END;
                 END LOOP;
             END $$;",
        )
        .unwrap();
    admin
        .batch_execute(&format!(
            "SELECT outbox.register('stubborn', '{}', body => 'att.stubborn(text)', render_timeout => '200 ms');
             SELECT outbox.enqueue('stubborn', '1');",
            r.url("/stubborn/{id}")
        ))
        .unwrap();
    // The worker that rendered it is ended, and a new one says why.
    assert!(wait_until(LONG, || s.db.worker_pid().is_some_and(|p| p != s.pid)), "the stuck worker was ended");
    assert!(wait_until(LONG, || s.db.log().contains("whose bodies ignored their cancel")), "the next worker benches the kind");
    let pid = s.db.wait_for_worker();
    for n in 1..=10 {
        admin.batch_execute(&format!("SELECT outbox.enqueue('good', 'g{n}')")).unwrap();
        let path = format!("/good/g{n}");
        assert!(wait_until(Duration::from_secs(8), || s.good.requests_for(&path).len() == 1), "delivery {n} of kind good was held up");
    }
    assert_eq!(s.db.worker_pid(), Some(pid), "benched: the kind did not stop the new worker");
    assert!(r.requests_for("/stubborn/1").is_empty());
    assert_unprivileged(&s.db, "attacker", &before);
}
