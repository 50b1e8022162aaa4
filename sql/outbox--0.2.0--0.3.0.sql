-- outbox 0.2.0 to 0.3.0: secret rotation, per-kind limits of requests in
-- flight and a second, circuit breakers, metrics, row filters and backfills.

-- The secret outbox.rotate_secret replaced: requests carry its signature
-- too until previous_secret_until.
ALTER TABLE outbox.kinds
    ADD COLUMN previous_secret text,
    ADD COLUMN previous_secret_until timestamptz,
    ADD CONSTRAINT kinds_previous_secret_check
        CHECK ((previous_secret IS NULL) OPERATOR(pg_catalog.=) (previous_secret_until IS NULL));

CREATE FUNCTION outbox.rotate_secret(kind text, new_secret text, overlap interval DEFAULT '24 hours')
RETURNS void VOLATILE LANGUAGE c SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'rotate_secret_wrapper';
-- Admin only, as every function but enqueue.
REVOKE EXECUTE ON FUNCTION outbox.rotate_secret(text, text, interval) FROM PUBLIC;

-- At most this many of the kind's requests in flight at once (NULL: only
-- outbox.concurrency bounds them).
ALTER TABLE outbox.kinds ADD COLUMN max_in_flight int
    CHECK (max_in_flight OPERATOR(pg_catalog.>=) 1 AND max_in_flight OPERATOR(pg_catalog.<=) 1024);

CREATE FUNCTION outbox.set_max_in_flight(kind text, max_in_flight int)
RETURNS void VOLATILE LANGUAGE c SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'set_max_in_flight_wrapper';
REVOKE EXECUTE ON FUNCTION outbox.set_max_in_flight(text, int) FROM PUBLIC;

-- At most this many of the kind's requests a second, sent evenly (NULL: no
-- limit).
ALTER TABLE outbox.kinds ADD COLUMN rate_limit double precision
    CHECK (rate_limit OPERATOR(pg_catalog.>) 0 AND rate_limit OPERATOR(pg_catalog.<=) 100000);

CREATE FUNCTION outbox.set_rate_limit(kind text, per_second double precision)
RETURNS void VOLATILE LANGUAGE c SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'set_rate_limit_wrapper';
REVOKE EXECUTE ON FUNCTION outbox.set_rate_limit(text, double precision) FROM PUBLIC;

-- Failed attempts by what came of them, the delivery latency histogram,
-- and each kind's circuit breaker (see the table's definition).
ALTER TABLE outbox.kind_stats
    ADD COLUMN rejected bigint NOT NULL DEFAULT 0,
    ADD COLUMN throttled bigint NOT NULL DEFAULT 0,
    ADD COLUMN server_errors bigint NOT NULL DEFAULT 0,
    ADD COLUMN unreachable bigint NOT NULL DEFAULT 0,
    ADD COLUMN unbuildable bigint NOT NULL DEFAULT 0,
    ADD COLUMN latency_counts bigint[] NOT NULL DEFAULT '{}',
    ADD COLUMN latency_sum double precision NOT NULL DEFAULT 0,
    ADD COLUMN breaker text NOT NULL DEFAULT 'closed'
        CHECK (breaker OPERATOR(pg_catalog.=) ANY ('{closed,open,half-open}'::text[])),
    ADD COLUMN breaker_opened_at timestamptz,
    ADD COLUMN breaker_error text;

-- Functions whose arguments or columns change are made anew, with the
-- EXECUTE grants an admin gave on the old ones: this copies them.
CREATE FUNCTION outbox.copy_execute_grants(old regprocedure, new regprocedure) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    g record;
BEGIN
    EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', new);
    FOR g IN
        SELECT a.grantee, a.is_grantable
          FROM pg_catalog.pg_proc p,
               LATERAL pg_catalog.aclexplode(coalesce(p.proacl, pg_catalog.acldefault('f', p.proowner))) a
         WHERE p.oid OPERATOR(pg_catalog.=) old
           AND a.privilege_type OPERATOR(pg_catalog.=) 'EXECUTE'
           AND a.grantee OPERATOR(pg_catalog.<>) p.proowner
         ORDER BY a.grantee
    LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %s%s', new,
            CASE WHEN g.grantee OPERATOR(pg_catalog.=) 0 THEN 'PUBLIC' ELSE g.grantee::pg_catalog.regrole::text END,
            CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
END
$$;

-- stats() shows the breakers and the limits: new columns.
ALTER FUNCTION outbox.stats() RENAME TO stats_0_2;
CREATE FUNCTION outbox.stats()
RETURNS TABLE (kind text, pending bigint, running bigint, dead bigint,
               delivered bigint, failed_attempts bigint, oldest_pending_age interval,
               last_success_at timestamptz, last_failure_at timestamptz, paused boolean,
               breaker text, breaker_opened_at timestamptz, breaker_error text,
               max_in_flight int, rate_limit double precision)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
SELECT k.kind,
       pg_catalog.count(q.id) FILTER (WHERE q.state OPERATOR(pg_catalog.=) 'pending'),
       pg_catalog.count(q.id) FILTER (WHERE q.state OPERATOR(pg_catalog.=) 'running'),
       pg_catalog.count(q.id) FILTER (WHERE q.state OPERATOR(pg_catalog.=) 'dead'),
       coalesce(s.delivered, 0),
       coalesce(s.failed_attempts, 0),
       pg_catalog.now() OPERATOR(pg_catalog.-)
           pg_catalog.min(q.enqueued_at) FILTER (WHERE q.state OPERATOR(pg_catalog.=) 'pending'),
       s.last_success_at,
       s.last_failure_at,
       k.paused,
       coalesce(s.breaker, 'closed'),
       s.breaker_opened_at,
       s.breaker_error,
       k.max_in_flight,
       k.rate_limit
  FROM outbox.kinds k
  LEFT JOIN outbox.kind_stats s ON s.kind OPERATOR(pg_catalog.=) k.kind
  LEFT JOIN outbox.jobs q ON q.kind OPERATOR(pg_catalog.=) k.kind
 GROUP BY k.kind, k.paused, k.max_in_flight, k.rate_limit, s.delivered, s.failed_attempts, s.last_success_at,
          s.last_failure_at, s.breaker, s.breaker_opened_at, s.breaker_error
 ORDER BY k.kind
$$;
SELECT outbox.copy_execute_grants('outbox.stats_0_2()', 'outbox.stats()');
DROP FUNCTION outbox.stats_0_2();

-- track() takes a filter.
ALTER FUNCTION outbox.track(regclass, text, name, name[]) RENAME TO track_0_2;
CREATE FUNCTION outbox.track(tbl regclass, kind text, id_column name DEFAULT NULL, columns name[] DEFAULT NULL,
                             filter text DEFAULT NULL)
RETURNS text VOLATILE LANGUAGE c SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'track_table_wrapper';
SELECT outbox.copy_execute_grants('outbox.track_0_2(regclass, text, name, name[])', 'outbox.track(regclass, text, name, name[], text)');
DROP FUNCTION outbox.track_0_2(regclass, text, name, name[]);

DROP FUNCTION outbox.copy_execute_grants(regprocedure, regprocedure);

CREATE FUNCTION outbox.metrics() RETURNS text
STABLE LANGUAGE c SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'metrics_wrapper';
REVOKE EXECUTE ON FUNCTION outbox.metrics() FROM PUBLIC;

-- Backfills: see the table's definition.
CREATE TABLE outbox.backfills (
    backfill_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tbl         regclass NOT NULL,
    kind        text COLLATE "C" NOT NULL REFERENCES outbox.kinds ON DELETE CASCADE,
    id_column   name NOT NULL,
    filter      text,
    run_as      regrole NOT NULL,
    state       text NOT NULL DEFAULT 'running'
                CHECK (state OPERATOR(pg_catalog.=) ANY ('{running,done,failed,cancelled}'::text[])),
    last_id     text,
    enqueued    bigint NOT NULL DEFAULT 0,
    rows_estimate bigint,
    started_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    finished_at timestamptz,
    error       text
);
CREATE UNIQUE INDEX backfills_running ON outbox.backfills (tbl, kind)
    WHERE state OPERATOR(pg_catalog.=) 'running';
SELECT pg_catalog.pg_extension_config_dump('outbox.backfills', '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('outbox.backfills', 'backfill_id'), '');
REVOKE ALL ON outbox.backfills FROM PUBLIC;
REVOKE ALL ON SEQUENCE outbox.backfills_backfill_id_seq FROM PUBLIC;

-- A backfill's jobs wait behind the kind's live ones: a lane, first in
-- the claim's index (see the queue's definition).
ALTER TABLE outbox.queue ADD COLUMN backfilled boolean NOT NULL DEFAULT false;
DROP INDEX outbox.queue_due;
CREATE INDEX queue_due ON outbox.queue (kind, backfilled, run_at, job_id) WHERE state OPERATOR(pg_catalog.=) 'pending';

CREATE FUNCTION outbox.backfill(tbl regclass, kind text, id_column name DEFAULT NULL, filter text DEFAULT NULL)
RETURNS bigint VOLATILE LANGUAGE c SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'backfill_wrapper';
REVOKE EXECUTE ON FUNCTION outbox.backfill(regclass, text, name, text) FROM PUBLIC;
CREATE FUNCTION outbox.cancel_backfill(backfill_id bigint)
RETURNS void VOLATILE LANGUAGE c SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'cancel_backfill_wrapper';
REVOKE EXECUTE ON FUNCTION outbox.cancel_backfill(bigint) FROM PUBLIC;
CREATE FUNCTION outbox.resume_backfill(backfill_id bigint)
RETURNS void VOLATILE LANGUAGE c SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'resume_backfill_wrapper';
REVOKE EXECUTE ON FUNCTION outbox.resume_backfill(bigint) FROM PUBLIC;
CREATE FUNCTION outbox.backfills_checked() RETURNS trigger
LANGUAGE c SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'backfills_checked_wrapper';
REVOKE EXECUTE ON FUNCTION outbox.backfills_checked() FROM PUBLIC;
CREATE TRIGGER backfills_checked BEFORE INSERT OR UPDATE OR DELETE ON outbox.backfills
    FOR EACH ROW EXECUTE FUNCTION outbox.backfills_checked();
ALTER TABLE outbox.backfills ENABLE ALWAYS TRIGGER backfills_checked;

-- The last attempts of each kind: see the table's definition.
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
REVOKE ALL ON outbox.attempts FROM PUBLIC;
REVOKE ALL ON SEQUENCE outbox.attempts_attempt_id_seq FROM PUBLIC;
