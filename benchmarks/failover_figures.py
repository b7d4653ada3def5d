"""Failover figures: SIGKILL of the primary -> new primary published writable; switchover write pause.

Runs a private sandbox (primary + 2 replicas) and the real Monitor + Failover
in-process with the default settings (monitor interval 0.1 s, failover failcount
5, verify_with_replicas on), except failover_cooldown = 0 so the runs can follow
each other on one cluster.  A writer thread plays the proxy's workers: it writes
one row every ~3 ms to whatever server the published topology says is the
primary, waits while writes are held, and retries a read-only refusal that
raced a role change.

Failover run: the writer and the heartbeat pause for a moment so the replicas hold
everything the primary wrote (then the old primary can rejoin and the next run
starts from a full cluster), the primary is SIGKILLed and the writer resumes at
once.  Measured from the kill: the new primary published writable, and the
writer's first acknowledged write on it.  The killed node is restarted and its
fence + rejoin timed before the next run kills the new primary.

Switchover run: under the writer's load, switch to the next replica; the pause is
the time writes were held (Failover's own measure) and the longest gap between
two acknowledged writes seen by the writer.

    python -m benchmarks.failover_figures            # ~1-2 minutes
    python -m benchmarks.failover_figures --quick    # fewer repetitions
Results: benchmarks/results/failover-<date>.json and .md
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import pymysql

from proxy.config.load import build_config
from proxy.cluster.failover import Failover
from proxy.cluster.gtid import reached
from proxy.testing.clusters import running_cluster
from proxy.cluster.topology import UP

RESULTS = Path(__file__).parent / "results"


class Published:
    def __init__(self):
        self.latest = None
        self.log: list[tuple[float, object]] = []
        self.lock = threading.Lock()

    def publish(self, topo):
        with self.lock:
            self.latest = topo
            self.log.append((time.monotonic(), topo))

    def first(self, pred, since: float, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                hit = next((t for t, s in self.log if t >= since and pred(s)), None)
            if hit is not None:
                return hit
            time.sleep(0.002)
        return None


class Writer(threading.Thread):
    """One row every ~3 ms to the published primary (see the module docstring)."""

    def __init__(self, pub: Published, cluster):
        super().__init__(daemon=True)
        self.pub, self.cluster = pub, cluster
        self.stop, self.paused = threading.Event(), threading.Event()
        self.acks: list[tuple[float, str]] = []  # (time, server name)
        self.failures: list[str] = []
        self.retries = 0

    def run(self):
        conns, n = {}, 0
        while not self.stop.is_set():
            topo = self.pub.latest
            p = topo.primary if topo else None
            if self.paused.is_set() or topo is None or topo.writes_held or p is None or p.state != UP:
                time.sleep(0.001)
                continue
            try:
                if p.name not in conns:
                    conns[p.name] = self.cluster.node(p.name).connect("app", database="app", connect_timeout=1,
                                                                      read_timeout=5, write_timeout=5)
                with conns[p.name].cursor() as cur:
                    cur.execute("INSERT INTO app.bench_fo (id) VALUES (%s)", (n + 1,))
                n += 1
                self.acks.append((time.monotonic(), p.name))
            except (pymysql.MySQLError, OSError) as exc:
                conn = conns.pop(p.name, None)
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:
                        pass
                now = self.pub.latest
                moved = now.writes_held or now.primary is None or now.primary.name != p.name \
                    or now.primary.state != UP
                if moved or (exc.args and exc.args[0] in (2003, 2006, 2013)):  # the kill itself, or a move
                    self.retries += 1
                else:
                    self.failures.append(repr(exc))
            time.sleep(0.003)

    def first_ack(self, since: float, name: str) -> float | None:
        return next((t for t, n in list(self.acks) if t >= since and n == name), None)

    def max_gap(self, start: float, end: float) -> float:
        times = [t for t, _ in list(self.acks) if start <= t <= end]
        return max((b - a for a, b in zip(times, times[1:])), default=0.0)


def wait(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return True
        except pymysql.MySQLError:
            pass
        time.sleep(0.02)
    return False


def follows(node, source) -> bool:
    ss = node.slave_status() or {}
    return ss.get("Master_Port") == source.port and ss.get("Slave_IO_Running") == "Yes" \
        and ss.get("Slave_SQL_Running") == "Yes"


def med(xs):
    return round(statistics.median(xs), 1) if xs else None


def failover_runs(c, fo: Failover, pub: Published, writer: Writer, reps: int) -> dict:
    runs = []
    for i in range(reps):
        old = c.node(fo.monitor.designated)
        others = [n for n in c.nodes if n is not old]
        writer.paused.set()
        fo.monitor.pause_heartbeat(old.name)
        time.sleep(0.02)
        pos = old.variable("gtid_binlog_pos")
        assert wait(lambda: all(reached((n.slave_status() or {}).get("Gtid_IO_Pos", ""), pos) for n in others), 10)
        t0 = time.monotonic()
        old.kill(signal.SIGKILL, wait=False)
        writer.paused.clear()
        t_pub = pub.first(lambda s: s.primary is not None and s.primary.name != old.name
                          and s.primary.state == UP and not s.writes_held, t0, 15)
        if t_pub is None:
            raise SystemExit(f"run {i}: no new primary published within 15 s")
        new = pub.latest.primary.name
        assert wait(lambda: writer.first_ack(t0, new) is not None, 10)
        t_ack = writer.first_ack(t0, new)
        promo = (fo.status()["last_failover"] or {}).get("duration_ms")
        t_start = time.monotonic()
        old.start()
        rejoined = wait(lambda: follows(old, c.node(new)) and old.variable("read_only") == 1, 20)
        t_rejoin = time.monotonic() - t_start
        fo.monitor.pause_heartbeat(old.name, False)
        run = {"old": old.name, "new": new, "published_writable_ms": round((t_pub - t0) * 1000, 1),
               "first_write_ms": round((t_ack - t0) * 1000, 1), "promotion_ms": promo,
               "rejoined": rejoined, "restart_to_rejoined_s": round(t_rejoin, 2)}
        print(f"  failover {i + 1}/{reps}: {run}", flush=True)
        runs.append(run)
        if not rejoined:
            raise SystemExit(f"run {i}: {old.name} did not rejoin")
        assert wait(lambda: fo.monitor.topology.servers[old.name].readable, 10)
    return {"runs": runs,
            "published_writable_ms": {"median": med([r["published_writable_ms"] for r in runs]),
                                      "max": max(r["published_writable_ms"] for r in runs)},
            "first_write_ms": {"median": med([r["first_write_ms"] for r in runs]),
                               "max": max(r["first_write_ms"] for r in runs)},
            "promotion_ms": {"median": med([r["promotion_ms"] for r in runs if r["promotion_ms"] is not None])}}


def switchover_runs(c, fo: Failover, writer: Writer, reps: int) -> dict:
    runs = []
    for i in range(reps):
        old = fo.monitor.designated
        target = next(n.name for n in c.nodes[1:] + c.nodes[:1] if n.name != old
                      and fo.monitor.topology.servers[n.name].readable)
        time.sleep(0.5)
        fails_before = len(writer.failures)
        t0 = time.monotonic()
        res = fo.switchover(target)
        time.sleep(0.3)
        gap = writer.max_gap(t0 - 0.2, time.monotonic())
        run = {"old": old, "new": target, "ok": res["ok"], "write_pause_ms": res["write_pause_ms"],
               "writer_max_gap_ms": round(gap * 1000, 1), "failed_writes": len(writer.failures) - fails_before}
        print(f"  switchover {i + 1}/{reps}: {run}", flush=True)
        runs.append(run)
        if not res["ok"]:
            raise SystemExit(f"switchover failed: {res['message']}")
        assert wait(lambda: all(fo.monitor.topology.servers[n.name].readable for n in c.nodes
                                if n.name != target), 10)
    return {"runs": runs,
            "write_pause_ms": {"median": med([r["write_pause_ms"] for r in runs]),
                               "max": max(r["write_pause_ms"] for r in runs)},
            "writer_max_gap_ms": {"median": med([r["writer_max_gap_ms"] for r in runs]),
                                  "max": max(r["writer_max_gap_ms"] for r in runs)},
            "failed_writes": sum(r["failed_writes"] for r in runs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    reps = 3 if args.quick else 7
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="rwp-fo-") as tmp, running_cluster(Path(tmp) / "sandbox") as c:
        cfg = build_config({
            "backends": [{"name": n.name, "host": "127.0.0.1", "port": n.port} for n in c.nodes],
            "users": [{"name": "app", "password": "app"}],
            "monitor": {"user": "rwproxy", "password": c.password("rwproxy")},
            "failover": {"failover_cooldown": 0.0, "replication_user": "repl", "replication_password": c.password("repl")},
        })
        c.primary.query("CREATE TABLE app.bench_fo (id BIGINT PRIMARY KEY)")
        c.wait_replicas_caught_up(10)
        pub = Published()
        fo = Failover(cfg, pub.publish).start()
        try:
            assert wait(lambda: fo.monitor.designated == c.primary.name
                        and len(fo.monitor.topology.readers) == 2, 15)
            writer = Writer(pub, c)
            writer.start()
            print(f"failover ({reps} runs)", flush=True)
            fail = failover_runs(c, fo, pub, writer, reps)
            print(f"switchover ({reps} runs)", flush=True)
            switch = switchover_runs(c, fo, writer, reps)
            writer.stop.set()
            writer.join(5)
        finally:
            fo.stop()
    res = {"date": datetime.date.today().isoformat(), "host": platform.node(), "cpus": os.cpu_count(),
           "loadavg_at_end": [round(x, 2) for x in os.getloadavg()], "python": sys.version.split()[0],
           "settings": {"monitor.interval": cfg.monitor.interval, "monitor.failcount": cfg.monitor.failcount,
                        "failover.failcount": cfg.failover.failcount,
                        "verify_with_replicas": cfg.failover.verify_with_replicas,
                        "failover_cooldown": cfg.failover.failover_cooldown},
           "failover": fail, "switchover": switch, "writer_failures": writer.failures,
           "writer_retries": writer.retries}
    write(res)
    return 0


def write(res: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"failover-{res['date']}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    f, s = res["failover"], res["switchover"]
    lines = [
        f"# Failover figures ({res['date']})", "",
        f"Host {res['host']}, {res['cpus']} CPUs, load average at the end {res['loadavg_at_end']}; "
        f"settings {res['settings']}. Control plane only (Monitor + Failover in-process, a writer thread "
        "in place of the proxy's workers); `python -m benchmarks.failover_figures`.", "",
        "| figure | target | median | max |", "|---|---|---|---|",
        f"| SIGKILL -> new primary published writable ({len(f['runs'])} runs) | well under 3 s | "
        f"{f['published_writable_ms']['median']:.0f} ms | {f['published_writable_ms']['max']:.0f} ms |",
        f"| SIGKILL -> first acknowledged write on the new primary | <= 3 s end to end | "
        f"{f['first_write_ms']['median']:.0f} ms | {f['first_write_ms']['max']:.0f} ms |",
        f"| the failover itself (survey .. replicas repointed; the rest is detection) | | "
        f"{f['promotion_ms']['median']:.0f} ms | |",
        f"| switchover: writes held ({len(s['runs'])} runs) | <= 1 s | {s['write_pause_ms']['median']:.0f} ms | "
        f"{s['write_pause_ms']['max']:.0f} ms |",
        f"| switchover: longest gap between two acknowledged writes | | "
        f"{s['writer_max_gap_ms']['median']:.0f} ms | {s['writer_max_gap_ms']['max']:.0f} ms |",
        f"| switchover: failed writes | 0 | {s['failed_writes']} | |", "",
        "Every killed primary was restarted, fenced (read_only=1) and rejoined as a replica before the next run "
        f"(restart -> replicating: median {med([r['restart_to_rejoined_s'] for r in f['runs']])} s, "
        "mostly mariadbd's own start).", "",
        "Runs:", "", "```",
        *[json.dumps(r) for r in f["runs"]], *[json.dumps(r) for r in s["runs"]], "```", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    sys.exit(main())
