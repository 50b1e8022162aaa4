//! `track` / `untrack` and the `enqueue_trigger` trigger function.
//!
//! `track` creates one `AFTER INSERT OR UPDATE OR DELETE ... FOR EACH ROW`
//! trigger. The trigger function is plain C-level code: it compares the old
//! and new row itself and hands the changed id to [`crate::inbox`], which
//! writes `outbox.inbox` with direct heap inserts, many ids a row: no SPI, no
//! planner, no index to maintain. That keeps a tracked single-row UPDATE
//! nearly as cheap as an untracked one, and a bulk UPDATE free of per-row
//! round trips. The worker moves the inbox into the queue, coalescing as it
//! goes (see `worker::queue::ABSORB_INBOX`).

use crate::errors::{raise, require, require_kind, unknown_kind};
use pgrx::prelude::*;
use pgrx::spi::{quote_identifier, quote_literal};
use pgrx::Array;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{CStr, CString};

/// What a tracking trigger needs per row, worked out from its arguments once
/// per transaction (and again if the table's columns moved under it).
struct TrackInfo {
    kind: String,
    id: Column,
    /// The watched columns; empty for "any column".
    watched: Vec<Column>,
}

struct Column {
    name: CString,
    attno: i32,
    typid: pg_sys::Oid,
    /// The type's output function.
    output: pg_sys::Oid,
}

thread_local! {
    /// By trigger oid. Cleared at transaction end.
    static TRACK_INFO: RefCell<HashMap<pg_sys::Oid, TrackInfo>> = RefCell::new(HashMap::new());
}

pub(crate) fn forget_track_info() {
    TRACK_INFO.with(|t| {
        if let Ok(mut t) = t.try_borrow_mut() {
            t.clear();
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
/// As for [`attr`]; `id` must be current for `tupdesc` ([`TrackInfo::current`]).
unsafe fn id_text(tuple: *mut pg_sys::HeapTupleData, tupdesc: pg_sys::TupleDesc, id: &Column) -> Option<String> {
    // SAFETY: guaranteed by the caller.
    let datum = unsafe { attr(tuple, tupdesc, id.attno) }?;
    // SAFETY: the output function of the column's type returns a palloc'd C string.
    unsafe {
        let cstr = pg_sys::OidOutputFunctionCall(id.output, datum);
        Some(CStr::from_ptr(cstr).to_string_lossy().into_owned())
    }
}

/// Whether any of `attnos` differs between the two rows, by binary image
/// (so it works for every type, json and point included).
///
/// # Safety
/// Both tuples must be rows of `tupdesc`; every attno must be in range.
unsafe fn changed(old: *mut pg_sys::HeapTupleData, new: *mut pg_sys::HeapTupleData, tupdesc: pg_sys::TupleDesc, attnos: impl IntoIterator<Item = i32>) -> bool {
    attnos.into_iter().any(|n| {
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

impl Column {
    /// Looks a column up by name, or raises an ERROR naming it.
    ///
    /// # Safety
    /// `tupdesc` must be valid.
    unsafe fn find(tupdesc: pg_sys::TupleDesc, name: &CStr) -> Column {
        // SAFETY: SPI_fnumber only reads the descriptor.
        let attno = unsafe { pg_sys::SPI_fnumber(tupdesc, name.as_ptr()) };
        if attno <= 0 {
            raise(
                PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                format!("outbox.enqueue_trigger: column \"{}\" does not exist", name.to_string_lossy()),
                Some("The tracked table changed; call outbox.track(table, kind, ...) again."),
            );
        }
        // SAFETY: attno is in range (SPI_fnumber found it).
        let typid = unsafe { attribute(tupdesc, attno).atttypid };
        let (mut output, mut varlena) = (pg_sys::InvalidOid, false);
        // SAFETY: a syscache lookup of a valid type.
        unsafe { pg_sys::getTypeOutputInfo(typid, &mut output, &mut varlena) };
        Column { name: name.to_owned(), attno, typid, output }
    }

    /// Whether the column still sits at `attno` with the same type.
    ///
    /// # Safety
    /// `tupdesc` must be valid.
    unsafe fn current(&self, tupdesc: pg_sys::TupleDesc) -> bool {
        // SAFETY: attno is checked against natts first.
        self.attno <= unsafe { (*tupdesc).natts } && unsafe {
            let a = attribute(tupdesc, self.attno);
            !a.attisdropped && a.atttypid == self.typid && CStr::from_ptr(a.attname.data.as_ptr()) == self.name.as_c_str()
        }
    }
}

impl TrackInfo {
    /// From the trigger's arguments: (kind, id_column [, column ...]).
    ///
    /// # Safety
    /// `trigger` and `tupdesc` must be the fired trigger and its table's descriptor.
    unsafe fn new(trigger: &pg_sys::Trigger, tupdesc: pg_sys::TupleDesc) -> TrackInfo {
        // SAFETY: tgargs holds tgnargs C strings.
        let args: Vec<&CStr> = (0..trigger.tgnargs as usize).map(|i| unsafe { CStr::from_ptr(*trigger.tgargs.add(i)) }).collect();
        if args.len() < 2 {
            misuse("needs the arguments (kind, id_column [, column ...])");
        }
        // SAFETY: guaranteed by the caller.
        unsafe {
            TrackInfo {
                kind: args[0].to_string_lossy().into_owned(),
                id: Column::find(tupdesc, args[1]),
                watched: args[2..].iter().map(|c| Column::find(tupdesc, c)).collect(),
            }
        }
    }

    /// # Safety
    /// `tupdesc` must be valid.
    unsafe fn current(&self, tupdesc: pg_sys::TupleDesc) -> bool {
        // SAFETY: guaranteed by the caller.
        unsafe { self.id.current(tupdesc) && self.watched.iter().all(|c| c.current(tupdesc)) }
    }
}

fn misuse(what: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
        format!("outbox.enqueue_trigger {what}"),
        Some("Create tracking triggers with outbox.track(table, kind)."),
    )
}

#[pg_trigger(sql = "
CREATE FUNCTION outbox.enqueue_trigger() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
")]
fn enqueue_trigger<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, std::convert::Infallible> {
    if !matches!(trigger.level(), PgTriggerLevel::Row) || !matches!(trigger.when(), Ok(PgTriggerWhen::After)) {
        misuse("must fire AFTER ... FOR EACH ROW");
    }
    let op = match trigger.op() {
        Ok(op @ (PgTriggerOperation::Insert | PgTriggerOperation::Update | PgTriggerOperation::Delete)) => op,
        _ => misuse("fired for an unsupported event"),
    };
    let td = trigger.trigger_data();
    // SAFETY: Postgres hands us the fired trigger, row(s) and the table's
    // descriptor; they stay valid for this call. Attribute numbers come from
    // SPI_fnumber and are checked against the descriptor before each use.
    unsafe {
        let tupdesc = (*td.tg_relation).rd_att;
        let tg = &*td.tg_trigger;
        TRACK_INFO.with(|cache| {
            let mut cache = cache.borrow_mut();
            if !cache.get(&tg.tgoid).is_some_and(|info| info.current(tupdesc)) {
                cache.insert(tg.tgoid, TrackInfo::new(tg, tupdesc));
            }
            let info = &cache[&tg.tgoid];
            let (old, new) = (td.tg_trigtuple, td.tg_newtuple);
            let ids: Vec<String> = match op {
                PgTriggerOperation::Update => {
                    let before = id_text(old, tupdesc, &info.id);
                    let after = id_text(new, tupdesc, &info.id);
                    if before != after {
                        before.into_iter().chain(after).collect()
                    } else {
                        let any_change = if info.watched.is_empty() {
                            changed(old, new, tupdesc, (1..=(*tupdesc).natts).filter(|&n| !attribute(tupdesc, n).attisdropped))
                        } else {
                            changed(old, new, tupdesc, info.watched.iter().map(|c| c.attno))
                        };
                        if any_change { after.into_iter().collect() } else { Vec::new() }
                    }
                }
                _ => id_text(old, tupdesc, &info.id).into_iter().collect(),
            };
            for id in ids {
                crate::inbox::append(&info.kind, id);
            }
        })
    }
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
            c.select("SELECT u.id FROM outbox.inbox, unnest(ids) AS u(id) ORDER BY 1", None, &[])
                .unwrap()
                .map(|r| r.get::<String>(1).unwrap().unwrap())
                .collect()
        })
    }

    fn reset() {
        Spi::run("DELETE FROM outbox.inbox").unwrap();
        crate::inbox::forget();
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
        let entries = || Spi::get_one::<i64>("SELECT count(*) FROM outbox.inbox, unnest(ids)").unwrap();
        Spi::run("INSERT INTO public.users SELECT g, 'x' FROM generate_series(100, 1099) g").unwrap();
        assert_eq!(entries(), Some(1000));
        // Within a transaction, the same records again add nothing.
        Spi::run("UPDATE public.users SET name = 'y' WHERE id >= 100").unwrap();
        assert_eq!(entries(), Some(1000));
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

    fn inbox_rows() -> i64 {
        Spi::get_one::<i64>("SELECT count(*) FROM outbox.inbox").unwrap().unwrap()
    }

    #[pg_test]
    fn a_bulk_statement_writes_every_id_in_few_inbox_rows() {
        Spi::run("SELECT outbox.register('user', 'http://h/{id}')").unwrap();
        Spi::run("CREATE TABLE public.users (id bigint PRIMARY KEY, v int)").unwrap();
        Spi::run("SELECT outbox.track('public.users', 'user')").unwrap();
        let every = |n: i64| Spi::get_one::<bool>(&format!(
            "SELECT array_agg(u.id::bigint ORDER BY u.id::bigint) = array(SELECT generate_series(1, {n})::bigint)
               FROM outbox.inbox, unnest(ids) AS u(id)"
        )).unwrap().unwrap();
        Spi::run("INSERT INTO public.users SELECT g, 0 FROM generate_series(1, 5000) g").unwrap();
        // Visible to the next statement, each id once, about ROW_BYTES of ids a row.
        assert!(every(5000));
        let rows = inbox_rows();
        assert!((20..=60).contains(&rows), "{rows} inbox rows for 5000 ids");
        reset();
        Spi::run("UPDATE public.users SET v = 1").unwrap();
        assert!(every(5000));
        // Repeats within the transaction are not written again.
        Spi::run("UPDATE public.users SET v = 2").unwrap();
        assert!(every(5000));
    }

    #[pg_test]
    fn a_rolled_back_subtransaction_drops_only_its_own_changes() {
        Spi::run("SELECT outbox.register('user', 'http://h/{id}')").unwrap();
        Spi::run("SELECT outbox.register('other', 'http://h/{id}')").unwrap();
        Spi::run("CREATE TABLE public.a (id int PRIMARY KEY, v int)").unwrap();
        Spi::run("CREATE TABLE public.b (id int PRIMARY KEY, v int)").unwrap();
        Spi::run("INSERT INTO public.a SELECT g, 0 FROM generate_series(1, 3) g").unwrap();
        Spi::run("INSERT INTO public.b VALUES (100, 0)").unwrap();
        Spi::run("SELECT outbox.track('public.a', 'user')").unwrap();
        Spi::run("SELECT outbox.track('public.b', 'other')").unwrap();
        let r = crate::subxact::try_subtransaction(|| {
            Spi::run("UPDATE public.a SET v = 1 WHERE id = 1").unwrap();
            panic!("roll the subtransaction back");
        });
        assert!(r.is_err());
        assert!(ids().is_empty());
        // After each row of a, our trigger buffers its id, then zz_touch
        // writes b in a block that rolls back. The block's statement ends
        // inside the block's subtransaction: a's buffered ids must not be
        // written there, or the rollback would take them along.
        Spi::run(
            "CREATE FUNCTION public.touch_b() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 BEGIN
                     UPDATE public.b SET v = v + 1;
                     RAISE EXCEPTION 'undo';
                 EXCEPTION WHEN raise_exception THEN NULL;
                 END;
                 RETURN NULL;
             END $$;
             CREATE TRIGGER zz_touch AFTER UPDATE ON public.a FOR EACH ROW EXECUTE FUNCTION public.touch_b()",
        )
        .unwrap();
        Spi::run("UPDATE public.a SET v = 2").unwrap();
        assert_eq!(ids(), ["1", "2", "3"]);
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM outbox.inbox WHERE kind = 'other'").unwrap(), Some(0));
    }

    #[pg_test]
    fn a_renamed_id_column_is_noticed_within_the_transaction() {
        Spi::run("SELECT outbox.register('user', 'http://h/{id}')").unwrap();
        Spi::run("CREATE TABLE public.users (id int PRIMARY KEY, a int)").unwrap();
        Spi::run("SELECT outbox.track('public.users', 'user')").unwrap();
        Spi::run("INSERT INTO public.users VALUES (1, 1)").unwrap();
        assert_eq!(ids(), ["1"]);
        Spi::run("ALTER TABLE public.users RENAME COLUMN id TO uid").unwrap();
        crate::testing::assert_sqlstates(&[("INSERT INTO public.users VALUES (2, 1)", "42703")]);
    }
}
