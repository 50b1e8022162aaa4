//! Prepared plans for the worker's statements, kept for the life of the
//! process: planning the claim on every turn would cost more than running it.
//! A plan whose tables are dropped and re-created (DROP/CREATE EXTENSION) is
//! re-planned by Postgres' plan cache on its next use.
//!
//! The worker's own statements (src/worker/queue.rs) are written for generic
//! plans, and run with [`OWN_SETTINGS`]. Left to choose, the plan cache
//! re-planned the claim on every turn (about half its cost: its generic cost,
//! estimated for a LIMIT it can't see, looks high), and JIT compiled it each
//! time. A generic plan is made once, often while the queue is empty, when a
//! sequential scan looks cheapest; every statement has an index or TID path
//! that stays cheap at any size, so take that. The settings hold only while
//! such a statement runs: body functions plan as the database is configured.

use pgrx::datum::DatumWithOid;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiResult, SpiTupleTable};
use pgrx::PgOid;
use std::cell::RefCell;
use std::collections::HashMap;
use crate::pg::settings::with_settings;
use std::ffi::CStr;

pub(crate) const OWN_SETTINGS: [(&CStr, &CStr); 4] = [
    (c"plan_cache_mode", c"force_generic_plan"),
    (c"jit", c"off"),
    (c"enable_seqscan", c"off"),
    (c"enable_bitmapscan", c"off"),
];

thread_local! {
    static PLANS: RefCell<HashMap<String, OwnedPreparedStatement>> = RefCell::new(HashMap::new());
}

/// Runs one of the worker's own statements (read-write, fresh snapshot per
/// statement) through its cached plan, with [`OWN_SETTINGS`].
pub fn execute<'c>(
    c: &mut SpiClient<'c>,
    sql: &str,
    types: &[PgOid],
    args: &[DatumWithOid<'_>],
) -> SpiResult<SpiTupleTable<'c>> {
    with_settings(&OWN_SETTINGS, || execute_plain(c, sql, types, args))
}

/// Like [`execute`], with the session's settings: for statements that run
/// body functions.
pub fn execute_plain<'c>(
    c: &mut SpiClient<'c>,
    sql: &str,
    types: &[PgOid],
    args: &[DatumWithOid<'_>],
) -> SpiResult<SpiTupleTable<'c>> {
    PLANS.with(|plans| {
        let mut plans = plans.borrow_mut();
        if !plans.contains_key(sql) {
            let plan = c.prepare_mut(sql, types)?.keep();
            plans.insert(sql.to_string(), plan);
        }
        c.update(&plans[sql], None, args)
    })
}

/// Drops every plan, e.g. when the extension went away.
pub fn forget() {
    PLANS.with(|plans| plans.borrow_mut().clear());
}

pub mod types {
    use pgrx::pg_sys::BuiltinOid;
    use pgrx::PgOid;
    pub const INT4: PgOid = PgOid::BuiltIn(BuiltinOid::INT4OID);
    pub const INT8: PgOid = PgOid::BuiltIn(BuiltinOid::INT8OID);
    pub const TEXT: PgOid = PgOid::BuiltIn(BuiltinOid::TEXTOID);
    pub const TEXT_ARRAY: PgOid = PgOid::BuiltIn(BuiltinOid::TEXTARRAYOID);
    pub const INT8_ARRAY: PgOid = PgOid::BuiltIn(BuiltinOid::INT8ARRAYOID);
    pub const BOOL_ARRAY: PgOid = PgOid::BuiltIn(BuiltinOid::BOOLARRAYOID);
    pub const INT4_ARRAY: PgOid = PgOid::BuiltIn(BuiltinOid::INT4ARRAYOID);
    pub const FLOAT8_ARRAY: PgOid = PgOid::BuiltIn(BuiltinOid::FLOAT8ARRAYOID);
}
