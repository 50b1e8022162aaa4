#!/bin/sh
# Installs outbox @VERSION@ for PostgreSQL @PG_MAJOR@ from this archive:
#   ./install.sh [path/to/pg_config]   (default: the pg_config on PATH)
# Then set shared_preload_libraries = 'outbox', restart, and
# CREATE EXTENSION outbox; in the databases it should serve.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
pg_config=${1:-pg_config}
major=$("$pg_config" --version | sed -n 's/^PostgreSQL \([0-9]*\).*/\1/p')
if [ "$major" != "@PG_MAJOR@" ]; then
    echo "install.sh: this archive is for PostgreSQL @PG_MAJOR@; $pg_config is PostgreSQL $major" >&2
    exit 1
fi
libdir=$("$pg_config" --pkglibdir)
extdir=$("$pg_config" --sharedir)/extension
install -m 755 "$here/lib/outbox.so" "$libdir/outbox.so"
install -m 644 "$here/extension/"outbox* "$extdir/"
echo "outbox @VERSION@ installed into $libdir and $extdir"
