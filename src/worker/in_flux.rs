//! Which records have a fresh job that a transaction still in progress is
//! inserting, changing or deleting.
//!
//! The absorb's `INSERT ... ON CONFLICT` waits for such a transaction to end
//! before it knows whether its own insert conflicts, and its move of a
//! delayed job waits for the job's row. An admin's transaction that wrote a
//! fresh job (`retry`, `discard`, a direct INSERT or UPDATE of the queue,
//! a restore) and then stays open (a session idle in transaction) would hold
//! the worker in that wait, and every delivery with it. So when
//! an absorb times out on a lock, the worker asks this module which records
//! are in that state, and leaves their changes in the inbox until the
//! transaction is over (`queue::ABSORB_INBOX`).

use pgrx::prelude::*;

/// Of `pairs` (kind, id), those whose entry in `queue_fresh_key` was made,
/// or is being removed, by a transaction still in progress. Empty if the
/// extension's relations can't be found.
pub fn in_flux(pairs: &[(String, String)]) -> Vec<(String, String)> {
    crate::schema::fresh_key::with_fresh_key(|k| {
        // SAFETY: InitDirtySnapshot: plain data that each visibility check
        // fills in. It sees in-progress inserts, and says whose in xmin
        // (xmax for an in-progress delete or update).
        let mut dirty: pg_sys::SnapshotData = unsafe { std::mem::zeroed() };
        dirty.snapshot_type = pg_sys::SnapshotType::SNAPSHOT_DIRTY;
        let dirty = &raw mut dirty;
        pairs
            .iter()
            // SAFETY: `dirty` lives until the end of the closure; `stop` reads
            // what the visibility check of the tuple it is handed wrote.
            .filter(|(kind, id)| unsafe {
                k.find(kind, id, dirty, |_| (*dirty).xmin != pg_sys::InvalidTransactionId || (*dirty).xmax != pg_sys::InvalidTransactionId)
            })
            .cloned()
            .collect()
    })
    .unwrap_or_default()
}
