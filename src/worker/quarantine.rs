//! One bad inbox row costs that row, never the worker. When the absorb
//! statement fails for a reason other than a lock wait, the rows it would
//! have taken are moved one at a time, each in a subtransaction; a row that
//! still fails is set aside in `outbox.rejected` with the error, logged, and
//! shown in `outbox.jobs` as dead. Before this, such a row (a 3,000-byte kind
//! over the btree limit, say) failed every turn and restarted the worker
//! every second, delivering nothing.

use super::plans::execute;
use crate::pg::settings::with_settings;
use crate::pg::subxact::{try_subtransaction, Caught};
use crate::schema::fresh;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use super::plans::types::{INT8, TEXT};

/// The inbox rows from heap block $2 on, at most $1: those the failed
/// absorb would have taken.
const ROWS_FROM: &str = "
SELECT ctid::pg_catalog.text FROM outbox.inbox
 WHERE ctid OPERATOR(pg_catalog.>=) pg_catalog.format('(%s,0)', $2)::pg_catalog.tid
 LIMIT $1";

/// Inbox row $1 into the queue, as the absorb would move it: coalescing
/// into fresh jobs (moving a later one to the row's time), dead at once for
/// a kind nobody registered. Returns how many changes it held.
const ABSORB_ROW: &str = concat!(
    "
WITH moved AS (
    DELETE FROM outbox.inbox WHERE ctid OPERATOR(pg_catalog.=) $1::pg_catalog.tid
    RETURNING kind, id, ids, enqueued_at, run_at
), changed AS (
    SELECT m.kind, u.id, m.enqueued_at, greatest(coalesce(m.run_at, pg_catalog.now()), pg_catalog.now()) AS run_at,
           EXISTS (SELECT FROM outbox.kinds k WHERE k.kind OPERATOR(pg_catalog.=) m.kind) AS registered
      FROM moved m
     CROSS JOIN LATERAL pg_catalog.unnest(coalesce(m.ids, ARRAY[m.id])) AS u(id)
), absorbed AS (
    INSERT INTO outbox.queue AS q (kind, id, enqueued_at, run_at, state, last_attempt_at, last_error)
    SELECT c.kind, c.id, c.enqueued_at, c.run_at,
           CASE WHEN c.registered THEN 'pending' ELSE 'dead' END,
           CASE WHEN NOT c.registered THEN pg_catalog.now() END,
           CASE WHEN NOT c.registered THEN 'kind is not registered' END
      FROM changed c
    ON CONFLICT (kind, id) WHERE ",
    fresh!(),
    " DO NOTHING
), sooner AS (
    UPDATE outbox.queue q SET run_at = c.run_at
      FROM changed c
     WHERE q.kind OPERATOR(pg_catalog.=) c.kind AND q.id OPERATOR(pg_catalog.=) c.id
       AND ",
    fresh!("q"),
    "
       AND q.run_at OPERATOR(pg_catalog.>) c.run_at
)
SELECT pg_catalog.count(*) FROM changed"
);

/// Inbox row $1 set aside, with reason $2. Returns the start of its kind
/// (for the log) and how many changes it held.
const REJECT_ROW: &str = "
WITH moved AS (
    DELETE FROM outbox.inbox WHERE ctid OPERATOR(pg_catalog.=) $1::pg_catalog.tid
    RETURNING kind, id, ids, enqueued_at, run_at
)
INSERT INTO outbox.rejected (kind, id, ids, enqueued_at, run_at, reason)
SELECT kind, id, ids, enqueued_at, run_at, $2 FROM moved
RETURNING pg_catalog.left(kind, 64), coalesce(pg_catalog.cardinality(ids), 1)::pg_catalog.int8";

/// The SQL statements of this module, for the qualification sweep.
#[cfg(test)]
pub(crate) const STATEMENTS: &[(&str, &str)] = &[("ROWS_FROM", ROWS_FROM), ("ABSORB_ROW", ABSORB_ROW), ("REJECT_ROW", REJECT_ROW)];

/// How long moving one row may wait for a lock (an open transaction's
/// fresh job): the row then stays for a later turn.
const ROW_LOCK_TIMEOUT: &std::ffi::CStr = c"100ms";

/// The heap block of a tid's text, `(block,offset)`.
fn block_of(tid: &str) -> i64 {
    tid.trim_start_matches('(').split(',').next().and_then(|b| b.parse().ok()).unwrap_or(0)
}

/// After the absorb statement from block `start` failed with `cause`: moves
/// up to `limit` inbox rows one at a time, setting aside those that fail.
/// Returns (changes moved, last block read), as the absorb does.
pub fn absorb_one_by_one(c: &mut SpiClient<'_>, limit: i64, start: i64, cause: &Caught) -> (i64, i64) {
    warning!(
        "outbox worker: moving the inbox into the queue failed: {} (SQLSTATE {}); moving its rows one at a time",
        cause.message,
        cause.sqlstate
    );
    let rows: Vec<String> = execute(c, ROWS_FROM, &[INT8, INT8], &[limit.into(), start.into()])
        .unwrap_or_else(|e| panic!("listing inbox rows: {e}"))
        .filter_map(|r| r.get::<String>(1).ok().flatten())
        .collect();
    let (mut moved, mut last) = (0, start);
    for tid in rows {
        let absorbed = try_subtransaction(std::panic::AssertUnwindSafe(|| {
            with_settings(&[(c"lock_timeout", ROW_LOCK_TIMEOUT)], || {
                execute(c, ABSORB_ROW, &[TEXT], &[tid.as_str().into()])
                    .and_then(|t| t.first().get_one::<i64>())
                    .unwrap_or_else(|e| panic!("{e}"))
                    .unwrap_or(0)
            })
        }));
        match absorbed {
            Ok(n) => moved += n,
            // Not the row's fault: it waits for a later turn.
            Err(e) if e.is_transient() => break,
            Err(e) => reject(c, &tid, &format!("{} (SQLSTATE {})", e.message, e.sqlstate)),
        }
        last = block_of(&tid);
    }
    (moved, last)
}

/// Sets inbox row `tid` aside with `reason`. If even that fails, nothing
/// more can be done here: the worker stops, as before.
fn reject(c: &mut SpiClient<'_>, tid: &str, reason: &str) {
    let set_aside = try_subtransaction(std::panic::AssertUnwindSafe(|| {
        execute(c, REJECT_ROW, &[TEXT, TEXT], &[tid.into(), reason.into()])
            .and_then(|t| t.first().get_two::<String, i64>())
            .unwrap_or_else(|e| panic!("{e}"))
    }));
    match set_aside {
        Ok((Some(kind), Some(n))) => warning!(
            "outbox worker: set aside an inbox row of kind \"{kind}\" ({n} change(s)) in outbox.rejected: {reason}"
        ),
        // Gone meanwhile (an admin deleted it): nothing to set aside.
        Ok(_) => {}
        Err(e) => panic!("setting aside inbox row {tid}: {} (SQLSTATE {}); it failed with: {reason}", e.message, e.sqlstate),
    }
}

#[cfg(test)]
mod unit {
    #[test]
    fn a_tid_text_gives_its_block() {
        assert_eq!(super::block_of("(12,3)"), 12);
        assert_eq!(super::block_of("(0,1)"), 0);
    }
}

#[cfg(test)]
mod qualified {
    #[test]
    fn every_statement_names_the_schema_of_its_functions_and_operators() {
        crate::testing::sql_check::assert_qualified(super::STATEMENTS);
    }
}
