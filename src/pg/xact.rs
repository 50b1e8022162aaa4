//! Transaction ends, for the modules that keep state per transaction.
//!
//! The callbacks are registered once, from `_PG_init`, and each module hands
//! in what it does at each point ([`Handlers`]): no module runs another's
//! end-of-transaction work, and this one imports nothing of the crate.

use pgrx::prelude::*;
use std::sync::OnceLock;

/// What one module does as a transaction ends.
pub struct Handlers {
    /// Before COMMIT or PREPARE, while the transaction can still fail.
    pub before_commit: fn(),
    /// After the transaction ended: committed, or not (rolled back, or
    /// prepared: its commit runs none of this). Must not raise.
    pub ended: fn(committed: bool),
    /// Subtransaction `.0` rolled back, with the children that committed
    /// into it. Must not raise.
    pub subtransaction_aborted: fn(pg_sys::SubTransactionId),
}

static HANDLERS: OnceLock<&'static [Handlers]> = OnceLock::new();

/// Registers the callbacks that call `handlers`, in order. Once per process
/// (a backend forked from a postmaster that preloaded the library inherits
/// them).
pub fn install(handlers: &'static [Handlers]) {
    if HANDLERS.set(handlers).is_err() {
        return;
    }
    // SAFETY: registering plain function pointers that live as long as the
    // library, once per process, on the main thread.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact_event), std::ptr::null_mut());
    }
}

/// Only the PRE_ events may raise: an ERROR after commit aborts the backend.
#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    let Some(handlers) = HANDLERS.get() else { return };
    match event {
        XACT_EVENT_PRE_COMMIT | XACT_EVENT_PRE_PREPARE => handlers.iter().for_each(|h| (h.before_commit)()),
        XACT_EVENT_COMMIT => handlers.iter().for_each(|h| (h.ended)(true)),
        XACT_EVENT_ABORT | XACT_EVENT_PREPARE | XACT_EVENT_PARALLEL_ABORT => handlers.iter().for_each(|h| (h.ended)(false)),
        _ => {}
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact_event(
    event: pg_sys::SubXactEvent::Type,
    my: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        if let Some(handlers) = HANDLERS.get() {
            handlers.iter().for_each(|h| (h.subtransaction_aborted)(my));
        }
    }
}
