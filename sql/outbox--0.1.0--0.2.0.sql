-- outbox 0.1.0 to 0.2.0. The tables are unchanged; functions change.

-- enqueue: one anycompatible id (7, '7' and 7::bigint are one record), and
-- the delay an overload of its own instead of a default.
DROP FUNCTION outbox.enqueue(text, text, interval);
DROP FUNCTION outbox.enqueue(text, bigint, interval);
DROP FUNCTION outbox.enqueue(text, uuid, interval);
CREATE FUNCTION outbox.enqueue(kind text, id anycompatible) RETURNS void
LANGUAGE c AS 'MODULE_PATHNAME', 'enqueue_now_wrapper';
CREATE FUNCTION outbox.enqueue(kind text, id anycompatible, delay interval) RETURNS void
LANGUAGE c AS 'MODULE_PATHNAME', 'enqueue_later_wrapper';
-- As a fresh install grants them: explicitly, after revoking the default.
REVOKE ALL ON FUNCTION outbox.enqueue(text, anycompatible) FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox.enqueue(text, anycompatible, interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.enqueue(text, anycompatible) TO PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.enqueue(text, anycompatible, interval) TO PUBLIC;

-- The admin transitions run statements of the worker's queue module now,
-- not PL/pgSQL. Same signatures; CREATE OR REPLACE keeps their privileges.
CREATE OR REPLACE FUNCTION outbox.retry(job_id bigint) RETURNS void
SET search_path TO pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'retry_wrapper';
CREATE OR REPLACE FUNCTION outbox.retry_dead(kind text DEFAULT NULL) RETURNS bigint
SET search_path TO pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'retry_dead_wrapper';
CREATE OR REPLACE FUNCTION outbox.discard(job_id bigint) RETURNS void
SET search_path TO pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'discard_wrapper';
CREATE OR REPLACE FUNCTION outbox.purge_dead(older_than interval) RETURNS bigint
SET search_path TO pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'purge_dead_wrapper';
