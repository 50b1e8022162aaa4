//! One row of a system catalog, read through its syscache.

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
