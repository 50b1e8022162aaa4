//! Restores. pg_dump keeps the extension's tables (see `schema`), so
//! `pg_restore` COPYs kinds, jobs and inbox rows back. A job that was being
//! delivered when the dump was taken arrives `running`, a state that only a
//! worker's memory accounts for: no worker would ever claim it again. So
//! after a COPY into `outbox.queue`, the `running` rows it added go back to
//! `pending`, due now, as a worker's restart does with its own. And the
//! worker hears of the COPY at commit: jobs may be due, or kinds changed.

use crate::schema::relid;
use crate::worker::queue;
use pgrx::prelude::*;

/// Called after every COPY.
///
/// # Safety
/// `stmt` is the COPY statement that just ran.
pub unsafe fn after_copy(stmt: *mut pg_sys::CopyStmt) {
    // SAFETY: as this function's contract; the table named was resolved and
    // locked by the COPY itself, so looking it up again finds the same one.
    let table = unsafe {
        if !(*stmt).is_from || (*stmt).relation.is_null() {
            return;
        }
        crate::pg::syscache::relid_named((*stmt).relation)
    };
    if table.is_none() {
        return;
    }
    if table == relid(c"queue") {
        // SAFETY: a plain read of the transaction state.
        let xid = unsafe { pg_sys::GetCurrentTransactionIdIfAny() };
        if xid != pg_sys::InvalidTransactionId {
            // In the restoring session, under its search_path: pinned here.
            crate::pg::settings::with_settings(&[(c"search_path", c"pg_catalog, pg_temp")], || {
                Spi::connect_mut(|c| c.update(queue::RUNNING_COPIED, None, &[xid.into_inner().to_string().into()]).map(|_| ()))
            })
            .unwrap_or_else(|e| panic!("resetting restored running jobs: {e}"));
        }
        crate::capture::wake::on_commit();
    } else if table == relid(c"kinds") {
        crate::capture::wake::kinds_changed();
    } else if table == relid(c"inbox") {
        crate::capture::wake::for_inbox();
    }
}
