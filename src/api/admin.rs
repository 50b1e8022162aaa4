//! Inspecting and operating the queue: `stats`, `worker_status`, `retry`,
//! `retry_dead`, `discard`, `purge_dead`. Admin only (see `schema`).

use crate::pg::shmem;
use pgrx::prelude::*;

extension_sql!(
    r#"
CREATE FUNCTION outbox.stats()
RETURNS TABLE (kind text, pending bigint, running bigint, dead bigint,
               delivered bigint, failed_attempts bigint, oldest_pending_age interval,
               last_success_at timestamptz, last_failure_at timestamptz, paused boolean)
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
       k.paused
  FROM outbox.kinds k
  LEFT JOIN outbox.kind_stats s ON s.kind OPERATOR(pg_catalog.=) k.kind
  LEFT JOIN outbox.jobs q ON q.kind OPERATOR(pg_catalog.=) k.kind
 GROUP BY k.kind, k.paused, s.delivered, s.failed_attempts, s.last_success_at, s.last_failure_at
 ORDER BY k.kind
$$;

CREATE FUNCTION outbox.retry(job_id bigint) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF retry.job_id IS NULL THEN
        RAISE EXCEPTION 'job_id must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    UPDATE outbox.queue q
       SET state = 'pending', run_at = pg_catalog.now(), attempts = 0
     WHERE q.job_id OPERATOR(pg_catalog.=) retry.job_id AND q.state OPERATOR(pg_catalog.=) 'dead';
    IF NOT FOUND THEN
        IF EXISTS (SELECT 1 FROM outbox.queue q WHERE q.job_id OPERATOR(pg_catalog.=) retry.job_id) THEN
            RAISE EXCEPTION 'job % is not dead', retry.job_id
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'Only dead jobs can be retried; pending jobs run by themselves.';
        END IF;
        RAISE EXCEPTION 'job % does not exist', retry.job_id USING ERRCODE = 'undefined_object';
    END IF;
    PERFORM outbox.wake();
END
$$;

CREATE FUNCTION outbox.retry_dead(kind text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    IF retry_dead.kind IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM outbox.kinds k WHERE k.kind OPERATOR(pg_catalog.=) retry_dead.kind) THEN
        RAISE EXCEPTION 'outbox kind "%" is not registered', retry_dead.kind
            USING ERRCODE = 'undefined_object', HINT = 'Pass NULL to retry the dead jobs of every kind.';
    END IF;
    UPDATE outbox.queue q
       SET state = 'pending', run_at = pg_catalog.now(), attempts = 0
     WHERE q.state OPERATOR(pg_catalog.=) 'dead'
       AND (retry_dead.kind IS NULL OR q.kind OPERATOR(pg_catalog.=) retry_dead.kind);
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n OPERATOR(pg_catalog.>) 0 THEN
        PERFORM outbox.wake();
    END IF;
    RETURN n;
END
$$;

CREATE FUNCTION outbox.discard(job_id bigint) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF discard.job_id IS NULL THEN
        RAISE EXCEPTION 'job_id must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    DELETE FROM outbox.queue q WHERE q.job_id OPERATOR(pg_catalog.=) discard.job_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'job % does not exist', discard.job_id USING ERRCODE = 'undefined_object';
    END IF;
END
$$;

CREATE FUNCTION outbox.purge_dead(older_than interval) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    IF older_than IS NULL THEN
        RAISE EXCEPTION 'older_than must not be NULL' USING ERRCODE = 'null_value_not_allowed',
            HINT = 'Use interval ''0'' to purge every dead job.';
    END IF;
    IF older_than OPERATOR(pg_catalog.<) interval '0' THEN
        RAISE EXCEPTION 'older_than must not be negative' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    DELETE FROM outbox.queue q
     WHERE q.state OPERATOR(pg_catalog.=) 'dead'
       AND coalesce(q.last_attempt_at, q.enqueued_at) OPERATOR(pg_catalog.<=) (pg_catalog.now() OPERATOR(pg_catalog.-) older_than);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
"#,
    name = "inspection",
    requires = ["schema", wake]
);

/// Wakes the worker when the current transaction commits.
#[pg_extern(schema = "outbox")]
#[search_path(pg_catalog, pg_temp)]
fn wake() {
    crate::capture::wake::on_commit();
}

/// One row per worker: the database it serves, its pid, what it is doing.
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
    let rows = shmem::snapshot().map(|s| {
        let last = s.last_batch_at.and_then(|t| TimestampWithTimeZone::try_from(t).ok());
        (crate::pg::gucs::database(), s.pid, s.state.name().to_string(), s.in_flight, last)
    });
    TableIterator::new(rows)
}

#[cfg(test)]
mod qualified {
    /// The functions' bodies included: [`crate::testing::sql_check::unqualified`]
    /// reads dollar-quoted bodies as SQL.
    #[test]
    fn every_statement_names_the_schema_of_its_functions_and_operators() {
        let blocks = crate::testing::sql_check::extension_sql_blocks(include_str!("admin.rs"));
        assert_eq!(blocks.len(), 1);
        crate::testing::sql_check::assert_qualified(&[("extension_sql inspection", blocks[0])]);
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
    }

    #[pg_test]
    fn worker_status_reports_the_worker() {
        let n = count("SELECT count(*) FROM outbox.worker_status() WHERE database = 'pgrx_tests'");
        assert_eq!(n, 1);
    }
}
