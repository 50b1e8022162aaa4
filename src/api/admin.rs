//! Inspecting and operating the queue: `stats`, `worker_status`, `retry`,
//! `retry_dead`, `discard`, `purge_dead`. Admin only (see `schema`). The
//! jobs' transitions themselves are statements of `worker::queue`.

use crate::capture::wake;
use crate::pg::errors::{raise, require};
use crate::pg::shmem;
use crate::worker::queue;
use pgrx::datum::{DatumWithOid, Interval};
use pgrx::prelude::*;

extension_sql!(
    r#"
CREATE FUNCTION outbox.stats()
RETURNS TABLE (kind text, pending bigint, running bigint, dead bigint,
               delivered bigint, failed_attempts bigint, oldest_pending_age interval,
               last_success_at timestamptz, last_failure_at timestamptz, paused boolean,
               breaker text, breaker_opened_at timestamptz, breaker_error text,
               max_in_flight int, rate_limit double precision)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
SELECT k.kind,
       pg_catalog.count(q.id) FILTER (WHERE q.state OPERATOR(pg_catalog.=) 'pending'),
       pg_catalog.count(q.id) FILTER (WHERE q.state OPERATOR(pg_catalog.=) 'running'),
       pg_catalog.count(q.id) FILTER (WHERE q.state OPERATOR(pg_catalog.=) 'dead'),
       coalesce(s.delivered, 0),
       coalesce(s.failed_attempts, 0),
       pg_catalog.now() OPERATOR(pg_catalog.-)
           pg_catalog.min(q.enqueued_at) FILTER (WHERE q.state OPERATOR(pg_catalog.=) 'pending'),
       s.last_success_at,
       s.last_failure_at,
       k.paused,
       coalesce(s.breaker, 'closed'),
       s.breaker_opened_at,
       s.breaker_error,
       k.max_in_flight,
       k.rate_limit
  FROM outbox.kinds k
  LEFT JOIN outbox.kind_stats s ON s.kind OPERATOR(pg_catalog.=) k.kind
  LEFT JOIN outbox.jobs q ON q.kind OPERATOR(pg_catalog.=) k.kind
 GROUP BY k.kind, k.paused, k.max_in_flight, k.rate_limit, s.delivered, s.failed_attempts, s.last_success_at,
          s.last_failure_at, s.breaker, s.breaker_opened_at, s.breaker_error
 ORDER BY k.kind
$$;
"#,
    name = "inspection",
    requires = ["schema"]
);

/// Whether job `$1` exists, in whatever state.
const JOB_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM outbox.queue WHERE job_id OPERATOR(pg_catalog.=) $1)";
/// Whether kind `$1` is registered.
const KIND_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM outbox.kinds WHERE kind OPERATOR(pg_catalog.=) $1)";

/// Runs one of the job transitions of `worker::queue` and returns how many
/// jobs it moved.
fn transition(sql: &str, args: &[DatumWithOid<'_>]) -> i64 {
    Spi::connect_mut(|c| c.update(sql, None, args).map(|t| t.len() as i64)).unwrap_or_else(|e| panic!("{e}"))
}

fn exists(sql: &str, args: &[DatumWithOid<'_>]) -> bool {
    Spi::get_one_with_args::<bool>(sql, args).unwrap_or_else(|e| panic!("{e}")) == Some(true)
}

/// A dead job runs again, due now, with its attempts counted from zero.
#[pg_extern(schema = "outbox")]
#[search_path(pg_catalog, pg_temp)]
fn retry(job_id: Option<i64>) {
    let job_id = require(job_id, "job_id");
    if transition(queue::RETRY, &[job_id.into()]) == 0 {
        if exists(JOB_EXISTS, &[job_id.into()]) {
            raise(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("job {job_id} is not dead"),
                Some("Only dead jobs can be retried; pending jobs run by themselves."),
            );
        }
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("job {job_id} does not exist"), None);
    }
    wake::on_commit();
}

/// Every dead job of `kind` (NULL: of every kind) runs again; returns how many.
#[pg_extern(schema = "outbox")]
#[search_path(pg_catalog, pg_temp)]
fn retry_dead(kind: default!(Option<&str>, "NULL")) -> i64 {
    if let Some(k) = kind {
        if !exists(KIND_EXISTS, &[k.into()]) {
            raise(
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                format!("outbox kind \"{k}\" is not registered"),
                Some("Pass NULL to retry the dead jobs of every kind."),
            );
        }
    }
    let n = transition(queue::RETRY_DEAD, &[kind.into()]);
    if n > 0 {
        wake::on_commit();
    }
    n
}

/// A job is dropped, in whatever state: a request in flight for it then
/// completes nothing.
#[pg_extern(schema = "outbox")]
#[search_path(pg_catalog, pg_temp)]
fn discard(job_id: Option<i64>) {
    let job_id = require(job_id, "job_id");
    if transition(queue::DISCARD, &[job_id.into()]) == 0 {
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("job {job_id} does not exist"), None);
    }
}

/// Dead jobs whose last attempt is at least `older_than` ago are dropped;
/// returns how many.
#[pg_extern(schema = "outbox")]
#[search_path(pg_catalog, pg_temp)]
fn purge_dead(older_than: Option<Interval>) -> i64 {
    let Some(older_than) = older_than else {
        raise(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "older_than must not be NULL",
            Some("Use interval '0' to purge every dead job."),
        )
    };
    // As Postgres compares intervals: a month is 30 days, a day 24 hours.
    if older_than.as_micros() < 0 {
        raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, "older_than must not be negative", None);
    }
    transition(queue::PURGE_DEAD, &[older_than.into()])
}

/// Wakes the worker when the current transaction commits.
#[pg_extern(schema = "outbox")]
#[search_path(pg_catalog, pg_temp)]
fn wake() {
    crate::capture::wake::on_commit();
}

use crate::pg::syscache::database_name;

/// What `worker_status()` says of a database waiting for a worker slot.
const WAITING_FOR_SLOT: &str = "waiting for a worker slot";

/// One row per database with a worker, in every database, and one per
/// database waiting for a slot (`outbox.max_workers`); and this database,
/// `stopped`, if it is neither.
#[pg_extern(schema = "outbox")]
#[search_path(pg_catalog, pg_temp)]
fn worker_status() -> TableIterator<
    'static,
    (
        name!(database, Option<String>),
        name!(pid, Option<i32>),
        name!(state, String),
        name!(in_flight, i32),
        name!(last_batch_at, Option<TimestampWithTimeZone>),
    ),
> {
    let mut rows: Vec<_> = shmem::snapshot()
        .unwrap_or_default()
        .into_iter()
        .map(|s| {
            let last = s.last_batch_at.and_then(|t| TimestampWithTimeZone::try_from(t).ok());
            (s.database, database_name(s.database), s.pid, s.state.name().to_string(), s.in_flight, last)
        })
        .chain(shmem::waiting().into_iter().map(|db| (db, database_name(db), None, WAITING_FOR_SLOT.to_string(), 0, None)))
        .collect();
    // SAFETY: a plain read of this backend's database.
    let here = unsafe { pg_sys::MyDatabaseId };
    if !rows.iter().any(|r| r.0 == here) {
        rows.push((here, database_name(here), None, shmem::WorkerState::Stopped.name().to_string(), 0, None));
    }
    rows.sort_by(|a, b| a.1.cmp(&b.1));
    TableIterator::new(rows.into_iter().map(|(_, name, pid, state, in_flight, last)| (name, pid, state, in_flight, last)))
}

#[cfg(test)]
mod qualified {
    /// The functions' bodies included: [`crate::testing::sql_check::unqualified`]
    /// reads dollar-quoted bodies as SQL.
    #[test]
    fn every_statement_names_the_schema_of_its_functions_and_operators() {
        let blocks = crate::testing::sql_check::extension_sql_blocks(include_str!("admin.rs"));
        assert_eq!(blocks.len(), 1);
        crate::testing::sql_check::assert_qualified(&[
            ("extension_sql inspection", blocks[0]),
            ("JOB_EXISTS", super::JOB_EXISTS),
            ("KIND_EXISTS", super::KIND_EXISTS),
        ]);
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::testing::sqlstate_of;
    use pgrx::prelude::*;

    fn count(sql: &str) -> i64 {
        Spi::get_one::<i64>(sql).unwrap().unwrap()
    }

    fn setup() {
        Spi::run("SELECT outbox.register('user', 'http://h/{id}')").unwrap();
        Spi::run("SELECT outbox.register('team', 'http://h/{id}')").unwrap();
        for id in 1..=3 {
            Spi::run(&format!("SELECT outbox.enqueue('user', {id})")).unwrap();
        }
        Spi::run("SELECT outbox.enqueue('team', 1)").unwrap();
        crate::worker::queue::absorb_all();
        // As the worker would leave permanently failed jobs.
        Spi::run(
            "UPDATE outbox.queue SET state = 'dead', attempts = 1, last_attempt_at = now() - interval '2 days',
                    last_status = 400, last_error = 'bad request'
              WHERE (kind, id) IN (('user', '2'), ('user', '3'), ('team', '1'))",
        )
        .unwrap();
    }

    #[pg_test]
    fn stats_counts_per_kind() {
        setup();
        let row = Spi::get_three::<i64, i64, i64>(
            "SELECT pending, running, dead FROM outbox.stats() WHERE kind = 'user'",
        )
        .unwrap();
        assert_eq!(row, (Some(1), Some(0), Some(2)));
        assert_eq!(count("SELECT count(*) FROM outbox.stats()"), 2);
        assert_eq!(count("SELECT count(*) FROM outbox.stats() WHERE oldest_pending_age IS NOT NULL"), 1);
    }

    #[pg_test]
    fn retry_discard_purge() {
        setup();
        let dead = count("SELECT min(job_id) FROM outbox.jobs WHERE state = 'dead' AND kind = 'user'");
        Spi::run(&format!("SELECT outbox.retry({dead})")).unwrap();
        assert_eq!(count(&format!("SELECT count(*) FROM outbox.jobs WHERE job_id = {dead} AND state = 'pending' AND attempts = 0")), 1);
        assert_eq!(sqlstate_of(&format!("SELECT outbox.retry({dead})")), "55000");
        assert_eq!(sqlstate_of("SELECT outbox.retry(-1)"), "42704");
        assert_eq!(sqlstate_of("SELECT outbox.retry(NULL)"), "22004");
        assert_eq!(Spi::get_one::<i64>("SELECT outbox.retry_dead('team')").unwrap(), Some(1));
        assert_eq!(sqlstate_of("SELECT outbox.retry_dead('nope')"), "42704");
        assert_eq!(Spi::get_one::<i64>("SELECT outbox.retry_dead()").unwrap(), Some(1));
        assert_eq!(count("SELECT count(*) FROM outbox.jobs WHERE state = 'dead'"), 0);

        Spi::run("UPDATE outbox.queue SET state = 'dead' WHERE kind = 'team'").unwrap();
        assert_eq!(Spi::get_one::<i64>("SELECT outbox.purge_dead('3 days')").unwrap(), Some(0));
        assert_eq!(Spi::get_one::<i64>("SELECT outbox.purge_dead('1 day')").unwrap(), Some(1));
        assert_eq!(sqlstate_of("SELECT outbox.purge_dead(NULL)"), "22004");
        assert_eq!(sqlstate_of("SELECT outbox.purge_dead('-1 day')"), "22023");

        let any = count("SELECT min(job_id) FROM outbox.jobs");
        Spi::run(&format!("SELECT outbox.discard({any})")).unwrap();
        assert_eq!(sqlstate_of(&format!("SELECT outbox.discard({any})")), "42704");

        // Each transition leaves one state: running jobs are neither retried
        // nor purged.
        Spi::run("UPDATE outbox.queue SET state = 'running', last_attempt_at = now() - interval '9 days'").unwrap();
        let running = count("SELECT count(*) FROM outbox.queue");
        let first = count("SELECT min(job_id) FROM outbox.queue");
        assert_eq!(sqlstate_of(&format!("SELECT outbox.retry({first})")), "55000");
        assert_eq!(Spi::get_one::<i64>("SELECT outbox.retry_dead()").unwrap(), Some(0));
        assert_eq!(Spi::get_one::<i64>("SELECT outbox.purge_dead('0')").unwrap(), Some(0));
        assert_eq!(count("SELECT count(*) FROM outbox.queue WHERE state = 'running'"), running);
    }

    #[pg_test]
    fn worker_status_reports_the_worker() {
        let n = count("SELECT count(*) FROM outbox.worker_status() WHERE database = 'pgrx_tests'");
        assert_eq!(n, 1);
    }
}
