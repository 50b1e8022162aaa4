//! Turning claimed jobs into requests: the kind's URL template, its body
//! function (called now, so the body is the record's current state), its
//! headers and signing key.

use super::http::{Method, Request};
use super::queue::Claimed;
use crate::pg::settings::with_settings;
use crate::pg::subxact::try_subtransaction;
use crate::rules::{signing, template};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Header that grows with every delivery of a record, so a receiver can drop
/// a stale PUT that arrives late.
const SEQUENCE_HEADER: &str = "outbox-sequence";

/// Everything the worker needs to know about each kind, with `$previous`
/// for the columns of 0.3.0 (`max_in_flight`, `rate_limit`, the secret a
/// rotation replaced). The body function's name is regproc
/// output under the worker's pinned search_path, so it is schema-qualified
/// unless it lives in pg_catalog.
macro_rules! load_kinds {
    ($previous:literal) => {
        concat!(
            "
SELECT kind, url, body::pg_catalog.regproc::pg_catalog.text AS body, headers::pg_catalog.text AS headers, secret,
       ",
            $previous,
            "
       (extract(epoch FROM timeout) OPERATOR(pg_catalog.*) 1000)::bigint AS timeout_ms,
       max_attempts, on_missing, paused, run_as::pg_catalog.oid AS run_as, allow_superuser,
       (extract(epoch FROM render_timeout) OPERATOR(pg_catalog.*) 1000)::bigint AS render_timeout_ms,
       (SELECT p.proowner FROM pg_catalog.pg_proc p
         WHERE p.oid OPERATOR(pg_catalog.=) body AND p.prosecdef) AS definer
  FROM outbox.kinds"
        )
    };
}
const LOAD_KINDS: &str = load_kinds!(
    "max_in_flight, rate_limit,
       CASE WHEN previous_secret_until OPERATOR(pg_catalog.>) pg_catalog.now() THEN previous_secret END AS previous_secret,
       (extract(epoch FROM GREATEST(LEAST(previous_secret_until, '9999-12-31'::pg_catalog.timestamptz),
                                    '1970-01-01'::pg_catalog.timestamptz)) OPERATOR(pg_catalog.*) 1000)::bigint
           AS previous_until_ms,"
);
/// A database still on 0.2.0 (`schema::at_0_3`).
const LOAD_KINDS_0_2: &str =
    load_kinds!("NULL::pg_catalog.int4 AS max_in_flight, NULL::pg_catalog.float8 AS rate_limit,
       NULL::pg_catalog.text AS previous_secret, NULL::pg_catalog.int8 AS previous_until_ms,");

pub struct Kind {
    pub url: String,
    /// The body function, as a name Postgres resolves (regproc output).
    pub body_fn: Option<String>,
    /// The role body functions run as, and whether it may be a superuser.
    pub run_as: Option<pg_sys::Oid>,
    pub allow_superuser: bool,
    /// The owner of a SECURITY DEFINER body, which it runs as whatever
    /// run_as says.
    pub definer: Option<pg_sys::Oid>,
    /// How long one turn's render of this kind's bodies may take in all.
    pub render_timeout: Duration,
    pub headers: Vec<(String, String)>,
    pub key: Option<Arc<Vec<u8>>>,
    /// The secret `rotate_secret` replaced, signed with too until the
    /// instant (its overlap).
    pub previous_key: Option<(Arc<Vec<u8>>, SystemTime)>,
    pub timeout: Duration,
    /// At most this many requests of the kind in flight at once.
    pub max_in_flight: Option<usize>,
    /// At most this many requests a second.
    pub rate_limit: Option<f64>,
    pub max_attempts: i32,
    pub delete_when_missing: bool,
    pub paused: bool,
    /// The URL's host depends on the record id: don't keep connections.
    pub host_per_record: bool,
}

impl Kind {
    /// The keys a request signed `now` carries: the secret, and the one it
    /// replaced while their overlap lasts.
    fn keys(&self, now: SystemTime) -> Vec<Arc<Vec<u8>>> {
        let previous = self.previous_key.as_ref().filter(|(_, until)| now < *until).map(|(key, _)| Arc::clone(key));
        self.key.iter().cloned().chain(previous).collect()
    }
}

/// Every kind, its columns read by name. The table's CHECKs and NOT NULLs
/// hold the rules (and its defaults the defaults): a NULL where the table
/// forbids one is a broken catalog, and fails the turn.
pub fn load_kinds(c: &mut SpiClient<'_>) -> HashMap<String, Kind> {
    let sql = if crate::schema::at_0_3() { LOAD_KINDS } else { LOAD_KINDS_0_2 };
    let rows = super::plans::execute(c, sql, &[], &[]).unwrap_or_else(|e| panic!("loading kinds: {e}"));
    let mut kinds = HashMap::new();
    for r in rows {
        let headers: Vec<(String, String)> =
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&required::<String>(&r, "headers"))
                .map(|m| m.into_iter().filter_map(|(k, v)| Some((k, v.as_str()?.to_string()))).collect())
                .unwrap_or_default();
        let decode = |column: &str| optional::<String>(&r, column).and_then(|s| signing::decode_secret(&s).ok()).map(Arc::new);
        let key = decode("secret");
        let previous_until = optional::<i64>(&r, "previous_until_ms").map(|ms| UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64));
        let previous_key = decode("previous_secret").zip(previous_until);
        let url: String = required(&r, "url");
        let ms = |name: &str| Duration::from_millis(required::<i64>(&r, name).max(1) as u64);
        kinds.insert(
            required(&r, "kind"),
            Kind {
                host_per_record: template::id_in_authority(&url),
                url,
                body_fn: optional(&r, "body"),
                run_as: optional(&r, "run_as"),
                allow_superuser: required(&r, "allow_superuser"),
                definer: optional(&r, "definer"),
                render_timeout: ms("render_timeout_ms"),
                headers,
                key,
                previous_key,
                timeout: ms("timeout_ms"),
                max_in_flight: optional::<i32>(&r, "max_in_flight").map(|n| n.max(1) as usize),
                rate_limit: optional::<f64>(&r, "rate_limit").filter(|r| *r > 0.0),
                max_attempts: required(&r, "max_attempts"),
                delete_when_missing: required::<String>(&r, "on_missing") != "skip",
                paused: required(&r, "paused"),
            },
        );
    }
    kinds
}

/// Column `name` of a [`LOAD_KINDS`] row, which may be NULL.
fn optional<T: pgrx::FromDatum + pgrx::IntoDatum>(r: &pgrx::spi::SpiHeapTupleData<'_>, name: &str) -> Option<T> {
    r.get_by_name::<T, _>(name).unwrap_or_else(|e| panic!("outbox.kinds.{name}: {e}"))
}

/// Column `name` of a [`LOAD_KINDS`] row, which the table makes NOT NULL.
fn required<T: pgrx::FromDatum + pgrx::IntoDatum>(r: &pgrx::spi::SpiHeapTupleData<'_>, name: &str) -> T {
    optional(r, name).unwrap_or_else(|| panic!("outbox.kinds.{name} is NULL"))
}

/// What a claimed job turned into.
pub enum Rendered {
    Send(Request),
    /// The record is gone and the kind says `skip`: nothing to send.
    Skip,
    /// The request could not be built (bad URL, body function raised, body
    /// over `outbox.max_body_bytes`).
    Broken(String),
}

/// A body and its size in bytes, from a statement that hands over only the
/// bodies within the limit: (NULL, NULL) when the function returned NULL.
type Measured = (Option<String>, Option<i64>);

/// What a body came to, given its size and the `outbox.max_body_bytes` limit.
fn within_limit((body, size): Measured, limit: i64) -> Result<Option<String>, String> {
    match (body, size) {
        (Some(body), _) => Ok(Some(body)),
        (None, Some(size)) => Err(format!("the body is {size} bytes; outbox.max_body_bytes is {limit}")),
        (None, None) => Ok(None),
    }
}

/// Why a kind's bodies can't be rendered at all now: no role to run them
/// as, or one that is (now) a superuser without the kind's opt-in.
fn refusal(kind: &Kind) -> Option<String> {
    let Some(role) = kind.run_as else {
        return Some("the kind has no run_as role: register it again".into());
    };
    if !crate::pg::roles::role_exists(role) {
        return Some(format!("run_as role {} does not exist", role.to_u32()));
    }
    if let Some(definer) = kind.definer.filter(|&d| crate::pg::roles::is_superuser(d) && !kind.allow_superuser) {
        return Some(format!(
            "the body function is SECURITY DEFINER and owned by superuser \"{}\": bodies do not run as one unless the kind was registered with allow_superuser",
            crate::pg::roles::role_name(definer)
        ));
    }
    if crate::pg::roles::is_superuser(role) && !kind.allow_superuser {
        return Some(format!(
            "run_as role \"{}\" is a superuser: bodies do not run as one unless the kind was registered with allow_superuser",
            crate::pg::roles::role_name(role)
        ));
    }
    None
}

// timeout.h, which pgrx does not bind.
unsafe extern "C-unwind" {
    fn enable_timeout_after(id: u32, delay_ms: std::ffi::c_int);
    fn disable_timeout(id: u32, keep_indicator: bool);
    fn get_timeout_indicator(id: u32, reset_indicator: bool) -> bool;
}

/// `LOCK_TIMEOUT` and `STATEMENT_TIMEOUT` of enum `TimeoutId`: the third and
/// the fourth, in every version from 13 to 18.
const LOCK_TIMEOUT: u32 = 2;
const STATEMENT_TIMEOUT: u32 = 3;

/// A deadline on the statements run inside it: Postgres' statement timeout,
/// armed by hand (SPI statements in a background worker get none), and
/// taken down on every path.
struct TimeLimit;

impl TimeLimit {
    fn until(deadline: Instant) -> Option<TimeLimit> {
        let left = deadline.checked_duration_since(Instant::now())?.as_millis().max(1);
        // SAFETY: the timeout framework is set up for every backend; the
        // handler cancels the running statement (SIGINT), which raises.
        unsafe { enable_timeout_after(STATEMENT_TIMEOUT, left.min(i32::MAX as u128) as i32) };
        Some(TimeLimit)
    }
}

impl Drop for TimeLimit {
    fn drop(&mut self) {
        // SAFETY: disarming our own timers: the statement timeout, and the
        // lock timeout a body's lock wait armed with the deadline's
        // `lock_timeout` (both fall due together). If either fired just as
        // the statement ended, or after the cancel of the other was handled,
        // the cancel it asked for is ours and no longer wanted: left pending,
        // it would fail the worker's next statement, and the worker with it.
        unsafe {
            disable_timeout(STATEMENT_TIMEOUT, true);
            disable_timeout(LOCK_TIMEOUT, true);
            let statement = get_timeout_indicator(STATEMENT_TIMEOUT, true);
            let lock = get_timeout_indicator(LOCK_TIMEOUT, true);
            if statement || lock {
                pg_sys::QueryCancelPending = 0;
            }
        }
    }
}

/// Runs one statement as `role`, restricted, within `deadline` (lock waits
/// included), in a subtransaction of its own: a body as its kind's role,
/// a backfill's chunk as its table's owner (`worker::backfills`).
pub(crate) fn run_limited<R>(role: pg_sys::Oid, deadline: Instant, f: impl FnOnce() -> R + std::panic::UnwindSafe) -> Result<R, crate::pg::subxact::Caught> {
    try_subtransaction(move || {
        let Some(_limit) = TimeLimit::until(deadline) else {
            crate::pg::errors::raise(PgSqlErrorCode::ERRCODE_QUERY_CANCELED, "no render time left this turn", None)
        };
        let lock_timeout = std::ffi::CString::new(format!("{}ms", deadline.saturating_duration_since(Instant::now()).as_millis().max(1)))
            .expect("no NUL in a number");
        crate::pg::roles::as_restricted(role, || with_settings(&[(c"lock_timeout", lock_timeout.as_c_str())], f))
    })
}

/// Calls the body function of `kind` for each id; `None` means the function
/// returned NULL. One statement for all; if it raises, one subtransaction per
/// id so that only the bad ids fail. The bodies run as the kind's `run_as`
/// role in a security-restricted operation (`roles::as_restricted`), and all
/// of them within the kind's `render_timeout`, lock waits included: past
/// it, every id not rendered yet fails (to be retried), and `timed_out` says
/// so, so that one kind's slow or blocked bodies hold up others only once.
///
/// A body over `limit` bytes is measured and dropped inside the statement
/// (OFFSET 0 keeps the function to one call per id): the statement's result
/// holds only bodies within the limit, so one huge record, or a body
/// function gone wrong, cannot run the worker out of memory (and the server
/// into a crash-restart, again at every claim).
fn bodies(kind: &Kind, function: &str, ids: &[String], limit: i64, timed_out: &mut bool) -> Vec<Result<Option<String>, String>> {
    use super::plans::types::{INT8, TEXT_ARRAY};
    if let Some(why) = refusal(kind) {
        return ids.iter().map(|_| Err(why.clone())).collect();
    }
    let role = kind.run_as.expect("refusal checks run_as");
    let deadline = Instant::now() + kind.render_timeout;
    let too_slow = |e: &crate::pg::subxact::Caught| {
        format!(
            "body function {function} took longer than the kind's render_timeout ({} ms): {} (SQLSTATE {})",
            kind.render_timeout.as_millis(),
            e.message,
            e.sqlstate
        )
    };
    let batch_sql = format!(
        "SELECT CASE WHEN pg_catalog.octet_length(b.t) OPERATOR(pg_catalog.<=) $2 THEN b.t END,
                pg_catalog.octet_length(b.t)::bigint
           FROM pg_catalog.unnest($1::text[]) WITH ORDINALITY AS u(id, n)
          CROSS JOIN LATERAL (SELECT {function}(u.id)::text AS t OFFSET 0) b
          ORDER BY u.n"
    );
    let ids_owned = ids.to_vec();
    // Read-write SPI (update) takes a fresh snapshot per statement, so the
    // body is read after the claim's snapshot: never older than the job.
    let batch = run_limited(role, deadline, move || {
        Spi::connect_mut(|c| {
            super::plans::execute_plain(c, &batch_sql, &[TEXT_ARRAY, INT8], &[ids_owned.into(), limit.into()])
                .unwrap_or_else(|e| panic!("{e}"))
                .map(|r| (r.get::<String>(1).ok().flatten(), r.get::<i64>(2).ok().flatten()))
                .collect::<Vec<Measured>>()
        })
    });
    match batch {
        Ok(rows) if rows.len() == ids.len() => return rows.into_iter().map(|r| within_limit(r, limit)).collect(),
        Err(e) if e.is_timeout() => {
            *timed_out = true;
            let error = too_slow(&e);
            return ids.iter().map(|_| Err(error.clone())).collect();
        }
        _ => {}
    }
    let one_sql = format!(
        "SELECT CASE WHEN pg_catalog.octet_length(b.t) OPERATOR(pg_catalog.<=) $2 THEN b.t END,
                pg_catalog.octet_length(b.t)::bigint
           FROM (SELECT {function}($1)::text AS t OFFSET 0) b"
    );
    ids.iter()
        .map(|id| {
            if *timed_out {
                return Err(format!("body function {function}: the kind's render_timeout ran out before this id"));
            }
            let sql = one_sql.clone();
            let id = id.clone();
            run_limited(role, deadline, move || {
                Spi::connect_mut(|c| {
                    let t = c.update(sql.as_str(), None, &[id.as_str().into(), limit.into()]).unwrap_or_else(|e| panic!("{e}"));
                    t.first().get_two::<String, i64>().unwrap_or_else(|e| panic!("{e}"))
                })
            })
            .map_err(|e| {
                if e.is_timeout() {
                    *timed_out = true;
                    too_slow(&e)
                } else {
                    format!("body function {function} failed: {} (SQLSTATE {})", e.message, e.sqlstate)
                }
            })
            .and_then(|r| within_limit(r, limit))
        })
        .collect()
}

/// What a body can leave in the worker's session past its security-
/// restricted operation: session advisory locks and prepared statements.
fn clear_session_leftovers() {
    // SAFETY: releasing this session's user locks (the worker takes none of
    // its own) and dropping its prepared statements (its plans are SPI's).
    unsafe {
        pg_sys::LockReleaseSession(pg_sys::USER_LOCKMETHOD as pg_sys::LOCKMETHODID);
        pg_sys::DropAllPreparedStatements();
    }
}

/// Claimed jobs as requests, and the kinds whose bodies ran out of time.
/// `sequence` is the turn's `outbox-sequence`.
pub fn render(
    kinds: &HashMap<String, Kind>,
    jobs: &[Claimed],
    sequence: i64,
    max_body_bytes: i64,
    max_response_bytes: usize,
) -> (Vec<Rendered>, Vec<String>) {
    let mut slow_kinds = Vec::new();
    // Body functions, one call per kind.
    let mut by_kind: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, j) in jobs.iter().enumerate() {
        by_kind.entry(j.kind.as_str()).or_default().push(i);
    }
    let mut body_of: Vec<Option<Result<Option<String>, String>>> = (0..jobs.len()).map(|_| None).collect();
    for (name, idx) in &by_kind {
        let Some(kind) = kinds.get(*name) else { continue };
        let Some(function) = kind.body_fn.as_deref() else { continue };
        let ids: Vec<String> = idx.iter().map(|&i| jobs[i].id.clone()).collect();
        let mut timed_out = false;
        crate::pg::shmem::set_rendering(super::watchdog::kind_hash(name));
        super::watchdog::arm(Instant::now() + kind.render_timeout);
        let rendered = bodies(kind, function, &ids, max_body_bytes, &mut timed_out);
        super::watchdog::disarm();
        crate::pg::shmem::set_rendering(0);
        clear_session_leftovers();
        for (&i, b) in idx.iter().zip(rendered) {
            body_of[i] = Some(b);
        }
        if timed_out {
            slow_kinds.push(name.to_string());
        }
    }
    let rendered = jobs.iter()
        .zip(body_of)
        .map(|(job, body)| {
            let Some(kind) = kinds.get(&job.kind) else {
                return Rendered::Broken("kind is not registered".into());
            };
            let url = template::render(&kind.url, &job.kind, &job.id);
            let (method, body) = match body {
                None => {
                    let doc = serde_json::json!({ "kind": job.kind, "id": job.id });
                    (Method::Put, Some(doc.to_string().into_bytes()))
                }
                Some(Err(e)) => return Rendered::Broken(e),
                Some(Ok(Some(json))) => (Method::Put, Some(json.into_bytes())),
                Some(Ok(None)) if kind.delete_when_missing => (Method::Delete, None),
                Some(Ok(None)) => return Rendered::Skip,
            };
            let mut headers = kind.headers.clone();
            headers.push((SEQUENCE_HEADER.to_string(), sequence.to_string()));
            Rendered::Send(Request {
                job_id: job.job_id,
                claim: job.claim,
                method,
                url,
                body,
                headers,
                keys: kind.keys(SystemTime::now()),
                timeout: kind.timeout,
                max_response_bytes,
                keep_alive: !kind.host_per_record,
            })
        })
        .collect();
    (rendered, slow_kinds)
}

#[cfg(test)]
mod unit {
    use super::within_limit;

    #[test]
    fn a_body_over_the_limit_is_an_error_naming_both_sizes() {
        assert_eq!(within_limit((Some("{}".into()), Some(2)), 10), Ok(Some("{}".into())));
        assert_eq!(within_limit((None, None), 10), Ok(None));
        let e = within_limit((None, Some(11)), 10).unwrap_err();
        assert!(e.contains("11 bytes") && e.contains("outbox.max_body_bytes is 10"), "{e}");
    }
}

#[cfg(test)]
mod qualified {
    #[test]
    fn every_statement_names_the_schema_of_its_functions_and_operators() {
        crate::testing::sql_check::assert_qualified(&[("LOAD_KINDS", super::LOAD_KINDS), ("LOAD_KINDS_0_2", super::LOAD_KINDS_0_2)]);
    }
}
