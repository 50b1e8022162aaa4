#!/usr/bin/env bash
# Bulk enqueue: one statement that calls outbox.enqueue() for ROWS ids
# (default 1,000,000) against one that INSERTs as many rows into a plain
# one-column table without an index, alternated, ROUNDS times (default 5),
# each statement in its own transaction and from the same starting state.
# Prints both times and their ratio per round, then the median ratio as the
# figure; appends a JSON line to target/bench/results.json.
set -euo pipefail
# A failing psql inside $(...) must stop the script too, not leave a
# round with an empty time.
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
. scripts/lib.sh
# psql's \timing, printf and sort -g all read or write decimal points.
export LC_NUMERIC=C

ROWS=${ROWS:-1000000}
# Five rounds, as for figure 3: one round on this noisy 2-core machine says
# little.
ROUNDS=${ROUNDS:-5}
read -r -a BENCH_CONF <<<"${BENCH_CONF_LINES:-}"
DIR=$(mktemp -d /tmp/outbox-bench-XXXX)
PORT=$(free_port)
trap 'cluster_stop "$DIR"' EXIT

# Two settings changed, both so that nothing lands in one side only:
# - autovacuum off: either side's million inserts would wake it, on that
#   table or (the queue vacuums at 2% new rows) on the queue, during the
#   next statement. Every statement starts from truncated tables and an
#   explicit VACUUM instead.
# - max_wal_size 8GB: with the default 1GB a checkpoint is requested after
#   about 0.5GB of WAL; a million enqueues could write that much. The
#   explicit CHECKPOINT before each statement is then the only one.
SETTINGS=("autovacuum = off" "max_wal_size = 8GB")
cluster_start "$DIR" "$PORT" bench "${SETTINGS[@]}" "${BENCH_CONF[@]}"
psql() { $PGBIN/psql -qX -h 127.0.0.1 -p "$PORT" -U postgres -d bench "$@"; }
psql -v ON_ERROR_STOP=1 >/dev/null <<SQL
-- Paused: no delivery runs during or after the enqueue side.
SELECT outbox.register('k', 'http://127.0.0.1:9/{id}');
SELECT outbox.pause('k');
CREATE TABLE t (id bigint);
SQL

INSERT="INSERT INTO t SELECT g FROM generate_series(1, $ROWS) g"
# count(): a bare `SELECT outbox.enqueue(...)` would have psql receive and
# print a million empty rows. count() returns one; what the statement costs
# is the enqueue calls.
ENQUEUE="SELECT count(outbox.enqueue('k', g)) FROM generate_series(1, $ROWS) g"

# What every timed statement starts from: t, the inbox and the queue empty
# (TRUNCATE gives them new, empty files, so a later round does not start
# with a bigger table or index), the catalog rows TRUNCATE replaced
# vacuumed, and nothing left dirty for a checkpoint to write during the
# statement. The worker may still be moving the last enqueue side's inbox
# rows into the queue (pause stops deliveries, not that): TRUNCATE waits
# for its transaction, and after it there is nothing left to move. A
# TRUNCATE of the inbox loses changes; fine in a benchmark.
reset() {
    psql -v ON_ERROR_STOP=1 -c "TRUNCATE t, outbox.inbox, outbox.queue" -c "VACUUM" -c "CHECKPOINT" >/dev/null
}
# Prints the statement's time in ms, as psql's \timing measured it, and
# the WAL it wrote in bytes. psql's autocommit makes it a transaction of its
# own, and its time includes the commit (where the enqueues' buffered
# changes are written). \timing leaves out the connection's start-up,
# which both sides would pay alike and which would pull the ratio toward 1.
# The WAL position is read right after, in the same session, before the
# worker (woken by the commit) has written much.
timed() {
    reset
    psql -tA <<SQL | awk '/^Time: / { t = $2 } /^wal / { w = $2 } END { if (t == "" || w == "") exit 1; print t, w }'
\set ON_ERROR_STOP on
SELECT pg_current_wal_lsn() AS at \gset
\timing on
$1;
\timing off
SELECT 'wal ' || pg_wal_lsn_diff(pg_current_wal_lsn(), :'at')::bigint;
SQL
}
# Stops the script unless `sql` returns `expected`.
expect() { # sql, expected
    local got
    got=$(psql -tAc "$1")
    [ "$got" = "$2" ] || { echo "expected $2 from \`$1\`, got $got" >&2; exit 1; }
}
# The median of the numbers on stdin (of an even count, the upper middle one).
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int(NR / 2) + 1] }'; }

settings=$(printf ', %s' "${SETTINGS[@]}" "${BENCH_CONF[@]}")
echo "bulk enqueue (INSERT of $ROWS rows into t (id bigint) against SELECT count(outbox.enqueue('k', g)) of as many ids): $ROUNDS rounds alternated, kind paused; settings: ${settings#, }"
ins=() enq=() ratios=() ins_wal=() enq_wal=()
for r in $(seq "$ROUNDS"); do
    out=$(timed "$INSERT")
    read -r i iw <<<"$out"
    expect "SELECT count(*) FROM t" "$ROWS"
    out=$(timed "$ENQUEUE")
    read -r e ew <<<"$out"
    # The jobs view counts what is in the inbox and in the queue alike, in
    # one snapshot, whichever of the two the enqueues (or the worker since)
    # wrote; every id once, as the queue was empty.
    expect "SELECT count(*) FROM outbox.jobs WHERE kind = 'k' AND state = 'pending'" "$ROWS"
    ratio=$(awk -v e="$e" -v i="$i" 'BEGIN { printf "%.4f", e / i }')
    printf '  round %d: INSERT %9.1f ms   enqueue() %9.1f ms   ratio %6.3f   WAL per row %4d B / %4d B\n' \
        "$r" "$i" "$e" "$ratio" $((iw / ROWS)) $((ew / ROWS))
    ins+=("$i") enq+=("$e") ratios+=("$ratio") ins_wal+=($((iw / ROWS))) enq_wal+=($((ew / ROWS)))
done
ratio=$(printf '%s\n' "${ratios[@]}" | median)
ins_ms=$(printf '%s\n' "${ins[@]}" | median)
enq_ms=$(printf '%s\n' "${enq[@]}" | median)
ins_b=$(printf '%s\n' "${ins_wal[@]}" | median)
enq_b=$(printf '%s\n' "${enq_wal[@]}" | median)
printf 'bulk enqueue: %.2fx (enqueue of %d ids against an INSERT of as many rows; target <= 1.5x); medians of %d rounds: enqueue %.1f ms, INSERT %.1f ms; WAL per row: enqueue %d B, INSERT %d B\n' \
    "$ratio" "$ROWS" "$ROUNDS" "$enq_ms" "$ins_ms" "$enq_b" "$ins_b"
mkdir -p target/bench
printf '{"figure":"bulk_enqueue","rows":%d,"rounds":%d,"insert_ms":%.1f,"enqueue_ms":%.1f,"ratio":%.4f,"insert_wal_bytes_per_row":%d,"enqueue_wal_bytes_per_row":%d,"at":"%s"}\n' \
    "$ROWS" "$ROUNDS" "$ins_ms" "$enq_ms" "$ratio" "$ins_b" "$enq_b" "$(date -u +%FT%TZ)" >>target/bench/results.json
