#!/usr/bin/env python3
"""Gateway memory per idle TLS connection.

Starts kefu (KEFU_BIN) with a [tls] section and a self-signed certificate (made with openssl),
opens N keep-alive TLS connections that each send one `GET /healthz` and then stay idle, and
prints the growth of kefu's VmRSS divided by N.

Usage: python3 gateway/scripts/tls-idle.py KEFU_BIN [N (2000)]
Needs openssl. Loopback only; N is bounded by this process's open-file limit.
"""
import os
import re
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time

N_MAX = 15000


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    kefu = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if not 1 <= n <= min(N_MAX, hard - 100):
        sys.exit(f"N must be in 1..={min(N_MAX, hard - 100)}")
    work = tempfile.mkdtemp()
    proc = None
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "2", "-subj", "/CN=localhost",
             "-keyout", f"{work}/key.pem", "-out", f"{work}/cert.pem"],
            check=True, capture_output=True)
        config = subprocess.run([kefu, "--print-default-config"], check=True,
                                capture_output=True, text=True).stdout
        head, sep, tenant = config.partition("\n[[tenant]]")
        head += f'\n[tls]\ncert_path = "{work}/cert.pem"\nkey_path = "{work}/key.pem"\n'
        with open(f"{work}/kefu.toml", "w") as f:
            f.write(head + sep + tenant)
        proc = subprocess.Popen(
            [kefu, "--config", f"{work}/kefu.toml", "--http", "127.0.0.1:0",
             "--tcp", "127.0.0.1:0", "--data-dir", f"{work}/data"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        port = None
        deadline = time.monotonic() + 20
        for line in proc.stdout:
            m = re.search(r"kefu ready http=127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
            if time.monotonic() > deadline:
                break
        if port is None:
            sys.exit("kefu did not print its ready line")

        def rss_kib():
            with open(f"/proc/{proc.pid}/status") as f:
                return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))

        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE

        def connect():
            s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                                server_hostname="localhost")
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: k\r\n\r\n")
            got = b""
            while b'{"status":"ok"}' not in got:
                chunk = s.recv(4096)
                if not chunk:
                    raise RuntimeError("connection closed before the answer")
                got += chunk
            return s

        # Warm the pools and the allocator before the baseline.
        for _ in range(50):
            connect().close()
        time.sleep(1)
        before = rss_kib()
        conns = [connect() for _ in range(n)]
        time.sleep(2)
        after = rss_kib()
        print(f"{n} idle TLS connections: kefu VmRSS {before} -> {after} KiB, "
              f"{(after - before) / n:.2f} KiB per connection")
        for s in conns:
            s.close()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
