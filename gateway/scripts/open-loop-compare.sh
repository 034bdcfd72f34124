#!/usr/bin/env bash
# Open loop at 8,900 req/s, side by side, in rounds: nginx `return 200` (no disk), the minimal
# durable server `durable_floor` (io_uring, two threads, a file each) and kefu at its defaults
# (the open phase of `cargo xtask loadtest`). Prints each run's latency row (ms: p50 p90 p99
# p99.9 max mean count).
# Usage: [ROUNDS=7] [RATE=8900] [KEFU_B='--config FILE'] gateway/scripts/open-loop-compare.sh [TARGET_DIR/release]
# KEFU_B: also run kefu with these flags in each round, right after the default one (A/B).
# Needs nginx and release builds of kefu, kefu-loadtest and durable_floor:
#   cargo build --release -p kefu-gateway -p kefu-loadtest -p kefu-benches
set -euo pipefail
REL=${1:-target/release}
ROUNDS=${ROUNDS:-7}
RATE=${RATE:-8900}
WORK=$(mktemp -d)
cleanup() {
  [[ -n "${PID:-}" ]] && kill "$PID" 2>/dev/null || true
  [[ -f "$WORK/nginx.pid" ]] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
source "$(dirname "$0")/nginx.sh"
start_nginx "$WORK"
row() { grep -E '^  request ' | tr -s ' ' | cut -d' ' -f3-; }
# Waits for LINE in FILE (at most 10 s).
wait_for() { for _ in $(seq 100); do grep -q "$2" "$1" && return 0; sleep 0.1; done; echo "no '$2' in $1" >&2; exit 1; }
# Runs kefu with flags $2 and the open phase of `cargo xtask loadtest` against it; $1 labels the row.
run_kefu() {
  local P
  P=$(free_port)
  # shellcheck disable=SC2086
  "$REL/kefu" $2 --data-dir "$WORK/kefu" --http "127.0.0.1:$P" --tcp 127.0.0.1:0 > "$WORK/kefu.out" 2>&1 &
  PID=$!
  wait_for "$WORK/kefu.out" "kefu ready"
  printf '  %-13s %s\n' "$1:" "$("$REL/kefu-loadtest" send --http "127.0.0.1:$P" --closed-s 0 --rate-open "$RATE" --max-p99-ms 1000 --quiet 2>/dev/null | row)"
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
  rm -rf "$WORK/kefu"
}
for r in $(seq "$ROUNDS"); do
  echo "round $r"
  echo "  nginx:        $("$REL/kefu-loadtest" http --url "http://127.0.0.1:$NGINX_PORT/" --rate "$RATE" --duration-s 10 --quiet | row)"
  P=$(free_port)
  mkdir -p "$WORK/floor"
  "$REL/durable_floor" --port "$P" --dir "$WORK/floor" --mode uring --threads 2 --file perthread > "$WORK/floor.out" 2>&1 &
  PID=$!
  wait_for "$WORK/floor.out" READY
  echo "  durable_floor: $("$REL/kefu-loadtest" http --url "http://127.0.0.1:$P/" --method POST --body '{"text":"hello"}' --rate "$RATE" --duration-s 10 --quiet | row)"
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
  rm -rf "$WORK/floor"
  run_kefu kefu ""
  if [[ -n "${KEFU_B:-}" ]]; then run_kefu "kefu (B)" "$KEFU_B"; fi
done
