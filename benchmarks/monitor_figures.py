"""Monitor figures: lag measurement error, threshold-to-eviction time, SIGKILL/SIGSTOP-to-removal time.

Runs a private sandbox (primary + 2 replicas) and the real Monitor with the
default settings (interval 0.1 s, heartbeat 0.25 s, max_replica_lag 1.0 s,
failcount 3, readmit_after 5), under a steady write load (one row every
10 ms carrying the primary's UNIX_TIMESTAMP(NOW(6))).

Ground truth for lag is independent of the monitor: a probe reads the newest
applied load row on the replica every few ms, so the true lag at any instant
is that instant minus the newest applied row's timestamp.

    python -m benchmarks.monitor_figures            # ~2 minutes
    python -m benchmarks.monitor_figures --quick    # fewer repetitions
Results: benchmarks/results/monitor-<date>.json and .md
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from proxy.config.load import load_config
from proxy.cluster.monitor import Monitor
from proxy.testing.clusters import running_cluster

RESULTS = Path(__file__).parent / "results"


class Load(threading.Thread):
    """One INSERT every `period` s on the primary; the row carries the primary's clock."""

    def __init__(self, node, period: float = 0.01):
        super().__init__(daemon=True)
        self.node, self.period, self.stop = node, period, threading.Event()
        with node.connect() as c, c.cursor() as cur:
            cur.execute("CREATE DATABASE IF NOT EXISTS bench")
            cur.execute("CREATE TABLE IF NOT EXISTS bench.load (id BIGINT AUTO_INCREMENT PRIMARY KEY,"
                        " ts DECIMAL(20,6) NOT NULL)")

    def run(self):
        with self.node.connect() as c, c.cursor() as cur:
            due = time.monotonic()
            while not self.stop.is_set():
                cur.execute("INSERT INTO bench.load (ts) VALUES (UNIX_TIMESTAMP(NOW(6)))")
                due += self.period
                time.sleep(max(0.0, due - time.monotonic()))


class Truth(threading.Thread):
    """(replica time, newest applied load row ts) every ~3 ms on one replica."""

    def __init__(self, node):
        super().__init__(daemon=True)
        self.node, self.stop = node, threading.Event()
        self.samples: list[tuple[float, float]] = []
        self.lock = threading.Lock()

    def run(self):
        with self.node.connect() as c, c.cursor() as cur:
            while not self.stop.is_set():
                cur.execute("SELECT UNIX_TIMESTAMP(NOW(6)), (SELECT ts FROM bench.load ORDER BY id DESC LIMIT 1)")
                t, ts = cur.fetchone()
                if ts is not None:
                    with self.lock:
                        self.samples.append((float(t), float(ts)))
                time.sleep(0.003)

    def lag_at(self, t: float) -> float | None:
        """True lag (s) at instant t, or None when an apply burst falls between the two probes around t."""
        with self.lock:
            i = bisect.bisect_right(self.samples, (t, float("inf"))) - 1
            if i < 0 or i + 1 >= len(self.samples):
                return None
            (t0, a0), (t1, a1) = self.samples[i], self.samples[i + 1]
        if a0 != a1 or t1 - t0 > 0.03:
            return None
        return t - a0

    def newest_at(self, t: float) -> float | None:
        with self.lock:
            i = bisect.bisect_right(self.samples, (t, float("inf"))) - 1
            return self.samples[i][1] if i >= 0 else None


class Recorder:
    """Every check (on_check) and every published snapshot (on_update), timestamped."""

    def __init__(self):
        self.checks: list[tuple[float, object]] = []
        self.updates: list[tuple[float, object]] = []
        self.lock = threading.Lock()

    def on_check(self, st):
        with self.lock:
            self.checks.append((st.last_check, st))

    def on_update(self, topo):
        with self.lock:
            self.updates.append((time.time(), topo))

    def first_update(self, after: float, pred) -> float | None:
        with self.lock:
            for t, topo in self.updates:
                if t >= after and pred(topo):
                    return t
        return None


def med(xs):
    return round(statistics.median(xs), 1) if xs else None


def pct(xs, q):
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 1) if xs else None


def lag_error(c, mon, rec, replica, delay: int, seconds: float) -> dict:
    """MASTER_DELAY=delay on `replica`; compare every monitor reading with the truth at that instant."""
    replica.query("STOP SLAVE")
    replica.query(f"CHANGE MASTER TO MASTER_DELAY={delay}")
    replica.query("START SLAVE")
    truth = Truth(replica)
    truth.start()
    try:
        time.sleep(delay + 2.0)  # the delayed stream reaches the replica's apply point
        start = time.time()
        time.sleep(seconds)
        end = time.time()
    finally:
        truth.stop.set()
        truth.join()
        replica.query("STOP SLAVE")
        replica.query("CHANGE MASTER TO MASTER_DELAY=0")
        replica.query("START SLAVE")
    errors, measured, true = [], [], []
    with rec.lock:
        checks = [(t, st) for t, st in rec.checks if st.name == replica.name and start <= t <= end]
    for t, st in checks:
        lag = truth.lag_at(t)
        if lag is None or st.lag_ms is None:
            continue
        errors.append(st.lag_ms - lag * 1000)
        measured.append(st.lag_ms)
        true.append(lag * 1000)
    absolute = [abs(e) for e in errors]
    return {"delay_s": delay, "readings": len(errors), "skipped_burst": len(checks) - len(errors),
            "median_abs_error_ms": med(absolute), "p95_abs_error_ms": pct(absolute, 0.95),
            "max_abs_error_ms": round(max(absolute), 1) if absolute else None,
            "mean_error_ms": round(statistics.fmean(errors), 1) if errors else None,
            "true_lag_ms_range": [round(min(true)), round(max(true))] if true else None,
            "measured_lag_ms_range": [round(min(measured)), round(max(measured))] if measured else None}


def wait_readable(mon, name: str, want: bool, timeout: float) -> bool:
    return mon.wait_until(lambda t: t.servers[name].readable is want, timeout)


def threshold_to_eviction(c, mon, rec, replica, max_lag: float, reps: int) -> dict:
    """FLUSH TABLES WITH READ LOCK on the replica freezes its SQL thread: lag grows at 1 s/s.

    Crossing instant = newest applied row ts (at the lock) + max_replica_lag; eviction instant =
    the first published snapshot with readable False.
    """
    delays, lag_at_eviction = [], []
    for _ in range(reps):
        wait_readable(mon, replica.name, True, 10)
        truth = Truth(replica)
        truth.start()
        time.sleep(0.3)
        conn = replica.connect()
        try:
            with conn.cursor() as cur:
                cur.execute("FLUSH TABLES WITH READ LOCK")
            locked = time.time()
            time.sleep(0.05)
            newest = truth.newest_at(time.time())  # the SQL thread is now frozen at this row
            ok = wait_readable(mon, replica.name, False, max_lag + 3)
            gone = rec.first_update(locked, lambda t: not t.servers[replica.name].readable)
        finally:
            with conn.cursor() as cur:
                cur.execute("UNLOCK TABLES")
            conn.close()
            truth.stop.set()
            truth.join()
        if ok and gone and newest:
            delays.append((gone - (newest + max_lag)) * 1000)
            lag_at_eviction.append((gone - newest) * 1000)
        wait_readable(mon, replica.name, True, 10)
    return {"reps": reps, "measured": len(delays), "median_ms": med(delays), "max_ms": round(max(delays), 1),
            "all_ms": [round(d, 1) for d in delays],
            "true_lag_at_eviction_ms_median": med(lag_at_eviction)}


def signal_to_removal(c, mon, rec, replica, sig: int, reps: int) -> dict:
    """Time from the signal to the first snapshot where the replica is out of the read pool."""
    out, other_gaps = [], []
    other = next(n for n in c.replicas if n is not replica)
    for _ in range(reps):
        wait_readable(mon, replica.name, True, 15)
        sent = time.time()
        replica.kill(sig, wait=False)
        ok = wait_readable(mon, replica.name, False, 10)
        gone = rec.first_update(sent, lambda t: not t.servers[replica.name].readable)
        if ok and gone:
            out.append((gone - sent) * 1000)
        if sig == signal.SIGSTOP:
            time.sleep(1.0)
            with rec.lock:
                ts = [t for t, st in rec.checks if st.name == other.name and t >= sent]
            other_gaps += [(b - a) * 1000 for a, b in zip(ts, ts[1:])]
            os.kill(replica.pid(), signal.SIGCONT)
        else:
            c.up()
        wait_readable(mon, replica.name, True, 15)
    res = {"reps": reps, "measured": len(out), "median_ms": med(out), "max_ms": round(max(out), 1) if out else None,
           "all_ms": [round(x, 1) for x in out]}
    if other_gaps:
        res["other_replica_check_gap_ms_max"] = round(max(other_gaps), 1)
        res["other_replica_check_gap_ms_median"] = med(other_gaps)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    reps = 3 if args.quick else 7
    window = 5.0 if args.quick else 10.0
    results: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                     "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                              "loadavg_start": os.getloadavg()}}
    with tempfile.TemporaryDirectory(prefix="rwp-monfig-") as tmp, running_cluster(tmp, replicas=2) as c:
        cfg = load_config(str(c.config_path))
        m = cfg.monitor
        results["config"] = {"interval": m.interval, "heartbeat_interval": m.heartbeat_interval,
                             "read_timeout": m.read_timeout, "connect_timeout": m.connect_timeout,
                             "failcount": m.failcount, "readmit_after": m.readmit_after,
                             "max_replica_lag": cfg.routing.max_replica_lag}
        results["mariadb"] = c.primary.variable("version")
        rec = Recorder()
        mon = Monitor(cfg, rec.on_update, on_check=rec.on_check).start()
        load = Load(c.primary)
        load.start()
        try:
            r1, r2 = c.replicas
            wait_readable(mon, r1.name, True, 10)
            print("lag error ...", flush=True)
            results["lag_error"] = [lag_error(c, mon, rec, r1, d, window) for d in (2, 5)]
            print("threshold -> eviction ...", flush=True)
            results["threshold_to_eviction"] = threshold_to_eviction(c, mon, rec, r1, cfg.routing.max_replica_lag, reps)
            print("SIGKILL -> removal ...", flush=True)
            results["sigkill_to_removal"] = signal_to_removal(c, mon, rec, r2, signal.SIGKILL, reps)
            print("SIGSTOP -> removal ...", flush=True)
            results["sigstop_to_removal"] = signal_to_removal(c, mon, rec, r2, signal.SIGSTOP, max(3, reps // 2))
        finally:
            load.stop.set()
            load.join()
            mon.stop()
    results["host"]["loadavg_end"] = os.getloadavg()
    write(results)
    return 0


def write(res: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    day = datetime.date.today().isoformat()
    (RESULTS / f"monitor-{day}.json").write_text(json.dumps(res, indent=2) + "\n")
    cfg, le, te = res["config"], res["lag_error"], res["threshold_to_eviction"]
    kill, stop = res["sigkill_to_removal"], res["sigstop_to_removal"]
    lines = [
        f"# Monitor figures ({res['date']})", "",
        f"MariaDB {res['mariadb']}, {res['host']['cpus']} CPUs, Python {res['host']['python']}, "
        f"load average {res['host']['loadavg_start'][0]:.1f} at start. Settings: interval {cfg['interval']} s, "
        f"heartbeat_interval {cfg['heartbeat_interval']} s, max_replica_lag {cfg['max_replica_lag']} s, "
        f"failcount {cfg['failcount']}, readmit_after {cfg['readmit_after']}, read_timeout {cfg['read_timeout']} s. "
        "Write load: one row every 10 ms on the primary. Produced by `python -m benchmarks.monitor_figures`.", "",
        "## Lag measurement error (target <= 100 ms)", "",
        "Every monitor reading on the delayed replica compared with the true lag at that instant "
        "(the instant minus the timestamp of the newest load row applied there, probed every ~3 ms).", "",
        "| MASTER_DELAY | readings | median abs error | p95 abs error | max abs error | mean error | true lag range |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in le:
        lines.append(f"| {r['delay_s']} s | {r['readings']} | {r['median_abs_error_ms']} ms | {r['p95_abs_error_ms']} ms "
                     f"| {r['max_abs_error_ms']} ms | {r['mean_error_ms']} ms | {r['true_lag_ms_range']} ms |")
    lines += [
        "", "## Threshold crossing -> out of the read pool (target <= 500 ms)", "",
        "FLUSH TABLES WITH READ LOCK on the replica freezes its SQL thread; the true lag crosses "
        "max_replica_lag at (newest applied row ts + max_replica_lag); the end is the first published "
        "snapshot with readable = false.", "",
        f"median {te['median_ms']} ms, max {te['max_ms']} ms over {te['measured']} repetitions "
        f"(all: {te['all_ms']} ms; true lag at eviction, median {te['true_lag_at_eviction_ms_median']} ms).", "",
        "## SIGKILL -> out of the read pool (target <= 1 s)", "",
        f"median {kill['median_ms']} ms, max {kill['max_ms']} ms over {kill['measured']} repetitions (all: {kill['all_ms']} ms).",
        "", "## SIGSTOP (hung server) -> out of the read pool", "",
        f"median {stop['median_ms']} ms, max {stop['max_ms']} ms over {stop['measured']} repetitions "
        f"(all: {stop['all_ms']} ms): read_timeout/connect_timeout x failcount. Meanwhile the other replica's "
        f"checks kept their pace: median gap {stop.get('other_replica_check_gap_ms_median')} ms, "
        f"max {stop.get('other_replica_check_gap_ms_max')} ms.", "",
    ]
    (RESULTS / f"monitor-{day}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
