//! `outbox.enqueue(kind, id [, delay])`: records *which* record changed, in the
//! caller's transaction, and wakes the worker when that transaction commits.
//!
//! One capture path: an enqueue is a change like a tracked table's, and goes
//! through the same per-transaction buffer into `outbox.inbox`
//! ([`crate::capture::inbox`]). Nothing here reads, locks or writes a queue job, so
//! nothing the caller sees depends on other jobs: the worker coalesces when
//! it moves the inbox into the queue, after the changes have committed.

use crate::pg::errors::{raise, require, require_kind};
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;
use pgrx::{AnyElement, IntoDatum};

/// Validates the arguments, checks that the caller may enqueue the kind,
/// and appends the change to this transaction's inbox buffer; shared by
/// both `enqueue` functions.
fn enqueue_one(kind: Option<&str>, id: Option<AnyElement>, delay: Option<Interval>) {
    let kind = require_kind(kind);
    let id = crate::capture::ids::text_of(require(id, "id"));
    enqueue_id(kind, id, delay)
}

/// [`enqueue_one`] once the id is text; also what version 0.1.0's entry
/// points (`api::legacy`) call.
pub fn enqueue_id(kind: &str, id: String, delay: Option<Interval>) {
    crate::capture::ids::check_id(&id);
    // The inbox is written with direct heap inserts, which check none of
    // this themselves; the executor would have refused an INSERT here.
    // SAFETY: each raises an ERROR (25006, or 0A000 in parallel mode) if the
    // transaction may not write.
    unsafe {
        pg_sys::PreventCommandIfReadOnly(c"outbox.enqueue()".as_ptr());
        pg_sys::PreventCommandIfParallelMode(c"outbox.enqueue()".as_ptr());
        pg_sys::PreventCommandDuringRecovery(c"outbox.enqueue()".as_ptr());
    }
    crate::api::grants::require_access(kind);
    let run_at = delay.and_then(|d| (d.months() != 0 || d.days() != 0 || d.micros() != 0).then(|| not_before(d)));
    crate::capture::inbox::append(kind, id, run_at);
}

/// A delay given: not NULL, not negative.
pub fn require_delay(delay: Option<Interval>) -> Interval {
    let delay = require(delay, "delay");
    if delay.as_micros() < 0 {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "delay must not be negative",
            Some("A delay means \"not before now + delay\"; use '0 s', or no delay, for now."),
        );
    }
    delay
}

/// The transaction's start plus `delay`, as `now() + delay` would compute it
/// (a day or a month in the session's time zone).
fn not_before(delay: Interval) -> pg_sys::TimestampTz {
    // SAFETY: the start of the current transaction is a plain read.
    let start = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    let start = start.into_datum().expect("a timestamp datum");
    // SAFETY: timestamptz_pl_interval takes (timestamptz, interval) and
    // returns a timestamptz; it raises 22008 if the result is out of range.
    let at = unsafe { pgrx::direct_function_call::<TimestampWithTimeZone>(pg_sys::timestamptz_pl_interval, &[Some(start), delay.into_datum()]) };
    at.expect("timestamptz + interval is never NULL").into_inner()
}

/// Enqueues a delivery of record `id` of `kind`. The id may be of any type
/// whose text is the same in every session (`ids::text_of`): 7, '7' and
/// 7::bigint are one record. Declared `anycompatible`, not `anyelement`
/// (which pgrx names), so that a quoted literal resolves to text.
///
/// Two functions, not one with a default delay: resolving a call among
/// overloads, and reading a default's expression, cost a call a seventh of
/// a one-row UPDATE (`docs/benchmarks.md`). Runs as the caller:
/// `grants::require_access` reads the grants below privileges, and
/// the inbox row is written by the extension itself. No `SET search_path`:
/// it runs no SQL and resolves no name through the path (the clause cost a
/// tenth of the call), so the caller's path can change nothing it does
/// (`schema::tests::every_function_pins_its_search_path`).
#[pg_extern(sql = r#"
CREATE FUNCTION outbox.enqueue(kind text, id anycompatible) RETURNS void
LANGUAGE c AS 'MODULE_PATHNAME', 'enqueue_now_wrapper';"#)]
fn enqueue_now(kind: Option<&str>, id: Option<AnyElement>) {
    enqueue_one(kind, id, None)
}

/// Enqueues a delivery of record `id` of `kind`, not before `delay` from now.
#[pg_extern(sql = r#"
CREATE FUNCTION outbox.enqueue(kind text, id anycompatible, delay interval) RETURNS void
LANGUAGE c AS 'MODULE_PATHNAME', 'enqueue_later_wrapper';"#)]
fn enqueue_later(kind: Option<&str>, id: Option<AnyElement>, delay: Option<Interval>) {
    let delay = require_delay(delay);
    enqueue_one(kind, id, Some(delay))
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::testing::{error_of, sqlstate_of};
    use pgrx::prelude::*;

    fn setup() {
        Spi::run("SELECT outbox.register('user', 'http://127.0.0.1:9/u/{id}')").unwrap();
    }

    fn count(sql: &str) -> i64 {
        Spi::get_one::<i64>(sql).unwrap().unwrap()
    }

    #[pg_test]
    fn enqueue_text_bigint_uuid() {
        setup();
        Spi::run("SELECT outbox.enqueue('user', 'a')").unwrap();
        Spi::run("SELECT outbox.enqueue('user', 42)").unwrap();
        Spi::run("SELECT outbox.enqueue('user', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid)").unwrap();
        let ids = crate::testing::texts("SELECT id FROM outbox.jobs ORDER BY id", &[]);
        assert_eq!(ids, ["42", "a", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]);
        assert_eq!(count("SELECT count(*) FROM outbox.jobs WHERE state = 'pending' AND attempts = 0"), 3);
        // It returns nothing: no job id of a record the caller can't see.
        let returns = crate::testing::texts("SELECT DISTINCT prorettype::regtype::text FROM pg_proc WHERE proname = 'enqueue' AND pronamespace = 'outbox'::regnamespace", &[]);
        assert_eq!(returns, ["void"]);
    }

    /// One capture path: an enqueue writes an inbox row, as a tracked change
    /// does, and touches no queue job, whatever jobs exist.
    #[pg_test]
    fn enqueue_goes_to_the_inbox_and_reads_no_job() {
        setup();
        Spi::run("INSERT INTO outbox.queue (kind, id) SELECT 'user', g::text FROM generate_series(1, 100) g").unwrap();
        let queue_reads = || count("SELECT pg_stat_get_xact_tuples_fetched('outbox.queue'::regclass) + pg_stat_get_xact_tuples_returned('outbox.queue'::regclass)");
        let before = queue_reads();
        Spi::run("SELECT outbox.enqueue('user', 7), outbox.enqueue('user', 'new')").unwrap();
        assert_eq!(queue_reads(), before, "the queue was read");
        assert_eq!(count("SELECT count(*) FROM outbox.jobs WHERE job_id IS NULL"), 2, "both wait in the inbox");
        assert_eq!(count("SELECT count(*) FROM outbox.queue"), 100);
        // The worker's absorb coalesces 7 into its job, and makes one for new.
        assert_eq!(crate::worker::queue::absorb_all(), 2);
        assert_eq!(count("SELECT count(*) FROM outbox.queue"), 101);
    }

    #[pg_test]
    fn repeats_in_a_transaction_are_written_once() {
        setup();
        Spi::run("SELECT outbox.enqueue('user', 7)").unwrap();
        Spi::run("SELECT outbox.enqueue('user', '7'), outbox.enqueue('user', 7, interval '1 hour')").unwrap();
        assert_eq!(count("SELECT count(*) FROM outbox.jobs"), 1);
        crate::worker::queue::absorb_all();
        assert_eq!(count("SELECT count(*) FROM outbox.queue WHERE run_at <= now()"), 1);
    }

    #[pg_test]
    fn a_rolled_back_subtransaction_forgets_its_enqueues() {
        setup();
        let r = crate::pg::subxact::try_subtransaction(|| {
            Spi::run("SELECT outbox.enqueue('user', 8)").unwrap();
            panic!("roll the subtransaction back");
        });
        assert!(r.is_err());
        assert_eq!(count("SELECT count(*) FROM outbox.jobs WHERE id = '8'"), 0);
        // The per-transaction record of what was written must not skip it.
        Spi::run("SELECT outbox.enqueue('user', 8)").unwrap();
        assert_eq!(count("SELECT count(*) FROM outbox.jobs WHERE id = '8'"), 1);
    }

    #[pg_test]
    fn a_delay_sets_run_at_in_the_callers_time_zone() {
        setup();
        Spi::run("SET LOCAL TimeZone = 'Europe/Paris'").unwrap();
        Spi::run("SELECT outbox.enqueue('user', 1, interval '1 hour'), outbox.enqueue('user', 2, interval '1 day')").unwrap();
        assert_eq!(count("SELECT count(*) FROM outbox.jobs WHERE id = '1' AND run_at = now() + interval '1 hour'"), 1);
        assert_eq!(count("SELECT count(*) FROM outbox.jobs WHERE id = '2' AND run_at = now() + interval '1 day'"), 1);
        crate::worker::queue::absorb_all();
        assert_eq!(count("SELECT count(*) FROM outbox.queue WHERE id = '1' AND run_at = now() + interval '1 hour'"), 1);
    }

    /// Where a kind's row was found is remembered across calls; a kind gone,
    /// or registered again elsewhere, is seen at once all the same.
    #[pg_test]
    fn a_kind_unregistered_or_registered_again_is_seen_at_once() {
        setup();
        assert_eq!(sqlstate_of("SELECT outbox.enqueue('user', 1)"), "00000");
        Spi::run("SELECT outbox.unregister('user', true)").unwrap();
        assert_eq!(sqlstate_of("SELECT outbox.enqueue('user', 2)"), "42704");
        Spi::run("SELECT outbox.register('filler', 'http://h/{id}')").unwrap();
        setup();
        assert_eq!(sqlstate_of("SELECT outbox.enqueue('user', 3)"), "00000");
        // A direct delete, which tells the enqueue cache nothing.
        Spi::run("DELETE FROM outbox.kinds WHERE kind = 'user'").unwrap();
        crate::api::grants::forget();
        assert_eq!(sqlstate_of("SELECT outbox.enqueue('user', 4)"), "42704");
    }

    /// The inbox is written below the executor, so enqueue itself refuses
    /// what the executor would refuse an INSERT.
    #[pg_test]
    fn a_read_only_transaction_may_not_enqueue() {
        setup();
        Spi::run("SET LOCAL transaction_read_only = on").unwrap();
        assert_eq!(sqlstate_of("SELECT outbox.enqueue('user', 1)"), "25006");
    }

    #[pg_test]
    fn bad_input_is_rejected_with_sqlstates() {
        setup();
        let cases = [
            ("SELECT outbox.enqueue(NULL, 'x')", "22004"),
            ("SELECT outbox.enqueue('', 'x')", "22023"),
            ("SELECT outbox.enqueue('nope', 'x')", "42704"),
            ("SELECT outbox.enqueue('user', NULL::text)", "22004"),
            ("SELECT outbox.enqueue('user', NULL::bigint)", "22004"),
            ("SELECT outbox.enqueue('user', NULL::uuid)", "22004"),
            ("SELECT outbox.enqueue('user', '')", "22023"),
            ("SELECT outbox.enqueue('user', repeat('x', 1025))", "22001"),
            ("SELECT outbox.enqueue('user', 'x', NULL)", "22004"),
            ("SELECT outbox.enqueue('user', 1, interval '-1 s')", "22023"),
            ("SELECT outbox.enqueue('user', 'x', interval '-1 month')", "22023"),
            ("SELECT outbox.enqueue('user', NULL)", "22004"),
            ("SELECT outbox.enqueue('user', now())", "0A000"),
            ("SELECT outbox.enqueue('user', 1.5::float8)", "0A000"),
            ("SELECT outbox.enqueue('user', ROW(1, 2))", "0A000"),
        ];
        crate::testing::assert_sqlstates(&cases);
        let msg = error_of("SELECT outbox.enqueue('nope', 'x')").unwrap();
        assert!(msg.contains("not registered"), "{msg}");
        assert_eq!(sqlstate_of("SELECT outbox.enqueue('user', repeat('x', 1024))"), "00000");
        assert_eq!(count("SELECT count(*) FROM outbox.jobs"), 1);
    }
}
