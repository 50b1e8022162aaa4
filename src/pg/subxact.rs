//! Running a piece of SQL work so that its ERROR is caught and rolled back on
//! its own, leaving the surrounding transaction usable. The worker renders
//! each job's body this way, so one bad body function can't sink a batch.

use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;

/// The longest message kept of a caught ERROR: it may be user text (a body
/// function's RAISE) of any size, and ends up in a job's last_error.
const MAX_MESSAGE: usize = 1024;

/// `message`, cut to [`MAX_MESSAGE`] bytes at a character boundary.
fn bounded(message: &str) -> String {
    if message.len() <= MAX_MESSAGE {
        return message.to_string();
    }
    let mut cut = MAX_MESSAGE;
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}...", &message[..cut])
}

/// A caught ERROR: its SQLSTATE and message.
#[derive(Debug, Clone)]
pub struct Caught {
    pub sqlstate: String,
    pub message: String,
}

impl Caught {
    /// Whether it is a lock wait that ran out (`lock_timeout`, 55P03).
    pub fn is_lock_timeout(&self) -> bool {
        self.sqlstate == sqlstate(PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE)
    }

    /// Whether it ran out of time: a lock wait (`lock_timeout`, 55P03) or a
    /// statement cancelled by its time limit (57014).
    pub fn is_timeout(&self) -> bool {
        self.is_lock_timeout() || self.sqlstate == sqlstate(PgSqlErrorCode::ERRCODE_QUERY_CANCELED)
    }

    /// Whether what failed is not at fault and a later try may pass: it ran
    /// out of time, lost a race with another transaction (class 40:
    /// serialization failure, deadlock), or the server ran short of
    /// resources (class 53) or was told to stop (class 57).
    pub fn is_transient(&self) -> bool {
        self.is_timeout() || ["40", "53", "57"].iter().any(|class| self.sqlstate.starts_with(class))
    }
}

/// The five-character SQLSTATE of an error code.
pub fn sqlstate(code: PgSqlErrorCode) -> String {
    let mut v = code as i32;
    let mut out = String::with_capacity(5);
    for _ in 0..5 {
        out.push(char::from(((v & 0x3F) as u8) + b'0'));
        v >>= 6;
    }
    out
}

/// Runs `f` in an internal subtransaction. On success the subtransaction is
/// released; on an ERROR (or panic) it is rolled back and the error returned.
pub fn try_subtransaction<R>(f: impl FnOnce() -> R + std::panic::UnwindSafe) -> Result<R, Caught> {
    // SAFETY: we are in a transaction on the main thread; the memory context
    // and resource owner are restored after either outcome, as PL/pgSQL does.
    let (mcx, owner) = unsafe {
        let mcx = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(mcx);
        (mcx, owner)
    };
    let mut f = Some(f);
    PgTryBuilder::new(move || {
        let r = (f.take().expect("runs once"))();
        // SAFETY: releasing the subtransaction begun above.
        unsafe {
            pg_sys::ReleaseCurrentSubTransaction();
            pg_sys::MemoryContextSwitchTo(mcx);
            pg_sys::CurrentResourceOwner = owner;
        }
        Ok(r)
    })
    .catch_others(move |e| {
        // SAFETY: rolling back the subtransaction begun above, then restoring state.
        unsafe {
            pg_sys::MemoryContextSwitchTo(mcx);
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
            pg_sys::MemoryContextSwitchTo(mcx);
            pg_sys::CurrentResourceOwner = owner;
        }
        Err(match e {
            CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) | CaughtError::RustPanic { ereport: r, .. } => {
                Caught { sqlstate: sqlstate(r.sql_error_code()), message: bounded(r.message()) }
            }
        })
    })
    .execute()
}

#[cfg(test)]
mod tests {
    use super::sqlstate;
    use pgrx::prelude::PgSqlErrorCode;

    #[test]
    fn messages_are_bounded() {
        assert_eq!(super::bounded("short"), "short");
        let long = "é".repeat(1000);
        let cut = super::bounded(&long);
        assert!(cut.len() <= super::MAX_MESSAGE + 3 && cut.ends_with("..."), "{}", cut.len());
    }

    #[test]
    fn sqlstates() {
        assert_eq!(sqlstate(PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED), "22004");
        assert_eq!(sqlstate(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT), "42704");
        assert_eq!(sqlstate(PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION), "00000");
    }
}
