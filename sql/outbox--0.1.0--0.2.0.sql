-- outbox 0.1.0 to 0.2.0. The tables are unchanged; functions change.

-- enqueue: one anycompatible id (7, '7' and 7::bigint are one record), and
-- the delay an overload of its own instead of a default.
CREATE FUNCTION outbox.enqueue(kind text, id anycompatible) RETURNS void
LANGUAGE c AS 'MODULE_PATHNAME', 'enqueue_now_wrapper';
CREATE FUNCTION outbox.enqueue(kind text, id anycompatible, delay interval) RETURNS void
LANGUAGE c AS 'MODULE_PATHNAME', 'enqueue_later_wrapper';
-- Who may call them is who could call 0.1.0's (text) enqueue: PUBLIC, as a
-- fresh install grants, unless an admin narrowed it.
DO $$
DECLARE
    fn text;
    g record;
BEGIN
    FOREACH fn IN ARRAY ARRAY['outbox.enqueue(text, anycompatible)', 'outbox.enqueue(text, anycompatible, interval)'] LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', fn);
        FOR g IN
            SELECT a.grantee, a.is_grantable
              FROM pg_catalog.pg_proc p,
                   LATERAL pg_catalog.aclexplode(coalesce(p.proacl, pg_catalog.acldefault('f', p.proowner))) a
             WHERE p.oid OPERATOR(pg_catalog.=) 'outbox.enqueue(text, text, interval)'::pg_catalog.regprocedure
               AND a.privilege_type OPERATOR(pg_catalog.=) 'EXECUTE'
               AND a.grantee OPERATOR(pg_catalog.<>) p.proowner
             ORDER BY a.grantee
        LOOP
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %s%s', fn,
                CASE WHEN g.grantee OPERATOR(pg_catalog.=) 0 THEN 'PUBLIC' ELSE g.grantee::pg_catalog.regrole::text END,
                CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
        END LOOP;
    END LOOP;
END
$$;
DROP FUNCTION outbox.enqueue(text, text, interval);
DROP FUNCTION outbox.enqueue(text, bigint, interval);
DROP FUNCTION outbox.enqueue(text, uuid, interval);

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
