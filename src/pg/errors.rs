//! User-facing errors: each with a precise SQLSTATE, and a hint where one helps.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

/// Raises an ERROR; never returns.
#[track_caller]
pub fn raise(code: PgSqlErrorCode, message: impl Into<String>, hint: Option<&str>) -> ! {
    let mut report = ErrorReport::new(code, message.into(), "outbox");
    if let Some(h) = hint {
        report = report.set_hint(h);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

/// A required argument that is NULL.
#[track_caller]
pub fn require<T>(value: Option<T>, name: &str) -> T {
    match value {
        Some(v) => v,
        None => raise(PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED, format!("{name} must not be NULL"), None),
    }
}

/// Longest kind accepted, in bytes (a CHECK on `outbox.kinds` says the same).
pub const MAX_KIND_LEN: usize = 200;

/// A kind name: not NULL, not empty, not absurdly long.
#[track_caller]
pub fn require_kind(kind: Option<&str>) -> &str {
    let kind = require(kind, "kind");
    if kind.is_empty() {
        raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, "kind must not be empty", None);
    }
    if kind.len() > MAX_KIND_LEN {
        raise(
            PgSqlErrorCode::ERRCODE_STRING_DATA_RIGHT_TRUNCATION,
            format!("kind is longer than {} bytes", MAX_KIND_LEN),
            None,
        );
    }
    kind
}

#[track_caller]
pub fn unknown_kind(kind: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
        format!("outbox kind \"{kind}\" is not registered"),
        Some("Register it first with outbox.register(kind, url)."),
    )
}
