//! `outbox.enqueue(kind, id [, delay])`: records *which* record changed, in the
//! caller's transaction, and wakes the worker when that transaction commits.
//!
//! Coalescing: at most one fresh (pending, never attempted) job exists per
//! (kind, id). An enqueue that finds one keeps it locked until its transaction
//! ends, so the worker cannot claim it and read the record's state before
//! this transaction's change is visible.

use crate::errors::{raise, require, require_kind, unknown_kind};
use pgrx::datum::{DatumWithOid, Interval};
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::PgOid;
use std::cell::{Cell, OnceCell, RefCell};
use std::collections::HashSet;

/// Longest id accepted, in bytes.
pub const MAX_ID_LEN: usize = 1024;

/// Inserts a fresh job, or locks (and moves earlier) the fresh one that exists.
/// `DO UPDATE ... WHERE` locks the conflicting row even when it updates nothing.
const INSERT_OR_LOCK: &str = "
INSERT INTO outbox.queue AS q (kind, id, run_at)
SELECT k.kind, $2, pg_catalog.now() OPERATOR(pg_catalog.+) $3
  FROM outbox.kinds k
 WHERE k.kind OPERATOR(pg_catalog.=) $1
ON CONFLICT (kind, id) WHERE state OPERATOR(pg_catalog.=) 'pending' AND last_attempt_at IS NULL
DO UPDATE SET run_at = excluded.run_at WHERE q.run_at OPERATOR(pg_catalog.>) excluded.run_at
RETURNING q.job_id";

const KIND_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM outbox.kinds WHERE kind OPERATOR(pg_catalog.=) $1)";

/// The SQL statements of this module, for the qualification sweep.
#[cfg(test)]
pub(crate) const STATEMENTS: &[(&str, &str)] = &[("INSERT_OR_LOCK", INSERT_OR_LOCK), ("KIND_EXISTS", KIND_EXISTS)];

thread_local! {
    static PLANS: OnceCell<[OwnedPreparedStatement; 2]> = const { OnceCell::new() };
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
    /// (kind, id) -> job id, for immediate enqueues already made in this
    /// transaction: repeating one needs no round trip. Cleared when the
    /// transaction ends and whenever a subtransaction aborts (its inserts and
    /// row locks are gone).
    seen: HashSet<(String, String)>,
    /// (user, kind) pairs found allowed to enqueue in this transaction.
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

/// Like [`wake_on_commit`], and tells the worker to reload its kinds.
pub fn kinds_changed_on_commit() {
    on_commit(|x| x.kinds_on_commit = true);
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
    crate::queue_writers::transaction_ended();
    crate::worker::fresh_jobs::transaction_ended(wake);
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
            s.seen.clear();
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
                s.seen.clear();
                // A grant made in the subtransaction is gone with it.
                s.allowed.clear();
            }
        });
        crate::inbox::forget_subxact(my);
        crate::queue_writers::subtransaction_aborted(my);
    }
}

fn with_plans<R>(f: impl FnOnce(&[OwnedPreparedStatement; 2]) -> R) -> R {
    PLANS.with(|cell| {
        let plans = cell.get_or_init(|| {
            Spi::connect(|c| {
                let text = PgOid::BuiltIn(pg_sys::BuiltinOid::TEXTOID);
                let interval = PgOid::BuiltIn(pg_sys::BuiltinOid::INTERVALOID);
                let prep = |sql: &str, args: &[PgOid]| {
                    c.prepare_mut(sql, args).unwrap_or_else(|e| panic!("preparing enqueue: {e}")).keep()
                };
                [prep(INSERT_OR_LOCK, &[text, text, interval]), prep(KIND_EXISTS, &[text])]
            })
        });
        f(plans)
    })
}

/// Validates the arguments, checks that the caller may enqueue the kind,
/// and enqueues; shared by every `enqueue` overload.
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
    check_allowed(kind);
    let immediate = delay.as_micros() == 0;
    if immediate && XACT.with(|x| x.borrow().seen.contains(&(kind.to_string(), id.to_string()))) {
        return;
    }
    crate::roles::as_queue_owner(|| insert_or_lock(kind, id, delay));
    wake_on_commit();
    if immediate {
        XACT.with(|x| x.borrow_mut().seen.insert((kind.to_string(), id.to_string())));
    }
}

/// Forgets which enqueues this transaction made, and who was allowed what:
/// after a grant or revoke, and in tests that claim in the enqueuing
/// transaction (which the worker never can).
pub fn forget_this_transaction() {
    XACT.with(|x| {
        let mut x = x.borrow_mut();
        x.seen.clear();
        x.allowed.clear();
    });
}

/// Raises 42501 unless the current user may enqueue `kind` (checked once
/// per user and kind in a transaction). The same error whether or not the
/// kind exists: a role learns nothing of kinds it may not use.
fn check_allowed(kind: &str) {
    // SAFETY: reading the current user id.
    let user = unsafe { pg_sys::GetUserId() };
    let key = (user, kind.to_string());
    if XACT.with(|x| x.borrow().allowed.contains(&key)) {
        return;
    }
    if !crate::enqueue_grants::may_enqueue(user, kind) {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied to enqueue kind \"{kind}\""),
            Some("An admin allows a role with SELECT outbox.grant_enqueue('role', 'kind'), or for every kind with SELECT outbox.grant_enqueue('role')."),
        );
    }
    XACT.with(|x| x.borrow_mut().allowed.insert(key));
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

/// Inserts a fresh job or locks the one there is; raises if the kind is not
/// registered.
fn insert_or_lock(kind: &str, id: &str, delay: Interval) {
    with_plans(|[insert, kind_exists]| {
        Spi::connect_mut(|c| {
            let args: [DatumWithOid; 3] = [kind.into(), id.into(), delay.into()];
            let inserted = c.update(insert, None, &args).unwrap_or_else(|e| panic!("enqueue: {e}"));
            if inserted.first().get_one::<i64>().ok().flatten().is_some() {
                return;
            }
            // Locked, not changed: the insert returned no row.
            if crate::fresh_key::fresh_job(kind, id).is_some() {
                return;
            }
            let exists = c
                .select(kind_exists, None, &[kind.into()])
                .ok()
                .and_then(|t| t.first().get_one::<bool>().ok().flatten())
                .unwrap_or(false);
            if !exists {
                unknown_kind(kind);
            }
            // The insert neither inserted nor found a conflict it could lock:
            // cannot happen while we hold the row lock, so say so plainly.
            raise(
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                format!("could not enqueue ({kind}, {id})"),
                Some("Retry the transaction."),
            )
        })
    })
}

/// Enqueues a delivery of record `id` of `kind`, not before `delay` from now.
/// Runs as the caller: [`check_allowed`] decides, then only the insert runs
/// as the queue's owner.
#[pg_extern(schema = "outbox", name = "enqueue")]
#[search_path(pg_catalog, pg_temp)]
fn enqueue_text(kind: Option<&str>, id: Option<&str>, delay: default!(Option<Interval>, "'0 s'")) {
    enqueue_one(kind, id, delay)
}

#[pg_extern(schema = "outbox", name = "enqueue")]
#[search_path(pg_catalog, pg_temp)]
fn enqueue_bigint(kind: Option<&str>, id: Option<i64>, delay: default!(Option<Interval>, "'0 s'")) {
    let id = id.map(|i| i.to_string());
    enqueue_one(kind, id.as_deref(), delay)
}

#[pg_extern(schema = "outbox", name = "enqueue")]
#[search_path(pg_catalog, pg_temp)]
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

    fn job_ids() -> Vec<i64> {
        Spi::connect(|c| c.select("SELECT job_id FROM outbox.queue ORDER BY job_id", None, &[]).unwrap().filter_map(|r| r.get::<i64>(1).ok().flatten()).collect())
    }

    #[pg_test]
    fn enqueue_text_bigint_uuid() {
        setup();
        Spi::run("SELECT outbox.enqueue('user', 'a')").unwrap();
        Spi::run("SELECT outbox.enqueue('user', 42)").unwrap();
        Spi::run("SELECT outbox.enqueue('user', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid)").unwrap();
        let ids = crate::testing::texts("SELECT id FROM outbox.jobs ORDER BY job_id", &[]);
        assert_eq!(ids, ["a", "42", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]);
        assert_eq!(count("SELECT count(*) FROM outbox.jobs WHERE state = 'pending' AND attempts = 0"), 3);
        // It returns nothing: no job id of a record the caller can't see.
        let returns = Spi::get_one::<String>("SELECT prorettype::regtype::text FROM pg_proc WHERE oid = 'outbox.enqueue(text, text, interval)'::regprocedure").unwrap();
        assert_eq!(returns.as_deref(), Some("void"));
    }

    #[pg_test]
    fn coalesces_into_one_pending_job() {
        setup();
        Spi::run("SELECT outbox.enqueue('user', 7)").unwrap();
        Spi::run("SELECT outbox.enqueue('user', '7')").unwrap();
        assert_eq!(count("SELECT count(*) FROM outbox.queue"), 1);
    }

    #[pg_test]
    fn a_rolled_back_subtransaction_forgets_its_enqueues() {
        setup();
        let r = crate::subxact::try_subtransaction(|| {
            Spi::run("SELECT outbox.enqueue('user', 8)").unwrap();
            panic!("roll the subtransaction back");
        });
        assert!(r.is_err());
        assert_eq!(count("SELECT count(*) FROM outbox.queue WHERE id = '8'"), 0);
        // The per-transaction cache must not claim the job still exists.
        Spi::run("SELECT outbox.enqueue('user', 8)").unwrap();
        assert_eq!(count("SELECT count(*) FROM outbox.queue WHERE id = '8'"), 1);
    }

    #[pg_test]
    fn a_running_job_gets_a_new_pending_one() {
        setup();
        Spi::run("SELECT outbox.enqueue('user', 7)").unwrap();
        let first = job_ids()[0];
        // As the worker's claim would.
        Spi::run(&format!("UPDATE outbox.queue SET state = 'running', attempts = 1, last_attempt_at = now() WHERE job_id = {first}")).unwrap();
        // A fresh transaction-level cache would still map (user, 7) to the
        // running job; the real worker only claims committed jobs, so clear
        // it the way a new transaction does.
        super::forget_this_transaction();
        Spi::run("SELECT outbox.enqueue('user', 7)").unwrap();
        assert_eq!(job_ids().len(), 2);
        assert_ne!(first, job_ids()[1]);
        assert_eq!(count("SELECT count(*) FROM outbox.jobs WHERE state = 'pending'"), 1);
        assert_eq!(count("SELECT count(*) FROM outbox.jobs WHERE state = 'running'"), 1);
    }

    #[pg_test]
    fn enqueue_of_a_record_with_a_fresh_job_reads_only_that_job() {
        setup();
        // 5,000 pending jobs of one kind in a queue never analyzed, and
        // generic plans: the planner's view early in a busy session.
        Spi::run("SELECT count(outbox.enqueue('user', g)) FROM generate_series(1, 5000) g").unwrap();
        Spi::run("SET LOCAL plan_cache_mode = force_generic_plan").unwrap();
        let expected = count("SELECT job_id FROM outbox.queue WHERE id = '4321'");
        // Index entries read this transaction, per index.
        let read = |index: &str| count(&format!("SELECT pg_stat_get_xact_tuples_returned('outbox.{index}'::regclass)"));
        for _ in 0..3 {
            // As a new transaction would find it: no cached job id.
            super::forget_this_transaction();
            let (due, fresh) = (read("queue_due"), read("queue_fresh_key"));
            Spi::run("SELECT outbox.enqueue('user', 4321)").unwrap();
            assert_eq!(count("SELECT job_id FROM outbox.queue WHERE id = '4321'"), expected);
            assert_eq!(read("queue_due") - due, 0, "the lookup went through queue_due");
            assert!(read("queue_fresh_key") - fresh >= 1, "the counters did not move");
        }
        assert_eq!(count("SELECT count(*) FROM outbox.queue"), 5000);
    }

    #[pg_test]
    fn delay_sets_run_at_and_an_immediate_enqueue_moves_it_earlier() {
        setup();
        Spi::run("SELECT outbox.enqueue('user', 1, interval '1 hour')").unwrap();
        assert_eq!(count("SELECT count(*) FROM outbox.queue WHERE run_at > now() + interval '59 min'"), 1);
        Spi::run("SELECT outbox.enqueue('user', 1)").unwrap();
        assert_eq!(count("SELECT count(*) FROM outbox.queue WHERE run_at <= now()"), 1);
        assert_eq!(count("SELECT count(*) FROM outbox.queue"), 1);
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
        assert_eq!(count("SELECT count(*) FROM outbox.queue"), 1);
    }
}
