//! Backfills (`outbox.backfill`), done by the worker a chunk at a time.
//!
//! Each turn, for each running backfill whose kind has fewer than a quarter
//! chunk of backfilled jobs due, the worker reads the next [`CHUNK`] rows of
//! the table in the order of its id column, after `last_id`, and makes
//! backfilled jobs of those the filter holds for. The claim takes them only
//! after the kind's live jobs, so live changes never wait behind a backfill;
//! the queue never holds much more than a chunk of them, every chunk is one
//! short turn (no snapshot held for long, no giant transaction, a bounded
//! read whatever the filter), and a restarted worker goes on from
//! `last_id`.
//!
//! Who reads: the table's owner, in a security-restricted operation within
//! a deadline, as Postgres runs maintenance on a table. The owner controls
//! what reading its table runs (a column's type, an index predicate planned
//! on the way, a cast); run as the role that started the backfill, a
//! superuser's, that would be the owner's code with the starter's rights.
//! The starter's rights are checked at every chunk instead: it may still
//! read the table, and no row-level security applies to it that the owner
//! would escape. A chunk that can't run marks its backfill failed with the
//! reason; one that waited too long on a lock is tried again later.

use super::plans::{execute, types::*};
use crate::capture::row_filter;
use crate::pg::errors::raise;
use crate::pg::roles::as_restricted;
use crate::pg::settings::with_settings;
use crate::pg::subxact::{try_subtransaction, Caught};
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::{quote_identifier, SpiClient};
use std::cell::Cell;
use std::time::{Duration, Instant};

/// Rows read per turn and backfill.
const CHUNK: i64 = 1000;

/// How long a chunk may take, lock waits included.
const CHUNK_TIME: Duration = Duration::from_secs(2);

/// How long a backfill whose chunk ran out of time waits before the next:
/// doubling from the first to the last, and failing after so many in a row
/// (a lock held for an hour, a table too big to plan in time).
const AFTER_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_AFTER_TIMEOUT: Duration = Duration::from_secs(60);
const MOST_TIMEOUTS: u32 = 60;

/// How often the list of running backfills is read again when no commit
/// said it changed.
const REFRESH: Duration = Duration::from_secs(1);

/// Where a backfill is; `outbox.backfills.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Running,
    Done,
    Failed,
    Cancelled,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Done => "done",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
        }
    }
}

thread_local! {
    /// The worker is writing its own progress: `api::backfill`'s trigger
    /// lets it through whoever the backfill reads as. Only this process's
    /// own code sets it.
    static PROGRESS: Cell<bool> = const { Cell::new(false) };
}

/// Whether this backend is the worker writing a backfill's progress.
pub fn writing_progress() -> bool {
    PROGRESS.get()
}

/// The running backfills, oldest first.
const RUNNING: &str = "
SELECT backfill_id, tbl::oid, kind, id_column::text, filter, run_as::oid, last_id
  FROM outbox.backfills
 WHERE state OPERATOR(pg_catalog.=) 'running'
 ORDER BY backfill_id";

/// How many backfilled jobs of kind $1 are due, counted up to $2. (Live
/// ones go first whatever their number.)
const KIND_DUE: &str = "
SELECT pg_catalog.count(*)
  FROM (SELECT FROM outbox.queue
         WHERE kind OPERATOR(pg_catalog.=) $1 AND backfilled AND state OPERATOR(pg_catalog.=) 'pending'
           AND run_at OPERATOR(pg_catalog.<=) pg_catalog.now()
         LIMIT $2) d";

/// After a chunk: backfill $1 stands at $2 with $3 more ids enqueued, in
/// state $4, with error $5. Nothing if it is not running any more (an
/// admin cancelled it meanwhile).
const ADVANCE: &str = "
UPDATE outbox.backfills
   SET last_id = coalesce($2, last_id),
       enqueued = enqueued OPERATOR(pg_catalog.+) $3,
       state = $4,
       error = $5,
       updated_at = pg_catalog.now(),
       finished_at = CASE WHEN $4 OPERATOR(pg_catalog.<>) 'running' THEN pg_catalog.now() END
 WHERE backfill_id OPERATOR(pg_catalog.=) $1 AND state OPERATOR(pg_catalog.=) 'running'
RETURNING backfill_id";

/// What reading table $1 by column $2 takes, as it is now: the table,
/// qualified and quoted; whether it is still a table, and partitioned; its
/// owner; the column's type; its collation, qualified, if not its type's;
/// whether a unique btree index of the column's own order leads with it
/// (what keeps paging by it exact and each chunk an index range); whether
/// role $3 may read the table.
const TABLE_INFO: &str = "
SELECT pg_catalog.quote_ident(n.nspname) OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) pg_catalog.quote_ident(c.relname),
       c.relkind OPERATOR(pg_catalog.=) ANY ('{r,p}'::\"char\"[]),
       c.relkind OPERATOR(pg_catalog.=) 'p',
       c.relowner,
       a.atttypid,
       CASE WHEN a.attcollation OPERATOR(pg_catalog.<>) t.typcollation
            THEN (SELECT pg_catalog.quote_ident(cn.nspname) OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) pg_catalog.quote_ident(co.collname)
                    FROM pg_catalog.pg_collation co JOIN pg_catalog.pg_namespace cn ON cn.oid OPERATOR(pg_catalog.=) co.collnamespace
                   WHERE co.oid OPERATOR(pg_catalog.=) a.attcollation) END,
       EXISTS (SELECT FROM pg_catalog.pg_index i
                 JOIN pg_catalog.pg_class ic ON ic.oid OPERATOR(pg_catalog.=) i.indexrelid
                 JOIN pg_catalog.pg_am am ON am.oid OPERATOR(pg_catalog.=) ic.relam
                 JOIN pg_catalog.pg_opclass oc ON oc.oid OPERATOR(pg_catalog.=) i.indclass[0]
                WHERE i.indrelid OPERATOR(pg_catalog.=) c.oid AND i.indisunique AND i.indisvalid
                  AND i.indnkeyatts OPERATOR(pg_catalog.=) 1
                  AND i.indkey[0] OPERATOR(pg_catalog.=) a.attnum AND i.indpred IS NULL
                  AND am.amname OPERATOR(pg_catalog.=) 'btree' AND oc.opcdefault
                  AND i.indcollation[0] OPERATOR(pg_catalog.=) a.attcollation),
       pg_catalog.has_table_privilege($3::pg_catalog.oid, c.oid, 'SELECT')
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
  JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) c.oid
  JOIN pg_catalog.pg_type t ON t.oid OPERATOR(pg_catalog.=) a.atttypid
 WHERE c.oid OPERATOR(pg_catalog.=) $1 AND a.attname OPERATOR(pg_catalog.=) $2
   AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped";

/// The SQL statements of this module, for the qualification sweep.
#[cfg(test)]
pub(crate) const STATEMENTS: &[(&str, &str)] =
    &[("RUNNING", RUNNING), ("KIND_DUE", KIND_DUE), ("ADVANCE", ADVANCE), ("TABLE_INFO", TABLE_INFO)];

/// How to read a backfill's table: checked against the catalog as it is
/// now (by [`Reader::of`]), for one chunk.
pub struct Reader {
    /// The statement: ids after $1 in id order, at most $2 rows, each with
    /// whether the filter holds.
    sql: String,
    /// Who reads: the table's owner.
    pub owner: pg_sys::Oid,
    /// The id column's base type: what $1 is, made by that type's input
    /// function (never a cast or a domain's check, which the owner could
    /// write).
    base_type: pg_sys::Oid,
    /// The filter as analysed now, as the owner, and printed back.
    pub filter: Option<String>,
}

impl Reader {
    /// Checks, as the catalog stands, that `run_as` may still have table
    /// `tbl` read for it by `id_column` with `filter`, and says how. The
    /// filter is analysed again, as the table's owner: only built-in
    /// immutable functions and operators (`row_filter::EvaluatedBy`).
    /// Raises otherwise.
    pub fn of(c: &SpiClient<'_>, tbl: pg_sys::Oid, id_column: &str, filter: Option<&str>, run_as: pg_sys::Oid) -> Reader {
        let gone = |_| -> ! {
            raise(
                PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                format!("the table (oid {}) or its column \"{id_column}\" is gone", tbl.to_u32()),
                Some("Start a new backfill with outbox.backfill()."),
            )
        };
        let row = c
            .select(TABLE_INFO, None, &[tbl.into(), id_column.into(), run_as.into()])
            .unwrap_or_else(|e| panic!("reading the table: {e}"))
            .next()
            .map(|r| {
                (
                    r.get::<String>(1),
                    r.get::<bool>(2),
                    r.get::<bool>(3),
                    r.get::<pg_sys::Oid>(4),
                    r.get::<pg_sys::Oid>(5),
                    r.get::<String>(6),
                    r.get::<bool>(7),
                    r.get::<bool>(8),
                )
            });
        let Some((Ok(Some(table)), Ok(Some(is_table)), Ok(Some(partitioned)), Ok(Some(owner)), Ok(Some(typ)), Ok(collation), Ok(Some(indexed)), Ok(Some(may_read)))) = row
        else {
            gone(())
        };
        if !is_table {
            raise(PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE, format!("{table} is not a table any more"), Some("Only tables can be backfilled."));
        }
        crate::capture::ids::require_canonical(id_column, typ);
        if !indexed {
            raise(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("column \"{id_column}\" of {table} leads no unique btree index in its own order"),
                Some("A backfill pages through the table in the order of its id column, which takes a unique index on it alone (a primary key will do), without a predicate, of the column's collation and default operator class."),
            );
        }
        if !may_read {
            raise(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("role \"{}\" may not read {table}", crate::pg::roles::role_name(run_as)),
                Some("A backfill reads only what the role that starts it may read: GRANT SELECT on the table to it."),
            );
        }
        // SAFETY: a catalog lookup of a table that exists; no error raised.
        let rls = unsafe { pg_sys::check_enable_rls(tbl, run_as, true) };
        if rls == pg_sys::CheckEnableRlsResult::RLS_ENABLED as i32 {
            raise(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!("row-level security of {table} applies to role \"{}\"", crate::pg::roles::role_name(run_as)),
                Some("A backfill reads the table as its owner, which its policies don't restrict: start it as a role they don't restrict either (the owner, or one with BYPASSRLS)."),
            );
        }
        let id = quote_identifier(id_column);
        // A partitioned table's rows are its partitions'.
        let only = if partitioned { "" } else { "ONLY " };
        let collation = collation.map_or(String::new(), |c| format!(" COLLATE {c}"));
        let filter = filter.map(|f| {
            as_restricted(owner, || row_filter::analyze(tbl, &table, f, row_filter::EvaluatedBy::TheOwner).plain)
        });
        let holds = filter.as_ref().map_or("true".to_string(), |f| format!("coalesce({f}, false)"));
        let sql = format!(
            "SELECT pg_catalog.format('%s', {id}), {holds}
  FROM {only}{table}
 WHERE {id} IS NOT NULL AND ($1 IS NULL OR {id} OPERATOR(pg_catalog.>) $1{collation})
 ORDER BY {id}{collation}
 LIMIT $2"
        );
        // SAFETY: a syscache lookup of a type that exists.
        let base_type = unsafe { pg_sys::getBaseType(typ) };
        Reader { sql, owner, base_type, filter }
    }

    /// Reads the ids after `after` (text, as [`Reader::sql`] spells them):
    /// at most `limit` rows, each with whether the filter holds. Run as the
    /// table's owner ([`super::render::run_limited`]).
    pub fn read(&self, c: &SpiClient<'_>, after: Option<&str>, limit: i64) -> Vec<(String, bool)> {
        let after = after.map(|text| {
            let text = std::ffi::CString::new(text).expect("an id has no NUL");
            let (mut input, mut ioparam) = (pg_sys::InvalidOid, pg_sys::InvalidOid);
            // SAFETY: the input function of a built-in base type or an enum
            // (require_canonical), applied to text of its own output.
            unsafe {
                pg_sys::getTypeInputInfo(self.base_type, &mut input, &mut ioparam);
                pg_sys::OidInputFunctionCall(input, text.as_ptr().cast_mut(), ioparam, -1)
            }
        });
        let after = match after {
            // SAFETY: the datum was made above for base_type, and lives in
            // the current memory context until the statement is done.
            Some(d) => unsafe { DatumWithOid::new(d, self.base_type) },
            None => DatumWithOid::null_oid(self.base_type),
        };
        c.select(&self.sql, None, &[after, limit.into()])
            .unwrap_or_else(|e| panic!("{e}"))
            .filter_map(|r| Some((r.get::<String>(1).ok()??, r.get::<bool>(2).ok()??)))
            .collect()
    }
}

/// A running backfill, as the worker last read it.
struct Running {
    id: i64,
    tbl: pg_sys::Oid,
    kind: String,
    id_column: String,
    filter: Option<String>,
    run_as: pg_sys::Oid,
    last_id: Option<String>,
    /// Chunks in a row that ran out of time or waited too long on a lock,
    /// and not before when the next may run.
    timeouts: u32,
    not_before: Option<Instant>,
}

/// What a turn did with one backfill.
enum Step {
    /// Its kind has enough due, or it waits after a timeout.
    Wait,
    /// A chunk read: the ids the filter holds for, where it stands, whether
    /// the table is done.
    Read { ids: Vec<String>, last: Option<String>, done: bool },
    /// It can't go on.
    Failed(Caught),
    /// Its chunk ran out of time or waited too long on a lock.
    TimedOut(Caught),
}

#[derive(Default)]
pub struct Backfills {
    running: Vec<Running>,
    read_at: Option<Instant>,
    /// Which running backfill's turn it is: one chunk a turn, in turn, so
    /// that a turn waits on one table at most.
    next: usize,
    /// Reading or writing `outbox.backfills` failed (the worker's role may
    /// not): said once, tried again at the next refresh.
    refused: bool,
}

impl Backfills {
    /// Reads the running backfills again at the next step.
    pub fn forget(&mut self) {
        self.read_at = None;
    }

    /// Step: a chunk of the next running backfill whose kind has few
    /// backfilled jobs due. Nothing in a database still on 0.2.0. Returns
    /// whether it read one and goes on: the next turn should come at once,
    /// as for a full batch, even when the chunk made no job (a filter that
    /// held for none).
    pub fn step(&mut self, c: &mut SpiClient<'_>) -> bool {
        if self.read_at.is_none_or(|at| at.elapsed() >= REFRESH) {
            self.read_at = Some(Instant::now());
            self.running = if crate::schema::at_0_3() { self.read(c) } else { Vec::new() };
        }
        if self.running.is_empty() {
            return false;
        }
        let at = self.next % self.running.len();
        self.next = at + 1;
        let b = &mut self.running[at];
        let step = step(c, b);
        let read = matches!(step, Step::Read { .. });
        // The jobs and the progress go together, or neither: in one
        // subtransaction, waiting on no lock for long (an admin's open
        // transaction holding a job or the backfill's row).
        let written = try_subtransaction(std::panic::AssertUnwindSafe(|| {
            with_settings(&[(c"lock_timeout", c"100ms")], || advance(c, b, step))
        }));
        match written {
            Ok(true) => read,
            Ok(false) => {
                self.running.remove(at);
                false
            }
            Err(e) if e.is_transient() => false,
            Err(e) => {
                self.refuse(&e);
                self.running.clear();
                false
            }
        }
    }

    fn refuse(&mut self, e: &Caught) {
        if !self.refused {
            warning!("outbox worker: backfills wait: {} (SQLSTATE {}); see the README's Security section", e.message, e.sqlstate);
        }
        self.refused = true;
    }

    fn read(&mut self, c: &mut SpiClient<'_>) -> Vec<Running> {
        let rows = try_subtransaction(std::panic::AssertUnwindSafe(|| {
            c.select(RUNNING, None, &[])
                .unwrap_or_else(|e| panic!("{e}"))
                .filter_map(|r| {
                    Some(Running {
                        id: r.get(1).ok()??,
                        tbl: r.get(2).ok()??,
                        kind: r.get(3).ok()??,
                        id_column: r.get(4).ok()??,
                        filter: r.get(5).ok()?,
                        run_as: r.get(6).ok()??,
                        last_id: r.get(7).ok()?,
                        timeouts: 0,
                        not_before: None,
                    })
                })
                .collect::<Vec<_>>()
        }));
        match rows {
            Ok(rows) => {
                // Waits after timeouts outlive a refresh.
                let before = std::mem::take(&mut self.running);
                self.refused = false;
                rows.into_iter()
                    .map(|mut b| {
                        if let Some(old) = before.iter().find(|o| o.id == b.id) {
                            (b.timeouts, b.not_before) = (old.timeouts, old.not_before);
                        }
                        b
                    })
                    .collect()
            }
            Err(e) => {
                self.refuse(&e);
                Vec::new()
            }
        }
    }
}

/// Reads backfill `b`'s next chunk, if its kind has few backfilled jobs due.
fn step(c: &mut SpiClient<'_>, b: &mut Running) -> Step {
    if b.not_before.is_some_and(|at| at > Instant::now()) {
        return Step::Wait;
    }
    let due = execute(c, KIND_DUE, &[TEXT, INT8], &[b.kind.as_str().into(), (CHUNK / 4).into()])
        .and_then(|t| t.first().get_one::<i64>())
        .unwrap_or_else(|e| panic!("backfill: {e}"))
        .unwrap_or(0);
    if due >= CHUNK / 4 {
        return Step::Wait;
    }
    // Analysing the filter locks the table: never for long.
    let reader = try_subtransaction(std::panic::AssertUnwindSafe(|| {
        with_settings(&[(c"lock_timeout", c"100ms")], || Reader::of(c, b.tbl, &b.id_column, b.filter.as_deref(), b.run_as))
    }));
    let reader = match reader {
        Ok(reader) => reader,
        Err(e) if e.is_transient() => return Step::TimedOut(e),
        Err(e) => return Step::Failed(e),
    };
    let rows = super::render::run_limited(reader.owner, Instant::now() + CHUNK_TIME, std::panic::AssertUnwindSafe(|| {
        reader.read(c, b.last_id.as_deref(), CHUNK)
    }));
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) if e.is_transient() => return Step::TimedOut(e),
        Err(e) => return Step::Failed(e),
    };
    let done = (rows.len() as i64) < CHUNK;
    let last = rows.last().map(|(id, _)| id.clone());
    let ids = rows.into_iter().filter(|(_, holds)| *holds).map(|(id, _)| id).collect();
    Step::Read { ids, last, done }
}

/// Sets [`PROGRESS`] while alive; an ERROR's unwinding clears it too.
struct WritingProgress;

impl WritingProgress {
    fn start() -> WritingProgress {
        PROGRESS.set(true);
        WritingProgress
    }
}

impl Drop for WritingProgress {
    fn drop(&mut self) {
        PROGRESS.set(false);
    }
}

/// Enqueues what `step` read of backfill `b` and writes its progress;
/// whether it is still running.
fn advance(c: &mut SpiClient<'_>, b: &mut Running, step: Step) -> bool {
    let (state, last, enqueued, error) = match step {
        Step::Wait => return true,
        Step::TimedOut(e) if b.timeouts < MOST_TIMEOUTS => {
            b.timeouts += 1;
            let wait = crate::rules::policy::backoff(b.timeouts, AFTER_TIMEOUT, MAX_AFTER_TIMEOUT);
            b.not_before = Some(Instant::now() + wait);
            if b.timeouts == 1 {
                log!(
                    "outbox worker: backfill {} of kind \"{}\" waits: reading its table ran out of time ({}); trying again in {} ms",
                    b.id,
                    b.kind,
                    e.message,
                    wait.as_millis()
                );
            }
            return true;
        }
        Step::TimedOut(e) | Step::Failed(e) => {
            warning!("outbox worker: backfill {} of kind \"{}\" failed: {} (SQLSTATE {})", b.id, b.kind, e.message, e.sqlstate);
            (State::Failed, None, 0, Some(format!("{} (SQLSTATE {})", e.message, e.sqlstate)))
        }
        Step::Read { ids, last, done } => {
            b.timeouts = 0;
            (if done { State::Done } else { State::Running }, last, enqueue(c, &b.kind, ids), None)
        }
    };
    let args: [DatumWithOid; 5] = [b.id.into(), last.clone().into(), enqueued.into(), state.name().into(), error.into()];
    let written = {
        let _progress = WritingProgress::start();
        execute(c, ADVANCE, &[INT8, TEXT, INT8, TEXT, TEXT], &args).unwrap_or_else(|e| panic!("backfill: {e}")).len()
    };
    let still_running = written == 1;
    if still_running && state == State::Done {
        log!("outbox worker: backfill {} of kind \"{}\" is done", b.id, b.kind);
    }
    if let Some(last) = last {
        b.last_id = Some(last);
    }
    still_running && state == State::Running
}

/// Makes jobs of `ids`, coalescing with fresh ones; returns how many ids
/// were enqueued. Ids no record may have (empty, over 1024 bytes) are
/// skipped, and said.
fn enqueue(c: &mut SpiClient<'_>, kind: &str, mut ids: Vec<String>) -> i64 {
    let before = ids.len();
    ids.retain(|id| crate::capture::ids::is_valid(id));
    if ids.len() < before {
        warning!("outbox worker: a backfill of kind \"{kind}\" skipped {} id(s) that are empty or longer than 1024 bytes", before - ids.len());
    }
    let n = ids.len() as i64;
    if n > 0 {
        let args: [DatumWithOid; 2] = [kind.into(), ids.into()];
        execute(c, super::queue::ENQUEUE_BACKFILLED, &[TEXT, TEXT_ARRAY], &args).unwrap_or_else(|e| panic!("backfill: {e}"));
    }
    n
}

#[cfg(test)]
mod qualified {
    #[test]
    fn every_statement_names_the_schema_of_its_functions_and_operators() {
        crate::testing::sql_check::assert_qualified(super::STATEMENTS);
    }
}
