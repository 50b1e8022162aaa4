#!/usr/bin/env bash
# `make bench`: every figure of issue #4 in one run on this machine, then one
# table of them. Each benchmark starts its own cluster (and receiver) and
# stops it. Human-readable output goes to target/bench/<name>.txt; each
# figure's JSON line is appended to target/bench/results.json, so a run can
# be compared with the one before. QUICK=1 runs smaller sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${CARGO_TARGET_DIR:-target}/release
OUT=target/bench
mkdir -p "$OUT"

if [ -n "${QUICK:-}" ]; then
    THROUGHPUT="20000 3" LATENCY=500 BACKLOG="100000 10000" BULK="200000 3" BULK_ENQUEUE=200000
    BACKFILL="200000 300" XMIN=100000
    export SECONDS_PER_RUN=5 ROUNDS=1
else
    THROUGHPUT="100000 3" LATENCY=2000 BACKLOG="1000000 10000" BULK="1000000 3" BULK_ENQUEUE=1000000
    BACKFILL="1000000 1000" XMIN=500000
fi

run() { # name, command...
    local name=$1
    shift
    echo "== $name: $*"
    "$@" | tee "$OUT/$name.txt"
    grep '^{' "$OUT/$name.txt" >>"$OUT/results.json" || true
}

run http-ceiling "$BIN/bench-http-ceiling" 5
# shellcheck disable=SC2086
run throughput "$BIN/bench-throughput" $THROUGHPUT
run latency "$BIN/bench-latency" $LATENCY
scripts/bench-enqueue.sh 2>&1 | tee "$OUT/enqueue.txt"
CALL=1 scripts/bench-enqueue.sh 2>&1 | tee "$OUT/enqueue-call.txt"
ROWS=$BULK_ENQUEUE scripts/bench-bulk-enqueue.sh 2>&1 | tee "$OUT/bulk-enqueue.txt"
# shellcheck disable=SC2086
run backlog "$BIN/bench-backlog" $BACKLOG
# shellcheck disable=SC2086
run bulk "$BIN/bench-bulk" $BULK
# shellcheck disable=SC2086
run backfill "$BIN/bench-backfill" $BACKFILL
run xmin "$BIN/bench-xmin" $XMIN

echo
echo "== figures (this run; JSON lines in $OUT/results.json)"
grep -h -E '^(http ceiling|throughput|latency|enqueue overhead|enqueue\(\) call overhead|bulk enqueue|backlog scaling|bulk|table health|backfill|held xmin):' \
    "$OUT"/http-ceiling.txt "$OUT"/throughput.txt "$OUT"/latency.txt "$OUT"/enqueue.txt "$OUT"/enqueue-call.txt \
    "$OUT"/bulk-enqueue.txt "$OUT"/backlog.txt "$OUT"/bulk.txt "$OUT"/backfill.txt "$OUT"/xmin.txt |
    sed 's/^/  /'
