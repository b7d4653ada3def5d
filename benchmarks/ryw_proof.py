"""Session read-your-writes past the window: how soon after a write a replica is proven to hold
it (cluster/progress.py), and that no read past the window is stale.

A private sandbox (primary + 2 replicas) and rwproxy with the default configuration except
`read_your_writes_window = 0` (so every read after a write is decided by the proof alone).
One session writes a row, then reads that row every 10 ms until a replica answers; the time
from the write's acknowledgement to that read is the figure. Every answer is checked: a
replica answering without the row is a stale read. Then the same with a writer beside it (100
autocommit INSERTs a second through the primary directly), as a busy primary moves its
position between the monitor's samples.

    python -m benchmarks.ryw_proof [--writes 40]
Results: benchmarks/results/ryw-proof-<date>.json and .md (and -latest).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import pymysql

from proxy.config.load import build_config, write_config
from proxy.runtime.launcher import ProxyProcess, free_port
from proxy.testing.clusters import running_cluster

from .report import save


class Writer(threading.Thread):
    """Autocommit INSERTs straight to the primary, `rate` a second."""

    def __init__(self, port: int, rate: float):
        super().__init__(daemon=True)
        self.port, self.period, self.stop = port, 1.0 / rate, threading.Event()

    def run(self):
        c = pymysql.connect(host="127.0.0.1", port=self.port, user="app", password="app", database="app",
                            autocommit=True)
        try:
            with c.cursor() as cur:
                due = time.monotonic()
                while not self.stop.is_set():
                    cur.execute("INSERT INTO noise (v) VALUES (1)")
                    due += self.period
                    time.sleep(max(0.0, due - time.monotonic()))
        finally:
            c.close()


def series(proxy_port: int, primary: int, replicas: set[int], writes: int, label: str) -> dict:
    """`writes` times: INSERT a row, then read it every 10 ms (up to 5 s) until a replica answers."""
    c = pymysql.connect(host="127.0.0.1", port=proxy_port, user="app", password="app", database="app",
                        autocommit=True)
    delays, stale, on_primary, timeouts = [], 0, 0, 0
    try:
        with c.cursor() as cur:
            for i in range(writes):
                cur.execute("INSERT INTO ryw (v) VALUES (%s)", (i,))
                rid = cur.lastrowid
                acked = time.monotonic()
                while True:
                    cur.execute("SELECT @@port, COUNT(*) FROM ryw WHERE id = %s", (rid,))
                    port, n = cur.fetchone()
                    if n != 1:
                        stale += 1
                    if port in replicas:
                        delays.append(time.monotonic() - acked)
                        break
                    on_primary += port == primary
                    if time.monotonic() - acked > 5.0:
                        timeouts += 1
                        break
                    time.sleep(0.01)
                print(f"\r  {label}: write {i + 1}/{writes}", end="", file=sys.stderr, flush=True)
                time.sleep(0.2)  # (the next write lands at another phase of the heartbeat)
    finally:
        c.close()
    print(file=sys.stderr)
    ms = sorted(d * 1000 for d in delays)
    q = lambda p: round(ms[min(len(ms) - 1, int(p * len(ms)))], 1) if ms else None  # noqa: E731
    return {"label": label, "writes": writes, "proven": len(ms), "timeouts": timeouts, "stale_reads": stale,
            "reads_on_primary": on_primary, "median_ms": round(statistics.median(ms), 1) if ms else None,
            "p90_ms": q(0.9), "max_ms": round(ms[-1], 1) if ms else None, "min_ms": round(ms[0], 1) if ms else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--writes", type=int, default=40)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="rwproxy-ryw-") as tmp, running_cluster(tmp, replicas=2) as cl:
        with cl.primary.connect(database="app") as c, c.cursor() as cur:
            cur.execute("CREATE TABLE ryw (id INT AUTO_INCREMENT PRIMARY KEY, v INT)")
            cur.execute("CREATE TABLE noise (id INT AUTO_INCREMENT PRIMARY KEY, v INT)")
        port = free_port()
        data = {"proxy": {"listen": f"127.0.0.1:{port}", "workers": 2},
                "backends": [{"name": n.name, "host": "127.0.0.1", "port": n.port} for n in cl.nodes],
                "users": [{"name": "app", "password": "app"}],
                "monitor": {"user": "rwproxy", "password": cl.password("rwproxy")},
                "routing": {"read_your_writes_window": 0.0}}
        path = str(Path(tmp) / "rwproxy.toml")
        write_config(build_config(data, source=path), path)
        p = ProxyProcess(path, "127.0.0.1", port, log_path=str(Path(tmp) / "rwproxy.log")).start()
        try:
            time.sleep(3.0)  # the replicas join the read pool
            reps = {n.port for n in cl.replicas}
            results.append(series(port, cl.primary.port, reps, args.writes, "idle primary"))
            w = Writer(cl.primary.port, 100.0)
            w.start()
            try:
                results.append(series(port, cl.primary.port, reps, args.writes, "100 writes/s beside it"))
            finally:
                w.stop.set()
                w.join(5)
        finally:
            p.stop()
    res = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpus": os.cpu_count(),
           "python": platform.python_version(), "window": 0.0, "series": results}
    lines = [f"# Session read-your-writes: write acknowledged -> first read a replica answers, "
             f"{res['date']}", "",
             f"{res['cpus']} CPUs (shared), Python {res['python']}; sandbox of a primary and 2 replicas, rwproxy "
             "with the default configuration but `read_your_writes_window = 0`, so each read after a write goes "
             "to a replica only once the monitor has proven it holds the write (`python -m benchmarks.ryw_proof`). "
             "Each read asks for the row just written: a replica answering without it would be a stale read.", "",
             "| primary | writes | median ms | p90 ms | min / max ms | stale reads | reads on the primary meanwhile | not proven within 5 s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['label']} | {r['writes']} | {r['median_ms']} | {r['p90_ms']} | {r['min_ms']} / {r['max_ms']} "
                     f"| {r['stale_reads']} | {r['reads_on_primary']} | {r['timeouts']} |")
    save("ryw-proof", res, "\n".join(lines) + "\n")
    return 0 if all(r["stale_reads"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
