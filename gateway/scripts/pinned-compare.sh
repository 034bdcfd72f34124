#!/usr/bin/env bash
# nginx `return 200` against kefu's durable POST (100 keep-alive connections, 5 s, 64
# conversations) with wrk pinned to CPU 1, so the load generator does not take the server's
# core (in gateway/scripts/wrk-compare.sh all three share two cores as the scheduler likes).
# Default: one core each: nginx 1 worker pinned to CPU 0, kefu --shards 1 (its shard is
# pinned to CPU 0). NGINX_WORKERS=2 NGINX_AFFINITY= KEFU_SHARDS= : both at their defaults
# (nginx 2 workers unpinned, kefu one shard per core).
# Usage: [NGINX_WORKERS=N] [NGINX_AFFINITY='worker_cpu_affinity ...;'] [KEFU_SHARDS=N]
#        gateway/scripts/pinned-compare.sh KEFU_BIN
# Needs nginx, wrk, curl, python3, taskset, and two CPUs.
set -euo pipefail
BIN=${1:-target/release/kefu}
D=$(mktemp -d)
P=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > $D/nginx.conf <<CONF
worker_processes ${NGINX_WORKERS:-1};
${NGINX_AFFINITY-worker_cpu_affinity 01;}
pid $D/nginx.pid;
error_log $D/nginx-error.log;
events { worker_connections 4096; }
http { access_log off; server { listen 127.0.0.1:$P; location / { return 200 'ok'; } } }
CONF
nginx -c $D/nginx.conf -p $D
sleep 0.3
taskset -c 1 wrk -t1 -c100 -d1s http://127.0.0.1:$P/ > /dev/null
NPIDS="$(cat $D/nginx.pid) $(pgrep -P $(cat $D/nginx.pid))"
ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$t"; }
t0=$(ticks $NPIDS)
taskset -c 1 wrk -t1 -c100 -d5s --latency http://127.0.0.1:$P/ > $D/nwrk
t1=$(ticks $NPIDS)
kill $(cat $D/nginx.pid)
N=$(awk '/requests in/ {print $1}' $D/nwrk); NR=$(awk '/Requests\/sec/ {print $2}' $D/nwrk); NP99=$(awk '/ 99%/ {print $2}' $D/nwrk)
python3 -c "import sys; t,n,hz=int(sys.argv[1]),int(sys.argv[2]),int(sys.argv[3]); print(f'nginx {sys.argv[4]} req/s p99 {sys.argv[5]} {t/hz*1e6/n:.2f} us CPU/req')" $((t1-t0)) $N $(getconf CLK_TCK) $NR $NP99
SHARDS=(--shards "${KEFU_SHARDS-1}")
[[ -z "${KEFU_SHARDS-1}" ]] && SHARDS=()
"$BIN" --http 127.0.0.1:0 --tcp 127.0.0.1:0 --data-dir "$D/data" "${SHARDS[@]}" > "$D/out" 2> "$D/err" &
PID=$!
for _ in $(seq 100); do grep -q '^kefu ready' $D/out && break; sleep 0.1; done
PORT=$(grep -o 'http=127.0.0.1:[0-9]*' $D/out | cut -d: -f2)
for _ in $(seq 64); do curl -s -X POST 127.0.0.1:$PORT/v1/conversations -d '{"visitor":{"name":"P"},"channel":"web"}'; echo; done > $D/convs.json
python3 - $D/convs.json $D/post.lua <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
lua = ["reqs = {}", "init = function(args)"]
for i, r in enumerate(rows):
    lua.append('  reqs[%d] = wrk.format("POST", "/v1/conversations/%s/messages", {["Authorization"] = "Bearer %s", ["Content-Type"] = "application/json"}, \'{"text":"hello from wrk"}\')' % (i + 1, r["conversation_id"], r["visitor_token"]))
lua.append("end")
lua.append("counter = 0")
lua.append("request = function() counter = counter + 1; return reqs[(counter % #reqs) + 1] end")
open(sys.argv[2], "w").write("\n".join(lua))
PY
taskset -c 1 wrk -t1 -c100 -d1s -s $D/post.lua http://127.0.0.1:$PORT/ > /dev/null
t0=$(awk '{print $14+$15}' /proc/$PID/stat)
taskset -c 1 wrk -t1 -c100 -d5s --latency -s $D/post.lua http://127.0.0.1:$PORT/ > $D/wrk
t1=$(awk '{print $14+$15}' /proc/$PID/stat)
N=$(awk '/requests in/ {print $1}' $D/wrk); KR=$(awk '/Requests\/sec/ {print $2}' $D/wrk); KP99=$(awk '/ 99%/ {print $2}' $D/wrk)
python3 -c "import sys; t,n,hz=int(sys.argv[1]),int(sys.argv[2]),int(sys.argv[3]); print(f'kefu  {sys.argv[4]} POST/s p99 {sys.argv[5]} {t/hz*1e6/n:.2f} us CPU/POST  ratio {float(sys.argv[4])/float(sys.argv[6]):.2f}x')" $((t1-t0)) $N $(getconf CLK_TCK) $KR $KP99 $NR
kill $PID; wait $PID 2>/dev/null; rm -rf $D
