//! Signals, waiting and transactions for the workers, in the discipline of
//! Postgres' own processes: SIGTERM is Postgres' `die` (so even a COMMIT that
//! waits for a synchronous standby ends promptly), SIGHUP sets
//! `ConfigReloadPending` and the loop reloads, and a wait ends the process
//! when the postmaster is gone.

use pgrx::prelude::*;
use std::time::Duration;

// The raw C handlers: pgrx's `pg_sys::die` is a guarded Rust wrapper, not a
// function a signal may call.
unsafe extern "C-unwind" {
    #[link_name = "die"]
    fn pg_die(signal: std::ffi::c_int);
    #[link_name = "SignalHandlerForConfigReload"]
    fn pg_config_reload(signal: std::ffi::c_int);
}

pub fn install_handlers() {
    // SAFETY: installing Postgres' own handlers, then unblocking signals, as
    // every background worker does at start; main thread only.
    unsafe {
        // PostgreSQL 18 names the backend's `pqsignal` macro's target.
        #[cfg(not(feature = "pg18"))]
        use pg_sys::pqsignal;
        #[cfg(feature = "pg18")]
        use pg_sys::pqsignal_be as pqsignal;
        pqsignal(pg_sys::SIGHUP as i32, Some(pg_config_reload));
        pqsignal(pg_sys::SIGTERM as i32, Some(pg_die));
        pg_sys::BackgroundWorkerUnblockSignals();
    }
}

thread_local! {
    static RELOADS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Ends the process if SIGTERM came (via `die`); reloads config after SIGHUP.
pub fn handle_interrupts() {
    pg_sys::check_for_interrupts!();
    // SAFETY: plain reads and writes of a sig_atomic_t flag on the main thread.
    unsafe {
        if pg_sys::ConfigReloadPending != 0 {
            pg_sys::ConfigReloadPending = 0;
            pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
            RELOADS.set(RELOADS.get() + 1);
        }
    }
}

/// How many times the configuration was reloaded: settings read once (into
/// the HTTP threads) are read again when this moves.
pub fn reloads() -> u64 {
    RELOADS.get()
}

/// Sleeps until the latch is set, `fd` is readable, or `timeout` passes.
pub fn wait(fd: Option<i32>, timeout: Duration) {
    let ms = timeout.as_millis().min(i32::MAX as u128) as std::ffi::c_long;
    match fd {
        // SAFETY: MyLatch is this process's latch; the set waits on it, the
        // postmaster and `fd`, which stays open while we wait.
        Some(fd) => unsafe {
            let mut event: pg_sys::WaitEvent = std::mem::zeroed();
            pg_sys::WaitEventSetWait(socket_wait_set(fd), ms, &mut event, 1, pg_sys::PG_WAIT_EXTENSION);
            pg_sys::ResetLatch(pg_sys::MyLatch);
        },
        // SAFETY: as above; WaitLatch uses a wait set Postgres keeps.
        None => unsafe {
            let events = pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH;
            pg_sys::WaitLatch(pg_sys::MyLatch, events as i32, ms, pg_sys::PG_WAIT_EXTENSION);
            pg_sys::ResetLatch(pg_sys::MyLatch);
        },
    }
    handle_interrupts();
}

thread_local! {
    /// The wait set for the latch, the postmaster and one fd, with that fd.
    static SOCKET_WAIT: std::cell::Cell<Option<(i32, *mut pg_sys::WaitEventSet)>> = const { std::cell::Cell::new(None) };
}

/// A wait set for `fd`, made once. `WaitLatchOrSocket` makes and frees one
/// per call (an epoll instance, three `epoll_ctl`s and a `close`), which
/// was half the worker's CPU when every commit woke it with nothing to do.
///
/// # Safety
/// Main thread only; `fd` must stay open while the set is in use.
unsafe fn socket_wait_set(fd: i32) -> *mut pg_sys::WaitEventSet {
    if let Some((made_for, set)) = SOCKET_WAIT.get() {
        if made_for == fd {
            return set;
        }
        // SAFETY: made below, and no longer waited on.
        unsafe { pg_sys::FreeWaitEventSet(set) };
    }
    // SAFETY: a set that lives as long as the process (or until another fd
    // replaces it), holding this process's latch.
    let set = unsafe {
        #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16"))]
        let set = pg_sys::CreateWaitEventSet(pg_sys::TopMemoryContext, 3);
        #[cfg(any(feature = "pg17", feature = "pg18"))]
        let set = pg_sys::CreateWaitEventSet(std::ptr::null_mut(), 3);
        let none = pg_sys::PGINVALID_SOCKET;
        pg_sys::AddWaitEventToSet(set, pg_sys::WL_LATCH_SET, none, pg_sys::MyLatch, std::ptr::null_mut());
        pg_sys::AddWaitEventToSet(set, pg_sys::WL_EXIT_ON_PM_DEATH, none, std::ptr::null_mut(), std::ptr::null_mut());
        pg_sys::AddWaitEventToSet(set, pg_sys::WL_SOCKET_READABLE, fd, std::ptr::null_mut(), std::ptr::null_mut());
        set
    };
    SOCKET_WAIT.set(Some((fd, set)));
    set
}

/// Sleeps `d` without waking for the latch (it stays set for the next wait);
/// still ends on postmaster death, and handles SIGTERM right after.
pub fn pause(d: Duration) {
    let ms = d.as_millis().max(1) as std::ffi::c_long;
    // SAFETY: as in `wait`, without WL_LATCH_SET.
    unsafe {
        pg_sys::WaitLatch(pg_sys::MyLatch, (pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32, ms, pg_sys::PG_WAIT_EXTENSION);
    }
    handle_interrupts();
}

/// Runs `f` in a transaction with a snapshot. An ERROR inside ends the
/// worker (exit 1); the launcher starts it again.
pub fn in_transaction<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: the standard way a background worker opens and commits a
    // transaction, on the main thread, outside any other transaction.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let r = f();
    // SAFETY: closes what was opened above.
    unsafe {
        pg_sys::PopActiveSnapshot();
        pg_sys::CommitTransactionCommand();
    }
    r
}

/// Hands this process's table statistics to the stats system, as a backend
/// does between statements (at most once a second, unless they are old). A
/// background worker must do it itself: without it autovacuum would never
/// hear of the queue rows the worker inserts and deletes. Outside a
/// transaction.
pub fn report_stats() {
    // SAFETY: a plain call on the main thread, outside any transaction. The
    // result (when to call again) is meant for idle backends; turns come
    // often enough.
    unsafe {
        let _ = pg_sys::pgstat_report_stat(false);
    }
}

/// Shows `activity` in pg_stat_activity.query.
pub fn report_activity(running: bool, activity: &std::ffi::CStr) {
    let state = if running { pg_sys::BackendState::STATE_RUNNING } else { pg_sys::BackendState::STATE_IDLE };
    // SAFETY: Postgres copies the string.
    unsafe { pg_sys::pgstat_report_activity(state, activity.as_ptr()) };
}
