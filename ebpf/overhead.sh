#!/usr/bin/env bash
# Overhead of kefu's request markers, side by side in one run: three release gateways
# (markers compiled out / compiled in, untraced / compiled in, traced by kefu-trace), loaded
# one after another in rotating order, ROUNDS rounds of wrk each (GET /healthz: the cheapest
# request, so the worst case for relative overhead). Prints medians, per-round paired ratios,
# and gateway CPU time per request (steadier than throughput on a shared machine).
#
# Build the two gateways and the tracer first (as root to run):
#   cargo build --release -p kefu-gateway --bin kefu && cp target/release/kefu target/kefu-on
#   cargo build --release -p kefu-gateway --bin kefu --features kefu-trace-common/disabled \
#     && cp target/release/kefu target/kefu-off
#   cargo build --release -p kefu-trace --bin kefu-trace
#   ebpf/overhead.sh                          # every request traced, io_uring events included
#   TRACE_ARGS=--markers-only ebpf/overhead.sh   # every request traced, markers only
#   SAMPLE=0.1 ebpf/overhead.sh               # 1 request in 10 traced
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OFF=${OFF:-$ROOT/target/kefu-off}
ON=${ON:-$ROOT/target/kefu-on}
TRACE=${TRACE:-$ROOT/target/release/kefu-trace}
ROUNDS=${ROUNDS:-5}
SECS=${SECS:-8}
CONNS=${CONNS:-16}
PATH_=${PATH_:-/healthz}
SAMPLE=${SAMPLE:-1}
W=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
start() { # name bin
  "$2" --http 127.0.0.1:0 --tcp 127.0.0.1:0 --data-dir "$W/$1" --shards 1 --durability never > "$W/$1.out" 2>&1 &
  pids+=($!); echo $! > "$W/$1.pid"
  for _ in $(seq 100); do grep -q 'kefu ready' "$W/$1.out" && break; sleep 0.1; done
  grep -o 'http=[0-9.:]*' "$W/$1.out" | head -1 | cut -d= -f2 > "$W/$1.addr"
}
start off "$OFF"; start on "$ON"; start traced "$ON"
"$TRACE" --pid "$(cat "$W/traced.pid")" --sample "$SAMPLE" --window-s 5 ${TRACE_ARGS:-} > /dev/null 2> "$W/trace.err" &
pids+=($!); TP=$!
sleep 2
declare -A rps cpu
order=(off on traced)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
for r in $(seq "$ROUNDS"); do
  for i in 0 1 2; do
    v=${order[$(( (i + r) % 3 ))]}
    gp=$(cat "$W/$v.pid"); t0=$(ticks "$gp"); tt0=$(ticks "$TP")
    out=$(wrk -t1 -c"$CONNS" -d"${SECS}s" "http://$(cat "$W/$v.addr")$PATH_")
    t1=$(ticks "$gp"); tt1=$(ticks "$TP")
    x=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    n=$(echo "$out" | awk '/requests in/ {print $1}')
    c=$(awk -v d=$((t1 - t0)) -v n="$n" -v hz="$HZ" 'BEGIN {printf "%.2f", d * 1e6 / hz / n}')
    tc=$(awk -v d=$((tt1 - tt0)) -v n="$n" -v hz="$HZ" 'BEGIN {printf "%.2f", d * 1e6 / hz / n}')
    rps[$v]="${rps[$v]:-} $x"; cpu[$v]="${cpu[$v]:-} $c"; eval "r_${v}=$x; c_${v}=$c"
    echo "round $r $v $x req/s  gateway CPU $c us/req  (tracer CPU $tc us/req)"
  done
  # Paired within the round (same machine state): throughput and CPU-per-request ratios.
  pr_on="${pr_on:-} $(awk -v a="$r_off" -v b="$r_on" 'BEGIN {print b/a}')"
  pr_tr="${pr_tr:-} $(awk -v a="$r_off" -v b="$r_traced" 'BEGIN {print b/a}')"
  pc_on="${pc_on:-} $(awk -v a="$c_off" -v b="$c_on" 'BEGIN {print a/b}')"
  pc_tr="${pc_tr:-} $(awk -v a="$c_off" -v b="$c_traced" 'BEGIN {print a/b}')"
done
kill -INT $TP; sleep 1
tail -c 400 "$W/trace.err" | tr -d '\033' | tail -3
med() { echo "$@" | tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
off=$(med ${rps[off]}); on=$(med ${rps[on]}); tr=$(med ${rps[traced]})
echo "median req/s: off $off  on(untraced) $on  on(traced, sample $SAMPLE) $tr"
coff=$(med ${cpu[off]}); con=$(med ${cpu[on]}); ctr=$(med ${cpu[traced]})
echo "median gateway CPU us/req: off $coff  on(untraced) $con  on(traced) $ctr"
awk -v a="$coff" -v b="$con" -v c="$ctr" 'BEGIN {printf "CPU-per-request ratio (throughput-equivalent off/x): untraced %.3f   traced %.3f\n", a/b, a/c}'
awk -v a="$off" -v b="$on" -v c="$tr" 'BEGIN {printf "ratio untraced/off %.3f   traced/off %.3f   traced/untraced %.3f\n", b/a, c/a, c/b}'
echo "paired per-round medians: throughput untraced/off $(med $pr_on)  traced/off $(med $pr_tr);  CPU-equivalent untraced $(med $pc_on)  traced $(med $pc_tr)"
