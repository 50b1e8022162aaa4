//! `outbox.backfill`, `outbox.cancel_backfill`, `outbox.resume_backfill`:
//! every row of a table (or every row a filter holds for) delivered once,
//! as if each had just changed. These record what to do and check it; the
//! worker does it, a chunk per turn (`worker::backfills`), and
//! `outbox.backfills` shows how far it got.

use crate::capture::{triggers, wake};
use crate::pg::errors::{raise, require, require_kind, unknown_kind};
use crate::pg::roles::{as_queue_owner, as_restricted, require_may_run_as};
use crate::worker::backfills::{writing_progress, Reader, State};
use pgrx::prelude::*;
use std::ffi::CStr;


/// Records backfill of table $1 for kind $2 by id column $3, filter $4,
/// for role $5; with the table's estimated rows. Returns its id, nothing if
/// one is running for the table and kind.
const START: &str = "
INSERT INTO outbox.backfills (tbl, kind, id_column, filter, run_as, rows_estimate)
SELECT $1, $2, $3, $4, $5,
       (SELECT pg_catalog.sum(greatest(c.reltuples, 0))::bigint
          FROM pg_catalog.pg_class c
         WHERE c.oid OPERATOR(pg_catalog.=) $1
            OR c.oid OPERATOR(pg_catalog.=) ANY (SELECT relid FROM pg_catalog.pg_partition_tree($1)))
ON CONFLICT (tbl, kind) WHERE state OPERATOR(pg_catalog.=) 'running' DO NOTHING
RETURNING backfill_id";

/// The backfill of table $1 for kind $2 that is running.
const RUNNING_ID: &str = "
SELECT backfill_id FROM outbox.backfills
 WHERE tbl OPERATOR(pg_catalog.=) $1 AND kind OPERATOR(pg_catalog.=) $2 AND state OPERATOR(pg_catalog.=) 'running'";

/// Backfill $1's state and the role it reads for.
const STATE_OF: &str = "SELECT state, run_as::pg_catalog.oid FROM outbox.backfills WHERE backfill_id OPERATOR(pg_catalog.=) $1";

/// Backfill $1 from state $2 to state $3; returns it if it moved.
const MOVE: &str = "
UPDATE outbox.backfills
   SET state = $3, error = NULL, updated_at = pg_catalog.now(),
       finished_at = CASE WHEN $3 OPERATOR(pg_catalog.=) 'running' THEN NULL ELSE pg_catalog.now() END
 WHERE backfill_id OPERATOR(pg_catalog.=) $1 AND state OPERATOR(pg_catalog.=) ANY ($2::text[])
RETURNING backfill_id";

/// The SQL statements of this module, for the qualification sweep.
#[cfg(test)]
pub(crate) const STATEMENTS: &[(&str, &str)] =
    &[("START", START), ("RUNNING_ID", RUNNING_ID), ("STATE_OF", STATE_OF), ("MOVE", MOVE)];

/// Delivers every row of `tbl` (those `filter` holds for) as records of
/// `kind`, by `id_column` (default: the single-column primary key), as if
/// each had just changed. Returns the backfill's id; the worker does the
/// rest in the background, and `outbox.backfills` shows its progress. The
/// caller must be able to read the table, without row-level security
/// restricting it: the worker reads it as its owner, a chunk at a time.
#[pg_extern(sql = "
CREATE FUNCTION outbox.backfill(tbl regclass, kind text, id_column name DEFAULT NULL, filter text DEFAULT NULL)
RETURNS bigint VOLATILE LANGUAGE c SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
")]
fn backfill(tbl: Option<pg_sys::Oid>, kind: Option<&str>, id_column: Option<&CStr>, filter: Option<&str>) -> i64 {
    let tbl = require(tbl, "tbl");
    let kind = require_kind(kind);
    // SAFETY: reading the current user.
    let me = unsafe { pg_sys::GetUserId() };
    Spi::connect_mut(|c| {
        let table = triggers::worker_readable_table(c, tbl);
        let id_column = triggers::id_column_of(c, tbl, &table, id_column);
        // What the worker checks and runs at each chunk, once now: what can't
        // work fails here, with its reason. The filter is kept as the owner
        // analysed and printed it.
        let reader = Reader::of(c, tbl, &id_column, filter, me);
        as_restricted(reader.owner, || reader.read(c, None, 0));
        let filter = reader.filter;
        // The extension's own bookkeeping, as its owner: an admin granted
        // this function needs no privilege on the table.
        as_queue_owner(|| {
            // (The backfill's foreign key keeps the kind until it is recorded.)
            if !super::grants::kind_exists(kind) {
                unknown_kind(kind);
            }
            let args = [tbl.into(), kind.into(), id_column.as_str().into(), filter.clone().into(), me.into()];
            let started = c.update(START, None, &args).unwrap_or_else(|e| panic!("starting the backfill: {e}"));
            let Ok(Some(id)) = started.first().get_one::<i64>() else {
                let running = c.select(RUNNING_ID, None, &[tbl.into(), kind.into()]).ok().and_then(|t| t.first().get_one::<i64>().ok().flatten());
                raise(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!("a backfill of {table} for kind \"{kind}\" is running (backfill_id {})", running.unwrap_or_default()),
                    Some("Wait for it, or stop it with outbox.cancel_backfill(backfill_id)."),
                );
            };
            // The worker reads the running backfills again when the kinds change.
            wake::kinds_changed();
            id
        })
    })
}

/// Moves backfill `backfill_id` to `to` from one of `from`, or raises. Only
/// a role that could have started it may: it decides what the worker reads
/// for whom.
fn transition(backfill_id: Option<i64>, from: &[State], to: State, hint: &str) {
    let id = require(backfill_id, "backfill_id");
    let from: Vec<String> = from.iter().map(|s| s.name().to_string()).collect();
    Spi::connect_mut(|c| {
        let found = as_queue_owner(|| {
            c.select(STATE_OF, None, &[id.into()]).ok().and_then(|t| t.first().get_two::<String, pg_sys::Oid>().ok())
        });
        let Some((Some(state), Some(run_as))) = found else {
            raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("backfill {id} does not exist"), None)
        };
        require_may_run_as(&format!("backfill {id}"), run_as);
        let moved = as_queue_owner(|| c.update(MOVE, None, &[id.into(), from.clone().into(), to.name().into()]).unwrap_or_else(|e| panic!("{e}")));
        if moved.is_empty() {
            raise(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("backfill {id} is {state}, not {}", from.join(" or ")),
                Some(hint),
            );
        }
    });
    wake::kinds_changed();
}

/// Stops a running backfill; the jobs it made stay.
#[pg_extern(sql = "
CREATE FUNCTION outbox.cancel_backfill(backfill_id bigint)
RETURNS void VOLATILE LANGUAGE c SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
")]
fn cancel_backfill(backfill_id: Option<i64>) {
    transition(backfill_id, &[State::Running], State::Cancelled, "Only a running backfill can be cancelled.");
}

/// Goes on with a failed or cancelled backfill from where it stopped.
#[pg_extern(sql = "
CREATE FUNCTION outbox.resume_backfill(backfill_id bigint)
RETURNS void VOLATILE LANGUAGE c SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
")]
fn resume_backfill(backfill_id: Option<i64>) {
    transition(
        backfill_id,
        &[State::Failed, State::Cancelled],
        State::Running,
        "A running backfill goes on by itself, and one that is done has nothing left; start another with outbox.backfill().",
    );
}

/// Checks every write of `outbox.backfills` but the worker's own progress,
/// however it is made: by these functions (as the extension's owner, after
/// they checked the caller), or a direct INSERT, UPDATE, DELETE or COPY by
/// an admin granted the table. The writer must be able to act as `run_as`,
/// before and after (and be a superuser for a superuser's): otherwise a
/// delegated admin could take over a superuser's backfill, or point it at
/// a table, a filter or a kind of its choosing. (The worker checks the
/// starter's rights, and the filter, again at every chunk all the same.)
#[pg_trigger(sql = "
CREATE FUNCTION outbox.backfills_checked() RETURNS trigger
LANGUAGE c SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
CREATE TRIGGER backfills_checked BEFORE INSERT OR UPDATE OR DELETE ON outbox.backfills
    FOR EACH ROW EXECUTE FUNCTION outbox.backfills_checked();
ALTER TABLE outbox.backfills ENABLE ALWAYS TRIGGER backfills_checked;
")]
fn backfills_checked<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, std::convert::Infallible> {
    let op = trigger.op();
    let kept = if matches!(op, Ok(PgTriggerOperation::Delete)) { trigger.old() } else { trigger.new() };
    if writing_progress() {
        return Ok(kept);
    }
    let td = trigger.trigger_data();
    // The row as it was (an UPDATE's or a DELETE's), and as it will be (an
    // INSERT's or an UPDATE's).
    let rows: &[*mut pg_sys::HeapTupleData] = match op {
        Ok(PgTriggerOperation::Update) => &[td.tg_trigtuple, td.tg_newtuple],
        _ => &[td.tg_trigtuple],
    };
    for &row in rows {
        // SAFETY: Postgres hands us the fired trigger, its rows and the
        // table's descriptor, valid for this call; the column is looked up
        // by name.
        let run_as = unsafe {
            let tupdesc = (*td.tg_relation).rd_att;
            let attno = pg_sys::SPI_fnumber(tupdesc, c"run_as".as_ptr());
            let mut is_null = false;
            let run_as = pg_sys::heap_getattr(row, attno, tupdesc, &mut is_null);
            if is_null { pg_sys::InvalidOid } else { pg_sys::Oid::from(run_as.value() as u32) }
        };
        require_may_run_as("a backfill", run_as);
    }
    Ok(kept)
}

#[cfg(test)]
mod qualified {
    #[test]
    fn every_statement_names_the_schema_of_its_functions_and_operators() {
        crate::testing::sql_check::assert_qualified(super::STATEMENTS);
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::testing::{assert_sqlstates, texts};
    use pgrx::prelude::*;

    fn setup() {
        Spi::run("SELECT outbox.register('item', 'http://h/{id}')").unwrap();
        Spi::run("CREATE TABLE public.items (id bigint PRIMARY KEY, code text, status text)").unwrap();
        Spi::run("INSERT INTO public.items SELECT g, 'c' || g, 'live' FROM generate_series(1, 10) g").unwrap();
    }

    /// A backfill is recorded for the worker, read as its starter, and
    /// what can't work is refused at once.
    #[pg_test]
    fn backfill_records_what_to_do_and_refuses_what_cannot_work() {
        setup();
        Spi::run("CREATE TEMPORARY TABLE tmp (id int PRIMARY KEY)").unwrap();
        let cases = [
            ("SELECT outbox.backfill(NULL, 'item')", "22004"),
            ("SELECT outbox.backfill('public.items', NULL)", "22004"),
            ("SELECT outbox.backfill('public.items', 'nope')", "42704"),
            ("SELECT outbox.backfill('tmp', 'item')", "42809"),
            ("SELECT outbox.backfill('public.items', 'item', id_column => 'nope')", "42703"),
            ("SELECT outbox.backfill('public.items', 'item', id_column => 'code')", "55000"),
            ("SELECT outbox.backfill('public.items', 'item', filter => 'status')", "42804"),
            ("SELECT outbox.backfill('public.items', 'item', filter => 'random() > 0.5')", "42P17"),
            // Evaluated as the table's owner: built-in immutable code only.
            ("CREATE FUNCTION public.f(bigint) RETURNS boolean STABLE LANGUAGE sql AS 'SELECT true'", "00000"),
            ("SELECT outbox.backfill('public.items', 'item', filter => 'public.f(id)')", "0A000"),
            ("SELECT outbox.backfill('public.items', 'item', filter => 'id::text::int > 0 AND now() > ''2000-01-01''')", "0A000"),
            ("SELECT outbox.backfill('public.items', 'item', filter => 'query_to_xml(''SELECT 1'', true, true, '''') IS NOT NULL')", "42P17"),
            ("SELECT outbox.backfill('public.items', 'item', filter => 'to_regclass(''public.items'') IS NOT NULL')", "0A000"),
            // Nor code that analysing it would run: a literal of a domain
            // (its check), a column of a type that is not built in.
            ("CREATE FUNCTION public.g(text) RETURNS boolean STRICT LANGUAGE plpgsql AS 'BEGIN CREATE TABLE public.ran (); RETURN true; END'", "00000"),
            ("CREATE DOMAIN public.d AS text CHECK (public.g(VALUE))", "00000"),
            ("SELECT outbox.backfill('public.items', 'item', filter => '''{x}''::public.d[] IS NOT NULL')", "0A000"),
            ("SELECT outbox.backfill('public.items', 'item', filter => '''x''::public.d IS NOT NULL')", "0A000"),
            ("SELECT outbox.backfill('public.items', 'item', filter => 'public.d(''x'') IS NOT NULL')", "0A000"),
            ("ALTER TABLE public.items ADD COLUMN dom public.d", "00000"),
            ("SELECT outbox.backfill('public.items', 'item', filter => 'dom IS NULL')", "0A000"),
            ("SELECT count(*) FROM public.ran", "42P01"),
            ("SELECT outbox.backfill('public.items', 'item', filter => 'status = ''live''')", "00000"),
            ("SELECT outbox.backfill('public.items', 'item')", "55000"),
            ("SELECT outbox.cancel_backfill(NULL)", "22004"),
            ("SELECT outbox.cancel_backfill(-1)", "42704"),
            ("SELECT outbox.resume_backfill((SELECT max(backfill_id) FROM outbox.backfills))", "55000"),
            ("SELECT outbox.cancel_backfill((SELECT max(backfill_id) FROM outbox.backfills))", "00000"),
            ("SELECT outbox.cancel_backfill((SELECT max(backfill_id) FROM outbox.backfills))", "55000"),
            ("SELECT outbox.backfill('public.items', 'item')", "00000"),
        ];
        assert_sqlstates(&cases);
        let rows = texts(
            "SELECT concat_ws(' ', tbl = 'public.items'::regclass, kind, id_column, filter, run_as, state, rows_estimate IS NOT NULL)
               FROM outbox.backfills ORDER BY backfill_id",
            &[],
        );
        assert_eq!(rows, ["t item id (status = 'live'::text) postgres cancelled t", "t item id postgres running t"]);
        // A code column with a unique index will do, not one with another.
        Spi::run("CREATE INDEX ON public.items (code)").unwrap();
        assert_sqlstates(&[("SELECT outbox.backfill('public.items', 'item', id_column => 'code')", "55000")]);
        Spi::run("CREATE UNIQUE INDEX ON public.items (code)").unwrap();
        assert_sqlstates(&[("SELECT outbox.backfill('public.items', 'item', id_column => 'code', filter => 'id > 2')", "55000")]);
        Spi::run("SELECT outbox.cancel_backfill(backfill_id) FROM outbox.backfills WHERE state = 'running'").unwrap();
        assert_sqlstates(&[("SELECT outbox.backfill('public.items', 'item', id_column => 'code', filter => 'id > 2')", "00000")]);
    }

    /// What the worker runs, and as whom, can't be changed through the table
    /// by an admin who could not start such a backfill.
    #[pg_test]
    fn the_table_refuses_a_backfill_as_a_role_the_writer_is_not() {
        setup();
        Spi::run("CREATE ROLE outbox_test_delegate; CREATE ROLE outbox_test_other").unwrap();
        Spi::run("GRANT USAGE ON SCHEMA outbox TO outbox_test_delegate").unwrap();
        Spi::run("GRANT SELECT, INSERT, UPDATE, DELETE ON outbox.backfills TO outbox_test_delegate").unwrap();
        Spi::run("GRANT SELECT ON public.items TO outbox_test_delegate").unwrap();
        Spi::run("GRANT EXECUTE ON FUNCTION outbox.cancel_backfill(bigint) TO outbox_test_delegate").unwrap();
        Spi::run("SELECT outbox.register('mine', 'http://h/{id}')").unwrap();
        Spi::run("INSERT INTO outbox.backfills (tbl, kind, id_column, run_as) VALUES ('public.items', 'item', 'id', 'postgres')").unwrap();
        Spi::run("SET ROLE outbox_test_delegate").unwrap();
        let cases = [
            // Pointing a superuser's backfill at another kind, or starting it
            // again: the worker would read as the table's owner for it.
            ("UPDATE outbox.backfills SET kind = 'mine', last_id = NULL WHERE run_as = 'postgres'::regrole", "42501"),
            ("UPDATE outbox.backfills SET state = 'running' WHERE run_as = 'postgres'::regrole", "42501"),
            ("SELECT outbox.cancel_backfill(backfill_id) FROM outbox.backfills WHERE run_as = 'postgres'::regrole", "42501"),
            ("INSERT INTO outbox.backfills (tbl, kind, id_column, run_as) VALUES ('public.items', 'item', 'code', 'postgres')", "42501"),
            ("INSERT INTO outbox.backfills (tbl, kind, id_column, run_as) VALUES ('public.items', 'item', 'code', 'outbox_test_other')", "42501"),
            ("UPDATE outbox.backfills SET filter = 'true) OR (true' WHERE run_as = 'postgres'::regrole", "42501"),
            ("UPDATE outbox.backfills SET run_as = 'outbox_test_other' WHERE run_as = 'postgres'::regrole", "42501"),
            // Nor taken over, nor deleted.
            ("UPDATE outbox.backfills SET run_as = 'outbox_test_delegate' WHERE run_as = 'postgres'::regrole", "42501"),
            ("DELETE FROM outbox.backfills WHERE run_as = 'postgres'::regrole", "42501"),
            // Its own, it may.
            ("INSERT INTO outbox.backfills (tbl, kind, id_column, run_as) VALUES ('public.items', 'mine', 'code', 'outbox_test_delegate')", "00000"),
            ("UPDATE outbox.backfills SET enqueued = 5, state = 'cancelled' WHERE run_as = 'outbox_test_delegate'::regrole", "00000"),
            ("DELETE FROM outbox.backfills WHERE run_as = 'outbox_test_delegate'::regrole", "00000"),
        ];
        assert_sqlstates(&cases);
        Spi::run("RESET ROLE").unwrap();
    }
}
