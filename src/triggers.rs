//! `track` / `untrack` and the `enqueue_trigger` trigger function.
//!
//! `track` creates one `AFTER INSERT OR UPDATE OR DELETE ... FOR EACH ROW`
//! trigger. The trigger function is plain C-level code: it compares the old
//! and new row itself and appends `(kind, id)` to `outbox.inbox` with a direct
//! heap insert: no SPI, no planner, no index to maintain. That keeps a tracked
//! single-row UPDATE nearly as cheap as an untracked one, and a bulk UPDATE
//! free of per-row round trips. The worker moves the inbox into the queue,
//! coalescing as it goes (see `worker::queue::ABSORB_INBOX`).

use crate::errors::{raise, require, require_kind, unknown_kind};
use pgrx::prelude::*;
use pgrx::spi::{quote_identifier, quote_literal};
use pgrx::Array;
use std::cell::RefCell;
use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};

/// Most distinct records remembered per transaction to skip repeats; past
/// it, repeats are simply appended again (the worker coalesces them).
const DEDUPE_LIMIT: usize = 100_000;

thread_local! {
    /// (kind, id) appended to the inbox by this transaction. Cleared at
    /// transaction end and when a subtransaction aborts (its rows are gone).
    /// Keyed by kind, so that a row is looked up without allocating.
    static APPENDED: RefCell<(HashMap<String, HashSet<String>>, usize)> = RefCell::new((HashMap::new(), 0));
    /// outbox.inbox's oid, looked up once per transaction.
    static INBOX: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
}

pub(crate) fn forget_appended() {
    INBOX.with(|i| i.set(pg_sys::InvalidOid));
    APPENDED.with(|a| {
        if let Ok(mut a) = a.try_borrow_mut() {
            *a = (HashMap::new(), 0);
        }
    });
}

unsafe extern "C-unwind" {
    // Postgres' binary-image equality (utils/adt/datum.c); not in pgrx's bindings.
    fn datum_image_eq(value1: pg_sys::Datum, value2: pg_sys::Datum, typ_by_val: bool, typ_len: std::ffi::c_int) -> bool;
}

/// A column's value in a row: None for NULL.
///
/// # Safety
/// `tuple` and `tupdesc` must describe the same row; `attno` is 1-based and in range.
unsafe fn attr(tuple: *mut pg_sys::HeapTupleData, tupdesc: pg_sys::TupleDesc, attno: i32) -> Option<pg_sys::Datum> {
    let mut is_null = false;
    // SAFETY: guaranteed by the caller.
    let d = unsafe { pg_sys::heap_getattr(tuple, attno, tupdesc, &mut is_null) };
    (!is_null).then_some(d)
}

/// # Safety
/// `tupdesc` must be valid and `attno` 1-based and in range.
unsafe fn attribute(tupdesc: pg_sys::TupleDesc, attno: i32) -> &'static pg_sys::FormData_pg_attribute {
    // SAFETY: attrs holds natts entries; the caller keeps attno in range.
    unsafe { &*(*tupdesc).attrs.as_ptr().add((attno - 1) as usize) }
}

/// The id column's value as text (its type's output function), None if NULL.
///
/// # Safety
/// As for [`attr`].
unsafe fn id_text(tuple: *mut pg_sys::HeapTupleData, tupdesc: pg_sys::TupleDesc, attno: i32) -> Option<String> {
    // SAFETY: guaranteed by the caller.
    let datum = unsafe { attr(tuple, tupdesc, attno) }?;
    let (mut out, mut varlena) = (pg_sys::InvalidOid, false);
    // SAFETY: the attribute's type oid is valid; output functions return a palloc'd C string.
    unsafe {
        pg_sys::getTypeOutputInfo(attribute(tupdesc, attno).atttypid, &mut out, &mut varlena);
        let cstr = pg_sys::OidOutputFunctionCall(out, datum);
        Some(CStr::from_ptr(cstr).to_string_lossy().into_owned())
    }
}

/// Whether any of `attnos` differs between the two rows, by binary image
/// (so it works for every type, json and point included).
///
/// # Safety
/// Both tuples must be rows of `tupdesc`; every attno must be in range.
unsafe fn changed(old: *mut pg_sys::HeapTupleData, new: *mut pg_sys::HeapTupleData, tupdesc: pg_sys::TupleDesc, attnos: &[i32]) -> bool {
    attnos.iter().any(|&n| {
        // SAFETY: guaranteed by the caller.
        unsafe {
            let a = attribute(tupdesc, n);
            match (attr(old, tupdesc, n), attr(new, tupdesc, n)) {
                (None, None) => false,
                (Some(x), Some(y)) => !datum_image_eq(x, y, a.attbyval, a.attlen as i32),
                _ => true,
            }
        }
    })
}

/// Attribute number of a column, or an ERROR naming it.
///
/// # Safety
/// `tupdesc` must be valid.
unsafe fn attno_of(tupdesc: pg_sys::TupleDesc, column: &str) -> i32 {
    let c = CString::new(column).unwrap_or_default();
    // SAFETY: SPI_fnumber only reads the descriptor.
    let n = unsafe { pg_sys::SPI_fnumber(tupdesc, c.as_ptr()) };
    if n <= 0 {
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            format!("outbox.enqueue_trigger: column \"{column}\" does not exist"),
            Some("The tracked table changed; call outbox.track(table, kind, ...) again."),
        );
    }
    n
}

fn inbox_relid() -> pg_sys::Oid {
    let cached = INBOX.with(Cell::get);
    if cached != pg_sys::InvalidOid {
        return cached;
    }
    // SAFETY: syscache lookups; missing_ok so we can raise a clear error.
    let oid = unsafe {
        let ns = pg_sys::get_namespace_oid(c"outbox".as_ptr(), true);
        if ns == pg_sys::InvalidOid { ns } else { pg_sys::get_relname_relid(c"inbox".as_ptr(), ns) }
    };
    if oid == pg_sys::InvalidOid {
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE, "outbox.inbox does not exist", Some("Is the outbox extension installed?"));
    }
    // The transaction-end callback forgets it.
    crate::enqueue::register_callbacks();
    INBOX.with(|i| i.set(oid));
    oid
}

/// Appends `(kind, id)` rows to `outbox.inbox` with direct heap inserts.
fn append_to_inbox(kind: &str, ids: &[String]) {
    for id in ids {
        crate::enqueue::check_id(id);
    }
    let fresh: Vec<&String> = APPENDED.with(|a| {
        let (by_kind, count) = &mut *a.borrow_mut();
        ids.iter()
            .filter(|id| {
                if by_kind.get(kind).is_some_and(|seen| seen.contains(id.as_str())) {
                    return false;
                }
                if *count < DEDUPE_LIMIT {
                    by_kind.entry(kind.to_string()).or_default().insert((*id).clone());
                    *count += 1;
                }
                true
            })
            .collect()
    });
    if fresh.is_empty() {
        return;
    }
    // SAFETY: the inbox is our own plain heap table; we hold RowExclusiveLock
    // while inserting, as the executor would. It has no indexes (checked), so
    // a heap insert is the whole insert.
    unsafe {
        let lock = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
        let rel = pg_sys::table_open(inbox_relid(), lock);
        if (*(*rel).rd_rel).relhasindex {
            pg_sys::table_close(rel, lock);
            raise(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, "outbox.inbox must not have indexes", None);
        }
        let kind_datum = text_datum(kind);
        let at = pg_sys::Datum::from(pg_sys::GetCurrentTransactionStartTimestamp());
        for id in fresh {
            let mut values = [kind_datum, text_datum(id), at];
            let mut nulls = [false; 3];
            let tuple = pg_sys::heap_form_tuple((*rel).rd_att, values.as_mut_ptr(), nulls.as_mut_ptr());
            pg_sys::simple_heap_insert(rel, tuple);
            pg_sys::heap_freetuple(tuple);
        }
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
    crate::enqueue::wake_on_commit_for_inbox();
}

fn text_datum(s: &str) -> pg_sys::Datum {
    // SAFETY: copies the bytes into a palloc'd text.
    pg_sys::Datum::from(unsafe { pg_sys::cstring_to_text_with_len(s.as_ptr().cast(), s.len() as i32) })
}

#[pg_trigger(sql = "
CREATE FUNCTION outbox.enqueue_trigger() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
")]
fn enqueue_trigger<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, std::convert::Infallible> {
    let misuse = |what: &str| -> ! {
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("outbox.enqueue_trigger {what}"),
            Some("Create tracking triggers with outbox.track(table, kind)."),
        )
    };
    if !matches!(trigger.level(), PgTriggerLevel::Row) || !matches!(trigger.when(), Ok(PgTriggerWhen::After)) {
        misuse("must fire AFTER ... FOR EACH ROW");
    }
    let args = trigger.extra_args().unwrap_or_default();
    if args.len() < 2 {
        misuse("needs the arguments (kind, id_column [, column ...])");
    }
    let (kind, id_column, watched) = (&args[0], &args[1], &args[2..]);
    let td = trigger.trigger_data();
    // SAFETY: Postgres hands us the fired row(s) and the table's descriptor;
    // they stay valid for this call. Attribute numbers come from SPI_fnumber.
    let ids = unsafe {
        let tupdesc = (*td.tg_relation).rd_att;
        let id_attno = attno_of(tupdesc, id_column);
        let (old, new) = (td.tg_trigtuple, td.tg_newtuple);
        match trigger.op() {
            Ok(PgTriggerOperation::Insert | PgTriggerOperation::Delete) => id_text(old, tupdesc, id_attno).into_iter().collect(),
            Ok(PgTriggerOperation::Update) => {
                let before = id_text(old, tupdesc, id_attno);
                let after = id_text(new, tupdesc, id_attno);
                if before != after {
                    before.into_iter().chain(after).collect()
                } else {
                    let attnos: Vec<i32> = if watched.is_empty() {
                        (1..=(*tupdesc).natts).filter(|&n| !attribute(tupdesc, n).attisdropped).collect()
                    } else {
                        watched.iter().map(|c| attno_of(tupdesc, c)).collect()
                    };
                    if changed(old, new, tupdesc, &attnos) { after.into_iter().collect() } else { Vec::new() }
                }
            }
            _ => misuse("fired for an unsupported event"),
        }
    };
    append_to_inbox(kind, &ids);
    Ok(None)
}

const LOCK_KIND_SHARE: &str = "SELECT 1 FROM outbox.kinds WHERE kind = $1 FOR SHARE";
const TABLE_INFO: &str = "SELECT c.relkind::text, c.oid::regclass::text FROM pg_catalog.pg_class c WHERE c.oid = $1";
const COLUMN_EXISTS: &str = "
SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                WHERE attrelid = $1 AND attname = $2 AND attnum > 0 AND NOT attisdropped)";
/// The single-column primary key, if the table has one.
const PRIMARY_KEY_COLUMNS: &str = "
SELECT a.attname::text
  FROM pg_catalog.pg_index i
  JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
 WHERE i.indrelid = $1 AND i.indisprimary";
/// Tracking triggers of kind $1 (the kind is their first argument), on table
/// $2, or on every table when $2 is NULL.
const KIND_TRIGGERS: &str = "
SELECT t.tgrelid::regclass::text, t.tgname::text
  FROM pg_catalog.pg_trigger t
 WHERE t.tgfoid = 'outbox.enqueue_trigger()'::regprocedure
   AND ($2::oid IS NULL OR t.tgrelid = $2)
   AND t.tgnargs >= 1
   AND pg_catalog.split_part(pg_catalog.encode(t.tgargs, 'escape'), E'\\\\000', 1) = $1
 ORDER BY 1, 2";

/// `outbox_<kind>`, shortened with a hash to fit in 63 bytes.
fn trigger_base_name(kind: &str) -> String {
    let full = format!("outbox_{kind}");
    if full.len() <= 63 {
        return full;
    }
    let hash = kind.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    let mut cut = 50;
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}_{:08x}", &full[..cut], hash as u32)
}

/// (table, trigger name) of each trigger tracking `kind`, on `tbl` or anywhere.
pub(crate) fn kind_triggers(c: &pgrx::spi::SpiClient<'_>, kind: &str, tbl: Option<pg_sys::Oid>) -> Vec<(String, String)> {
    let tbl = tbl.map_or(pgrx::datum::DatumWithOid::null::<pg_sys::Oid>(), Into::into);
    c.select(KIND_TRIGGERS, None, &[kind.into(), tbl])
        .unwrap_or_else(|e| panic!("listing triggers: {e}"))
        .filter_map(|r| Some((r.get::<String>(1).ok()??, r.get::<String>(2).ok()??)))
        .collect()
}

pub(crate) fn drop_triggers(c: &mut pgrx::spi::SpiClient<'_>, triggers: &[(String, String)]) {
    for (table, name) in triggers {
        let sql = format!("DROP TRIGGER {} ON {table}", quote_identifier(name));
        c.update(sql.as_str(), None, &[]).unwrap_or_else(|e| panic!("dropping trigger: {e}"));
    }
}

/// Drops the triggers tracking `kind` on `tbl`; returns how many there were.
fn drop_kind_triggers(c: &mut pgrx::spi::SpiClient<'_>, tbl: pg_sys::Oid, kind: &str) -> usize {
    let triggers = kind_triggers(c, kind, Some(tbl));
    drop_triggers(c, &triggers);
    triggers.len()
}

/// Resolves the table and checks it can be tracked: returns its quoted name.
fn table_name(c: &pgrx::spi::SpiClient<'_>, tbl: pg_sys::Oid) -> String {
    let row = c.select(TABLE_INFO, None, &[tbl.into()]).unwrap_or_else(|e| panic!("reading pg_class: {e}"));
    let (relkind, name) = match row.first().get_two::<String, String>() {
        Ok((Some(k), Some(n))) => (k, n),
        _ => raise(PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE, format!("relation with OID {tbl:?} does not exist"), None),
    };
    if relkind != "r" && relkind != "p" {
        raise(
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            format!("\"{name}\" is not a table"),
            Some("Only ordinary and partitioned tables can be tracked."),
        );
    }
    name
}

#[pg_extern(sql = "
CREATE FUNCTION outbox.track(tbl regclass, kind text, id_column name DEFAULT NULL, columns name[] DEFAULT NULL)
RETURNS text VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
")]
fn track(tbl: Option<pg_sys::Oid>, kind: Option<&str>, id_column: Option<&CStr>, columns: Option<Array<&CStr>>) -> String {
    let tbl = require(tbl, "tbl");
    let kind = require_kind(kind);
    let columns: Option<Vec<String>> = columns.map(|a| {
        a.iter()
            .map(|c| match c {
                Some(c) => c.to_string_lossy().into_owned(),
                None => raise(PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED, "columns must not contain NULL", None),
            })
            .collect()
    });
    Spi::connect_mut(|c| {
        if c.update(LOCK_KIND_SHARE, None, &[kind.into()]).map(|t| t.is_empty()).unwrap_or(true) {
            unknown_kind(kind);
        }
        let table = table_name(c, tbl);
        let column_exists = |c: &pgrx::spi::SpiClient<'_>, col: &str| -> bool {
            c.select(COLUMN_EXISTS, None, &[tbl.into(), col.into()])
                .ok()
                .and_then(|t| t.first().get_one::<bool>().ok().flatten())
                .unwrap_or(false)
        };
        let id_column = match id_column {
            Some(col) => {
                let col = col.to_string_lossy().into_owned();
                if !column_exists(c, &col) {
                    raise(
                        PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                        format!("column \"{col}\" of relation {table} does not exist"),
                        None,
                    );
                }
                col
            }
            None => {
                let pk: Vec<String> = c
                    .select(PRIMARY_KEY_COLUMNS, None, &[tbl.into()])
                    .unwrap_or_else(|e| panic!("reading primary key: {e}"))
                    .filter_map(|r| r.get::<String>(1).ok().flatten())
                    .collect();
                if pk.len() != 1 {
                    raise(
                        PgSqlErrorCode::ERRCODE_INVALID_TABLE_DEFINITION,
                        format!("{table} has no single-column primary key"),
                        Some("Name the id column: outbox.track(tbl, kind, id_column => 'col')."),
                    );
                }
                pk.into_iter().next().expect("one column")
            }
        };
        let mut watched: Vec<String> = Vec::new();
        if let Some(cols) = &columns {
            if cols.is_empty() {
                raise(
                    PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                    "columns must not be empty",
                    Some("Pass NULL to react to a change of any column."),
                );
            }
            for col in cols {
                if !column_exists(c, col) {
                    raise(
                        PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                        format!("column \"{col}\" of relation {table} does not exist"),
                        None,
                    );
                }
                if !watched.contains(col) {
                    watched.push(col.clone());
                }
            }
        }
        // Tracking again replaces the triggers, e.g. to change the columns.
        drop_kind_triggers(c, tbl, kind);
        let name = trigger_base_name(kind);
        let mut args = vec![quote_literal(kind), quote_literal(&id_column)];
        args.extend(watched.iter().map(quote_literal));
        let sql = format!(
            "CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {table}
             FOR EACH ROW EXECUTE FUNCTION outbox.enqueue_trigger({})",
            quote_identifier(&name),
            args.join(", ")
        );
        c.update(sql.as_str(), None, &[]).unwrap_or_else(|e| panic!("creating trigger: {e}"));
        name
    })
}

#[pg_extern(sql = "
CREATE FUNCTION outbox.untrack(tbl regclass, kind text)
RETURNS void VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
")]
fn untrack(tbl: Option<pg_sys::Oid>, kind: Option<&str>) {
    let tbl = require(tbl, "tbl");
    let kind = require_kind(kind);
    Spi::connect_mut(|c| {
        let table = table_name(c, tbl);
        if drop_kind_triggers(c, tbl, kind) == 0 {
            raise(
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                format!("{table} is not tracked for kind \"{kind}\""),
                None,
            );
        }
    });
}

#[cfg(test)]
mod unit {
    use super::trigger_base_name;

    #[test]
    fn base_names_fit() {
        assert_eq!(trigger_base_name("user"), "outbox_user");
        let long = trigger_base_name(&"é".repeat(100));
        assert!(long.len() <= 63, "{long}");
        assert_ne!(trigger_base_name(&"a".repeat(80)), trigger_base_name(&"a".repeat(81)));
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::testing::sqlstate_of;
    use pgrx::prelude::*;

    fn ids() -> Vec<String> {
        Spi::connect(|c| {
            c.select("SELECT id FROM outbox.inbox ORDER BY id", None, &[])
                .unwrap()
                .map(|r| r.get::<String>(1).unwrap().unwrap())
                .collect()
        })
    }

    fn reset() {
        Spi::run("DELETE FROM outbox.inbox").unwrap();
        super::forget_appended();
    }

    #[pg_test]
    fn tracks_insert_update_delete() {
        Spi::run("SELECT outbox.register('user', 'http://h/{id}')").unwrap();
        Spi::run("CREATE TABLE public.users (id bigint PRIMARY KEY, name text, seen timestamptz, doc json)").unwrap();
        let name = Spi::get_one::<String>("SELECT outbox.track('public.users', 'user')").unwrap();
        assert_eq!(name.as_deref(), Some("outbox_user"));
        Spi::run("INSERT INTO public.users VALUES (1, 'a', now(), '{}'), (2, 'b', now(), '[]')").unwrap();
        assert_eq!(ids(), ["1", "2"]);
        reset();
        // An UPDATE that changes nothing enqueues nothing (json has no equality).
        Spi::run("UPDATE public.users SET name = name, doc = doc").unwrap();
        assert!(ids().is_empty());
        Spi::run("UPDATE public.users SET name = 'c' WHERE id = 2").unwrap();
        assert_eq!(ids(), ["2"]);
        reset();
        // A change of id enqueues both ids.
        Spi::run("UPDATE public.users SET id = 10 WHERE id = 1").unwrap();
        assert_eq!(ids(), ["1", "10"]);
        reset();
        Spi::run("DELETE FROM public.users WHERE id = 2").unwrap();
        assert_eq!(ids(), ["2"]);
        reset();
        // Bulk: one entry per row.
        Spi::run("INSERT INTO public.users SELECT g, 'x' FROM generate_series(100, 1099) g").unwrap();
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM outbox.inbox").unwrap(), Some(1000));
        // Within a transaction, the same records again add nothing.
        Spi::run("UPDATE public.users SET name = 'y' WHERE id >= 100").unwrap();
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM outbox.inbox").unwrap(), Some(1000));
        // The jobs view shows not-yet-absorbed entries as pending.
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM outbox.jobs WHERE state = 'pending' AND job_id IS NULL").unwrap(),
            Some(1000)
        );
    }

    #[pg_test]
    fn column_filter_and_weird_identifiers() {
        Spi::run("SELECT outbox.register('w', 'http://h/{id}')").unwrap();
        Spi::run(r#"CREATE TABLE public."We""ird" ("We""ird" text PRIMARY KEY, "Watched col" int, other int)"#).unwrap();
        Spi::run(r#"SELECT outbox.track('public."We""ird"', 'w', columns => ARRAY['Watched col']::name[])"#).unwrap();
        Spi::run(r#"INSERT INTO public."We""ird" VALUES ('a''b', 1, 1)"#).unwrap();
        assert_eq!(ids(), ["a'b"]);
        reset();
        Spi::run(r#"UPDATE public."We""ird" SET other = 2"#).unwrap();
        assert!(ids().is_empty());
        Spi::run(r#"UPDATE public."We""ird" SET "Watched col" = 2"#).unwrap();
        assert_eq!(ids(), ["a'b"]);
        reset();
        // Explicit id column, on a table without a primary key.
        Spi::run("CREATE TABLE public.nopk (code text, v int)").unwrap();
        assert_eq!(sqlstate_of("SELECT outbox.track('public.nopk', 'w')"), "42P16");
        Spi::run("SELECT outbox.track('public.nopk', 'w', id_column => 'code')").unwrap();
        Spi::run("INSERT INTO public.nopk VALUES ('z', 1), (NULL, 2)").unwrap();
        assert_eq!(ids(), ["z"]);
    }

    #[pg_test]
    fn track_again_replaces_and_untrack_removes() {
        Spi::run("SELECT outbox.register('user', 'http://h/{id}')").unwrap();
        Spi::run("CREATE TABLE public.users (id int PRIMARY KEY, a int, b int)").unwrap();
        Spi::run("SELECT outbox.track('public.users', 'user', columns => '{a}')").unwrap();
        Spi::run("SELECT outbox.track('public.users', 'user', columns => '{b}')").unwrap();
        let n = Spi::get_one::<i64>("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.users'::regclass").unwrap();
        assert_eq!(n, Some(1));
        Spi::run("INSERT INTO public.users VALUES (1, 1, 1)").unwrap();
        reset();
        Spi::run("UPDATE public.users SET a = 2").unwrap();
        assert!(ids().is_empty());
        Spi::run("UPDATE public.users SET b = 2").unwrap();
        assert_eq!(ids(), ["1"]);
        Spi::run("SELECT outbox.untrack('public.users', 'user')").unwrap();
        let n = Spi::get_one::<i64>("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.users'::regclass").unwrap();
        assert_eq!(n, Some(0));
        assert_eq!(sqlstate_of("SELECT outbox.untrack('public.users', 'user')"), "42704");
    }

    #[pg_test]
    fn track_rejects_bad_input() {
        Spi::run("SELECT outbox.register('user', 'http://h/{id}')").unwrap();
        Spi::run("CREATE TABLE public.users (id int PRIMARY KEY, a int)").unwrap();
        Spi::run("CREATE VIEW public.v AS SELECT * FROM public.users").unwrap();
        let cases = [
            ("SELECT outbox.track(NULL, 'user')", "22004"),
            ("SELECT outbox.track('public.users', NULL)", "22004"),
            ("SELECT outbox.track('public.users', 'nope')", "42704"),
            ("SELECT outbox.track('public.nope', 'user')", "42P01"),
            ("SELECT outbox.track('public.v', 'user')", "42809"),
            ("SELECT outbox.track('public.users', 'user', id_column => 'nope')", "42703"),
            ("SELECT outbox.track('public.users', 'user', columns => '{nope}')", "42703"),
            ("SELECT outbox.track('public.users', 'user', columns => '{}')", "22023"),
            ("SELECT outbox.track('public.users', 'user', columns => '{a,NULL}')", "22004"),
            ("CREATE TRIGGER t AFTER INSERT ON public.users FOR EACH STATEMENT EXECUTE FUNCTION outbox.enqueue_trigger('user', 'id')", "00000"),
            ("INSERT INTO public.users VALUES (1, 1)", "0A000"),
            ("DROP TRIGGER t ON public.users", "00000"),
            ("CREATE TRIGGER t BEFORE INSERT ON public.users FOR EACH ROW EXECUTE FUNCTION outbox.enqueue_trigger('user', 'id')", "00000"),
            ("INSERT INTO public.users VALUES (1, 1)", "0A000"),
            ("DROP TRIGGER t ON public.users", "00000"),
            ("CREATE TRIGGER t AFTER INSERT ON public.users FOR EACH ROW EXECUTE FUNCTION outbox.enqueue_trigger('user')", "00000"),
            ("INSERT INTO public.users VALUES (1, 1)", "0A000"),
            ("DROP TRIGGER t ON public.users", "00000"),
            ("CREATE TRIGGER t AFTER INSERT ON public.users FOR EACH ROW EXECUTE FUNCTION outbox.enqueue_trigger('user', 'nope')", "00000"),
            ("INSERT INTO public.users VALUES (1, 1)", "42703"),
            ("DROP TRIGGER t ON public.users", "00000"),
            ("CREATE TABLE public.long_ids (id text PRIMARY KEY)", "00000"),
            ("SELECT outbox.track('public.long_ids', 'user')", "00000"),
            ("INSERT INTO public.long_ids VALUES (repeat('x', 1025))", "22001"),
            ("INSERT INTO public.long_ids VALUES ('')", "22023"),
            ("INSERT INTO public.long_ids VALUES (repeat('x', 1024))", "00000"),
        ];
        crate::testing::assert_sqlstates(&cases);
    }
}
