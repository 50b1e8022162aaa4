//! The inbox writer: where tracked tables' changes go before the worker moves
//! them into the queue.
//!
//! `enqueue_trigger` hands each changed id to [`append`]. Ids are kept in
//! backend memory and written to `outbox.inbox` as rows of `(kind, ids[])`,
//! each up to [`ROW_BYTES`] of ids: one heap insert and one WAL record per
//! hundred-odd changes instead of one per change. That is most of what a bulk
//! UPDATE of a tracked table pays for tracking.
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

use crate::errors::raise;
use pgrx::prelude::*;
use pgrx::PgMemoryContexts;
use std::cell::RefCell;

/// Bytes of ids per inbox row. The row stays under the TOAST threshold
/// (about 2 kB), so it is never compressed or moved out of line.
pub const ROW_BYTES: usize = 1800;

/// What an id takes in a text[]: a 4-byte header, padded to 4 bytes.
fn stored_bytes(id: &str) -> usize {
    4 + id.len().next_multiple_of(4)
}

/// Most distinct records remembered per transaction to skip repeats; past
/// it, repeats are simply written again (the worker coalesces them).
const DEDUPE_LIMIT: usize = 100_000;

/// Ids of one kind buffered by one subtransaction.
struct Run {
    subxact: pg_sys::SubTransactionId,
    kind: String,
    ids: Vec<String>,
    bytes: usize,
}

#[derive(Default)]
struct Buffer {
    runs: Vec<Run>,
    /// (kind, id) already buffered or written by this transaction. Cleared at
    /// transaction end and when a subtransaction aborts (its rows are gone).
    seen: foldhash::HashMap<String, foldhash::HashSet<String>>,
    seen_count: usize,
    /// outbox.inbox's oid, looked up once per transaction.
    inbox: Option<pg_sys::Oid>,
}

thread_local! {
    static BUFFER: RefCell<Buffer> = RefCell::new(Buffer::default());
}

/// Buffers a change of `(kind, id)` made by the current (sub)transaction.
pub fn append(kind: &str, id: String) {
    crate::enqueue::check_id(&id);
    // SAFETY: a plain read of the transaction state; we are in a transaction.
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    let full = BUFFER.with(|b| {
        let b = &mut *b.borrow_mut();
        if b.seen.get(kind).is_some_and(|s| s.contains(&id)) {
            return None;
        }
        if b.seen_count < DEDUPE_LIMIT {
            match b.seen.get_mut(kind) {
                Some(s) => s.insert(id.clone()),
                None => b.seen.entry(kind.to_string()).or_default().insert(id.clone()),
            };
            b.seen_count += 1;
        }
        let at = match b.runs.iter().rposition(|r| r.subxact == subxact && r.kind == kind) {
            Some(i) => i,
            None => {
                // Every buffered id sits in a run, and runs end with their
                // transaction: so the transaction's callbacks, which write
                // what is left before commit, forget it all at the end and
                // wake the worker, are in place before the first id is kept.
                crate::enqueue::wake_on_commit_for_inbox();
                b.runs.push(Run { subxact, kind: kind.to_string(), ids: Vec::new(), bytes: 0 });
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
        write(&kind, &ids);
    }
}

/// Writes every run the current subtransaction may write.
pub fn flush() {
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
        if runs.is_empty() {
            return Vec::new();
        }
        let (mine, theirs) = std::mem::take(runs).into_iter().partition(|r| r.subxact >= current);
        *runs = theirs;
        mine
    });
    for run in &runs {
        write(&run.kind, &run.ids);
    }
}

/// Whether ids are still buffered (at commit, there must be none).
pub fn pending() -> bool {
    BUFFER.with(|b| b.try_borrow().map(|b| !b.runs.is_empty()).unwrap_or(true))
}

/// The transaction ended: forget everything. Must not raise.
pub(crate) fn forget() {
    BUFFER.with(|b| {
        if let Ok(mut b) = b.try_borrow_mut() {
            *b = Buffer::default();
        }
    });
}

/// Subtransaction `subxact` aborted: its runs, and those of children that
/// committed into it, are void. Must not raise.
pub(crate) fn forget_subxact(subxact: pg_sys::SubTransactionId) {
    BUFFER.with(|b| {
        if let Ok(mut b) = b.try_borrow_mut() {
            b.runs.retain(|r| r.subxact < subxact);
            b.seen.clear();
            b.seen_count = 0;
        }
    });
}

fn inbox_relid() -> pg_sys::Oid {
    if let Some(oid) = BUFFER.with(|b| b.borrow().inbox) {
        return oid;
    }
    let Some(oid) = crate::schema::relid(c"inbox") else {
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE, "outbox.inbox does not exist", Some("Is the outbox extension installed?"));
    };
    BUFFER.with(|b| b.borrow_mut().inbox = Some(oid));
    oid
}

/// Inserts one inbox row of a kind's ids. A run never holds more than a
/// row's worth: [`append`] writes it out before it would outgrow one.
fn write(kind: &str, ids: &[String]) {
    debug_assert!(ids.len() == 1 || ids.iter().map(|id| stored_bytes(id)).sum::<usize>() <= ROW_BYTES);
    let relid = inbox_relid();
    // SAFETY: the inbox is our own plain heap table; we hold RowExclusiveLock
    // while inserting, as the executor would. It has no indexes (checked), so
    // a heap insert is the whole insert. The palloc'd values live in a memory
    // context of their own, deleted when it goes out of scope.
    unsafe {
        let lock = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
        let rel = pg_sys::table_open(relid, lock);
        if (*(*rel).rd_rel).relhasindex {
            pg_sys::table_close(rel, lock);
            raise(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, "outbox.inbox must not have indexes", None);
        }
        PgMemoryContexts::new("outbox inbox rows").switch_to(|_| {
            let mut elems: Vec<pg_sys::Datum> = ids.iter().map(|id| text_datum(id)).collect();
            let array = pg_sys::construct_array(
                elems.as_mut_ptr(),
                elems.len() as i32,
                pg_sys::TEXTOID,
                -1,
                false,
                pg_sys::TYPALIGN_INT as std::ffi::c_char,
            );
            let at = pg_sys::Datum::from(pg_sys::GetCurrentTransactionStartTimestamp());
            let mut values = [text_datum(kind), pg_sys::Datum::from(array), at];
            let mut nulls = [false; 3];
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
