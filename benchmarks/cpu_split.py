"""Where the machine's CPU goes per point select: direct vs through rwproxy.

The data-path ratio is not rwproxy's CPU alone: with the proxy in the path, MariaDB and
sysbench also spend more per query on this shared 2-core VM. This run attributes every
CPU second to a process (each mariadbd, sysbench, rwproxy) and counts context switches,
alternating direct and proxied runs (rwproxy with read_write_split = false, so both go to
the primary).

    python -m benchmarks.cpu_split             # 3 rounds of 10 s (~2 minutes)
Results: benchmarks/results/cpu-split-<date>.json and .md (and -latest).
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from proxy.config import build_config, write_config
from proxy.launcher import ProxyProcess, free_port, process_cpu_seconds
from proxy.sandbox.testing import running_cluster

from .report import save
from .run import SB_DB, sysbench

TICK = os.sysconf("SC_CLK_TCK")


def _machine() -> tuple[int, int]:
    """(context switches so far, all CPU jiffies so far) from /proc/stat."""
    with open("/proc/stat") as f:
        lines = f.read().splitlines()
    ctxt = next(int(line.split()[1]) for line in lines if line.startswith("ctxt "))
    return ctxt, sum(int(v) for v in lines[0].split()[1:])


def measure(run, nodes, proxy: ProxyProcess) -> dict:
    """Run `run()` (returns sysbench's result) and attribute CPU per query to each process."""
    db0 = {n.name: process_cpu_seconds(n.pid()) for n in nodes}
    px0 = proxy.cpu_seconds()
    ch0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    m0 = _machine()
    res = run()
    m1 = _machine()
    ch1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    q = res["queries"]
    us = lambda sec: round(sec / q * 1e6, 1)  # noqa: E731
    out = {"qps": res["qps"], "queries": q,
           "mariadbd_us": {n.name: us(process_cpu_seconds(n.pid()) - db0[n.name]) for n in nodes},
           "sysbench_us": us((ch1.ru_utime + ch1.ru_stime) - (ch0.ru_utime + ch0.ru_stime)),
           "rwproxy_us": us(proxy.cpu_seconds() - px0),
           "machine_us": us((m1[1] - m0[1]) / TICK),
           "ctx_switches_per_query": round((m1[0] - m0[0]) / q, 2)}
    return out


def main(argv=None) -> int:
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--time", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=32)
    args = ap.parse_args(argv)
    tables, size = 4, 10000
    rounds = []
    with tempfile.TemporaryDirectory(prefix="rwp-cpu-") as tmp, running_cluster(Path(tmp) / "sandbox", replicas=2, port_start=25406) as cluster:
        with cluster.primary.connect() as c, c.cursor() as cur:
            cur.execute(f"CREATE DATABASE IF NOT EXISTS {SB_DB}")
            cur.execute(f"GRANT ALL ON {SB_DB}.* TO 'app'@'%'")
        primary = cluster.primary.port
        sysbench("oltp_point_select", "127.0.0.1", primary, 4, 0, tables, size, action="prepare")
        cluster.wait_replicas_caught_up(60)
        port = free_port()
        data = {"proxy": {"listen": f"127.0.0.1:{port}"},
                "backends": [{"name": n.name, "host": "127.0.0.1", "port": n.port} for n in cluster.nodes],
                "users": [{"name": "app", "password": "app"}],
                "monitor": {"user": "rwproxy", "password": "rwproxy"},
                "routing": {"read_write_split": False}}
        cfg = str(Path(tmp) / "rwproxy.toml")
        write_config(build_config(data, source=cfg), cfg)
        proxy = ProxyProcess(cfg, "127.0.0.1", port, log_path=str(Path(tmp) / "rwproxy.log")).start()
        try:
            time.sleep(1.0)
            for r in range(args.rounds):
                pair = {}
                for ep in (["direct", "proxy"] if r % 2 == 0 else ["proxy", "direct"]):
                    target = primary if ep == "direct" else port
                    pair[ep] = measure(lambda: sysbench("oltp_point_select", "127.0.0.1", target, args.threads,
                                                        args.time, tables, size), cluster.nodes, proxy)
                    print(f"round {r + 1} {ep:6s} {pair[ep]}", flush=True)
                rounds.append(pair)
        finally:
            proxy.stop()
        primary_name = cluster.primary.name

    def med(ep, key, sub=None):
        return round(statistics.median((p[ep][key][sub] if sub else p[ep][key]) for p in rounds), 1)

    rows = [("QPS", "qps", None), (f"mariadbd ({primary_name}) µs/query", "mariadbd_us", primary_name),
            ("sysbench µs/query", "sysbench_us", None), ("rwproxy µs/query", "rwproxy_us", None),
            ("whole machine µs/query", "machine_us", None), ("context switches/query", "ctx_switches_per_query", None)]
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "threads": args.threads,
              "seconds": args.time, "rounds": rounds,
              "median": {ep: {key if not sub else f"{key}:{sub}": med(ep, key, sub) for _, key, sub in rows}
                         for ep in ("direct", "proxy")}}
    lines = [f"# Where the CPU goes per point select, {result['date']}", "",
             f"sysbench oltp_point_select, {args.threads} threads, {args.rounds} alternating rounds of {args.time:.0f} s; "
             "rwproxy with read_write_split = false (both sides query the primary), 2 workers. Medians.", "",
             "| per query | direct | through rwproxy | proxy / direct |", "|---|---:|---:|---:|"]
    for label, key, sub in rows:
        d, p = med("direct", key, sub), med("proxy", key, sub)
        lines.append(f"| {label} | {d} | {p} | {p / d:.2f} |" if d else f"| {label} | {d} | {p} | |")
    lines.append("")
    save("cpu-split", result, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
