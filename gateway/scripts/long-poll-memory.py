#!/usr/bin/env python3
# Gateway memory per waiting long-poll: starts KEFU_BIN on loopback (temp data dir), opens N
# sockets that each wait in GET /v1/conversations/{id}/poll, and prints the RSS delta per poll.
# Usage: (ulimit -n 20000; gateway/scripts/long-poll-memory.py target/release/kefu 4000)
import json, os, socket, subprocess, sys, tempfile, time, urllib.request
bin_, n = sys.argv[1], int(sys.argv[2])
d = tempfile.mkdtemp()
p = subprocess.Popen([bin_, "--data-dir", d + "/data", "--http", "127.0.0.1:0", "--tcp", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
addr = None
for line in p.stdout:
    if line.startswith("kefu ready"):
        addr = [w for w in line.split() if w.startswith("http=")][0][5:]
        break
def rss():
    for l in open(f"/proc/{p.pid}/status"):
        if l.startswith("VmRSS"):
            return int(l.split()[1])
req = urllib.request.Request(f"http://{addr}/v1/conversations", data=json.dumps({"visitor": {"name": "P"}, "channel": "web"}).encode(), method="POST")
c = json.loads(urllib.request.urlopen(req).read())
cid, tok = c["conversation_id"], c["visitor_token"]
time.sleep(0.5)
before = rss()
host, port = addr.split(":")
socks = []
# `after` past the conversation's end, so every poll waits (up to 30 s).
for i in range(n):
    s = socket.create_connection((host, int(port)))
    s.sendall(f"GET /v1/conversations/{cid}/poll?after=1000000&timeout_ms=30000 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\n\r\n".encode())
    socks.append(s)
time.sleep(3)
after = rss()
print(f"{n} waiting long-polls: RSS {before} -> {after} KiB, {(after - before) / n:.2f} KiB each")
for s in socks:
    s.close()
p.terminate()
p.wait()
import shutil
shutil.rmtree(d, ignore_errors=True)
