//! Where the records' fresh jobs are, as the worker last saw them: the
//! absorb skips a change whose record's fresh job still stands there, with
//! one heap fetch at the remembered tid, instead of sending it through the
//! queue insert, whose `ON CONFLICT` finds the job by descending
//! `queue_fresh_key` (after drawing a job id and building the row). Under a
//! stream of changes to records whose jobs wait (a paused kind, a backlog,
//! records changed again before their job is due) that insert was most of
//! the worker's CPU per change.
//!
//! What is remembered is a hint, never trusted. [`known_fresh_job`] says
//! yes only if the tuple at the tid is, right now, a committed fresh job of
//! that very (kind, id) that no transaction in progress inserted, updates or
//! deletes: exactly when `ON CONFLICT ... DO NOTHING` would find it and do
//! nothing. A stale tid (the job claimed, updated, deleted, vacuumed away and
//! the slot reused) fails the check, and the change takes the insert.
//!
//! The hints come from the absorb itself: the tids its insert returned, and,
//! for changes that met a fresh job it did not know of (made by `enqueue()`,
//! or before this worker started), one index lookup after the statement.

use pgrx::prelude::*;
use std::cell::RefCell;

/// Most records remembered, at about 20 bytes each. When full, the hints
/// start over (the next changes take the insert, and are learnt again).
const MOST: usize = 1 << 20;

type Tid = pg_sys::ItemPointerData;

/// A record's key in [`KNOWN`].
fn key(kind: &str, id: &str) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::with_seed(0).hash_one((kind, id))
}

/// `outbox.queue`, open while an absorb statement runs.
struct Open {
    rel: pg_sys::Relation,
    /// The heap's length when opened: a hint past it would be a read past
    /// the end (vacuum may have truncated the heap since it was made). The
    /// lock we hold keeps vacuum from truncating it while we read.
    blocks: pg_sys::BlockNumber,
    /// kind, id, state, last_attempt_at.
    columns: [usize; 4],
    values: Vec<pg_sys::Datum>,
    nulls: Vec<bool>,
    /// Changes the statement found no standing job for, by the hints: those
    /// that then met one anyway are looked up afterwards.
    asked: Vec<(String, String)>,
}

thread_local! {
    /// [`key`] of (kind, id) -> where its fresh job was. A hash, not the
    /// texts: the check at the tid compares the job's own kind and id, so
    /// two records with one key only make one of them take the insert.
    static KNOWN: RefCell<foldhash::HashMap<u64, Tid>> = RefCell::new(foldhash::HashMap::default());
    static OPEN: RefCell<Option<Open>> = const { RefCell::new(None) };
}

/// Runs the absorb statement `f` with the queue open for [`known_fresh_job`];
/// returns what `f` returns and the changes it asked about and found no
/// standing job for. Only the worker, and tests, call this: in any other
/// session the function answers false.
pub fn during_absorb<R>(f: impl FnOnce() -> R) -> (R, Vec<(String, String)>) {
    /// Forgets the open relation however `f` ends. On an ERROR the
    /// (sub)transaction's resource owner closes it.
    struct Closed;
    impl Drop for Closed {
        fn drop(&mut self) {
            OPEN.with(|o| o.borrow_mut().take());
        }
    }
    let Some(queue) = crate::schema::relid(c"queue") else {
        return (f(), Vec::new());
    };
    // SAFETY: opened with a lock, as the absorb's own insert will; closed
    // below after `f`, or by the resource owner if `f` raises.
    let open = unsafe {
        let rel = pg_sys::table_open(queue, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        let desc = (*rel).rd_att;
        let column = |name: &std::ffi::CStr| (pg_sys::get_attnum(queue, name.as_ptr()) - 1) as usize;
        let natts = (*desc).natts as usize;
        Open {
            rel,
            blocks: pg_sys::RelationGetNumberOfBlocksInFork(rel, pg_sys::ForkNumber::MAIN_FORKNUM),
            columns: [column(c"kind"), column(c"id"), column(c"state"), column(c"last_attempt_at")],
            values: vec![pg_sys::Datum::from(0); natts],
            nulls: vec![true; natts],
            asked: Vec::new(),
        }
    };
    OPEN.with(|o| *o.borrow_mut() = Some(open));
    let closed = Closed;
    let r = f();
    let open = OPEN.with(|o| o.borrow_mut().take()).expect("open until here");
    drop(closed);
    // SAFETY: opened above; the lock stays until the transaction ends.
    unsafe { pg_sys::table_close(open.rel, pg_sys::NoLock as pg_sys::LOCKMODE) };
    (r, open.asked)
}

/// Whether the absorb running in this process knows that (kind, id) has a
/// fresh job standing: a change to it coalesces into that job. For the
/// worker's absorb statement only; false in any other session.
#[pg_extern(schema = "outbox", volatile, strict, parallel_unsafe)]
fn known_fresh_job(kind: &str, id: &str) -> bool {
    OPEN.with(|o| {
        let mut o = o.borrow_mut();
        let Some(open) = o.as_mut() else { return false };
        let hint = KNOWN.with(|k| k.borrow().get(&key(kind, id)).copied());
        // SAFETY: `open` holds the queue open and locked (see `during_absorb`).
        if hint.is_some_and(|tid| unsafe { stands(open, kind, id, tid) }) {
            return true;
        }
        open.asked.push((kind.to_string(), id.to_string()));
        false
    })
}

/// Whether the tuple at `tid` is a fresh job of (kind, id), committed (or
/// made by this transaction), that no other transaction in progress is
/// updating or deleting (a row lock does not count: `ON CONFLICT DO NOTHING`
/// passes over one too).
///
/// # Safety
/// `open.rel` must be open and locked.
unsafe fn stands(open: &mut Open, kind: &str, id: &str, tid: Tid) -> bool {
    let (block, _) = pgrx::itemptr::item_pointer_get_both(tid);
    if block >= open.blocks {
        return false;
    }
    // SAFETY: a dirty snapshot is plain data that the visibility check fills
    // in: it sees committed and in-progress tuples, and names the
    // transaction in progress in xmin (inserting) or xmax (deleting or
    // updating). heap_fetch checks the offset against the page, and returns
    // with the buffer pinned only when the tuple is visible; while pinned, a
    // visible tuple's data stays where it is.
    unsafe {
        let mut dirty: pg_sys::SnapshotData = std::mem::zeroed();
        dirty.snapshot_type = pg_sys::SnapshotType::SNAPSHOT_DIRTY;
        let mut tuple: pg_sys::HeapTupleData = std::mem::zeroed();
        tuple.t_self = tid;
        let mut buffer: pg_sys::Buffer = pg_sys::InvalidBuffer as pg_sys::Buffer;
        if !pg_sys::heap_fetch(open.rel, &mut dirty, &mut tuple, &mut buffer, false) {
            return false;
        }
        let settled = dirty.xmin == pg_sys::InvalidTransactionId && dirty.xmax == pg_sys::InvalidTransactionId;
        let fresh = settled && {
            pg_sys::heap_deform_tuple(&mut tuple, (*open.rel).rd_att, open.values.as_mut_ptr(), open.nulls.as_mut_ptr());
            let [k, i, s, l] = open.columns;
            let text = |c: usize| (!open.nulls[c]).then(|| plain_text(open.values[c])).flatten();
            text(k) == Some(kind.as_bytes()) && text(i) == Some(id.as_bytes()) && text(s) == Some(b"pending".as_slice()) && open.nulls[l]
        };
        pg_sys::ReleaseBuffer(buffer);
        fresh
    }
}

/// A text datum's bytes, if stored plainly (not compressed or out of line:
/// those are not worth decompressing here; the insert checks them).
///
/// # Safety
/// `d` must be a text datum that stays valid while the bytes are used.
unsafe fn plain_text<'a>(d: pg_sys::Datum) -> Option<&'a [u8]> {
    let v = d.cast_mut_ptr::<pg_sys::varlena>();
    // SAFETY: the caller vouches for the datum.
    unsafe {
        if pgrx::varlena::varatt_is_1b_e(v) || pgrx::varlena::varatt_is_4b_c(v) {
            return None;
        }
        Some(pgrx::varlena::varlena_to_byte_slice(v))
    }
}

/// The absorb made these fresh jobs: (kinds, ids, tids).
pub fn remember(kinds: &[String], ids: &[String], tids: &[Tid]) {
    remember_each(kinds.iter().zip(ids).zip(tids).map(|((kind, id), &tid)| (kind.as_str(), id.as_str(), tid)));
}

fn remember_each<'a>(jobs: impl IntoIterator<Item = (&'a str, &'a str, Tid)>) {
    KNOWN.with(|k| {
        let known = &mut *k.borrow_mut();
        for (kind, id, tid) in jobs {
            if known.len() >= MOST {
                known.clear();
            }
            known.insert(key(kind, id), tid);
        }
    });
}

/// These changes met fresh jobs the worker did not know of: finds where
/// those are, so the next changes of their records are skipped.
pub fn look_up(pairs: Vec<(String, String)>) {
    if pairs.is_empty() {
        return;
    }
    let found = crate::fresh_key::with_latest_snapshot(|k, snapshot| {
        let mut found = Vec::new();
        for (kind, id) in pairs {
            let mut tid = None;
            // SAFETY: the snapshot stays registered while `find` runs.
            unsafe {
                k.find(&kind, &id, snapshot, |k| {
                    tid = Some(k.tid());
                    true
                })
            };
            if let Some(tid) = tid {
                found.push((kind, id, tid));
            }
        }
        found
    });
    remember_each(found.iter().flatten().map(|(kind, id, tid)| (kind.as_str(), id.as_str(), *tid)));
}

/// The record's fresh job was claimed: it has none now.
pub fn forget(kind: &str, id: &str) {
    KNOWN.with(|k| k.borrow_mut().remove(&key(kind, id)));
}

/// Forgets everything (the extension was dropped or made anew).
pub fn clear() {
    KNOWN.with(|k| *k.borrow_mut() = foldhash::HashMap::default());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tid(block: u32, offset: u16) -> Tid {
        let mut t = Tid::default();
        pgrx::itemptr::item_pointer_set_all(&mut t, block, offset);
        t
    }

    fn known(kind: &str, id: &str) -> Option<(u32, u16)> {
        KNOWN.with(|k| k.borrow().get(&key(kind, id)).copied()).map(pgrx::itemptr::item_pointer_get_both)
    }

    fn count() -> usize {
        KNOWN.with(|k| k.borrow().len())
    }

    #[test]
    fn jobs_are_remembered_by_record_until_claimed() {
        clear();
        remember(&["k".into(), "k".into(), "j".into()], &["a".into(), "b".into(), "a".into()], &[tid(1, 2), tid(3, 4), tid(5, 6)]);
        assert_eq!(known("k", "a"), Some((1, 2)));
        assert_eq!(known("j", "a"), Some((5, 6)));
        assert_eq!(known("k", "c"), None);
        // The pair is hashed, not its concatenation.
        assert_eq!(known("ka", ""), None);
        // A later job of the same record replaces the first.
        remember(&["k".into()], &["a".into()], &[tid(7, 8)]);
        assert_eq!(known("k", "a"), Some((7, 8)));
        forget("k", "a");
        assert_eq!(known("k", "a"), None);
        forget("k", "a");
        assert_eq!(count(), 2);
    }

    #[test]
    fn when_full_the_hints_start_over() {
        clear();
        let n = MOST;
        let ids: Vec<String> = (0..n).map(|i| i.to_string()).collect();
        remember(&vec!["k".into(); n], &ids, &vec![tid(1, 1); n]);
        assert_eq!(count(), MOST);
        remember(&["k".into()], &["new".into()], &[tid(2, 2)]);
        assert_eq!(count(), 1);
        assert_eq!(known("k", "new"), Some((2, 2)));
        assert_eq!(known("k", "0"), None);
        clear();
    }
}
