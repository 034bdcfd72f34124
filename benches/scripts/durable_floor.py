#!/usr/bin/env python3
"""Interleaved benchmark: nginx `return 200` vs the durable_floor server's designs.

Builds `durable_floor` (benches/src/bin/durable_floor.rs), then for each round runs every
variant once under `wrk -t1 -c100 --latency` with a small JSON POST (durable_floor_post.lua),
and prints the median of each variant over the rounds, with its ratio to nginx with 2
workers. A run is repeated (at most 3 times) when other processes took more than 10% of the
machine during it. Server CPU, context switches, requests per fdatasync and the sync latency
come from /proc and the server's SIGUSR1 counters.

Everything it writes (nginx config and logs, the servers' log files, results JSON) goes to
a fresh directory under the system temp dir; the log files are deleted at the end.

Usage (from the repository root; needs wrk and nginx on PATH, Linux):
    python3 benches/scripts/durable_floor.py [--rounds 3] [--duration 5]
        [--variants C-epoll-N1-inline,nginx-2w] [--port 18090] [--size-mib 64] [--no-build]
Binary: ${CARGO_TARGET_DIR:-target}/release/durable_floor.
"""
import argparse
import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
LUA = os.path.join(REPO, "benches", "scripts", "durable_floor_post.lua")
BIN_NAME = "durable_floor"
TCK = os.sysconf("SC_CLK_TCK")

VARIANTS = {
    "nginx-2w": "NGINX:2",
    "nginx-1w(info)": "NGINX:1",
    "A-epoll-N2-shared": "--mode epoll --threads 2 --file shared",
    "A-epoll-N2-perthr": "--mode epoll --threads 2 --file perthread",
    "B-uring-N2-perthr": "--mode uring --threads 2 --file perthread",
    "C-epoll-N1": "--mode epoll --threads 1",
    "C-uring-N1": "--mode uring --threads 1",
    "C-epoll-N1-inline": "--mode epoll --threads 1 --inline",
    "A-epoll-N2-inline": "--mode epoll --threads 2 --file perthread --inline",
    "nosync-epoll-N1": "--mode epoll --threads 1 --nosync",
    "nosync-epoll-N2": "--mode epoll --threads 2 --file perthread --nosync",
    "nosync-uring-N2": "--mode uring --threads 2 --file perthread --nosync",
    "nosync-uring-N1": "--mode uring --threads 1 --nosync",
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=int(os.environ.get("ROUNDS", "3")))
    p.add_argument("--duration", type=int, default=5, help="seconds per wrk run (1-60)")
    p.add_argument("--variants", default=os.environ.get("VARIANTS", ""),
                   help="comma-separated subset of: " + ",".join(VARIANTS))
    p.add_argument("--port", type=int, default=18090)
    p.add_argument("--size-mib", type=int, default=64, help="preallocated log file size")
    p.add_argument("--no-build", action="store_true", help="use the already built binary")
    a = p.parse_args()
    if not 1 <= a.rounds <= 20:
        p.error("--rounds must be 1..20")
    if not 1 <= a.duration <= 60:
        p.error("--duration must be 1..60")
    if a.variants:
        unknown = [v for v in a.variants.split(",") if v not in VARIANTS]
        if unknown:
            p.error(f"unknown variants {unknown}")
    return a


def pids_tree(pid):
    out = [pid]
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/children") as f:
                for c in f.read().split():
                    out += pids_tree(int(c))
    except FileNotFoundError:
        pass
    return out


def cpu_ticks(pids):
    s = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            s += int(fields[11]) + int(fields[12])  # utime, stime (whole thread group)
        except FileNotFoundError:
            pass
    return s


def ctxsw(pids):
    n = 0
    for p in pids:
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except FileNotFoundError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/status") as f:
                    st = f.read()
            except FileNotFoundError:
                continue
            n += int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", st, re.M).group(1))
            n += int(re.search(r"^nonvoluntary_ctxt_switches:\s+(\d+)", st, re.M).group(1))
    return n


def sysstat():
    with open("/proc/stat") as f:
        first = f.readline()
    cpu = [int(x) for x in first.split()[1:]]
    return sum(cpu), cpu[3] + cpu[4]  # total, idle+iowait


def wait_port(port, timeout=10):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} not up after {timeout} s")


def read_line(p, timeout):
    """One stdout line of the server, waiting at most `timeout` seconds."""
    if not select.select([p.stdout], [], [], timeout)[0]:
        raise RuntimeError(f"no output from the server within {timeout} s")
    return p.stdout.readline()


def unit(v):
    v = v.strip()
    for suf, mul in (("us", 1), ("ms", 1000), ("s", 1e6)):
        if v.endswith(suf):
            return float(v[: -len(suf)]) * mul
    raise ValueError(v)


def wait_quiet(maxwait=20):
    """Wait (bounded) until the machine is below 15% busy; returns the last busy fraction."""
    end = time.time() + maxwait
    while True:
        t0, i0 = sysstat()
        time.sleep(0.5)
        t1, i1 = sysstat()
        busy = 1 - (i1 - i0) / max(1, t1 - t0)
        if busy < 0.15 or time.time() > end:
            return busy


class Bench:
    def __init__(self, a, binary, work):
        self.a = a
        self.binary = binary
        self.work = work
        self.data = os.path.join(work, "data")
        self.nginx_dir = os.path.join(work, "nginx")

    def start(self, args):
        port = self.a.port
        if args.startswith("NGINX"):
            nw = args.split(":")[1]
            nd = self.nginx_dir
            os.makedirs(nd, exist_ok=True)
            with open(f"{nd}/nginx.conf", "w") as f:
                f.write(
                    f"worker_processes {nw}; pid {nd}/nginx.pid; error_log {nd}/nginx-error.log;\n"
                    "events { worker_connections 4096; }\n"
                    f"http {{ access_log off; server {{ listen 127.0.0.1:{port}; "
                    "location / { return 200 'ok'; } } }\n"
                )
            p = subprocess.Popen(
                ["nginx", "-c", f"{nd}/nginx.conf", "-p", nd, "-g", "daemon off;"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_port(port)
            except Exception:
                p.kill()
                p.wait()
                raise
            time.sleep(0.2)
            return p
        p = subprocess.Popen(
            [self.binary, "--port", str(port), "--dir", self.data,
             "--size-mib", str(self.a.size_mib)] + args.split(),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            line = read_line(p, 60).strip()  # zero-filling the log files comes first
            if line != "READY":
                raise RuntimeError(f"durable_floor did not start ({line!r}): {args}")
            wait_port(port)
        except Exception:
            p.kill()
            p.wait()
            raise
        return p

    @staticmethod
    def stats(p):
        p.send_signal(signal.SIGUSR1)
        line = read_line(p, 10)
        m = re.search(r"reqs=(\d+) syncs=(\d+) sync_ns=(\d+) writes=(\d+)", line)
        if not m:
            raise RuntimeError(f"no stats from the server: {line!r}")
        return [int(x) for x in m.groups()]

    def run(self, name, args):
        dur = self.a.duration
        is_nginx = args.startswith("NGINX")
        pre_busy = wait_quiet()
        p = self.start(args)
        try:
            pids = pids_tree(p.pid)
            s0 = None if is_nginx else self.stats(p)
            c0, x0 = cpu_ticks(pids), ctxsw(pids)
            t0, i0 = sysstat()
            # wrk's CPU: the growth of the reaped-children rusage across its run (the
            # server is reaped only afterwards)
            ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            w = subprocess.Popen(
                ["wrk", "-t1", "-c100", f"-d{dur}s", "--latency", "-s", LUA,
                 f"http://127.0.0.1:{self.a.port}/"],
                stdout=subprocess.PIPE, text=True)
            try:
                out, _ = w.communicate(timeout=dur + 30)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
                raise
            ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            c1, x1 = cpu_ticks(pids), ctxsw(pids)
            t1, i1 = sysstat()
            s1 = None if is_nginx else self.stats(p)
        finally:
            p.send_signal(signal.SIGQUIT if is_nginx else signal.SIGINT)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        wrk_cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        total = int(re.search(r"(\d+) requests in", out).group(1))
        p50 = unit(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
        p99 = unit(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
        errs = re.search(r"(Non-2xx.*|Socket errors.*)", out)
        r = dict(
            name=name, rps=rps, p50=p50, p99=p99, total=total,
            cpu_us_req=(c1 - c0) / TCK * 1e6 / total,
            wrk_cpu_us_req=wrk_cpu * 1e6 / total,
            srv_ctxsw_req=(x1 - x0) / total,
            sys_busy=1 - (i1 - i0) / max(1, t1 - t0),
            foreign=((t1 - t0) - (i1 - i0) - (c1 - c0) - wrk_cpu * TCK) / max(1, t1 - t0),
            pre_busy=pre_busy,
            err=errs.group(1) if errs else "",
        )
        if not is_nginx:
            dr, dsync, dns, dw = [b - a for a, b in zip(s0, s1)]
            r.update(
                req_per_sync=(dr / dsync if dsync else None),
                syncs_per_s=dsync / dur,
                sync_lat_us=(dns / dsync / 1000 if dsync else None),
                req_per_write=dr / max(1, dw),
            )
        return r


def build(a):
    target = os.environ.get("CARGO_TARGET_DIR", "target")
    binary = os.path.join(REPO, target, "release", BIN_NAME)
    if not a.no_build:
        subprocess.run(
            ["cargo", "build", "--release", "-p", "kefu-benches", "--bin", BIN_NAME],
            cwd=REPO, check=True)
    if not os.access(binary, os.X_OK):
        sys.exit(f"no binary at {binary} (build it, or drop --no-build)")
    return binary


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def report(results, variants):
    ng = None
    if "nginx-2w" in variants:
        ng = statistics.median([r["rps"] for r in results if r["name"] == "nginx-2w"])
    print()
    print(f"{'variant':22} {'med req/s':>10} {'ratio':>6} {'p50 us':>7} {'p99 us':>7} "
          f"{'srv cpu us/req':>14} {'wrk cpu us/req':>14} {'ctxsw/req':>9} {'req/sync':>8} "
          f"{'syncs/s':>8} {'sync us':>7} {'busy':>5} {'frgn':>5}")
    keys = ("rps", "p50", "p99", "cpu_us_req", "wrk_cpu_us_req", "srv_ctxsw_req",
            "req_per_sync", "syncs_per_s", "sync_lat_us", "sys_busy", "foreign")
    for name in variants:
        rs = [r for r in results if r["name"] == name]
        m = {k: med([r.get(k) for r in rs]) for k in keys}
        ratio = m["rps"] / ng if ng else float("nan")
        errs = sorted({r["err"] for r in rs if r["err"]})
        print(f"{name:22} {m['rps']:10.0f} {ratio:6.2f} {m['p50']:7.0f} {m['p99']:7.0f} "
              f"{m['cpu_us_req']:14.2f} {m['wrk_cpu_us_req']:14.2f} {m['srv_ctxsw_req']:9.2f} "
              f"{m['req_per_sync']:8.1f} {m['syncs_per_s']:8.0f} {m['sync_lat_us']:7.0f} "
              f"{m['sys_busy']:5.2f} {m['foreign']:5.2f} "
              f"max={max(r['rps'] for r in rs):.0f} rps=" + ",".join(f"{r['rps']:.0f}" for r in rs)
              + (f" ERRORS: {'; '.join(errs)}" if errs else ""))


def main():
    a = parse_args()
    variants = dict(VARIANTS)
    if a.variants:
        variants = {k: v for k, v in VARIANTS.items() if k in a.variants.split(",")}
    for tool in ("wrk",) + (("nginx",) if any(v.startswith("NGINX") for v in variants.values()) else ()):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found on PATH")
    binary = build(a)
    work = tempfile.mkdtemp(prefix="kefu-durable-floor-")
    print(f"# work dir {work}", flush=True)
    bench = Bench(a, binary, work)
    results = []
    try:
        for rnd in range(a.rounds):
            for name, args in variants.items():
                for attempt in range(3):  # rerun if another process stole >10% of the machine
                    r = bench.run(name, args)
                    r["round"] = rnd
                    r["attempt"] = attempt
                    if r["foreign"] <= 0.10:
                        break
                    print("# contaminated, rerun:", json.dumps(r), flush=True)
                results.append(r)
                print(json.dumps(r), flush=True)
                time.sleep(0.5)
    finally:
        shutil.rmtree(bench.data, ignore_errors=True)  # the preallocated log files
        out = os.path.join(work, f"results-{int(time.time())}.json")
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"# results in {out}", flush=True)
    report(results, variants)


if __name__ == "__main__":
    main()
