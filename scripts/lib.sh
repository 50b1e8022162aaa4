# Shared shell helpers for setup, tests, demo and benchmarks: running as
# root or `postgres`, and a throwaway cluster with outbox preloaded, run as
# `postgres` when we are root.
PGBIN=/usr/lib/postgresql/15/bin

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

as_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# cluster_start DIR PORT DATABASE [conf lines...]
cluster_start() {
    local dir=$1 port=$2 db=$3
    shift 3
    rm -rf "$dir"
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$dir"
    as_pg $PGBIN/initdb -D "$dir/data" -A trust -U postgres -E UTF8 --locale=C >/dev/null
    {
        echo "port = $port"
        echo "listen_addresses = '127.0.0.1'"
        echo "unix_socket_directories = '$dir'"
        echo "shared_preload_libraries = 'outbox'"
        echo "outbox.database = '$db'"
        for line in "$@"; do echo "$line"; done
    } >>"$dir/data/postgresql.conf"
    as_pg $PGBIN/pg_ctl -D "$dir/data" -l "$dir/log" -w start >/dev/null
    $PGBIN/psql -qX -h 127.0.0.1 -p "$port" -U postgres -d postgres -c "CREATE DATABASE $db" >/dev/null
    $PGBIN/psql -qX -h 127.0.0.1 -p "$port" -U postgres -d "$db" -c "CREATE EXTENSION outbox" >/dev/null
}

cluster_stop() {
    local dir=$1
    [ -d "$dir/data" ] && as_pg $PGBIN/pg_ctl -D "$dir/data" -w -m fast stop >/dev/null 2>&1
    rm -rf "$dir"
}
