//! Every transition of a job, one named statement each, guarded by the
//! state it leaves (`... AND state = 'running'`); the worker's batches go
//! through arrays. Admins' and restores' transitions are here too, run from
//! `api::admin` and `capture::restore`.
//!
//! ```text
//! from       statement               to
//! (inbox)    ABSORB_INBOX            pending, coalesced into a fresh job
//! pending    CLAIM                   running
//! pending    DEAD_LETTER_ORPHANS     dead (its kind was unregistered)
//! running    COMPLETE, COMPLETE_MOVED  (gone)
//! running    FAIL                    pending after a delay, or dead
//! running    RECOVER_RUNNING         pending (a worker starts)
//! running    RUNNING_COPIED          pending (rows a restore's COPY added)
//! dead       RETRY, RETRY_DEAD       pending, attempts from zero
//! dead       PURGE_DEAD              (gone)
//! any        DISCARD                 (gone)
//! ```
//! When ABSORB_INBOX fails on a bad row, `quarantine` moves the rows one at
//! a time with ABSORB_ROW, and sets a row that still fails aside with
//! REJECT_ROW (into `outbox.rejected`, shown as dead in `outbox.jobs`).
//! A *fresh* job (pending, never attempted) is what later changes of its
//! record coalesce into: `schema::fresh!`.

use super::plans::{execute, types::*};
use crate::schema::{fresh, JobState};
use pgrx::datum::DatumWithOid;
use pgrx::spi::SpiClient;

/// What the worker's role may not do that the worker does, one
/// "PRIVILEGE on TABLE" each (NULL: nothing). `has_table_privilege` given
/// several privileges answers whether *any* is held, so they go one by one.
pub const MISSING_PRIVILEGES: &str = "
SELECT pg_catalog.string_agg(pg_catalog.format('%s on %s', p, t), ', ' ORDER BY t, p)
  FROM (VALUES ('outbox.queue', 'SELECT'), ('outbox.queue', 'INSERT'),
               ('outbox.queue', 'UPDATE'), ('outbox.queue', 'DELETE'),
               ('outbox.inbox', 'SELECT'), ('outbox.inbox', 'INSERT'), ('outbox.inbox', 'DELETE'),
               ('outbox.kinds', 'SELECT'),
               ('outbox.kind_stats', 'SELECT'), ('outbox.kind_stats', 'UPDATE'),
               ('outbox.rejected', 'INSERT')) AS v(t, p)
 WHERE NOT pg_catalog.has_table_privilege(t, p)";

/// Startup repair: deliveries that a dead worker left `running` go back to
/// `pending`, due now. They stay out of coalescing (last_attempt_at is set).
pub const RECOVER_RUNNING: &str = "
UPDATE outbox.queue SET state = 'pending', run_at = pg_catalog.now()
 WHERE state OPERATOR(pg_catalog.=) 'running'";

/// Jobs whose kind was unregistered under them cannot be delivered.
pub const DEAD_LETTER_ORPHANS: &str = "
UPDATE outbox.queue q
   SET state = 'dead', last_error = 'kind is not registered', last_attempt_at = pg_catalog.now()
 WHERE q.state OPERATOR(pg_catalog.=) 'pending'
   AND NOT EXISTS (SELECT 1 FROM outbox.kinds k WHERE k.kind OPERATOR(pg_catalog.=) q.kind)";

/// A restore's COPY brings back, `running`, jobs that were being delivered
/// when the dump was taken: the rows the current (sub)transaction ($1, its
/// xid) added go back to `pending`, as a worker's restart does with its own.
pub const RUNNING_COPIED: &str = "
UPDATE outbox.queue SET state = 'pending', run_at = pg_catalog.now()
 WHERE state OPERATOR(pg_catalog.=) 'running' AND xmin OPERATOR(pg_catalog.=) $1::text::xid";

/// `outbox.retry($1)`: a dead job runs again, due now, attempts from zero.
pub const RETRY: &str = "
UPDATE outbox.queue SET state = 'pending', run_at = pg_catalog.now(), attempts = 0
 WHERE job_id OPERATOR(pg_catalog.=) $1 AND state OPERATOR(pg_catalog.=) 'dead'";

/// `outbox.retry_dead($1)`: every dead job of kind $1 (NULL: of every kind).
pub const RETRY_DEAD: &str = "
UPDATE outbox.queue SET state = 'pending', run_at = pg_catalog.now(), attempts = 0
 WHERE state OPERATOR(pg_catalog.=) 'dead'
   AND ($1::text IS NULL OR kind OPERATOR(pg_catalog.=) $1::text)";

/// `outbox.discard($1)`: a job goes, whatever its state.
pub const DISCARD: &str = "DELETE FROM outbox.queue WHERE job_id OPERATOR(pg_catalog.=) $1";

/// `outbox.purge_dead($1)`: dead jobs last tried at least $1 ago go.
pub const PURGE_DEAD: &str = "
DELETE FROM outbox.queue
 WHERE state OPERATOR(pg_catalog.=) 'dead'
   AND coalesce(last_attempt_at, enqueued_at) OPERATOR(pg_catalog.<=) (pg_catalog.now() OPERATOR(pg_catalog.-) $1::interval)";

/// How changes become jobs, in [`ABSORB_INBOX`] and [`ABSORB_ROW`]: the
/// rows of `changed c` (kind, id, enqueued_at, run_at, registered) coalesce
/// into their record's fresh job, or make one; a kind nobody registered
/// makes a dead job. A macro, so that the statements take it in with
/// `concat!`; `insert_changes!(backfilled)` makes backfilled jobs.
macro_rules! insert_changes {
    () => {
        insert_changes!("", "")
    };
    (backfilled) => {
        insert_changes!(", backfilled", ", true")
    };
    ($column:literal, $value:literal) => {
        concat!(
            "INSERT INTO outbox.queue AS q (kind, id, enqueued_at, run_at, state, last_attempt_at, last_error",
            $column,
            ")
    SELECT c.kind, c.id, c.enqueued_at, c.run_at,
           CASE WHEN c.registered THEN 'pending' ELSE 'dead' END,
           CASE WHEN NOT c.registered THEN pg_catalog.now() END,
           CASE WHEN NOT c.registered THEN 'kind is not registered' END",
            $value,
            "
      FROM changed c
    ON CONFLICT (kind, id) WHERE ",
            fresh!(),
            " DO NOTHING"
        )
    };
}

/// A job's lane in a statement, for table alias `$alias`: its `backfilled`
/// column, or `false` in a database still on 0.2.0, whose queue has no
/// lanes (`schema::at_0_3`). Statements that name it come in both
/// versions, `v0_3` and `v0_2`, picked by [`for_schema`].
macro_rules! backfilled {
    (v0_3, $alias:literal) => {
        concat!($alias, ".backfilled")
    };
    (v0_2, $alias:literal) => {
        "false"
    };
}

/// In an UPDATE's SET list, a job made live: a change joined it.
macro_rules! made_live {
    (v0_3) => {
        ", backfilled = false"
    };
    (v0_2) => {
        ""
    };
}

/// The statement for the database's version: `v0_3`, or `v0_2` for a
/// database still on 0.2.0 (see [`backfilled!`]).
pub fn for_schema(v0_3: &'static str, v0_2: &'static str) -> &'static str {
    if crate::schema::at_0_3() {
        v0_3
    } else {
        v0_2
    }
}

/// A backfill's chunk: ids $2 of kind $1 become backfilled jobs, due now.
/// A record with a fresh job keeps it: that job delivers the record's
/// state, and a live one stays live.
pub const ENQUEUE_BACKFILLED: &str = concat!(
    "WITH changed AS (
    SELECT $1::text AS kind, u.id, pg_catalog.now() AS enqueued_at, pg_catalog.now() AS run_at, true AS registered
      FROM pg_catalog.unnest($2::text[]) AS u(id)
)
",
    insert_changes!(backfilled)
);

/// Moves the inbox (every change, tracked or enqueued) into the queue, about
/// $1 changes per call: whole inbox rows (each holds many ids) while the
/// count stays under $1. This is where changes coalesce, and the only
/// invariant it rests on is that a record's body is rendered after every
/// change it absorbed had committed: the inbox rows it reads are committed,
/// and the worker claims and renders only after this statement.
/// - A record with a fresh job (pending, never attempted) coalesces into it:
///   the insert's `ON CONFLICT` finds it on `queue_fresh_key`, whoever made
///   it and however the queue was written since.
/// - A delay means "not before": a record's job is due at the earliest time
///   its changes ask for, and a change that asks for an earlier time than
///   its fresh job's moves the job (`sooner`).
/// - A change that joins a backfilled fresh job makes it live (`sooner`
///   too): a change never waits behind a backfill.
/// - Only kinds with a pending job due later than now, or a backfilled one,
///   look for such jobs: two probes of `queue_due` per kind otherwise. A job another transaction holds locked (an admin's
///   `SELECT ... FOR UPDATE`) is skipped, not waited for, and the changes
///   that would have moved it go back to the inbox for a later turn.
/// The scan starts at heap block $2: the blocks before it hold mostly rows
/// absorbed a moment ago, dead until vacuum.
/// ($3, $4) are (kind, id) pairs whose fresh job an open transaction is
/// inserting or changing (see `in_flux`): their changes go back to the inbox
/// instead of waiting for it.
/// Returns how many changes moved into the queue (repeats of a record
/// included), the last block they came from, and how many went back to the
/// inbox.
macro_rules! absorb_inbox {
    ($v:ident) => { concat!(
    "
WITH picked AS (
    SELECT ctid, pg_catalog.sum(n) OVER (ROWS UNBOUNDED PRECEDING) OPERATOR(pg_catalog.-) n AS before
      FROM (SELECT ctid, coalesce(pg_catalog.cardinality(ids), 1) AS n FROM outbox.inbox
             WHERE ctid OPERATOR(pg_catalog.>=) pg_catalog.format('(%s,0)', $2)::tid
             LIMIT $1) r
), moved AS (
    -- A join, not `ctid = ANY (ARRAY(...))`: the generic plan read the
    -- inbox whole and compared each row with every picked ctid, half an
    -- absorb's time (5 of 10 ms for 300 changes in a 2,000-row inbox).
    DELETE FROM outbox.inbox i
     USING picked p
     WHERE i.ctid OPERATOR(pg_catalog.=) p.ctid AND p.before OPERATOR(pg_catalog.<) $1
       AND i.ctid OPERATOR(pg_catalog.>=) pg_catalog.format('(%s,0)', $2)::tid
    RETURNING i.kind, i.id, i.ids, i.enqueued_at, i.run_at, i.ctid
), later AS (
    -- ROWS FROM, which unnest(a, b) stands for: pg_catalog.unnest(a, b)
    -- is not that syntax.
    SELECT * FROM ROWS FROM (pg_catalog.unnest($3::text[]), pg_catalog.unnest($4::text[])) AS l(kind, id)
), changed AS (
    -- Rows of one change hold it in id, the others in ids. unnest() in the
    -- select list: a function scan per row would build and read back a
    -- tuplestore for each inbox row's ids.
    -- `= ANY (subquery)` and `NOT (... = ANY (subquery))` are what IN and
    -- NOT IN stand for, with the operator named.
    -- A delay whose time has passed is due now, not in the past: the
    -- claim's cursors run ahead of jobs due earlier than those just claimed.
    SELECT u.kind, u.id, pg_catalog.min(u.enqueued_at) AS enqueued_at,
           greatest(pg_catalog.min(coalesce(u.run_at, pg_catalog.now())), pg_catalog.now()) AS run_at,
           u.kind OPERATOR(pg_catalog.=) ANY (SELECT kind FROM outbox.kinds) AS registered
      FROM (SELECT kind, id, enqueued_at, run_at FROM moved WHERE ids IS NULL
            UNION ALL
            SELECT kind, pg_catalog.unnest(ids), enqueued_at, run_at FROM moved WHERE ids IS NOT NULL) u
     WHERE pg_catalog.cardinality($4) OPERATOR(pg_catalog.=) 0
        OR NOT ((u.kind, u.id) OPERATOR(pg_catalog.=) ANY (SELECT kind, id FROM later))
     GROUP BY u.kind, u.id
), absorbed AS (
    -- A change of a kind nobody registered can never be delivered: it goes
    -- straight to dead, where an admin sees it (a dead job never coalesces).
    ",
    insert_changes!(),
    "
), waiting_kinds AS (
    -- A probe of queue_due per kind and lane: a LATERAL subquery with a
    -- LIMIT is planned as it reads. (An EXISTS became a merge join reading
    -- every pending job of the kind, two thirds of an absorb's time.)
    SELECT k.kind FROM (SELECT DISTINCT kind FROM changed) k
     CROSS JOIN LATERAL ((SELECT FROM outbox.queue d
                           WHERE d.kind OPERATOR(pg_catalog.=) k.kind
                             AND NOT ", backfilled!($v, "d"), "
                             AND d.state OPERATOR(pg_catalog.=) 'pending'
                             AND d.run_at OPERATOR(pg_catalog.>) pg_catalog.now()
                           LIMIT 1)
                         UNION ALL
                         (SELECT FROM outbox.queue d
                           WHERE d.kind OPERATOR(pg_catalog.=) k.kind
                             AND ", backfilled!($v, "d"), "
                             AND d.state OPERATOR(pg_catalog.=) 'pending'
                           LIMIT 1)
                         LIMIT 1) later_job
), due_sooner AS (
    -- The queue as it was before this statement: the jobs the insert above
    -- made are due when their changes asked already. A LATERAL subquery
    -- kept whole (OFFSET 0), so that the changes are filtered first and each
    -- probes the fresh key: a plain join, planned generic while the queue
    -- was empty, read the whole fresh key and each change for every job
    -- (seconds per absorb under a backlog of 40,000 jobs).
    SELECT q.ctid, c.kind, c.id, c.enqueued_at, c.run_at
      FROM (SELECT * FROM changed WHERE kind OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT kind FROM waiting_kinds))) c
     CROSS JOIN LATERAL (
        SELECT f.ctid FROM outbox.queue f
         WHERE f.kind OPERATOR(pg_catalog.=) c.kind AND f.id OPERATOR(pg_catalog.=) c.id
           AND ",
    fresh!("f"),
    "
           AND (f.run_at OPERATOR(pg_catalog.>) c.run_at OR ", backfilled!($v, "f"), ")
        OFFSET 0
     ) q
), locked AS (
    -- A job changed since the snapshot fails the recheck: its changes go
    -- back to the inbox too, and meet it as it is now.
    SELECT q.ctid FROM outbox.queue q
     WHERE q.ctid OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT ctid FROM due_sooner))
       FOR NO KEY UPDATE SKIP LOCKED
), sooner AS (
    UPDATE outbox.queue q
       -- Made live, a job is due now at the earliest: the live lane's
       -- cursor may be past its old time.
       SET run_at = greatest(least(q.run_at, (SELECT pg_catalog.min(d.run_at) FROM due_sooner d WHERE d.ctid OPERATOR(pg_catalog.=) q.ctid)),
                             pg_catalog.now())",
       made_live!($v), "
     WHERE q.ctid OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT ctid FROM locked))
), left_behind AS (
    -- Only when some are named: otherwise both scans are skipped.
    SELECT u.kind, u.id, u.enqueued_at, u.run_at
      FROM (SELECT kind, pg_catalog.unnest(coalesce(ids, ARRAY[id])) AS id, enqueued_at, run_at FROM moved) u
     WHERE pg_catalog.cardinality($4) OPERATOR(pg_catalog.>) 0
       AND (u.kind, u.id) OPERATOR(pg_catalog.=) ANY (SELECT kind, id FROM later)
    UNION ALL
    SELECT d.kind, d.id, d.enqueued_at, d.run_at FROM due_sooner d
     WHERE NOT (d.ctid OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT ctid FROM locked)))
), kept AS (
    -- Back as they came, a row per kind and delay, with the first time
    -- each was enqueued.
    INSERT INTO outbox.inbox (kind, ids, enqueued_at, run_at)
    SELECT kind, pg_catalog.array_agg(DISTINCT id), pg_catalog.min(enqueued_at), run_at
      FROM left_behind GROUP BY kind, run_at
)
SELECT (m.changes OPERATOR(pg_catalog.-) l.n)::bigint, m.last_block, l.n
  FROM (SELECT pg_catalog.count(*) AS n FROM left_behind) l,
       (SELECT coalesce(pg_catalog.sum(coalesce(pg_catalog.cardinality(ids), 1)), 0) AS changes,
               -- The block of the largest tid: the text round trip once,
               -- not per row.
               coalesce((pg_catalog.max(ctid)::text::point)[0], 0)::bigint AS last_block
          FROM moved) m"
    ) };
}
const ABSORB_INBOX: &str = absorb_inbox!(v0_3);
const ABSORB_INBOX_0_2: &str = absorb_inbox!(v0_2);

/// The changes in the inbox from heap block $2 on, about $1 of them (the
/// rows [`ABSORB_INBOX`] would take next), as distinct (kind, id) pairs.
const INBOX_CHANGES: &str = "
SELECT DISTINCT r.kind, u.id
  FROM (SELECT kind, id, ids FROM outbox.inbox
         WHERE ctid OPERATOR(pg_catalog.>=) pg_catalog.format('(%s,0)', $2)::tid
         LIMIT $1) r
 CROSS JOIN LATERAL pg_catalog.unnest(coalesce(r.ids, ARRAY[r.id])) AS u(id)";

/// Claims up to $2 due jobs of the kinds in $1 (the unpaused ones), at most
/// $6 of each (what its `max_in_flight` leaves), live jobs before
/// backfilled ones (each kind comes twice, once per lane: $7), then oldest
/// first, at most one per record, and none for a record in flight: $5 holds
/// the key hashes of the worker's deliveries in flight, as this statement
/// returns them (`hashtextextended(id, hashtextextended(kind, 0))`). The
/// worker is the only claimer and knows them all (a restart sends every
/// `running` job back to `pending`), so a hashed list of a few hundred numbers
/// does what an index of running jobs would, without an index insert per
/// claim. Numbers, not (kind, id) pairs: building a hash table of a few
/// hundred text pairs on every claim took about a tenth of the worker's main
/// thread under a backlog. Equal keys hash alike, so a record in flight is
/// always held back; two keys that collide only make the other one wait for
/// that delivery to end.
/// Each lane's scan starts after a cursor, ($3 run_at in µs since the Unix
/// epoch, $4 job_id; NULL for the front): the entries before it are mostly
/// jobs claimed a moment ago, dead in the index until vacuum, and skipping them keeps a claim's
/// cost flat however deep the backlog. The worker resets the cursors when a
/// scan comes up short and every second, so nothing behind one waits long.
/// The claiming transaction's id is the claim's token: stored in `claim`, it
/// is what an outcome must name to change the job.
macro_rules! claim {
    ($v:ident) => { concat!("
WITH due AS (
    SELECT d.ctid, d.job_id, d.kind, d.id, d.run_at, k.backfilled, k.room
      FROM ROWS FROM (pg_catalog.unnest($1::text[]), pg_catalog.unnest($7::boolean[]), pg_catalog.unnest($3::bigint[]),
                      pg_catalog.unnest($4::bigint[]), pg_catalog.unnest($6::bigint[]))
           AS k(kind, backfilled, after_us, after_id, room)
     CROSS JOIN LATERAL (
        SELECT q.ctid, q.job_id, q.kind, q.id, q.run_at
          FROM outbox.queue q
         WHERE q.kind OPERATOR(pg_catalog.=) k.kind
           AND ", backfilled!($v, "q"), " OPERATOR(pg_catalog.=) k.backfilled
           AND q.state OPERATOR(pg_catalog.=) 'pending'
           AND q.run_at OPERATOR(pg_catalog.<=) pg_catalog.now()
           AND (q.run_at, q.job_id) OPERATOR(pg_catalog.>)
               (coalesce('epoch'::timestamptz OPERATOR(pg_catalog.+) (k.after_us OPERATOR(pg_catalog.*) interval '1 microsecond'),
                         '-infinity'),
                coalesce(k.after_id, 0))
           -- NOT IN, with the operator named: a hashed subplan.
           AND NOT (pg_catalog.hashtextextended(q.id, pg_catalog.hashtextextended(q.kind, 0))
                    OPERATOR(pg_catalog.=) ANY (SELECT pg_catalog.unnest($5::bigint[])))
         ORDER BY q.run_at, q.job_id
         LIMIT k.room
           FOR UPDATE SKIP LOCKED
     ) d
     ORDER BY k.backfilled, d.run_at, d.job_id
     LIMIT $2
), one_per_record AS (
    -- A record's live job before its backfilled one (a retry).
    SELECT DISTINCT ON (kind, id) ctid, kind, backfilled, run_at, job_id, room FROM due ORDER BY kind, id, backfilled, job_id
), in_room AS (
    -- A kind's lanes share its room (the live lane's: the other's may be
    -- smaller), live jobs first.
    SELECT r.ctid
      FROM (SELECT ctid, pg_catalog.max(room) OVER (PARTITION BY kind) AS room,
                   pg_catalog.row_number() OVER (PARTITION BY kind ORDER BY backfilled, run_at, job_id) AS n
              FROM one_per_record) r
     WHERE r.n OPERATOR(pg_catalog.<=) r.room
)
-- Rows by their ctid (we hold their locks, so they stay put): a TID scan,
-- no index descent. An array, not a join: a generic plan can't know the CTE
-- is small and would hash-join it against a scan of the whole queue.
UPDATE outbox.queue q
   SET state = 'running', attempts = q.attempts OPERATOR(pg_catalog.+) 1, last_attempt_at = pg_catalog.now(),
       claim = pg_catalog.pg_current_xact_id()::text::bigint
 WHERE q.ctid OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT ctid FROM in_room))
RETURNING q.job_id, q.kind, q.id, q.attempts, q.claim,
          (extract(epoch FROM q.run_at) OPERATOR(pg_catalog.*) 1000000)::bigint, q.ctid::text,
          pg_catalog.hashtextextended(q.id, pg_catalog.hashtextextended(q.kind, 0)),
          (extract(epoch FROM q.enqueued_at) OPERATOR(pg_catalog.*) 1000000)::bigint, ", backfilled!($v, "q")
    ) };
}
const CLAIM: &str = claim!(v0_3);
const CLAIM_0_2: &str = claim!(v0_2);

/// How long until the next job of the kinds in $1 falls due (among those the
/// claim could take: not for a record in flight, $2 as for [`CLAIM`]; in the
/// lanes of $3: live, and backfilled when the claim may take them).
macro_rules! next_due {
    ($v:ident) => { concat!("
SELECT pg_catalog.min(d.run_at) OPERATOR(pg_catalog.-) pg_catalog.now()
  FROM pg_catalog.unnest($1::text[]) AS k(kind)
 CROSS JOIN pg_catalog.unnest($3::boolean[]) AS l(backfilled)
 CROSS JOIN LATERAL (
    SELECT q.run_at
      FROM outbox.queue q
     WHERE q.kind OPERATOR(pg_catalog.=) k.kind
       AND ", backfilled!($v, "q"), " OPERATOR(pg_catalog.=) l.backfilled
       AND q.state OPERATOR(pg_catalog.=) 'pending'
       AND NOT (pg_catalog.hashtextextended(q.id, pg_catalog.hashtextextended(q.kind, 0))
                OPERATOR(pg_catalog.=) ANY (SELECT pg_catalog.unnest($2::bigint[])))
     ORDER BY q.run_at, q.job_id
     LIMIT 1
 ) d"
    ) };
}
const NEXT_DUE: &str = next_due!(v0_3);
const NEXT_DUE_0_2: &str = next_due!(v0_2);

/// Delivered jobs are done: remove them, each found by the ctid its claim
/// returned (a TID scan per job: no index descent) and matched on its
/// (job_id, claim). Only the worker changes a running job, so the tuple is
/// usually still there; the pair keeps a tuple that took its place (the job
/// discarded, the queue emptied, even a job id used again). A join, not
/// `(job_id, claim) = ANY (subquery)`: that was planned as a semi join
/// reading every pair for every job, a tenth of the worker's time under a
/// backlog. The state guard is spelled so that the planner can't use a
/// partial index for it. Returns the jobs removed.
const COMPLETE: &str = "
DELETE FROM outbox.queue q
 USING ROWS FROM (pg_catalog.unnest($1::text[]::tid[]), pg_catalog.unnest($2::bigint[]), pg_catalog.unnest($3::bigint[]))
       AS u(ctid, job_id, claim)
 WHERE q.ctid OPERATOR(pg_catalog.=) u.ctid
   AND q.job_id OPERATOR(pg_catalog.=) u.job_id
   AND q.claim OPERATOR(pg_catalog.=) u.claim
   AND (q.state OPERATOR(pg_catalog.||) '') OPERATOR(pg_catalog.=) 'running'
RETURNING q.job_id";

/// Delivered jobs that [`COMPLETE`] did not find where their claim left
/// them (an admin's UPDATE, `VACUUM FULL` or `CLUSTER` moved the tuple), by
/// (job_id, claim) on the primary key: left `running`, they would be sent
/// again after the next worker start.
const COMPLETE_MOVED: &str = "
DELETE FROM outbox.queue q
 USING ROWS FROM (pg_catalog.unnest($1::bigint[]), pg_catalog.unnest($2::bigint[])) AS u(job_id, claim)
 WHERE q.job_id OPERATOR(pg_catalog.=) u.job_id
   AND q.claim OPERATOR(pg_catalog.=) u.claim
   AND (q.state OPERATOR(pg_catalog.||) '') OPERATOR(pg_catalog.=) 'running'";

/// Failed attempts: back to `pending` after a delay, or `dead`; only the
/// claim each outcome answers ($6).
const FAIL: &str = "
UPDATE outbox.queue q
   SET state = u.state,
       run_at = pg_catalog.now() OPERATOR(pg_catalog.+) (u.delay_ms OPERATOR(pg_catalog.*) interval '1 millisecond'),
       last_status = u.status,
       last_error = u.error
  FROM ROWS FROM (pg_catalog.unnest($1::bigint[]), pg_catalog.unnest($2::text[]), pg_catalog.unnest($3::bigint[]),
                  pg_catalog.unnest($4::int[]), pg_catalog.unnest($5::text[]), pg_catalog.unnest($6::bigint[]))
       AS u(job_id, state, delay_ms, status, error, claim)
 WHERE q.job_id OPERATOR(pg_catalog.=) u.job_id
   AND q.claim OPERATOR(pg_catalog.=) u.claim
   AND (q.state OPERATOR(pg_catalog.||) '') OPERATOR(pg_catalog.=) 'running'";

/// The counters of a batch, per kind ($1): deliveries ($2), failed attempts
/// by class ($3 to $7), and the latency histogram ($8: each kind's bucket
/// counts one after the other, $9 buckets a kind; $10 the seconds' sums).
const BUMP_STATS: &str = "
UPDATE outbox.kind_stats s
   SET delivered = s.delivered OPERATOR(pg_catalog.+) u.delivered,
       failed_attempts = s.failed_attempts OPERATOR(pg_catalog.+) (u.attempts OPERATOR(pg_catalog.-) u.delivered),
       rejected = s.rejected OPERATOR(pg_catalog.+) u.rejected,
       throttled = s.throttled OPERATOR(pg_catalog.+) u.throttled,
       server_errors = s.server_errors OPERATOR(pg_catalog.+) u.server_errors,
       unreachable = s.unreachable OPERATOR(pg_catalog.+) u.unreachable,
       unbuildable = s.unbuildable OPERATOR(pg_catalog.+) u.unbuildable,
       latency_counts = ARRAY(
           SELECT coalesce(h.old, 0) OPERATOR(pg_catalog.+) coalesce(h.new, 0)
             FROM ROWS FROM (pg_catalog.unnest(s.latency_counts),
                             pg_catalog.unnest(($8::bigint[])[(u.n OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog.*) $9 OPERATOR(pg_catalog.+) 1
                                                              : u.n OPERATOR(pg_catalog.*) $9]))
                  WITH ORDINALITY AS h(old, new, i)
            ORDER BY h.i),
       latency_sum = s.latency_sum OPERATOR(pg_catalog.+) u.latency_sum,
       last_success_at = CASE WHEN u.delivered OPERATOR(pg_catalog.>) 0 THEN pg_catalog.now() ELSE s.last_success_at END,
       last_failure_at = CASE WHEN u.delivered OPERATOR(pg_catalog.<) u.attempts THEN pg_catalog.now() ELSE s.last_failure_at END
  FROM (SELECT *, delivered OPERATOR(pg_catalog.+) rejected OPERATOR(pg_catalog.+) throttled OPERATOR(pg_catalog.+) server_errors
                  OPERATOR(pg_catalog.+) unreachable OPERATOR(pg_catalog.+) unbuildable AS attempts
          FROM ROWS FROM (pg_catalog.unnest($1::text[]), pg_catalog.unnest($2::bigint[]), pg_catalog.unnest($3::bigint[]),
                          pg_catalog.unnest($4::bigint[]), pg_catalog.unnest($5::bigint[]), pg_catalog.unnest($6::bigint[]),
                          pg_catalog.unnest($7::bigint[]), pg_catalog.unnest($10::float8[]))
               WITH ORDINALITY AS v(kind, delivered, rejected, throttled, server_errors, unreachable, unbuildable, latency_sum, n)) u
 WHERE s.kind OPERATOR(pg_catalog.=) u.kind";

/// A batch's attempts, for `outbox.attempts`: kind $1, id $2, job $3,
/// attempt $4, method $5, outcome $6, status $7, milliseconds $8, error $9.
const RECORD_ATTEMPTS: &str = "
INSERT INTO outbox.attempts (kind, id, job_id, attempt, method, outcome, status, duration_ms, error)
SELECT * FROM ROWS FROM (pg_catalog.unnest($1::text[]), pg_catalog.unnest($2::text[]), pg_catalog.unnest($3::bigint[]),
                         pg_catalog.unnest($4::int[]), pg_catalog.unnest($5::text[]), pg_catalog.unnest($6::text[]),
                         pg_catalog.unnest($7::int[]), pg_catalog.unnest($8::float8[]), pg_catalog.unnest($9::text[]))";

/// Keeps the last $2 attempts of each kind in $1: everything up to the
/// ($2 + 1)th newest goes.
const PRUNE_ATTEMPTS: &str = "
DELETE FROM outbox.attempts a
 USING (SELECT k.kind,
               (SELECT b.attempt_id FROM outbox.attempts b
                 WHERE b.kind OPERATOR(pg_catalog.=) k.kind
                 ORDER BY b.attempt_id DESC OFFSET $2 LIMIT 1) AS cutoff
          FROM pg_catalog.unnest($1::text[]) AS k(kind)) c
 WHERE a.kind OPERATOR(pg_catalog.=) c.kind AND a.attempt_id OPERATOR(pg_catalog.<=) c.cutoff";

/// [`BUMP_STATS`] for a database still on 0.2.0 (`schema::at_0_3`), whose
/// kind_stats has no classes, histogram or breaker.
const BUMP_STATS_0_2: &str = "
UPDATE outbox.kind_stats s
   SET delivered = s.delivered OPERATOR(pg_catalog.+) u.delivered,
       failed_attempts = s.failed_attempts OPERATOR(pg_catalog.+) u.failed,
       last_success_at = CASE WHEN u.delivered OPERATOR(pg_catalog.>) 0 THEN pg_catalog.now() ELSE s.last_success_at END,
       last_failure_at = CASE WHEN u.failed OPERATOR(pg_catalog.>) 0 THEN pg_catalog.now() ELSE s.last_failure_at END
  FROM ROWS FROM (pg_catalog.unnest($1::text[]), pg_catalog.unnest($2::bigint[]), pg_catalog.unnest($3::bigint[]))
       AS u(kind, delivered, failed)
 WHERE s.kind OPERATOR(pg_catalog.=) u.kind";

pub struct Claimed {
    pub job_id: i64,
    pub kind: String,
    pub id: String,
    pub attempts: i32,
    /// The claim's token: the claiming transaction's id, unique for the
    /// life of the cluster.
    pub claim: i64,
    /// run_at in µs since the Unix epoch, for the kind's cursor.
    pub run_at_us: i64,
    /// Where the running job's tuple is, for [`COMPLETE`].
    pub ctid: String,
    /// The hash of (kind, id) that holds the record back while in flight.
    pub key_hash: i64,
    /// When the change was made, in µs since the Unix epoch: where its
    /// delivery latency starts.
    pub enqueued_us: i64,
    /// Whether it came from a backfill: its lane, for the cursors.
    pub backfilled: bool,
}

/// Where each lane's next claim scan starts, by (kind, backfilled):
/// (run_at µs, job_id).
pub type Cursors = std::collections::HashMap<(String, bool), (i64, i64)>;


/// Where the next absorb starts, and how.
#[derive(Default)]
pub struct InboxCursor {
    /// The heap block of the inbox to scan from.
    pub block: i64,
    /// The last absorb met an open transaction's fresh job: look for those
    /// first (it costs an index probe per change) until none is left.
    careful: bool,
}

/// How long an absorb may wait for a lock before it looks for the open
/// transaction's fresh jobs and leaves their changes for later. Inserts by
/// short transactions are waited out well within it.
const ABSORB_LOCK_TIMEOUT: &std::ffi::CStr = c"100ms";

/// What an absorb did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Absorbed {
    /// Changes moved into the queue (repeats of a record included).
    pub moved: i64,
    /// The last heap block they came from.
    pub last_block: i64,
    /// Changes that went back to the inbox for a later turn: no commit will
    /// say that they are there.
    pub left: i64,
}

/// Moves up to `limit` inbox changes, from heap block `cursor.block` on, into
/// the queue; says how many moved and leaves the cursor at the last block
/// read. A scan from past block 0 that finds nothing looks again from block 0
/// at once: once a vacuum has freed (or truncated) the blocks before the
/// cursor, new rows go there, and the commit that said so has been consumed;
/// left to the next reset, they could wait for the poll interval.
///
/// If the statement fails for a reason other than a lock wait, `one_by_one`
/// moves the rows instead (`quarantine`): one bad row must not stop the
/// worker. It returns (changes moved, last block read).
pub fn absorb_inbox(c: &mut SpiClient<'_>, limit: i64, cursor: &mut InboxCursor, one_by_one: OneByOne) -> Absorbed {
    let mut absorbed = absorb_from(c, limit, cursor.block, &mut cursor.careful, one_by_one);
    if absorbed.moved == 0 && cursor.block > 0 {
        let left = absorbed.left;
        absorbed = absorb_from(c, limit, 0, &mut cursor.careful, one_by_one);
        absorbed.left += left;
    }
    cursor.block = if absorbed.moved > 0 { absorbed.last_block } else { 0 };
    absorbed
}

/// One absorb statement from block `start`.
/// It runs in a subtransaction with a lock timeout; if that runs out, the
/// changes of records whose fresh job an open transaction holds are found
/// and left in the inbox, and the rest moves.
fn absorb_from(c: &mut SpiClient<'_>, limit: i64, start: i64, careful: &mut bool, one_by_one: OneByOne) -> Absorbed {
    let attempt = |c: &mut SpiClient<'_>, later: Vec<(String, String)>| {
        let (kinds, ids): (Vec<String>, Vec<String>) = later.into_iter().unzip();
        crate::pg::subxact::try_subtransaction(std::panic::AssertUnwindSafe(|| {
            crate::pg::settings::with_settings(&[(c"lock_timeout", ABSORB_LOCK_TIMEOUT)], || {
                let args: [DatumWithOid; 4] = [limit.into(), start.into(), kinds.into(), ids.into()];
                let t = execute(c, for_schema(ABSORB_INBOX, ABSORB_INBOX_0_2), &[INT8, INT8, TEXT_ARRAY, TEXT_ARRAY], &args)
                    .unwrap_or_else(|e| panic!("absorb inbox: {e}"));
                let row = t.first();
                let column = |i| row.get::<i64>(i).ok().flatten().unwrap_or(0);
                Absorbed { moved: column(1), last_block: column(2), left: column(3) }
            })
        }))
    };
    if !*careful {
        match attempt(c, Vec::new()) {
            Ok(r) => return r,
            Err(e) if e.is_lock_timeout() => *careful = true,
            Err(e) => return fallback(c, limit, start, &e, one_by_one),
        }
    }
    let changes: Vec<(String, String)> = execute(c, INBOX_CHANGES, &[INT8, INT8], &[limit.into(), start.into()])
        .unwrap_or_else(|e| panic!("reading inbox: {e}"))
        .filter_map(|r| Some((r.get::<String>(1).ok()??, r.get::<String>(2).ok()??)))
        .collect();
    let later = super::in_flux::in_flux(&changes);
    *careful = !later.is_empty();
    match attempt(c, later) {
        Ok(r) => r,
        // A transaction took a fresh job between the look and the absorb:
        // the next turn looks again.
        Err(e) if e.is_lock_timeout() => Absorbed { last_block: start, ..Absorbed::default() },
        Err(e) => fallback(c, limit, start, &e, one_by_one),
    }
}

/// Moves inbox rows one at a time after the absorb statement failed:
/// (client, limit, start block, the failure) to (changes moved, last block).
pub type OneByOne = fn(&mut SpiClient<'_>, i64, i64, &crate::pg::subxact::Caught) -> (i64, i64);

fn fallback(c: &mut SpiClient<'_>, limit: i64, start: i64, cause: &crate::pg::subxact::Caught, one_by_one: OneByOne) -> Absorbed {
    let (moved, last_block) = one_by_one(c, limit, start, cause);
    Absorbed { moved, last_block, left: 0 }
}

// The one-row-at-a-time fallback (`quarantine`) moves inbox rows with these.

/// The inbox rows from heap block $2 on, at most $1: those the failed
/// absorb would have taken.
pub const ROWS_FROM: &str = "
SELECT ctid::pg_catalog.text FROM outbox.inbox
 WHERE ctid OPERATOR(pg_catalog.>=) pg_catalog.format('(%s,0)', $2)::pg_catalog.tid
 LIMIT $1";

/// Inbox row $1 into the queue, as the absorb would move it: coalescing
/// into fresh jobs (moving a later one to the row's time, making a
/// backfilled one live), dead at once for a kind nobody registered. Returns
/// how many changes it held.
macro_rules! absorb_row {
    ($v:ident) => { concat!(
    "
WITH moved AS (
    DELETE FROM outbox.inbox WHERE ctid OPERATOR(pg_catalog.=) $1::pg_catalog.tid
    RETURNING kind, id, ids, enqueued_at, run_at
), changed AS (
    SELECT m.kind, u.id, m.enqueued_at, greatest(coalesce(m.run_at, pg_catalog.now()), pg_catalog.now()) AS run_at,
           EXISTS (SELECT FROM outbox.kinds k WHERE k.kind OPERATOR(pg_catalog.=) m.kind) AS registered
      FROM moved m
     CROSS JOIN LATERAL pg_catalog.unnest(coalesce(m.ids, ARRAY[m.id])) AS u(id)
), absorbed AS (
    ",
    insert_changes!(),
    "
), sooner AS (
    UPDATE outbox.queue q SET run_at = greatest(least(q.run_at, c.run_at), pg_catalog.now())", made_live!($v), "
      FROM changed c
     WHERE q.kind OPERATOR(pg_catalog.=) c.kind AND q.id OPERATOR(pg_catalog.=) c.id
       AND ",
    fresh!("q"),
    "
       AND (q.run_at OPERATOR(pg_catalog.>) c.run_at OR ", backfilled!($v, "q"), ")
)
SELECT pg_catalog.count(*) FROM changed"
    ) };
}
pub const ABSORB_ROW: &str = absorb_row!(v0_3);
pub const ABSORB_ROW_0_2: &str = absorb_row!(v0_2);

/// Inbox row $1 set aside, with reason $2. Returns the start of its kind
/// (for the log) and how many changes it held.
pub const REJECT_ROW: &str = "
WITH moved AS (
    DELETE FROM outbox.inbox WHERE ctid OPERATOR(pg_catalog.=) $1::pg_catalog.tid
    RETURNING kind, id, ids, enqueued_at, run_at
)
INSERT INTO outbox.rejected (kind, id, ids, enqueued_at, run_at, reason)
SELECT kind, id, ids, enqueued_at, run_at, $2 FROM moved
RETURNING pg_catalog.left(kind, 64), coalesce(pg_catalog.cardinality(ids), 1)::pg_catalog.int8";

/// The key hashes of every delivery in flight (see [`CLAIM`]).
pub type InFlightKeys = Vec<i64>;

/// Claims up to `limit` jobs of `kinds` (each with its room), live ones
/// first and at most `backfilled_limit` backfilled ones of a kind, each lane
/// scanned from its cursor, none for a record in `busy`. A lane whose scan
/// came up short has reached its end: its cursor is reset for the next
/// turn.
pub fn claim(
    c: &mut SpiClient<'_>,
    kinds: &[(String, i64)],
    cursors: &mut Cursors,
    limit: i64,
    backfilled_limit: i64,
    busy: &InFlightKeys,
) -> Vec<Claimed> {
    let lanes: Vec<(String, bool, i64)> = kinds
        .iter()
        .flat_map(|(k, room)| {
            let room = (*room).min(limit);
            [(k.clone(), false, room), (k.clone(), true, room.min(backfilled_limit))]
        })
        .collect();
    let (after_us, after_id): (Vec<Option<i64>>, Vec<Option<i64>>) = lanes
        .iter()
        .map(|(k, b, _)| cursors.get(&(k.clone(), *b)).map_or((None, None), |&(t, j)| (Some(t), Some(j))))
        .unzip();
    let names: Vec<&str> = lanes.iter().map(|(k, _, _)| k.as_str()).collect();
    let backfilled: Vec<bool> = lanes.iter().map(|(_, b, _)| *b).collect();
    let rooms: Vec<i64> = lanes.iter().map(|(_, _, room)| *room).collect();
    let args: [DatumWithOid; 7] =
        [names.into(), limit.into(), after_us.into(), after_id.into(), busy.clone().into(), rooms.into(), backfilled.into()];
    let types = [TEXT_ARRAY, INT8, INT8_ARRAY, INT8_ARRAY, INT8_ARRAY, INT8_ARRAY, BOOL_ARRAY];
    let rows = execute(c, for_schema(CLAIM, CLAIM_0_2), &types, &args).unwrap_or_else(|e| panic!("claim: {e}"));
    let claimed: Vec<Claimed> = rows
        .filter_map(|r| {
            Some(Claimed {
                job_id: r.get::<i64>(1).ok()??,
                kind: r.get::<String>(2).ok()??,
                id: r.get::<String>(3).ok()??,
                attempts: r.get::<i32>(4).ok()??,
                claim: r.get::<i64>(5).ok()??,
                run_at_us: r.get::<i64>(6).ok()??,
                ctid: r.get::<String>(7).ok()??,
                key_hash: r.get::<i64>(8).ok()??,
                enqueued_us: r.get::<i64>(9).ok()??,
                backfilled: r.get::<bool>(10).ok()??,
            })
        })
        .collect();
    let all_taken = claimed.len() as i64 >= limit;
    for (kind, lane, room) in lanes {
        if room == 0 {
            // Not scanned: it stays where it was.
            continue;
        }
        let mine = claimed.iter().filter(|j| j.kind == kind && j.backfilled == lane);
        let (n, last) = mine.fold((0, None), |(n, last), j| (n + 1, last.max(Some((j.run_at_us, j.job_id)))));
        match last {
            // Full (or cut by the statement's limit): go on after it.
            Some(pos) if n >= room || all_taken => {
                cursors.insert((kind, lane), pos);
            }
            // Short: the scan reached the end; start over next time.
            _ => {
                cursors.remove(&(kind, lane));
            }
        }
    }
    claimed
}

/// Milliseconds until the next job is due (0 if overdue), None if none;
/// backfilled jobs only if `backfilled`.
pub fn next_due_ms(c: &mut SpiClient<'_>, kinds: Vec<String>, busy: &InFlightKeys, backfilled: bool) -> Option<i64> {
    let lanes: Vec<bool> = if backfilled { vec![false, true] } else { vec![false] };
    let args: [DatumWithOid; 3] = [kinds.into(), busy.clone().into(), lanes.into()];
    let t = execute(c, for_schema(NEXT_DUE, NEXT_DUE_0_2), &[TEXT_ARRAY, INT8_ARRAY, BOOL_ARRAY], &args).unwrap_or_else(|e| panic!("next due: {e}"));
    let iv = t.first().get_one::<pgrx::datum::Interval>().ok().flatten()?;
    Some((iv.as_micros() / 1000).max(0) as i64)
}

/// A failed attempt, as recorded by [`FAIL`].
pub struct Failure {
    pub job_id: i64,
    pub claim: i64,
    pub state: JobState,
    pub delay_ms: i64,
    pub status: Option<i32>,
    pub error: Option<String>,
}

/// A delivered job: which claim of which job, and where its tuple is.
pub struct Delivered {
    pub job_id: i64,
    pub claim: i64,
    pub ctid: String,
}

/// Deletes delivered jobs.
pub fn complete(c: &mut SpiClient<'_>, jobs: Vec<Delivered>) {
    if jobs.is_empty() {
        return;
    }
    let ctids: Vec<&str> = jobs.iter().map(|j| j.ctid.as_str()).collect();
    let ids: Vec<i64> = jobs.iter().map(|j| j.job_id).collect();
    let claims: Vec<i64> = jobs.iter().map(|j| j.claim).collect();
    let args: [DatumWithOid; 3] = [ctids.into(), ids.into(), claims.into()];
    let removed: std::collections::HashSet<i64> = execute(c, COMPLETE, &[TEXT_ARRAY, INT8_ARRAY, INT8_ARRAY], &args)
        .unwrap_or_else(|e| panic!("complete: {e}"))
        .filter_map(|r| r.get::<i64>(1).ok().flatten())
        .collect();
    if removed.len() == jobs.len() {
        return;
    }
    let (ids, claims): (Vec<i64>, Vec<i64>) =
        jobs.iter().filter(|j| !removed.contains(&j.job_id)).map(|j| (j.job_id, j.claim)).unzip();
    execute(c, COMPLETE_MOVED, &[INT8_ARRAY, INT8_ARRAY], &[ids.into(), claims.into()]).unwrap_or_else(|e| panic!("complete: {e}"));
}

pub fn fail(c: &mut SpiClient<'_>, failures: Vec<Failure>) {
    if failures.is_empty() {
        return;
    }
    let mut ids = Vec::with_capacity(failures.len());
    let mut states = Vec::with_capacity(failures.len());
    let mut delays = Vec::with_capacity(failures.len());
    let mut statuses = Vec::with_capacity(failures.len());
    let mut errors = Vec::with_capacity(failures.len());
    let mut claims = Vec::with_capacity(failures.len());
    for f in failures {
        ids.push(f.job_id);
        claims.push(f.claim);
        states.push(f.state.as_str().to_string());
        delays.push(f.delay_ms);
        statuses.push(f.status);
        errors.push(f.error);
    }
    let args: [DatumWithOid; 6] = [ids.into(), states.into(), delays.into(), statuses.into(), errors.into(), claims.into()];
    let types = [INT8_ARRAY, TEXT_ARRAY, INT8_ARRAY, INT4_ARRAY, TEXT_ARRAY, INT8_ARRAY];
    execute(c, FAIL, &types, &args).unwrap_or_else(|e| panic!("fail: {e}"));
}

pub fn bump_stats(c: &mut SpiClient<'_>, tallies: Vec<(String, crate::rules::metrics::Tally)>) {
    if tallies.is_empty() {
        return;
    }
    let kinds: Vec<String> = tallies.iter().map(|(k, _)| k.clone()).collect();
    let delivered: Vec<i64> = tallies.iter().map(|(_, t)| t.delivered).collect();
    if !crate::schema::at_0_3() {
        let failed: Vec<i64> = tallies.iter().map(|(_, t)| t.failed.iter().sum()).collect();
        let args: [DatumWithOid; 3] = [kinds.into(), delivered.into(), failed.into()];
        execute(c, BUMP_STATS_0_2, &[TEXT_ARRAY, INT8_ARRAY, INT8_ARRAY], &args).unwrap_or_else(|e| panic!("stats: {e}"));
        return;
    }
    let class = |i: usize| -> Vec<i64> { tallies.iter().map(|(_, t)| t.failed[i]).collect() };
    let latency: Vec<i64> = tallies.iter().flat_map(|(_, t)| t.latency.iter().copied()).collect();
    let latency_sum: Vec<f64> = tallies.iter().map(|(_, t)| t.latency_sum).collect();
    let buckets = crate::rules::metrics::LATENCY_BUCKETS as i32;
    let args: [DatumWithOid; 10] = [
        kinds.into(),
        delivered.into(),
        class(0).into(),
        class(1).into(),
        class(2).into(),
        class(3).into(),
        class(4).into(),
        latency.into(),
        buckets.into(),
        latency_sum.into(),
    ];
    let types = [TEXT_ARRAY, INT8_ARRAY, INT8_ARRAY, INT8_ARRAY, INT8_ARRAY, INT8_ARRAY, INT8_ARRAY, INT8_ARRAY, INT4, FLOAT8_ARRAY];
    execute(c, BUMP_STATS, &types, &args).unwrap_or_else(|e| panic!("stats: {e}"));
}

/// One attempt, as `outbox.attempts` keeps it.
pub struct Attempt {
    pub kind: String,
    pub id: String,
    pub job_id: i64,
    pub attempt: i32,
    pub method: &'static str,
    pub outcome: &'static str,
    pub status: Option<i32>,
    pub duration_ms: Option<f64>,
    pub error: Option<String>,
}

/// Adds `attempts` to `outbox.attempts` and keeps the last `kept` of each
/// of their kinds.
pub fn record_attempts(c: &mut SpiClient<'_>, attempts: Vec<Attempt>, kept: i64) {
    let mut kinds: Vec<String> = attempts.iter().map(|a| a.kind.clone()).collect();
    let args: [DatumWithOid; 9] = [
        kinds.clone().into(),
        attempts.iter().map(|a| a.id.clone()).collect::<Vec<_>>().into(),
        attempts.iter().map(|a| a.job_id).collect::<Vec<_>>().into(),
        attempts.iter().map(|a| a.attempt).collect::<Vec<_>>().into(),
        attempts.iter().map(|a| a.method.to_string()).collect::<Vec<_>>().into(),
        attempts.iter().map(|a| a.outcome.to_string()).collect::<Vec<_>>().into(),
        attempts.iter().map(|a| a.status).collect::<Vec<_>>().into(),
        attempts.iter().map(|a| a.duration_ms).collect::<Vec<_>>().into(),
        attempts.iter().map(|a| a.error.clone()).collect::<Vec<_>>().into(),
    ];
    let types = [TEXT_ARRAY, TEXT_ARRAY, INT8_ARRAY, INT4_ARRAY, TEXT_ARRAY, TEXT_ARRAY, INT4_ARRAY, FLOAT8_ARRAY, TEXT_ARRAY];
    execute(c, RECORD_ATTEMPTS, &types, &args).unwrap_or_else(|e| panic!("attempts: {e}"));
    kinds.sort();
    kinds.dedup();
    let args: [DatumWithOid; 2] = [kinds.into(), kept.into()];
    execute(c, PRUNE_ATTEMPTS, &[TEXT_ARRAY, INT8], &args).unwrap_or_else(|e| panic!("attempts: {e}"));
}

/// Moves the whole inbox into the queue as the worker's absorb does, for
/// tests; returns how many changes moved.
#[cfg(any(test, feature = "pg_test"))]
pub fn absorb_all() -> i64 {
    pgrx::Spi::connect_mut(|c| absorb_inbox(c, 100_000, &mut InboxCursor::default(), not_in_tests)).moved
}

/// The fallback for tests, where every inbox row is good.
#[cfg(any(test, feature = "pg_test"))]
pub fn not_in_tests(_: &mut SpiClient<'_>, _: i64, _: i64, cause: &crate::pg::subxact::Caught) -> (i64, i64) {
    panic!("absorb failed: {} (SQLSTATE {})", cause.message, cause.sqlstate)
}

/// The SQL statements of this module, for the qualification sweep.
#[cfg(test)]
pub(crate) const STATEMENTS: &[(&str, &str)] = &[
    ("MISSING_PRIVILEGES", MISSING_PRIVILEGES),
    ("RECOVER_RUNNING", RECOVER_RUNNING),
    ("DEAD_LETTER_ORPHANS", DEAD_LETTER_ORPHANS),
    ("RUNNING_COPIED", RUNNING_COPIED),
    ("RETRY", RETRY),
    ("RETRY_DEAD", RETRY_DEAD),
    ("DISCARD", DISCARD),
    ("PURGE_DEAD", PURGE_DEAD),
    ("ABSORB_INBOX", ABSORB_INBOX),
    ("ABSORB_INBOX_0_2", ABSORB_INBOX_0_2),
    ("INBOX_CHANGES", INBOX_CHANGES),
    ("ROWS_FROM", ROWS_FROM),
    ("ABSORB_ROW", ABSORB_ROW),
    ("ABSORB_ROW_0_2", ABSORB_ROW_0_2),
    ("REJECT_ROW", REJECT_ROW),
    ("CLAIM", CLAIM),
    ("CLAIM_0_2", CLAIM_0_2),
    ("NEXT_DUE", NEXT_DUE),
    ("NEXT_DUE_0_2", NEXT_DUE_0_2),
    ("COMPLETE", COMPLETE),
    ("COMPLETE_MOVED", COMPLETE_MOVED),
    ("FAIL", FAIL),
    ("BUMP_STATS", BUMP_STATS),
    ("BUMP_STATS_0_2", BUMP_STATS_0_2),
    ("ENQUEUE_BACKFILLED", ENQUEUE_BACKFILLED),
    ("RECORD_ATTEMPTS", RECORD_ATTEMPTS),
    ("PRUNE_ATTEMPTS", PRUNE_ATTEMPTS),
];

#[cfg(test)]
mod qualified {
    #[test]
    fn every_statement_names_the_schema_of_its_functions_and_operators() {
        crate::testing::sql_check::assert_qualified(super::STATEMENTS);
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::super::plans::types::{INT8, TEXT_ARRAY};
    use pgrx::prelude::*;

    fn absorb(cursor: &mut super::InboxCursor) -> i64 {
        Spi::connect_mut(|c| super::absorb_inbox(c, 1000, cursor, super::not_in_tests)).moved
    }

    #[pg_test]
    fn absorb_finds_rows_before_its_cursor() {
        Spi::run("SELECT outbox.register('absorbed', 'http://h/{id}')").unwrap();
        Spi::run("INSERT INTO outbox.inbox (kind, ids, enqueued_at) VALUES ('absorbed', '{a,b}', now())").unwrap();
        let block = Spi::get_one::<i64>("SELECT (ctid::text::point)[0]::bigint FROM outbox.inbox").unwrap().unwrap();
        // The last scan ended past the block the new row went to, as when a
        // vacuum freed the space before it.
        let mut cursor = super::InboxCursor { block: block + 1, ..Default::default() };
        assert_eq!(absorb(&mut cursor), 2);
        assert_eq!(cursor.block, block);
        let queued = Spi::get_one::<i64>("SELECT count(*) FROM outbox.queue WHERE kind = 'absorbed' AND state = 'pending'").unwrap();
        assert_eq!(queued, Some(2));
        // Nothing left: the next scan starts from the front.
        assert_eq!(absorb(&mut cursor), 0);
        assert_eq!(cursor.block, 0);
    }

    #[pg_test]
    fn absorb_leaves_its_cursor_at_the_last_block_it_read() {
        Spi::run("SELECT outbox.register('absorbed', 'http://h/{id}')").unwrap();
        // A few blocks' worth of one-change rows.
        Spi::run("INSERT INTO outbox.inbox (kind, id, enqueued_at) SELECT 'absorbed', g::text, now() FROM generate_series(1, 600) g").unwrap();
        let last = Spi::get_one::<i64>("SELECT max((ctid::text::point)[0])::bigint FROM outbox.inbox").unwrap().unwrap();
        assert!(last >= 2, "the rows fill {} blocks", last + 1);
        let mut cursor = super::InboxCursor::default();
        assert_eq!(absorb(&mut cursor), 600);
        assert_eq!(cursor.block, last);
    }

    #[pg_test]
    fn changes_named_later_go_back_to_the_inbox() {
        Spi::run("SELECT outbox.register('absorbed', 'http://h/{id}')").unwrap();
        Spi::run("INSERT INTO outbox.inbox (kind, ids, enqueued_at) VALUES ('absorbed', '{a,b,c}', now() - interval '1 min')").unwrap();
        Spi::run("INSERT INTO outbox.inbox (kind, id, enqueued_at) VALUES ('absorbed', 'b', now())").unwrap();
        let moved = Spi::connect_mut(|c| {
            let args: [pgrx::datum::DatumWithOid; 4] = [1000i64.into(), 0i64.into(), vec!["absorbed"].into(), vec!["b"].into()];
            super::execute(c, super::ABSORB_INBOX, &[INT8, INT8, TEXT_ARRAY, TEXT_ARRAY], &args).unwrap().first().get_one::<i64>().unwrap()
        });
        assert_eq!(moved, Some(2), "a and c");
        let queued = Spi::get_one::<String>("SELECT string_agg(id, ',' ORDER BY id) FROM outbox.queue").unwrap();
        assert_eq!(queued.as_deref(), Some("a,c"));
        // b waits in the inbox, once, with its first enqueue time.
        let kept = Spi::get_one::<String>("SELECT format('%s %s', ids, enqueued_at < now()) FROM outbox.inbox").unwrap();
        assert_eq!(kept.as_deref(), Some("{b} t"));
    }

    /// A change coalesces into its record's fresh job, locked or not; a
    /// running job or an unregistered kind still gets a job of its own.
    #[pg_test]
    fn absorbed_changes_coalesce_into_fresh_jobs_locked_or_not() {
        Spi::run("SELECT outbox.register('absorbed', 'http://h/{id}')").unwrap();
        Spi::run(
            "INSERT INTO outbox.queue (kind, id, state, enqueued_at) VALUES
                ('absorbed', 'unlocked', 'pending', now() - interval '1 h'),
                ('absorbed', 'locked', 'pending', now() - interval '1 h'),
                ('absorbed', 'running', 'running', now() - interval '1 h')",
        )
        .unwrap();
        // The arbiter meets a row this transaction holds locked (its xmax
        // says so), as an admin's `SELECT ... FOR UPDATE` would.
        Spi::run("SELECT FROM outbox.queue WHERE id = 'locked' FOR UPDATE").unwrap();
        let xmax_set = Spi::get_one::<bool>("SELECT xmax <> '0'::xid FROM outbox.queue WHERE id = 'locked'").unwrap();
        assert_eq!(xmax_set, Some(true));
        Spi::run(
            "INSERT INTO outbox.inbox (kind, ids, enqueued_at) VALUES ('absorbed', '{unlocked,locked,running,new}', now()),
                                             ('nobody', '{unlocked}', now())",
        )
        .unwrap();
        assert_eq!(absorb(&mut super::InboxCursor::default()), 5);
        let jobs = Spi::get_one::<String>(
            "SELECT string_agg(format('%s/%s:%s:%s', kind, id, state, enqueued_at < now() - interval '1 min'), ' ' ORDER BY kind, id, state)
               FROM outbox.queue",
        )
        .unwrap();
        assert_eq!(
            jobs.as_deref(),
            Some(
                "absorbed/locked:pending:t absorbed/new:pending:f absorbed/running:pending:f \
                 absorbed/running:running:t absorbed/unlocked:pending:t nobody/unlocked:dead:f"
            )
        );
    }

    /// A delay means "not before": a change that asks for an earlier time
    /// moves its record's fresh job there, whether it came with the job's
    /// statement or a later one; a later time moves nothing.
    #[pg_test]
    fn a_change_due_sooner_moves_a_delayed_fresh_job() {
        Spi::run("SELECT outbox.register('absorbed', 'http://h/{id}')").unwrap();
        let due = |id: &str| {
            Spi::get_one_with_args::<String>(
                "SELECT CASE WHEN run_at > now() + interval '50 min' THEN 'later' WHEN run_at <= now() THEN 'now' ELSE 'soon' END
                   FROM outbox.queue WHERE id = $1",
                &[id.into()],
            )
            .unwrap()
            .unwrap_or_default()
        };
        let inbox = |id: &str, run_at: &str| {
            Spi::run(&format!("INSERT INTO outbox.inbox (kind, id, enqueued_at, run_at) VALUES ('absorbed', '{id}', now(), {run_at})")).unwrap();
        };
        inbox("a", "now() + interval '1 hour'");
        inbox("b", "now() + interval '1 hour'");
        inbox("c", "NULL");
        // Both in one absorb: the earliest time wins.
        inbox("d", "now() + interval '1 hour'");
        inbox("d", "NULL");
        // A delay whose time has passed is due now.
        inbox("e", "now() - interval '1 hour'");
        assert_eq!(crate::worker::queue::absorb_all(), 6);
        assert_eq!([due("a"), due("b"), due("c"), due("d"), due("e")], ["later", "later", "now", "now", "now"]);
        // Later changes: at once for a, in ten minutes for b, an hour for c.
        inbox("a", "NULL");
        inbox("b", "now() + interval '10 min'");
        inbox("c", "now() + interval '1 hour'");
        assert_eq!(crate::worker::queue::absorb_all(), 3);
        assert_eq!([due("a"), due("b"), due("c")], ["now", "soon", "now"]);
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM outbox.queue").unwrap(), Some(5), "one job per record");
    }

    /// An absorb reads the jobs of its changes' records and no others: with
    /// a backlog of jobs due now, in a queue that was empty when the worker
    /// made its generic plan (as at every start), and with delayed jobs to
    /// move, each change probing the fresh key. (A plan that read the whole
    /// fresh key for every change came from statistics this test does not
    /// recreate; `make bench`'s throughput figure found it.)
    #[pg_test]
    fn absorbing_reads_only_the_jobs_of_its_changes() {
        Spi::run("SELECT outbox.register('absorbed', 'http://h/{id}')").unwrap();
        let read = || Spi::get_one::<i64>("SELECT pg_stat_get_xact_tuples_fetched('outbox.queue'::regclass)").unwrap().unwrap();
        super::super::plans::forget();
        Spi::run("INSERT INTO outbox.inbox (kind, id, enqueued_at) VALUES ('absorbed', 'first', now())").unwrap();
        assert_eq!(crate::worker::queue::absorb_all(), 1);
        Spi::run("INSERT INTO outbox.queue (kind, id, run_at) SELECT 'absorbed', g::text, now() FROM generate_series(1, 50000) g").unwrap();
        Spi::run("INSERT INTO outbox.inbox (kind, ids, enqueued_at) SELECT 'absorbed', array_agg('n' || g), now() FROM generate_series(1, 1000) g").unwrap();
        Spi::run("INSERT INTO outbox.inbox (kind, id, enqueued_at) VALUES ('absorbed', '4321', now())").unwrap();
        let before = read();
        assert_eq!(crate::worker::queue::absorb_all(), 1001);
        assert!(read() - before < 50, "read {} jobs", read() - before);

        Spi::run("INSERT INTO outbox.queue (kind, id, run_at) SELECT 'absorbed', 'd' || g, now() + interval '1 hour' FROM generate_series(1, 5000) g").unwrap();
        Spi::run("ANALYZE outbox.queue").unwrap();
        let plan = worker_plan(super::ABSORB_INBOX, "bigint, bigint, text[], text[]", "1000, 0, '{}', '{}'");
        assert!(!plan.contains("Seq Scan on queue"), "{plan}");
        assert!(plan.contains("queue_fresh_key"), "{plan}");
        // Each change probes the fresh key, whatever the statistics: a join
        // the planner may turn around would scan it whole instead.
        let lines: Vec<&str> = plan.lines().collect();
        let probe = lines.iter().position(|l| l.contains("using queue_fresh_key on queue")).expect("the probe");
        let cond = lines[probe + 1];
        assert!(cond.contains("Index Cond: ((kind = changed") && cond.contains("AND (id = changed"), "{plan}");
        Spi::run("INSERT INTO outbox.inbox (kind, id, enqueued_at) VALUES ('absorbed', 'd4321', now())").unwrap();
        let before = read();
        assert_eq!(crate::worker::queue::absorb_all(), 1);
        assert!(read() - before < 20, "read {} jobs", read() - before);
        let moved = Spi::get_one::<bool>("SELECT run_at <= now() FROM outbox.queue WHERE id = 'd4321'").unwrap();
        assert_eq!(moved, Some(true));
    }

    fn claim(busy: &super::InFlightKeys) -> Vec<super::Claimed> {
        claim_of("k", busy)
    }

    fn claim_of(kind: &str, busy: &super::InFlightKeys) -> Vec<super::Claimed> {
        claim_at_most(kind, 10, busy)
    }

    fn claim_at_most(kind: &str, room: i64, busy: &super::InFlightKeys) -> Vec<super::Claimed> {
        Spi::connect_mut(|c| super::claim(c, &[(kind.to_string(), room)], &mut super::Cursors::new(), 10, 10, busy))
    }

    /// A kind's room (what its `max_in_flight` leaves) bounds its claim;
    /// another kind's claim in the same statement is not held back by it.
    #[pg_test]
    fn a_kinds_room_bounds_its_claim() {
        Spi::run("SELECT outbox.register('k', 'http://h/{id}'), outbox.register('j', 'http://h/{id}')").unwrap();
        Spi::run("SELECT count(outbox.enqueue('k', g)) + count(outbox.enqueue('j', g)) FROM generate_series(1, 5) g").unwrap();
        crate::worker::queue::absorb_all();
        assert_eq!(claim_at_most("k", 2, &Vec::new()).len(), 2);
        let both = Spi::connect_mut(|c| {
            super::claim(c, &[("k".to_string(), 1), ("j".to_string(), 10)], &mut super::Cursors::new(), 10, 10, &Vec::new())
        });
        let count = |kind: &str| both.iter().filter(|j| j.kind == kind).count();
        assert_eq!((count("k"), count("j")), (1, 5));
    }

    fn backfill(kind: &str, ids: &[&str]) {
        Spi::connect_mut(|c| {
            let args: [pgrx::datum::DatumWithOid; 2] = [kind.into(), ids.to_vec().into()];
            super::execute(c, super::ENQUEUE_BACKFILLED, &[super::super::plans::types::TEXT, TEXT_ARRAY], &args).unwrap();
        });
    }

    /// A kind's live jobs are claimed before its backfilled ones, older or
    /// not; a turn takes at most so many backfilled ones, and both lanes
    /// share the kind's room.
    #[pg_test]
    fn live_jobs_go_before_backfilled_ones() {
        Spi::run("SELECT outbox.register('k', 'http://h/{id}')").unwrap();
        backfill("k", &["b1", "b2", "b3"]);
        Spi::run("SELECT outbox.enqueue('k', 'l1'), outbox.enqueue('k', 'l2')").unwrap();
        crate::worker::queue::absorb_all();
        let lanes = crate::testing::texts("SELECT string_agg(format('%s:%s', id, backfilled), ' ' ORDER BY job_id) FROM outbox.queue", &[]);
        assert_eq!(lanes, ["b1:t b2:t b3:t l1:f l2:f"]);
        // Live ones first, though the others are older.
        assert_eq!(ids(&claim_at_most("k", 2, &Vec::new())), ["l1", "l2"]);
        // At most the backfilled limit of the others, which does not bound
        // the live ones.
        crate::capture::inbox::forget();
        Spi::run("SELECT outbox.enqueue('k', 'l3')").unwrap();
        crate::worker::queue::absorb_all();
        let mixed = Spi::connect_mut(|c| super::claim(c, &[("k".to_string(), 10)], &mut super::Cursors::new(), 10, 1, &Vec::new()));
        assert_eq!(ids(&mixed), ["b1", "l3"]);
        assert_eq!(mixed.iter().map(|j| (j.id.as_str(), j.backfilled)).filter(|(_, b)| *b).count(), 1);
        assert_eq!(ids(&claim(&Vec::new())), ["b2", "b3"]);
    }

    /// A change that joins a record's backfilled fresh job makes it live,
    /// in the absorb and in the one-row absorb of the quarantine; a
    /// backfill leaves a live fresh job live.
    #[pg_test]
    fn a_change_makes_a_backfilled_job_live() {
        Spi::run("SELECT outbox.register('k', 'http://h/{id}')").unwrap();
        backfill("k", &["a", "b", "c"]);
        // a's chunk was read a while ago: made live, it is due now, not
        // before the live lane's cursor.
        Spi::run("UPDATE outbox.queue SET run_at = now() - interval '1 min' WHERE id = 'a'").unwrap();
        Spi::run("SELECT outbox.enqueue('k', 'a'), outbox.enqueue('k', 'd', interval '1 hour')").unwrap();
        crate::worker::queue::absorb_all();
        Spi::run("INSERT INTO outbox.inbox (kind, ids, enqueued_at, run_at) VALUES ('k', '{b}', now(), now() + interval '1 hour')").unwrap();
        Spi::connect_mut(|c| {
            let tid = c.select("SELECT ctid::text FROM outbox.inbox", None, &[]).unwrap().first().get_one::<String>().unwrap().unwrap();
            super::execute(c, super::ABSORB_ROW, &[super::super::plans::types::TEXT], &[tid.as_str().into()]).unwrap();
        });
        backfill("k", &["c", "d"]);
        let jobs = crate::testing::texts(
            "SELECT string_agg(format('%s:%s:%s', id, backfilled, run_at <= now()), ' ' ORDER BY id) FROM outbox.queue",
            &[],
        );
        // b's change asked for an hour from now: it joins a job due now, as
        // any later delay does, and stays due now.
        assert_eq!(jobs, ["a:f:t b:f:t c:t:t d:f:f"]);
        let a_now = Spi::get_one::<bool>("SELECT run_at = now() FROM outbox.queue WHERE id = 'a'").unwrap();
        assert_eq!(a_now, Some(true));
    }

    /// Of a record's two due jobs, a backfilled one being retried and a
    /// live one, the claim takes the live one.
    #[pg_test]
    fn a_records_live_job_goes_before_its_backfilled_retry() {
        Spi::run("SELECT outbox.register('k', 'http://h/{id}')").unwrap();
        backfill("k", &["r"]);
        Spi::run("UPDATE outbox.queue SET attempts = 1, last_attempt_at = now() - interval '1 min', run_at = now() - interval '1 min'")
            .unwrap();
        Spi::run("SELECT outbox.enqueue('k', 'r')").unwrap();
        crate::worker::queue::absorb_all();
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM outbox.queue WHERE id = 'r'").unwrap(), Some(2));
        let first = claim(&Vec::new());
        assert_eq!(first.iter().map(|j| (j.id.as_str(), j.backfilled)).collect::<Vec<_>>(), [("r", false)]);
    }

    fn ids(claimed: &[super::Claimed]) -> Vec<&str> {
        let mut ids: Vec<&str> = claimed.iter().map(|j| j.id.as_str()).collect();
        ids.sort();
        ids
    }

    #[pg_test]
    fn a_record_in_flight_is_held_back_by_its_key_hash() {
        Spi::run("SELECT outbox.register('k', 'http://h/{id}')").unwrap();
        Spi::run("SELECT outbox.enqueue('k', 'a'), outbox.enqueue('k', 'b')").unwrap();
        crate::worker::queue::absorb_all();
        let first = claim(&Vec::new());
        assert_eq!(ids(&first), ["a", "b"]);
        let a = first.iter().find(|j| j.id == "a").unwrap();
        assert_ne!(a.key_hash, first.iter().find(|j| j.id == "b").unwrap().key_hash);
        // While a's delivery is in flight, a is enqueued again (a new job:
        // the running one may have read the old state), and so is c. (This
        // test is one transaction, which would take a's repeat for one it
        // has buffered already: the worker never claims in its transaction.)
        crate::capture::inbox::forget();
        Spi::run("SELECT outbox.enqueue('k', 'a'), outbox.enqueue('k', 'c')").unwrap();
        crate::worker::queue::absorb_all();
        let in_flight = vec![a.key_hash];
        let due = |busy: &super::InFlightKeys| Spi::connect_mut(|c| super::next_due_ms(c, vec!["k".into()], busy, true));
        let second = claim(&in_flight);
        assert_eq!(ids(&second), ["c"], "a is in flight");
        assert_eq!(due(&in_flight), None, "nothing the claim could take");
        assert_eq!(due(&Vec::new()), Some(0));
        // Its delivery over, a's new job is claimed, with the same key hash.
        let third = claim(&Vec::new());
        assert_eq!(ids(&third), ["a"]);
        assert_eq!(third[0].key_hash, a.key_hash);
        assert_ne!(third[0].job_id, a.job_id);
    }

    /// The plan of one of the worker's statements, made as the worker makes
    /// it: generic, with its own settings.
    fn worker_plan(sql: &str, types: &str, args: &str) -> String {
        crate::pg::settings::with_settings(&super::super::plans::OWN_SETTINGS, || {
            Spi::run(&format!("PREPARE worker_statement({types}) AS {sql}")).unwrap();
            let plan = crate::testing::texts(&format!("EXPLAIN EXECUTE worker_statement({args})"), &[]).join("\n");
            Spi::run("DEALLOCATE worker_statement").unwrap();
            plan
        })
    }

    /// Completing a batch finds each job by its ctid, once: no scan of the
    /// batch's pairs per job.
    #[pg_test]
    fn completing_finds_each_job_by_its_ctid() {
        Spi::run("INSERT INTO outbox.queue (kind, id, state, claim) SELECT 'k', g::text, 'running', 7 FROM generate_series(1, 5000) g").unwrap();
        Spi::run("ANALYZE outbox.queue").unwrap();
        let plan = worker_plan(super::COMPLETE, "text[], bigint[], bigint[]", "'{\"(0,1)\"}', '{1}', '{7}'");
        // PostgreSQL 18 prints the condition the other way round.
        let by_ctid = plan.contains("TID Cond: (ctid = u.ctid)") || plan.contains("TID Cond: (u.ctid = ctid)");
        assert!(by_ctid && plan.contains("Tid Scan on queue q") && !plan.contains("Semi Join"), "{plan}");
    }

    #[pg_test]
    fn the_claim_scans_queue_due_with_statistics_or_without() {
        // Two indexes lead with kind: the claim must take the one in its order.
        Spi::run("SELECT outbox.register('user', 'http://h/{id}')").unwrap();
        Spi::run("SELECT count(outbox.enqueue('user', g)) FROM generate_series(1, 5000) g").unwrap();
        crate::worker::queue::absorb_all();
        for analyzed in [false, true] {
            if analyzed {
                Spi::run("ANALYZE outbox.queue").unwrap();
            }
            let claim = worker_plan(
                super::CLAIM,
                "text[], bigint, bigint[], bigint[], bigint[], bigint[], boolean[]",
                "'{user,user}', 10, '{NULL,NULL}', '{NULL,NULL}', '{}', '{10,10}', '{f,t}'",
            );
            let next_due = worker_plan(super::NEXT_DUE, "text[], bigint[], boolean[]", "'{user}', '{}', '{f,t}'");
            for plan in [claim, next_due] {
                assert!(plan.contains("using queue_due") && !plan.contains("queue_fresh_key"), "analyzed: {analyzed}\n{plan}");
                assert!(!plan.contains("Seq Scan on queue"), "analyzed: {analyzed}\n{plan}");
            }
        }
    }

    /// Each batch adds its tallies to the kinds' counters: classes, the
    /// histogram bucket by bucket, and the latency sum.
    #[pg_test]
    fn stats_add_up_classes_and_the_latency_histogram() {
        use crate::rules::metrics::Tally;
        use crate::rules::policy::Class;
        Spi::run("SELECT outbox.register('a', 'http://h/{id}'), outbox.register('b', 'http://h/{id}')").unwrap();
        let batch = |a: &[(Class, Option<f64>)], b: &[(Class, Option<f64>)]| {
            let mut tallies = Vec::new();
            for (kind, outcomes) in [("a", a), ("b", b)] {
                let mut t = Tally::default();
                for (class, latency) in outcomes {
                    t.add(*class, *latency);
                }
                tallies.push((kind.to_string(), t));
            }
            Spi::connect_mut(|c| super::bump_stats(c, tallies));
        };
        batch(&[(Class::Delivered, Some(0.001)), (Class::ServerError, None)], &[(Class::Throttled, None)]);
        batch(&[(Class::Delivered, Some(0.002)), (Class::Delivered, Some(7.0))], &[(Class::Delivered, Some(0.2))]);
        let row = |kind: &str| {
            crate::testing::texts(
                "SELECT concat_ws(' ', delivered, failed_attempts, rejected, throttled, server_errors, unreachable, unbuildable,
                                  latency_counts::text, latency_sum, last_success_at IS NOT NULL, last_failure_at IS NOT NULL)
                   FROM outbox.kind_stats WHERE kind = $1",
                &[kind.into()],
            )
        };
        assert_eq!(row("a"), ["3 1 0 0 1 0 0 {2,0,0,0,0,0,0,0,0,0,1,0,0,0,0,0,0} 7.003 t t"]);
        assert_eq!(row("b"), ["1 1 0 1 0 0 0 {0,0,0,0,0,1,0,0,0,0,0,0,0,0,0,0,0} 0.2 t t"]);
    }
}
