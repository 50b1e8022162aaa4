#!/usr/bin/env bash
# make demo: a throwaway cluster with outbox preloaded, a receiver that
# prints what it gets, a tracked `users` table, and a few changes flowing.
# Cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
make -s install >/dev/null
cargo build -q --manifest-path e2e/Cargo.toml --bin demo-receiver

DIR=$(mktemp -d /tmp/outbox-demo-XXXX)
PORT=$(free_port)
RECEIVER_PID=
cleanup() {
    [ -n "$RECEIVER_PID" ] && kill "$RECEIVER_PID" 2>/dev/null || true
    cluster_stop "$DIR"
}
trap cleanup EXIT

"$CARGO_TARGET_DIR/debug/demo-receiver" 120 >"$DIR.port" &
RECEIVER_PID=$!
for _ in $(seq 50); do [ -s "$DIR.port" ] && break; sleep 0.1; done
RPORT=$(cat "$DIR.port")
rm -f "$DIR.port"
echo "receiver listening on 127.0.0.1:$RPORT"

cluster_start "$DIR" "$PORT" demo
echo "cluster on 127.0.0.1:$PORT with shared_preload_libraries = 'outbox'"
psql() { $PGBIN/psql -X -h 127.0.0.1 -p "$PORT" -U postgres -d demo "$@"; }

step() { echo; echo "-- $*"; }
step "a users table, tracked; each change sends the row's current state"
psql -q <<SQL
CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, email text);
-- Bodies run as a role that can read what they send, and nothing more.
CREATE ROLE outbox_reader NOLOGIN;
GRANT SELECT ON users TO outbox_reader;
CREATE FUNCTION user_body(id text) RETURNS jsonb LANGUAGE sql STABLE
    AS \$\$ SELECT to_jsonb(u) FROM public.users u WHERE u.id = \$1::bigint \$\$;
SELECT outbox.register('user', 'http://127.0.0.1:$RPORT/users/{id}',
                       body => 'user_body(text)', run_as => 'outbox_reader',
                       secret => 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw');
SELECT outbox.track('users', 'user');
-- The application's role may enqueue kind 'user' itself too.
CREATE ROLE app LOGIN;
GRANT SELECT, INSERT, UPDATE, DELETE ON users TO app;
SELECT outbox.grant_enqueue('app', 'user');
SQL

step "insert three users"
psql -qc "INSERT INTO users VALUES (1, 'Ada', 'ada@example.com'), (2, 'Brian', NULL), (3, 'Chen', 'chen@example.com')"
sleep 1
step "update one, twice in one transaction (one request)"
psql -qc "BEGIN; UPDATE users SET name = 'Brian K.' WHERE id = 2; UPDATE users SET email = 'bk@example.com' WHERE id = 2; COMMIT;"
sleep 1
step "delete one (a DELETE request)"
psql -qc "DELETE FROM users WHERE id = 3"
sleep 1
step "a transaction that rolls back (nothing is sent)"
psql -qc "BEGIN; INSERT INTO users VALUES (4, 'Never', NULL); ROLLBACK;"
step "an explicit enqueue by the application's role, no trigger involved"
$PGBIN/psql -X -h 127.0.0.1 -p "$PORT" -U app -d demo -qc "SELECT outbox.enqueue('user', 1)"

for _ in $(seq 100); do
    [ "$(psql -tAc 'SELECT count(*) FROM outbox.jobs')" = 0 ] && break
    sleep 0.2
done
sleep 0.5
step "outbox.stats()"
psql -c "SELECT kind, pending, running, dead, delivered, failed_attempts, last_success_at FROM outbox.stats()"
step "outbox.worker_status()"
psql -c "SELECT * FROM outbox.worker_status()"
echo "demo done; stopping the cluster and the receiver"
