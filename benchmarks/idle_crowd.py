"""Ten thousand idle clients on a few server connections (issue 22).

rwproxy in its default configuration (read/write split, [pool] idle_release = 1000 ms,
max_server_connections = 64, 2 workers) in front of the sandbox (a primary and 2 replicas).
N clients log in (as many at once as --concurrency) and stay idle. Then:

- memory: rwproxy's RSS (all processes) before and after, per client session;
- server connections: the benchmark user's connections on every server (process lists), in total;
- wake-up: clients picked at random from the idle crowd send a point select one after the other;
  the time from the query's first byte to the last byte of its answer (the session has given
  its connections back: the answer needs a connection from the pool and the SET/USE history
  replayed, or a shared one). Then others send an autocommit UPDATE the same way: a write
  shares a connection instead of taking one from the pool when it can (counted).

    python -m benchmarks.idle_crowd                 # 10,000 clients, ~2 minutes
    python -m benchmarks.idle_crowd --clients 2000  # quicker
Results: benchmarks/results/idle-crowd-<date>.{json,md} (and -latest).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import random
import resource
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

from proxy.protocol import auth
from proxy.protocol.constants import CLIENT_DEPRECATE_EOF, PROXY_CAPABILITIES
from proxy.testing.rawclient import APP_CLIENT_CAPABILITIES
from proxy.protocol.handshake import build_response, parse_greeting
from proxy.protocol.scan import RESULT, Scanner
from proxy.runtime.launcher import ProxyProcess, free_port
from proxy.testing.clusters import running_cluster, user_connections

from .report import save
from .run import SB_DB, write_mode_config

QUERY = b"SELECT id FROM crowd WHERE id = 1"
WRITE = b"UPDATE crowd SET n = n + 1 WHERE id = 1"


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Client:
    """One idle client: a logged-in connection that can send a query and time its answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def login(cls, port: int) -> "Client":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        c = cls(reader, writer)
        seq, payload = await c._packet()
        g = parse_greeting(payload)
        token = auth.native_token("app", g.salt)
        body = build_response(APP_CLIENT_CAPABILITIES, 45, "app", token, SB_DB, auth.NATIVE)
        writer.write(struct.pack("<I", len(body))[:3] + bytes([seq + 1]) + body)
        _, ok = await c._packet()
        if ok[0] != 0:
            raise RuntimeError(f"login failed: {ok[3:]!r}")
        return c

    async def _packet(self) -> tuple[int, bytes]:
        hdr = await self.reader.readexactly(4)
        n = hdr[0] | hdr[1] << 8 | hdr[2] << 16
        return hdr[3], await self.reader.readexactly(n)

    async def timed_query(self, sql: bytes) -> tuple[float, bool]:
        """Seconds from sending `sql` to the end of its answer; whether it was not an error."""
        scanner = Scanner(bool(PROXY_CAPABILITIES & CLIENT_DEPRECATE_EOF))
        scanner.start(RESULT)
        t0 = time.perf_counter()
        self.writer.write(struct.pack("<I", len(sql) + 1)[:3] + b"\x00\x03" + sql)
        while True:
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("proxy closed the connection")
            if scanner.feed(data) >= 0:
                return time.perf_counter() - t0, not scanner.error

    def close(self) -> None:
        self.writer.close()


async def crowd(port: int, n: int, concurrency: int) -> list[Client]:
    clients: list[Client] = []
    sem = asyncio.Semaphore(concurrency)
    failed = 0
    t0 = time.monotonic()

    async def one():
        nonlocal failed
        async with sem:
            try:
                clients.append(await Client.login(port))
            except Exception as e:  # noqa: BLE001 - counted and reported
                failed += 1
                if failed <= 3:
                    _progress(f"  login failed: {e!r}")
            if len(clients) % 1000 == 0:
                _progress(f"  {len(clients)}/{n} clients logged in ({time.monotonic() - t0:.1f} s)")

    await asyncio.gather(*(one() for _ in range(n)))
    if failed:
        raise RuntimeError(f"{failed} of {n} logins failed")
    return clients


def shared_statements(cfg_path: str) -> int:
    """Statements rwproxy has answered over shared connections so far (its control socket)."""
    from proxy.config.load import load_config
    from proxy.runtime.control import request
    from proxy.runtime.rundir import control_socket

    return request(control_socket(load_config(cfg_path)), "status", timeout=10)["shared_statements"]


async def timed_wakes(clients: list, sql: bytes, n: int, seed: int) -> tuple[list[float], int]:
    """`n` clients picked at random each send `sql`, one after the other: (ms each, errors)."""
    times, errors = [], 0
    for c in random.Random(seed).sample(clients, min(n, len(clients))):
        dt, ok = await c.timed_query(sql)
        times.append(dt * 1000)
        errors += not ok
    return sorted(times), errors


async def measure(proxy: ProxyProcess, cluster, n: int, concurrency: int, wakes: int, idle_s: float) -> dict:
    rss0 = proxy.rss_kib()
    t0 = time.monotonic()
    clients = await crowd(proxy.port, n, concurrency)
    login_s = time.monotonic() - t0
    # a few statements first, so the digests are known (as in any running application)
    for c in clients[:20]:
        await c.timed_query(QUERY)
        await c.timed_query(WRITE)
        await c.timed_query(QUERY)
    _progress(f"  all logged in after {login_s:.1f} s; idle for {idle_s:g} s")
    await asyncio.sleep(idle_s)
    rss1 = proxy.rss_kib()
    conns = user_connections(cluster, "app")
    times, errors = await timed_wakes(clients[20:], QUERY, wakes, 22)
    conns_after = user_connections(cluster, "app")
    shared0 = shared_statements(proxy.config_path)
    wtimes, werrors = await timed_wakes(clients[20:], WRITE, wakes, 23)
    await asyncio.sleep(0.7)  # (workers publish their counters twice a second)
    wshared = shared_statements(proxy.config_path) - shared0
    conns_writes = user_connections(cluster, "app")
    for c in clients:
        c.close()
    return {
        "clients": n, "login_seconds": round(login_s, 1), "logins_per_s": round(n / login_s),
        "rss_before_kib": rss0, "rss_after_kib": rss1, "kib_per_session": round((rss1 - rss0) / n, 2),
        "server_connections_idle": conns, "server_connections_idle_total": sum(conns.values()),
        "server_connections_after_wakes_total": sum(conns_after.values()),
        "wakes": len(times), "wake_errors": errors, "wake_ms_median": round(statistics.median(times), 2),
        "wake_ms_p95": round(times[int(len(times) * 0.95) - 1], 2), "wake_ms_max": round(times[-1], 2),
        "write_wakes": len(wtimes), "write_wake_errors": werrors, "write_wakes_shared": wshared,
        "write_wake_ms_median": round(statistics.median(wtimes), 2),
        "write_wake_ms_p95": round(wtimes[int(len(wtimes) * 0.95) - 1], 2),
        "server_connections_after_writes_total": sum(conns_writes.values()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=200, help="logins under way at once")
    ap.add_argument("--wakes", type=int, default=300)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--baseline", default="", metavar="DIR",
                    help="run rwproxy from another checkout (e.g. `git worktree add DIR <commit>`): the figures before a change")
    ap.add_argument("--tag", default="idle-crowd")
    args = ap.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.clients + 1000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.clients + 1000), hard))
    with tempfile.TemporaryDirectory(prefix="rwp-crowd-") as tmp, running_cluster(
            Path(tmp) / "sandbox", replicas=2, port_start=25806) as cluster:
        with cluster.primary.connect() as c, c.cursor() as cur:
            cur.execute(f"CREATE DATABASE IF NOT EXISTS {SB_DB}")
            cur.execute(f"GRANT ALL ON {SB_DB}.* TO 'app'@'%'")
            cur.execute(f"CREATE TABLE IF NOT EXISTS {SB_DB}.crowd (id INT PRIMARY KEY, n INT NOT NULL DEFAULT 0)")
            cur.execute(f"REPLACE INTO {SB_DB}.crowd (id) VALUES (1)")
        cluster.wait_replicas_caught_up(60)
        port = free_port()
        cfg = write_mode_config("split", port, args.workers, cluster, tmp)  # the default configuration
        proxy = ProxyProcess(cfg, "127.0.0.1", port, log_path=str(Path(tmp) / "rwproxy.log"),
                             source=args.baseline or None).start()
        try:
            time.sleep(1.0)
            _progress(f"{args.clients} clients logging in, {args.concurrency} at a time ...")
            got = asyncio.run(measure(proxy, cluster, args.clients, args.concurrency, args.wakes, 3.0))
        finally:
            proxy.stop()
    _progress(f"result: {got}")
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "settings": {"workers": args.workers, "concurrency": args.concurrency, "baseline": args.baseline,
                           "config": "read/write split, idle_release 1000 ms, max_server_connections 64"},
              "result": got}
    save(args.tag, result, report(result))
    return 0


def report(r: dict) -> str:
    g = r["result"]
    conns = ", ".join(f"{k} {v}" for k, v in g["server_connections_idle"].items())
    return "\n".join([
        f"# {g['clients']:,} idle clients, {r['date']}", "",
        f"rwproxy, default configuration ({r['settings']['config']}), {r['settings']['workers']} workers, "
        f"sandbox with a primary and 2 replicas; {r['machine']['cpus']} CPUs, Python {r['machine']['python']}.",
        "Produced by `python -m benchmarks.idle_crowd`.", "",
        "| figure | value | target |", "|---|---:|---:|",
        f"| rwproxy memory per idle session | {g['kib_per_session']} KiB | <= 10 KiB |",
        f"| server connections with all of them idle (all servers) | {g['server_connections_idle_total']} ({conns}) | <= 100 |",
        f"| wake-up: a point select from an idle client, median | {g['wake_ms_median']} ms | <= 10 ms |",
        f"| wake-up p95 / max ({g['wakes']} clients, one after the other) | {g['wake_ms_p95']} / {g['wake_ms_max']} ms | |",
        f"| wake-up errors | {g['wake_errors']} | 0 |",
        f"| logins ({g['clients']:,}, {r['settings']['concurrency']} at a time) | {g['login_seconds']} s "
        f"({g['logins_per_s']}/s) | |",
        f"| server connections after the wake-ups | {g['server_connections_after_wakes_total']} | |",
        f"| wake-up: an autocommit UPDATE from an idle client, median / p95 | {g['write_wake_ms_median']} / "
        f"{g['write_wake_ms_p95']} ms | |",
        f"| ... of those {g['write_wakes']} writes, answered on a shared connection (errors) | "
        f"{g['write_wakes_shared']} ({g['write_wake_errors']}) | |",
        f"| server connections after the write wake-ups | {g['server_connections_after_writes_total']} | |", ""])


if __name__ == "__main__":
    sys.exit(main())
