"""Failover and switchover as clients see them, through rwproxy.

Each repetition starts a fresh semi-sync sandbox (primary + 2 replicas) and
rwproxy with default settings, runs 8 clients inserting uniquely numbered
rows, then SIGKILLs the primary (a crash), SIGSTOPs it (a hang: a frozen VM, a
stuck disk; it answers nobody but its sockets stay open), or runs `rwproxy
switchover`. Measured: the time from the fault to the first acknowledged write,
acknowledged rows missing afterwards, statements that failed; for switchover the
failed writes and the longest gap between acknowledged writes.

    python -m benchmarks.failover_e2e [--runs 3] [--kinds failover,hang,switchover]
Results: benchmarks/results/failover-e2e-<date>.json and .md (and -latest).
"""

from __future__ import annotations

import argparse
import datetime
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pymysql

from proxy.config.load import build_config, write_config
from proxy.runtime.launcher import ProxyProcess, free_port
from proxy.testing.loadgen import Load, insert_numbered
from proxy.testing.clusters import running_cluster

from .report import save



def _rows(node) -> set:
    with node.connect(database="app") as c, c.cursor() as cur:
        cur.execute("SELECT w, seq FROM acked")
        return set(cur.fetchall())


def _status(cfg: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "proxy", "status", "--json", "--config", cfg], capture_output=True, text=True, timeout=20)
    return json.loads(r.stdout)


def _primary(cfg: str) -> str | None:
    up = [s["name"] for s in _status(cfg)["servers"] if s["role"] == "primary" and s["state"] == "up"]
    return up[0] if len(up) == 1 else None


def one_run(kind: str, tmp: Path) -> dict:
    with running_cluster(tmp / "sandbox", replicas=2, semi_sync=True, port_start=26306) as cl:
        with cl.primary.connect(database="app") as c, c.cursor() as cur:
            cur.execute("CREATE TABLE acked (w INT, seq INT, PRIMARY KEY (w, seq))")
        cl.wait_replicas_caught_up(30)
        port = free_port()
        data = {
            "proxy": {"listen": f"127.0.0.1:{port}", "workers": 2},
            "backends": [{"name": n.name, "host": "127.0.0.1", "port": n.port} for n in cl.nodes],
            "users": [{"name": "app", "password": "app"}],
            "monitor": {"user": "rwproxy", "password": cl.password("rwproxy")},
            "failover": {"replication_user": "repl", "replication_password": cl.password("repl")},
        }
        cfg = str(tmp / "rwproxy.toml")
        write_config(build_config(data, source=cfg), cfg)
        with ProxyProcess(cfg, "127.0.0.1", port, log_path=str(tmp / "rwproxy.log")):
            deadline = time.monotonic() + 15
            while _primary(cfg) != "node1" and time.monotonic() < deadline:
                time.sleep(0.1)
            connect = lambda: pymysql.connect(host="127.0.0.1", port=port, user="app", password="app",  # noqa: E731
                                              database="app", autocommit=True, read_timeout=30)
            with Load(connect, insert_numbered, clients=8, pause=0.005, max_seconds=60) as w:
                time.sleep(1.5)
                t0 = time.monotonic()
                if kind == "failover":
                    cl.primary.kill(signal.SIGKILL)
                elif kind == "hang":
                    cl.primary.kill(signal.SIGSTOP, wait=False)
                else:
                    r = subprocess.run([sys.executable, "-m", "proxy", "switchover", "--to", "node2", "--config", cfg],
                                       capture_output=True, text=True, timeout=60)
                    if r.returncode != 0:
                        raise RuntimeError(r.stdout + r.stderr)
                time.sleep(5.0 if kind == "hang" else 3.0)
            if kind == "hang":
                cl.primary.kill(signal.SIGCONT, wait=False)  # (so that it can be stopped at the end)
            with w.lock:
                after = sorted(t for t, _ in w.ok if t > t0 + 0.005)
                times = sorted(t for t, _ in w.ok)
            acked = {v for _, v in w.ok}
            new = cl.node(_primary(cfg))
            missing = len(acked - _rows(new))
            gaps = [b - a for a, b in zip(times, times[1:]) if a >= t0 - 1]
            return {"kind": kind, "first_ack_after_ms": round((after[0] - t0) * 1000, 1) if after else None,
                    "longest_gap_ms": round(max(gaps) * 1000, 1) if gaps else None,
                    "acknowledged": len(acked), "acknowledged_missing": missing,
                    "failed_statements": len(w.errors), "new_primary": new.name}


def main(argv=None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--kinds", default="failover,hang,switchover")
    args = ap.parse_args(argv)
    kinds = args.kinds.split(",")
    runs = []
    for kind in kinds:
        for i in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="rwp-fo-") as tmp:
                r = one_run(kind, Path(tmp))
            print(json.dumps(r), flush=True)
            runs.append(r)
    med = lambda rs, k: statistics.median(r[k] for r in rs if r[k] is not None)  # noqa: E731
    summary = {}
    for kind in ("failover", "hang"):
        rs = [r for r in runs if r["kind"] == kind]
        if rs:
            summary |= {f"{kind}_first_write_ms_median": med(rs, "first_ack_after_ms"),
                        f"{kind}_first_write_ms_max": max(r["first_ack_after_ms"] for r in rs),
                        f"{kind}_acknowledged_missing": sum(r["acknowledged_missing"] for r in rs),
                        f"{kind}_failed_statements_median": med(rs, "failed_statements")}
    sw = [r for r in runs if r["kind"] == "switchover"]
    if sw:
        summary |= {"switchover_failed_writes": sum(r["failed_statements"] for r in sw),
                    "switchover_longest_gap_ms_median": med(sw, "longest_gap_ms"),
                    "switchover_acknowledged_missing": sum(r["acknowledged_missing"] for r in sw)}
    stamp = datetime.datetime.now()
    result = {"date": stamp.isoformat(timespec="seconds"), "runs": runs, "summary": summary,
              "settings": "defaults (monitor interval 0.1 s, failover.failcount 5, replica_silence 0.6 s, replica_heartbeat_period 0.2 s), semi-sync, 8 writers, 2 workers"}
    md = "\n".join([
        f"# Failover and switchover through rwproxy, {result['date']}",
        "",
        f"{result['settings']}; {args.runs} fresh clusters per scenario; produced by `python -m benchmarks.failover_e2e`.",
        "",
        "| figure | value |",
        "|---|---:|",
        *[line for kind, fault in (("failover", "SIGKILL (crash)"), ("hang", "SIGSTOP (hang)"))
          if f"{kind}_first_write_ms_median" in summary for line in (
            f"| {fault} of the primary -> first acknowledged write through rwproxy (median / max) | "
            f"{summary[f'{kind}_first_write_ms_median']:.0f} ms / {summary[f'{kind}_first_write_ms_max']:.0f} ms |",
            f"| {fault}: acknowledged writes lost (all runs) | {summary[f'{kind}_acknowledged_missing']} |",
            f"| {fault}: statements failed (median per run: in flight at the fault, outcome unknown) | "
            f"{summary[f'{kind}_failed_statements_median']:.0f} |")],
        *([f"| switchover: failed writes (all runs) | {summary['switchover_failed_writes']} |",
           f"| switchover: longest gap between acknowledged writes (median) | {summary['switchover_longest_gap_ms_median']:.0f} ms |",
           f"| switchover: acknowledged writes lost (all runs) | {summary['switchover_acknowledged_missing']} |"]
          if sw else []),
        "",
    ])
    save("failover-e2e", result, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
