"""Several rwproxy instances coordinated through etcd (issue 24), as clients see them.

Each failover round starts a fresh semi-sync sandbox (primary + 2 replicas), a 3-member etcd on
loopback, rwproxy instances with default settings (1 or 3, alternating) and HAProxy in front of
them, runs 8 clients inserting through HAProxy, and SIGKILLs the primary. Measured: the time from
the kill to the first acknowledged write through HAProxy; from the leader publishing the new
primary to the last instance applying it (log timestamps, one clock); acknowledged writes lost.
Then the throughput of 3 instances against 1 behind the same HAProxy (sysbench point select),
with sysbench straight to the primary in the same rounds.

    python -m benchmarks.coordination [--rounds 3] [--threads 32] [--time 15]
Results: benchmarks/results/coordination-<date>.json / .md (and -latest), and a PNG of the
failover times.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pymysql

from proxy.config.load import build_config, write_config
from proxy.runtime.launcher import ProxyProcess
from proxy.sandbox.etcd import EtcdCluster
from proxy.sandbox.fleet import coordination_section, distinct_ports, haproxy_binary, haproxy_config
from proxy.testing.clusters import running_cluster
from proxy.testing.loadgen import Load, insert_numbered

from .report import save
from .run import SB_DB, sysbench

STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _status(cfg: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "proxy", "status", "--json", "--config", cfg], capture_output=True,
                       text=True, timeout=20)
    return json.loads(r.stdout)


def _primary(cfg: str) -> str | None:
    up = [s["name"] for s in _status(cfg)["servers"] if s["role"] == "primary" and s["state"] == "up"]
    return up[0] if len(up) == 1 else None


def _wait(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return True
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.1)
    return False


def _ts(line: str) -> float | None:
    m = STAMP.match(line)
    return datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if m else None


class Fleet:
    def __init__(self, cl, tmp: Path, n: int, etcd: EtcdCluster | None, workers: int = 1):
        self.procs, self.cfgs, self.logs = [], [], []
        servers = []
        name = f"b{int(time.time() * 1000)}"  # one name for the whole fleet: a key prefix of its own
        ports = distinct_ports(2 * n + 1)
        for i in range(1, n + 1):
            port, mport = ports[2 * i - 2: 2 * i]
            data = {"proxy": {"listen": f"127.0.0.1:{port}", "workers": workers},
                    "backends": [{"name": x.name, "host": "127.0.0.1", "port": x.port} for x in cl.nodes],
                    "users": [{"name": "app", "password": "app"}], "monitor": {"user": "rwproxy", "password": cl.password("rwproxy")},
                    "failover": {"replication_user": "repl", "replication_password": cl.password("repl")},
                    "metrics": {"listen": f"127.0.0.1:{mport}"}}
            if etcd is not None:
                data["cluster"] = coordination_section(etcd.endpoints, f"p{i}", name=name)
            cfg = str(tmp / f"p{i}.toml")
            write_config(build_config(data, source=cfg), cfg)
            self.cfgs.append(cfg)
            self.logs.append(str(tmp / f"p{i}.log"))
            self.procs.append(ProxyProcess(cfg, "127.0.0.1", port, log_path=self.logs[-1]).start())
            servers.append((f"p{i}", port, mport))
        self.front = ports[-1]
        (tmp / "haproxy.cfg").write_text(haproxy_config(self.front, servers))
        self.hp = subprocess.Popen([haproxy_binary(), "-db", "-f", str(tmp / "haproxy.cfg")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def connect(self):
        return pymysql.connect(host="127.0.0.1", port=self.front, user="app", password="app", database="app",
                               autocommit=True, read_timeout=30, connect_timeout=5)

    def close(self):
        self.hp.terminate()
        self.hp.wait(10)
        for p in self.procs:
            p.stop()


def failover_round(n: int, tmp: Path, etcd: EtcdCluster | None) -> dict:
    with running_cluster(tmp / "sandbox", replicas=2, semi_sync=True, port_start=27306) as cl:
        with cl.primary.connect(database="app") as c, c.cursor() as cur:
            cur.execute("CREATE TABLE acked (w INT, seq INT, PRIMARY KEY (w, seq))")
        cl.wait_replicas_caught_up(30)
        f = Fleet(cl, tmp, n, etcd)
        try:
            if not _wait(lambda: all(_primary(c) == "node1" for c in f.cfgs), 30):
                raise RuntimeError("the instances did not agree on node1")
            if etcd is not None and not _wait(lambda: len({_status(c)["coordination"]["leader"] for c in f.cfgs}
                                                           - {None}) == 1, 30):
                raise RuntimeError("no leader")
            with Load(f.connect, insert_numbered, clients=8, pause=0.005, max_seconds=60) as w:
                _wait(lambda: w.count_since(0) > 100, 20)
                t0 = time.monotonic()
                cl.primary.kill(signal.SIGKILL)
                _wait(lambda: w.first_ok_after(t0 + 0.005) is not None, 30)
                time.sleep(2.0)
            first = w.first_ok_after(t0 + 0.005)
            new = cl.node(_primary(f.cfgs[0]))
            acked = {v for _, v in w.ok}
            with new.connect(database="app") as c, c.cursor() as cur:
                cur.execute("SELECT w, seq FROM acked")
                missing = len(acked - set(cur.fetchall()))
            spread = None
            if etcd is not None:  # the leader's publish line against each follower's applied line
                texts = [open(p, errors="replace").read().splitlines() for p in f.logs]
                pub = [_ts(x) for t in texts for x in t if "publish " in x and "as the primary" in x]
                applied = [_ts(x) for t in texts for x in t if "applied" in x and f"primary {new.name}" in x]
                if pub and applied:
                    spread = round((max(applied) - min(pub)) * 1000, 1)
            promotions = sum(open(p, errors="replace").read().count("failover done in") for p in f.logs)
            return {"instances": n, "first_ack_after_ms": round((first - t0) * 1000, 1) if first else None,
                    "decision_to_last_instance_ms": spread, "acknowledged": len(acked), "lost": missing,
                    "failed_statements": len(w.errors), "promotions": promotions}
        finally:
            f.close()


def throughput(tmp: Path, etcd: EtcdCluster, rounds: int, threads: int, seconds: float) -> list[dict]:
    """sysbench straight to the primary, and through HAProxy to: one instance with one worker,
    three coordinated instances with one worker each, and one instance with three workers (the
    same worker processes as the three instances, one control plane: what coordination costs)."""
    out = []
    with running_cluster(tmp / "tp-sandbox", replicas=2, port_start=28306) as cl:
        with cl.primary.connect() as c, c.cursor() as cur:
            cur.execute(f"CREATE DATABASE IF NOT EXISTS {SB_DB}")
            cur.execute(f"GRANT ALL ON {SB_DB}.* TO 'app'@'%'")
        sysbench("oltp_point_select", "127.0.0.1", cl.primary.port, 4, 0, 4, 10000, action="prepare")
        cl.wait_replicas_caught_up(60)
        fleets = {}
        try:
            for key, n, workers in (("one", 1, 1), ("three", 3, 1), ("one_3w", 1, 3)):
                d = tmp / f"tp-{key}"
                d.mkdir()
                fleets[key] = Fleet(cl, d, n, etcd if n == 3 else None, workers=workers)
            for c in fleets["three"].cfgs:
                _wait(lambda: _primary(c) == "node1", 30)
            for r in range(rounds):
                row = {"round": r + 1}
                order = [("direct", cl.primary.port)] + [(k, fleets[k].front) for k in ("one", "three", "one_3w")]
                for name, port in order[r % len(order):] + order[:r % len(order)]:
                    say(f"throughput round {r + 1}: {name}")
                    row[name] = sysbench("oltp_point_select", "127.0.0.1", port, threads, seconds, 4, 10000)["qps"]
                out.append(row)
        finally:
            for fl in fleets.values():
                fl.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--time", type=float, default=15)
    ap.add_argument("--only", choices=("failover", "throughput"), default=None,
                    help="run one part; the other is kept from the last results file")
    args = ap.parse_args(argv)
    last = Path(__file__).parent / "results" / "coordination-latest.json"
    kept = json.loads(last.read_text()) if args.only and last.exists() else {}
    tmp = Path(tempfile.mkdtemp(prefix="rwproxy-bench-coord-"))
    etcd = EtcdCluster.create(tmp / "etcd", 3, base_port=29379).start()
    try:
        fo = kept.get("failover", []) if args.only == "throughput" else []
        for r in range(args.rounds if args.only != "throughput" else 0):
            for n in (1, 3) if r % 2 == 0 else (3, 1):
                say(f"failover round {r + 1}: {n} instance(s)")
                d = tmp / f"fo-{r}-{n}"
                d.mkdir()
                fo.append({"round": r + 1, **failover_round(n, d, etcd if n == 3 else None)})
                say(str(fo[-1]))
        tp = kept.get("throughput", []) if args.only == "failover" else \
            throughput(tmp, etcd, args.rounds, args.threads, args.time)
    finally:
        etcd.stop()
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "failover": fo, "throughput": tp, "threads": args.threads, "seconds": args.time, "sb_db": SB_DB}
    save("coordination", result, markdown(result))
    plot(result)
    return 0


def _med(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 1) if xs else None


def markdown(r: dict) -> str:
    fo, tp = r["failover"], r["throughput"]
    one = [x["first_ack_after_ms"] for x in fo if x["instances"] == 1]
    three = [x["first_ack_after_ms"] for x in fo if x["instances"] == 3]
    spread = [x["decision_to_last_instance_ms"] for x in fo if x["instances"] == 3]
    lines = [f"# Several instances, one cluster (issue 24), {r['date']}", "",
             "Semi-sync primary + 2 replicas, 8 writers through HAProxy, primary SIGKILLed; a 3-member etcd on "
             "loopback; default failover settings; rounds alternate 1 and 3 instances.", "",
             "| round | instances | kill -> first acknowledged write, ms | leader's publish -> last instance applied, ms "
             "| promotions | acknowledged | lost | failed statements |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for x in fo:
        lines.append(f"| {x['round']} | {x['instances']} | {x['first_ack_after_ms']} | "
                     f"{x['decision_to_last_instance_ms'] if x['decision_to_last_instance_ms'] is not None else '-'} | "
                     f"{x['promotions']} | {x['acknowledged']} | {x['lost']} | {x['failed_statements']} |")
    lines += ["", f"Median kill -> first acknowledged write: **{_med(one)} ms with one instance, {_med(three)} ms with "
                  f"three** (difference {round(_med(three) - _med(one), 1) if one and three else '-'} ms); the leader's "
                  f"decision reached the last instance in a median {_med(spread)} ms.", "",
              f"Throughput, oltp_point_select, {r['threads']} threads, {r['seconds']:g} s per run, the same HAProxy "
              "(TCP, default threads) in front of each setup, rounds rotating the order; rwproxy in its default "
              "split configuration:", "",
              "| round | direct QPS | 1 instance (1 worker) | 3 instances (1 worker each) | 1 instance, 3 workers "
              "| 1 / direct | 3 / direct | 3 instances / 1 | 3 instances / 1 instance with 3 workers |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in tp:
        w3, three = x.get("one_3w"), x["three"]
        w3_qps = f"{w3:.0f}" if w3 else "-"
        w3_ratio = f"{three / w3:.2f}" if w3 else "-"
        lines.append(f"| {x['round']} | {x['direct']:.0f} | {x['one']:.0f} | {three:.0f} | {w3_qps} | "
                     f"{x['one'] / x['direct']:.2f} | {three / x['direct']:.2f} | {three / x['one']:.2f} | {w3_ratio} |")
    if tp:
        lines += ["", f"Medians: 3 instances / 1 instance **{_med([x['three'] / x['one'] for x in tp])}x**"
                      + (f"; 3 instances / 1 instance with 3 workers **{_med([x['three'] / x['one_3w'] for x in tp if x.get('one_3w')])}x**"
                         if any(x.get("one_3w") for x in tp) else "") + "."]
    return "\n".join(lines) + "\n"


def plot(r: dict) -> None:
    """coordination-latest.png: failover time per round (1 vs 3 instances) and throughput per setup."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for n, color in ((1, "tab:blue"), (3, "tab:orange")):
        pts = [(x["round"], x["first_ack_after_ms"]) for x in r["failover"] if x["instances"] == n]
        a.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color,
               label=f"{n} instance{'s' if n > 1 else ''}")
    a.set_xticks(sorted({x["round"] for x in r["failover"]}))
    a.set_xlabel("round")
    a.set_ylabel("ms")
    a.set_ylim(bottom=0)
    a.set_title("primary SIGKILL -> first acknowledged write")
    a.legend()
    keys = [("direct", "direct"), ("one", "1 instance"), ("three", "3 instances"), ("one_3w", "1 instance,\n3 workers")]
    keys = [(k, label) for k, label in keys if all(k in x for x in r["throughput"])]
    for i, x in enumerate(r["throughput"]):
        w = 0.8 / max(1, len(r["throughput"]))
        b.bar([j + i * w for j in range(len(keys))], [x[k] for k, _ in keys], width=w, label=f"round {x['round']}")
    b.set_xticks([j + 0.4 - 0.4 / max(1, len(r["throughput"])) for j in range(len(keys))])
    b.set_xticklabels([label for _, label in keys])
    b.set_ylabel("QPS")
    b.set_title(f"oltp_point_select, {r['threads']} threads, through HAProxy")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(__file__).parent / "results" / "coordination-latest.png", dpi=100)


if __name__ == "__main__":
    sys.exit(main())
