//! Entry points that earlier versions' SQL declares and this version's does
//! not. The library is replaced before `ALTER EXTENSION outbox UPDATE` runs
//! in each database, and a database still on the old version must keep
//! working until then: its functions name these symbols. No SQL is
//! generated for them (`sql = false`); `sql/outbox--A--B.sql` drops the old
//! declarations.

use super::enqueue::{enqueue_id, require_delay};
use crate::pg::errors::{require, require_kind};
use pgrx::datum::{Interval, Uuid};
use pgrx::prelude::*;
use pgrx::Array;
use std::ffi::CStr;

// 0.1.0: `enqueue(kind text, id text|bigint|uuid, delay interval DEFAULT '0 s')`.

#[pg_extern(sql = false)]
fn enqueue_text(kind: Option<&str>, id: Option<&str>, delay: Option<Interval>) {
    let (kind, id) = (require_kind(kind), require(id, "id").to_string());
    enqueue_id(kind, id, Some(require_delay(delay)))
}

#[pg_extern(sql = false)]
fn enqueue_bigint(kind: Option<&str>, id: Option<i64>, delay: Option<Interval>) {
    let (kind, id) = (require_kind(kind), require(id, "id").to_string());
    enqueue_id(kind, id, Some(require_delay(delay)))
}

#[pg_extern(sql = false)]
fn enqueue_uuid(kind: Option<&str>, id: Option<Uuid>, delay: Option<Interval>) {
    // As uuid_out spells it: lower case, hyphenated.
    let (kind, id) = (require_kind(kind), require(id, "id").to_string());
    enqueue_id(kind, id, Some(require_delay(delay)))
}

// 0.2.0: `track(tbl regclass, kind text, id_column name DEFAULT NULL,
// columns name[] DEFAULT NULL)`, without a filter.

#[pg_extern(sql = false)]
fn track(tbl: Option<pg_sys::Oid>, kind: Option<&str>, id_column: Option<&CStr>, columns: Option<Array<&CStr>>) -> String {
    crate::capture::triggers::track_table(tbl, kind, id_column, columns, None)
}
