//! Kinds: which URL a kind of record goes to, and how. Admin only.

use crate::pg::errors::{raise, require, require_kind, unknown_kind};
use crate::rules::{signing, template};
use pgrx::datum::{DatumWithOid, Interval};
use pgrx::prelude::*;
use pgrx::JsonB;

/// Creates or updates a kind, with `$rotation` for the columns of a secret
/// rotation.
macro_rules! upsert_kind {
    ($rotation:literal) => {
        concat!(
            "
INSERT INTO outbox.kinds AS k (kind, url, body, headers, secret, timeout, max_attempts, on_missing,
                               run_as, render_timeout, allow_superuser)
VALUES ($1, $2, $3::pg_catalog.regprocedure, $4, $5, $6, $7, $8, $9::pg_catalog.regrole, $10, $11)
ON CONFLICT (kind) DO UPDATE
   SET url = excluded.url, body = excluded.body, headers = excluded.headers,
       secret = excluded.secret, timeout = excluded.timeout,",
            $rotation,
            "
       max_attempts = excluded.max_attempts, on_missing = excluded.on_missing,
       run_as = excluded.run_as, render_timeout = excluded.render_timeout,
       allow_superuser = excluded.allow_superuser,
       updated_at = pg_catalog.now()"
        )
    };
}
/// A new secret ends a rotation's overlap; the same one keeps it, and an
/// overlap that is over is cleared.
const UPSERT_KIND: &str = upsert_kind!(
    "
       previous_secret = CASE WHEN excluded.secret OPERATOR(pg_catalog.=) k.secret
                                   AND k.previous_secret_until OPERATOR(pg_catalog.>) pg_catalog.now() THEN k.previous_secret END,
       previous_secret_until = CASE WHEN excluded.secret OPERATOR(pg_catalog.=) k.secret
                                   AND k.previous_secret_until OPERATOR(pg_catalog.>) pg_catalog.now() THEN k.previous_secret_until END,"
);
/// A database still on 0.2.0 (`schema::at_0_3`).
const UPSERT_KIND_0_2: &str = upsert_kind!("");

const INSERT_STATS: &str = "INSERT INTO outbox.kind_stats (kind) VALUES ($1) ON CONFLICT DO NOTHING";

/// Whether function $1 is a body function, `f(text) RETURNS json|jsonb`
/// (not a set, not a procedure), and who owns it.
const BODY_FUNCTION: &str = "
SELECT p.pronargs OPERATOR(pg_catalog.=) 1
       AND p.proargtypes[0] OPERATOR(pg_catalog.=) 'pg_catalog.text'::pg_catalog.regtype
       AND p.prorettype OPERATOR(pg_catalog.=) ANY ('{pg_catalog.json,pg_catalog.jsonb}'::pg_catalog.regtype[])
       AND p.prokind OPERATOR(pg_catalog.=) 'f' AND NOT p.proretset,
       p.proowner
  FROM pg_catalog.pg_proc p WHERE p.oid OPERATOR(pg_catalog.=) $1";

/// The kind's row is locked so that concurrent `track` calls see the delete.
const LOCK_KIND: &str = "SELECT 1 FROM outbox.kinds WHERE kind OPERATOR(pg_catalog.=) $1 FOR UPDATE";

const COUNT_JOBS: &str = "SELECT pg_catalog.count(*) FROM outbox.jobs WHERE kind OPERATOR(pg_catalog.=) $1";
const DELETE_JOBS: &str = "
WITH q AS (DELETE FROM outbox.queue WHERE kind OPERATOR(pg_catalog.=) $1)
DELETE FROM outbox.inbox WHERE kind OPERATOR(pg_catalog.=) $1";
const DELETE_KIND: &str = "DELETE FROM outbox.kinds WHERE kind OPERATOR(pg_catalog.=) $1";
/// The secret becomes $2; the one it replaces (if any, and if the overlap
/// $3 is not zero) is kept as the previous one until now() + $3. Returns
/// the kind's current secret, before.
const ROTATE_SECRET: &str = "
WITH prior AS (SELECT kind, secret FROM outbox.kinds WHERE kind OPERATOR(pg_catalog.=) $1 FOR UPDATE)
UPDATE outbox.kinds k
   SET secret = $2,
       previous_secret = CASE WHEN $3 OPERATOR(pg_catalog.>) '0'::pg_catalog.interval THEN prior.secret END,
       previous_secret_until = CASE WHEN prior.secret IS NOT NULL AND $3 OPERATOR(pg_catalog.>) '0'::pg_catalog.interval
                                    THEN pg_catalog.now() OPERATOR(pg_catalog.+) $3 END,
       updated_at = pg_catalog.now()
  FROM prior
 WHERE k.kind OPERATOR(pg_catalog.=) prior.kind
RETURNING prior.secret";

/// Whether interval $1 is finite (PostgreSQL 17 and later have infinite
/// intervals).
const FINITE: &str = "SELECT pg_catalog.isfinite($1::pg_catalog.interval)";

const SET_MAX_IN_FLIGHT: &str = "
UPDATE outbox.kinds SET max_in_flight = $2, updated_at = pg_catalog.now() WHERE kind OPERATOR(pg_catalog.=) $1";

const SET_RATE_LIMIT: &str = "
UPDATE outbox.kinds SET rate_limit = $2, updated_at = pg_catalog.now() WHERE kind OPERATOR(pg_catalog.=) $1";

const SET_PAUSED: &str = "
UPDATE outbox.kinds SET paused = $2, updated_at = pg_catalog.now() WHERE kind OPERATOR(pg_catalog.=) $1";

/// The SQL statements of this module, for the qualification sweep.
#[cfg(test)]
pub(crate) const STATEMENTS: &[(&str, &str)] = &[
    ("UPSERT_KIND", UPSERT_KIND),
    ("UPSERT_KIND_0_2", UPSERT_KIND_0_2),
    ("INSERT_STATS", INSERT_STATS),
    ("BODY_FUNCTION", BODY_FUNCTION),
    ("LOCK_KIND", LOCK_KIND),
    ("COUNT_JOBS", COUNT_JOBS),
    ("DELETE_JOBS", DELETE_JOBS),
    ("DELETE_KIND", DELETE_KIND),
    ("SET_PAUSED", SET_PAUSED),
    ("ROTATE_SECRET", ROTATE_SECRET),
    ("FINITE", FINITE),
    ("SET_MAX_IN_FLIGHT", SET_MAX_IN_FLIGHT),
    ("SET_RATE_LIMIT", SET_RATE_LIMIT),
];

#[allow(clippy::too_many_arguments)]
#[pg_extern(sql = "
CREATE FUNCTION outbox.register(
    kind text, url text,
    body regprocedure DEFAULT NULL,
    headers jsonb DEFAULT '{}',
    secret text DEFAULT NULL,
    timeout interval DEFAULT '10 s',
    max_attempts int DEFAULT 25,
    on_missing text DEFAULT 'delete',
    run_as regrole DEFAULT NULL,
    render_timeout interval DEFAULT '1 s',
    allow_superuser boolean DEFAULT false
) RETURNS void VOLATILE LANGUAGE c SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
")]
fn register(
    kind: Option<&str>,
    url: Option<&str>,
    body: Option<pg_sys::Oid>,
    headers: Option<JsonB>,
    secret: Option<&str>,
    timeout: Option<Interval>,
    max_attempts: Option<i32>,
    on_missing: Option<&str>,
    run_as: Option<pg_sys::Oid>,
    render_timeout: Option<Interval>,
    allow_superuser: Option<bool>,
) {
    let kind = require_kind(kind);
    let url = require(url, "url");
    if let Err(e) = template::validate(url) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("invalid url template for kind \"{kind}\": {e}"),
            Some("Use an http or https URL; {id} and {kind} are replaced per job, e.g. 'https://api.example.com/users/{id}'."),
        );
    }
    let owner = body.map(check_body_function);
    let allow_superuser = require(allow_superuser, "allow_superuser");
    let run_as = run_as.or(owner);
    // Before any table access, for a clear error; the trigger on the table
    // checks every other write the same way.
    crate::pg::roles::check_kind(kind, body, run_as, allow_superuser);
    let render_timeout = require(render_timeout, "render_timeout");
    if !(10_000..=300_000_000).contains(&render_timeout.as_micros()) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "render_timeout must be between 10 milliseconds and 5 minutes",
            Some("It bounds how long one render of the kind's bodies may run or wait for a lock."),
        );
    }
    let headers = headers.unwrap_or_else(|| JsonB(serde_json::json!({})));
    check_headers(&headers.0);
    if let Some(s) = secret {
        if let Err(e) = signing::decode_secret(s) {
            raise(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("invalid secret for kind \"{kind}\": {e}"),
                Some("Use a Standard Webhooks secret: 'whsec_' followed by base64 of 24 to 64 random bytes."),
            );
        }
    }
    let timeout = require(timeout, "timeout");
    let micros = timeout.as_micros();
    if !(1_000..=3_600_000_000).contains(&micros) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "timeout must be between 1 millisecond and 1 hour",
            None,
        );
    }
    let max_attempts = require(max_attempts, "max_attempts");
    if !(1..=1000).contains(&max_attempts) {
        raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, "max_attempts must be between 1 and 1000", None);
    }
    let on_missing = require(on_missing, "on_missing");
    if on_missing != "delete" && on_missing != "skip" {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("invalid on_missing \"{on_missing}\""),
            Some("Use 'delete' (send a DELETE when the body function returns NULL) or 'skip'."),
        );
    }
    Spi::connect_mut(|c| {
        let args: [DatumWithOid; 11] = [
            kind.into(),
            url.into(),
            body.map_or(DatumWithOid::null::<pg_sys::Oid>(), DatumWithOid::from),
            headers.into(),
            secret.into(),
            timeout.into(),
            max_attempts.into(),
            on_missing.into(),
            run_as.map_or(DatumWithOid::null::<pg_sys::Oid>(), DatumWithOid::from),
            render_timeout.into(),
            allow_superuser.into(),
        ];
        let upsert = if crate::schema::at_0_3() { UPSERT_KIND } else { UPSERT_KIND_0_2 };
        c.update(upsert, None, &args).unwrap_or_else(|e| panic!("upserting kind: {e}"));
        c.update(INSERT_STATS, None, &[kind.into()]).unwrap_or_else(|e| panic!("creating kind stats: {e}"));
    });
    crate::capture::wake::kinds_changed();
    crate::api::grants::forget();
}

/// Checks that `f` is a body function; returns its owner.
/// Checks every write of what decides who bodies run as (body, run_as,
/// allow_superuser), however it is made: `register`, or a direct INSERT,
/// UPDATE or COPY by an admin granted the table. Otherwise a delegated admin
/// could set run_as, or allow_superuser, with an UPDATE.
#[pg_trigger(sql = "
CREATE FUNCTION outbox.kinds_checked() RETURNS trigger
LANGUAGE c SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
CREATE TRIGGER kinds_checked BEFORE INSERT OR UPDATE ON outbox.kinds
    FOR EACH ROW EXECUTE FUNCTION outbox.kinds_checked();
ALTER TABLE outbox.kinds ENABLE ALWAYS TRIGGER kinds_checked;
")]
fn kinds_checked<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, std::convert::Infallible> {
    let td = trigger.trigger_data();
    let update = matches!(trigger.op(), Ok(PgTriggerOperation::Update));
    // SAFETY: Postgres hands us the fired trigger, its row(s) and the table's
    // descriptor, valid for this call; each column is looked up by name.
    unsafe {
        let tupdesc = (*td.tg_relation).rd_att;
        let get = |tuple: *mut pg_sys::HeapTupleData, name: &std::ffi::CStr| {
            let attno = pg_sys::SPI_fnumber(tupdesc, name.as_ptr());
            let mut is_null = false;
            let datum = pg_sys::heap_getattr(tuple, attno, tupdesc, &mut is_null);
            (!is_null).then_some(datum)
        };
        let decides = |tuple| {
            (
                get(tuple, c"body").map(|d| pg_sys::Oid::from(d.value() as u32)),
                get(tuple, c"run_as").map(|d| pg_sys::Oid::from(d.value() as u32)),
                get(tuple, c"allow_superuser").is_some_and(|d| d.value() != 0),
            )
        };
        let (old, new) = if update { (Some(td.tg_trigtuple), td.tg_newtuple) } else { (None, td.tg_trigtuple) };
        let (body, run_as, allow_superuser) = decides(new);
        if old.is_none_or(|old| decides(old) != (body, run_as, allow_superuser)) {
            let kind = get(new, c"kind").and_then(|d| String::from_datum(d, false)).unwrap_or_default();
            crate::pg::roles::check_kind(&kind, body, run_as, allow_superuser);
        }
    }
    Ok(trigger.new())
}

fn check_body_function(f: pg_sys::Oid) -> pg_sys::Oid {
    let found = Spi::get_two_with_args::<bool, pg_sys::Oid>(BODY_FUNCTION, &[f.into()]).unwrap_or((None, None));
    match found {
        (Some(true), Some(owner)) => owner,
        _ => raise(
            PgSqlErrorCode::ERRCODE_INVALID_FUNCTION_DEFINITION,
            "body function has the wrong signature",
            Some("A body function takes the id as text and returns json or jsonb: f(id text) RETURNS jsonb."),
        ),
    }
}

/// Header names the worker sets itself, which a kind may not override.
const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
    "connection",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "outbox-sequence",
];

fn check_headers(headers: &serde_json::Value) {
    let bad = |msg: String| -> ! {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            msg,
            Some("headers is a JSON object of header names to string values, e.g. '{\"Authorization\": \"Bearer ...\"}'."),
        )
    };
    let Some(map) = headers.as_object() else { bad("headers must be a JSON object".into()) };
    for (name, value) in map {
        let token = !name.is_empty()
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token {
            bad(format!("invalid header name \"{name}\""));
        }
        if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            bad(format!("header \"{name}\" is set by outbox and cannot be overridden"));
        }
        let Some(v) = value.as_str() else { bad(format!("header \"{name}\" must have a string value")) };
        if v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            bad(format!("header \"{name}\" must not contain CR, LF or NUL"));
        }
    }
}

#[pg_extern(sql = "
CREATE FUNCTION outbox.unregister(kind text, \"cascade\" boolean DEFAULT false)
RETURNS void VOLATILE LANGUAGE c SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
")]
fn unregister(kind: Option<&str>, cascade: Option<bool>) {
    let kind = require_kind(kind);
    let cascade = cascade.unwrap_or(false);
    Spi::connect_mut(|c| {
        let locked = c.update(LOCK_KIND, None, &[kind.into()]).unwrap_or_else(|e| panic!("locking kind: {e}"));
        if locked.is_empty() {
            unknown_kind(kind);
        }
        let triggers = crate::capture::triggers::kind_triggers(c, kind, None);
        let jobs = c
            .select(COUNT_JOBS, None, &[kind.into()])
            .ok()
            .and_then(|t| t.first().get_one::<i64>().ok().flatten())
            .unwrap_or(0);
        if !cascade && (!triggers.is_empty() || jobs > 0) {
            // A tracked table has a row trigger and TRUNCATE triggers (on its
            // partitions too): name each table once.
            let mut tables: Vec<&str> = triggers.iter().map(|t| t.table.as_str()).collect();
            tables.sort_unstable();
            tables.dedup();
            raise(
                PgSqlErrorCode::ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
                format!(
                    "cannot unregister kind \"{kind}\": tracking triggers on {} table(s) [{}] and {jobs} job(s) remain",
                    tables.len(),
                    tables.join(", ")
                ),
                Some("Untrack the tables first, or call outbox.unregister(kind, cascade => true) to drop the triggers and jobs too."),
            );
        }
        crate::capture::triggers::drop_triggers(c, &triggers);
        c.update(DELETE_JOBS, None, &[kind.into()]).unwrap_or_else(|e| panic!("deleting jobs: {e}"));
        c.update(DELETE_KIND, None, &[kind.into()]).unwrap_or_else(|e| panic!("deleting kind: {e}"));
    });
    crate::capture::wake::kinds_changed();
    crate::api::grants::forget();
}

/// Runs `sql`, which sets one column of kind $1 to $2, raises 42704 if no
/// such kind, and tells the worker (a resumed kind's jobs go out at once).
fn set_column(sql: &str, kind: &str, value: DatumWithOid<'_>) {
    let updated =
        Spi::connect_mut(|c| c.update(sql, None, &[kind.into(), value]).map(|t| t.len()).unwrap_or_else(|e| panic!("{e}")));
    if updated == 0 {
        unknown_kind(kind);
    }
    crate::capture::wake::kinds_changed();
}

fn set_paused(kind: Option<&str>, paused: bool) {
    let kind = require_kind(kind);
    set_column(SET_PAUSED, kind, paused.into());
    crate::api::grants::forget();
}

/// Replaces a kind's secret without a moment when receivers reject its
/// requests: for `overlap`, each request carries two signatures, with the
/// new secret and with the old one, so a receiver may switch keys at any
/// time within it. After it, only the new one.
#[pg_extern(sql = "
CREATE FUNCTION outbox.rotate_secret(kind text, new_secret text, overlap interval DEFAULT '24 hours')
RETURNS void VOLATILE LANGUAGE c SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
")]
fn rotate_secret(kind: Option<&str>, new_secret: Option<&str>, overlap: Option<Interval>) {
    let kind = require_kind(kind);
    let new_secret = require(new_secret, "new_secret");
    let overlap = require(overlap, "overlap");
    if let Err(e) = signing::decode_secret(new_secret) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("invalid secret for kind \"{kind}\": {e}"),
            Some("Use a Standard Webhooks secret: 'whsec_' followed by base64 of 24 to 64 random bytes."),
        );
    }
    let finite = Spi::get_one_with_args::<bool>(FINITE, &[overlap.into()]).unwrap_or_else(|e| panic!("{e}")) == Some(true);
    if overlap.as_micros() < 0 || !finite {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "overlap must be a finite duration of zero or more",
            Some("During the overlap requests carry both signatures, e.g. interval '24 hours'; '0' switches at once."),
        );
    }
    let old = Spi::connect_mut(|c| {
        let rows = c.update(ROTATE_SECRET, None, &[kind.into(), new_secret.into(), overlap.into()]).unwrap_or_else(|e| panic!("rotating the secret: {e}"));
        (!rows.is_empty()).then(|| rows.first().get_one::<String>().unwrap_or_else(|e| panic!("rotating the secret: {e}")))
    });
    match old {
        None => unknown_kind(kind),
        Some(Some(old)) if old == new_secret => raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("kind \"{kind}\" already has this secret"),
            Some("Generate a new one: 'whsec_' followed by base64 of 24 to 64 random bytes."),
        ),
        Some(_) => {}
    }
    crate::capture::wake::kinds_changed();
}

/// Bounds how many of a kind's requests are in flight at once (NULL: only
/// `outbox.concurrency` does), so that one slow receiver can't take every
/// slot from the others.
#[pg_extern(sql = "
CREATE FUNCTION outbox.set_max_in_flight(kind text, max_in_flight int)
RETURNS void VOLATILE LANGUAGE c SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
")]
fn set_max_in_flight(kind: Option<&str>, max_in_flight: Option<i32>) {
    let kind = require_kind(kind);
    if max_in_flight.is_some_and(|n| !(1..=1024).contains(&n)) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "max_in_flight must be between 1 and 1024",
            Some("NULL removes the limit: outbox.concurrency alone bounds the kind."),
        );
    }
    set_column(SET_MAX_IN_FLIGHT, kind, max_in_flight.into());
}

/// Bounds how many of a kind's requests go out a second, evenly (NULL: no
/// limit), for receivers that throttle or bill by the request.
#[pg_extern(sql = "
CREATE FUNCTION outbox.set_rate_limit(kind text, per_second double precision)
RETURNS void VOLATILE LANGUAGE c SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
")]
fn set_rate_limit(kind: Option<&str>, per_second: Option<f64>) {
    let kind = require_kind(kind);
    if per_second.is_some_and(|r| !(r > 0.0 && r <= 100_000.0)) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "per_second must be more than 0 and at most 100000",
            Some("Requests a second, e.g. 0.5 for one every two seconds; NULL removes the limit."),
        );
    }
    set_column(SET_RATE_LIMIT, kind, per_second.into());
}

/// Stops deliveries of a kind; jobs keep queueing.
#[pg_extern(schema = "outbox")]
#[search_path(pg_catalog, pg_temp)]
fn pause(kind: Option<&str>) {
    set_paused(kind, true);
}

/// Resumes deliveries of a paused kind.
#[pg_extern(schema = "outbox")]
#[search_path(pg_catalog, pg_temp)]
fn resume(kind: Option<&str>) {
    set_paused(kind, false);
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn err_of(sql: &str) -> String {
        crate::testing::sqlstate_of(sql)
    }

    #[pg_test]
    fn register_upserts_and_validates() {
        Spi::run("SELECT outbox.register('user', 'http://127.0.0.1:9/u/{id}')").unwrap();
        Spi::run("SELECT outbox.register('user', 'https://example.com/{kind}/{id}', max_attempts => 3)").unwrap();
        let (url, max) = Spi::get_two::<String, i32>("SELECT url, max_attempts FROM outbox.kinds WHERE kind = 'user'").unwrap();
        assert_eq!(url.as_deref(), Some("https://example.com/{kind}/{id}"));
        assert_eq!(max, Some(3));
        let cases = [
            ("SELECT outbox.register(NULL, 'http://h/{id}')", "22004"),
            ("SELECT outbox.register('', 'http://h/{id}')", "22023"),
            ("SELECT outbox.register('k', NULL)", "22004"),
            ("SELECT outbox.register('k', 'ftp://h/{id}')", "22023"),
            ("SELECT outbox.register('k', 'http:///x')", "22023"),
            ("SELECT outbox.register('k', 'http://h/{nope}')", "22023"),
            ("SELECT outbox.register('k', 'http://h /x')", "22023"),
            ("SELECT outbox.register('k', 'http://h/{id}', body => 'pg_catalog.now()'::regprocedure)", "42P13"),
            ("SELECT outbox.register('k', 'http://h/{id}', headers => '[]')", "22023"),
            ("SELECT outbox.register('k', 'http://h/{id}', headers => '{\"a\": 1}')", "22023"),
            ("SELECT outbox.register('k', 'http://h/{id}', headers => '{\"bad name\": \"x\"}')", "22023"),
            ("SELECT outbox.register('k', 'http://h/{id}', headers => '{\"webhook-id\": \"x\"}')", "22023"),
            ("SELECT outbox.register('k', 'http://h/{id}', headers => '{\"x\": \"a\\r\\nb\"}')", "22023"),
            ("SELECT outbox.register('k', 'http://h/{id}', secret => 'not base64!')", "22023"),
            ("SELECT outbox.register('k', 'http://h/{id}', timeout => '0 s')", "22023"),
            ("SELECT outbox.register('k', 'http://h/{id}', timeout => '2 hours')", "22023"),
            ("SELECT outbox.register('k', 'http://h/{id}', max_attempts => 0)", "22023"),
            ("SELECT outbox.register('k', 'http://h/{id}', on_missing => 'explode')", "22023"),
            ("SELECT outbox.register(repeat('k', 201), 'http://h/{id}')", "22001"),
        ];
        crate::testing::assert_sqlstates(&cases);
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM outbox.kinds WHERE kind = 'k'").unwrap(), Some(0));
    }

    #[pg_test]
    fn register_accepts_a_body_function_and_secret() {
        Spi::run("CREATE FUNCTION public.user_body(id text) RETURNS jsonb LANGUAGE sql AS $$ SELECT jsonb_build_object('id', id) $$").unwrap();
        Spi::run("CREATE ROLE outbox_test_reader NOLOGIN").unwrap();
        Spi::run(
            "SELECT outbox.register('user', 'http://h/{id}', body => 'public.user_body(text)', run_as => 'outbox_test_reader',
                    secret => 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw', headers => '{\"Authorization\": \"Bearer t\"}')",
        )
        .unwrap();
        let (body, run_as) = Spi::get_two::<String, String>("SELECT body::text, run_as::text FROM outbox.kinds WHERE kind = 'user'").unwrap();
        assert_eq!(body.as_deref(), Some("user_body(text)"));
        assert_eq!(run_as.as_deref(), Some("outbox_test_reader"));
    }

    /// Bodies never run as a superuser by accident: not by default, not for
    /// a registrar who can't act as the role, not at a non-superuser's word.
    #[pg_test]
    fn run_as_defaults_to_the_owner_and_refuses_superusers() {
        Spi::run("CREATE ROLE outbox_test_owner NOLOGIN; CREATE ROLE outbox_test_other NOLOGIN; CREATE ROLE outbox_test_admin NOLOGIN").unwrap();
        Spi::run("CREATE FUNCTION public.owned_body(id text) RETURNS jsonb LANGUAGE sql AS $$ SELECT NULL::jsonb $$").unwrap();
        // Owned by a superuser, no run_as: refused, with the way out.
        assert_eq!(err_of("SELECT outbox.register('k', 'http://h/{id}', body => 'public.owned_body(text)')"), "42501");
        let msg = crate::testing::error_of("SELECT outbox.register('k', 'http://h/{id}', body => 'public.owned_body(text)')").unwrap();
        assert!(msg.contains("superuser"), "{msg}");
        assert_eq!(err_of("SELECT outbox.register('k', 'http://h/{id}', body => 'public.owned_body(text)', run_as => 'postgres')"), "42501");
        // The explicit opt-in, from a superuser.
        Spi::run("SELECT outbox.register('k', 'http://h/{id}', body => 'public.owned_body(text)', allow_superuser => true)").unwrap();
        // Owned by a plain role: it is the default run_as.
        Spi::run("ALTER FUNCTION public.owned_body(text) OWNER TO outbox_test_owner").unwrap();
        Spi::run("SELECT outbox.register('k', 'http://h/{id}', body => 'public.owned_body(text)')").unwrap();
        let run_as = Spi::get_one::<String>("SELECT run_as::text FROM outbox.kinds WHERE kind = 'k'").unwrap();
        assert_eq!(run_as.as_deref(), Some("outbox_test_owner"));
        // A delegated admin: only roles it is a member of, never the opt-in.
        Spi::run("GRANT EXECUTE ON FUNCTION outbox.register TO outbox_test_admin; GRANT outbox_test_owner TO outbox_test_admin").unwrap();
        Spi::run("GRANT ALL ON outbox.kinds, outbox.kind_stats TO outbox_test_admin").unwrap();
        Spi::run("SET ROLE outbox_test_admin").unwrap();
        let cases = [
            ("SELECT outbox.register('k2', 'http://h/{id}', body => 'public.owned_body(text)', run_as => 'outbox_test_other')", "42501"),
            ("SELECT outbox.register('k2', 'http://h/{id}', body => 'public.owned_body(text)', run_as => 'postgres')", "42501"),
            ("SELECT outbox.register('k2', 'http://h/{id}', body => 'public.owned_body(text)', allow_superuser => true)", "42501"),
            ("SELECT outbox.register('k2', 'http://h/{id}', body => 'public.owned_body(text)', run_as => 'outbox_test_owner')", "00000"),
        ];
        crate::testing::assert_sqlstates(&cases);
        // Nor through the table, which it may write; what it may not decide
        // stays as a superuser left it (pause and resume still work).
        Spi::run("RESET ROLE; GRANT EXECUTE ON FUNCTION outbox.pause(text) TO outbox_test_admin; SET ROLE outbox_test_admin").unwrap();
        let direct = [
            ("UPDATE outbox.kinds SET run_as = 'outbox_test_other' WHERE kind = 'k2'", "42501"),
            ("UPDATE outbox.kinds SET run_as = 'postgres', allow_superuser = true WHERE kind = 'k2'", "42501"),
            ("UPDATE outbox.kinds SET body = 'public.owned_body(text)', allow_superuser = true WHERE kind = 'k2'", "42501"),
            ("INSERT INTO outbox.kinds (kind, url, body, run_as) VALUES ('k4', 'http://h/', 'public.owned_body(text)', 'postgres')", "42501"),
            ("UPDATE outbox.kinds SET url = 'http://h2/{id}' WHERE kind = 'k2'", "00000"),
            ("SELECT outbox.pause('k')", "00000"),
        ];
        crate::testing::assert_sqlstates(&direct);
        Spi::run("RESET ROLE").unwrap();
        // A SECURITY DEFINER body runs as its owner: a superuser owner needs
        // the opt-in, whatever run_as says.
        Spi::run("CREATE FUNCTION public.definer_body(id text) RETURNS jsonb LANGUAGE sql SECURITY DEFINER AS $$ SELECT NULL::jsonb $$").unwrap();
        assert_eq!(err_of("SELECT outbox.register('k5', 'http://h/{id}', body => 'public.definer_body(text)', run_as => 'outbox_test_owner')"), "42501");
        Spi::run("SELECT outbox.register('k5', 'http://h/{id}', body => 'public.definer_body(text)', run_as => 'outbox_test_owner', allow_superuser => true)").unwrap();
        let bad = [
            ("SELECT outbox.register('k3', 'http://h/{id}', render_timeout => '1 ms')", "22023"),
            ("SELECT outbox.register('k3', 'http://h/{id}', render_timeout => '1 hour')", "22023"),
            ("SELECT outbox.register('k3', 'http://h/{id}', render_timeout => NULL)", "22004"),
            ("SELECT outbox.register('k3', 'http://h/{id}', allow_superuser => NULL)", "22004"),
        ];
        crate::testing::assert_sqlstates(&bad);
    }

    #[pg_test]
    fn unregister_refuses_with_jobs_or_triggers_unless_cascade() {
        Spi::run("SELECT outbox.register('user', 'http://h/{id}')").unwrap();
        Spi::run("CREATE TABLE public.users (id bigint PRIMARY KEY, name text)").unwrap();
        Spi::run("SELECT outbox.track('public.users', 'user')").unwrap();
        assert_eq!(err_of("SELECT outbox.unregister('user')"), "2BP01");
        Spi::run("SELECT outbox.untrack('public.users', 'user')").unwrap();
        Spi::run("SELECT outbox.enqueue('user', 1)").unwrap();
        assert_eq!(err_of("SELECT outbox.unregister('user')"), "2BP01");
        Spi::run("SELECT outbox.track('public.users', 'user')").unwrap();
        Spi::run("INSERT INTO public.users VALUES (5, 'e')").unwrap();
        Spi::run("SELECT outbox.unregister('user', cascade => true)").unwrap();
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM outbox.jobs").unwrap(), Some(0));
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.users'::regclass").unwrap(),
            Some(0)
        );
        assert_eq!(err_of("SELECT outbox.unregister('user')"), "42704");
        assert_eq!(err_of("SELECT outbox.unregister(NULL)"), "22004");
    }

    #[pg_test]
    fn rotate_secret_keeps_the_replaced_secret_for_the_overlap() {
        let (a, b, c) = (
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4",
            "whsec_QUJDREVGR0hJSktMTU5PUFFSU1RVVldY",
        );
        let state = |kind: &str| {
            Spi::get_three_with_args::<String, String, bool>(
                "SELECT secret, previous_secret, previous_secret_until = now() + interval '1 hour' FROM outbox.kinds WHERE kind = $1",
                &[kind.into()],
            )
            .unwrap()
        };
        Spi::run(&format!("SELECT outbox.register('k', 'http://h/{{id}}', secret => '{a}')")).unwrap();
        Spi::run(&format!("SELECT outbox.rotate_secret('k', '{b}', '1 hour')")).unwrap();
        assert_eq!(state("k"), (Some(b.into()), Some(a.into()), Some(true)));
        // Registered again with the same secret, the overlap goes on; with
        // another, it ends.
        Spi::run(&format!("SELECT outbox.register('k', 'http://h/{{id}}', secret => '{b}')")).unwrap();
        assert_eq!(state("k"), (Some(b.into()), Some(a.into()), Some(true)));
        Spi::run(&format!("SELECT outbox.register('k', 'http://h/{{id}}', secret => '{c}')")).unwrap();
        assert_eq!(state("k"), (Some(c.into()), None, None));
        // A second rotation keeps only the secret it replaces; no overlap
        // keeps none.
        Spi::run(&format!("SELECT outbox.rotate_secret('k', '{a}', '1 hour')")).unwrap();
        Spi::run(&format!("SELECT outbox.rotate_secret('k', '{b}', '1 hour')")).unwrap();
        assert_eq!(state("k"), (Some(b.into()), Some(a.into()), Some(true)));
        Spi::run(&format!("SELECT outbox.rotate_secret('k', '{c}', '0')")).unwrap();
        assert_eq!(state("k"), (Some(c.into()), None, None));
        // A kind without a secret gets its first one.
        Spi::run("SELECT outbox.register('plain', 'http://h/{id}')").unwrap();
        Spi::run(&format!("SELECT outbox.rotate_secret('plain', '{a}')")).unwrap();
        assert_eq!(state("plain"), (Some(a.into()), None, None));
        let cases = [
            (format!("SELECT outbox.rotate_secret('nope', '{a}')"), "42704"),
            (format!("SELECT outbox.rotate_secret('k', '{c}')"), "22023"),
            ("SELECT outbox.rotate_secret('k', 'not base64!')".to_string(), "22023"),
            (format!("SELECT outbox.rotate_secret('k', '{a}', '-1 s')"), "22023"),
            (format!("SELECT outbox.rotate_secret('k', '{a}', NULL)"), "22004"),
            ("SELECT outbox.rotate_secret('k', NULL)".to_string(), "22004"),
        ];
        for (sql, code) in cases {
            assert_eq!(err_of(&sql), code, "{sql}");
        }
    }

    #[pg_test]
    fn set_max_in_flight_bounds_a_kind_or_not() {
        Spi::run("SELECT outbox.register('k', 'http://h/{id}')").unwrap();
        let limit = || Spi::get_one::<i32>("SELECT max_in_flight FROM outbox.kinds WHERE kind = 'k'").unwrap();
        assert_eq!(limit(), None);
        Spi::run("SELECT outbox.set_max_in_flight('k', 4)").unwrap();
        assert_eq!(limit(), Some(4));
        // register leaves it as it is.
        Spi::run("SELECT outbox.register('k', 'http://h/{id}', max_attempts => 3)").unwrap();
        assert_eq!(limit(), Some(4));
        Spi::run("SELECT outbox.set_max_in_flight('k', NULL)").unwrap();
        assert_eq!(limit(), None);
        for (sql, code) in [
            ("SELECT outbox.set_max_in_flight('k', 0)", "22023"),
            ("SELECT outbox.set_max_in_flight('k', 1025)", "22023"),
            ("SELECT outbox.set_max_in_flight('nope', 1)", "42704"),
            ("SELECT outbox.set_max_in_flight(NULL, 1)", "22004"),
        ] {
            assert_eq!(err_of(sql), code, "{sql}");
        }
    }

    #[pg_test]
    fn set_rate_limit_validates_and_stores() {
        Spi::run("SELECT outbox.register('k', 'http://h/{id}')").unwrap();
        let limit = || Spi::get_one::<f64>("SELECT rate_limit FROM outbox.kinds WHERE kind = 'k'").unwrap();
        Spi::run("SELECT outbox.set_rate_limit('k', 0.5)").unwrap();
        assert_eq!(limit(), Some(0.5));
        Spi::run("SELECT outbox.set_rate_limit('k', NULL)").unwrap();
        assert_eq!(limit(), None);
        for (sql, code) in [
            ("SELECT outbox.set_rate_limit('k', 0)", "22023"),
            ("SELECT outbox.set_rate_limit('k', -1)", "22023"),
            ("SELECT outbox.set_rate_limit('k', 'NaN')", "22023"),
            ("SELECT outbox.set_rate_limit('k', 'Infinity')", "22023"),
            ("SELECT outbox.set_rate_limit('k', 100001)", "22023"),
            ("SELECT outbox.set_rate_limit('nope', 1)", "42704"),
        ] {
            assert_eq!(err_of(sql), code, "{sql}");
        }
    }

    #[pg_test]
    fn pause_and_resume() {
        Spi::run("SELECT outbox.register('user', 'http://h/{id}')").unwrap();
        Spi::run("SELECT outbox.pause('user')").unwrap();
        assert_eq!(Spi::get_one::<bool>("SELECT paused FROM outbox.kinds WHERE kind = 'user'").unwrap(), Some(true));
        Spi::run("SELECT outbox.resume('user')").unwrap();
        assert_eq!(Spi::get_one::<bool>("SELECT paused FROM outbox.kinds WHERE kind = 'user'").unwrap(), Some(false));
        assert_eq!(err_of("SELECT outbox.pause('nope')"), "42704");
        assert_eq!(err_of("SELECT outbox.resume('')"), "22023");
    }
}

#[cfg(test)]
mod qualified {
    #[test]
    fn every_statement_names_the_schema_of_its_functions_and_operators() {
        crate::testing::sql_check::assert_qualified(super::STATEMENTS);
    }
}
