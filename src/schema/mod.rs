//! The extension's tables, indexes, view and privileges.
//!
//! Job states live twice, as [`JobState`] and as the domain `outbox.job_state`.
//! A *fresh* job (pending and never attempted) is what enqueues coalesce
//! into, hence the unique partial index `queue_fresh_key`.

pub mod fresh_key;

/// The fresh predicate: a pending job never attempted, which later changes
/// of its record coalesce into (the index `queue_fresh_key` is partial on
/// it). `fresh!()` over the queue's own columns, `fresh!("f")` over an
/// alias; a macro, so that statements take it in with `concat!`.
macro_rules! fresh {
    () => {
        "state OPERATOR(pg_catalog.=) 'pending' AND last_attempt_at IS NULL"
    };
    ($alias:literal) => {
        concat!($alias, ".state OPERATOR(pg_catalog.=) 'pending' AND ", $alias, ".last_attempt_at IS NULL")
    };
}
pub(crate) use fresh;

use pgrx::prelude::*;

/// A job's state. Mirrors the domain `outbox.job_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Pending,
    // Only the claim's SQL makes a job running; Rust never writes it.
    #[allow(dead_code)]
    Running,
    Dead,
}

impl JobState {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Dead => "dead",
        }
    }
}

/// The oid of table `outbox.<name>`, if it exists.
pub fn relid(name: &std::ffi::CStr) -> Option<pg_sys::Oid> {
    relation(name).map(|(oid, _)| oid)
}

/// The oids of table `outbox.<name>` and of the schema `outbox`, if it exists.
pub fn relation(name: &std::ffi::CStr) -> Option<(pg_sys::Oid, pg_sys::Oid)> {
    // SAFETY: syscache lookups; both return InvalidOid for what is missing.
    let (oid, ns) = unsafe {
        let ns = pg_sys::get_namespace_oid(c"outbox".as_ptr(), true);
        (if ns == pg_sys::InvalidOid { ns } else { pg_sys::get_relname_relid(name.as_ptr(), ns) }, ns)
    };
    (oid != pg_sys::InvalidOid).then_some((oid, ns))
}

/// Whether the tables have the columns of version 0.3.0 (secret rotation,
/// `max_in_flight` and `rate_limit` in `outbox.kinds`, the outcome classes,
/// latency histogram and breaker in `outbox.kind_stats`, the backfill lane
/// of `outbox.queue`; one upgrade script adds them all). The library runs against a database still on 0.2.0
/// between a server restart and `ALTER EXTENSION outbox UPDATE`: there,
/// statements that name them can't run.
pub fn at_0_3() -> bool {
    let Some((kinds, _)) = relation(c"kinds") else { return false };
    // SAFETY: a syscache lookup; InvalidAttrNumber for a missing column.
    unsafe { pg_sys::get_attnum(kinds, c"previous_secret".as_ptr()) != pg_sys::InvalidAttrNumber as i16 }
}

/// Where a backend last found one of the tables: (its oid, the schema's).
type Found = std::thread::LocalKey<std::cell::Cell<Option<(pg_sys::Oid, pg_sys::Oid)>>>;

/// Opens table `outbox.<name>` with `lock`, None if there is none. The oid
/// is remembered in `found` from one transaction to the next instead of
/// looked up by name on every call of the write path; a relation of that
/// oid that is no longer `outbox.<name>` (the extension was dropped and
/// created again) sends it back to the lookup. Taking the lock has processed
/// the invalidations of anything committed before: a dropped table is then
/// gone.
///
/// # Safety
/// In a transaction; the caller closes the relation.
pub unsafe fn open(name: &std::ffi::CStr, found: &'static Found, lock: pg_sys::LOCKMODE) -> Option<pg_sys::Relation> {
    if let Some((oid, ns)) = found.get() {
        // SAFETY: try_relation_open returns NULL for a relation that is gone;
        // rd_rel is valid for an open relation.
        unsafe {
            let rel = pg_sys::try_relation_open(oid, lock);
            if !rel.is_null() {
                let form = &*(*rel).rd_rel;
                if form.relnamespace == ns && std::ffi::CStr::from_ptr(form.relname.data.as_ptr()) == name {
                    return Some(rel);
                }
                pg_sys::relation_close(rel, lock);
            }
        }
        found.set(None);
    }
    let (oid, ns) = relation(name)?;
    // SAFETY: the oid was just looked up; table_open raises if it went since.
    let rel = unsafe { pg_sys::table_open(oid, lock) };
    found.set(Some((oid, ns)));
    Some(rel)
}

/// Lets `#[pg_extern(schema = "outbox")]` name the schema. The bootstrap SQL
/// below creates it first, so pgrx's `CREATE SCHEMA IF NOT EXISTS` is a no-op.
#[pg_schema]
mod outbox {}

extension_sql!(
    r#"
CREATE SCHEMA outbox;
COMMENT ON SCHEMA outbox IS 'transactional outbox: enqueue ids, deliver current state';

-- Kinds and ids are names, not words: they compare byte by byte (COLLATE
-- "C") whatever the database's collation. Every absorb, claim and enqueue
-- compares them in btrees: in a database whose collation is en-US (ICU), an
-- INSERT ... ON CONFLICT of 200,000 changes into the queue took 8 to 22%
-- longer with that collation than with "C".
CREATE TABLE outbox.kinds (
    kind         text COLLATE "C" PRIMARY KEY
                 CHECK (kind OPERATOR(pg_catalog.<>) ''
                        AND pg_catalog.octet_length(kind) OPERATOR(pg_catalog.<=) 200),
    url          text NOT NULL,
    body         regprocedure,
    headers      jsonb NOT NULL DEFAULT '{}'
                 CHECK (pg_catalog.jsonb_typeof(headers) OPERATOR(pg_catalog.=) 'object'),
    secret       text,
    timeout      interval NOT NULL DEFAULT '10 s'
                 CHECK (timeout OPERATOR(pg_catalog.>=) '1 ms' AND timeout OPERATOR(pg_catalog.<=) '1 hour'),
    max_attempts int NOT NULL DEFAULT 25
                 CHECK (max_attempts OPERATOR(pg_catalog.>=) 1 AND max_attempts OPERATOR(pg_catalog.<=) 1000),
    on_missing   text NOT NULL DEFAULT 'delete'
                 CHECK (on_missing OPERATOR(pg_catalog.=) 'delete' OR on_missing OPERATOR(pg_catalog.=) 'skip'),
    paused       boolean NOT NULL DEFAULT false,
    -- The role body functions run as (see worker/render.rs); a superuser
    -- only with allow_superuser, which only a superuser may set.
    run_as       regrole,
    allow_superuser boolean NOT NULL DEFAULT false,
    -- How long a render of this kind's bodies may run or wait for a lock.
    render_timeout interval NOT NULL DEFAULT '1 s'
                 CHECK (render_timeout OPERATOR(pg_catalog.>=) '10 ms'
                        AND render_timeout OPERATOR(pg_catalog.<=) '5 min'),
    created_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- The secret outbox.rotate_secret replaced: requests carry its
    -- signature too until previous_secret_until.
    previous_secret text,
    previous_secret_until timestamptz,
    CONSTRAINT kinds_previous_secret_check
        CHECK ((previous_secret IS NULL) OPERATOR(pg_catalog.=) (previous_secret_until IS NULL)),
    -- At most this many of the kind's requests in flight at once (NULL:
    -- only outbox.concurrency bounds them).
    max_in_flight int
                 CHECK (max_in_flight OPERATOR(pg_catalog.>=) 1 AND max_in_flight OPERATOR(pg_catalog.<=) 1024),
    -- At most this many of the kind's requests a second, sent evenly (NULL:
    -- no limit).
    rate_limit   double precision
                 CHECK (rate_limit OPERATOR(pg_catalog.>) 0 AND rate_limit OPERATOR(pg_catalog.<=) 100000)
);

-- Who may call outbox.enqueue() for a kind, or (kind NULL) for every kind.
-- Membership counts, as for a GRANT. Tracked tables need no entry: their
-- triggers were made by an admin.
CREATE TABLE outbox.enqueuers (
    role       regrole NOT NULL,
    kind       text COLLATE "C" REFERENCES outbox.kinds ON DELETE CASCADE,
    granted_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
-- A kind is never '' (a CHECK on kinds), so '' stands for every kind.
CREATE UNIQUE INDEX enqueuers_key ON outbox.enqueuers (role, (coalesce(kind, '')));

-- Counters the worker bumps once per batch and kind, and the state of the
-- kind's circuit breaker, which it writes when that changes.
CREATE TABLE outbox.kind_stats (
    kind            text COLLATE "C" PRIMARY KEY REFERENCES outbox.kinds ON DELETE CASCADE,
    delivered       bigint NOT NULL DEFAULT 0,
    -- The sum of the five classes of failed attempts below.
    failed_attempts bigint NOT NULL DEFAULT 0,
    last_success_at timestamptz,
    last_failure_at timestamptz,
    -- Failed attempts by what came of them: refused (3xx, 4xx but 408 and
    -- 429), throttled (429), a server error (5xx, 408), no answer, and no
    -- request at all (the URL or body could not be made).
    rejected        bigint NOT NULL DEFAULT 0,
    throttled       bigint NOT NULL DEFAULT 0,
    server_errors   bigint NOT NULL DEFAULT 0,
    unreachable     bigint NOT NULL DEFAULT 0,
    unbuildable     bigint NOT NULL DEFAULT 0,
    -- Seconds from a change's transaction to its 2xx: how many deliveries
    -- fell in each bucket of outbox.metrics()' histogram, and their sum.
    latency_counts  bigint[] NOT NULL DEFAULT '{}',
    latency_sum     double precision NOT NULL DEFAULT 0,
    breaker         text NOT NULL DEFAULT 'closed'
                    CHECK (breaker OPERATOR(pg_catalog.=) ANY ('{closed,open,half-open}'::text[])),
    -- When the breaker last opened (NULL while closed), and the failure
    -- that opened it or kept it open.
    breaker_opened_at timestamptz,
    breaker_error   text
);

-- A domain, not a CHECK on the table: Postgres parses and plans a table's
-- CHECK constraints again for every INSERT statement it runs, a seventh of
-- the CPU of each queue insert (perf), while a domain's check is
-- parsed once per session. Text underneath, so `state = 'dead'` on the jobs
-- view still proves the partial indexes' predicates (an enum behind a
-- `::text` view did not).
CREATE DOMAIN outbox.job_state AS text
    CHECK (VALUE OPERATOR(pg_catalog.=) ANY ('{pending,running,dead}'::text[]));

-- No foreign key to kinds: it would lock the kind's row in every enqueuing
-- transaction. The worker dead-letters a job whose kind has gone.
CREATE TABLE outbox.queue (
    job_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind            text COLLATE "C" NOT NULL,
    id              text COLLATE "C" NOT NULL,
    state           outbox.job_state NOT NULL DEFAULT 'pending',
    attempts        int NOT NULL DEFAULT 0,
    run_at          timestamptz NOT NULL DEFAULT pg_catalog.now(),
    enqueued_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
    last_attempt_at timestamptz,
    last_status     int,
    last_error      text,
    -- The claim that made the job running: the claiming transaction's id.
    -- An outcome names it, so that one answering an older claim (of a job
    -- id since reused: TRUNCATE ... RESTART IDENTITY, the extension made
    -- anew) changes nothing.
    claim           bigint,
    -- A backfill's job (outbox.backfill): claimed only when the kind has
    -- no live job due, so that a backfill never holds up a change. A change
    -- that coalesces into it makes it live.
    backfilled      boolean NOT NULL DEFAULT false
) WITH (
    -- A queue churns: vacuum it early so dead index entries stay few.
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);

-- Every change, tracked or enqueued, written with direct heap inserts, many
-- ids a row (inbox.rs). No indexes, on purpose: the worker empties it into
-- the queue. A row of one change holds its id in `id`: most transactions
-- change one record, and an array would double the row and its WAL record.
-- run_at: not before then (an enqueue with a delay); NULL: at once.
CREATE TABLE outbox.inbox (
    kind        text COLLATE "C" NOT NULL,
    id          text COLLATE "C",
    ids         text[] COLLATE "C",
    enqueued_at timestamptz NOT NULL,
    run_at      timestamptz,
    CONSTRAINT inbox_id_or_ids CHECK ((id IS NULL) OPERATOR(pg_catalog.<>) (ids IS NULL))
) WITH (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 0);

-- Inbox rows the worker could not move into the queue (worker/queue.rs):
-- set aside with the reason, so that one bad row costs that row, never the
-- worker. Shown in outbox.jobs as dead.
CREATE TABLE outbox.rejected (
    kind        text COLLATE "C" NOT NULL,
    id          text COLLATE "C",
    ids         text[] COLLATE "C",
    enqueued_at timestamptz NOT NULL,
    run_at      timestamptz,
    rejected_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    reason      text NOT NULL
);

-- The last attempts of each kind, outbox.attempts_kept of them (none by
-- default): what a receiver answered, and how long it took, without
-- reading the server's log. The worker adds and prunes them per batch.
CREATE TABLE outbox.attempts (
    attempt_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind        text COLLATE "C" NOT NULL REFERENCES outbox.kinds ON DELETE CASCADE,
    id          text COLLATE "C" NOT NULL,
    job_id      bigint NOT NULL,
    attempt     int NOT NULL,
    method      text NOT NULL,
    at          timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- delivered, rejected, throttled, server_error, unreachable or
    -- unbuildable, as outbox.metrics() counts them.
    outcome     text NOT NULL,
    status      int,
    duration_ms double precision,
    error       text
);
CREATE INDEX attempts_kind ON outbox.attempts (kind, attempt_id);

-- Backfills (outbox.backfill): the worker pages through a table in the
-- order of its id column, a chunk at a time, each in a turn of its own,
-- while the kind has few jobs due. last_id is where it stands: it goes on
-- from there after a restart.
CREATE TABLE outbox.backfills (
    backfill_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tbl         regclass NOT NULL,
    kind        text COLLATE "C" NOT NULL REFERENCES outbox.kinds ON DELETE CASCADE,
    id_column   name NOT NULL,
    -- Which rows: the filter as Postgres printed it back (NULL: all).
    filter      text,
    -- Who started it: the table is read with this role's rights.
    run_as      regrole NOT NULL,
    state       text NOT NULL DEFAULT 'running'
                CHECK (state OPERATOR(pg_catalog.=) ANY ('{running,done,failed,cancelled}'::text[])),
    last_id     text,
    enqueued    bigint NOT NULL DEFAULT 0,
    -- The table's rows when it started, as the planner estimated them.
    rows_estimate bigint,
    started_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    finished_at timestamptz,
    error       text
);
-- One running backfill per table and kind.
CREATE UNIQUE INDEX backfills_running ON outbox.backfills (tbl, kind)
    WHERE state OPERATOR(pg_catalog.=) 'running';

-- Coalescing: at most one fresh job per record.
CREATE UNIQUE INDEX queue_fresh_key ON outbox.queue (kind, id)
    WHERE state OPERATOR(pg_catalog.=) 'pending' AND last_attempt_at IS NULL;
-- The claim's scan order, per kind (so paused kinds cost nothing to skip)
-- and lane: live jobs, then backfilled ones.
CREATE INDEX queue_due ON outbox.queue (kind, backfilled, run_at, job_id) WHERE state OPERATOR(pg_catalog.=) 'pending';
-- No index of running jobs: the worker, their only claimer, keeps them in
-- memory and skips their records when it claims.
CREATE INDEX queue_dead ON outbox.queue (kind) WHERE state OPERATOR(pg_catalog.=) 'dead';

-- pg_dump keeps what these hold, as it does a table of the database's own:
-- the kinds, the jobs and the inbox (changes not yet delivered), and the
-- counters. (Jobs restored `running` go back to `pending`: restore.rs.)
SELECT pg_catalog.pg_extension_config_dump('outbox.kinds', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.kind_stats', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.queue', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.inbox', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.enqueuers', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.rejected', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.backfills', '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('outbox.queue', 'job_id'), '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('outbox.backfills', 'backfill_id'), '');

-- Changes still in the inbox are pending jobs without a job_id yet; inbox
-- rows the worker set aside are dead ones, with the reason.
CREATE VIEW outbox.jobs AS
SELECT job_id, kind, id, state::text AS state, attempts, run_at, enqueued_at,
       last_attempt_at, last_status, last_error
  FROM outbox.queue
UNION ALL
SELECT NULL, i.kind, u.id, 'pending', 0, coalesce(i.run_at, i.enqueued_at), i.enqueued_at, NULL, NULL, NULL
  FROM outbox.inbox i
 CROSS JOIN LATERAL pg_catalog.unnest(coalesce(i.ids, ARRAY[i.id])) AS u(id)
UNION ALL
SELECT NULL, r.kind, u.id, 'dead', 0, r.enqueued_at, r.enqueued_at, r.rejected_at, NULL, r.reason
  FROM outbox.rejected r
 CROSS JOIN LATERAL pg_catalog.unnest(coalesce(r.ids, ARRAY[r.id])) AS u(id);
"#,
    name = "schema",
    bootstrap
);

extension_sql!(
    r#"

-- Application roles may enqueue the kinds an admin allowed them
-- (outbox.grant_enqueue; enqueue checks that itself), and do nothing else.
-- Tracked tables need no grant: an admin made their triggers, and
-- attaching enqueue_trigger() is for admins too (`track`).
REVOKE ALL ON ALL TABLES IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA outbox FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA outbox FROM PUBLIC;
GRANT USAGE ON SCHEMA outbox TO PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.enqueue(text, anycompatible) TO PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.enqueue(text, anycompatible, interval) TO PUBLIC;
"#,
    name = "privileges",
    finalize
);

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::testing::sqlstate_of;
    use pgrx::prelude::*;


    /// The index coalescing relies on is partial on the same predicate the
    /// statements name with `fresh!`.
    #[pg_test]
    fn the_fresh_key_index_is_the_fresh_predicate() {
        Spi::run(concat!("CREATE INDEX fresh_probe ON outbox.queue (kind, id) WHERE ", fresh!())).unwrap();
        let predicates = crate::testing::texts(
            "SELECT pg_catalog.pg_get_expr(indpred, indrelid) FROM pg_catalog.pg_index
              WHERE indexrelid IN ('outbox.queue_fresh_key'::regclass, 'outbox.fresh_probe'::regclass)",
            &[],
        );
        assert_eq!(predicates.len(), 2);
        assert_eq!(predicates[0], predicates[1]);
        assert_eq!(fresh!("f"), "f.state OPERATOR(pg_catalog.=) 'pending' AND f.last_attempt_at IS NULL");
    }
    #[pg_test]
    fn kinds_and_ids_compare_byte_by_byte() {
        let not_c = crate::testing::texts(
            "SELECT format('%s.%s', a.attrelid::regclass, a.attname)
               FROM pg_catalog.pg_attribute a
              WHERE a.attrelid IN ('outbox.kinds'::regclass, 'outbox.kind_stats'::regclass,
                                   'outbox.queue'::regclass, 'outbox.inbox'::regclass)
                AND a.attname IN ('kind', 'id', 'ids')
                AND a.attcollation <> 'pg_catalog.\"C\"'::regcollation",
            &[],
        );
        assert!(not_c.is_empty(), "{not_c:?}");
        // And with the default collation of a query's other side.
        Spi::run("SELECT outbox.register('user', 'http://h/{id}')").unwrap();
        Spi::run("SELECT outbox.enqueue('user', v) FROM (VALUES ('a'), ('B')) AS t(v)").unwrap();
        let ids = crate::testing::texts("SELECT id FROM outbox.jobs WHERE id IN (SELECT 'a'::text UNION SELECT 'B') ORDER BY id", &[]);
        assert_eq!(ids, ["B", "a"]);
    }

    /// Every function the extension defines pins its search_path, so that no
    /// function or operator it uses can be shadowed from the caller's path.
    /// Except the two on every application write's path, which run no SQL
    /// and resolve no name through the path (the statements the trigger
    /// runs on a TRUNCATE or a new partition pin it themselves): the clause
    /// cost each call a tenth of its time.
    #[pg_test]
    fn every_function_pins_its_search_path() {
        let loose = crate::testing::texts(
            "SELECT p.oid::regprocedure::text FROM pg_catalog.pg_proc p
              WHERE p.pronamespace = 'outbox'::regnamespace
                AND NOT coalesce(p.proconfig @> ARRAY['search_path=pg_catalog, pg_temp'], false)
              ORDER BY 1",
            &[],
        );
        let hot_path = [
            "outbox.enqueue(text,anycompatible)",
            "outbox.enqueue(text,anycompatible,interval)",
            "outbox.enqueue_trigger()",
        ];
        assert_eq!(loose, hot_path, "functions without a pinned search_path");
    }

    #[pg_test]
    fn the_jobs_view_finds_dead_jobs_on_their_index() {
        // The README's query for dead jobs must not read every pending one.
        Spi::run("SELECT outbox.register('user', 'http://h/{id}')").unwrap();
        Spi::run("INSERT INTO outbox.queue (kind, id) SELECT 'user', g::text FROM generate_series(1, 5000) g").unwrap();
        Spi::run("UPDATE outbox.queue SET state = 'dead', last_attempt_at = now() WHERE id IN ('1', '2')").unwrap();
        Spi::run("ANALYZE outbox.queue").unwrap();
        let plan = crate::testing::texts(
            "EXPLAIN SELECT job_id, id FROM outbox.jobs WHERE state = 'dead' ORDER BY last_attempt_at DESC",
            &[],
        )
        .join("\n");
        assert!(plan.contains("queue_dead") && !plan.contains("Seq Scan on queue"), "{plan}");
        let dead = crate::testing::texts("SELECT id FROM outbox.jobs WHERE state = 'dead' ORDER BY id", &[]);
        assert_eq!(dead, ["1", "2"]);
        // The domain still refuses what is not a state.
        assert_eq!(sqlstate_of("UPDATE outbox.queue SET state = 'done' WHERE id = '3'"), "23514");
    }

    #[pg_test]
    fn an_application_role_can_enqueue_and_nothing_else() {
        Spi::run("SELECT outbox.register('user', 'http://h/{id}', secret => 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw')").unwrap();
        Spi::run("CREATE TABLE public.users (id int PRIMARY KEY, name text)").unwrap();
        Spi::run("SELECT outbox.track('public.users', 'user')").unwrap();
        Spi::run("CREATE ROLE outbox_test_app NOLOGIN NOSUPERUSER").unwrap();
        Spi::run("GRANT ALL ON public.users TO outbox_test_app").unwrap();
        Spi::run("CREATE TABLE public.own (id int PRIMARY KEY)").unwrap();
        Spi::run("ALTER TABLE public.own OWNER TO outbox_test_app").unwrap();
        Spi::run("SELECT outbox.grant_enqueue('outbox_test_app', 'user')").unwrap();
        Spi::run("SET ROLE outbox_test_app").unwrap();
        let allowed = [
            "SELECT outbox.enqueue('user', 1)",
            "SELECT outbox.enqueue('user', 'x', interval '1 min')",
            "INSERT INTO public.users VALUES (2, 'a')",
            "UPDATE public.users SET name = 'b'",
            "DELETE FROM public.users",
        ];
        for sql in allowed {
            assert_eq!(sqlstate_of(sql), "00000", "{sql}");
        }
        let denied = [
            "SELECT * FROM outbox.jobs",
            "SELECT * FROM outbox.queue",
            "SELECT secret FROM outbox.kinds",
            "SELECT previous_secret FROM outbox.kinds",
            "SELECT outbox.rotate_secret('user', 'whsec_YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4')",
            "SELECT outbox.set_max_in_flight('user', 1)",
            "SELECT outbox.set_rate_limit('user', 1)",
            "SELECT * FROM outbox.kind_stats",
            "INSERT INTO outbox.queue (kind, id) VALUES ('user', '9')",
            "SELECT * FROM outbox.inbox",
            "INSERT INTO outbox.inbox (kind, id, enqueued_at) VALUES ('user', '9', now())",
            "SELECT outbox.register('evil', 'http://attacker/{id}')",
            "SELECT outbox.unregister('user', true)",
            "SELECT outbox.pause('user')",
            "SELECT outbox.resume('user')",
            "SELECT outbox.track('public.users', 'user')",
            "SELECT outbox.untrack('public.users', 'user')",
            "SELECT * FROM outbox.stats()",
            "SELECT * FROM outbox.worker_status()",
            "SELECT outbox.retry(1)",
            "SELECT outbox.retry_dead()",
            "SELECT outbox.discard(1)",
            "SELECT outbox.purge_dead('1 day')",
            "SELECT outbox.wake()",
            "SELECT outbox.grant_enqueue('outbox_test_app')",
            "SELECT * FROM outbox.enqueuers",
            "SELECT * FROM outbox.rejected",
            // Attaching the trigger function is for admins (`track`): on a
            // table of its own, temporary or not, a role gets nothing.
            "CREATE TRIGGER t AFTER INSERT ON public.own FOR EACH ROW EXECUTE FUNCTION outbox.enqueue_trigger('user', 'id')",
            "CREATE TEMP TABLE tmp (id int); CREATE TRIGGER t AFTER INSERT ON tmp FOR EACH ROW EXECUTE FUNCTION outbox.enqueue_trigger('user', 'id')",
        ];
        for sql in denied {
            assert_eq!(sqlstate_of(sql), "42501", "{sql}");
        }
        Spi::run("RESET ROLE").unwrap();
        let ids = Spi::get_one::<i64>("SELECT count(*) FROM outbox.jobs WHERE id IN ('1', 'x', '2')").unwrap();
        assert_eq!(ids, Some(3));
    }
}

#[cfg(test)]
mod qualified {
    #[test]
    fn every_statement_names_the_schema_of_its_functions_and_operators() {
        for block in crate::testing::sql_check::extension_sql_blocks(include_str!("mod.rs")) {
            crate::testing::sql_check::assert_qualified(&[("schema.rs extension_sql", block)]);
        }
    }
}
