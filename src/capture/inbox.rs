//! The inbox writer: where every change goes before the worker moves it into
//! the queue, whether a tracked table's trigger or `outbox.enqueue()` made it.
//!
//! `enqueue_trigger` and `enqueue` hand each changed id to [`append`], with
//! the time it may be delivered from if the enqueue had a delay. Ids are kept in
//! backend memory and written to `outbox.inbox` as rows of `(kind, ids[])`,
//! each up to [`ROW_BYTES`] of ids: one heap insert and one WAL record per
//! hundred-odd changes instead of one per change. That is most of what a bulk
//! UPDATE of a tracked table pays for tracking. A row of a single change
//! holds it in `id` instead, with no array around it.
//!
//! Nothing may stay in memory when the transaction commits, and the rows must
//! be visible to the next statement of the same transaction, so the buffer is
//! written out:
//! - as soon as one kind's ids fill a row;
//! - when each statement's executor finishes, after its AFTER triggers have
//!   run (`ExecutorFinish_hook`), and after a COPY (`ProcessUtility_hook`);
//! - at PRE_COMMIT and PRE_PREPARE, whatever is left (a safety net: for a
//!   backend that loaded the library in the middle of a statement).
//!
//! Subtransactions: each buffered run is tagged with the subtransaction that
//! buffered it. Aborting a subtransaction drops its runs (and those of the
//! children that committed into it). A run is only written while its own
//! subtransaction, or a child that commits into it, is current: written in a
//! child that later rolls back, an enclosing transaction's change would be lost.

use crate::pg::errors::raise;
use pgrx::prelude::*;
use pgrx::PgMemoryContexts;
use std::cell::{Cell, RefCell};

/// Bytes of ids per inbox row. The row stays under the TOAST threshold
/// (about 2 kB), so it is never compressed or moved out of line.
const ROW_BYTES: usize = 1800;

/// What an id takes in a text[]: a 4-byte header, padded to 4 bytes.
fn stored_bytes(id: &str) -> usize {
    4 + id.len().next_multiple_of(4)
}

/// Most distinct records remembered per transaction to skip repeats; past
/// it, repeats are simply written again (the worker coalesces them).
const DEDUPE_LIMIT: usize = 100_000;

/// Ids of one kind and delay buffered by one subtransaction.
struct Run {
    subxact: pg_sys::SubTransactionId,
    kind: String,
    /// Not before this time (an enqueue's delay); None: at once.
    run_at: Option<pg_sys::TimestampTz>,
    ids: Vec<String>,
    bytes: usize,
}

#[derive(Default)]
struct Buffer {
    runs: Vec<Run>,
    /// (kind, id) already buffered or written by this transaction, without a
    /// delay: a repeat, delayed or not, adds nothing (the worker takes the
    /// earliest time a record's changes ask for). Cleared at transaction end
    /// and when a subtransaction aborts (its rows are gone).
    seen: foldhash::HashMap<String, foldhash::HashSet<String>>,
    seen_count: usize,
}

thread_local! {
    static BUFFER: RefCell<Buffer> = RefCell::new(Buffer::default());
}

/// Buffers a change of `(kind, id)` made by the current (sub)transaction,
/// to be delivered not before `run_at` (None: at once).
pub fn append(kind: &str, id: String, run_at: Option<pg_sys::TimestampTz>) {
    crate::capture::ids::check_id(&id);
    // SAFETY: a plain read of the transaction state; we are in a transaction.
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    let full = BUFFER.with(|b| {
        let b = &mut *b.borrow_mut();
        if b.seen.get(kind).is_some_and(|s| s.contains(&id)) {
            return None;
        }
        if run_at.is_none() && b.seen_count < DEDUPE_LIMIT {
            match b.seen.get_mut(kind) {
                Some(s) => s.insert(id.clone()),
                None => b.seen.entry(kind.to_string()).or_default().insert(id.clone()),
            };
            b.seen_count += 1;
        }
        let at = match b.runs.iter().rposition(|r| r.subxact == subxact && r.run_at == run_at && r.kind == kind) {
            Some(i) => i,
            None => {
                // Every buffered id sits in a run, and runs end with their
                // transaction: so the transaction's callbacks, which write
                // what is left before commit, forget it all at the end and
                // wake the worker, are in place before the first id is kept.
                crate::capture::wake::for_inbox();
                b.runs.push(Run { subxact, kind: kind.to_string(), run_at, ids: Vec::new(), bytes: 0 });
                b.runs.len() - 1
            }
        };
        // A run that would outgrow a row is written out as one, first.
        let run = &mut b.runs[at];
        let size = stored_bytes(&id);
        let full = (!run.ids.is_empty() && run.bytes + size > ROW_BYTES).then(|| {
            run.bytes = 0;
            (run.kind.clone(), std::mem::take(&mut run.ids))
        });
        run.bytes += size;
        run.ids.push(id);
        full
    });
    if let Some((kind, ids)) = full {
        write(&kind, &ids, run_at);
    }
}

/// Writes every run the current subtransaction may write.
pub fn flush() {
    // Every statement of every session passes here: most have nothing to write.
    if !pending() {
        return;
    }
    // SAFETY: plain reads of the transaction state.
    let (writable, current) = unsafe {
        (pg_sys::IsTransactionState() && !pg_sys::IsInParallelMode(), pg_sys::GetCurrentSubTransactionId())
    };
    if !writable {
        return;
    }
    // A run tagged with a later subtransaction than the current one comes
    // from a child that committed into it: it is ours now.
    let runs: Vec<Run> = BUFFER.with(|b| {
        let runs = &mut b.borrow_mut().runs;
        if runs.iter().all(|r| r.subxact >= current) {
            return std::mem::take(runs);
        }
        let (mine, theirs) = std::mem::take(runs).into_iter().partition(|r| r.subxact >= current);
        *runs = theirs;
        mine
    });
    for run in &runs {
        write(&run.kind, &run.ids, run.run_at);
    }
}

/// Whether ids are still buffered (at commit, there must be none).
pub fn pending() -> bool {
    BUFFER.with(|b| b.try_borrow().map(|b| !b.runs.is_empty()).unwrap_or(true))
}

/// Before commit or prepare, whatever is still buffered goes to the inbox
/// while the transaction can still fail; at its end, or a subtransaction's
/// abort, the buffer forgets.
pub const XACT: crate::pg::xact::Handlers =
    crate::pg::xact::Handlers { before_commit: flush, ended: transaction_ended, subtransaction_aborted: forget_subxact };

fn transaction_ended(committed: bool) {
    if committed && pending() {
        // Something appended after the flush before commit (another
        // extension's callback writing a tracked table): those changes
        // can't be saved now.
        pgrx::warning!("outbox: changes to tracked tables made during commit were not recorded");
    }
    forget();
}

/// Past this many remembered changes, a transaction's end frees the memory
/// of `seen` instead of keeping it for the next transaction.
const SEEN_KEPT: usize = 1024;

/// The transaction ended: forget everything. Must not raise.
pub(crate) fn forget() {
    BUFFER.with(|b| {
        if let Ok(mut b) = b.try_borrow_mut() {
            if b.seen_count > SEEN_KEPT || b.seen.len() > 16 {
                *b = Buffer::default();
            } else {
                // Keep the allocations: most transactions change a record or
                // two of the same kinds as the last one.
                b.runs.clear();
                b.seen.values_mut().for_each(|s| s.clear());
                b.seen_count = 0;
            }
        }
    });
}

/// Subtransaction `subxact` aborted: its runs, and those of children that
/// committed into it, are void. Must not raise.
fn forget_subxact(subxact: pg_sys::SubTransactionId) {
    BUFFER.with(|b| {
        if let Ok(mut b) = b.try_borrow_mut() {
            b.runs.retain(|r| r.subxact < subxact);
            b.seen.clear();
            b.seen_count = 0;
        }
    });
}

thread_local! {
    /// Where outbox.inbox was found ([`crate::schema::open`]).
    static INBOX: Cell<Option<(pg_sys::Oid, pg_sys::Oid)>> = const { Cell::new(None) };
    /// Where an inbox row is built; reset before each row.
    static ROWS: Cell<pg_sys::MemoryContext> = const { Cell::new(std::ptr::null_mut()) };
}

/// Opens outbox.inbox with `lock`, or raises 42P01.
///
/// # Safety
/// In a transaction; the caller closes the relation.
unsafe fn open(lock: pg_sys::LOCKMODE) -> pg_sys::Relation {
    // SAFETY: the caller's contract.
    match unsafe { crate::schema::open(c"inbox", &INBOX, lock) } {
        Some(rel) => rel,
        None => raise(PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE, "outbox.inbox does not exist", Some("Is the outbox extension installed?")),
    }
}

/// The memory context inbox rows are built in: made once per backend.
fn rows_context() -> pg_sys::MemoryContext {
    let mut cxt = ROWS.get();
    if cxt.is_null() {
        // SAFETY: a child of TopMemoryContext lives as long as the backend.
        cxt = unsafe {
            pg_sys::AllocSetContextCreateInternal(
                pg_sys::TopMemoryContext,
                c"outbox inbox rows".as_ptr(),
                pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
            )
        };
        ROWS.set(cxt);
    }
    cxt
}

/// Inserts one inbox row of a kind's ids. A run never holds more than a
/// row's worth: [`append`] writes it out before it would outgrow one.
fn write(kind: &str, ids: &[String], run_at: Option<pg_sys::TimestampTz>) {
    debug_assert!(ids.len() == 1 || ids.iter().map(|id| stored_bytes(id)).sum::<usize>() <= ROW_BYTES);
    let cxt = rows_context();
    // SAFETY: the inbox is our own plain heap table; we hold RowExclusiveLock
    // while inserting, as the executor would. It has no indexes (checked), so
    // a heap insert is the whole insert. The palloc'd values live in a memory
    // context of their own, reset before each row is built: it holds at most
    // one row's worth between writes.
    unsafe {
        let lock = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
        let rel = open(lock);
        if (*(*rel).rd_rel).relhasindex {
            pg_sys::table_close(rel, lock);
            raise(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, "outbox.inbox must not have indexes", None);
        }
        // The row below is built for the table as the extension creates it.
        if (*(*rel).rd_att).natts != 5 {
            pg_sys::table_close(rel, lock);
            raise(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "outbox.inbox does not have the columns (kind, id, ids, enqueued_at, run_at)",
                Some("Was the table altered? Reinstall the extension."),
            );
        }
        pg_sys::MemoryContextReset(cxt);
        PgMemoryContexts::For(cxt).switch_to(|_| {
            // (kind, id, ids, enqueued_at, run_at): one change in id,
            // several in ids.
            let (id, ids) = match ids {
                [one] => (text_datum(one), None),
                _ => {
                    let mut elems: Vec<pg_sys::Datum> = ids.iter().map(|id| text_datum(id)).collect();
                    let array = pg_sys::construct_array(
                        elems.as_mut_ptr(),
                        elems.len() as i32,
                        pg_sys::TEXTOID,
                        -1,
                        false,
                        pg_sys::TYPALIGN_INT as std::ffi::c_char,
                    );
                    (pg_sys::Datum::from(0), Some(pg_sys::Datum::from(array)))
                }
            };
            let at = pg_sys::Datum::from(pg_sys::GetCurrentTransactionStartTimestamp());
            let not_before = pg_sys::Datum::from(run_at.unwrap_or(0));
            let mut values = [text_datum(kind), id, ids.unwrap_or(pg_sys::Datum::from(0)), at, not_before];
            let mut nulls = [false, ids.is_some(), ids.is_none(), false, run_at.is_none()];
            let tuple = pg_sys::heap_form_tuple((*rel).rd_att, values.as_mut_ptr(), nulls.as_mut_ptr());
            pg_sys::simple_heap_insert(rel, tuple);
        });
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
}

fn text_datum(s: &str) -> pg_sys::Datum {
    // SAFETY: copies the bytes into a palloc'd text.
    pg_sys::Datum::from(unsafe { pg_sys::cstring_to_text_with_len(s.as_ptr().cast(), s.len() as i32) })
}
