//! One bad inbox row costs that row, never the worker. When the absorb
//! statement fails for a reason other than a lock wait, the rows it would
//! have taken are moved one at a time, each in a subtransaction; a row that
//! still fails is set aside in `outbox.rejected` with the error, logged, and
//! shown in `outbox.jobs` as dead. Before this, such a row (a 3,000-byte kind
//! over the btree limit, say) failed every turn and restarted the worker
//! every second, delivering nothing.

use super::plans::execute;
use super::queue::{for_schema, ABSORB_ROW, ABSORB_ROW_0_2, REJECT_ROW, ROWS_FROM};
use crate::pg::settings::with_settings;
use crate::pg::subxact::{try_subtransaction, Caught};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use super::plans::types::{INT8, TEXT};

/// How long moving one row may wait for a lock (an open transaction's
/// fresh job): the row then stays for a later turn.
const ROW_LOCK_TIMEOUT: &std::ffi::CStr = c"100ms";

/// The heap block of a tid's text, `(block,offset)`.
fn block_of(tid: &str) -> i64 {
    tid.trim_start_matches('(').split(',').next().and_then(|b| b.parse().ok()).unwrap_or(0)
}

/// After the absorb statement from block `start` failed with `cause`: moves
/// up to `limit` inbox rows one at a time, setting aside those that fail.
/// Returns (changes moved, last block read), as the absorb does.
pub fn absorb_one_by_one(c: &mut SpiClient<'_>, limit: i64, start: i64, cause: &Caught) -> (i64, i64) {
    warning!(
        "outbox worker: moving the inbox into the queue failed: {} (SQLSTATE {}); moving its rows one at a time",
        cause.message,
        cause.sqlstate
    );
    let rows: Vec<String> = execute(c, ROWS_FROM, &[INT8, INT8], &[limit.into(), start.into()])
        .unwrap_or_else(|e| panic!("listing inbox rows: {e}"))
        .filter_map(|r| r.get::<String>(1).ok().flatten())
        .collect();
    let (mut moved, mut last) = (0, start);
    for tid in rows {
        let absorbed = try_subtransaction(std::panic::AssertUnwindSafe(|| {
            with_settings(&[(c"lock_timeout", ROW_LOCK_TIMEOUT)], || {
                execute(c, for_schema(ABSORB_ROW, ABSORB_ROW_0_2), &[TEXT], &[tid.as_str().into()])
                    .and_then(|t| t.first().get_one::<i64>())
                    .unwrap_or_else(|e| panic!("{e}"))
                    .unwrap_or(0)
            })
        }));
        match absorbed {
            Ok(n) => moved += n,
            // Not the row's fault: it waits for a later turn.
            Err(e) if e.is_transient() => break,
            Err(e) => reject(c, &tid, &format!("{} (SQLSTATE {})", e.message, e.sqlstate)),
        }
        last = block_of(&tid);
    }
    (moved, last)
}

/// Sets inbox row `tid` aside with `reason`. If even that fails, nothing
/// more can be done here: the worker stops, as before.
fn reject(c: &mut SpiClient<'_>, tid: &str, reason: &str) {
    let set_aside = try_subtransaction(std::panic::AssertUnwindSafe(|| {
        execute(c, REJECT_ROW, &[TEXT, TEXT], &[tid.into(), reason.into()])
            .and_then(|t| t.first().get_two::<String, i64>())
            .unwrap_or_else(|e| panic!("{e}"))
    }));
    match set_aside {
        Ok((Some(kind), Some(n))) => warning!(
            "outbox worker: set aside an inbox row of kind \"{kind}\" ({n} change(s)) in outbox.rejected: {reason}"
        ),
        // Gone meanwhile (an admin deleted it): nothing to set aside.
        Ok(_) => {}
        Err(e) => panic!("setting aside inbox row {tid}: {} (SQLSTATE {}); it failed with: {reason}", e.message, e.sqlstate),
    }
}

#[cfg(test)]
mod unit {
    #[test]
    fn a_tid_text_gives_its_block() {
        assert_eq!(super::block_of("(12,3)"), 12);
        assert_eq!(super::block_of("(0,1)"), 0);
    }
}
