//! Catalog lookups: one row of a system catalog through its syscache, and
//! the relation a utility statement named.

use pgrx::pg_sys;

/// `read` applied to the row of `cache` whose key is `key`, if there is one.
/// `T` must be the catalog's row struct (`FormData_pg_...`) for `cache`.
pub fn row<T, R>(cache: pg_sys::SysCacheIdentifier::Type, key: pg_sys::Oid, read: impl FnOnce(&T) -> R) -> Option<R> {
    // SAFETY: a syscache lookup in a transaction; the tuple is released
    // before return, and `read` sees its fixed-size part only while pinned.
    unsafe {
        let tuple = pg_sys::SearchSysCache1(cache as i32, pg_sys::Datum::from(key));
        if tuple.is_null() {
            return None;
        }
        let value = read(&*pg_sys::heap_tuple_get_struct::<T>(tuple));
        pg_sys::ReleaseSysCache(tuple);
        Some(value)
    }
}

/// The name of database `db`; None if there is none.
pub fn database_name(db: pg_sys::Oid) -> Option<String> {
    // SAFETY: a syscache lookup in a transaction; NULL for a database that
    // does not exist, else a palloc'd NUL-terminated string.
    unsafe {
        let name = pg_sys::get_database_name(db);
        (!name.is_null()).then(|| std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned())
    }
}

/// The relation a utility statement that just ran named, if it (still)
/// exists. The statement resolved and locked it, so no lock is taken again.
///
/// # Safety
/// `relation` is the statement's valid RangeVar.
pub(crate) unsafe fn relid_named(relation: *mut pg_sys::RangeVar) -> Option<pg_sys::Oid> {
    let no_lock = pg_sys::NoLock as pg_sys::LOCKMODE;
    // SAFETY: a name lookup (missing_ok), as the caller's contract allows.
    let oid = unsafe {
        pg_sys::RangeVarGetRelidExtended(relation, no_lock, pg_sys::RVROption::RVR_MISSING_OK, None, std::ptr::null_mut())
    };
    (oid != pg_sys::InvalidOid).then_some(oid)
}
