#!/usr/bin/env bash
# Side-by-side wrk run: nginx `return 200`, kefu GET /healthz, kefu durable POST send.
# Usage: [KEFU_FLAGS='--durability never'] [PERF_OUT=perf.data] [KEFU_TENANT_EXTRA='route_on_one_shard = false']
#        [KEFU_SET='syncs_in_flight_max=4 buffer_bytes=8192'] (replaces those keys' lines of the default config)
#        [KEEP=DIR] (copy the data dir there at the end)
#        [TLS=1] (all three over TLS: a self-signed certificate made with openssl, nginx with
#        `listen ... ssl`, kefu with a [tls] section)
#        gateway/scripts/wrk-compare.sh [KEFU_BIN] [CONNECTIONS] [SECONDS]
# Needs wrk, nginx, curl, python3 (and openssl with TLS=1). Starts everything on loopback (free ports), stops it after.
set -euo pipefail
BIN=${1:-target/release/kefu}
CONNS=${2:-64}
SECS=${3:-5}
WORK=$(mktemp -d)
cleanup() {
  [[ -n "${KEFU_PID:-}" ]] && kill "$KEFU_PID" 2>/dev/null || true
  [[ -f "$WORK/nginx.pid" ]] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  [[ -n "${KEEP:-}" ]] && cp -r "$WORK/data" "$KEEP"; rm -rf "$WORK"
}
trap cleanup EXIT

source "$(dirname "$0")/nginx.sh"
SCHEME=http
CURL=(curl -s)
if [[ -n "${TLS:-}" ]]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2> /dev/null
  start_nginx "$WORK" "$WORK/cert.pem" "$WORK/key.pem"
  SCHEME=https
  CURL=(curl -sk)
else
  start_nginx "$WORK"
fi

# The binary's own default config (`--print-default-config`: its defaults and demo tenant, so
# the keys always match the binary), with a demo visitor rate limit above what wrk sends.
"$BIN" --print-default-config > "$WORK/default.toml"
python3 - "$WORK/default.toml" "$WORK/kefu.toml" "$WORK" <<'PY'
import os, sys, re
text = open(sys.argv[1]).read()
head, sep, tenant = text.partition("\n[[tenant]]")
if os.environ.get("TLS"):
    head += '\n[tls]\ncert_path = "%s/cert.pem"\nkey_path = "%s/key.pem"\n' % (sys.argv[3], sys.argv[3])
if not sep:
    sys.exit("kefu --print-default-config printed no [[tenant]]")
tenant = tenant.replace('name = "demo"', 'name = "demo"\nvisitor_rate_limit = { messages_per_s = 10000, burst = 10000 }\n' + os.environ.get("KEFU_TENANT_EXTRA", ""), 1)
for kv in os.environ.get("KEFU_SET", "").split():
    key, value = kv.split("=", 1)
    head, n = re.subn(r"(?m)^%s\s*=.*$" % re.escape(key), "%s = %s" % (key, value), head, count=1)
    if n != 1:
        sys.exit("KEFU_SET: no key %s in the default config" % key)
open(sys.argv[2], "w").write(head + sep + tenant)
PY
"$BIN" --config "$WORK/kefu.toml" ${KEFU_FLAGS:-} --http 127.0.0.1:0 --tcp 127.0.0.1:0 --data-dir "$WORK/data" > "$WORK/kefu.out" 2> "$WORK/kefu.err" &
KEFU_PID=$!
for _ in $(seq 100); do grep -q '^kefu ready' "$WORK/kefu.out" && break; sleep 0.1; done
PORT=$(grep -o 'http=127.0.0.1:[0-9]*' "$WORK/kefu.out" | cut -d: -f2)

for _ in $(seq 64); do
  "${CURL[@]}" -X POST "$SCHEME://127.0.0.1:$PORT/v1/conversations" -d '{"visitor":{"name":"P"},"channel":"web"}'; echo
done > "$WORK/convs.json"
python3 - "$WORK/convs.json" "$WORK/post.lua" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
lua = ["convs = {"] + ['  {"/v1/conversations/%s/messages", "Bearer %s"},' % (r["conversation_id"], r["visitor_token"]) for r in rows] + ["}"]
# The requests are formatted once, in init: formatting each one in request() cost wrk about
# 3.5 us of CPU per request, which on two cores shared with the server lowered the rate it
# measured (the server sees the same bytes either way).
lua.append('''reqs = {}
init = function(args)
  for i, c in ipairs(convs) do
    reqs[i] = wrk.format("POST", c[1], {["Authorization"] = c[2], ["Content-Type"] = "application/json"}, '{"text":"hello from wrk"}')
  end
end
counter = 0
request = function()
  counter = counter + 1
  return reqs[(counter % #reqs) + 1]
end''')
open(sys.argv[2], "w").write("\n".join(lua))
PY

# CPU time (user+sys, clock ticks) of the given pids and their threads.
ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$t"; }
# Idle and total jiffies of the whole machine (/proc/stat "cpu" line).
idle() { awk '/^cpu / {print $5 + $6, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9}' /proc/stat; }
# Context switches (voluntary + involuntary) of the given pids' threads, io_uring workers included.
ctxsw() { local p; for p in "$@"; do cat /proc/$p/task/*/status 2>/dev/null; done | awk '/ctxt_switches/ {n += $2} END {print n}'; }
NGINX_PIDS=$(cat "$WORK/nginx.pid"; pgrep -P "$(cat "$WORK/nginx.pid")")
RATES=()
# Prints wrk's rate and percentiles, and the server's CPU time per request: on a machine shared
# with other work the CPU cost is steadier than the rate. $1 label, $2 "nginx" or "kefu".
run() {
  local label=$1 who=$2 pids before after
  shift 2
  if [[ $who == nginx ]]; then pids=$NGINX_PIDS; else pids=$KEFU_PID; fi
  echo "== $label"
  before=$(ticks $pids)
  local sw0 idle0
  sw0=$(ctxsw $pids)
  idle0=$(idle)
  wrk -t1 -c"$CONNS" -d"${SECS}s" --latency "$@" > "$WORK/wrk.out"
  after=$(ticks $pids)
  local sw1 idle1
  sw1=$(ctxsw $pids)
  idle1=$(idle)
  grep -E 'Requests/sec|  50%|  99%|Non-2xx|Socket errors' "$WORK/wrk.out"
  RATES+=("$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk.out")")
  local reqs
  reqs=$(awk '/requests in/ {print $1}' "$WORK/wrk.out")
  python3 -c "import sys; t, n, hz = map(int, sys.argv[1:]); print(f'server CPU per request: {t / hz * 1e6 / max(n, 1):.1f} us')" \
    "$((after - before))" "${reqs:-0}" "$(getconf CLK_TCK)"
  python3 -c "import sys; i0, t0, i1, t1 = map(int, sys.argv[1:]); print(f'machine idle during the run: {100 * (i1 - i0) / max(t1 - t0, 1):.0f}%')" $idle0 $idle1
  # Threads that exited during the run (io_uring workers) are not counted.
  python3 -c "import sys; s, n = map(int, sys.argv[1:]); print(f'server context switches per request: {s / max(n, 1):.2f}')" "$((sw1 - sw0))" "${reqs:-0}"
}
run "nginx return 200" nginx "$SCHEME://127.0.0.1:$NGINX_PORT/"
run "kefu GET /healthz" kefu "$SCHEME://127.0.0.1:$PORT/healthz"
# PERF_OUT=FILE: also profile kefu (perf record -g) during the POST run.
if [[ -n "${PERF_OUT:-}" ]]; then
  perf record -F 999 -g -p "$KEFU_PID" -o "$PERF_OUT" -- sleep "$SECS" > /dev/null 2>&1 &
  PERF_PID=$!
fi
run "kefu POST message (durable, ${KEFU_FLAGS:-default durability})" kefu -s "$WORK/post.lua" "$SCHEME://127.0.0.1:$PORT"
[[ -n "${PERF_PID:-}" ]] && wait "$PERF_PID"
# The issue's measure: each kefu rate against nginx's in this run.
python3 -c "import sys; n, g, p = map(float, sys.argv[1:]); print(f'vs nginx: GET /healthz {g / n:.2f}x, durable POST {p / n:.2f}x')" "${RATES[@]}"
"${CURL[@]}" "$SCHEME://127.0.0.1:$PORT/metrics" | grep -E 'stage="(log_sync|command)",quantile="0.(5|99)"'
