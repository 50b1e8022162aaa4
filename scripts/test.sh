#!/usr/bin/env bash
# The whole test suite: pure unit tests and #[pg_test]s (cargo pgrx test),
# then the end-to-end suite in pg_test/ against real clusters and a real
# HTTP receiver. Every cluster is started by the tooling and stopped after.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config

echo "== unit and #[pg_test] tests"
if [ "$(id -u)" = 0 ]; then
    # Postgres refuses to run as root: cargo-pgrx runs it as postgres, in a
    # data directory postgres owns (its parent holds the socket).
    base=$(mktemp -d /var/tmp/outbox-pgrx.XXXXXX)
    trap 'rm -rf "$base"' EXIT
    chown postgres:postgres "$base"
    cargo pgrx test pg15 --runas postgres --pgdata "$base/pgdata"
else
    cargo pgrx test pg15
fi

echo "== end-to-end tests"
if [ "$(id -u)" = 0 ]; then
    cargo pgrx install --pg-config "$PG_CONFIG"
else
    cargo pgrx install --sudo --pg-config "$PG_CONFIG"
fi
cargo test --manifest-path pg_test/Cargo.toml
