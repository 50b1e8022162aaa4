//! Helpers for `#[pg_test]` tests.

use crate::subxact::try_subtransaction;
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

/// Tests run side by side: other tests' writes to the queue would draw job
/// ids under the caller. They wait until its transaction ends (the mode
/// conflicts with itself and with writes).
pub fn hold_the_queue() {
    Spi::run("LOCK TABLE outbox.queue IN SHARE ROW EXCLUSIVE MODE").unwrap();
}
