-- outbox 0.2.0 to 0.3.0: secret rotation.

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
