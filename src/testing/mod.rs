//! Helpers for `#[pg_test]` tests, and checks over the source itself.
//!
//! - [`sql_check`]: every statement names the schema of its functions and operators.
//! - [`layout_check`]: no module imports one that imports it back.

#[cfg(test)]
mod layout_check;
#[cfg(test)]
pub mod sql_check;

use crate::pg::subxact::try_subtransaction;
use pgrx::prelude::*;

/// Runs `sql` in a subtransaction and returns its SQLSTATE ("00000" on success).
pub fn sqlstate_of(sql: &str) -> String {
    let sql = sql.to_string();
    match try_subtransaction(move || Spi::run(&sql).expect("SPI")) {
        Ok(()) => "00000".into(),
        Err(e) => e.sqlstate,
    }
}

/// Runs `sql` in a subtransaction and returns the error message, if any.
pub fn error_of(sql: &str) -> Option<String> {
    let sql = sql.to_string();
    try_subtransaction(move || Spi::run(&sql).expect("SPI")).err().map(|e| e.message)
}

/// Runs each statement in its own subtransaction and checks its SQLSTATE.
pub fn assert_sqlstates(cases: &[(&str, &str)]) {
    for (sql, code) in cases {
        assert_eq!(sqlstate_of(sql), *code, "{sql}");
    }
}

/// The first column of every row `sql` returns, as text (none may be NULL).
pub fn texts(sql: &str, args: &[pgrx::datum::DatumWithOid<'_>]) -> Vec<String> {
    Spi::connect(|c| c.select(sql, None, args).unwrap().map(|r| r.get::<String>(1).unwrap().unwrap()).collect())
}
