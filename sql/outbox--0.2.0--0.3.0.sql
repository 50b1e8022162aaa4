-- outbox 0.2.0 to 0.3.0: secret rotation, and per-kind limits of requests
-- in flight and a second.

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
