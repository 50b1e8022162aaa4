//! Running a piece of work under other settings, as a function's `SET`
//! clause does: the worker's statements under their plan settings, bodies
//! under their lock timeout, trigger code under a pinned `search_path`.

use pgrx::pg_sys;
use std::ffi::CStr;

/// Runs `f` with these (user-settable) settings, then puts back what was
/// there before.
pub fn with_settings<R>(settings: &[(&CStr, &CStr)], f: impl FnOnce() -> R) -> R {
    // SAFETY: what a function's SET clause does: a GUC nest level, values
    // saved in it, and popped afterwards (or by the abort of the (sub)
    // transaction, should `f` raise). Main thread, in a transaction.
    unsafe {
        let level = pg_sys::NewGUCNestLevel();
        for (name, value) in settings {
            pg_sys::set_config_option(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            );
        }
        let result = f();
        pg_sys::AtEOXact_GUC(true, level);
        result
    }
}
