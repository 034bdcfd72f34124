#!/usr/bin/env bash
# Allocations per message in the running gateway: uprobes on mimalloc's entry points
# (`perf probe`), counted with `perf stat` over a window of each load, divided by the
# `kefu_messages_in_total` delta. Loads: HTTP sends (`kefu-loadtest send`), WebSocket chat
# (`kefu-loadtest chat`, 16 visitors), long-polls (gateway/scripts/long-poll-load.py) and
# binary-protocol subscribers (gateway/scripts/binary-load.py).
# Usage: gateway/scripts/count-allocs.sh KEFU_BIN [KEFU_LOADTEST_BIN]
# Needs perf with uprobes, python3, curl. Adds probes named after the binary's inode, removes
# them at the end.
set -euo pipefail
BIN=$(readlink -f "$1")
LT=${2:-$(dirname "$BIN")/kefu-loadtest}
WORK=$(mktemp -d)
TAG=a$(stat -c %i "$BIN")
cleanup() {
  [[ -n "${PID:-}" ]] && kill "$PID" 2>/dev/null || true
  perf probe -q -d "probe_kefu:${TAG}_*" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
for f in mi_malloc_aligned mi_zalloc_aligned mi_realloc_aligned; do
  perf probe -q -x "$BIN" -a "${TAG}_$f=$f"
done
"$BIN" --print-default-config | sed 's/^name = "demo"$/name = "demo"\nvisitor_rate_limit = { messages_per_s = 10000, burst = 10000 }/' > "$WORK/kefu.toml"
m() { curl -s "127.0.0.1:$PORT/metrics" | awk -v k="$1" '$1 ~ "^"k"[{]" {s+=$2} END {print s+0}'; }
# window LABEL DELAY_S SPAN_S: counts allocations over SPAN_S after DELAY_S.
window() {
  sleep "$2"
  local a0 a1 n
  a0=$(m kefu_messages_in_total)
  n=$(perf stat -x, -e "probe_kefu:${TAG}_*" -p "$PID" -- sleep "$3" 2>&1 | awk -F, '{s+=$1} END {print s}')
  a1=$(m kefu_messages_in_total)
  python3 -c "import sys; n, m = int(sys.argv[1]), int(sys.argv[2]); print(f'{sys.argv[3]:<12} {n:>8} allocations / {m:>7} messages = {n / max(m, 1):.3f} per message')" "$n" "$((a1 - a0))" "$1"
}
start() {
  rm -rf "$WORK/data"
  "$BIN" --config "$WORK/kefu.toml" --data-dir "$WORK/data" --http 127.0.0.1:0 --tcp 127.0.0.1:0 > "$WORK/out" 2>&1 &
  PID=$!
  for _ in $(seq 100); do grep -q "^kefu ready" "$WORK/out" && break; sleep 0.1; done
  grep -q "^kefu ready" "$WORK/out" || { cat "$WORK/out" >&2; exit 1; }
  PORT=$(grep -o 'http=127.0.0.1:[0-9]*' "$WORK/out" | cut -d: -f2)
  TCP_PORT=$(grep -o 'tcp=127.0.0.1:[0-9]*' "$WORK/out" | cut -d: -f2)
}
stop() { kill "$PID"; wait "$PID" 2>/dev/null || true; PID=; }

start
"$LT" send --http "127.0.0.1:$PORT" --conversations 64 --open-s 0 --closed-s 5 --quiet > /dev/null 2>&1 &
LOAD=$!
window "http send" 2.5 2
wait "$LOAD"
stop

start
TOKENS=$(grep 'kefu demo agent=' "$WORK/out" | sed 's/.*token=\([^ ]*\).*/--agent-token \1/' | tr '\n' ' ')
# shellcheck disable=SC2086
"$LT" chat --http "127.0.0.1:$PORT" $TOKENS --visitors 16 --interval-ms 1 --messages 3000 --quiet > /dev/null 2>&1 &
LOAD=$!
window "ws chat" 2.5 3
wait "$LOAD"
stop

start
python3 "$(dirname "$0")/long-poll-load.py" "$PORT" 32 8 0.005 > "$WORK/lp.out" &
LOAD=$!
window "long-poll" 3 3
wait "$LOAD"
cat "$WORK/lp.out"
stop

start
python3 "$(dirname "$0")/binary-load.py" "$PORT" "$TCP_PORT" 32 8 0.005 > "$WORK/bin.out" &
LOAD=$!
window "binary" 3 3
wait "$LOAD"
cat "$WORK/bin.out"
stop
