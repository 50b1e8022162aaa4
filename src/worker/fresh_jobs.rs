//! Where the records' fresh jobs are, as the worker last saw them: the
//! absorb skips a change whose record's fresh job still stands there, with
//! one heap fetch at the remembered tid, instead of sending it through the
//! queue insert, whose `ON CONFLICT` finds the job by descending
//! `queue_fresh_key` (after drawing a job id and building the row). Under a
//! stream of changes to records whose jobs wait (a paused kind, a backlog,
//! records changed again before their job is due) that insert was most of
//! the worker's CPU per change.
//!
//! What is remembered is a hint. [`known_fresh_job`] says yes if the tuple
//! at the tid is, right now, a committed fresh job of that very (kind, id)
//! that no transaction in progress inserted, updates or deletes: exactly when
//! `ON CONFLICT ... DO NOTHING` would find it and do nothing. A stale tid (the
//! job claimed, updated, deleted, vacuumed away and the slot reused) fails the
//! check, and the change takes the insert.
//!
//! That check is a heap fetch per change, about a fifth of the worker's CPU
//! under a stream of tracked changes. It is skipped for a job seen standing
//! since the last time anybody else could have changed it: every statement of
//! another session that may change queue jobs counts itself in and out and
//! moves a generation (`queue_writers`), and the worker accounts for its own
//! (a claim forgets the job). A hint is taken on trust only by a statement
//! that starts and ends with no such statement running and no generation
//! moved since the job was seen standing in a statement that did the same.
//! Why that is enough: another session's change of the job after it was seen
//! standing either started before this statement began (then it was still
//! counted in, or it moved the generation since) or after it began (then it
//! moved the generation before this statement ended, and the statement is
//! redone without trust, or it changes the job only after this statement).
//! A change before the job was seen standing was seen by the check itself.
//! A job the worker made in a quiet statement counts as seen standing once
//! its transaction commits: nobody else could see, let alone change, it
//! before, and a writer that started since has moved the generation.
//!
//! The hints come from the absorb itself: the tids its insert returned, and,
//! for changes that met a fresh job it did not know of (made by `enqueue()`,
//! or before this worker started), one index lookup after the statement.

use pgrx::prelude::*;
use std::cell::{Cell, RefCell};

/// Most records remembered, in slots of 32 bytes (about 70 MB at most).
/// When full, the hints start over (the next changes take the insert, and
/// are learnt again).
const MOST: usize = 1 << 20;

type Tid = pg_sys::ItemPointerData;

/// What is known of a record's fresh job.
#[derive(Clone, Copy)]
struct Hint {
    tid: Tid,
    /// 1 + the queue generation of a quiet statement that saw the job
    /// standing (see the module's doc); 0 if none has.
    standing_at: u64,
}

/// A record's key in [`KNOWN`]: two 64-bit hashes of (kind, id), keyed at
/// random in each process, one of them SipHash (built so that nobody who
/// does not know the key can aim ids at a collision). A hint taken on trust
/// for another record would drop that record's change: two records share a
/// key with a chance of about 2^-128, where a hash of 64 bits, over a
/// million hints and a trillion lookups, would have left one in twenty.
fn key(kind: &str, id: &str) -> u128 {
    use std::hash::BuildHasher;
    HASHERS.with(|(fold, sip)| ((fold.hash_one((kind, id)) as u128) << 64) | sip.hash_one((kind, id)) as u128)
}

/// What an absorb statement asked of the hints, besides its own result.
pub struct Asked {
    /// Changes it found no standing job for, by the hints: those that then
    /// met one anyway are looked up afterwards ([`look_up`]).
    pub unknown: Vec<(String, String)>,
    /// 1 + the queue generation if the statement was quiet throughout (see
    /// the module's doc); 0 otherwise.
    quiet: u64,
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
    /// 1 + the queue generation if no other session's statement that may
    /// change queue jobs was running when this one started; 0 otherwise.
    quiet: u64,
    /// Hints this statement took on trust.
    trusted: usize,
    /// Keys of the jobs this statement saw standing, by the check.
    seen_standing: Vec<u128>,
}

thread_local! {
    /// [`key`] of a record -> what is known of its fresh job.
    static KNOWN: RefCell<foldhash::HashMap<u128, Hint>> = RefCell::new(foldhash::HashMap::default());
    static HASHERS: (foldhash::fast::RandomState, std::hash::RandomState) = Default::default();
    /// Hints taken on trust, and absorbs run again because the queue changed
    /// meanwhile, since the process started (for tests).
    static TRUSTED: Cell<u64> = const { Cell::new(0) };
    /// Jobs made by this transaction's quiet absorbs, with the generation
    /// they were made at. Nobody else sees them until the transaction
    /// commits, and a queue writer that may change them then moves the
    /// generation: at commit they count as seen standing.
    static MADE: RefCell<Vec<(u128, Tid, u64)>> = const { RefCell::new(Vec::new()) };
    static REDONE: Cell<u64> = const { Cell::new(0) };
    static OPEN: RefCell<Option<Open>> = const { RefCell::new(None) };
}

/// Runs the absorb statement `f` with the queue open for [`known_fresh_job`];
/// returns what `f` returns and what it asked of the hints. Only the worker, and tests, call this: in any other
/// session the function answers false.
///
/// If `f` took a hint on trust and the queue was not quiet throughout, this
/// raises [`ERRCODE_T_R_SERIALIZATION_FAILURE`](PgSqlErrorCode): the caller
/// runs `f` in a subtransaction and runs it again (no hint is trusted then
/// until a quiet statement has seen its job standing).
pub fn during_absorb<R>(f: impl FnOnce() -> R) -> (R, Asked) {
    /// Forgets the open relation however `f` ends. On an ERROR the
    /// (sub)transaction's resource owner closes it.
    struct Closed;
    impl Drop for Closed {
        fn drop(&mut self) {
            OPEN.with(|o| o.borrow_mut().take());
        }
    }
    // Commit marks the jobs made here as seen standing (`transaction_ended`).
    crate::enqueue::register_callbacks();
    let Some(queue) = crate::schema::relid(c"queue") else {
        return (f(), Asked { unknown: Vec::new(), quiet: 0 });
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
            quiet: crate::shmem::queue_quiet().map_or(0, |g| g + 1),
            trusted: 0,
            seen_standing: Vec::new(),
        }
    };
    OPEN.with(|o| *o.borrow_mut() = Some(open));
    let closed = Closed;
    let r = f();
    let open = OPEN.with(|o| o.borrow_mut().take()).expect("open until here");
    drop(closed);
    // SAFETY: opened above; the lock stays until the transaction ends.
    unsafe { pg_sys::table_close(open.rel, pg_sys::NoLock as pg_sys::LOCKMODE) };
    let quiet_throughout = open.quiet != 0 && crate::shmem::queue_generation().map(|g| g + 1) == Some(open.quiet);
    if quiet_throughout {
        KNOWN.with(|k| {
            let known = &mut *k.borrow_mut();
            for key in &open.seen_standing {
                if let Some(hint) = known.get_mut(key) {
                    hint.standing_at = open.quiet;
                }
            }
        });
    } else if open.trusted > 0 {
        REDONE.set(REDONE.get() + 1);
        crate::errors::raise(
            PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
            "outbox: the queue changed while the absorb trusted its hints",
            None,
        );
    }
    (r, Asked { unknown: open.asked, quiet: if quiet_throughout { open.quiet } else { 0 } })
}

/// Whether the absorb running in this process knows that (kind, id) has a
/// fresh job standing: a change to it coalesces into that job. For the
/// worker's absorb statement only; false in any other session.
#[pg_extern(schema = "outbox", volatile, strict, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn known_fresh_job(kind: &str, id: &str) -> bool {
    OPEN.with(|o| {
        let mut o = o.borrow_mut();
        let Some(open) = o.as_mut() else { return false };
        let key = key(kind, id);
        if let Some(hint) = KNOWN.with(|k| k.borrow().get(&key).copied()) {
            if open.quiet != 0 && hint.standing_at == open.quiet {
                open.trusted += 1;
                TRUSTED.set(TRUSTED.get() + 1);
                return true;
            }
            // SAFETY: `open` holds the queue open and locked (see `during_absorb`).
            if unsafe { stands(open, kind, id, hint.tid) } {
                if open.quiet != 0 {
                    open.seen_standing.push(key);
                }
                return true;
            }
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

/// The absorb statement that `asked` made these fresh jobs: (kinds, ids,
/// tids). Made by a statement quiet throughout, they count as seen standing
/// once the transaction commits.
pub fn made(kinds: &[String], ids: &[String], tids: &[Tid], asked: &Asked) {
    let keys: Vec<u128> = kinds.iter().zip(ids).map(|(kind, id)| key(kind, id)).collect();
    remember_keys(keys.iter().copied().zip(tids.iter().copied()));
    if asked.quiet != 0 {
        MADE.with(|m| m.borrow_mut().extend(keys.into_iter().zip(tids.iter().copied()).map(|(key, tid)| (key, tid, asked.quiet))));
    }
}

/// Hints at where these records' fresh jobs are, not yet seen standing:
/// (kinds, ids, tids).
pub fn remember(kinds: &[String], ids: &[String], tids: &[Tid]) {
    remember_keys(kinds.iter().zip(ids).zip(tids).map(|((kind, id), &tid)| (key(kind, id), tid)));
}

/// The transaction ended: if it committed, the jobs its quiet absorbs made
/// count as seen standing (unless forgotten or replaced since). Cannot raise.
pub(crate) fn transaction_ended(committed: bool) {
    let Ok(made) = MADE.with(|m| m.try_borrow_mut().map(|mut m| std::mem::take(&mut *m))) else { return };
    if !committed || made.is_empty() {
        return;
    }
    KNOWN.with(|k| {
        let Ok(mut known) = k.try_borrow_mut() else { return };
        let same = |a: Tid, b: Tid| pgrx::itemptr::item_pointer_get_both(a) == pgrx::itemptr::item_pointer_get_both(b);
        for (key, tid, quiet) in made {
            if let Some(hint) = known.get_mut(&key) {
                if same(hint.tid, tid) {
                    hint.standing_at = quiet;
                }
            }
        }
    });
}

fn remember_keys(hints: impl IntoIterator<Item = (u128, Tid)>) {
    KNOWN.with(|k| {
        let known = &mut *k.borrow_mut();
        for (key, tid) in hints {
            if known.len() >= MOST {
                known.clear();
            }
            known.insert(key, Hint { tid, standing_at: 0 });
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
    remember_keys(found.iter().flatten().map(|(kind, id, tid)| (key(kind, id), *tid)));
}

/// The record's fresh job was claimed: it has none now.
pub fn forget(kind: &str, id: &str) {
    KNOWN.with(|k| k.borrow_mut().remove(&key(kind, id)));
}

/// (hints taken on trust, absorbs run again) so far in this process.
pub fn counts() -> (u64, u64) {
    (TRUSTED.get(), REDONE.get())
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
        KNOWN.with(|k| k.borrow().get(&key(kind, id)).copied()).map(|h| pgrx::itemptr::item_pointer_get_both(h.tid))
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
        // The pair is the key, not its concatenation.
        assert_eq!(known("ka", ""), None);
        assert_eq!(known("", "ka"), None);
        // Long ids, and ids that differ only at the end.
        let long = "0190f1a2-7b3c-7d4e-8f50-6a7b8c9d0e1f".repeat(2);
        remember(&["k".into()], &[long.clone()], &[tid(9, 1)]);
        assert_eq!(known("k", &long), Some((9, 1)));
        assert_eq!(known("k", &long[1..]), None);
        assert_eq!(known("k", &format!("{long}x")), None);
        forget("k", &long);
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
