//! Prepared plans for the worker's statements, kept for the life of the
//! process: planning the claim on every turn would cost more than running it.
//! A plan whose tables are dropped and re-created (DROP/CREATE EXTENSION) is
//! re-planned by Postgres' plan cache on its next use.

use pgrx::datum::DatumWithOid;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiResult, SpiTupleTable};
use pgrx::PgOid;
use std::cell::RefCell;
use std::collections::HashMap;

thread_local! {
    static PLANS: RefCell<HashMap<String, OwnedPreparedStatement>> = RefCell::new(HashMap::new());
}

/// Runs `sql` (read-write, fresh snapshot per statement) through its cached plan.
pub fn execute<'c>(
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
    pub const INT8: PgOid = PgOid::BuiltIn(BuiltinOid::INT8OID);
    pub const TEXT_ARRAY: PgOid = PgOid::BuiltIn(BuiltinOid::TEXTARRAYOID);
    pub const INT8_ARRAY: PgOid = PgOid::BuiltIn(BuiltinOid::INT8ARRAYOID);
    pub const INT4_ARRAY: PgOid = PgOid::BuiltIn(BuiltinOid::INT4ARRAYOID);
}
