#!/usr/bin/env python3
"""Long-poll load: K visitors each long-poll their conversation (GET .../poll, keep-alive) while
one connection posts a message into each conversation every INTERVAL_S. Checks that every
message sent was received by its poller; prints the counts.
Usage: gateway/scripts/long-poll-load.py PORT K SECONDS INTERVAL_S"""
import http.client, json, sys, threading, time
port, k, secs, interval = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
def conn(): return http.client.HTTPConnection("127.0.0.1", port, timeout=10)
convs = []
c = conn()
for i in range(k):
    c.request("POST", "/v1/conversations", json.dumps({"visitor": {"name": f"lp{i}"}, "channel": "web"}))
    r = json.loads(c.getresponse().read()); convs.append((r["conversation_id"], r["visitor_token"]))
stop = time.time() + secs
got = [0]; sent = [0]; lock = threading.Lock()
def poller(cid, tok):
    h = conn(); after = 0
    h.request("GET", f"/v1/conversations/{cid}/messages", headers={"Authorization": f"Bearer {tok}"})
    after = json.loads(h.getresponse().read())["last_seq"]
    while time.time() < stop:
        h.request("GET", f"/v1/conversations/{cid}/poll?after={after}&timeout_ms=2000", headers={"Authorization": f"Bearer {tok}"})
        r = json.loads(h.getresponse().read())
        n = len(r["messages"])
        after = r["last_seq"]
        with lock: got[0] += n
def sender():
    h = conn(); i = 0
    while time.time() < stop:
        for cid, tok in convs:
            h.request("POST", f"/v1/conversations/{cid}/messages", json.dumps({"text": f"m{i}"}), {"Authorization": f"Bearer {tok}"})
            h.getresponse().read(); sent[0] += 1
        i += 1
        time.sleep(interval)
ts = [threading.Thread(target=poller, args=cv) for cv in convs] + [threading.Thread(target=sender)]
for t in ts: t.start()
for t in ts: t.join()
print(f"sent {sent[0]} received {got[0]}")
sys.exit(0 if sent[0] == got[0] else 1)
