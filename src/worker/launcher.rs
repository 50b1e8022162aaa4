//! The launcher: waits for the database to exist, then keeps one delivery
//! worker running in it. Connected to no database, it can read only shared
//! catalogs, which is all it needs.

use super::signals::{handle_interrupts, install_handlers, wait};
use crate::gucs;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, BgWorkerStartTime, DynamicBackgroundWorker,
};
use pgrx::prelude::*;
use std::ffi::{CStr, CString};
use std::time::{Duration, Instant};

/// How often the launcher looks for the database while it is missing, and
/// the least time between two starts of a worker that keeps exiting.
const RECHECK: Duration = Duration::from_secs(1);

/// What the launcher finds of the database it is to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    Missing,
    /// `ALLOW_CONNECTIONS false`: a worker would fail to connect, again
    /// and again.
    Closed,
    Open,
}

/// Looks the database up by heap scan: with no database selected, only shared
/// catalogs can be read, and only by scan (as the autovacuum launcher does).
fn find_database(name: &str) -> Found {
    let Ok(target) = CString::new(name) else { return Found::Missing };
    super::signals::in_transaction(|| {
        // SAFETY: a read-only catalog scan inside a transaction; every tuple
        // returned is a valid pg_database row, whose fixed-size fields
        // (datname, datallowconn) come first.
        unsafe {
            let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
            let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, lock);
            let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
            let mut found = Found::Missing;
            loop {
                let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
                if tuple.is_null() {
                    break;
                }
                let header = (*tuple).t_data;
                let form = header.cast::<u8>().add((*header).t_hoff as usize).cast::<pg_sys::FormData_pg_database>();
                if CStr::from_ptr((*form).datname.data.as_ptr()) == target.as_c_str() {
                    found = if (*form).datallowconn { Found::Open } else { Found::Closed };
                    break;
                }
            }
            pg_sys::table_endscan(scan);
            pg_sys::table_close(rel, lock);
            found
        }
    })
}

fn start_worker(database: &str) -> Option<DynamicBackgroundWorker> {
    BackgroundWorkerBuilder::new(&format!("outbox worker {database}"))
        .set_type("outbox worker")
        .set_library("outbox")
        .set_function("outbox_worker_main")
        .set_extra(database)
        .enable_shmem_access(None)
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::ConsistentState)
        .set_restart_time(None)
        // SAFETY: reading this process's pid.
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .load_dynamic()
        .ok()
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn outbox_launcher_main(_arg: pg_sys::Datum) {
    install_handlers();
    BackgroundWorker::connect_worker_to_spi(None, None);
    let mut worker: Option<DynamicBackgroundWorker> = None;
    // What was last said of a database that can't be served, so it is said once.
    let mut said: Option<Found> = None;
    let mut last_start: Option<Instant> = None;
    loop {
        handle_interrupts();
        // Not yet started counts as running: starting another would make two.
        let running = worker
            .as_ref()
            .is_some_and(|w| !matches!(w.pid(), Err(BackgroundWorkerStatus::Stopped | BackgroundWorkerStatus::PostmasterDied)));
        if !running {
            worker = None;
            match gucs::database().map(|db| (find_database(&db), db)) {
                None => {
                    if said != Some(Found::Missing) {
                        log!("outbox: outbox.database is empty; no worker will run");
                        said = Some(Found::Missing);
                    }
                }
                Some((found @ (Found::Missing | Found::Closed), db)) => {
                    if said != Some(found) {
                        match found {
                            Found::Closed => log!("outbox: database \"{db}\" does not allow connections; the worker will start once it does"),
                            _ => log!("outbox: database \"{db}\" does not exist yet; the worker will start once it does"),
                        }
                        said = Some(found);
                    }
                }
                Some((Found::Open, db)) => {
                    let too_soon = last_start.is_some_and(|t| t.elapsed() < RECHECK);
                    if !too_soon {
                        said = None;
                        last_start = Some(Instant::now());
                        worker = start_worker(&db);
                        if worker.is_none() {
                            warning!("outbox: could not start the worker for database \"{db}\" (max_worker_processes?)");
                        }
                    }
                }
            }
        }
        wait(None, RECHECK);
    }
}
