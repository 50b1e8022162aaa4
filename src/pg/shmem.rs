//! Shared memory between backends and the worker: where the worker's latch is,
//! and what `worker_status()` reports. Only exists when preloaded.

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU32, AtomicU64, Ordering};

/// The worker's life cycle as `worker_status()` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum WorkerState {
    Stopped = 0,
    Starting = 1,
    /// The database or the extension is missing; checked again on a timer.
    WaitingForExtension = 2,
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
            Self::WaitingForExtension => "waiting for extension",
            Self::Standby => "standby",
            Self::Idle => "idle",
            Self::Delivering => "delivering",
            Self::WaitingForPrivileges => "waiting for privileges",
        }
    }
    fn from_u32(v: u32) -> Self {
        match v {
            1 => Self::Starting,
            2 => Self::WaitingForExtension,
            3 => Self::Standby,
            4 => Self::Idle,
            5 => Self::Delivering,
            6 => Self::WaitingForPrivileges,
            _ => Self::Stopped,
        }
    }
}

#[derive(Default)]
struct WorkerSlot {
    /// The worker's PGPROC number plus one; 0 means no worker to wake.
    procno_plus_one: AtomicI32,
    /// The pid of the worker that serves, 0 if none: claimed by one worker
    /// at a time (`claim_worker`).
    pid: AtomicI32,
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

// SAFETY: only atomics, no pointers: valid in any process that maps the segment.
unsafe impl PGRXSharedMemory for WorkerSlot {}

// SAFETY: the name is unique to this extension.
static WORKER: PgAtomic<WorkerSlot> = unsafe { PgAtomic::new(c"outbox_worker_slot") };

/// Set in the postmaster before backends fork, so every backend inherits it.
static READY: AtomicBool = AtomicBool::new(false);

/// Set in the worker's own process.
static IS_WORKER: AtomicBool = AtomicBool::new(false);

pub fn init() {
    pg_shmem_init!(WORKER = WorkerSlot::default());
    READY.store(true, Ordering::Relaxed);
}

fn slot() -> Option<&'static WorkerSlot> {
    READY.load(Ordering::Relaxed).then(|| WORKER.get())
}

/// Says which kind the worker is rendering (0: none).
pub fn set_rendering(kind_hash: u64) {
    if let Some(s) = slot() {
        s.rendering.store(kind_hash, Ordering::Relaxed);
    }
}

/// At the worker's exit by its watchdog: the kind it was rendering is stuck.
pub fn mark_stuck() {
    if let Some(s) = slot() {
        let kind = s.rendering.load(Ordering::Relaxed);
        let again = s.stuck_times.load(Ordering::Relaxed);
        let times = if s.stuck.load(Ordering::Relaxed) == kind { again + 1 } else { 1 };
        s.stuck.store(kind, Ordering::Relaxed);
        s.stuck_times.store(times, Ordering::Relaxed);
    }
}

/// The kind a previous worker got stuck rendering, and how many times in a
/// row; taken once (the count stays, for the next time).
pub fn take_stuck_kind() -> Option<(u64, u32)> {
    let s = slot()?;
    let kind = s.stuck.swap(0, Ordering::Relaxed);
    (kind != 0).then(|| (kind, s.stuck_times.load(Ordering::Relaxed)))
}

/// Sets the worker's latch. Safe in commit callbacks: it cannot raise an ERROR.
pub fn wake_worker() {
    let Some(slot) = slot() else { return };
    let n = slot.procno_plus_one.load(Ordering::Acquire);
    if n <= 0 {
        return;
    }
    // SAFETY: ProcGlobal is set up by the postmaster before any backend runs,
    // allProcs has a fixed number of entries, and the worker published a valid
    // index. A stale index only sets another process's latch: a spurious wake.
    unsafe {
        let global = pg_sys::ProcGlobal;
        if global.is_null() || (n as u32) > (*global).allProcCount {
            return;
        }
        let proc_ = (*global).allProcs.add((n - 1) as usize);
        pg_sys::SetLatch(&raw mut (*proc_).procLatch);
    }
}

/// Makes this process the delivery worker, if no other live process is:
/// claims the slot and publishes its latch. False while another worker holds
/// it (a launcher that restarted has no handle on the worker it left, and
/// starts another): that one must wait, or two would claim and deliver the
/// same jobs. Without shared memory (not preloaded) nothing can start a
/// worker, so true.
pub fn claim_worker() -> bool {
    let Some(slot) = slot() else { return true };
    let me = std::process::id() as i32;
    let mut holder = 0;
    loop {
        match slot.pid.compare_exchange(holder, me, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => break,
            Err(other) if other == me => break,
            // Another pid holds it: ours only if that process is gone
            // without releasing it, which exit (`release_worker`) always
            // does short of a crash, and a crash resets shared memory.
            Err(other) => {
                // SAFETY: a ProcArray lookup by pid, in a connected backend.
                if unsafe { !pg_sys::BackendPidGetProc(other).is_null() } {
                    return false;
                }
                holder = other;
            }
        }
    }
    // SAFETY: MyProc is set for a connected background worker.
    #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16"))]
    let procno = unsafe { (*pg_sys::MyProc).pgprocno };
    // SAFETY: a plain read of this process's own proc number.
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    let procno = unsafe { pg_sys::MyProcNumber };
    IS_WORKER.store(true, Ordering::Relaxed);
    slot.procno_plus_one.store(procno + 1, Ordering::Release);
    true
}

/// The pid of the worker that serves, if that process is alive: one the
/// caller did not start (a launcher that was restarted) must not get a
/// second beside it.
pub fn serving_worker() -> Option<i32> {
    let pid = slot()?.pid.load(Ordering::Acquire);
    // SAFETY: a ProcArray lookup by pid.
    (pid != 0 && unsafe { !pg_sys::BackendPidGetProc(pid).is_null() }).then_some(pid)
}

/// Called at every worker's exit: if it held the slot, frees it, so that
/// nobody wakes a recycled PGPROC and a waiting worker takes over. A worker
/// that never held it leaves the serving one's latch published.
pub fn release_worker() {
    let Some(slot) = slot() else { return };
    if !IS_WORKER.load(Ordering::Relaxed) {
        return;
    }
    slot.procno_plus_one.store(0, Ordering::Release);
    slot.state.store(WorkerState::Stopped as u32, Ordering::Relaxed);
    slot.in_flight.store(0, Ordering::Relaxed);
    let me = std::process::id() as i32;
    let _ = slot.pid.compare_exchange(me, 0, Ordering::AcqRel, Ordering::Acquire);
}

/// Sets what `worker_status()` shows; only the worker holding the slot does.
pub fn set_state(state: WorkerState) {
    if !IS_WORKER.load(Ordering::Relaxed) {
        return;
    }
    if let Some(slot) = slot() {
        slot.state.store(state as u32, Ordering::Relaxed);
    }
}

pub fn set_in_flight(n: usize) {
    if !IS_WORKER.load(Ordering::Relaxed) {
        return;
    }
    if let Some(slot) = slot() {
        slot.in_flight.store(n as u32, Ordering::Relaxed);
    }
}

/// Called on commit by a transaction that appended to the inbox, before it
/// wakes the worker. Cannot raise.
pub fn mark_inbox_dirty() {
    if let Some(slot) = slot() {
        slot.inbox_dirty.store(true, Ordering::Release);
    }
}

/// Whether the inbox may have rows the worker hasn't seen; clears the mark.
/// Without shared memory, always true.
pub fn take_inbox_dirty() -> bool {
    slot().is_none_or(|slot| slot.inbox_dirty.swap(false, Ordering::AcqRel))
}

/// Called on commit by a transaction that changed `outbox.kinds`, after it
/// became visible and before it wakes the worker. Cannot raise.
pub fn bump_kinds_generation() {
    if let Some(slot) = slot() {
        slot.kinds_generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// The current kinds generation; None without shared memory (then the worker
/// can't tell, and reloads every turn).
pub fn kinds_generation() -> Option<u64> {
    slot().map(|slot| slot.kinds_generation.load(Ordering::Acquire))
}

pub fn mark_batch() {
    if let Some(slot) = slot() {
        // SAFETY: a plain clock read.
        let now = unsafe { pg_sys::GetCurrentTimestamp() };
        slot.last_batch_at.store(now, Ordering::Relaxed);
    }
}

/// A consistent-enough copy for `worker_status()`.
pub struct Snapshot {
    pub pid: Option<i32>,
    pub state: WorkerState,
    pub in_flight: i32,
    pub last_batch_at: Option<i64>,
}

pub fn snapshot() -> Option<Snapshot> {
    let slot = slot()?;
    let state = WorkerState::from_u32(slot.state.load(Ordering::Relaxed));
    let pid = slot.pid.load(Ordering::Relaxed);
    let last = slot.last_batch_at.load(Ordering::Relaxed);
    Some(Snapshot {
        pid: (state != WorkerState::Stopped && pid > 0).then_some(pid),
        state,
        in_flight: slot.in_flight.load(Ordering::Relaxed) as i32,
        last_batch_at: (last != 0).then_some(last),
    })
}
