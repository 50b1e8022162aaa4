//! The launcher: waits for the database to exist and allow connections, and
//! for `outbox.role` to be able to log in and connect to it, then keeps one
//! delivery worker running in the database. Connected to no database, it can
//! read only shared catalogs, which is all it needs.

use super::signals::{handle_interrupts, install_handlers, wait};
use crate::pg::{gucs, shmem};
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, BgWorkerStartTime, DynamicBackgroundWorker,
};
use pgrx::prelude::*;
use std::ffi::{CStr, CString};
use std::time::{Duration, Instant};

/// How often the launcher looks for the database while it is missing, and
/// the least time between two starts of a worker that keeps exiting.
const RECHECK: Duration = Duration::from_secs(1);

/// Why no worker can run now. Each is logged once, and waited out: a worker
/// started anyway would fail to connect, again and again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Blocker {
    NoDatabaseSet,
    DatabaseMissing,
    /// `ALLOW_CONNECTIONS false`.
    DatabaseClosed,
    RoleMissing,
    RoleCannotLogin,
    /// No CONNECT privilege on the database.
    RoleCannotConnect,
}

impl Blocker {
    fn describe(self, database: &str, role: &str) -> String {
        match self {
            Self::NoDatabaseSet => "outbox.database is empty; no worker will run".into(),
            Self::DatabaseMissing => format!("database \"{database}\" does not exist yet; the worker will start once it does"),
            Self::DatabaseClosed => format!("database \"{database}\" does not allow connections; the worker will start once it does"),
            Self::RoleMissing => format!("role \"{role}\" (outbox.role) does not exist; the worker will start once it does"),
            Self::RoleCannotLogin => format!("role \"{role}\" (outbox.role) cannot log in; the worker will start once it can"),
            Self::RoleCannotConnect => {
                format!("role \"{role}\" (outbox.role) may not connect to database \"{database}\"; the worker will start once it may")
            }
        }
    }
}

/// The first row of shared catalog `catalog` that `pick` makes something of.
/// With no database selected, only shared catalogs can be read, and only by
/// scan (as the autovacuum launcher does).
///
/// # Safety
/// `pick` is given a pointer to the row's fixed-size fields, laid out as
/// the catalog's `FormData` struct; it reads only those.
unsafe fn scan_shared<R>(catalog: pg_sys::Oid, mut pick: impl FnMut(*const u8) -> Option<R>) -> Option<R> {
    super::signals::in_transaction(|| {
        // SAFETY: a read-only catalog scan inside a transaction; every tuple
        // returned is a valid row of `catalog`.
        unsafe {
            let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
            let rel = pg_sys::table_open(catalog, lock);
            let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
            let mut found = None;
            while found.is_none() {
                let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
                if tuple.is_null() {
                    break;
                }
                let header = (*tuple).t_data;
                found = pick(header.cast::<u8>().add((*header).t_hoff as usize));
            }
            pg_sys::table_endscan(scan);
            pg_sys::table_close(rel, lock);
            found
        }
    })
}

/// What keeps a worker for `database`, connecting as `role` (None: the
/// bootstrap superuser), from running; None if nothing does.
fn blocker(database: Option<&str>, role: Option<&str>) -> Option<Blocker> {
    let Some(database) = database else { return Some(Blocker::NoDatabaseSet) };
    let Ok(database) = CString::new(database) else { return Some(Blocker::DatabaseMissing) };
    // SAFETY: pg_database rows, read through their FormData layout.
    let found = unsafe {
        scan_shared(pg_sys::DatabaseRelationId, |row| {
            let form = row.cast::<pg_sys::FormData_pg_database>();
            (CStr::from_ptr((*form).datname.data.as_ptr()) == database.as_c_str()).then(|| ((*form).oid, (*form).datallowconn))
        })
    };
    let db = match found {
        None => return Some(Blocker::DatabaseMissing),
        Some((_, false)) => return Some(Blocker::DatabaseClosed),
        Some((db, true)) => db,
    };
    // No role set: the bootstrap superuser, who can always log in.
    let role = role?;
    let Ok(role) = CString::new(role) else { return Some(Blocker::RoleMissing) };
    // SAFETY: pg_authid rows, read through their FormData layout.
    let found = unsafe {
        scan_shared(pg_sys::AuthIdRelationId, |row| {
            let form = row.cast::<pg_sys::FormData_pg_authid>();
            (CStr::from_ptr((*form).rolname.data.as_ptr()) == role.as_c_str()).then(|| ((*form).oid, (*form).rolcanlogin))
        })
    };
    match found {
        None => Some(Blocker::RoleMissing),
        Some((_, false)) => Some(Blocker::RoleCannotLogin),
        Some((role, true)) => (!may_connect(role, db)).then_some(Blocker::RoleCannotConnect),
    }
}

/// Whether `role` has CONNECT on database `db` (superusers have everything).
fn may_connect(role: pg_sys::Oid, db: pg_sys::Oid) -> bool {
    let connect = pg_sys::ACL_CONNECT as pg_sys::AclMode;
    super::signals::in_transaction(|| {
        // SAFETY: an ACL check against shared catalogs (pg_database, and
        // pg_authid and pg_auth_members for membership), in a transaction.
        let result = unsafe {
            #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
            let result = pg_sys::pg_database_aclcheck(db, role, connect);
            #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
            let result = pg_sys::object_aclcheck(pg_sys::DatabaseRelationId, db, role, connect);
            result
        };
        result == pg_sys::AclResult::ACLCHECK_OK
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
    // What was last said of why no worker can run, so it is said once.
    let mut said: Option<Blocker> = None;
    let mut last_start: Option<Instant> = None;
    let mut said_inherited: Option<i32> = None;
    loop {
        handle_interrupts();
        // Not yet started counts as running: starting another would make two.
        let running = worker
            .as_ref()
            .is_some_and(|w| !matches!(w.pid(), Err(BackgroundWorkerStatus::Stopped | BackgroundWorkerStatus::PostmasterDied)));
        if !running {
            worker = None;
        }
        // A worker this launcher did not start serves (the launcher was
        // restarted, and has no handle on it): wait for it to exit. A worker
        // started anyway would only wait for it too (`shmem::claim_worker`).
        let inherited = if running { None } else { shmem::serving_worker() };
        if let Some(pid) = inherited.filter(|_| said_inherited != inherited) {
            log!("outbox: a worker started before this launcher still serves (pid {pid}); waiting for it to exit");
        }
        said_inherited = inherited;
        if !running && inherited.is_none() {
            let (database, role) = (gucs::database(), gucs::role());
            match blocker(database.as_deref(), role.as_deref()) {
                Some(b) => {
                    if said != Some(b) {
                        log!("outbox: {}", b.describe(database.as_deref().unwrap_or(""), role.as_deref().unwrap_or("")));
                        said = Some(b);
                    }
                }
                None => {
                    let too_soon = last_start.is_some_and(|t| t.elapsed() < RECHECK);
                    if !too_soon {
                        said = None;
                        last_start = Some(Instant::now());
                        let db = database.unwrap_or_default();
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

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;
    use std::time::{Duration, Instant};

    /// What pg_stat_activity shows now for backend `pid`, if it runs.
    fn activity(pid: i32) -> Option<String> {
        Spi::run("SELECT pg_stat_clear_snapshot()").unwrap();
        Spi::get_one_with_args::<String>("SELECT query FROM pg_stat_activity WHERE pid = $1", &[pid.into()]).ok().flatten()
    }

    fn serving() -> Option<i32> {
        crate::pg::shmem::serving_worker()
    }

    fn until(what: &str, mut f: impl FnMut() -> bool) {
        let start = Instant::now();
        while !f() {
            assert!(start.elapsed() < Duration::from_secs(20), "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Two workers started for one database: the second waits, saying so,
    /// while the first serves, and takes over when the first exits. The
    /// launcher starts no third beside a worker it did not start.
    #[pg_test]
    fn a_second_worker_waits_until_the_first_exits() {
        until("a worker serves", || serving().is_some());
        let first = serving().unwrap();
        let second = super::start_worker("pgrx_tests").expect("a worker slot").wait_for_startup().expect("started");
        let second = second as i32;
        until("the second worker waits", || activity(second).as_deref() == Some("waiting for the other outbox worker to exit"));
        assert_eq!(serving(), Some(first), "the first serves on");
        Spi::run(&format!("SELECT pg_terminate_backend({first})")).unwrap();
        until("the second takes over", || serving() == Some(second));
        until("the second says it serves", || activity(second).is_some_and(|a| a != "waiting for the other outbox worker to exit"));
        let workers = || {
            Spi::run("SELECT pg_stat_clear_snapshot()").unwrap();
            Spi::get_one::<i64>("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'outbox worker'").unwrap().unwrap()
        };
        // The launcher saw its worker exit and another serve: it starts
        // none, or one that waits.
        std::thread::sleep(Duration::from_millis(1500));
        Spi::run("SELECT pg_stat_clear_snapshot()").unwrap();
        let others = Spi::get_one_with_args::<i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'outbox worker' AND pid <> $1
                AND query IS DISTINCT FROM 'waiting for the other outbox worker to exit'",
            &[second.into()],
        )
        .unwrap()
        .unwrap();
        assert_eq!(others, 0, "{} workers", workers());
    }
}
