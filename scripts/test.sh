#!/usr/bin/env bash
# The whole test suite: pure unit tests and #[pg_test]s (cargo pgrx test),
# then the end-to-end suite in e2e/ against real clusters and a real
# HTTP receiver. Every cluster is started by the tooling and stopped after.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

# Every runner's output also goes to a log, for the closing tally.
log=$(mktemp /tmp/outbox-test-log.XXXXXX)
base=""
trap 'rm -rf "$log" ${base:+"$base"}' EXIT
exec > >(tee "$log") 2>&1

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
. scripts/versions.sh
export OUTBOX_MONITORING_BIN="$MONITORING_DIR/usr/bin"
. scripts/lib.sh

echo "== lints: every unsafe block says why it is sound"
cargo clippy --lib --tests --features "pg15 pg_test" -q -- -A clippy::all -D clippy::undocumented_unsafe_blocks

# The whole suite on each supported version: unit and #[pg_test] tests
# (cargo pgrx test), then the end-to-end suite against that version's server.
for major in "${PG_VERSIONS[@]}"; do
    pg_config=$(pg_config_of "$major")
    echo "== PostgreSQL $major: unit and #[pg_test] tests"
    if [ "$(id -u)" = 0 ]; then
        # Postgres refuses to run as root: cargo-pgrx runs it as postgres, in
        # a data directory postgres owns (its parent holds the socket).
        base=$(mktemp -d /var/tmp/outbox-pgrx.XXXXXX)
        chown postgres:postgres "$base"
        cargo pgrx test "pg$major" --runas postgres --pgdata "$base/pgdata"
        rm -rf "$base"
        base=""
    else
        cargo pgrx test "pg$major"
    fi

    echo "== PostgreSQL $major: end-to-end tests"
    if [ "$(id -u)" = 0 ]; then
        cargo pgrx install --pg-config "$pg_config"
    else
        cargo pgrx install --sudo --pg-config "$pg_config"
    fi
    # The upgrade tests install versions 0.1.0 and 0.2.0 from their scripts,
    # then update them.
    as_root install -m 644 sql/outbox--0.1.0.sql sql/outbox--0.2.0.sql "$("$pg_config" --sharedir)/extension/"
    OUTBOX_PG_BIN=$("$pg_config" --bindir) cargo test --manifest-path e2e/Cargo.toml --tests
done

echo "== package: the PostgreSQL 18 archive, into a fresh PostgreSQL 18"
scripts/package.sh 18
scripts/package-check.sh

echo "== the benchmarks' own tooling"
cargo test --manifest-path bench/Cargo.toml --lib

# One closing line over every runner above.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
