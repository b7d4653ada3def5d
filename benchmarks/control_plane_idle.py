"""The control plane's CPU with no clients (issue 22): monitor checks, heartbeats, publishing.

rwproxy with the default configuration (3-server sandbox, interval 100 ms, heartbeat every
250 ms, calm servers checked on events: cluster/monitor/cadence.py) sits idle; the supervisor
process's CPU is read from /proc per thread, so the figure says where it goes (the monitor's
loop, the publisher, the admin/metrics loop). Then each of --sides ([monitor] settings, e.g.
steady_checks=false: every server on the 100 ms tick) once, as side notes.

    python -m benchmarks.control_plane_idle                  # ~4 minutes
    python -m benchmarks.control_plane_idle --against REV    # this tree and git revision REV, alternating

The default configuration is measured --rounds times (alternating with REV's when given: the
machine's background drifts by a third between minutes, so only rounds side by side compare);
the medians are the figures.
Results: benchmarks/results/control-plane-idle-<date>.{json,md} (and -latest).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from proxy.config.load import build_config
from proxy.runtime.launcher import ProxyProcess, free_port
from proxy.testing.clusters import running_cluster

from .report import save


def _threads(pid: int) -> dict[str, int]:
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        out[t] = int(fields[11]) + int(fields[12])
    return out


def measure(tmp: str, cluster, seconds: float, monitor: dict, source: str | None = None) -> dict:
    port = free_port()
    data = {"proxy": {"listen": f"127.0.0.1:{port}", "workers": 2},
            "backends": [{"name": n.name, "host": "127.0.0.1", "port": n.port} for n in cluster.nodes],
            "users": [{"name": "app", "password": "app"}],
            "monitor": {"user": "rwproxy", "password": cluster.password("rwproxy"), **monitor}}
    path = str(Path(tmp) / f"rwproxy-{port}.toml")
    build_config(data, source=path)  # (validated by this tree)
    # only the keys given: another revision (--against) may not know this tree's newer keys
    Path(path).write_text(_toml(data))
    p = ProxyProcess(path, "127.0.0.1", port, log_path=str(Path(tmp) / f"rwproxy-{port}.log"), source=source).start()
    try:
        time.sleep(3.0)
        tck = os.sysconf("SC_CLK_TCK")
        a, all0, t0 = _threads(p.pid), p.cpu_seconds(), time.monotonic()
        time.sleep(seconds)
        b, all1, dt = _threads(p.pid), p.cpu_seconds(), time.monotonic() - t0
        per = sorted((round((b[t] - a.get(t, 0)) / tck / dt * 1000, 2) for t in b), reverse=True)
        return {"monitor": monitor, "seconds": round(dt, 1),
                "control_plane_ms_per_s": round(sum(per), 1),
                "all_processes_ms_per_s": round((all1 - all0) / dt * 1000, 1),
                "threads_ms_per_s": [x for x in per if x > 0]}
    finally:
        p.stop()


def floor(cluster, seconds: float) -> dict:
    """The floor under any monitor at the default interval: the monitor's own client (wire.py) on
    one event loop sending the check query to each server every 100 ms, and nothing else (no
    decisions, lag, heartbeats or publishing); the CPU of that one thread."""
    import asyncio
    import threading

    import uvloop

    from proxy.cluster.monitor import wire
    from proxy.cluster.monitor.checker import Monitor

    cfg = build_config({"proxy": {"listen": "127.0.0.1:1"},
                        "backends": [{"name": n.name, "host": "127.0.0.1", "port": n.port} for n in cluster.nodes],
                        "users": [{"name": "app", "password": "app"}],
                        "monitor": {"user": "rwproxy", "password": cluster.password("rwproxy")}}, source="floor")
    out: dict = {}

    async def run() -> None:
        conns = [await wire.connect(cfg, b, "rwproxy", cluster.password("rwproxy"), 2.0, 2.0) for b in cfg.backends]
        epoch = time.monotonic()

        async def ticks(c) -> None:
            k = 0
            while True:
                await c.query(Monitor._CHECK)
                k += 1
                await asyncio.sleep(max(0.0, epoch + k * 0.1 - time.monotonic()))
        tasks = [asyncio.ensure_future(ticks(c)) for c in conns]
        await asyncio.sleep(2.0)
        c0, t0 = time.thread_time(), time.monotonic()
        await asyncio.sleep(seconds)
        out["ms_per_s"] = round((time.thread_time() - c0) / (time.monotonic() - t0) * 1000, 1)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in conns:
            c.close()

    t = threading.Thread(target=lambda: uvloop.run(run()))
    t.start()
    t.join()
    return {"checks_per_s": 10 * len(cfg.backends), **out}


def _toml(data: dict) -> str:
    def value(v) -> str:
        return str(v).lower() if isinstance(v, bool) else json.dumps(v)
    out = []
    for section, body in data.items():
        for table in body if isinstance(body, list) else [body]:
            out.append(f"[[{section}]]" if isinstance(body, list) else f"[{section}]")
            out += [f"{k} = {value(v)}" for k, v in table.items()]
    return "\n".join(out) + "\n"


def _setting(text: str) -> dict:
    key, _, value = text.partition("=")
    return {key.strip(): value.strip() == "true" if value.strip() in ("true", "false") else float(value)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--sides", default="steady_checks=false,interval=0.25",
                    help="[monitor] settings measured once each as side notes (key=value, comma-separated)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--against", default="", help="a git revision to measure in the same rounds")
    args = ap.parse_args(argv)
    runs, rounds = [], {"this tree": []}
    with tempfile.TemporaryDirectory(prefix="rwp-cp-") as tmp, running_cluster(
            Path(tmp) / "sandbox", replicas=2, port_start=26006) as cluster:
        trees = {"this tree": None}
        if args.against:
            src = Path(tmp) / "against"
            src.mkdir()
            archive = subprocess.run(["git", "archive", args.against], check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
            trees[args.against] = str(src)
            rounds[args.against] = []
        for r in range(args.rounds):
            for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
                print(f"round {r + 1}/{args.rounds}, {name}, defaults: {args.seconds:g} s ...", file=sys.stderr, flush=True)
                rounds[name].append(measure(tmp, cluster, args.seconds, {}, trees[name]))
                print(f"  {rounds[name][-1]}", file=sys.stderr, flush=True)
        print(f"the floor: bare check queries, {args.seconds:g} s ...", file=sys.stderr, flush=True)
        bare = floor(cluster, args.seconds)
        print(f"  {bare}", file=sys.stderr, flush=True)
        for monitor in [_setting(x) for x in args.sides.split(",") if x]:
            print(f"idle, monitor {monitor}: {args.seconds:g} s ...", file=sys.stderr, flush=True)
            runs.append(measure(tmp, cluster, args.seconds, monitor))
            print(f"  {runs[-1]}", file=sys.stderr, flush=True)
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "rounds": rounds, "runs": runs,
              "floor": bare,
              "median": {name: {k: statistics.median(x[k] for x in rs)
                                for k in ("control_plane_ms_per_s", "all_processes_ms_per_s")}
                         for name, rs in rounds.items()}}
    save("control-plane-idle", result, report(result))
    return 0


def report(r: dict) -> str:
    lines = [f"# The control plane at idle, {r['date']}", "",
             "rwproxy, 2 workers, 3-server sandbox (a primary, 2 replicas), no clients; CPU of the supervisor process "
             "(monitor, heartbeat, publishing, admin/metrics loop) read per thread from /proc (10 ms ticks). "
             "Produced by `python -m benchmarks.control_plane_idle`.", "",
             "The default configuration (interval 0.1, heartbeat 0.25, steady_checks: calm servers checked on events), "
             "alternating rounds; medians:", "",
             "| code | control plane ms/s | all rwproxy processes ms/s | rounds (control plane) | busiest threads ms/s, first round |",
             "|---|---:|---:|---|---|"]
    for name, rs in r["rounds"].items():
        med = r["median"][name]
        lines.append(f"| {name} | {med['control_plane_ms_per_s']:.1f} | {med['all_processes_ms_per_s']:.1f} | "
                     f"{' / '.join(str(x['control_plane_ms_per_s']) for x in rs)} | "
                     f"{' / '.join(str(t) for t in rs[0]['threads_ms_per_s'][:6])} |")
    f = r["floor"]
    lines += ["", f"The floor: the monitor's client alone sending the check query to each server every 100 ms "
                  f"({f['checks_per_s']} a second) on one event loop, nothing else: **{f['ms_per_s']} ms/s**.",
              "", "Side notes, one run each:", "",
              "| [monitor] | control plane ms/s | all rwproxy processes ms/s | busiest threads ms/s |",
              "|---|---:|---:|---|"]
    for x in r["runs"]:
        m = ", ".join(f"{k} = {str(v).lower() if isinstance(v, bool) else f'{v:g}'}" for k, v in x["monitor"].items())
        lines.append(f"| {m} | {x['control_plane_ms_per_s']} | {x['all_processes_ms_per_s']} | "
                     f"{' / '.join(str(t) for t in x['threads_ms_per_s'][:6])} |")
    return "\n".join(lines + [""])


if __name__ == "__main__":
    sys.exit(main())
