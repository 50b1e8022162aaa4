//! `track` / `untrack` and the `enqueue_trigger` trigger function.
//!
//! `track` creates one `AFTER INSERT OR UPDATE OR DELETE ... FOR EACH ROW`
//! trigger. The trigger function is plain C-level code: it compares the old
//! and new row itself and hands the changed id to [`crate::capture::inbox`], which
//! writes `outbox.inbox` with direct heap inserts, many ids a row: no SPI, no
//! planner, no index to maintain. That keeps a tracked single-row UPDATE
//! nearly as cheap as an untracked one, and a bulk UPDATE free of per-row
//! round trips. The worker moves the inbox into the queue, coalescing as it
//! goes (see `worker::queue::ABSORB_INBOX`).
//!
//! A TRUNCATE deletes every row without firing row triggers, so `track` also
//! creates a `BEFORE TRUNCATE ... FOR EACH STATEMENT` trigger, on the table
//! and on each of its partitions (statement triggers are not inherited). It
//! fires once the TRUNCATE holds its locks, and hands over the id of every
//! row about to go, as a DELETE of each would.

use crate::pg::errors::{raise, require, require_kind, unknown_kind};
use pgrx::prelude::*;
use pgrx::spi::{quote_identifier, quote_literal};
use pgrx::{Array, PgList};
use std::cell::RefCell;
use std::ffi::{CStr, CString};

/// What a tracking trigger needs per row, worked out from its arguments once
/// per backend, and again if the arguments or the table's columns changed
/// under it (a trigger oid used again for another trigger, a column dropped
/// or its type changed).
struct TrackInfo {
    /// The trigger's arguments this was worked out from.
    args: Vec<CString>,
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
    /// By trigger oid. Checked against the trigger and its table on each use.
    static TRACK_INFO: RefCell<foldhash::HashMap<pg_sys::Oid, TrackInfo>> = RefCell::new(foldhash::HashMap::default());
}

/// More tracking triggers than a backend fires in practice: past it, the
/// map starts again (triggers dropped long ago leave entries behind).
const TRACK_INFO_MOST: usize = 1000;

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
    // SAFETY: the descriptor holds natts full attributes (after natts
    // compact ones, from PostgreSQL 18); the caller keeps attno in range.
    unsafe {
        #[cfg(not(feature = "pg18"))]
        let first = (*tupdesc).attrs.as_ptr();
        #[cfg(feature = "pg18")]
        let first: *const pg_sys::FormData_pg_attribute =
            (*tupdesc).compact_attrs.as_ptr().add((*tupdesc).natts as usize).cast();
        &*first.add((attno - 1) as usize)
    }
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

    /// Like [`Column::find`], for the id column: its type must print alike
    /// in every session (checked again whenever the table's columns change,
    /// since the cached column is looked up again then).
    ///
    /// # Safety
    /// `tupdesc` must be valid.
    unsafe fn find_id(tupdesc: pg_sys::TupleDesc, name: &CStr) -> Column {
        // SAFETY: the caller's contract.
        let column = unsafe { Column::find(tupdesc, name) };
        crate::capture::ids::require_canonical(&name.to_string_lossy(), column.typid);
        column
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
        // SAFETY: guaranteed by the caller.
        let args = unsafe { trigger_args(trigger) };
        // SAFETY: guaranteed by the caller.
        unsafe {
            TrackInfo {
                args: args.iter().map(|a| (*a).to_owned()).collect(),
                kind: args[0].to_string_lossy().into_owned(),
                id: Column::find_id(tupdesc, args[1]),
                watched: args[2..].iter().map(|c| Column::find(tupdesc, c)).collect(),
            }
        }
    }

    /// Whether this still describes `trigger` on a table of `tupdesc`.
    ///
    /// # Safety
    /// `trigger` and `tupdesc` must be the fired trigger and its table's descriptor.
    unsafe fn current(&self, trigger: &pg_sys::Trigger, tupdesc: pg_sys::TupleDesc) -> bool {
        // SAFETY: guaranteed by the caller.
        unsafe {
            raw_args(trigger).eq(self.args.iter().map(CString::as_c_str))
                && self.id.current(tupdesc)
                && self.watched.iter().all(|c| c.current(tupdesc))
        }
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
    let td = trigger.trigger_data();
    let row_level = matches!(trigger.level(), PgTriggerLevel::Row);
    let op = trigger.op();
    if !row_level && matches!(trigger.when(), Ok(PgTriggerWhen::Before)) && matches!(op, Ok(PgTriggerOperation::Truncate)) {
        // SAFETY: Postgres hands us the fired trigger and its table.
        unsafe { truncated(&*td.tg_trigger, (*td.tg_relation).rd_id) };
        return Ok(None);
    }
    if !row_level || !matches!(trigger.when(), Ok(PgTriggerWhen::After)) {
        misuse("must fire AFTER ... FOR EACH ROW, or BEFORE TRUNCATE ... FOR EACH STATEMENT");
    }
    let op = match op {
        Ok(op @ (PgTriggerOperation::Insert | PgTriggerOperation::Update | PgTriggerOperation::Delete)) => op,
        _ => misuse("fired for an unsupported event"),
    };
    // SAFETY: Postgres hands us the fired trigger, row(s) and the table's
    // descriptor; they stay valid for this call. Attribute numbers come from
    // SPI_fnumber and are checked against the descriptor before each use.
    unsafe {
        let tupdesc = (*td.tg_relation).rd_att;
        let tg = &*td.tg_trigger;
        TRACK_INFO.with(|cache| {
            let mut cache = cache.borrow_mut();
            if !cache.get(&tg.tgoid).is_some_and(|info| info.current(tg, tupdesc)) {
                if cache.len() >= TRACK_INFO_MOST {
                    cache.clear();
                }
                cache.insert(tg.tgoid, TrackInfo::new(tg, tupdesc));
            }
            let info = &cache[&tg.tgoid];
            let (old, new) = (td.tg_trigtuple, td.tg_newtuple);
            let ids: Vec<String> = match op {
                PgTriggerOperation::Update => {
                    // Equal images print alike: one output call, not two.
                    if changed(old, new, tupdesc, [info.id.attno]) {
                        id_text(old, tupdesc, &info.id).into_iter().chain(id_text(new, tupdesc, &info.id)).collect()
                    } else {
                        let any_change = if info.watched.is_empty() {
                            changed(old, new, tupdesc, (1..=(*tupdesc).natts).filter(|&n| !attribute(tupdesc, n).attisdropped))
                        } else {
                            changed(old, new, tupdesc, info.watched.iter().map(|c| c.attno))
                        };
                        if any_change { id_text(new, tupdesc, &info.id).into_iter().collect() } else { Vec::new() }
                    }
                }
                _ => id_text(old, tupdesc, &info.id).into_iter().collect(),
            };
            for id in ids {
                crate::capture::inbox::append(&info.kind, id, None);
            }
        })
    }
    Ok(None)
}

/// The trigger's arguments as Postgres holds them, without allocating.
///
/// # Safety
/// `trigger` must be a fired trigger.
unsafe fn raw_args(trigger: &pg_sys::Trigger) -> impl Iterator<Item = &CStr> {
    // SAFETY: tgargs holds tgnargs C strings.
    (0..trigger.tgnargs as usize).map(|i| unsafe { CStr::from_ptr(*trigger.tgargs.add(i)) })
}

/// The trigger's arguments: (kind, id_column [, column ...]), at least two.
///
/// # Safety
/// `trigger` must be a fired trigger.
unsafe fn trigger_args(trigger: &pg_sys::Trigger) -> Vec<&CStr> {
    // SAFETY: guaranteed by the caller.
    let args: Vec<&CStr> = unsafe { raw_args(trigger) }.collect();
    if args.len() < 2 {
        misuse("needs the arguments (kind, id_column [, column ...])");
    }
    // A kind no `register` could accept would only fail the worker's absorb.
    let kind = args[0].to_bytes();
    if kind.is_empty() || kind.len() > crate::pg::errors::MAX_KIND_LEN {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("outbox.enqueue_trigger: a kind is 1 to {} bytes long, not {}", crate::pg::errors::MAX_KIND_LEN, kind.len()),
            Some("Create tracking triggers with outbox.track(table, kind)."),
        );
    }
    args
}

/// The tables whose rows the TRUNCATE trigger $2 on table $1 hands over: $1
/// itself when it holds rows, and the leaf partitions under it that have no
/// such trigger of their own (the same arguments; attached after `track`).
/// Those that have one hand over their own rows, as their trigger fires too.
const TRUNCATED_TABLES: &str = "
SELECT $1
 WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_partition_tree($1))
UNION ALL
SELECT t.relid::oid
  FROM pg_catalog.pg_partition_tree($1) t
  JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) t.relid
 WHERE t.isleaf
   AND c.relkind OPERATOR(pg_catalog.=) 'r'
   AND NOT EXISTS (
        SELECT FROM pg_catalog.pg_trigger g
         WHERE g.tgrelid OPERATOR(pg_catalog.=) t.relid
           AND g.tgrelid OPERATOR(pg_catalog.<>) $1
           AND g.tgfoid OPERATOR(pg_catalog.=) 'outbox.enqueue_trigger()'::pg_catalog.regprocedure
           AND (g.tgtype OPERATOR(pg_catalog.&) 32) OPERATOR(pg_catalog.<>) 0
           AND g.tgenabled OPERATOR(pg_catalog.<>) 'D'
           AND g.tgargs OPERATOR(pg_catalog.=) (SELECT tgargs FROM pg_catalog.pg_trigger WHERE oid OPERATOR(pg_catalog.=) $2))";

/// BEFORE TRUNCATE of a tracked table: every row is about to go, so every
/// id goes to the inbox, as a DELETE of each row would send it.
///
/// # Safety
/// `trigger` must be the fired TRUNCATE trigger of table `relid`.
unsafe fn truncated(trigger: &pg_sys::Trigger, relid: pg_sys::Oid) {
    // SAFETY: guaranteed by the caller.
    let args = unsafe { trigger_args(trigger) };
    let (kind, id_column) = (args[0].to_string_lossy(), args[1]);
    let tables: Vec<pg_sys::Oid> = with_pinned_search_path(|| {
        Spi::connect(|c| {
            c.select(TRUNCATED_TABLES, None, &[relid.into(), trigger.tgoid.into()])
                .unwrap_or_else(|e| panic!("listing truncated tables: {e}"))
                .filter_map(|r| r.get::<pg_sys::Oid>(1).ok().flatten())
                .collect()
        })
    });
    for table in tables {
        // SAFETY: the TRUNCATE holds an AccessExclusiveLock on each table.
        unsafe { each_id(table, id_column, |id| crate::capture::inbox::append(&kind, id, None)) };
    }
}

/// Calls `f` with the id of every row of `table` (not of its children),
/// formatted as the row trigger formats it; NULL ids are skipped.
///
/// The scan reads the table as it is now, under a fresh snapshot: TRUNCATE
/// removes rows committed after the statement's snapshot was taken too
/// (before it had its lock), and those must be handed over as well. It is a
/// plain scan, below privileges and row-level security, as TRUNCATE is.
///
/// # Safety
/// The caller must hold a lock on `table` that keeps its rows from changing.
unsafe fn each_id(table: pg_sys::Oid, id_column: &CStr, mut f: impl FnMut(String)) {
    // SAFETY: the table is locked; everything opened here is closed before
    // returning, and released by the resource owner if an ERROR ends it early.
    unsafe {
        let rel = pg_sys::table_open(table, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let id = Column::find_id((*rel).rd_att, id_column);
        let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot());
        let scan = pg_sys::table_beginscan(rel, snapshot, 0, std::ptr::null_mut());
        let slot = pg_sys::table_slot_create(rel, std::ptr::null_mut());
        // Each id's text is made in a context reset per row: a table may be big.
        let per_row = pg_sys::AllocSetContextCreateExtended(
            pg_sys::CurrentMemoryContext,
            c"outbox truncate".as_ptr(),
            pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
        );
        while pg_sys::table_scan_getnextslot(scan, pg_sys::ScanDirection::ForwardScanDirection, slot) {
            let mut is_null = false;
            let datum = pg_sys::slot_getattr(slot, id.attno, &mut is_null);
            if is_null {
                continue;
            }
            let outer = pg_sys::MemoryContextSwitchTo(per_row);
            let text = CStr::from_ptr(pg_sys::OidOutputFunctionCall(id.output, datum)).to_string_lossy().into_owned();
            pg_sys::MemoryContextSwitchTo(outer);
            pg_sys::MemoryContextReset(per_row);
            f(text);
        }
        pg_sys::MemoryContextDelete(per_row);
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::table_endscan(scan);
        pg_sys::UnregisterSnapshot(snapshot);
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
}

const LOCK_KIND_SHARE: &str = "SELECT 1 FROM outbox.kinds WHERE kind OPERATOR(pg_catalog.=) $1 FOR SHARE";
const TABLE_INFO: &str = "
SELECT c.relkind::text, c.oid::regclass::text, c.relpersistence OPERATOR(pg_catalog.=) 't'
  FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) $1";
const COLUMN_EXISTS: &str = "
SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                WHERE attrelid OPERATOR(pg_catalog.=) $1 AND attname OPERATOR(pg_catalog.=) $2
                  AND attnum OPERATOR(pg_catalog.>) 0 AND NOT attisdropped)";
/// The single-column primary key, if the table has one.
const PRIMARY_KEY_COLUMNS: &str = "
SELECT a.attname::text
  FROM pg_catalog.pg_index i
  JOIN pg_catalog.pg_attribute a
    ON a.attrelid OPERATOR(pg_catalog.=) i.indrelid AND a.attnum OPERATOR(pg_catalog.=) ANY (i.indkey)
 WHERE i.indrelid OPERATOR(pg_catalog.=) $1 AND i.indisprimary";
/// Tracking triggers of kind $1 (the kind is their first argument), on table
/// $2 and its partitions, or on every table when $2 is NULL. Not the clones
/// of a partitioned table's row trigger: they go with it.
const KIND_TRIGGERS: &str = "
SELECT t.tgrelid::regclass::text, t.tgname::text, t.tgenabled::text
  FROM pg_catalog.pg_trigger t
 WHERE t.tgfoid OPERATOR(pg_catalog.=) 'outbox.enqueue_trigger()'::regprocedure
   AND t.tgparentid OPERATOR(pg_catalog.=) 0
   AND ($2::oid IS NULL OR t.tgrelid OPERATOR(pg_catalog.=) $2
        OR t.tgrelid OPERATOR(pg_catalog.=) ANY (SELECT relid FROM pg_catalog.pg_partition_tree($2)))
   AND t.tgnargs OPERATOR(pg_catalog.>=) 1
   -- tgargs is the arguments, each ending in a NUL byte.
   AND pg_catalog.substring(t.tgargs, 1, pg_catalog.octet_length($1) OPERATOR(pg_catalog.+) 1)
       OPERATOR(pg_catalog.=) (pg_catalog.convert_to($1, pg_catalog.getdatabaseencoding()) OPERATOR(pg_catalog.||) '\\x00'::bytea)
 ORDER BY 1, 2";

/// The constant SQL statements of this module, for the qualification sweep
/// (the DDL built with format!() is checked in this module's unit test).
#[cfg(test)]
pub(crate) const STATEMENTS: &[(&str, &str)] = &[
    ("TRUNCATED_TABLES", TRUNCATED_TABLES),
    ("LOCK_KIND_SHARE", LOCK_KIND_SHARE),
    ("TABLE_INFO", TABLE_INFO),
    ("COLUMN_EXISTS", COLUMN_EXISTS),
    ("PRIMARY_KEY_COLUMNS", PRIMARY_KEY_COLUMNS),
    ("KIND_TRIGGERS", KIND_TRIGGERS),
    ("NEEDING_TRUNCATE_TRIGGER", NEEDING_TRUNCATE_TRIGGER),
    ("ANCESTORS_TRUNCATE_TRIGGERS", ANCESTORS_TRUNCATE_TRIGGERS),
];

/// Runs `f`, and the statements it runs through SPI, with `search_path =
/// pg_catalog, pg_temp`: the trigger and the DDL hook run in the user's
/// session, under the user's search_path.
fn with_pinned_search_path<R>(f: impl FnOnce() -> R) -> R {
    crate::pg::settings::with_settings(&[(c"search_path", c"pg_catalog, pg_temp")], f)
}

/// `track`'s row trigger `name` (quoted) on `table` (as regclass prints
/// it), for `events` (e.g. `INSERT OR UPDATE OR DELETE`), with `args`
/// (quoted literals, comma-separated), firing only for rows `when` (a
/// condition Postgres printed: [`crate::capture::row_filter`]) holds for.
fn create_row_trigger(name: &str, events: &str, table: &str, when: Option<&str>, args: &str) -> String {
    let when = when.map_or(String::new(), |w| format!(" WHEN ({w})"));
    format!(
        "CREATE TRIGGER {name} AFTER {events} ON {table}
         FOR EACH ROW{when} EXECUTE FUNCTION outbox.enqueue_trigger({args})"
    )
}

/// The TRUNCATE trigger `name` on `table`, arguments as for [`create_row_trigger`].
fn create_truncate_trigger(name: &str, table: &str, args: &str) -> String {
    format!(
        "CREATE TRIGGER {name} BEFORE TRUNCATE ON {table}
         FOR EACH STATEMENT EXECUTE FUNCTION outbox.enqueue_trigger({args})"
    )
}

fn drop_trigger(name: &str, table: &str) -> String {
    format!("DROP TRIGGER {name} ON {table}")
}

/// `how`: ENABLE ALWAYS, ENABLE REPLICA or DISABLE (see [`set_firing`]).
fn alter_trigger_firing(table: &str, how: &str, name: &str) -> String {
    format!("ALTER TABLE {table} {how} TRIGGER {name}")
}

/// `outbox_<kind><suffix>`, the kind shortened with a hash to fit in 63 bytes.
fn trigger_name(kind: &str, suffix: &str) -> String {
    let full = format!("outbox_{kind}");
    if full.len() + suffix.len() <= 63 {
        return full + suffix;
    }
    let hash = kind.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    let mut cut = 50 - suffix.len();
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}_{:08x}{suffix}", &full[..cut], hash as u32)
}

/// The tables that get a TRUNCATE trigger of kind $2 when table $1 is
/// tracked: itself and every partition under it, unless it has one already.
const NEEDING_TRUNCATE_TRIGGER: &str = "
SELECT c.oid::regclass::text
  FROM pg_catalog.pg_class c
 WHERE (c.oid OPERATOR(pg_catalog.=) $1
        OR c.oid OPERATOR(pg_catalog.=) ANY (SELECT relid FROM pg_catalog.pg_partition_tree($1)))
   AND (c.relkind OPERATOR(pg_catalog.=) 'r' OR c.relkind OPERATOR(pg_catalog.=) 'p')
   AND NOT EXISTS (SELECT FROM pg_catalog.pg_trigger g
                    WHERE g.tgrelid OPERATOR(pg_catalog.=) c.oid AND g.tgname OPERATOR(pg_catalog.=) $2)";

/// Gives table `tbl` and its partitions the TRUNCATE trigger of `kind`,
/// firing as `firing` says (see [`set_firing`]).
fn create_truncate_triggers(c: &mut pgrx::spi::SpiClient<'_>, tbl: pg_sys::Oid, kind: &str, id_column: &str, firing: &str) {
    let name = trigger_name(kind, "_truncate");
    let tables: Vec<String> = c
        .select(NEEDING_TRUNCATE_TRIGGER, None, &[tbl.into(), name.as_str().into()])
        .unwrap_or_else(|e| panic!("listing partitions: {e}"))
        .filter_map(|r| r.get::<String>(1).ok().flatten())
        .collect();
    for table in tables {
        let args = format!("{}, {}", quote_literal(kind), quote_literal(id_column));
        let sql = create_truncate_trigger(&quote_identifier(&name), &table, &args);
        c.update(sql.as_str(), None, &[]).unwrap_or_else(|e| panic!("creating trigger: {e}"));
        set_firing(c, &table, &name, firing);
    }
}

/// The arguments of our TRUNCATE triggers on the ancestors of partition $1,
/// and when the nearest one of each fires (none in a database without the
/// extension).
const ANCESTORS_TRUNCATE_TRIGGERS: &str = "
SELECT DISTINCT ON (g.tgargs) g.tgargs, g.tgenabled::text
  FROM pg_catalog.pg_partition_ancestors($1) WITH ORDINALITY AS a(relid, nearness)
  JOIN pg_catalog.pg_trigger g ON g.tgrelid OPERATOR(pg_catalog.=) a.relid
 WHERE a.relid OPERATOR(pg_catalog.<>) $1
   AND g.tgfoid OPERATOR(pg_catalog.=) pg_catalog.to_regprocedure('outbox.enqueue_trigger()')
   AND (g.tgtype OPERATOR(pg_catalog.&) 32) OPERATOR(pg_catalog.<>) 0
 ORDER BY g.tgargs, a.nearness";

/// After `CREATE TABLE ... PARTITION OF` or `ALTER TABLE ... ATTACH
/// PARTITION`: a partition of a tracked table gets the TRUNCATE triggers its
/// tracked ancestors have (statement triggers are not inherited), firing as
/// theirs do, so that a TRUNCATE of the partition alone is tracked too.
///
/// # Safety
/// `stmt` is the utility statement that just ran.
pub unsafe fn cover_new_partition(stmt: *mut pg_sys::Node) {
    // SAFETY: the node's tag says which statement struct it is.
    let partition: *mut pg_sys::RangeVar = unsafe {
        match (*stmt).type_ {
            pg_sys::NodeTag::T_CreateStmt => {
                let create = stmt.cast::<pg_sys::CreateStmt>();
                if (*create).partbound.is_null() {
                    return;
                }
                (*create).relation
            }
            pg_sys::NodeTag::T_AlterTableStmt => {
                let cmds = PgList::<pg_sys::AlterTableCmd>::from_pg((*stmt.cast::<pg_sys::AlterTableStmt>()).cmds);
                let Some(attach) = cmds.iter_ptr().find(|&cmd| (*cmd).subtype == pg_sys::AlterTableType::AT_AttachPartition) else {
                    return;
                };
                (*(*attach).def.cast::<pg_sys::PartitionCmd>()).name
            }
            _ => return,
        }
    };
    // SAFETY: the statement just created or attached it, and holds its lock.
    let Some(relid) = (unsafe { crate::pg::syscache::relid_named(partition) }) else { return };
    with_pinned_search_path(|| {
        Spi::connect_mut(|c| {
            let triggers: Vec<(Vec<u8>, String)> = c
                .select(ANCESTORS_TRUNCATE_TRIGGERS, None, &[relid.into()])
                .unwrap_or_else(|e| panic!("reading triggers: {e}"))
                .filter_map(|r| Some((r.get::<Vec<u8>>(1).ok()??, r.get::<String>(2).ok()??)))
                .collect();
            // As the extension's owner: attaching enqueue_trigger() is for
            // admins, but the table's owner may add partitions to it.
            crate::pg::roles::as_queue_owner(|| {
                for (args, firing) in triggers {
                    let mut args = args.split(|&b| b == 0).map(String::from_utf8_lossy);
                    if let (Some(kind), Some(id_column)) = (args.next(), args.next()) {
                        create_truncate_triggers(c, relid, &kind, &id_column, &firing);
                    }
                }
            })
        })
    });
}

/// A trigger tracking a kind.
pub(crate) struct KindTrigger {
    /// Its table, quoted as needed.
    pub table: String,
    name: String,
    /// `pg_trigger.tgenabled`: when it fires (see [`set_firing`]).
    firing: String,
}

/// Each trigger tracking `kind`, on `tbl` and its partitions or anywhere.
pub(crate) fn kind_triggers(c: &pgrx::spi::SpiClient<'_>, kind: &str, tbl: Option<pg_sys::Oid>) -> Vec<KindTrigger> {
    let tbl = tbl.map_or(pgrx::datum::DatumWithOid::null::<pg_sys::Oid>(), Into::into);
    c.select(KIND_TRIGGERS, None, &[kind.into(), tbl])
        .unwrap_or_else(|e| panic!("listing triggers: {e}"))
        .filter_map(|r| Some(KindTrigger { table: r.get(1).ok()??, name: r.get(2).ok()??, firing: r.get(3).ok()?? }))
        .collect()
}

pub(crate) fn drop_triggers(c: &mut pgrx::spi::SpiClient<'_>, triggers: &[KindTrigger]) {
    for t in triggers {
        let sql = drop_trigger(&quote_identifier(&t.name), &t.table);
        c.update(sql.as_str(), None, &[]).unwrap_or_else(|e| panic!("dropping trigger: {e}"));
    }
}

/// Makes trigger `name` on `table` fire as `firing` says (`pg_trigger.tgenabled`):
/// 'O' as usual, 'A' always (on a logical replication subscriber too),
/// 'R' only where session_replication_role is replica, 'D' never.
fn set_firing(c: &mut pgrx::spi::SpiClient<'_>, table: &str, name: &str, firing: &str) {
    let how = match firing {
        "A" => "ENABLE ALWAYS",
        "R" => "ENABLE REPLICA",
        "D" => "DISABLE",
        _ => return,
    };
    let sql = alter_trigger_firing(table, how, &quote_identifier(name));
    c.update(sql.as_str(), None, &[]).unwrap_or_else(|e| panic!("setting when a trigger fires: {e}"));
}

/// Resolves the table and checks it can be tracked: returns its quoted name
/// and whether it is temporary.
pub(crate) fn table_name(c: &pgrx::spi::SpiClient<'_>, tbl: pg_sys::Oid) -> (String, bool) {
    let row = c.select(TABLE_INFO, None, &[tbl.into()]).unwrap_or_else(|e| panic!("reading pg_class: {e}"));
    let (relkind, name, temporary) = match row.first().get_three::<String, String, bool>() {
        Ok((Some(k), Some(n), Some(t))) => (k, n, t),
        _ => raise(PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE, format!("relation with OID {tbl:?} does not exist"), None),
    };
    if relkind != "r" && relkind != "p" {
        raise(
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            format!("\"{name}\" is not a table"),
            Some("Only ordinary and partitioned tables can be tracked."),
        );
    }
    (name, temporary)
}

/// [`table_name`], for a table whose records the worker will read: not a
/// temporary one, which the worker, in a session of its own, would find
/// empty (every change sent as a deletion).
pub(crate) fn worker_readable_table(c: &pgrx::spi::SpiClient<'_>, tbl: pg_sys::Oid) -> String {
    let (table, temporary) = table_name(c, tbl);
    if temporary {
        raise(
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            format!("{table} is a temporary table"),
            Some("Only tables the worker can read can be tracked or backfilled; temporary tables are private to their session."),
        );
    }
    table
}

fn column_exists(c: &pgrx::spi::SpiClient<'_>, tbl: pg_sys::Oid, col: &str) -> bool {
    c.select(COLUMN_EXISTS, None, &[tbl.into(), col.into()])
        .ok()
        .and_then(|t| t.first().get_one::<bool>().ok().flatten())
        .unwrap_or(false)
}

/// The column naming `tbl`'s records (`table` as regclass prints it):
/// `id_column`, or the single-column primary key. Raises 42703 for a
/// column that does not exist, 42P16 when there is no such key, and 0A000
/// for a type whose text depends on session settings.
pub(crate) fn id_column_of(c: &pgrx::spi::SpiClient<'_>, tbl: pg_sys::Oid, table: &str, id_column: Option<&CStr>) -> String {
    let id_column = match id_column {
        Some(col) => {
            let col = col.to_string_lossy().into_owned();
            if !column_exists(c, tbl, &col) {
                raise(PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN, format!("column \"{col}\" of relation {table} does not exist"), None);
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
                    Some("Name the id column: id_column => 'col'."),
                );
            }
            pk.into_iter().next().expect("one column")
        }
    };
    let id_name = CString::new(id_column.as_str()).expect("a column name has no NUL");
    // SAFETY: syscache lookups of a column of a table that exists.
    let id_type = unsafe { pg_sys::get_atttype(tbl, pg_sys::get_attnum(tbl, id_name.as_ptr())) };
    crate::capture::ids::require_canonical(&id_column, id_type);
    id_column
}

/// `outbox.track`: creates the triggers that capture `tbl`'s changes as
/// records of `kind`, or replaces them. Returns the names of its row
/// triggers: one, or with a filter one per event (INSERT, UPDATE, DELETE),
/// comma-separated. (Version 0.2.0's `track`, without a filter, is
/// `api::legacy::track`.)
#[pg_extern(sql = "
CREATE FUNCTION outbox.track(tbl regclass, kind text, id_column name DEFAULT NULL, columns name[] DEFAULT NULL,
                             filter text DEFAULT NULL)
RETURNS text VOLATILE LANGUAGE c SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
")]
pub fn track_table(tbl: Option<pg_sys::Oid>, kind: Option<&str>, id_column: Option<&CStr>, columns: Option<Array<&CStr>>, filter: Option<&str>) -> String {
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
        let table = worker_readable_table(c, tbl);
        let column_exists = |c: &pgrx::spi::SpiClient<'_>, col: &str| column_exists(c, tbl, col);
        let id_column = id_column_of(c, tbl, &table, id_column);
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
        let filter: Option<crate::capture::row_filter::RowFilter> = filter.map(|f| crate::capture::row_filter::analyze(tbl, &table, f, crate::capture::row_filter::EvaluatedBy::TheWriter));
        // A row entering or leaving the filter changed, whatever `columns`
        // watch: the filter's columns are watched too.
        if let (Some(f), false) = (&filter, watched.is_empty()) {
            for col in &f.columns {
                if !watched.contains(col) {
                    watched.push(col.clone());
                }
            }
        }
        // Tracking again replaces the triggers, e.g. to change the columns,
        // and keeps when each fires (an admin may have made them fire on a
        // logical replication subscriber).
        let previous = kind_triggers(c, kind, Some(tbl));
        drop_triggers(c, &previous);
        let mut args = vec![quote_literal(kind), quote_literal(&id_column)];
        args.extend(watched.iter().map(quote_literal));
        let args = args.join(", ");
        let row_triggers: Vec<(String, &str, Option<String>)> = match &filter {
            None => vec![(trigger_name(kind, ""), "INSERT OR UPDATE OR DELETE", None)],
            Some(f) => vec![
                (trigger_name(kind, "_insert"), "INSERT", Some(f.new.clone())),
                (trigger_name(kind, "_update"), "UPDATE", Some(format!("{} OR {}", f.old, f.new))),
                (trigger_name(kind, "_delete"), "DELETE", Some(f.old.clone())),
            ],
        };
        let truncate = trigger_name(kind, "_truncate");
        // The row triggers fire as the last ones did, whatever their names.
        let row_firing = previous.iter().find(|t| t.table == table && t.name != truncate).map(|t| t.firing.clone());
        for (name, events, when) in &row_triggers {
            let sql = create_row_trigger(&quote_identifier(name), events, &table, when.as_deref(), &args);
            c.update(sql.as_str(), None, &[]).unwrap_or_else(|e| panic!("creating trigger: {e}"));
            if let Some(firing) = &row_firing {
                set_firing(c, &table, name, firing);
            }
        }
        create_truncate_triggers(c, tbl, kind, &id_column, "O");
        for t in previous.iter().filter(|t| t.name == truncate) {
            set_firing(c, &t.table, &t.name, &t.firing);
        }
        row_triggers.into_iter().map(|(name, _, _)| name).collect::<Vec<_>>().join(", ")
    })
}

#[pg_extern(sql = "
CREATE FUNCTION outbox.untrack(tbl regclass, kind text)
RETURNS void VOLATILE LANGUAGE c SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
")]
fn untrack(tbl: Option<pg_sys::Oid>, kind: Option<&str>) {
    let tbl = require(tbl, "tbl");
    let kind = require_kind(kind);
    Spi::connect_mut(|c| {
        let (table, _) = table_name(c, tbl);
        let triggers = kind_triggers(c, kind, Some(tbl));
        drop_triggers(c, &triggers);
        if triggers.is_empty() {
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
    use super::trigger_name;

    #[test]
    fn every_statement_names_the_schema_of_its_functions_and_operators() {
        crate::testing::sql_check::assert_qualified(super::STATEMENTS);
        // The DDL, rendered as track() renders it.
        let (name, table, args) = ("\"outbox_user\"", "public.users", "'user', 'id', 'name'");
        crate::testing::sql_check::assert_qualified(&[
            ("create_row_trigger", &super::create_row_trigger(name, "INSERT OR UPDATE OR DELETE", table, None, args)),
            (
                "create_row_trigger with a filter",
                &super::create_row_trigger(name, "UPDATE", table, Some("(old.a OPERATOR(pg_catalog.>) 0) OR (new.a OPERATOR(pg_catalog.>) 0)"), args),
            ),
            ("create_truncate_trigger", &super::create_truncate_trigger(name, table, args)),
            ("drop_trigger", &super::drop_trigger(name, table)),
            ("alter_trigger_firing", &super::alter_trigger_firing(table, "ENABLE ALWAYS", name)),
        ]);
    }

    #[test]
    fn names_fit() {
        assert_eq!(trigger_name("user", ""), "outbox_user");
        assert_eq!(trigger_name("user", "_truncate"), "outbox_user_truncate");
        for suffix in ["", "_truncate"] {
            let long = trigger_name(&"é".repeat(100), suffix);
            assert!(long.len() <= 63 && long.ends_with(suffix), "{long}");
            assert_ne!(trigger_name(&"a".repeat(80), suffix), trigger_name(&"a".repeat(81), suffix));
        }
        // A kind that fits alone but not with the suffix keeps the two apart.
        let kind = "k".repeat(55);
        assert_ne!(trigger_name(&kind, ""), trigger_name(&kind, "_truncate"));
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::testing::{sqlstate_of, texts};
    use pgrx::prelude::*;

    fn ids() -> Vec<String> {
        texts("SELECT u.id FROM outbox.inbox, unnest(coalesce(ids, ARRAY[id])) AS u(id) ORDER BY 1", &[])
    }

    fn reset() {
        Spi::run("DELETE FROM outbox.inbox").unwrap();
        crate::capture::inbox::forget();
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
        let entries = || Spi::get_one::<i64>("SELECT count(*) FROM outbox.inbox, unnest(coalesce(ids, ARRAY[id]))").unwrap();
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
        assert_eq!(n, Some(2), "one row trigger and one TRUNCATE trigger");
        // Tracking again keeps when each trigger fires.
        Spi::run("ALTER TABLE public.users ENABLE ALWAYS TRIGGER outbox_user").unwrap();
        Spi::run("ALTER TABLE public.users DISABLE TRIGGER outbox_user_truncate").unwrap();
        Spi::run("SELECT outbox.track('public.users', 'user', columns => '{b}')").unwrap();
        assert_eq!(firing("public.users", "outbox_user"), "A");
        assert_eq!(firing("public.users", "outbox_user_truncate"), "D");
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

    /// A filter captures a change when it holds for the old row or the new
    /// one: a row entering it, changing inside it, or leaving it.
    #[pg_test]
    fn a_filter_captures_rows_it_holds_for_before_or_after() {
        Spi::run("SELECT outbox.register('order', 'http://h/{id}')").unwrap();
        Spi::run(r#"CREATE TABLE public.orders (id int PRIMARY KEY, status text, "Total" numeric, note text)"#).unwrap();
        let names = Spi::get_one::<String>(r#"SELECT outbox.track('public.orders', 'order', filter => 'status <> ''draft'' AND "Total" > 0')"#).unwrap();
        assert_eq!(names.as_deref(), Some("outbox_order_insert, outbox_order_update, outbox_order_delete"));
        Spi::run("INSERT INTO public.orders VALUES (1, 'draft', 5), (2, 'paid', 5), (3, 'paid', 0), (4, NULL, 5)").unwrap();
        assert_eq!(ids(), ["2"]);
        reset();
        // Entering, changing inside, leaving, outside all along.
        Spi::run("UPDATE public.orders SET status = 'paid' WHERE id = 1").unwrap();
        Spi::run("UPDATE public.orders SET note = 'x' WHERE id = 2").unwrap();
        Spi::run(r#"UPDATE public.orders SET "Total" = 0 WHERE id = 2"#).unwrap();
        Spi::run("UPDATE public.orders SET note = 'y' WHERE id IN (3, 4)").unwrap();
        assert_eq!(ids(), ["1", "2"]);
        reset();
        Spi::run("DELETE FROM public.orders WHERE id IN (1, 3)").unwrap();
        assert_eq!(ids(), ["1"]);
        reset();
        // Tracking again without a filter: one trigger, every change.
        let name = Spi::get_one::<String>("SELECT outbox.track('public.orders', 'order')").unwrap();
        assert_eq!(name.as_deref(), Some("outbox_order"));
        Spi::run("UPDATE public.orders SET note = 'z' WHERE id = 4").unwrap();
        assert_eq!(ids(), ["4"]);
        let n = Spi::get_one::<i64>("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.orders'::regclass").unwrap();
        assert_eq!(n, Some(2), "the row trigger and the TRUNCATE trigger");
    }

    /// With `columns`, a change of a column the filter reads still counts:
    /// a row entering or leaving the filter is delivered.
    #[pg_test]
    fn a_filters_columns_are_watched_with_the_columns() {
        Spi::run("SELECT outbox.register('order', 'http://h/{id}')").unwrap();
        Spi::run("CREATE TABLE public.orders (id int PRIMARY KEY, status text, note text, other int)").unwrap();
        Spi::run("SELECT outbox.track('public.orders', 'order', columns => '{note}', filter => 'status = ''paid''')").unwrap();
        Spi::run("INSERT INTO public.orders VALUES (1, 'draft', 'a', 0), (2, 'paid', 'b', 0)").unwrap();
        reset();
        Spi::run("UPDATE public.orders SET status = 'paid' WHERE id = 1").unwrap();
        Spi::run("UPDATE public.orders SET status = 'void' WHERE id = 2").unwrap();
        assert_eq!(ids(), ["1", "2"]);
        reset();
        Spi::run("UPDATE public.orders SET other = 1").unwrap();
        assert!(ids().is_empty(), "a column neither watched nor filtered on");
    }

    /// What the filter says goes into the triggers as Postgres prints it
    /// back: text that tries to escape the expression is refused, and a
    /// function is named with its schema.
    #[pg_test]
    fn a_filter_is_checked_and_never_pasted() {
        Spi::run("SELECT outbox.register('order', 'http://h/{id}')").unwrap();
        Spi::run("CREATE TABLE public.orders (id int PRIMARY KEY, status text, n int)").unwrap();
        Spi::run("CREATE TABLE public.other (x int)").unwrap();
        Spi::run("CREATE FUNCTION public.big(int) RETURNS boolean IMMUTABLE LANGUAGE sql AS 'SELECT $1 > 10'").unwrap();
        let track = |filter: &str| format!("SELECT outbox.track('public.orders', 'order', filter => {})", pgrx::spi::quote_literal(filter));
        let cases = [
            (track("n"), "42804"),
            (track("'true'"), "42804"),
            (track("random() > 0.5"), "42P17"),
            (track("n > (SELECT max(x) FROM public.other)"), "0A000"),
            (track("count(*) > 1"), "0A000"),
            (track("generate_series(1, n) > 1"), "0A000"),
            (track("row_number() OVER () > 1"), "0A000"),
            (track("nope > 1"), "42703"),
            (track("n > 1 FROM ONLY public.other WHERE true --"), "42601"),
            (track("true, false"), "22023"),
            (track("true\nFROM ONLY public.orders UNION SELECT true"), "22023"),
            (track("true; SELECT 1"), "22023"),
            (track("true; DROP TABLE public.other"), "42601"),
            (track("n > 1) EXECUTE FUNCTION public.big(1) --"), "42601"),
            (track(""), "22023"),
            (track("orders IS NOT NULL"), "0A000"),
            (track("ctid IS NOT NULL"), "0A000"),
            (track("public.big(n)"), "00000"),
        ];
        crate::testing::assert_sqlstates(&cases.iter().map(|(q, s)| (q.as_str(), *s)).collect::<Vec<_>>());
        // As printed where public is not on the path: the name is qualified.
        Spi::run("SET LOCAL search_path = pg_catalog").unwrap();
        let when = texts("SELECT pg_catalog.pg_get_triggerdef(oid) FROM pg_catalog.pg_trigger WHERE tgname = 'outbox_order_update'", &[]);
        Spi::run("RESET search_path").unwrap();
        assert!(when[0].contains("public.big(old.n) OR public.big(new.n)"), "{when:?}");
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM public.other").unwrap(), Some(0), "still there");
        Spi::run("INSERT INTO public.orders VALUES (1, 'a', 5), (2, 'b', 50)").unwrap();
        assert_eq!(ids(), ["2"]);
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
            ("CREATE TEMPORARY TABLE temp_users (id int PRIMARY KEY)", "00000"),
            ("SELECT outbox.track('temp_users', 'user')", "42809"),
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
            ("CREATE TRIGGER t AFTER TRUNCATE ON public.users FOR EACH STATEMENT EXECUTE FUNCTION outbox.enqueue_trigger('user', 'id')", "00000"),
            ("TRUNCATE public.users", "0A000"),
            ("DROP TRIGGER t ON public.users", "00000"),
            ("CREATE TRIGGER t BEFORE TRUNCATE ON public.users FOR EACH STATEMENT EXECUTE FUNCTION outbox.enqueue_trigger('user')", "00000"),
            ("TRUNCATE public.users", "0A000"),
            ("DROP TRIGGER t ON public.users", "00000"),
            ("CREATE TABLE public.long_ids (id text PRIMARY KEY)", "00000"),
            ("SELECT outbox.track('public.long_ids', 'user')", "00000"),
            ("INSERT INTO public.long_ids VALUES (repeat('x', 1025))", "22001"),
            ("INSERT INTO public.long_ids VALUES ('')", "22023"),
            ("INSERT INTO public.long_ids VALUES (repeat('x', 1024))", "00000"),
            // A TRUNCATE hands each id over as a DELETE would: a bad one
            // fails the statement rather than being dropped.
            ("ALTER TABLE public.long_ids DROP CONSTRAINT long_ids_pkey", "00000"),
            ("INSERT INTO public.long_ids VALUES (repeat('y', 1025))", "22001"),
            ("SELECT outbox.untrack('public.long_ids', 'user')", "00000"),
            ("INSERT INTO public.long_ids VALUES (repeat('y', 1025))", "00000"),
            ("SELECT outbox.track('public.long_ids', 'user', 'id')", "00000"),
            ("TRUNCATE public.long_ids", "22001"),
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
               FROM outbox.inbox, unnest(coalesce(ids, ARRAY[id])) AS u(id)"
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

    /// A statement that changed one record writes its id alone; one that
    /// changed several writes them as an array. The jobs view shows both.
    #[pg_test]
    fn one_change_is_written_without_an_array() {
        Spi::run("SELECT outbox.register('user', 'http://h/{id}')").unwrap();
        Spi::run("CREATE TABLE public.users (id bigint PRIMARY KEY, v int)").unwrap();
        Spi::run("SELECT outbox.track('public.users', 'user')").unwrap();
        let rows = || texts("SELECT format('%s|%s', id, ids) FROM outbox.inbox ORDER BY ctid", &[]);
        Spi::run("INSERT INTO public.users VALUES (7, 0)").unwrap();
        Spi::run("INSERT INTO public.users VALUES (8, 0), (9, 0)").unwrap();
        assert_eq!(rows(), ["7|", "|{8,9}"]);
        let pending = texts("SELECT id FROM outbox.jobs WHERE kind = 'user' AND job_id IS NULL ORDER BY id", &[]);
        assert_eq!(pending, ["7", "8", "9"]);
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
        let r = crate::pg::subxact::try_subtransaction(|| {
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

    /// pg_trigger.tgenabled of trigger `name` on `table`.
    fn firing(table: &str, name: &str) -> String {
        Spi::get_one_with_args::<String>(
            "SELECT tgenabled::text FROM pg_trigger WHERE tgrelid = $1::regclass AND tgname = $2",
            &[table.into(), name.into()],
        )
        .unwrap()
        .unwrap()
    }

    fn our_triggers(table: &str) -> Vec<String> {
        texts(
            "SELECT tgname::text FROM pg_trigger
              WHERE tgrelid = $1::regclass AND tgfoid = 'outbox.enqueue_trigger()'::regprocedure ORDER BY 1",
            &[table.into()],
        )
    }

    #[pg_test]
    fn truncate_hands_over_every_id() {
        Spi::run("SELECT outbox.register('user', 'http://h/{id}')").unwrap();
        Spi::run("SELECT outbox.register('other', 'http://h/{id}')").unwrap();
        Spi::run("CREATE TABLE public.users (id int PRIMARY KEY, ext text)").unwrap();
        Spi::run("SELECT outbox.track('public.users', 'user')").unwrap();
        Spi::run("SELECT outbox.track('public.users', 'other', id_column => 'ext')").unwrap();
        Spi::run("INSERT INTO public.users SELECT g, CASE WHEN g % 2 = 0 THEN 'e' || g END FROM generate_series(1, 5) g").unwrap();
        Spi::run("CREATE TABLE public.untracked (id int PRIMARY KEY)").unwrap();
        Spi::run("INSERT INTO public.untracked VALUES (9)").unwrap();
        reset();
        Spi::run("TRUNCATE public.users, public.untracked").unwrap();
        // Both kinds' ids, NULL ids (odd rows of ext) skipped, in this
        // transaction's next statement already.
        assert_eq!(ids(), ["1", "2", "3", "4", "5", "e2", "e4"]);
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM outbox.inbox WHERE kind = 'other'").unwrap(), Some(1));
        // Nothing left to hand over the second time.
        reset();
        Spi::run("TRUNCATE public.users").unwrap();
        assert!(ids().is_empty());
        // A TRUNCATE rolled back to a savepoint hands over nothing.
        Spi::run("INSERT INTO public.users VALUES (7, NULL)").unwrap();
        reset();
        let r = crate::pg::subxact::try_subtransaction(|| {
            Spi::run("TRUNCATE public.users").unwrap();
            panic!("roll the subtransaction back");
        });
        assert!(r.is_err());
        Spi::run("SELECT 1").unwrap();
        assert!(ids().is_empty());
        // A kind whose name needs escaping in pg_trigger.tgargs is found.
        Spi::run(r"SELECT outbox.register('a\b', 'http://h/{id}')").unwrap();
        Spi::run(r"SELECT outbox.track('public.users', 'a\b')").unwrap();
        Spi::run(r"SELECT outbox.track('public.users', 'a\b')").unwrap();
        Spi::run("INSERT INTO public.users VALUES (8, NULL)").unwrap();
        reset();
        Spi::run("TRUNCATE public.users").unwrap();
        let n = Spi::get_one::<i64>(r"SELECT count(*) FROM outbox.inbox, unnest(coalesce(ids, ARRAY[id])) WHERE kind = 'a\b'").unwrap();
        assert_eq!(n, Some(2), "rows 7 and 8");
        Spi::run(r"SELECT outbox.untrack('public.users', 'a\b')").unwrap();
        // Untracked, the table's TRUNCATE triggers go too.
        Spi::run("SELECT outbox.untrack('public.users', 'user')").unwrap();
        Spi::run("SELECT outbox.untrack('public.users', 'other')").unwrap();
        assert!(our_triggers("public.users").is_empty());
        Spi::run("INSERT INTO public.users VALUES (9, NULL)").unwrap();
        reset();
        Spi::run("TRUNCATE public.users").unwrap();
        assert!(ids().is_empty());
    }

    #[pg_test]
    fn truncate_of_a_partitioned_table_and_of_its_partitions() {
        Spi::run("SELECT outbox.register('event', 'http://h/{id}')").unwrap();
        Spi::run(
            "CREATE TABLE public.events (id int PRIMARY KEY) PARTITION BY RANGE (id);
             CREATE TABLE public.events_1 PARTITION OF public.events FOR VALUES FROM (0) TO (10);
             CREATE TABLE public.events_2 PARTITION OF public.events FOR VALUES FROM (10) TO (20) PARTITION BY RANGE (id);
             CREATE TABLE public.events_2a PARTITION OF public.events_2 FOR VALUES FROM (10) TO (20);",
        )
        .unwrap();
        Spi::run("SELECT outbox.track('public.events', 'event')").unwrap();
        // Statement triggers are not inherited: each partition has its own.
        for t in ["public.events", "public.events_1", "public.events_2", "public.events_2a"] {
            assert!(our_triggers(t).contains(&"outbox_event_truncate".to_string()), "{t}: {:?}", our_triggers(t));
        }
        // Partitions created or attached later get theirs as they come,
        // firing as their parent's does.
        Spi::run("ALTER TABLE public.events ENABLE ALWAYS TRIGGER outbox_event_truncate").unwrap();
        Spi::run("CREATE TABLE public.events_3 PARTITION OF public.events FOR VALUES FROM (20) TO (30)").unwrap();
        assert_eq!(firing("public.events_3", "outbox_event_truncate"), "A");
        Spi::run("ALTER TABLE public.events ENABLE TRIGGER outbox_event_truncate").unwrap();
        Spi::run(
            "CREATE TABLE public.events_4 (id int PRIMARY KEY) PARTITION BY RANGE (id);
             CREATE TABLE public.events_4a PARTITION OF public.events_4 FOR VALUES FROM (30) TO (40);
             ALTER TABLE public.events ATTACH PARTITION public.events_4 FOR VALUES FROM (30) TO (40);",
        )
        .unwrap();
        for t in ["public.events_3", "public.events_4", "public.events_4a"] {
            assert_eq!(our_triggers(t), ["outbox_event", "outbox_event_truncate"], "{t}");
        }
        Spi::run("INSERT INTO public.events VALUES (1), (2), (11), (21), (31)").unwrap();
        reset();
        Spi::run("TRUNCATE public.events_1").unwrap();
        assert_eq!(ids(), ["1", "2"]);
        reset();
        Spi::run("TRUNCATE public.events_4a").unwrap();
        assert_eq!(ids(), ["31"]);
        // A partition without its own (its trigger dropped, or made where
        // the utility hook does not run) is read by its parent's.
        Spi::run("DROP TRIGGER outbox_event_truncate ON public.events_3").unwrap();
        Spi::run("INSERT INTO public.events VALUES (3), (32)").unwrap();
        reset();
        Spi::run("TRUNCATE public.events").unwrap();
        assert_eq!(ids(), ["11", "21", "3", "32"]);
        // Tracking again replaces the triggers and covers every partition.
        Spi::run("SELECT outbox.track('public.events', 'event')").unwrap();
        assert_eq!(our_triggers("public.events_3"), ["outbox_event", "outbox_event_truncate"]);
        assert_eq!(our_triggers("public.events_1"), ["outbox_event", "outbox_event_truncate"]);
        Spi::run("INSERT INTO public.events VALUES (22)").unwrap();
        reset();
        Spi::run("TRUNCATE public.events_3").unwrap();
        assert_eq!(ids(), ["22"]);
        // A table that is not a partition of a tracked one gets nothing.
        Spi::run("CREATE TABLE public.other (id int) PARTITION BY RANGE (id); CREATE TABLE public.other_1 PARTITION OF public.other FOR VALUES FROM (0) TO (1)").unwrap();
        assert!(our_triggers("public.other_1").is_empty());
        // Unregistering with cascade drops every one, clones included.
        Spi::run("SELECT outbox.unregister('event', cascade => true)").unwrap();
        for t in ["public.events", "public.events_1", "public.events_2", "public.events_2a", "public.events_3", "public.events_4", "public.events_4a"] {
            assert!(our_triggers(t).is_empty(), "{t}: {:?}", our_triggers(t));
        }
    }

}
