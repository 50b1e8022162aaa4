//! Lookups of fresh jobs by (kind, id), made on their unique index
//! `queue_fresh_key` itself, with a snapshot of the caller's choice (the
//! worker's `in_flux` asks with a dirty one).
//!
//! Through SQL, `kind = $1 AND id = $2 AND state = 'pending' ...` may be
//! planned on `queue_due` instead, whose leading column is `kind` too, and
//! then filters every pending job of the kind. Both look like one row to the
//! planner when the queue's statistics date from when it was small (or say
//! the kind is rare): a lookup that did that took 9 ms with 40,000 jobs
//! pending. Going to the index leaves the planner no choice.

use pgrx::prelude::*;
use pgrx::IntoDatum;

/// `outbox.queue` and `queue_fresh_key`, open for lookups.
pub struct FreshKey {
    heap: pg_sys::Relation,
    index: pg_sys::Relation,
    slot: *mut pg_sys::TupleTableSlot,
}

/// Runs `f` with the index open. None if the extension's relations are
/// missing.
pub fn with_fresh_key<R>(f: impl FnOnce(&mut FreshKey) -> R) -> Option<R> {
    let queue = crate::schema::relid(c"queue")?;
    let fresh_key = crate::schema::relid(c"queue_fresh_key")?;
    // SAFETY: the relations are opened with a lock and closed below, after
    // `f`; an ERROR inside `f` releases them through the resource owner.
    let mut k = unsafe {
        let heap = pg_sys::table_open(queue, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let index = pg_sys::index_open(fresh_key, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        FreshKey {
            heap,
            index,
            slot: pg_sys::table_slot_create(heap, std::ptr::null_mut()),
        }
    };
    let r = f(&mut k);
    // SAFETY: closes what was opened above; the locks stay until the
    // transaction ends, as the executor's would.
    unsafe {
        pg_sys::ExecDropSingleTupleTableSlot(k.slot);
        pg_sys::index_close(k.index, pg_sys::NoLock as pg_sys::LOCKMODE);
        pg_sys::table_close(k.heap, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
    Some(r)
}

impl FreshKey {
    /// Goes through the jobs filed under (kind, id) that `snapshot` sees,
    /// until `stop` returns true for one; says whether it did.
    ///
    /// # Safety
    /// `snapshot` must stay valid until this returns. A dirty snapshot is
    /// filled in by each visibility check, so `stop` may read it.
    pub unsafe fn find(
        &mut self,
        kind: &str,
        id: &str,
        snapshot: pg_sys::Snapshot,
        mut stop: impl FnMut(&Self) -> bool,
    ) -> bool {
        let values = [kind.into_datum().expect("text datum"), id.into_datum().expect("text datum")];
        // SAFETY: the scan keys point at datums that live until the scan
        // ends; the relations are open (see `with_fresh_key`); the caller
        // vouches for the snapshot.
        unsafe {
            let mut keys: [pg_sys::ScanKeyData; 2] = std::mem::zeroed();
            for (i, (key, value)) in keys.iter_mut().zip(values).enumerate() {
                pg_sys::ScanKeyEntryInitialize(
                    key,
                    0,
                    (i + 1) as pg_sys::AttrNumber,
                    pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
                    pg_sys::InvalidOid,
                    *(*self.index).rd_indcollation.add(i),
                    pg_sys::Oid::from(pg_sys::F_TEXTEQ),
                    value,
                );
            }
            #[cfg(not(feature = "pg18"))]
            let scan = pg_sys::index_beginscan(self.heap, self.index, snapshot, 2, 0);
            #[cfg(feature = "pg18")]
            let scan = pg_sys::index_beginscan(self.heap, self.index, snapshot, std::ptr::null_mut(), 2, 0);
            pg_sys::index_rescan(scan, keys.as_mut_ptr(), 2, std::ptr::null_mut(), 0);
            let mut found = false;
            while pg_sys::index_getnext_slot(scan, pg_sys::ScanDirection::ForwardScanDirection, self.slot) {
                if stop(self) {
                    found = true;
                    break;
                }
            }
            pg_sys::index_endscan(scan);
            found
        }
    }

}
