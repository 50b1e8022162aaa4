//! Statements of other sessions that may change jobs in `outbox.queue`.
//!
//! The worker skips a change whose record has a fresh job it knows of
//! (`worker::fresh_jobs`). To skip it without reading the job again, it must
//! know that nobody has changed a job since it last read that one. So every
//! UPDATE, DELETE and TRUNCATE of the queue fires `queue_changing` twice, as
//! statement triggers: BEFORE counts the statement in (and moves a
//! generation), AFTER counts it out. A statement that fails before its AFTER
//! trigger is counted out when its (sub)transaction ends. The worker's own
//! statements are not counted: it accounts for what they do itself.

use pgrx::prelude::*;
use std::cell::RefCell;

thread_local! {
    /// The subtransaction of each statement counted in and not yet out.
    static COUNTED: RefCell<Vec<pg_sys::SubTransactionId>> = const { RefCell::new(Vec::new()) };
}

#[pg_trigger(sql = "
CREATE FUNCTION outbox.queue_changing() RETURNS trigger
LANGUAGE c SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
")]
fn queue_changing<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, std::convert::Infallible> {
    if !matches!(trigger.level(), PgTriggerLevel::Statement) {
        crate::errors::raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "outbox.queue_changing must fire FOR EACH STATEMENT",
            Some("It belongs to outbox.queue's own triggers; don't attach it elsewhere."),
        );
    }
    if crate::shmem::is_worker() || crate::shmem::queue_generation().is_none() {
        return Ok(None);
    }
    match trigger.when() {
        Ok(PgTriggerWhen::Before) => {
            crate::enqueue::register_callbacks();
            // SAFETY: a plain read of the transaction state; a trigger runs in one.
            let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
            COUNTED.with(|c| c.borrow_mut().push(subxact));
            crate::shmem::queue_statement_starts();
        }
        _ => {
            if COUNTED.with(|c| c.borrow_mut().pop()).is_some() {
                crate::shmem::queue_statements_end(1);
            }
        }
    }
    Ok(None)
}

/// The transaction ended: whatever is still counted is over. Cannot raise.
pub(crate) fn transaction_ended() {
    let n = COUNTED.with(|c| c.try_borrow_mut().map(|mut c| std::mem::take(&mut *c).len()).unwrap_or(0));
    crate::shmem::queue_statements_end(n as u32);
}

/// Subtransaction `subxact` aborted: its statements, and those of its
/// children, never reach their AFTER trigger. Cannot raise.
pub(crate) fn subtransaction_aborted(subxact: pg_sys::SubTransactionId) {
    let n = COUNTED.with(|c| {
        c.try_borrow_mut().map_or(0, |mut c| {
            let before = c.len();
            c.retain(|&s| s < subxact);
            before - c.len()
        })
    });
    crate::shmem::queue_statements_end(n as u32);
}

extension_sql!(
    r#"
-- Every statement that may change queue jobs, counted in and out (see
-- queue_writers.rs). ALWAYS: a session_replication_role of replica must not
-- skip them.
CREATE TRIGGER queue_changing_before BEFORE UPDATE OR DELETE OR TRUNCATE ON outbox.queue
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.queue_changing();
CREATE TRIGGER queue_changing_after AFTER UPDATE OR DELETE OR TRUNCATE ON outbox.queue
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.queue_changing();
ALTER TABLE outbox.queue ENABLE ALWAYS TRIGGER queue_changing_before;
ALTER TABLE outbox.queue ENABLE ALWAYS TRIGGER queue_changing_after;
"#,
    name = "queue_writer_triggers",
    requires = [queue_changing]
);

#[cfg(test)]
mod qualified {
    #[test]
    fn every_statement_names_the_schema_of_its_functions_and_operators() {
        let blocks = crate::sql_check::extension_sql_blocks(include_str!("queue_writers.rs"));
        assert_eq!(blocks.len(), 1);
        crate::sql_check::assert_qualified(&[("extension_sql queue_writer_triggers", blocks[0])]);
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn writers() -> u32 {
        crate::shmem::queue_writers().expect("the tests preload the extension")
    }

    #[pg_test]
    fn statements_changing_the_queue_are_counted_while_they_run() {
        crate::testing::hold_the_queue();
        Spi::run("SELECT outbox.register('counted', 'http://h/{id}')").unwrap();
        Spi::run("SELECT outbox.enqueue('counted', 'a')").unwrap();
        let before = crate::shmem::queue_generation().unwrap();
        assert_eq!(writers(), 0);
        Spi::run("UPDATE outbox.queue SET run_at = now() WHERE id = 'a'").unwrap();
        Spi::run("DELETE FROM outbox.queue WHERE id = 'nothing'").unwrap();
        Spi::run("TRUNCATE outbox.queue").unwrap();
        assert_eq!(writers(), 0, "each statement was counted out");
        assert_eq!(crate::shmem::queue_generation().unwrap(), before + 3);
        // A statement that fails after its BEFORE trigger, in a subtransaction
        // rolled back: counted out by the abort.
        Spi::run("SELECT outbox.enqueue('counted', 'b')").unwrap();
        let failed = crate::subxact::try_subtransaction(|| Spi::run("UPDATE outbox.queue SET state = 'bogus' WHERE id = 'b'"));
        assert!(failed.is_err());
        assert_eq!(writers(), 0, "the failed statement was counted out");
        assert!(crate::shmem::queue_generation().unwrap() > before + 3);
    }
}
