"""Where the machine's CPU goes per point select: direct vs through a proxy.

The data-path ratio is not the proxy's CPU alone: with a proxy in the path, MariaDB and
sysbench also spend more per query on this shared 2-core VM. This run attributes every
CPU second to a process (each mariadbd, sysbench, the proxy) and counts context switches,
alternating direct and proxied runs in rotating order. Endpoints: direct (the primary),
rwproxy (read_write_split = false, so everything goes to the primary too), forwarder (the
bare one-connection-per-client forwarder), pipelined (the forwarder multiplexing every
worker's clients onto --pipeline connections, commands pipelined; text protocol only).

    python -m benchmarks.cpu_split             # direct and rwproxy, 3 rounds of 10 s (~2 minutes)
    python -m benchmarks.cpu_split --endpoints direct,rwproxy,forwarder,pipelined --ps-mode disable --tag pipeline
Results: benchmarks/results/<tag>-<date>.json and .md (and -latest); tag defaults to cpu-split.
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

from proxy.config.load import build_config, write_config
from proxy.runtime.launcher import ProxyProcess, free_port, process_cpu_seconds
from proxy.testing.clusters import running_cluster

from .forwarder import ForwarderProcess
from .report import save
from .run import SB_DB, round_order, sysbench

TICK = os.sysconf("SC_CLK_TCK")


def _machine() -> tuple[int, int]:
    """(context switches so far, all CPU jiffies so far) from /proc/stat."""
    with open("/proc/stat") as f:
        lines = f.read().splitlines()
    ctxt = next(int(line.split()[1]) for line in lines if line.startswith("ctxt "))
    return ctxt, sum(int(v) for v in lines[0].split()[1:])


def measure(run, nodes, proxy: ProxyProcess | None) -> dict:
    """Run `run()` (returns sysbench's result) and attribute CPU per query to each process."""
    db0 = {n.name: process_cpu_seconds(n.pid()) for n in nodes}
    px0 = proxy.cpu_seconds() if proxy else 0.0
    ch0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    m0 = _machine()
    res = run()
    m1 = _machine()
    ch1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    q = res["queries"]
    us = lambda sec: round(sec / q * 1e6, 1)  # noqa: E731
    out = {"qps": res["qps"], "queries": q, "errors": res["errors"],
           "mariadbd_us": {n.name: us(process_cpu_seconds(n.pid()) - db0[n.name]) for n in nodes},
           "sysbench_us": us((ch1.ru_utime + ch1.ru_stime) - (ch0.ru_utime + ch0.ru_stime)),
           "proxy_us": us(proxy.cpu_seconds() - px0) if proxy else 0.0,
           "machine_us": us((m1[1] - m0[1]) / TICK),
           "ctx_switches_per_query": round((m1[0] - m0[0]) / q, 2)}
    return out


ENDPOINTS = {"direct": "sysbench to the primary",
             "rwproxy": "rwproxy, read_write_split = false (everything to the primary), 2 workers",
             "forwarder": "benchmarks/forwarder.py: bare uvloop forwarder, one backend connection per client, 2 workers",
             "pipelined": "benchmarks/forwarder.py --pipeline {m}: each worker's clients multiplexed onto {m} backend "
                          "connections, commands pipelined (text protocol only), 2 workers"}


def main(argv=None) -> int:
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--time", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--endpoints", default="direct,rwproxy", help=f"comma-separated, from {', '.join(ENDPOINTS)}")
    ap.add_argument("--ps-mode", choices=("auto", "disable"), default="auto",
                    help="sysbench --db-ps-mode: auto = prepared statements, disable = plain queries")
    ap.add_argument("--pipeline", type=int, default=2, help="backend connections per worker for 'pipelined'")
    ap.add_argument("--tag", default="cpu-split")
    args = ap.parse_args(argv)
    eps = args.endpoints.split(",")
    unknown = [e for e in eps if e not in ENDPOINTS]
    if unknown or "direct" not in eps:
        ap.error(f"--endpoints: need direct plus any of {', '.join(ENDPOINTS)} (got {args.endpoints})")
    if "pipelined" in eps and args.ps_mode != "disable":
        ap.error("the pipelined forwarder relays the text protocol only: add --ps-mode disable")
    tables, size, workers = 4, 10000, 2
    rounds = []
    with tempfile.TemporaryDirectory(prefix="rwp-cpu-") as tmp, running_cluster(Path(tmp) / "sandbox", replicas=2, port_start=25406) as cluster:
        with cluster.primary.connect() as c, c.cursor() as cur:
            cur.execute(f"CREATE DATABASE IF NOT EXISTS {SB_DB}")
            cur.execute(f"GRANT ALL ON {SB_DB}.* TO 'app'@'%'")
        primary = cluster.primary.port
        sysbench("oltp_point_select", "127.0.0.1", primary, 4, 0, tables, size, action="prepare")
        cluster.wait_replicas_caught_up(60)
        proxies: dict[str, ProxyProcess] = {}
        try:
            for ep in eps:
                port, log_path = free_port(), str(Path(tmp) / f"{ep}.log")
                if ep == "rwproxy":
                    data = {"proxy": {"listen": f"127.0.0.1:{port}", "workers": workers},
                            "backends": [{"name": n.name, "host": "127.0.0.1", "port": n.port} for n in cluster.nodes],
                            "users": [{"name": "app", "password": "app"}],
                            "monitor": {"user": "rwproxy", "password": cluster.password("rwproxy")},
                            "routing": {"read_write_split": False}}
                    cfg = str(Path(tmp) / "rwproxy.toml")
                    write_config(build_config(data, source=cfg), cfg)
                    proxies[ep] = ProxyProcess(cfg, "127.0.0.1", port, log_path=log_path).start()
                elif ep != "direct":
                    proxies[ep] = ForwarderProcess(port, primary, workers, log_path,
                                                   pipeline=args.pipeline if ep == "pipelined" else 0).start()
            time.sleep(1.0)
            for r in range(args.rounds):
                got = {}
                for ep in round_order(eps, r):
                    proxy = proxies.get(ep)
                    target = proxy.port if proxy else primary
                    got[ep] = measure(lambda: sysbench("oltp_point_select", "127.0.0.1", target, args.threads, args.time,
                                                       tables, size, ps_mode=args.ps_mode), cluster.nodes, proxy)
                    if got[ep]["errors"]:
                        raise RuntimeError(f"{ep}: sysbench reported {got[ep]['errors']} errors")
                    print(f"round {r + 1} {ep:9s} {got[ep]}", flush=True)
                rounds.append(got)
        finally:
            for proxy in proxies.values():
                proxy.stop()
        primary_name = cluster.primary.name

    def med(ep, key, sub=None):
        return round(statistics.median((p[ep][key][sub] if sub else p[ep][key]) for p in rounds), 1)

    ratio = {ep: round(statistics.median(p[ep]["qps"] / p["direct"]["qps"] for p in rounds), 2) for ep in eps}
    rows = [("QPS", "qps", None), (f"mariadbd ({primary_name}) µs/query", "mariadbd_us", primary_name),
            ("sysbench µs/query", "sysbench_us", None), ("proxy µs/query", "proxy_us", None),
            ("whole machine µs/query", "machine_us", None), ("context switches/query", "ctx_switches_per_query", None)]
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "threads": args.threads,
              "seconds": args.time, "ps_mode": args.ps_mode, "pipeline": args.pipeline,
              "endpoints": {ep: ENDPOINTS[ep].format(m=args.pipeline) for ep in eps}, "rounds": rounds, "ratio": ratio,
              "median": {ep: {key if not sub else f"{key}:{sub}": med(ep, key, sub) for _, key, sub in rows} for ep in eps}}
    protocol = "prepared statements (--db-ps-mode=auto)" if args.ps_mode == "auto" else "plain queries (--db-ps-mode=disable)"
    lines = [f"# Where the CPU goes per point select, {result['date']}", "",
             f"sysbench oltp_point_select, {args.threads} threads, {protocol}, {args.rounds} rounds of {args.time:.0f} s, "
             "endpoints in rotating order. Medians; the ratio is the median of per-round QPS / direct QPS.", ""]
    lines += [f"- **{ep}**: {result['endpoints'][ep]}" for ep in eps]
    lines += ["", "| per query | " + " | ".join(eps) + " |", "|---|" + "---:|" * len(eps)]
    lines.append("| QPS / direct | " + " | ".join(f"{ratio[ep]:.2f}" for ep in eps) + " |")
    for label, key, sub in rows:
        lines.append(f"| {label} | " + " | ".join(str(med(ep, key, sub)) for ep in eps) + " |")
    lines.append("")
    save(args.tag, result, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
