//! Shared memory between backends, the launcher and the delivery workers:
//! one slot per served database (where its worker's latch is, what
//! `worker_status()` reports, the marks commits leave for it), the
//! launcher's latch, and what the launcher is told and tells. Only exists
//! when preloaded.
//!
//! The launcher alone gives a slot to a database and takes it back; a
//! worker claims the slot of its database; a backend finds the slot of the
//! database it is connected to. A slot's database and its worker's pid are
//! one word ([`Owner`]), changed by compare-and-swap only: the launcher
//! can't take back a slot a worker just claimed, nor a worker claim one the
//! launcher just took back, and so two workers never serve one database.

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// The most workers `outbox.max_workers` may allow: the number of slots.
pub const MAX_WORKERS: usize = 256;

/// How many databases' `CREATE EXTENSION` the launcher can be told of
/// between two of its rounds; beyond that it looks at every database again.
const ANNOUNCED: usize = 32;

/// A worker's life cycle as `worker_status()` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum WorkerState {
    Stopped = 0,
    /// Started, not yet past its first look at the database.
    Starting = 1,
    /// The database has no extension: the worker exits, and the launcher
    /// starts none there until `CREATE EXTENSION outbox` says otherwise.
    NotInstalled = 2,
    /// Hot standby: nothing is delivered until promotion.
    Standby = 3,
    Idle = 4,
    Delivering = 5,
    /// The worker's role lacks privileges on the extension's tables.
    WaitingForPrivileges = 6,
}

impl WorkerState {
    pub fn name(self) -> &'static str {
        match self {
            Self::Stopped => "stopped",
            Self::Starting => "starting",
            Self::NotInstalled => "not installed",
            Self::Standby => "standby",
            Self::Idle => "idle",
            Self::Delivering => "delivering",
            Self::WaitingForPrivileges => "waiting for privileges",
        }
    }
    fn from_u32(v: u32) -> Self {
        match v {
            1 => Self::Starting,
            2 => Self::NotInstalled,
            3 => Self::Standby,
            4 => Self::Idle,
            5 => Self::Delivering,
            6 => Self::WaitingForPrivileges,
            _ => Self::Stopped,
        }
    }
}

/// Whose a slot is: its database's oid (0: free) and the pid of the worker
/// that holds it (0: none), packed in one `AtomicU64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Owner {
    database: u32,
    pid: i32,
}

impl Owner {
    const FREE: Owner = Owner { database: 0, pid: 0 };
    fn pack(self) -> u64 {
        (u64::from(self.database) << 32) | u64::from(self.pid as u32)
    }
    fn unpack(v: u64) -> Owner {
        Owner { database: (v >> 32) as u32, pid: v as u32 as i32 }
    }
}

#[derive(Default)]
struct WorkerSlot {
    /// An [`Owner`]: the database is set and cleared by the launcher while
    /// no live worker holds the slot; the pid by the worker that claims it.
    owner: AtomicU64,
    /// The worker's PGPROC number plus one; 0 means no worker to wake.
    procno_plus_one: AtomicI32,
    state: AtomicU32,
    in_flight: AtomicU32,
    /// TimestampTz (µs since 2000-01-01) of the last claimed batch; 0 = never.
    last_batch_at: AtomicI64,
    /// A transaction that appended to the inbox committed since the worker
    /// last looked: the worker skips the inbox statement while it is clear.
    inbox_dirty: AtomicBool,
    /// Bumped by every committed change of `outbox.kinds` made through the
    /// SQL functions: the worker reloads its kinds when it moves.
    kinds_generation: AtomicU64,
    /// The kind whose bodies the worker is rendering (`watchdog::kind_hash`;
    /// 0: none), and the kind a render outlived its watchdog for, with how
    /// many times in a row: the next worker benches it.
    rendering: AtomicU64,
    stuck: AtomicU64,
    stuck_times: AtomicU32,
}

struct Shared {
    slots: [WorkerSlot; MAX_WORKERS],
    /// The launcher's PGPROC number plus one; 0 while none runs.
    launcher_procno_plus_one: AtomicI32,
    /// Databases where `CREATE EXTENSION outbox` committed, not yet taken
    /// by the launcher (0: an empty entry), and whether some did not fit.
    announced: [AtomicU32; ANNOUNCED],
    announced_overflow: AtomicBool,
    /// Databases waiting for a worker slot, as the launcher last found
    /// them; 0 ends the list.
    waiting: [AtomicU32; MAX_WORKERS],
}

impl WorkerSlot {
    fn owner(&self) -> Owner {
        Owner::unpack(self.owner.load(Ordering::Acquire))
    }
    /// Moves the owner from `from` to `to`; false if it was not `from`.
    fn swap_owner(&self, from: Owner, to: Owner) -> bool {
        self.owner.compare_exchange(from.pack(), to.pack(), Ordering::AcqRel, Ordering::Acquire).is_ok()
    }
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            slots: std::array::from_fn(|_| WorkerSlot::default()),
            launcher_procno_plus_one: AtomicI32::new(0),
            announced: std::array::from_fn(|_| AtomicU32::new(0)),
            announced_overflow: AtomicBool::new(false),
            waiting: std::array::from_fn(|_| AtomicU32::new(0)),
        }
    }
}

// SAFETY: only atomics, no pointers: valid in any process that maps the segment.
unsafe impl PGRXSharedMemory for Shared {}

// SAFETY: the name is unique to this extension.
static SHARED: PgAtomic<Shared> = unsafe { PgAtomic::new(c"outbox_shared") };

/// Set in the postmaster before backends fork, so every backend inherits it.
static READY: AtomicBool = AtomicBool::new(false);

/// In a worker: the index of the slot it holds, `usize::MAX` if none.
static MINE: AtomicUsize = AtomicUsize::new(usize::MAX);

thread_local! {
    /// In a backend: the index of its database's slot when last found.
    static FOUND: Cell<usize> = const { Cell::new(0) };
}

pub fn init() {
    pg_shmem_init!(SHARED = Shared::default());
    READY.store(true, Ordering::Relaxed);
}

fn shared() -> Option<&'static Shared> {
    READY.load(Ordering::Relaxed).then(|| SHARED.get())
}

/// This process's PGPROC number plus one.
fn my_procno_plus_one() -> i32 {
    // SAFETY: MyProc is set for a connected backend or background worker.
    #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16"))]
    let procno = unsafe { (*pg_sys::MyProc).pgprocno };
    // SAFETY: a plain read of this process's own proc number.
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    let procno = unsafe { pg_sys::MyProcNumber };
    procno + 1
}

/// Sets the latch of the process whose PGPROC number plus one is `n`.
/// Cannot raise an ERROR, so it is safe in commit callbacks.
fn set_latch(n: i32) {
    if n <= 0 {
        return;
    }
    // SAFETY: ProcGlobal is set up by the postmaster before any backend runs,
    // allProcs has a fixed number of entries, and the index was published by
    // a process of its own. A stale index only sets another process's latch:
    // a spurious wake.
    unsafe {
        let global = pg_sys::ProcGlobal;
        if global.is_null() || (n as u32) > (*global).allProcCount {
            return;
        }
        let proc_ = (*global).allProcs.add((n - 1) as usize);
        pg_sys::SetLatch(&raw mut (*proc_).procLatch);
    }
}

/// Whether `pid` is a live backend or worker.
fn alive(pid: i32) -> bool {
    // SAFETY: a ProcArray lookup by pid.
    pid != 0 && unsafe { !pg_sys::BackendPidGetProc(pid).is_null() }
}

/// The slot given to database `db`, if any.
fn slot_of(shared: &'static Shared, db: pg_sys::Oid) -> Option<(usize, &'static WorkerSlot)> {
    let db = db.to_u32();
    if db == 0 {
        return None;
    }
    shared.slots.iter().enumerate().find(|(_, s)| s.owner().database == db)
}

/// The slot of the database this backend is connected to, found once and
/// checked each time (the launcher may have given it to another database).
fn my_database_slot() -> Option<&'static WorkerSlot> {
    let shared = shared()?;
    // SAFETY: a plain read of this backend's database.
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    if db == 0 {
        return None;
    }
    let cached = &shared.slots[FOUND.get() % MAX_WORKERS];
    if cached.owner().database == db {
        return Some(cached);
    }
    let (i, slot) = slot_of(shared, pg_sys::Oid::from(db))?;
    FOUND.set(i);
    Some(slot)
}

/// The slot this worker holds.
fn my_slot() -> Option<&'static WorkerSlot> {
    let i = MINE.load(Ordering::Relaxed);
    shared()?.slots.get(i)
}

// --- What backends do, for the database they are connected to. ---

/// Sets the latch of the worker serving this database. Cannot raise.
pub fn wake_worker() {
    if let Some(slot) = my_database_slot() {
        set_latch(slot.procno_plus_one.load(Ordering::Acquire));
    }
}

/// Called on commit by a transaction that appended to the inbox, before it
/// wakes the worker. Cannot raise. Without a slot yet, a worker that starts
/// reads the inbox anyway.
pub fn mark_inbox_dirty() {
    if let Some(slot) = my_database_slot() {
        slot.inbox_dirty.store(true, Ordering::Release);
    }
}

/// Called on commit by a transaction that changed `outbox.kinds`, after it
/// became visible and before it wakes the worker. Cannot raise.
pub fn bump_kinds_generation() {
    if let Some(slot) = my_database_slot() {
        slot.kinds_generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// Called on commit by a transaction that created the extension in this
/// database: tells the launcher, and wakes it. Cannot raise.
pub fn announce_extension() {
    let Some(shared) = shared() else { return };
    // SAFETY: a plain read of this backend's database.
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let told = shared.announced.iter().any(|a| {
        let now = a.load(Ordering::Acquire);
        now == db || (now == 0 && a.compare_exchange(0, db, Ordering::AcqRel, Ordering::Acquire).is_ok())
    });
    if !told {
        shared.announced_overflow.store(true, Ordering::Release);
    }
    set_latch(shared.launcher_procno_plus_one.load(Ordering::Acquire));
}

/// The live worker that holds the slot of database `db`, if any: the one
/// DDL that needs the database to itself asks to step aside.
pub fn worker_of(db: pg_sys::Oid) -> Option<i32> {
    let (_, slot) = slot_of(shared()?, db)?;
    let pid = slot.owner().pid;
    alive(pid).then_some(pid)
}

/// Whether the launcher gave database `db` a slot: a worker runs there, is
/// starting, or is about to be started again.
pub fn has_slot(db: pg_sys::Oid) -> bool {
    shared().is_some_and(|shared| slot_of(shared, db).is_some())
}

// --- What a worker does, in the slot it holds. ---

/// How a worker's claim on its database's slot went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// This worker serves the database.
    Serving,
    /// Another live worker holds the slot (a launcher that restarted has no
    /// handle on the worker it left, and starts another): this one waits,
    /// or two would claim and deliver the same jobs.
    Held(i32),
    /// The launcher gave no slot to the database (it took the slot back
    /// after a restart, or nothing preloaded the library): nobody wants
    /// this worker.
    NoSlot,
}

/// Makes this process the delivery worker of its database, if no other
/// live process is.
pub fn claim_worker() -> Claim {
    let Some(shared) = shared() else { return Claim::NoSlot };
    // SAFETY: a plain read of this worker's database.
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let me = std::process::id() as i32;
    let Some((index, slot)) = slot_of(shared, pg_sys::Oid::from(db)) else { return Claim::NoSlot };
    loop {
        let owner = slot.owner();
        // Taken back, and maybe given to another database, since the lookup.
        if owner.database != db {
            return claim_worker();
        }
        // Another pid holds it: ours only if that process is gone without
        // releasing it, which exit (`release_worker`) always does short of
        // a crash, and a crash resets shared memory.
        if owner.pid != 0 && owner.pid != me && alive(owner.pid) {
            return Claim::Held(owner.pid);
        }
        if owner.pid == me || slot.swap_owner(owner, Owner { database: db, pid: me }) {
            break;
        }
    }
    MINE.store(index, Ordering::Relaxed);
    slot.state.store(WorkerState::Starting as u32, Ordering::Relaxed);
    slot.procno_plus_one.store(my_procno_plus_one(), Ordering::Release);
    Claim::Serving
}

/// Called at every worker's exit: if it held a slot, frees it for a
/// waiting worker, so that nobody wakes a recycled PGPROC. The state stays,
/// for the launcher to read (`NotInstalled`); a worker that never held the
/// slot leaves the serving one's latch published.
pub fn release_worker() {
    let Some(slot) = my_slot() else { return };
    let owner = slot.owner();
    // Held by this process until the swap below: nobody else writes these.
    if owner.pid != std::process::id() as i32 {
        return;
    }
    slot.procno_plus_one.store(0, Ordering::Release);
    if WorkerState::from_u32(slot.state.load(Ordering::Relaxed)) != WorkerState::NotInstalled {
        slot.state.store(WorkerState::Stopped as u32, Ordering::Relaxed);
    }
    slot.in_flight.store(0, Ordering::Relaxed);
    slot.swap_owner(owner, Owner { pid: 0, ..owner });
}

/// Sets what `worker_status()` shows; only a worker holding a slot does.
pub fn set_state(state: WorkerState) {
    if let Some(slot) = my_slot() {
        slot.state.store(state as u32, Ordering::Relaxed);
    }
}

pub fn set_in_flight(n: usize) {
    if let Some(slot) = my_slot() {
        slot.in_flight.store(n as u32, Ordering::Relaxed);
    }
}

pub fn mark_batch() {
    if let Some(slot) = my_slot() {
        // SAFETY: a plain clock read.
        let now = unsafe { pg_sys::GetCurrentTimestamp() };
        slot.last_batch_at.store(now, Ordering::Relaxed);
    }
}

/// Whether the inbox may have rows the worker hasn't seen; clears the mark.
/// Without a slot, always true.
pub fn take_inbox_dirty() -> bool {
    my_slot().is_none_or(|slot| slot.inbox_dirty.swap(false, Ordering::AcqRel))
}

/// The current kinds generation; None without a slot (then the worker
/// can't tell, and reloads every turn).
pub fn kinds_generation() -> Option<u64> {
    my_slot().map(|slot| slot.kinds_generation.load(Ordering::Acquire))
}

/// Says which kind the worker is rendering (0: none).
pub fn set_rendering(kind_hash: u64) {
    if let Some(s) = my_slot() {
        s.rendering.store(kind_hash, Ordering::Relaxed);
    }
}

/// At the worker's exit by its watchdog: the kind it was rendering is stuck.
pub fn mark_stuck() {
    if let Some(s) = my_slot() {
        let kind = s.rendering.load(Ordering::Relaxed);
        let again = s.stuck_times.load(Ordering::Relaxed);
        let times = if s.stuck.load(Ordering::Relaxed) == kind { again + 1 } else { 1 };
        s.stuck.store(kind, Ordering::Relaxed);
        s.stuck_times.store(times, Ordering::Relaxed);
    }
}

/// The kind a previous worker of this database got stuck rendering, and how
/// many times in a row; taken once (the count stays, for the next time).
pub fn take_stuck_kind() -> Option<(u64, u32)> {
    let s = my_slot()?;
    let kind = s.stuck.swap(0, Ordering::Relaxed);
    (kind != 0).then(|| (kind, s.stuck_times.load(Ordering::Relaxed)))
}

// --- What the launcher does. ---

/// A slot given to a database, as the launcher sees it.
pub struct Given {
    pub index: usize,
    pub database: pg_sys::Oid,
    /// The worker holding it, if that process is alive.
    pub pid: Option<i32>,
    pub state: WorkerState,
    /// The owner as read: [`take_back`] only if it is still this.
    owner: Owner,
}

/// Publishes the launcher's latch, so that announcements wake it.
pub fn publish_launcher() {
    if let Some(shared) = shared() {
        shared.launcher_procno_plus_one.store(my_procno_plus_one(), Ordering::Release);
    }
}

/// The databases announced since the last call, and whether some did not
/// fit (then every database may have the extension now).
pub fn take_announced() -> (Vec<pg_sys::Oid>, bool) {
    let Some(shared) = shared() else { return (Vec::new(), false) };
    let overflow = shared.announced_overflow.swap(false, Ordering::AcqRel);
    let dbs = shared.announced.iter().map(|a| a.swap(0, Ordering::AcqRel)).filter(|&db| db != 0).map(pg_sys::Oid::from).collect();
    (dbs, overflow)
}

/// Every slot given to a database.
pub fn given() -> Vec<Given> {
    let Some(shared) = shared() else { return Vec::new() };
    shared
        .slots
        .iter()
        .enumerate()
        .filter_map(|(index, s)| {
            let owner = s.owner();
            (owner.database != 0).then(|| Given {
                index,
                database: pg_sys::Oid::from(owner.database),
                pid: alive(owner.pid).then_some(owner.pid),
                state: WorkerState::from_u32(s.state.load(Ordering::Relaxed)),
                owner,
            })
        })
        .collect()
}

/// Gives a free slot among the first `limit` to database `db`, with nothing
/// of the database that had it before; None if all are taken.
pub fn give(db: pg_sys::Oid, limit: usize) -> Option<usize> {
    let shared = shared()?;
    let (index, slot) = shared.slots.iter().take(limit).enumerate().find(|(_, s)| s.owner() == Owner::FREE)?;
    // Free, so no worker reads or writes the rest, and none can claim it
    // before the owner names the database.
    slot.procno_plus_one.store(0, Ordering::Relaxed);
    slot.state.store(WorkerState::Starting as u32, Ordering::Relaxed);
    slot.in_flight.store(0, Ordering::Relaxed);
    slot.last_batch_at.store(0, Ordering::Relaxed);
    // A worker reads the inbox and the kinds when it starts anyway.
    slot.inbox_dirty.store(true, Ordering::Relaxed);
    slot.rendering.store(0, Ordering::Relaxed);
    slot.stuck.store(0, Ordering::Relaxed);
    slot.stuck_times.store(0, Ordering::Relaxed);
    slot.swap_owner(Owner::FREE, Owner { database: db.to_u32(), pid: 0 }).then_some(index)
}

/// Takes a slot back, unless its owner changed since it was read (a worker
/// claimed it): then the next round looks again.
pub fn take_back(given: &Given) {
    if let Some(shared) = shared() {
        shared.slots[given.index].swap_owner(given.owner, Owner::FREE);
    }
}

/// Gives back slot `index`, just given to database `db`, when its worker
/// could not be started.
pub fn give_back(index: usize, db: pg_sys::Oid) {
    if let Some(shared) = shared() {
        shared.slots[index].swap_owner(Owner { database: db.to_u32(), pid: 0 }, Owner::FREE);
    }
}

/// Before a worker is started again in slot `index`, which no worker
/// holds: it shows `starting` until the new one is past its first look.
pub fn restarting(index: usize) {
    if let Some(shared) = shared() {
        shared.slots[index].state.store(WorkerState::Starting as u32, Ordering::Relaxed);
    }
}

/// Publishes the databases waiting for a slot, for `worker_status()`.
pub fn set_waiting(dbs: &[pg_sys::Oid]) {
    let Some(shared) = shared() else { return };
    for (i, entry) in shared.waiting.iter().enumerate() {
        entry.store(dbs.get(i).map_or(0, |db| db.to_u32()), Ordering::Relaxed);
    }
}

// --- What `worker_status()` reads. ---

/// A consistent-enough copy of one slot.
pub struct Snapshot {
    pub database: pg_sys::Oid,
    pub pid: Option<i32>,
    pub state: WorkerState,
    pub in_flight: i32,
    pub last_batch_at: Option<i64>,
}

/// Every slot given to a database; None without shared memory.
pub fn snapshot() -> Option<Vec<Snapshot>> {
    let shared = shared()?;
    let rows = shared.slots.iter().filter_map(|s| {
        let Owner { database, pid } = s.owner();
        let state = WorkerState::from_u32(s.state.load(Ordering::Relaxed));
        let last = s.last_batch_at.load(Ordering::Relaxed);
        (database != 0).then(|| Snapshot {
            database: pg_sys::Oid::from(database),
            pid: (state != WorkerState::Stopped && pid > 0).then_some(pid),
            state,
            in_flight: s.in_flight.load(Ordering::Relaxed) as i32,
            last_batch_at: (last != 0).then_some(last),
        })
    });
    Some(rows.collect())
}

/// The databases waiting for a slot, as the launcher last published them.
pub fn waiting() -> Vec<pg_sys::Oid> {
    let Some(shared) = shared() else { return Vec::new() };
    shared.waiting.iter().map(|w| w.load(Ordering::Relaxed)).take_while(|&db| db != 0).map(pg_sys::Oid::from).collect()
}
