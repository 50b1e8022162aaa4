//! Backfills (`outbox.backfill`), done by the worker a chunk at a time.
//!
//! Each turn, for each running backfill whose kind has fewer than a quarter
//! chunk of jobs due, the worker reads the next [`CHUNK`] ids of the table
//! in the order of its id column, after `last_id`, as the role that started
//! the backfill, and makes them jobs, coalescing as the absorb does. So the
//! queue never holds much more than a chunk of backfilled jobs, live changes
//! wait behind at most that, every chunk is one short turn (no snapshot
//! held for long, no giant transaction), and a restarted worker goes on
//! from `last_id`. A chunk that fails (the table dropped, a privilege
//! revoked) marks its backfill failed with the error; the others go on.

use super::plans::{execute, types::*};
use crate::pg::subxact::try_subtransaction;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::{quote_identifier, SpiClient};
use std::time::{Duration, Instant};

/// Ids read per turn and backfill.
const CHUNK: i64 = 1000;

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

/// The running backfills, oldest first.
const RUNNING: &str = "
SELECT backfill_id, tbl::oid, kind, id_column::text, filter, run_as::oid, last_id
  FROM outbox.backfills
 WHERE state OPERATOR(pg_catalog.=) 'running'
 ORDER BY backfill_id";

/// How many jobs of kind $1 are due, counted up to $2.
const KIND_DUE: &str = "
SELECT pg_catalog.count(*)
  FROM (SELECT FROM outbox.queue
         WHERE kind OPERATOR(pg_catalog.=) $1 AND state OPERATOR(pg_catalog.=) 'pending'
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

/// What a chunk's statement needs of table $1 and column $2: the table,
/// qualified and quoted; whether it is partitioned; the column's type as
/// the current search_path would name it; its collation, qualified, if it
/// is not its type's.
const COLUMN_INFO: &str = "
SELECT pg_catalog.quote_ident(n.nspname) OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) pg_catalog.quote_ident(c.relname),
       c.relkind OPERATOR(pg_catalog.=) 'p',
       pg_catalog.format_type(a.atttypid, a.atttypmod),
       CASE WHEN a.attcollation OPERATOR(pg_catalog.<>) t.typcollation
            THEN (SELECT pg_catalog.quote_ident(cn.nspname) OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) pg_catalog.quote_ident(co.collname)
                    FROM pg_catalog.pg_collation co JOIN pg_catalog.pg_namespace cn ON cn.oid OPERATOR(pg_catalog.=) co.collnamespace
                   WHERE co.oid OPERATOR(pg_catalog.=) a.attcollation) END
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
  JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) c.oid
  JOIN pg_catalog.pg_type t ON t.oid OPERATOR(pg_catalog.=) a.atttypid
 WHERE c.oid OPERATOR(pg_catalog.=) $1 AND a.attname OPERATOR(pg_catalog.=) $2 AND NOT a.attisdropped";

/// The SQL statements of this module, for the qualification sweep.
#[cfg(test)]
pub(crate) const STATEMENTS: &[(&str, &str)] =
    &[("RUNNING", RUNNING), ("KIND_DUE", KIND_DUE), ("ADVANCE", ADVANCE), ("COLUMN_INFO", COLUMN_INFO)];

/// The statement that reads a chunk: the ids of table `tbl`'s rows after
/// $1 (text; NULL: from the start) in the order of `id_column`, at most $2,
/// as the row trigger spells them, those `filter` (as Postgres printed it)
/// holds for. Raises if the table or the column is gone.
pub fn chunk_statement(c: &SpiClient<'_>, tbl: pg_sys::Oid, id_column: &str, filter: Option<&str>) -> String {
    let found = c
        .select(COLUMN_INFO, None, &[tbl.into(), id_column.into()])
        .unwrap_or_else(|e| panic!("reading the table: {e}"))
        .next()
        .map(|r| (r.get::<String>(1), r.get::<bool>(2), r.get::<String>(3), r.get::<String>(4)));
    let Some((Ok(Some(table)), Ok(Some(partitioned)), Ok(Some(typ)), Ok(collation))) = found else {
        raise_gone(tbl, id_column)
    };
    let collation = collation.map_or(String::new(), |c| format!(" COLLATE {c}"));
    let id = quote_identifier(id_column);
    // A partitioned table's rows are its partitions'.
    let only = if partitioned { "" } else { "ONLY " };
    let filter = filter.map_or(String::new(), |f| format!("\n   AND ({f})"));
    format!(
        "SELECT pg_catalog.format('%s', {id})
  FROM {only}{table}
 WHERE {id} IS NOT NULL
   AND ($1::text IS NULL OR {id} OPERATOR(pg_catalog.>) (CAST($1::text AS {typ}){collation})){filter}
 ORDER BY {id}{collation}
 LIMIT $2"
    )
}

fn raise_gone(tbl: pg_sys::Oid, id_column: &str) -> ! {
    crate::pg::errors::raise(
        PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
        format!("the backfilled table (oid {}) or its column \"{id_column}\" is gone", tbl.to_u32()),
        Some("Start a new backfill with outbox.backfill()."),
    )
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
}

/// What one chunk did.
struct Chunk {
    ids: Vec<String>,
    /// The last id read, valid or not: where the next chunk starts.
    last: Option<String>,
    /// Fewer than a chunk: the table is done.
    done: bool,
}

#[derive(Default)]
pub struct Backfills {
    running: Vec<Running>,
    read_at: Option<Instant>,
    /// The worker's role may not read or write `outbox.backfills`: said once.
    refused: bool,
}

impl Backfills {
    /// Reads the running backfills again at the next step.
    pub fn forget(&mut self) {
        self.read_at = None;
    }

    /// Step: a chunk of each running backfill whose kind has little due.
    /// Nothing in a database still on 0.2.0.
    pub fn step(&mut self, c: &mut SpiClient<'_>) {
        if self.read_at.is_none_or(|at| at.elapsed() >= REFRESH) {
            self.read_at = Some(Instant::now());
            self.running = if crate::schema::at_0_3() { self.read(c) } else { Vec::new() };
        }
        // A backfill that is done or failed leaves the list.
        self.running.retain_mut(|b| {
            let due = execute(c, KIND_DUE, &[TEXT, INT8], &[b.kind.as_str().into(), (CHUNK / 4).into()])
                .and_then(|t| t.first().get_one::<i64>())
                .unwrap_or_else(|e| panic!("backfill: {e}"))
                .unwrap_or(0);
            if due >= CHUNK / 4 {
                return true;
            }
            let read = try_subtransaction(std::panic::AssertUnwindSafe(|| chunk(c, b)));
            let (state, last, enqueued, error) = match read {
                Ok(chunk) => {
                    let n = enqueue(c, &b.kind, chunk.ids);
                    let state = if chunk.done { State::Done } else { State::Running };
                    (state, chunk.last, n, None)
                }
                Err(e) => {
                    warning!("outbox worker: backfill {} of kind \"{}\" failed: {} (SQLSTATE {})", b.id, b.kind, e.message, e.sqlstate);
                    (State::Failed, None, 0, Some(format!("{} (SQLSTATE {})", e.message, e.sqlstate)))
                }
            };
            let args: [DatumWithOid; 5] = [b.id.into(), last.clone().into(), enqueued.into(), state.name().into(), error.into()];
            let still_running = execute(c, ADVANCE, &[INT8, TEXT, INT8, TEXT, TEXT], &args).unwrap_or_else(|e| panic!("backfill: {e}")).len() == 1;
            if !still_running {
                return false;
            }
            if state == State::Done {
                log!("outbox worker: backfill {} of kind \"{}\" is done", b.id, b.kind);
            }
            if let Some(last) = last {
                b.last_id = Some(last);
            }
            state == State::Running
        });
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
                    })
                })
                .collect::<Vec<_>>()
        }));
        match rows {
            Ok(rows) => {
                self.refused = false;
                rows
            }
            Err(e) => {
                if !self.refused {
                    warning!("outbox worker: backfills wait: reading outbox.backfills failed: {} (SQLSTATE {})", e.message, e.sqlstate);
                }
                self.refused = true;
                Vec::new()
            }
        }
    }
}

/// Reads backfill `b`'s next chunk, as its role.
fn chunk(c: &mut SpiClient<'_>, b: &Running) -> Chunk {
    crate::pg::roles::as_restricted(b.run_as, || {
        let sql = chunk_statement(c, b.tbl, &b.id_column, b.filter.as_deref());
        let ids: Vec<String> = c
            .select(&sql, None, &[b.last_id.clone().into(), CHUNK.into()])
            .unwrap_or_else(|e| panic!("{e}"))
            .filter_map(|r| r.get::<String>(1).ok().flatten())
            .collect();
        let done = (ids.len() as i64) < CHUNK;
        let last = ids.last().cloned();
        Chunk { ids, last, done }
    })
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
