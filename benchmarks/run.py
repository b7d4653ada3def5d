"""Data-path benchmark: sysbench directly against the primary vs through rwproxy.

Starts its own sandbox cluster and one proxy per mode (rwproxy in several
routing set-ups, and a bare forwarder as the floor for any Python proxy), and
in every round runs direct and each mode in turn (each one first, and after each
other one, equally often: round_order), each run starting once the replicas have
applied every earlier write, so drift
on this shared 2-core machine hits all of them alike; reports medians of
per-round ratios. Also measures the CPU for a 1,000-row result (alternating
the same way) and rwproxy's memory per idle client.

    python -m benchmarks.run               # full run (~16 minutes)
    python -m benchmarks.run --quick       # smoke run (~3 minutes)
Results: benchmarks/results/dataplane-<date>.json and .md (and *-latest.*).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pymysql

from proxy.config.emit import toml_value
from proxy.config.load import build_config
from proxy.runtime.launcher import ProxyProcess, free_port
from proxy.protocol.scan import Scanner
from proxy.testing.rawclient import RawClient
from proxy.testing.clusters import running_cluster

from .forwarder import ForwarderProcess
from .haproxy import HAProxyProcess
from .report import save

SB_DB = "sbtest"


MODE_NAMES = {"primary": "read_write_split = false (every statement to the primary, as in the direct runs)",
              "primary-pinned": "as primary, with cpu_affinity = \"spread\" (each worker on its own CPU)",
              "split": "read/write split, read_your_writes = session (autocommit reads on the replicas)",
              "split-batch": "as split, with [proxy] scheduling = \"batch\" (workers under SCHED_BATCH instead of "
                             "the default SCHED_OTHER)",
              "split-one": "as split, with the last replica left out of rwproxy's [[backends]] (every read on one "
                           "replica: the split mode's code path without spreading reads over two servers)",
              "primary-unix": "as primary, but rwproxy reaches the servers through their Unix sockets "
                              "([[backends]] socket; sysbench still uses TCP to rwproxy and in the direct runs)",
              "primary-tls": "as primary, with TLS from rwproxy to the servers ([backend_tls] mode = verify_identity; "
                             "the sandbox's servers then accept TLS, which sysbench and the direct runs do not use)",
              "primary-16k": "as primary, with [pool] backend_net_buffer = 0 (the servers write results in their "
                             "own 16 KB net_buffer_length chunks, as to the forwarder and the direct runs)",
              "split-256k": "as split, with [pool] backend_net_buffer = 262144 (results up to 256 KiB leave the "
                            "server in one write, against 128 KiB by default)",
              "split-socket": "as split, but sysbench connects to rwproxy through its Unix socket ([proxy] socket) "
                              "instead of TCP; the direct runs still use TCP to the primary",
              "haproxy": "peer, not rwproxy: HAProxy in TCP mode to the primary, as many threads as rwproxy has "
                         "workers (benchmarks/haproxy.py)",
              "forwarder": "reference, not rwproxy: benchmarks/forwarder.py, a bare uvloop TCP forwarder to the primary "
                           "(same worker count, no parsing, routing or pools): the floor for any Python proxy here"}
MODE_TESTS = {"primary": ["oltp_point_select", "oltp_read_only", "oltp_update_non_index"],
              "primary-pinned": ["oltp_point_select", "oltp_read_only"],
              "split": ["oltp_point_select", "oltp_read_only_skip_trx", "oltp_update_non_index"],
              "split-one": ["oltp_point_select", "oltp_read_only_skip_trx"],
              "split-batch": ["oltp_point_select", "oltp_read_only_skip_trx", "oltp_update_non_index"],
              "primary-unix": ["oltp_point_select"],
              "primary-tls": ["oltp_point_select"],
              "primary-16k": ["oltp_point_select"],
              "split-256k": ["oltp_point_select"],
              "split-socket": ["oltp_point_select"],
              "haproxy": ["oltp_point_select", "oltp_update_non_index"],
              "forwarder": ["oltp_point_select", "oltp_update_non_index"]}
BIG_RESULT_MODES = ("split", "split-batch", "split-256k", "primary", "primary-pinned", "primary-tls", "primary-16k", "haproxy", "forwarder")  # 1,000-row figure measured in these
BEFORE = "@before"  # a mode with this suffix runs rwproxy from the checkout given by --baseline


def base_mode(mode: str) -> str:
    return mode.split("@")[0]


def mode_name(mode: str) -> str:
    name = MODE_NAMES[base_mode(mode)]
    return name + (" -- rwproxy from the --baseline checkout (the code before the change)" if mode.endswith(BEFORE) else "")

VARIANTS = {  # name -> (sysbench test, extra options)
    "oltp_point_select": ("oltp_point_select", []),
    "oltp_read_only": ("oltp_read_only", []),  # BEGIN ... COMMIT: a transaction, so the primary
    "oltp_read_only_skip_trx": ("oltp_read_only", ["--skip_trx=on"]),  # autocommit reads: replicas
    "oltp_read_write": ("oltp_read_write", []),
    "oltp_update_non_index": ("oltp_update_non_index", []),  # autocommit single-row UPDATEs: writes that share
}


def sysbench(test: str, host: str, port: int, threads: int, seconds: float, tables: int, size: int, action="run",
             ps_mode: str = "auto", socket: str = "") -> dict:
    """One sysbench run; ps_mode "auto" uses prepared statements (binary protocol), "disable" plain
    queries; with `socket`, through that Unix socket instead of host:port."""
    test, extra = VARIANTS.get(test, (test, []))
    where = [f"--mysql-socket={socket}"] if socket else [f"--mysql-host={host}", f"--mysql-port={port}"]
    cmd = [
        "sysbench", test, *extra, *where, "--mysql-user=app", "--mysql-password=app",
        f"--mysql-db={SB_DB}", f"--tables={tables}", f"--table-size={size}", "--db-driver=mysql",
        f"--threads={threads}", f"--time={int(seconds)}", "--histogram=on", "--percentile=99", f"--db-ps-mode={ps_mode}", action,
    ]
    text = _run_sysbench(cmd, seconds)
    if action != "run":
        return {}
    queries, qps = _queries(text)
    errors = int(re.search(r"ignored errors:\s+(\d+)", text).group(1))
    hist = [(float(v), int(c)) for v, c in re.findall(r"^\s+([\d.]+) \|[^\n]*?(\d+)\s*$", text, re.M)]
    return {"queries": queries, "qps": qps, "errors": errors, "p95_ms": _pct(hist, 0.95), "p99_ms": _pct(hist, 0.99)}


def _run_sysbench(cmd: list[str], seconds: float) -> str:
    """sysbench's report (stdout); a failure raises with its output."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    if out.returncode != 0:
        raise RuntimeError(f"sysbench failed ({' '.join(cmd)}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out.stdout


def _queries(report: str) -> tuple[int, float]:
    """(queries, queries per second) from a sysbench report."""
    m = re.search(r"queries:\s+(\d+)\s+\(([\d.]+) per sec", report)
    return int(m.group(1)), float(m.group(2))


def _pct(hist: list[tuple[float, int]], q: float) -> float | None:
    total = sum(c for _, c in hist)
    if not total:
        return None
    seen = 0
    for value, count in hist:
        seen += count
        if seen >= q * total:
            return value
    return hist[-1][0]


BIG_SQL = "SELECT seq, REPEAT('r', 120) FROM seq_1_to_1000"


COUNTERS = ("statements", "shared_statements", "idle_released", "queue_waits")  # from `rwproxy status`


def routed(cfg_path: str) -> dict:
    """Statements the proxy has sent to each backend so far, and its COUNTERS (from its control
    socket): how many statements ran on shared connections, sessions gave theirs back, waited."""
    from proxy.config.load import load_config
    from proxy.runtime.control import request
    from proxy.runtime.rundir import control_socket

    st = request(control_socket(load_config(cfg_path)), "status", timeout=10)
    roles = {s["name"]: s["role"] for s in st["servers"]}
    out = {f"{name}({roles[name]})": s["routed"] for name, s in ((s["name"], s) for s in st["servers"])}
    return out | {k: st.get(k, 0) for k in COUNTERS}


BIG_THREADS = 8  # sysbench threads for the 1,000-row figure under concurrency


def big_result_sysbench(port: int, threads: int, seconds: float) -> dict:
    """benchmarks/big_result.lua: 1,000-row results read by libmariadb, `threads` at a time."""
    cmd = ["sysbench", str(Path(__file__).with_name("big_result.lua")), "--mysql-host=127.0.0.1", f"--mysql-port={port}",
           "--mysql-user=app", "--mysql-password=app", f"--mysql-db={SB_DB}", "--db-driver=mysql",
           f"--threads={threads}", f"--time={int(seconds)}", "run"]
    queries, qps = _queries(_run_sysbench(cmd, seconds))
    return {"queries": queries, "qps": qps}


def big_result_cpu(proxy: ProxyProcess, seconds: float) -> dict:
    """Proxy CPU per 1,000-row (~130 KB) result: read as raw bytes by one fast client, decoded
    by PyMySQL (a slow reader changes how the bytes arrive), and by sysbench's libmariadb with
    BIG_THREADS clients at once (busy workers find more bytes per wakeup), so all three are shown."""
    raw = RawClient(proxy.host, proxy.port, db=SB_DB)
    scanner = Scanner(True)
    size = raw.query_raw(BIG_SQL.encode(), scanner)
    n, cpu0, t0 = 0, proxy.cpu_seconds(), time.monotonic()
    while time.monotonic() - t0 < seconds:
        raw.query_raw(BIG_SQL.encode(), scanner)
        n += 1
    fast = (proxy.cpu_seconds() - cpu0) / n * 1e6
    raw.close()
    conn = pymysql.connect(host=proxy.host, port=proxy.port, user="app", password="app", database=SB_DB)
    cur = conn.cursor()
    m, cpu0, t0 = 0, proxy.cpu_seconds(), time.monotonic()
    while time.monotonic() - t0 < seconds:
        cur.execute(BIG_SQL)
        cur.fetchall()
        m += 1
    slow = (proxy.cpu_seconds() - cpu0) / m * 1e6
    conn.close()
    cpu0 = proxy.cpu_seconds()
    sb = big_result_sysbench(proxy.port, BIG_THREADS, max(seconds, 2.0))
    busy = (proxy.cpu_seconds() - cpu0) / sb["queries"] * 1e6
    return {"response_bytes": size, "seconds": seconds, "raw_queries": n, "proxy_cpu_us_per_query": round(fast, 1),
            "pymysql_queries": m, "proxy_cpu_us_per_query_pymysql": round(slow, 1),
            "sysbench_queries": sb["queries"], "sysbench_qps": sb["qps"], "proxy_cpu_us_per_query_sysbench": round(busy, 1)}


def write_mode_config(mode: str, port: int, workers: int, cluster, tmp: str) -> str:
    """rwproxy's config file for a routing mode (see MODE_NAMES)."""
    data = {
        "proxy": {"listen": f"127.0.0.1:{port}", "workers": workers,
                  "cpu_affinity": "spread" if base_mode(mode).endswith("-pinned") else "none"},
        "backends": [{"name": n.name, "host": "127.0.0.1", "port": n.port,
                      **({"socket": str(n.socket)} if base_mode(mode).endswith("-unix") else {})}
                     for n in (cluster.nodes[:-1] if base_mode(mode) == "split-one" else cluster.nodes)],
        "users": [{"name": "app", "password": "app"}],
        "monitor": {"user": "rwproxy", "password": cluster.password("rwproxy")},
        "routing": {"read_write_split": base_mode(mode).startswith("split")},
        # The runner measures the data path: no instance may fail the cluster over under it. With
        # auto_failover on, one of several uncoordinated instances failed a healthy but CPU-starved
        # primary over between the 32- and 1,024-thread runs (2026-12-06; docs/failover.md).
        "failover": {"auto_failover": False},
    }
    if base_mode(mode) == "split-batch":
        data["proxy"]["scheduling"] = "batch"
    if base_mode(mode).endswith("-16k"):
        data["pool"] = {"backend_net_buffer": 0}
    if base_mode(mode).endswith("-256k"):
        data["pool"] = {"backend_net_buffer": 256 << 10}
    if base_mode(mode).endswith("-socket"):
        data["proxy"]["socket"] = client_socket(mode, tmp)
    if base_mode(mode).endswith("-tls"):
        data["backend_tls"] = {"mode": "verify_identity", "ca": str(cluster.tls_dir / "ca.pem")}
    path = str(Path(tmp) / f"rwproxy-{mode.replace('@', '-')}.toml")
    build_config(data, source=path)  # (validated by this tree)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(minimal_toml(data))
    return path


def client_socket(mode: str, tmp: str) -> str:
    """The Unix socket a *-socket mode's rwproxy listens on beside its port ("" for other modes)."""
    return str(Path(tmp) / f"rw-{mode.replace('@', '-')}.sock") if base_mode(mode).endswith("-socket") else ""


def minimal_toml(data: dict) -> str:
    """Only the keys a mode sets, the rest left to the defaults: a baseline checkout (MODE@before)
    may predate keys this tree's full config text names, and would refuse them as unknown."""
    lines: list[str] = []
    for section, body in data.items():
        for item in body if isinstance(body, list) else [body]:
            lines.append(f"[[{section}]]" if isinstance(body, list) else f"[{section}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in item.items()]
    return "\n".join(lines) + "\n"


def big_result_summary(rounds: list[dict], background_ms_per_s: float) -> dict:
    """Medians of big_result_cpu rounds, with the idle background's share per query split out."""
    med = lambda key: round(statistics.median(x[key] for x in rounds), 1)  # noqa: E731
    rate = statistics.median(x["raw_queries"] / x["seconds"] for x in rounds)
    bg = background_ms_per_s * 1000 / rate  # µs per query
    cpu = med("proxy_cpu_us_per_query")
    return {"response_bytes": rounds[0]["response_bytes"], "rounds": len(rounds),
            "raw_queries": sum(x["raw_queries"] for x in rounds), "pymysql_queries": sum(x["pymysql_queries"] for x in rounds),
            "proxy_cpu_us_per_query": cpu, "proxy_cpu_us_per_query_pymysql": med("proxy_cpu_us_per_query_pymysql"),
            "sysbench_threads": BIG_THREADS, "sysbench_queries": sum(x["sysbench_queries"] for x in rounds),
            "sysbench_qps": med("sysbench_qps"), "proxy_cpu_us_per_query_sysbench": med("proxy_cpu_us_per_query_sysbench"),
            "background_cpu_ms_per_s": background_ms_per_s,
            "background_us_per_query": round(bg, 1), "net_us_per_query": round(cpu - bg, 1)}


class ConnectionSampler:
    """Peak count of the benchmark user's connections on each server while a block runs (sampled
    five times a second from the process lists): what a proxy asked of the servers."""

    def __init__(self, cluster, user: str = "app"):
        self.cluster, self.user = cluster, user
        self.peaks: dict[str, int] = {n.name: 0 for n in cluster.nodes}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)

    def _run(self):
        conns = {n.name: n.connect() for n in self.cluster.nodes}
        try:
            while not self._stop.wait(0.2):
                for name, c in conns.items():
                    with c.cursor() as cur:
                        cur.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = %s", (self.user,))
                        self.peaks[name] = max(self.peaks[name], cur.fetchone()[0])
        finally:
            for c in conns.values():
                c.close()


def round_order(items: list, r: int) -> list:
    """Round r's order (a Williams design): over len(items) rounds (twice that for an odd count)
    each entry runs first equally often and right after each other entry equally often. A plain
    rotation keeps the cyclic order, so an entry always followed the same one: in write tests it
    always inherited the replication backlog of the run before it (the direct run's, the largest)."""
    n = len(items)
    seq, lo, hi = [0], 1, n - 1
    while len(seq) < n:
        seq.append(lo)
        lo += 1
        if len(seq) < n:
            seq.append(hi)
            hi -= 1
    row = [(i + r) % n for i in seq]
    if n % 2 and (r // n) % 2:
        row.reverse()
    return [items[i] for i in row]


def balanced_rounds(n: int) -> int:
    """Rounds after which round_order is balanced for n entries (a multiple of it is too). Fewer
    favour some entry: with direct and two modes over 3 rounds, the first-named mode ran right
    after the direct run in 2 of them, when the server is still ending 1,024 connections, and an
    A/A run (the same code twice) put it behind in 3 of 3 rounds by 1.5-15 % (aa-check-latest)."""
    return n if n % 2 == 0 else 2 * n


def settle(cluster, timeout: float = 300.0) -> float:
    """Wait until the replicas have applied everything the primary has (seconds waited): a run
    must not start while the replicas still apply the previous run's writes, which takes CPU
    from whatever runs next on this machine."""
    t0 = time.monotonic()
    cluster.wait_replicas_caught_up(timeout)
    return round(time.monotonic() - t0, 2)


def idle_cpu(proxy: ProxyProcess, seconds: float) -> float:
    """CPU the proxy's processes use with no clients (monitor checks, heartbeats), in ms per second:
    part of every figure below, whatever the load."""
    cpu0, t0 = proxy.cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    return round((proxy.cpu_seconds() - cpu0) / (time.monotonic() - t0) * 1000, 1)


def idle_memory(proxy: ProxyProcess, count: int) -> dict:
    """RSS growth of the proxy while `count` authenticated clients sit idle."""
    before = proxy.rss_kib()
    conns = []
    try:
        for _ in range(count):
            conns.append(pymysql.connect(host=proxy.host, port=proxy.port, user="app", password="app", database=SB_DB))
        time.sleep(1.0)
        after = proxy.rss_kib()
    finally:
        for c in conns:
            c.close()
    return {"connections": count, "rss_before_kib": before, "rss_after_kib": after,
            "kib_per_connection": round((after - before) / count, 1)}


def main(argv=None) -> int:
    import signal

    # SIGTERM (e.g. a timeout) must still stop the servers this run started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short smoke run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--time", type=float, default=10.0, help="seconds per sysbench run")
    ap.add_argument("--threads", default="8,32")
    ap.add_argument("--tests", default="oltp_point_select,oltp_read_only,oltp_read_only_skip_trx")
    ap.add_argument("--modes", default="primary,primary-pinned,split,forwarder",
                    help="routing modes: primary (read_write_split = false: the issue-3 set-up, everything on the "
                         "primary like the direct runs), primary-pinned (as primary, cpu_affinity = spread), "
                         "split (reads on the replicas), split-batch (as split, scheduling = batch), split-one (as split, "
                         "reads on one replica), primary-unix (as primary, backends through their Unix "
                         "sockets), primary-tls (as primary, TLS to the servers), primary-16k (as primary, "
                         "backend_net_buffer = 0), split-256k (as split, backend_net_buffer = 256 KiB), split-socket (as split, sysbench through rwproxy's Unix socket), forwarder (reference: a bare uvloop forwarder, not rwproxy)")
    ap.add_argument("--workers", type=int, default=0, help="rwproxy workers (0 = CPU count)")
    ap.add_argument("--baseline", default="", metavar="DIR",
                    help="another checkout of rwproxy (e.g. `git worktree add DIR <commit>`, extensions built in "
                         "place); modes named MODE@before run from it, in the same rounds as the others")
    ap.add_argument("--idle", type=int, default=1000, help="idle clients for the memory figure")
    ap.add_argument("--tag", default="dataplane")
    ap.add_argument("--server-option", action="append", default=[], metavar="NAME[=VALUE]",
                    help="extra [mariadbd] line for the sandbox's servers (direct and proxied runs alike), "
                         "e.g. thread_handling=pool-of-threads")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.time, args.idle = 1, 3.0, 200
    threads = [int(t) for t in args.threads.split(",")]
    tests = args.tests.split(",")
    modes = args.modes.split(",")
    if any(m.endswith(BEFORE) for m in modes) and not args.baseline:
        ap.error("modes ending in @before need --baseline DIR")
    workers = args.workers or os.cpu_count() or 1
    tables, size = 4, 10000

    with tempfile.TemporaryDirectory(prefix="rwp-bench-") as tmp, running_cluster(
            Path(tmp) / "sandbox", replicas=2, port_start=25306, tls=any(m.endswith("-tls") for m in modes),
            server_options=args.server_option) as cluster:
        with cluster.primary.connect() as c, c.cursor() as cur:
            cur.execute(f"CREATE DATABASE IF NOT EXISTS {SB_DB}")
            cur.execute(f"GRANT ALL ON {SB_DB}.* TO 'app'@'%'")
        primary = cluster.primary.port
        print(f"preparing sysbench tables ({tables} x {size} rows) on the primary ...", flush=True)
        sysbench("oltp_read_only", "127.0.0.1", primary, 4, 0, tables, size, action="prepare")
        cluster.wait_replicas_caught_up(60)

        runs, big, idle, background = [], {}, {}, {}
        with contextlib.ExitStack() as stack:
            # Every mode's proxy runs for the whole benchmark and the modes take turns inside
            # each round, so drift on this shared machine hits every mode alike and modes can
            # be compared with each other, not only with the direct runs.
            proxies, cfgs = {}, {}
            for mode in modes:
                port, log_path = free_port(), str(Path(tmp) / f"{mode}.log")
                if mode == "forwarder":
                    proxies[mode] = ForwarderProcess(port, primary, workers, log_path).start()
                elif mode == "haproxy":
                    proxies[mode] = HAProxyProcess(port, primary, workers, log_path, tmp).start()
                else:
                    cfgs[mode] = write_mode_config(mode, port, args.workers, cluster, tmp)
                    proxies[mode] = ProxyProcess(cfgs[mode], "127.0.0.1", port, log_path=log_path,
                                                 source=args.baseline if mode.endswith(BEFORE) else None).start()
                stack.callback(proxies[mode].stop)
            time.sleep(1.0)  # let the workers finish starting before measuring
            for mode, proxy in proxies.items():
                background[mode] = idle_cpu(proxy, 3.0 if args.quick else 10.0)
                print(f"[{mode}] idle CPU: {background[mode]} ms/s", flush=True)
            # on fresh processes: the first mode, and its @before twin if there is one
            for first in [m for m in cfgs if args.idle > 0 and m in (next(iter(cfgs)), next(iter(cfgs)) + BEFORE)]:
                idle[first] = idle_memory(proxies[first], args.idle)
                print(f"[{first}] idle clients: {idle[first]}", flush=True)

            def through(mode: str, test: str, th: int) -> dict:
                proxy, rwproxy = proxies[mode], mode in cfgs
                cpu0 = proxy.cpu_seconds()
                routed0 = routed(cfgs[mode]) if rwproxy else {}
                with ConnectionSampler(cluster) as sampled:
                    res = sysbench(test, "127.0.0.1", proxy.port, th, args.time, tables, size,
                                   socket=client_socket(mode, tmp))
                res["server_connections_peak"] = sampled.peaks
                res["proxy_cpu_us_per_query"] = round((proxy.cpu_seconds() - cpu0) / res["queries"] * 1e6, 1)
                if rwproxy:
                    time.sleep(0.6)  # workers publish counters twice a second
                    after = routed(cfgs[mode])
                    delta = {k: after[k] - routed0.get(k, 0) for k in after}
                    res["counters"] = {k: delta.pop(k) for k in COUNTERS}
                    res["routed"] = delta
                return res

            for test in tests:
                test_modes = [m for m in modes if test in MODE_TESTS[base_mode(m)]]
                if not test_modes:
                    continue
                if args.rounds % balanced_rounds(1 + len(test_modes)):
                    print(f"note: {args.rounds} round(s) do not balance the order of {1 + len(test_modes)} endpoints "
                          f"(a multiple of {balanced_rounds(1 + len(test_modes))} does): compare modes with care",
                          flush=True)
                for th in threads:
                    for r in range(args.rounds):
                        got = {}
                        for ep in round_order(["direct", *test_modes], r):
                            waited = settle(cluster)
                            if ep == "direct":
                                res = sysbench(test, "127.0.0.1", primary, th, args.time, tables, size)
                            else:
                                res = through(ep, test, th)
                            res["settle_s"] = waited
                            got[ep] = res
                            print(f"[{ep}] {test:18s} threads={th:<3d} round={r + 1} qps={res['qps']:9.0f} "
                                  f"p95={res['p95_ms']}ms p99={res['p99_ms']}ms errors={res['errors']}"
                                  + (f" cpu={res['proxy_cpu_us_per_query']}us/q" if ep != "direct" else "")
                                  + (f" shared={100 * c['shared_statements'] / max(c['statements'], 1):.1f}%"
                                     if (c := res.get("counters")) else "")
                                  + (f" (replicas caught up in {waited}s first)" if waited >= 1 else ""), flush=True)
                        for m in test_modes:
                            runs.append({"mode": m, "test": test, "threads": th, "round": r + 1,
                                         "direct": got["direct"], "proxy": got[m]})

            big_modes = [m for m in modes if base_mode(m) in BIG_RESULT_MODES]
            per_round: dict[str, list[dict]] = {m: [] for m in big_modes}
            for r in range(args.rounds):
                for mode in round_order(big_modes, r):
                    per_round[mode].append(big_result_cpu(proxies[mode], 2.0 if args.quick else 4.0))
            for mode, rs in per_round.items():
                big[mode] = big_result_summary(rs, background[mode])
                big[mode]["per_round"] = [{k: x[k] for k in ("proxy_cpu_us_per_query", "proxy_cpu_us_per_query_pymysql",
                                                            "proxy_cpu_us_per_query_sysbench")} for x in rs]
                print(f"[{mode}] 1,000-row result: {big[mode]}", flush=True)

    summary = summarize(runs)
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
        "settings": {"rounds": args.rounds, "seconds": args.time, "tables": tables, "table_size": size,
                     "proxy_workers": workers, "modes": {m: mode_name(m) for m in modes},
                     "baseline": args.baseline,
                     "server_options": args.server_option},
        "summary": summary, "big_result": big, "idle_memory": idle, "idle_cpu_ms_per_s": background, "runs": runs,
    }
    save(args.tag, result, markdown(result))
    from .plots import throughput_plot

    throughput_plot(Path(__file__).parent / "results" / f"{args.tag}-latest.json")
    return 0


def summarize(runs: list[dict]) -> list[dict]:
    out = []
    keys = []
    for r in runs:  # in the order they ran
        if (r.get("mode", "split"), r["test"], r["threads"]) not in keys:
            keys.append((r.get("mode", "split"), r["test"], r["threads"]))
    for mode, test, th in keys:
        rs = [r for r in runs if r.get("mode", "split") == mode and r["test"] == test and r["threads"] == th]
        med = lambda ep, k: round(statistics.median(r[ep][k] for r in rs if r[ep].get(k) is not None), 3)  # noqa: E731
        out.append({
            "mode": mode, "test": test, "threads": th,
            "direct_qps": round(med("direct", "qps")), "proxy_qps": round(med("proxy", "qps")),
            "ratio": round(statistics.median(r["proxy"]["qps"] / r["direct"]["qps"] for r in rs), 3),
            "direct_p95_ms": med("direct", "p95_ms"), "proxy_p95_ms": med("proxy", "p95_ms"),
            "direct_p99_ms": med("direct", "p99_ms"), "proxy_p99_ms": med("proxy", "p99_ms"),
            "proxy_cpu_us_per_query": med("proxy", "proxy_cpu_us_per_query"),
            "proxy_cpu_s_per_1000_queries": round(med("proxy", "proxy_cpu_us_per_query") / 1000, 4),
            "errors": sum(r[ep]["errors"] for r in rs for ep in ("direct", "proxy")),
            "routed": {k: sum(r["proxy"].get("routed", {}).get(k, 0) for r in rs) for k in rs[0]["proxy"].get("routed", {})},
            "counters": {k: sum(r["proxy"].get("counters", {}).get(k, 0) for r in rs) for k in rs[0]["proxy"].get("counters", {})},
        })
    return out


def _share(routed: dict, counters: dict | None = None) -> str:
    total = sum(routed.values()) or 1
    text = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(routed.items()))
    if counters and counters.get("statements"):
        n = counters["statements"]
        text += f"; on shared connections {100 * counters['shared_statements'] / n:.1f}%"
        text += "".join(f", {k.replace('_', ' ')} {counters[k]}" for k in ("idle_released", "queue_waits") if counters[k])
    return text


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"# rwproxy data-path benchmark, {result['date']}",
        "",
        f"{result['machine']['cpus']} CPUs (shared), Python {result['machine']['python']}, rwproxy workers={s['proxy_workers']}, "
        f"{s['rounds']} rounds of {s['seconds']:.0f} s runs, sysbench {s['tables']} x {s['table_size']} rows. "
        "All modes' proxies run side by side; in each round the direct run and every mode take turns (the order changes "
        "from round to round so that each runs first, and right after each other one, equally often; each run starts "
        "once the replicas have applied every earlier write), so modes compare with each other as well as with direct. Direct runs go to the primary. "
        "Medians; ratio = median of per-round proxy/direct QPS; rwproxy CPU counts all its processes (workers and the "
        "control plane). The proxies not being measured sit idle meanwhile, their background (below) loading every "
        "run alike, direct ones included."
        + (f" MariaDB server options added to the sandbox's defaults: {', '.join(s['server_options'])}."
           if s.get("server_options") else ""),
        "",
        "Routing modes:",
        *[f"- **{m}**: {name}" + ("" if m in ("forwarder", "haproxy") else
          f"; idle rwproxy CPU {result.get('idle_cpu_ms_per_s', {}).get(m, '?')} ms per second "
          "(monitor checks and heartbeats, included in the per-query figures)") for m, name in s.get("modes", {}).items()],
        "",
        "| routing | test | threads | direct QPS | proxy QPS | ratio | p95 ms direct / proxy | p99 ms direct / proxy | proxy CPU µs/query | errors | statements per backend (rwproxy runs) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["summary"]:
        lines.append(
            f"| {r.get('mode', 'split')} | {r['test']} | {r['threads']} | {r['direct_qps']} | {r['proxy_qps']} | {r['ratio']:.2f} | "
            f"{r['direct_p95_ms']} / {r['proxy_p95_ms']} | {r['direct_p99_ms']} / {r['proxy_p99_ms']} | "
            f"{r['proxy_cpu_us_per_query']} | {r['errors']} | {_share(r['routed'], r.get('counters'))} |"
        )
    lines.append("")
    for mode, b in result["big_result"].items():
        lines.append(
            f"- [{mode}] 1,000-row result ({b['response_bytes'] // 1000} KB on the wire, median of {b.get('rounds', 1)} "
            f"alternating rounds): CPU {b['proxy_cpu_us_per_query']} µs per query read by a fast raw client ({b['raw_queries']} queries), {b['proxy_cpu_us_per_query_pymysql']} µs when PyMySQL decodes it "
            f"({b['pymysql_queries']} queries); of the fast client's figure, {b['background_us_per_query']} µs is the idle background "
            f"spread over its queries, {b['net_us_per_query']} µs the relaying itself."
            + (f" With {b['sysbench_threads']} sysbench threads reading at once (libmariadb): {b['proxy_cpu_us_per_query_sysbench']} µs "
               f"per query at {b['sysbench_qps']:.0f} results/s ({b['sysbench_queries']} queries)." if "sysbench_threads" in b else ""))
    idle = result["idle_memory"]
    if idle and "connections" in idle:  # (older results: one mode's figure, not keyed by mode)
        idle = {"rwproxy": idle}
    for mode, m in idle.items():  # measured on rwproxy only: absent from a forwarder-only run
        lines.append(
            f"- [{mode}] Idle clients: {m['connections']} connections held open grew rwproxy's RSS by "
            f"{m['rss_after_kib'] - m['rss_before_kib']} KiB = {m['kib_per_connection']} KiB per connection "
            "(1 s after the logins; benchmarks/idle_crowd.py measures 10,000 and their server connections).")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
