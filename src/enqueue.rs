//! `outbox.enqueue(kind, id [, delay])`: records *which* record changed, in the
//! caller's transaction, and wakes the worker when that transaction commits.
//!
//! One capture path: an enqueue is a change like a tracked table's, and goes
//! through the same per-transaction buffer into `outbox.inbox`
//! ([`crate::inbox`]). Nothing here reads, locks or writes a queue job, so
//! nothing the caller sees depends on other jobs: the worker coalesces when
//! it moves the inbox into the queue, after the changes have committed.

use crate::errors::{raise, require, require_kind, unknown_kind};
use crate::enqueue_grants::Access;
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;
use pgrx::IntoDatum;
use std::cell::{Cell, RefCell};
use std::collections::HashSet;

/// Longest id accepted, in bytes.
pub const MAX_ID_LEN: usize = 1024;

thread_local! {
    static XACT: RefCell<XactState> = RefCell::new(XactState::default());
    static CALLBACKS_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// What this backend's current transaction has enqueued.
#[derive(Default)]
struct XactState {
    wake_on_commit: bool,
    /// This transaction appended to the inbox (through a tracked table).
    inbox_on_commit: bool,
    /// This transaction changed `outbox.kinds`.
    kinds_on_commit: bool,
    /// (user, kind) pairs found allowed to enqueue, and registered, in this
    /// transaction. Cleared when it ends and when a subtransaction aborts
    /// (a grant or register made in it is gone).
    allowed: HashSet<(pg_sys::Oid, String)>,
}

/// Makes the worker's latch be set when the current transaction commits.
pub fn wake_on_commit() {
    on_commit(|_| {});
}

/// Like [`wake_on_commit`], and tells the worker the inbox has rows.
pub fn wake_on_commit_for_inbox() {
    on_commit(|x| x.inbox_on_commit = true);
}

/// Like [`wake_on_commit`], and tells the worker to reload its kinds. A
/// kind registered or gone is looked up again by the next enqueue.
pub fn kinds_changed_on_commit() {
    on_commit(|x| {
        x.kinds_on_commit = true;
        x.allowed.clear();
    });
}

/// Wakes the worker on commit, with whatever else `mark` asks it to do then.
fn on_commit(mark: impl FnOnce(&mut XactState)) {
    register_callbacks();
    XACT.with(|x| {
        let mut x = x.borrow_mut();
        x.wake_on_commit = true;
        mark(&mut x);
    });
}

pub(crate) fn register_callbacks() {
    if CALLBACKS_REGISTERED.get() {
        return;
    }
    // SAFETY: registering plain function pointers that live as long as the
    // library; done once per backend.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact_event), std::ptr::null_mut());
    }
    CALLBACKS_REGISTERED.set(true);
}

/// Only the PRE_ events may raise: an ERROR after commit aborts the backend.
#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    let wake = match event {
        // Tracked changes still buffered go to the inbox while the
        // transaction can still fail.
        XACT_EVENT_PRE_COMMIT | XACT_EVENT_PRE_PREPARE => {
            crate::inbox::flush();
            return;
        }
        XACT_EVENT_COMMIT => true,
        XACT_EVENT_ABORT | XACT_EVENT_PREPARE | XACT_EVENT_PARALLEL_ABORT => false,
        _ => return,
    };
    if wake && crate::inbox::pending() {
        // Something appended after our PRE_COMMIT flush (another extension's
        // callback writing a tracked table): those changes can't be saved now.
        pgrx::warning!("outbox: changes to tracked tables made during commit were not recorded");
    }
    let (should_wake, inbox, kinds) = XACT.with(|x| match x.try_borrow_mut() {
        Ok(mut s) => {
            let w = (s.wake_on_commit, s.inbox_on_commit, s.kinds_on_commit);
            s.wake_on_commit = false;
            s.inbox_on_commit = false;
            s.kinds_on_commit = false;
            s.allowed.clear();
            w
        }
        Err(_) => (true, true, true),
    });
    crate::inbox::forget();
    if wake && inbox {
        crate::shmem::mark_inbox_dirty();
    }
    if wake && kinds {
        crate::shmem::bump_kinds_generation();
    }
    if wake && should_wake {
        crate::shmem::wake_worker();
    }
}

unsafe extern "C-unwind" fn on_subxact_event(
    event: pg_sys::SubXactEvent::Type,
    my: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        XACT.with(|x| {
            if let Ok(mut s) = x.try_borrow_mut() {
                // A grant or register made in the subtransaction is gone with it.
                s.allowed.clear();
            }
        });
        crate::inbox::forget_subxact(my);
    }
}

/// Validates the arguments, checks that the caller may enqueue the kind,
/// and appends the change to this transaction's inbox buffer; shared by
/// every `enqueue` overload.
pub fn enqueue_one(kind: Option<&str>, id: Option<&str>, delay: Option<Interval>) {
    let kind = require_kind(kind);
    let id = require(id, "id");
    check_id(id);
    let delay = require(delay, "delay");
    if delay.as_micros() < 0 {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "delay must not be negative",
            Some("A delay means \"not before now + delay\"; use '0 s' (the default) for now."),
        );
    }
    // The inbox is written with direct heap inserts, which check none of
    // this themselves; the executor would have refused an INSERT here.
    // SAFETY: each raises an ERROR (25006, or 0A000 in parallel mode) if the
    // transaction may not write.
    unsafe {
        pg_sys::PreventCommandIfReadOnly(c"outbox.enqueue()".as_ptr());
        pg_sys::PreventCommandIfParallelMode(c"outbox.enqueue()".as_ptr());
        pg_sys::PreventCommandDuringRecovery(c"outbox.enqueue()".as_ptr());
    }
    check_allowed(kind);
    let delayed = delay.months() != 0 || delay.days() != 0 || delay.micros() != 0;
    crate::inbox::append(kind, id.to_string(), delayed.then(|| not_before(delay)));
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

/// Forgets who was allowed what in this transaction: after a grant, a
/// revoke, or a change of the kinds.
pub fn forget_this_transaction() {
    XACT.with(|x| x.borrow_mut().allowed.clear());
}

/// Raises 42501 unless the current user may enqueue `kind`, and 42704 if
/// the kind is not registered (checked once per user and kind in a
/// transaction). The same 42501 whether or not the kind exists: a role
/// learns nothing of kinds it may not use.
fn check_allowed(kind: &str) {
    // SAFETY: reading the current user id.
    let user = unsafe { pg_sys::GetUserId() };
    if XACT.with(|x| x.borrow().allowed.iter().any(|(u, k)| *u == user && k == kind)) {
        return;
    }
    match crate::enqueue_grants::access(user, kind) {
        Access::Allowed => {}
        Access::UnknownKind => unknown_kind(kind),
        Access::Denied => raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied to enqueue kind \"{kind}\""),
            Some("An admin allows a role with SELECT outbox.grant_enqueue('role', 'kind'), or for every kind with SELECT outbox.grant_enqueue('role')."),
        ),
    }
    XACT.with(|x| x.borrow_mut().allowed.insert((user, kind.to_string())));
}

pub(crate) fn check_id(id: &str) {
    if id.is_empty() {
        raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, "id must not be empty", None);
    }
    if id.len() > MAX_ID_LEN {
        raise(
            PgSqlErrorCode::ERRCODE_STRING_DATA_RIGHT_TRUNCATION,
            format!("id is {} bytes long; the limit is {MAX_ID_LEN}", id.len()),
            Some("Enqueue the record's key, not its data."),
        );
    }
}

/// Enqueues a delivery of record `id` of `kind`, not before `delay` from now.
/// Runs as the caller: [`check_allowed`] reads the grants below privileges,
/// and the inbox row is written by the extension itself. No `SET
/// search_path`: it runs no SQL and resolves no name through the path (the
/// clause cost a tenth of the call), so the caller's path can change
/// nothing it does (`schema::tests::every_function_pins_its_search_path`).
#[pg_extern(schema = "outbox", name = "enqueue")]
fn enqueue_text(kind: Option<&str>, id: Option<&str>, delay: default!(Option<Interval>, "'0 s'")) {
    enqueue_one(kind, id, delay)
}

#[pg_extern(schema = "outbox", name = "enqueue")]
fn enqueue_bigint(kind: Option<&str>, id: Option<i64>, delay: default!(Option<Interval>, "'0 s'")) {
    let id = id.map(|i| i.to_string());
    enqueue_one(kind, id.as_deref(), delay)
}

#[pg_extern(schema = "outbox", name = "enqueue")]
fn enqueue_uuid(kind: Option<&str>, id: Option<pgrx::Uuid>, delay: default!(Option<Interval>, "'0 s'")) {
    // pgrx formats a uuid exactly as uuid_out does: lower-case, hyphenated.
    let id = id.map(|u| u.to_string());
    enqueue_one(kind, id.as_deref(), delay)
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
        let returns = Spi::get_one::<String>("SELECT prorettype::regtype::text FROM pg_proc WHERE oid = 'outbox.enqueue(text, text, interval)'::regprocedure").unwrap();
        assert_eq!(returns.as_deref(), Some("void"));
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
        assert_eq!(crate::testing::absorb(), 2);
        assert_eq!(count("SELECT count(*) FROM outbox.queue"), 101);
    }

    #[pg_test]
    fn repeats_in_a_transaction_are_written_once() {
        setup();
        Spi::run("SELECT outbox.enqueue('user', 7)").unwrap();
        Spi::run("SELECT outbox.enqueue('user', '7'), outbox.enqueue('user', 7, interval '1 hour')").unwrap();
        assert_eq!(count("SELECT count(*) FROM outbox.jobs"), 1);
        crate::testing::absorb();
        assert_eq!(count("SELECT count(*) FROM outbox.queue WHERE run_at <= now()"), 1);
    }

    #[pg_test]
    fn a_rolled_back_subtransaction_forgets_its_enqueues() {
        setup();
        let r = crate::subxact::try_subtransaction(|| {
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
        crate::testing::absorb();
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
        super::forget_this_transaction();
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
        ];
        crate::testing::assert_sqlstates(&cases);
        let msg = error_of("SELECT outbox.enqueue('nope', 'x')").unwrap();
        assert!(msg.contains("not registered"), "{msg}");
        assert_eq!(sqlstate_of("SELECT outbox.enqueue('user', repeat('x', 1024))"), "00000");
        assert_eq!(count("SELECT count(*) FROM outbox.jobs"), 1);
    }
}
