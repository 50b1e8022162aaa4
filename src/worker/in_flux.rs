//! Which records have a fresh job that a transaction still in progress is
//! inserting, changing or deleting.
//!
//! The absorb's `INSERT ... ON CONFLICT` waits for such a transaction to end
//! before it knows whether its own insert conflicts. An application
//! transaction that called `outbox.enqueue(kind, id)`, creating the fresh
//! job, and then stays open (a long backfill, a session idle in transaction)
//! would hold the worker in that wait, and every delivery with it. So when
//! an absorb times out on a lock, the worker asks this module which records
//! are in that state, and leaves their changes in the inbox until the
//! transaction is over (`queue::ABSORB_INBOX`).

use pgrx::prelude::*;
use pgrx::IntoDatum;

/// Of `pairs` (kind, id), those whose entry in `queue_fresh_key` was made,
/// or is being removed, by a transaction still in progress. Empty if the
/// extension's relations can't be found.
pub fn in_flux(pairs: &[(String, String)]) -> Vec<(String, String)> {
    let (Some(queue), Some(fresh_key)) = (crate::schema::relid(c"queue"), crate::schema::relid(c"queue_fresh_key")) else {
        return Vec::new();
    };
    // SAFETY: the relations are opened with a lock and closed below; the
    // scan keys point at datums that live until the scan ends; a dirty
    // snapshot is plain data that each tuple visibility check fills in.
    // An ERROR releases what is left open through the resource owner.
    unsafe {
        let heap = pg_sys::table_open(queue, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let index = pg_sys::index_open(fresh_key, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let slot = pg_sys::table_slot_create(heap, std::ptr::null_mut());
        // InitDirtySnapshot: sees in-progress inserts, and says whose in xmin
        // (xmax for an in-progress delete or update).
        let mut dirty: pg_sys::SnapshotData = std::mem::zeroed();
        dirty.snapshot_type = pg_sys::SnapshotType::SNAPSHOT_DIRTY;
        let mut busy = Vec::new();
        for (kind, id) in pairs {
            let values = [kind.as_str().into_datum(), id.as_str().into_datum()];
            let mut keys: [pg_sys::ScanKeyData; 2] = std::mem::zeroed();
            for (i, (key, value)) in keys.iter_mut().zip(values).enumerate() {
                pg_sys::ScanKeyEntryInitialize(
                    key,
                    0,
                    (i + 1) as pg_sys::AttrNumber,
                    pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
                    pg_sys::InvalidOid,
                    *(*index).rd_indcollation.add(i),
                    pg_sys::Oid::from(pg_sys::F_TEXTEQ),
                    value.expect("text datum"),
                );
            }
            #[cfg(not(feature = "pg18"))]
            let scan = pg_sys::index_beginscan(heap, index, &mut dirty, 2, 0);
            #[cfg(feature = "pg18")]
            let scan = pg_sys::index_beginscan(heap, index, &mut dirty, std::ptr::null_mut(), 2, 0);
            pg_sys::index_rescan(scan, keys.as_mut_ptr(), 2, std::ptr::null_mut(), 0);
            while pg_sys::index_getnext_slot(scan, pg_sys::ScanDirection::ForwardScanDirection, slot) {
                if dirty.xmin != pg_sys::InvalidTransactionId || dirty.xmax != pg_sys::InvalidTransactionId {
                    busy.push((kind.clone(), id.clone()));
                    break;
                }
            }
            pg_sys::index_endscan(scan);
        }
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
        pg_sys::table_close(heap, pg_sys::NoLock as pg_sys::LOCKMODE);
        busy
    }
}
