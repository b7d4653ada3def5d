"""Issue 21's figures: what the operator surface costs.

- stats: the data path with [stats] on (digests, histograms, per-server counters: the default)
  against off, sysbench oltp_point_select in the default read/write-splitting configuration,
  direct to the primary in the same rotating rounds; proxy CPU per query is the figure.
- scrape: how long /metrics and an admin-port query take with 10,000 digests and 1,000 sessions.
- reload: `rwproxy reload` with 1,000 idle sessions: time to apply, and how many sessions survived.
- idle: the supervisor's CPU with no clients (monitor, heartbeats), then with a scrape a second.

    python -m benchmarks.operator_figures            # all four, ~4 minutes
    python -m benchmarks.operator_figures --only stats --rounds 5
Results: benchmarks/results/issue21-operator-<date>.{json,md} (and -latest).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path

import pymysql

from proxy.config.load import build_config, write_config
from proxy.runtime.launcher import ProxyProcess, free_port, process_cpu_seconds
from proxy.testing.clusters import running_cluster

from .cpu_split import measure
from .report import save
from .run import SB_DB, round_order, sysbench

ADMIN_PW = "bench-admin"


def _proxy(tmp: Path, cluster, name: str, **sections) -> ProxyProcess:
    port = free_port()
    data = {"proxy": {"listen": f"127.0.0.1:{port}", "workers": 2},
            "backends": [{"name": n.name, "host": "127.0.0.1", "port": n.port} for n in cluster.nodes],
            "users": [{"name": "app", "password": "app"}],
            "monitor": {"user": "rwproxy", "password": cluster.password("rwproxy")}, **sections}
    cfg = str(tmp / f"{name}.toml")
    write_config(build_config(data, source=cfg), cfg)
    return ProxyProcess(cfg, "127.0.0.1", port, log_path=str(tmp / f"{name}.log")).start()


def _progress(text: str) -> None:
    print(text, flush=True)


def stats_ab(tmp: Path, cluster, rounds: int, seconds: float, threads: int) -> dict:
    tables, size = 4, 10000
    primary = cluster.primary.port
    proxies = {"stats on": _proxy(tmp, cluster, "stats-on"),
               "stats off": _proxy(tmp, cluster, "stats-off", stats={"enabled": False})}
    eps = ["direct", "stats on", "stats off"]
    got_rounds = []
    try:
        time.sleep(2.0)
        for r in range(rounds):
            got = {}
            for ep in round_order(eps, r):
                proxy = proxies.get(ep)
                target = proxy.port if proxy else primary
                got[ep] = measure(lambda: sysbench("oltp_point_select", "127.0.0.1", target, threads, seconds,
                                                   tables, size), cluster.nodes, proxy)
                if got[ep]["errors"]:
                    raise RuntimeError(f"{ep}: sysbench reported {got[ep]['errors']} errors")
                _progress(f"stats: round {r + 1}/{rounds} {ep:9s} {got[ep]['qps']:.0f} QPS, "
                          f"proxy {got[ep]['proxy_us']} µs/query")
            got_rounds.append(got)
    finally:
        for p in proxies.values():
            p.stop()
    diffs = [g["stats on"]["proxy_us"] - g["stats off"]["proxy_us"] for g in got_rounds]
    return {"rounds": got_rounds, "threads": threads, "seconds": seconds,
            "ratio": {ep: round(statistics.median(g[ep]["qps"] / g["direct"]["qps"] for g in got_rounds), 2)
                      for ep in eps},
            "proxy_us": {ep: round(statistics.median(g[ep]["proxy_us"] for g in got_rounds), 1) for ep in eps[1:]},
            "direct_qps": round(statistics.median(g["direct"]["qps"] for g in got_rounds)),
            "stats_cost_us": round(statistics.median(diffs), 1), "stats_cost_us_rounds": [round(d, 1) for d in diffs]}


@contextlib.contextmanager
def _serving(tmp: Path, cluster, name: str, sessions: int = 0, **sections):
    """(a started rwproxy, `sessions` idle autocommit sessions on it); all closed and stopped after."""
    p = _proxy(tmp, cluster, name, **sections)
    conns: list = []
    try:
        for i in range(sessions):
            conns.append(pymysql.connect(host="127.0.0.1", port=p.port, user="app", password="app", database=SB_DB,
                                         autocommit=True))
            if (i + 1) % 250 == 0:
                _progress(f"  {i + 1}/{sessions} sessions open")
        yield p, conns
    finally:
        for c in conns:
            c.close()
        p.stop()


def _timed(fn, n: int) -> dict:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {"median_ms": round(statistics.median(times), 1), "p90_ms": round(times[int(0.9 * (len(times) - 1))], 1),
            "max_ms": round(times[-1], 1), "n": n}


def scrape(tmp: Path, cluster, sessions: int, digests: int) -> dict:
    mport, aport = free_port(), free_port()
    with _serving(tmp, cluster, "scrape", sessions, metrics={"listen": f"127.0.0.1:{mport}"},
                  admin={"listen": f"127.0.0.1:{aport}", "users": [{"name": "admin", "password": ADMIN_PW}]},
                  stats={"max_digests": digests}) as (p, conns):  # per worker: the 10,000 all stay, none evicted
        per = max(1, digests // len(conns))
        done = 0
        for c in conns:
            with c.cursor() as cur:
                for _ in range(per):  # distinct shapes: a digest each (literals alone would share one)
                    cur.execute(f"SELECT 1 AS c{done}")
                    done += 1
            if done % 2500 < per:
                _progress(f"  {done}/{digests} distinct statements")
        url = f"http://127.0.0.1:{mport}/metrics"
        body = urllib.request.urlopen(url, timeout=30).read()
        a = pymysql.connect(host="127.0.0.1", port=aport, user="admin", password=ADMIN_PW)
        with a.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM digests")
            kept = cur.fetchone()[0]
            cur.execute("SELECT COUNT(*) FROM sessions")
            nsess = cur.fetchone()[0]

        def slowest():
            with a.cursor() as cur:
                cur.execute("SELECT digest_text, count, p99_ms FROM digests ORDER BY total_ms DESC LIMIT 10")
                cur.fetchall()

        out = {"sessions": nsess, "digests": kept, "metrics_bytes": len(body),
               "metrics": _timed(lambda: urllib.request.urlopen(url, timeout=30).read(), 30),
               "admin_slowest_query": _timed(slowest, 10)}
        a.close()
        _progress(f"scrape: {out}")
        return out


def reload(tmp: Path, cluster, sessions: int) -> dict:
    with _serving(tmp, cluster, "reload", sessions) as (p, conns):
        path = Path(p.config_path)
        data = tomllib.loads(path.read_text())
        data["backends"][1]["weight"] = 3
        data["users"].append({"name": "reload_bench", "password": "x"})
        data.setdefault("routing", {})["rules"] = [{"match": "^SELECT 'never'", "route": "primary"}]
        path.write_text(build_config(data).to_toml())
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "proxy", "reload", "--config", str(path)], capture_output=True,
                           text=True, timeout=120)
        cli_ms = (time.perf_counter() - t0) * 1000
        if r.returncode:
            raise RuntimeError(r.stdout + r.stderr)
        st = json.loads(subprocess.run([sys.executable, "-m", "proxy", "status", "--json", "--config", str(path)],
                                       capture_output=True, text=True, timeout=120).stdout)
        dropped = 0
        for c in conns:
            try:
                with c.cursor() as cur:
                    cur.execute("SELECT 1")
                    cur.fetchall()
            except pymysql.MySQLError:
                dropped += 1
        apply_ms = next((float(x.split("in ")[1].split(" ms")[0]) for x in p.log_tail(20).splitlines()
                         if "config reloaded" in x), None)
        out = {"sessions": sessions, "dropped": dropped, "apply_ms": apply_ms, "cli_ms": round(cli_ms),
               "sessions_seen_after": st.get("clients")}
        _progress(f"reload: {out}")
        return out


def idle(tmp: Path, cluster, seconds: float) -> dict:
    mport = free_port()
    with _serving(tmp, cluster, "idle", metrics={"listen": f"127.0.0.1:{mport}"},
                  admin={"listen": f"127.0.0.1:{free_port()}", "users": [{"name": "admin", "password": ADMIN_PW}]}) as (p, _):
        time.sleep(3.0)
        sup = p.pid

        def ms_per_s(fn):
            c0, w0, t0 = process_cpu_seconds(sup), p.cpu_seconds(), time.monotonic()
            fn()
            dt = time.monotonic() - t0
            return (round((process_cpu_seconds(sup) - c0) / dt * 1000, 1),
                    round((p.cpu_seconds() - w0) / dt * 1000, 1))

        quiet = ms_per_s(lambda: time.sleep(seconds))

        def scraping():
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read()
                time.sleep(1.0)
        scraped = ms_per_s(scraping)
        out = {"seconds": seconds, "control_plane_ms_per_s": quiet[0], "all_processes_ms_per_s": quiet[1],
               "scraped_1s_control_plane_ms_per_s": scraped[0], "scraped_1s_all_ms_per_s": scraped[1]}
        _progress(f"idle: {out}")
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="stats,scrape,reload,idle")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--time", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--digests", type=int, default=10000)
    args = ap.parse_args(argv)
    parts = args.only.split(",")
    result: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds")}
    with tempfile.TemporaryDirectory(prefix="rwp-op-") as d, \
            running_cluster(Path(d) / "sandbox", replicas=2, port_start=25506) as cluster:
        tmp = Path(d)
        with cluster.primary.connect() as c, c.cursor() as cur:
            cur.execute(f"CREATE DATABASE IF NOT EXISTS {SB_DB}")
            cur.execute(f"GRANT ALL ON {SB_DB}.* TO 'app'@'%'")
        if "stats" in parts:
            sysbench("oltp_point_select", "127.0.0.1", cluster.primary.port, 4, 0, 4, 10000, action="prepare")
            cluster.wait_replicas_caught_up(60)
            result["stats"] = stats_ab(tmp, cluster, args.rounds, args.time, args.threads)
        if "scrape" in parts:
            result["scrape"] = scrape(tmp, cluster, args.sessions, args.digests)
        if "reload" in parts:
            result["reload"] = reload(tmp, cluster, args.sessions)
        if "idle" in parts:
            result["idle"] = idle(tmp, cluster, 20.0)
    save("issue21-operator", result, report(result))
    return 0


def report(r: dict) -> str:
    lines = [f"# Issue 21: what the operator surface costs, {r['date']}", ""]
    if "stats" in r:
        s = r["stats"]
        lines += ["## Statistics on the data path", "",
                  f"sysbench oltp_point_select, {s['threads']} threads, prepared statements, default configuration "
                  f"(read/write split: the reads go to the 2 replicas), 2 workers, {len(s['rounds'])} rounds of "
                  f"{s['seconds']:.0f} s in rotating order; direct = to the primary, {s['direct_qps']} QPS (median).", "",
                  "| endpoint | QPS / direct | rwproxy CPU µs per query |", "|---|---:|---:|",
                  "| direct | 1.00 | - |",
                  f"| rwproxy, [stats] on (default) | {s['ratio']['stats on']:.2f} | {s['proxy_us']['stats on']} |",
                  f"| rwproxy, [stats] enabled = false | {s['ratio']['stats off']:.2f} | {s['proxy_us']['stats off']} |",
                  "", f"Statistics cost **{s['stats_cost_us']} µs of proxy CPU per point select** (median of the "
                  f"per-round differences {s['stats_cost_us_rounds']}; the budget was 2 µs).", ""]
    if "scrape" in r:
        s = r["scrape"]
        lines += ["## Scrape and admin query under 10,000 digests and 1,000 sessions", "",
                  f"{s['sessions']} client sessions open, {s['digests']} digest rows kept, /metrics body "
                  f"{s['metrics_bytes']} bytes.", "", "| request | median | p90 | max | n |", "|---|---:|---:|---:|---:|",
                  f"| GET /metrics | {s['metrics']['median_ms']} ms | {s['metrics']['p90_ms']} ms | "
                  f"{s['metrics']['max_ms']} ms | {s['metrics']['n']} |",
                  f"| admin: 10 slowest digests (ORDER BY total_ms) | {s['admin_slowest_query']['median_ms']} ms | "
                  f"{s['admin_slowest_query']['p90_ms']} ms | {s['admin_slowest_query']['max_ms']} ms | "
                  f"{s['admin_slowest_query']['n']} |", ""]
    if "reload" in r:
        s = r["reload"]
        lines += ["## Reload with idle sessions", "",
                  f"`rwproxy reload` (a backend reweighted, a user and a rule added) with {s['sessions']} idle "
                  f"sessions: applied in **{s['apply_ms']} ms** (control plane to both workers), the CLI command took "
                  f"{s['cli_ms']} ms end to end; **{s['dropped']} sessions dropped** (each ran a statement after).", ""]
    if "idle" in r:
        s = r["idle"]
        lines += ["## Idle CPU", "",
                  f"No clients, monitor and heartbeats at their defaults (checks every 100 ms, heartbeat every 250 ms, "
                  f"3 servers), over {s['seconds']:.0f} s:", "", "| | control plane | all rwproxy processes |",
                  "|---|---:|---:|",
                  f"| idle | {s['control_plane_ms_per_s']} ms/s | {s['all_processes_ms_per_s']} ms/s |",
                  f"| scraped every second | {s['scraped_1s_control_plane_ms_per_s']} ms/s | "
                  f"{s['scraped_1s_all_ms_per_s']} ms/s |", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
