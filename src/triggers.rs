//! `track` / `untrack` and the `enqueue_trigger` trigger function.
//!
//! `track` creates three AFTER ... FOR EACH STATEMENT triggers (Postgres allows
//! transition tables only on single-event triggers). Each one enqueues every
//! affected id with one set-based INSERT over the transition tables, so a bulk
//! statement costs one statement, not one round trip per row.

use crate::errors::{raise, require, require_kind, unknown_kind};
use pgrx::prelude::*;
use pgrx::spi::{quote_identifier, quote_literal, OwnedPreparedStatement};
use pgrx::{Array, PgOid};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CStr;

/// How the transition-table rows become fresh jobs; shared tail of every
/// trigger statement. Locks an existing fresh job, as `enqueue` does.
const ON_CONFLICT: &str = "
ON CONFLICT (kind, id) WHERE state = 'pending' AND last_attempt_at IS NULL
DO UPDATE SET run_at = excluded.run_at WHERE q.run_at > excluded.run_at";

/// INSERT and DELETE: every row's id.
fn rows_sql(table: &str, id: &str) -> String {
    format!(
        "INSERT INTO outbox.queue AS q (kind, id)
SELECT DISTINCT $1, t.{id}::text FROM {table} t WHERE t.{id} IS NOT NULL{ON_CONFLICT}"
    )
}

/// UPDATE: ids whose row (or watched columns) changed, and both ids of a row
/// whose id changed. `*=` compares binary images, so it works for every type.
fn update_sql(old: &str, new: &str, id: &str, watched: &str) -> String {
    format!(
        "WITH o AS (SELECT t.{id}::text AS k, {watched} AS v FROM {old} t),
     n AS (SELECT t.{id}::text AS k, {watched} AS v FROM {new} t)
INSERT INTO outbox.queue AS q (kind, id)
SELECT DISTINCT $1, c.k FROM (
    SELECT n.k FROM n LEFT JOIN o ON o.k = n.k AND o.v OPERATOR(pg_catalog.*=) n.v WHERE o.k IS NULL
    UNION ALL
    SELECT o.k FROM o LEFT JOIN n ON n.k = o.k WHERE n.k IS NULL
) c WHERE c.k IS NOT NULL{ON_CONFLICT}"
    )
}

thread_local! {
    /// Plans per (trigger oid, event), kept for the backend's life. The SQL of
    /// a trigger depends only on its arguments, which cannot change.
    static PLANS: RefCell<HashMap<(pg_sys::Oid, u8), OwnedPreparedStatement>> = RefCell::new(HashMap::new());
}

#[pg_trigger(sql = "
CREATE FUNCTION outbox.enqueue_trigger() RETURNS trigger
LANGUAGE c SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
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
    if !matches!(trigger.level(), PgTriggerLevel::Statement) {
        misuse("must fire FOR EACH STATEMENT");
    }
    let args = trigger.extra_args().unwrap_or_default();
    if args.len() < 2 {
        misuse("needs the arguments (kind, id_column [, column ...])");
    }
    let (kind, id_column, watched) = (&args[0], &args[1], &args[2..]);
    let op = trigger.op().unwrap_or_else(|_| misuse("fired for an unknown event"));
    let old = trigger.old_transition_table_name().ok().flatten();
    let new = trigger.new_transition_table_name().ok().flatten();
    let id = quote_identifier(id_column);
    let (event, sql) = match (op, old, new) {
        (PgTriggerOperation::Insert, _, Some(new)) => (0u8, rows_sql(&quote_identifier(new), &id)),
        (PgTriggerOperation::Delete, Some(old), _) => (1, rows_sql(&quote_identifier(old), &id)),
        (PgTriggerOperation::Update, Some(old), Some(new)) => {
            let watched = if watched.is_empty() {
                "t".to_string()
            } else {
                let cols: Vec<String> = watched.iter().map(|c| format!("t.{}", quote_identifier(c))).collect();
                format!("ROW({})", cols.join(", "))
            };
            (2, update_sql(&quote_identifier(old), &quote_identifier(new), &id, &watched))
        }
        _ => misuse("needs REFERENCING transition tables for INSERT, UPDATE or DELETE"),
    };
    let key = (trigger.trigger().tgoid, event);
    Spi::connect_mut(|c| {
        // SAFETY: the trigger data comes from Postgres for this very call; it
        // makes the transition tables visible to this SPI connection.
        unsafe {
            pg_sys::SPI_register_trigger_data(trigger.trigger_data() as *const _ as *mut _);
        }
        PLANS.with(|plans| {
            let mut plans = plans.borrow_mut();
            if !plans.contains_key(&key) {
                let text = PgOid::BuiltIn(pg_sys::BuiltinOid::TEXTOID);
                let plan = c.prepare_mut(sql.as_str(), &[text]).unwrap_or_else(|e| panic!("preparing trigger SQL: {e}")).keep();
                plans.insert(key, plan);
            }
            let plan = &plans[&key];
            c.update(plan, None, &[kind.as_str().into()]).unwrap_or_else(|e| panic!("enqueue from trigger: {e}"));
        });
    });
    crate::enqueue::wake_on_commit();
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
/// Triggers of `kind` on a table (the kind is the first trigger argument).
const KIND_TRIGGERS_ON: &str = "
SELECT t.tgname::text
  FROM pg_catalog.pg_trigger t
 WHERE t.tgrelid = $1
   AND t.tgfoid = 'outbox.enqueue_trigger()'::regprocedure
   AND t.tgnargs >= 1
   AND pg_catalog.split_part(pg_catalog.encode(t.tgargs, 'escape'), E'\\\\000', 1) = $2";

/// `outbox_<kind>`, shortened with a hash so `<name>_upd` fits in 63 bytes.
fn trigger_base_name(kind: &str) -> String {
    let full = format!("outbox_{kind}");
    if full.len() <= 59 {
        return full;
    }
    let hash = kind.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    let mut cut = 50;
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}_{:08x}", &full[..cut], hash as u32)
}

fn drop_kind_triggers(c: &mut pgrx::spi::SpiClient<'_>, tbl: pg_sys::Oid, table: &str, kind: &str) -> usize {
    let names: Vec<String> = c
        .select(KIND_TRIGGERS_ON, None, &[tbl.into(), kind.into()])
        .unwrap_or_else(|e| panic!("listing triggers: {e}"))
        .filter_map(|r| r.get::<String>(1).ok().flatten())
        .collect();
    for name in &names {
        let sql = format!("DROP TRIGGER {} ON {table}", quote_identifier(name));
        c.update(sql.as_str(), None, &[]).unwrap_or_else(|e| panic!("dropping trigger: {e}"));
    }
    names.len()
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
        drop_kind_triggers(c, tbl, &table, kind);
        let base = trigger_base_name(kind);
        let mut args = vec![quote_literal(kind), quote_literal(&id_column)];
        args.extend(watched.iter().map(quote_literal));
        let args = args.join(", ");
        for (suffix, event, referencing) in [
            ("ins", "INSERT", "NEW TABLE AS outbox_new"),
            ("upd", "UPDATE", "OLD TABLE AS outbox_old NEW TABLE AS outbox_new"),
            ("del", "DELETE", "OLD TABLE AS outbox_old"),
        ] {
            let sql = format!(
                "CREATE TRIGGER {} AFTER {event} ON {table} REFERENCING {referencing}
                 FOR EACH STATEMENT EXECUTE FUNCTION outbox.enqueue_trigger({args})",
                quote_identifier(format!("{base}_{suffix}"))
            );
            c.update(sql.as_str(), None, &[]).unwrap_or_else(|e| panic!("creating trigger: {e}"));
        }
        base
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
        if drop_kind_triggers(c, tbl, &table, kind) == 0 {
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
        assert!(long.len() + 4 <= 63, "{long}");
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
            c.select("SELECT id FROM outbox.queue ORDER BY id", None, &[])
                .unwrap()
                .map(|r| r.get::<String>(1).unwrap().unwrap())
                .collect()
        })
    }

    fn reset() {
        Spi::run("DELETE FROM outbox.queue").unwrap();
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
        // Bulk: one job per row, one statement.
        Spi::run("INSERT INTO public.users SELECT g, 'x' FROM generate_series(100, 1099) g").unwrap();
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM outbox.queue").unwrap(), Some(1000));
        // Coalesced: the same rows again add no job.
        Spi::run("UPDATE public.users SET name = 'y' WHERE id >= 100").unwrap();
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM outbox.queue").unwrap(), Some(1000));
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
        assert_eq!(n, Some(3));
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
            ("CREATE TRIGGER t AFTER INSERT ON public.users FOR EACH ROW EXECUTE FUNCTION outbox.enqueue_trigger('user', 'id')", "00000"),
            ("INSERT INTO public.users VALUES (1, 1)", "0A000"),
        ];
        for (sql, code) in cases {
            assert_eq!(sqlstate_of(sql), code, "{sql}");
        }
    }
}
