#!/usr/bin/env python3
"""Binary-protocol load: K visitors each subscribe to their conversation over the binary
protocol (TCP, `Hello` then `Subscribe`) while one HTTP connection posts a message into each
conversation every INTERVAL_S. Checks that every message sent reached its subscriber as a
stored record; prints the counts.
Usage: gateway/scripts/binary-load.py HTTP_PORT TCP_PORT K SECONDS INTERVAL_S"""
import http.client, json, os, socket, struct, sys, threading, time

http_port, tcp_port, k = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
secs, interval = float(sys.argv[4]), float(sys.argv[5])
HEADER_LEN = 48
KIND_MESSAGE, KIND_HELLO, KIND_SUBSCRIBE, KIND_WELCOME = 1, 16, 18, 32

def crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table
TABLE = crc32c_table()

def crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF

def frame(kind, conversation_id, payload):
    """A client frame (protocol/src/frame.rs): the CRC covers bytes 0..4, 8..48 and the payload."""
    head = bytearray(HEADER_LEN)
    head[0:2] = b"KF"
    head[2] = 1
    head[3] = kind
    struct.pack_into("<IHHQQQQ", head, 8, len(payload), 0, 0, conversation_id, 0, 0, 0)
    crc = crc32c(bytes(head[8:HEADER_LEN]) + payload, crc32c(bytes(head[0:4])))
    struct.pack_into("<I", head, 4, crc)
    return bytes(head) + payload

def read_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("closed")
        buf += chunk
    return bytes(buf)

def read_frame(sock):
    head = read_exact(sock, HEADER_LEN)
    (length,) = struct.unpack_from("<I", head, 8)
    return head[3], read_exact(sock, length) if length else b""

def conn():
    return http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)

convs = []
c = conn()
for i in range(k):
    c.request("POST", "/v1/conversations", json.dumps({"visitor": {"name": f"bin{i}"}, "channel": "web"}))
    r = json.loads(c.getresponse().read())
    convs.append((r["conversation_id"], r["visitor_token"]))
stop = time.time() + secs
got = [0]
sent = [0]
lock = threading.Lock()
ready = threading.Barrier(k + 1)

def subscriber(cid, token):
    s = socket.create_connection(("127.0.0.1", tcp_port), timeout=10)
    tok = token.encode()
    s.sendall(frame(KIND_HELLO, 0, struct.pack("<H", len(tok)) + tok))
    kind, _ = read_frame(s)
    assert kind == KIND_WELCOME, f"expected Welcome, got kind {kind}"
    s.sendall(frame(KIND_SUBSCRIBE, int(cid[1:], 16), struct.pack("<Q", 0)))
    ready.wait()
    s.settimeout(3)
    while True:
        try:
            kind, _ = read_frame(s)
        except (socket.timeout, EOFError):
            return
        if kind == KIND_MESSAGE:
            with lock:
                got[0] += 1

def sender():
    ready.wait()
    h = conn()
    i = 0
    while time.time() < stop:
        for cid, tok in convs:
            h.request("POST", f"/v1/conversations/{cid}/messages", json.dumps({"text": f"m{i}"}),
                      {"Authorization": f"Bearer {tok}"})
            r = h.getresponse()
            r.read()
            if r.status != 201:
                print(f"send answered {r.status} (raise the tenant's visitor_rate_limit?)", file=sys.stderr)
                os._exit(2)
            sent[0] += 1
        i += 1
        time.sleep(interval)

threads = [threading.Thread(target=subscriber, args=cv) for cv in convs] + [threading.Thread(target=sender)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(f"sent {sent[0]} received {got[0]}")
sys.exit(0 if sent[0] == got[0] else 1)
