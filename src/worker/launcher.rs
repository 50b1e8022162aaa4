//! The launcher: one per cluster, connected to no database (it reads only
//! shared catalogs, which is all it needs). It keeps one delivery worker
//! running in every database that has the extension, and only there, within
//! `outbox.max_workers`; with `outbox.database` set, in that database only.
//!
//! It can't see another database's extensions, so a worker it starts looks:
//! without the extension, it says so in its slot and exits, and the launcher
//! starts none there again until told otherwise. It is told by the commit
//! of `CREATE EXTENSION outbox` (or `COMMIT PREPARED`) in that database,
//! and it forgets what it found at a reload, at a promotion (a standby's
//! replay runs no hook) and when it starts. A database created since the
//! last round is new to it, so a copy of one with the extension is looked
//! at too. Each round follows TimescaleDB's launcher: reap the workers that
//! exited, read `pg_database`, start what [`placement::plan`] says, wait.

use super::signals::{handle_interrupts, install_handlers, reloads, wait};
use crate::pg::shmem::{self, WorkerState};
use crate::pg::gucs;
use crate::rules::placement::{self, Database, Known};
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, BgWorkerStartTime, DynamicBackgroundWorker,
};
use pgrx::prelude::*;
use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::time::{Duration, Instant};

/// How often the launcher reads `pg_database` when nothing wakes it, and
/// the least time between two starts of a worker in one database.
const RECHECK: Duration = Duration::from_secs(1);

/// How long a worker may take to claim its slot. One that takes longer
/// waits for a lock on its database (a `DROP DATABASE`, a rename in an open
/// transaction, a long copy): it is stopped, so that it doesn't hold the
/// slot from other databases, and tried again later.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest pause before a database whose workers keep failing to get
/// past their start gets another.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Why no worker can run, in any database or in the one named. Each is
/// logged once, and waited out: a worker started anyway would fail to
/// connect, again and again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Blocker {
    /// `outbox.database` names no database.
    DatabaseMissing,
    /// `outbox.database` names one with `ALLOW_CONNECTIONS false`.
    DatabaseClosed,
    RoleMissing,
    RoleCannotLogin,
}

impl Blocker {
    fn describe(self, database: &str, role: &str) -> String {
        match self {
            Self::DatabaseMissing => format!("database \"{database}\" does not exist yet; the worker will start once it does"),
            Self::DatabaseClosed => format!("database \"{database}\" does not allow connections; the worker will start once it does"),
            Self::RoleMissing => format!("role \"{role}\" (outbox.role) does not exist; the worker will start once it does"),
            Self::RoleCannotLogin => format!("role \"{role}\" (outbox.role) cannot log in; the worker will start once it can"),
        }
    }
}

/// Every row of shared catalog `catalog` that `pick` makes something of.
/// With no database selected, only shared catalogs can be read, and only by
/// scan (as the autovacuum launcher does).
///
/// # Safety
/// `pick` is given a pointer to the row's fixed-size fields, laid out as
/// the catalog's `FormData` struct; it reads only those.
unsafe fn scan_shared<R>(catalog: pg_sys::Oid, mut pick: impl FnMut(*const u8) -> Option<R>) -> Vec<R> {
    super::signals::in_transaction(|| {
        // SAFETY: a read-only catalog scan inside a transaction; every tuple
        // returned is a valid row of `catalog`.
        unsafe {
            let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
            let rel = pg_sys::table_open(catalog, lock);
            let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
            let mut found = Vec::new();
            loop {
                let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
                if tuple.is_null() {
                    break;
                }
                let header = (*tuple).t_data;
                found.extend(pick(header.cast::<u8>().add((*header).t_hoff as usize)));
            }
            pg_sys::table_endscan(scan);
            pg_sys::table_close(rel, lock);
            found
        }
    })
}

/// The databases of the cluster.
fn databases() -> Vec<Database> {
    // SAFETY: pg_database rows, read through their FormData layout.
    unsafe {
        scan_shared(pg_sys::DatabaseRelationId, |row| {
            let form = row.cast::<pg_sys::FormData_pg_database>();
            Some(Database {
                id: (*form).oid.to_u32(),
                name: CStr::from_ptr((*form).datname.data.as_ptr()).to_string_lossy().into_owned(),
                allows_connections: (*form).datallowconn && (*form).datconnlimit != pg_sys::DATCONNLIMIT_INVALID_DB,
                is_template: (*form).datistemplate,
            })
        })
    }
}

/// The role workers connect as: None for the bootstrap superuser (no
/// `outbox.role`), who can always log in.
fn worker_role(role: Option<&str>) -> Result<Option<pg_sys::Oid>, Blocker> {
    let Some(role) = role else { return Ok(None) };
    let Ok(role) = CString::new(role) else { return Err(Blocker::RoleMissing) };
    // SAFETY: pg_authid rows, read through their FormData layout.
    let found = unsafe {
        scan_shared(pg_sys::AuthIdRelationId, |row| {
            let form = row.cast::<pg_sys::FormData_pg_authid>();
            (CStr::from_ptr((*form).rolname.data.as_ptr()) == role.as_c_str()).then(|| ((*form).oid, (*form).rolcanlogin))
        })
    };
    match found.first() {
        None => Err(Blocker::RoleMissing),
        Some((_, false)) => Err(Blocker::RoleCannotLogin),
        Some((oid, true)) => Ok(Some(*oid)),
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

/// What a worker is started with: its database and role, by oid (a rename
/// of either changes nothing), in the one argument a worker gets.
pub(super) fn worker_argument(db: pg_sys::Oid, role: Option<pg_sys::Oid>) -> pg_sys::Datum {
    let role = role.map_or(0, |r| r.to_u32());
    pg_sys::Datum::from((u64::from(role) << 32) | u64::from(db.to_u32()))
}

/// The database and role (InvalidOid: the bootstrap superuser) a worker was
/// started with.
pub(super) fn worker_connection(arg: pg_sys::Datum) -> (pg_sys::Oid, pg_sys::Oid) {
    let v = arg.value() as u64;
    (pg_sys::Oid::from(v as u32), pg_sys::Oid::from((v >> 32) as u32))
}

fn start_worker(db: pg_sys::Oid, name: &str, role: Option<pg_sys::Oid>) -> Option<DynamicBackgroundWorker> {
    BackgroundWorkerBuilder::new(&format!("outbox worker {name}"))
        .set_type("outbox worker")
        .set_library("outbox")
        .set_function("outbox_worker_main")
        .set_argument(Some(worker_argument(db, role)))
        .enable_shmem_access(None)
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::ConsistentState)
        .set_restart_time(None)
        // SAFETY: reading this process's pid.
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .load_dynamic()
        .ok()
}

/// The name of database `db` as the round read it ("" if gone).
fn name_of(databases: &[Database], db: u32) -> &str {
    databases.iter().find(|d| d.id == db).map_or("", |d| d.name.as_str())
}

/// What the launcher knows from one round to the next.
#[derive(Default)]
struct Launcher {
    /// The workers this launcher started, by database, and when. A slot
    /// held by a worker it has no handle on (started by a launcher before
    /// it) counts as served all the same.
    started: HashMap<u32, (DynamicBackgroundWorker, Instant)>,
    /// How many workers in a row failed to get past their start, by
    /// database: the next waits [`backoff`].
    strikes: HashMap<u32, u32>,
    /// Databases a worker found without the extension.
    absent: HashSet<u32>,
    /// Databases announced since their last worker started: a worker
    /// there that found no extension looked too early.
    recheck: HashSet<u32>,
    last_start: HashMap<u32, Instant>,
    /// What was last said, so that each thing is said once.
    said: Option<Blocker>,
    said_no_connect: HashSet<u32>,
    said_waiting: Vec<u32>,
    said_no_process: bool,
    said_not_mine: HashSet<i32>,
    standby: bool,
    reloads_seen: u64,
}

impl Launcher {
    /// One round: what changed, the workers that exited, then starts:
    /// again in the slots whose worker exited, then in new databases.
    fn round(&mut self) {
        self.take_news();
        let databases = databases();
        let exists: HashSet<u32> = databases.iter().map(|d| d.id).collect();
        self.absent.retain(|db| exists.contains(db));
        self.recheck.retain(|db| exists.contains(db));
        self.last_start.retain(|db, _| exists.contains(db));
        self.strikes.retain(|db, _| exists.contains(db));
        let only = gucs::database();
        let wanted: HashSet<u32> = databases.iter().filter(|d| placement::wanted(d, only.as_deref())).map(|d| d.id).collect();
        let vacant = self.reap(&databases, &wanted);
        let role_name = gucs::role();
        let blocker = only.as_deref().and_then(|name| match databases.iter().find(|d| d.name == name) {
            None => Some(Blocker::DatabaseMissing),
            Some(d) if !d.allows_connections => Some(Blocker::DatabaseClosed),
            Some(_) => None,
        });
        let role = match blocker.map_or_else(|| worker_role(role_name.as_deref()), Err) {
            Ok(role) => role,
            Err(b) => {
                if self.said != Some(b) {
                    log!("outbox: {}", b.describe(only.as_deref().unwrap_or(""), role_name.as_deref().unwrap_or("")));
                    self.said = Some(b);
                }
                self.publish_waiting(&databases, Vec::new());
                return;
            }
        };
        self.said = None;
        for (index, db) in vacant {
            if self.ready(db, name_of(&databases, db), role, role_name.as_deref()) {
                self.start(pg_sys::Oid::from(db), name_of(&databases, db), role, Some(index));
            }
        }
        let given = shmem::given();
        let served: HashSet<u32> = given.iter().map(|g| g.database.to_u32()).collect();
        let free_slots = gucs::max_workers().saturating_sub(given.len());
        let absent = std::mem::take(&mut self.absent);
        let known = Known { only: only.as_deref(), served: &served, absent: &absent, free_slots };
        let placement::Plan { start, mut waiting } =
            placement::plan(&databases, known, |db| self.ready(db.id, &db.name, role, role_name.as_deref()));
        self.absent = absent;
        for db in start {
            if !self.start(pg_sys::Oid::from(db), name_of(&databases, db), role, None) {
                waiting.push(db);
            }
        }
        self.publish_waiting(&databases, waiting);
    }

    /// Whether a worker may start in database `db` now: not started there a
    /// moment ago, and `role` (None: the bootstrap superuser) may connect.
    fn ready(&mut self, db: u32, name: &str, role: Option<pg_sys::Oid>, role_name: Option<&str>) -> bool {
        let pause = placement::backoff(self.strikes.get(&db).copied().unwrap_or(0), RECHECK, MAX_BACKOFF);
        if self.last_start.get(&db).is_some_and(|t| t.elapsed() < pause) {
            return false;
        }
        if role.is_some_and(|r| !may_connect(r, pg_sys::Oid::from(db))) {
            if self.said_no_connect.insert(db) {
                let role = role_name.unwrap_or("");
                log!("outbox: role \"{role}\" (outbox.role) may not connect to database \"{name}\"; the worker will start once it may");
            }
            return false;
        }
        self.said_no_connect.remove(&db);
        true
    }

    /// Forgets what it found of databases that may have changed since: all
    /// of them after a reload or a promotion, the ones announced.
    fn take_news(&mut self) {
        if reloads() != self.reloads_seen {
            self.reloads_seen = reloads();
            self.absent.clear();
        }
        // SAFETY: a plain query of shared recovery state.
        let standby = unsafe { pg_sys::RecoveryInProgress() };
        if self.standby && !standby {
            self.absent.clear();
        }
        self.standby = standby;
        let (announced, overflow) = shmem::take_announced();
        if overflow {
            self.absent.clear();
            self.recheck.extend(shmem::given().iter().map(|g| g.database.to_u32()));
        }
        for db in announced {
            self.absent.remove(&db.to_u32());
            self.recheck.insert(db.to_u32());
        }
    }

    /// Looks at the slots whose worker exited: one that never got past its
    /// start, or found no extension, or whose database is gone or no longer
    /// `wanted`, gives its slot back; the others keep theirs (and what it
    /// says of the kind a stuck worker was rendering), and are returned, to
    /// start again. A worker that has not claimed its slot in time is
    /// stopped.
    fn reap(&mut self, databases: &[Database], wanted: &HashSet<u32>) -> Vec<(usize, u32)> {
        let mut vacant = Vec::new();
        for g in shmem::given() {
            let db = g.database.to_u32();
            // Not yet started counts as running: starting another would make two.
            let handle_runs = self.started.get(&db).is_some_and(|(w, _)| {
                !matches!(w.pid(), Err(BackgroundWorkerStatus::Stopped | BackgroundWorkerStatus::PostmasterDied))
            });
            if let Some(pid) = g.pid {
                if !handle_runs {
                    // Another worker holds the slot (one that waited for
                    // ours, or one a launcher before this one started).
                    self.started.remove(&db);
                    if self.said_not_mine.insert(pid) {
                        log!("outbox: a worker this launcher did not start (pid {pid}) serves database \"{}\"; it starts none beside it", name_of(databases, db));
                    }
                }
                if g.state != WorkerState::Starting {
                    self.strikes.remove(&db);
                }
                continue;
            }
            if handle_runs {
                let since = self.started[&db].1;
                if since.elapsed() > CLAIM_TIMEOUT {
                    let (worker, _) = self.started.remove(&db).expect("a handle");
                    // Reaped, with a strike, once it is gone.
                    worker.terminate();
                    log!(
                        "outbox: the worker started in database \"{}\" did not begin within {} s (is the database locked?); stopping it, to try again later",
                        name_of(databases, db),
                        CLAIM_TIMEOUT.as_secs()
                    );
                }
                continue;
            }
            self.started.remove(&db);
            // It never got past its start (it could not connect, or claim
            // in time): the database waits its back-off, counted from now,
            // without a slot, so that other databases are not held up.
            let failed = g.state == WorkerState::Starting;
            if failed {
                *self.strikes.entry(db).or_default() += 1;
                self.last_start.insert(db, Instant::now());
            }
            let not_installed = g.state == WorkerState::NotInstalled && !self.recheck.contains(&db);
            if not_installed {
                self.absent.insert(db);
            }
            if failed || not_installed || !wanted.contains(&db) {
                shmem::take_back(&g);
            } else {
                vacant.push((g.index, db));
            }
        }
        vacant
    }

    /// Starts a worker in database `db`, in its slot `index` or a new one;
    /// false if no background worker process was free (the slot is then
    /// given back, and the database waits with the others).
    fn start(&mut self, db: pg_sys::Oid, name: &str, role: Option<pg_sys::Oid>, index: Option<usize>) -> bool {
        let index = match index {
            Some(index) => {
                shmem::restarting(index);
                index
            }
            None => match shmem::give(db, gucs::max_workers()) {
                Some(index) => index,
                None => return false,
            },
        };
        self.last_start.insert(db.to_u32(), Instant::now());
        self.recheck.remove(&db.to_u32());
        match start_worker(db, name, role) {
            Some(worker) => {
                self.started.insert(db.to_u32(), (worker, Instant::now()));
                self.said_no_process = false;
                true
            }
            None => {
                shmem::give_back(index, db);
                if !self.said_no_process {
                    warning!("outbox: could not start the worker for database \"{name}\": no background worker process is free (max_worker_processes)");
                    self.said_no_process = true;
                }
                false
            }
        }
    }

    /// Tells `worker_status()`, and the log once, which databases wait.
    fn publish_waiting(&mut self, databases: &[Database], waiting: Vec<u32>) {
        let oids: Vec<pg_sys::Oid> = waiting.iter().map(|&db| pg_sys::Oid::from(db)).collect();
        shmem::set_waiting(&oids);
        if !waiting.is_empty() && waiting != self.said_waiting {
            let names: Vec<String> = databases.iter().filter(|d| waiting.contains(&d.id)).map(|d| format!("\"{}\"", d.name)).collect();
            log!(
                "outbox: {} database(s) wait for a worker, all {} allowed (outbox.max_workers) being busy: {}",
                names.len(),
                gucs::max_workers(),
                names.join(", ")
            );
        }
        self.said_waiting = waiting;
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn outbox_launcher_main(_arg: pg_sys::Datum) {
    install_handlers();
    BackgroundWorker::connect_worker_to_spi(None, None);
    shmem::publish_launcher();
    // SAFETY: a plain read of a postmaster setting.
    let processes = unsafe { pg_sys::max_worker_processes } as usize;
    if gucs::max_workers() + 1 > processes {
        warning!(
            "outbox: outbox.max_workers is {} but max_worker_processes is {processes}, which must also hold the launcher: at most {} database(s) will be served",
            gucs::max_workers(),
            processes.saturating_sub(1)
        );
    }
    // A worker in a slot given before this launcher started may have been
    // looking when the last launcher was told of a CREATE EXTENSION.
    let recheck = shmem::given().iter().map(|g| g.database.to_u32()).collect();
    let mut launcher = Launcher { reloads_seen: reloads(), recheck, ..Launcher::default() };
    loop {
        handle_interrupts();
        launcher.round();
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
        // SAFETY: a plain read of this backend's database.
        crate::pg::shmem::worker_of(unsafe { pg_sys::MyDatabaseId })
    }

    fn until(what: &str, mut f: impl FnMut() -> bool) {
        let start = Instant::now();
        while !f() {
            assert!(start.elapsed() < Duration::from_secs(20), "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Two workers started for one database: the second waits, saying so,
    /// while the first serves. When the first exits, the database keeps its
    /// slot, and one worker serves in it: the second, or one the launcher
    /// started; any other waits.
    #[pg_test]
    fn a_second_worker_waits_until_the_first_exits() {
        until("a worker serves", || serving().is_some());
        let first = serving().unwrap();
        // SAFETY: a plain read of this backend's database.
        let db = unsafe { pg_sys::MyDatabaseId };
        let second = super::start_worker(db, "pgrx_tests", None).expect("a worker slot").wait_for_startup().expect("started");
        let second = second as i32;
        until("the second worker waits", || activity(second).as_deref() == Some("waiting for the other outbox worker to exit"));
        assert_eq!(serving(), Some(first), "the first serves on");
        Spi::run(&format!("SELECT pg_terminate_backend({first})")).unwrap();
        // The second, or one the launcher started in the slot the database
        // kept, serves; never both.
        until("another serves", || serving().is_some_and(|p| p != first));
        let now = serving().unwrap();
        until("it says it serves", || activity(now).is_some_and(|a| a != "waiting for the other outbox worker to exit"));
        assert!(activity(second).is_some(), "the second lives on, serving or waiting");
        let workers = || {
            Spi::run("SELECT pg_stat_clear_snapshot()").unwrap();
            Spi::get_one::<i64>("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'outbox worker'").unwrap().unwrap()
        };
        // Any other worker of this database waits.
        std::thread::sleep(Duration::from_millis(1500));
        Spi::run("SELECT pg_stat_clear_snapshot()").unwrap();
        let others = Spi::get_one_with_args::<i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'outbox worker' AND pid <> $1
                AND datname = current_database()
                AND query IS DISTINCT FROM 'waiting for the other outbox worker to exit'",
            &[now.into()],
        )
        .unwrap()
        .unwrap();
        assert_eq!(others, 0, "{} workers", workers());
    }
}
