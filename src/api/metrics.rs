//! `outbox.metrics()`: this database's kinds in the Prometheus text
//! exposition format, for a scraper that runs SQL (a textfile collector, a
//! sidecar). Admin only, as `stats()`, which it reads; the format itself
//! is `rules::metrics`.

use crate::rules::metrics::{exposition, KindRow};
use pgrx::prelude::*;

/// What the exposition shows of each kind: `stats()`, and the counters
/// only `kind_stats` has.
const KINDS: &str = "
SELECT st.kind, st.pending, st.running, st.dead,
       coalesce(extract(epoch FROM st.oldest_pending_age), 0)::float8,
       st.delivered,
       ARRAY[coalesce(s.rejected, 0), coalesce(s.throttled, 0), coalesce(s.server_errors, 0),
             coalesce(s.unreachable, 0), coalesce(s.unbuildable, 0)],
       coalesce(s.latency_counts, '{}'), coalesce(s.latency_sum, 0),
       st.breaker, st.paused, st.max_in_flight, st.rate_limit
  FROM outbox.stats() st
  LEFT JOIN outbox.kind_stats s ON s.kind OPERATOR(pg_catalog.=) st.kind
 ORDER BY st.kind";

/// The SQL statements of this module, for the qualification sweep.
#[cfg(test)]
pub(crate) const STATEMENTS: &[(&str, &str)] = &[("KINDS", KINDS)];

/// This database's kinds in the Prometheus text exposition format: every
/// kind's deliveries, attempts by outcome, jobs by state, oldest pending
/// age, delivery latency histogram, breaker state, requests in flight and
/// limits. Labelled with the database and the kind.
#[pg_extern(sql = "
CREATE FUNCTION outbox.metrics() RETURNS text
STABLE LANGUAGE c SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
")]
fn metrics() -> String {
    // SAFETY: a plain read of the current database's oid.
    let here = unsafe { pg_sys::MyDatabaseId };
    let database = crate::pg::syscache::database_name(here).unwrap_or_default();
    let rows = Spi::connect(|c| {
        let rows = c.select(KINDS, None, &[])?;
        rows.map(|r| {
            let failed: Vec<i64> = r.get::<Vec<i64>>(7)?.unwrap_or_default();
            Ok(KindRow {
                kind: r.get::<String>(1)?.unwrap_or_default(),
                pending: r.get::<i64>(2)?.unwrap_or_default(),
                running: r.get::<i64>(3)?.unwrap_or_default(),
                dead: r.get::<i64>(4)?.unwrap_or_default(),
                oldest_pending: r.get::<f64>(5)?.unwrap_or_default(),
                delivered: r.get::<i64>(6)?.unwrap_or_default(),
                failed: std::array::from_fn(|i| failed.get(i).copied().unwrap_or(0)),
                latency: r.get::<Vec<i64>>(8)?.unwrap_or_default(),
                latency_sum: r.get::<f64>(9)?.unwrap_or_default(),
                breaker: r.get::<String>(10)?.unwrap_or_default(),
                paused: r.get::<bool>(11)?.unwrap_or_default(),
                max_in_flight: r.get::<i32>(12)?,
                rate_limit: r.get::<f64>(13)?,
            })
        })
        .collect::<Result<Vec<_>, pgrx::spi::Error>>()
    })
    .unwrap_or_else(|e| panic!("reading the kinds: {e}"));
    exposition(&database, &rows)
}

#[cfg(test)]
mod qualified {
    #[test]
    fn every_statement_names_the_schema_of_its_functions_and_operators() {
        crate::testing::sql_check::assert_qualified(super::STATEMENTS);
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn metrics() -> String {
        Spi::get_one::<String>("SELECT outbox.metrics()").unwrap().unwrap()
    }

    fn has(text: &str, line: &str) -> bool {
        text.lines().any(|l| l == line)
    }

    /// The exposition reads the counters the worker keeps, the jobs and the
    /// breaker; a kind with nothing yet shows zeros.
    #[pg_test]
    fn metrics_show_counters_jobs_latency_and_breakers() {
        Spi::run("SELECT outbox.register('a', 'http://h/{id}'), outbox.register('b', 'http://h/{id}')").unwrap();
        Spi::run("SELECT outbox.set_max_in_flight('a', 3)").unwrap();
        Spi::run("SELECT outbox.enqueue('a', 1), outbox.enqueue('a', 2)").unwrap();
        Spi::run(
            "UPDATE outbox.kind_stats SET delivered = 5, failed_attempts = 4, throttled = 1, server_errors = 3,
                    latency_counts = '{2,0,0,0,0,0,0,3}', latency_sum = 2.5,
                    breaker = 'open', breaker_opened_at = now(), breaker_error = 'HTTP 503'
              WHERE kind = 'a'",
        )
        .unwrap();
        let db = Spi::get_one::<String>("SELECT current_database()::text").unwrap().unwrap();
        let text = metrics();
        let a = format!("database=\"{db}\",kind=\"a\"");
        let b = format!("database=\"{db}\",kind=\"b\"");
        for line in [
            format!("outbox_kind_delivered_total{{{a}}} 5"),
            format!("outbox_attempts_total{{{a},outcome=\"server_error\"}} 3"),
            format!("outbox_attempts_total{{{a},outcome=\"rejected\"}} 0"),
            format!("outbox_kind_pending{{{a}}} 2"),
            format!("outbox_delivery_latency_seconds_bucket{{{a},le=\"0.005\"}} 2"),
            format!("outbox_delivery_latency_seconds_bucket{{{a},le=\"0.5\"}} 2"),
            format!("outbox_delivery_latency_seconds_bucket{{{a},le=\"1\"}} 5"),
            format!("outbox_delivery_latency_seconds_count{{{a}}} 5"),
            format!("outbox_delivery_latency_seconds_sum{{{a}}} 2.5"),
            format!("outbox_kind_breaker_state{{{a}}} 2"),
            format!("outbox_kind_max_in_flight{{{a}}} 3"),
            format!("outbox_kind_delivered_total{{{b}}} 0"),
            format!("outbox_kind_breaker_state{{{b}}} 0"),
            format!("outbox_kind_max_in_flight{{{b}}} 0"),
            format!("outbox_kind_pending{{{b}}} 0"),
        ] {
            assert!(has(&text, &line), "no line {line} in\n{text}");
        }
        let age = text.lines().find(|l| l.starts_with(&format!("outbox_kind_oldest_pending_age_seconds{{{a}}}"))).unwrap();
        let age: f64 = age.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(age >= 0.0, "{age}");
        let row = Spi::get_three::<String, String, i32>("SELECT breaker, breaker_error, max_in_flight FROM outbox.stats() WHERE kind = 'a'").unwrap();
        assert_eq!(row, (Some("open".into()), Some("HTTP 503".into()), Some(3)));
    }

    /// Like every function but enqueue, it is for admins only.
    #[pg_test]
    fn metrics_is_not_for_public() {
        let public = Spi::get_one::<bool>("SELECT has_function_privilege('public', 'outbox.metrics()', 'EXECUTE')").unwrap();
        assert_eq!(public, Some(false));
    }
}
