#!/bin/bash
# Open-loop sends at RATE/s for 10 s while a loop uploads 8 MB attachments to a conversation on
# the same shard (--shards 1); prints the send latency report.
# Usage: [LOADTEST=path/to/kefu-loadtest] gateway/scripts/upload-stall.sh KEFU_BIN [RATE] [UPLOADS: 1 or 0]
BIN=$1; RATE=${2:-2000}; UP=${3:-1}
LT=${LOADTEST:-target/release/kefu-loadtest}
D=$(mktemp -d)
head -c 8000000 /dev/urandom > $D/blob
$BIN --http 127.0.0.1:0 --tcp 127.0.0.1:0 --data-dir $D/data --shards 1 > $D/out 2> $D/err &
PID=$!
for _ in $(seq 100); do grep -q '^kefu ready' $D/out && break; sleep 0.1; done
PORT=$(grep -o 'http=127.0.0.1:[0-9]*' $D/out | cut -d: -f2)
if [[ $UP == 1 ]]; then
  # A conversation per upload: one conversation takes at most 100 MiB of attachments.
  ( end=$((SECONDS + 14)); n=0; while (( SECONDS < end )); do
      R=$(curl -s -X POST 127.0.0.1:$PORT/v1/conversations -d '{"visitor":{"name":"U"},"channel":"web"}')
      CID=$(echo "$R" | python3 -c 'import json,sys; print(json.load(sys.stdin)["conversation_id"])')
      TOK=$(echo "$R" | python3 -c 'import json,sys; print(json.load(sys.stdin)["visitor_token"])')
      curl -s -o /dev/null -H "Authorization: Bearer $TOK" -H 'Content-Type: image/png' --data-binary @$D/blob 127.0.0.1:$PORT/v1/conversations/$CID/attachments; n=$((n+1)); done; echo "uploads: $n" ) &
  UPID=$!
fi
sleep 1
$LT send --http 127.0.0.1:$PORT --rate-open $RATE --open-s 10 --closed-s 0 --max-p99-ms 100 --quiet 2>&1 | grep -E "request|send delay|p99|rate" | head -8
[[ -n "${UPID:-}" ]] && wait $UPID
kill $PID; wait $PID 2>/dev/null; rm -rf $D
