"""Issue 21: the operator surface against real servers, a real Prometheus and a real HAProxy:
/metrics (promtool, a Prometheus scraping it, the Grafana dashboard's queries), the health
checks, hot reload (rwproxy reload, SIGHUP, RELOAD CONFIG), drain, and secrets."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pymysql
import pytest

from helpers import ensure_backend_user, start_proxy
from proxy.runtime.launcher import ProxyProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
ADMIN_PW = "op-admin-pw"


def http(port: int, path: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def cli(p, *args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", *args, "--config", p.process.config_path],
                          capture_output=True, text=True, timeout=timeout)


def wait_for(predicate, timeout: float, what: str, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def samples(text: str) -> dict[str, list[tuple[dict, float]]]:
    """Prometheus text format -> {sample name: [(labels, value)]} (enough for these tests)."""
    out: dict = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$', line)
        assert m, line
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m[3] or ""))
        out.setdefault(m[1], []).append((labels, float(m[4])))
    return out


@pytest.fixture(scope="module")
def op_proxy(cluster, tmp_path_factory):
    mport, aport = free_port(), free_port()
    p = start_proxy(cluster, tmp_path_factory.mktemp("operator"), metrics={"listen": f"127.0.0.1:{mport}"},
                    admin={"listen": f"127.0.0.1:{aport}", "users": [{"name": "admin", "password": ADMIN_PW}]})
    p.metrics_port, p.admin_port = mport, aport
    try:
        yield p
    finally:
        p.process.stop()


def _traffic(p, n=20):
    """n writes from one session, n reads from another (no writes of its own: they go to replicas)."""
    wait_for(lambda: sum(v for _, v in samples(http(p.metrics_port, "/metrics")[1])["rwproxy_server_in_read_pool"]) == 2,
             30, "both replicas in the read pool")
    w, r = p.connect(autocommit=True), p.connect(autocommit=True)
    with w.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS op_t (id INT PRIMARY KEY AUTO_INCREMENT, v INT)")
        for i in range(n):
            cur.execute("INSERT INTO op_t (v) VALUES (%s)", (i,))
    p.cluster.wait_replicas_caught_up(30)
    with r.cursor() as cur:
        for i in range(n):
            cur.execute("SELECT COUNT(*) FROM op_t WHERE v >= %s", (i,))
        try:
            cur.execute("SELECT * FROM no_such_table_here")
        except pymysql.err.ProgrammingError:
            pass
    w.close()
    r.close()


# ---- /metrics ----------------------------------------------------------------------------------

REQUIRED = [
    "rwproxy_statements_total", "rwproxy_statement_duration_seconds_bucket", "rwproxy_client_connections",
    "rwproxy_backend_connections", "rwproxy_pool_connections", "rwproxy_replica_lag_seconds", "rwproxy_server_up",
    "rwproxy_server_state", "rwproxy_server_in_read_pool", "rwproxy_failovers_total", "rwproxy_switchovers_total",
    "rwproxy_pinned_sessions", "rwproxy_shared_statements_total", "rwproxy_digest_cache_hits_total",
    "rwproxy_digest_cache_misses_total", "rwproxy_config_reloads_total", "rwproxy_ready", "rwproxy_cpu_seconds_total",
]


def test_metrics_pass_promtool_and_count_across_workers(op_proxy):
    _traffic(op_proxy)
    status, text = http(op_proxy.metrics_port, "/metrics")
    assert status == 200
    lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    got = samples(text)
    missing = [m for m in REQUIRED if m not in got]
    assert not missing, missing
    st = {(lb["route"], lb["server"], lb["outcome"]): v for lb, v in got["rwproxy_statements_total"]}
    primary = op_proxy.cluster.primary.name
    assert st[("write", primary, "ok")] >= 20  # the inserts (and the CREATE)
    # route is what the statement is; server is where it went: the reads went to the replicas
    assert sum(v for (route, server, outcome), v in st.items()
               if route == "read" and server != primary and outcome == "ok") >= 20, st
    assert sum(v for (_, _, outcome), v in st.items() if outcome == "error") >= 1
    # the workers' counters are merged: both worker processes report CPU
    procs = {lb["process"] for lb, _ in got["rwproxy_cpu_seconds_total"]}
    assert {"supervisor", "worker0", "worker1"} <= procs
    assert {lb["server"] for lb, v in got["rwproxy_server_up"] if v == 1} == {"node1", "node2", "node3"}
    lag = {lb["server"] for lb, _ in got["rwproxy_replica_lag_seconds"]}
    assert {"node2", "node3"} <= lag
    count = [v for lb, v in got["rwproxy_statement_duration_seconds_count"] if lb["route"] == "read"]
    assert count and count[0] >= 20


def test_grafana_dashboard_asks_only_for_metrics_that_exist(op_proxy):
    _traffic(op_proxy, 2)
    text = http(op_proxy.metrics_port, "/metrics")[1]
    exported = set(samples(text))  # and families with no sample yet (no rules: no rule_hits samples)
    for name, kind in re.findall(r"^# TYPE (\w+) (\w+)$", text, re.M):
        exported |= {name, name + "_total"} if kind == "counter" else {name}
        if kind == "histogram":
            exported |= {name + "_bucket", name + "_sum", name + "_count"}
    dash = json.loads((ROOT / "config" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dash["panels"] for t in panel["targets"]]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
    assert len(exprs) >= 20
    unknown = sorted({name for e in exprs for name in re.findall(r"\brwproxy_\w+", e)} - exported)
    assert not unknown, unknown
    # and every expression parses as PromQL (promtool checks a rule file of them)
    promql = [e for e in exprs if not e.startswith("label_values(")]  # (a Grafana function, not PromQL)
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:q{i}", "expr": e.replace(
        "$__rate_interval", "1m").replace('"$instance"', '".*"')} for i, e in enumerate(promql)]}]}
    path = Path(op_proxy.process.config_path).with_name("dashboard-rules.json")
    path.write_text(json.dumps(rules))
    r = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_real_prometheus_scrapes_rwproxy(op_proxy, tmp_path):
    prom = shutil.which("prometheus")
    assert prom, "prometheus is installed by dev.sh (Debian package prometheus)"
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: rwproxy\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{op_proxy.metrics_port}']\n")
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen([prom, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _traffic(op_proxy, 5)

        def query():
            try:
                status, body = http(port, "/api/v1/query?" + urllib.parse.urlencode(
                    {"query": 'sum(rwproxy_statements_total{outcome="ok",route="read"})'}), timeout=2)
            except OSError:
                return None
            if status != 200:
                return None
            result = json.loads(body)["data"]["result"]
            return result and float(result[0]["value"][1]) > 0 and result

        result = wait_for(query, 60, "Prometheus to scrape rwproxy")
        assert float(result[0]["value"][1]) >= 5
        status, body = http(port, "/api/v1/targets")
        health = [t["health"] for t in json.loads(body)["data"]["activeTargets"]]
        assert health == ["up"]
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def test_health_endpoints(op_proxy):
    assert http(op_proxy.metrics_port, "/health/live") == (200, "live\n")
    status, body = http(op_proxy.metrics_port, "/health/ready")
    assert status == 200 and body.startswith("ready: primary node1"), body
    status, body = http(op_proxy.metrics_port, "/health")
    assert status == 200 and json.loads(body)["ready"] is True
    assert http(op_proxy.metrics_port, "/nothing")[0] == 404
    # a read-only primary still serves reads (ready), and the body says that writes fail
    op_proxy.cluster.primary.query("SET GLOBAL read_only = 1")
    try:
        wait_for(lambda: "(read-only" in http(op_proxy.metrics_port, "/health/ready")[1], 10, "ready to say read-only")
        assert http(op_proxy.metrics_port, "/health/ready") == (200, "ready: primary node1 (read-only: writes get "
                                                                     "its 1290)\n")
    finally:
        op_proxy.cluster.primary.query("SET GLOBAL read_only = 0")
    wait_for(lambda: http(op_proxy.metrics_port, "/health/ready") == (200, "ready: primary node1\n"), 10, "writable")


def test_commands_naming_an_unknown_server_say_which_exist(op_proxy):
    """(`rwproxy rejoin nosuch` printed `KeyError: 'nosuch'`.)"""
    for args in (("rejoin", "nosuch"), ("server", "nosuch", "offline"), ("switchover", "--to", "nosuch")):
        r = cli(op_proxy, *args)
        assert r.returncode == 1 and "Traceback" not in r.stderr and "KeyError" not in r.stdout + r.stderr, (args, r)
        assert "nosuch" in r.stdout + r.stderr and "node1" in r.stdout + r.stderr, (args, r.stdout, r.stderr)


# ---- hot reload -----------------------------------------------------------------------------------

def _open_transaction(conn, table: str) -> None:
    """An empty `table`, then a transaction on `conn` that has inserted row 1 and not committed."""
    with conn.cursor() as cur:
        cur.execute(f"CREATE TABLE IF NOT EXISTS {table} (id INT PRIMARY KEY)")
        cur.execute(f"DELETE FROM {table}")
        conn.commit()
        cur.execute(f"INSERT INTO {table} VALUES (1)")


def _edit(p, change) -> None:
    """Rewrite the proxy's TOML file through a dict."""
    path = Path(p.process.config_path)
    data = tomllib.loads(path.read_text())
    change(data)
    path.write_text(_toml(data))


def _toml(data: dict) -> str:
    from proxy.config.load import build_config

    return build_config(data).to_toml()


def test_reload_applies_changes_without_dropping_sessions(cluster, tmp_path):
    ensure_backend_user(cluster, "reload_u", "reload-pw")
    mport, aport = free_port(), free_port()
    p = start_proxy(cluster, tmp_path, metrics={"listen": f"127.0.0.1:{mport}"},
                    admin={"listen": f"127.0.0.1:{aport}", "users": [{"name": "admin", "password": ADMIN_PW}]})
    try:
        in_trx, idle = p.connect(autocommit=False), p.connect()
        _open_transaction(in_trx, "reload_t")  # a transaction stays open across the reloads
        with pytest.raises(pymysql.err.OperationalError):
            p.connect(user="reload_u", password="reload-pw")

        def add(data):
            data["users"].append({"name": "reload_u", "password": "reload-pw"})
            data.setdefault("routing", {})["rules"] = [{"match": "^SELECT 'refused'", "route": "reject",
                                                        "error_code": 1148, "error_message": "not here"}]
            data["backends"][2]["weight"] = 7
        _edit(p, add)
        r = cli(p, "reload")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "users" in r.stdout and "backends" in r.stdout and "routing.rules" in r.stdout, r.stdout
        c = p.connect(user="reload_u", password="reload-pw")
        with c.cursor() as cur, pytest.raises(pymysql.err.MySQLError) as e:
            cur.execute("SELECT 'refused'")
        assert e.value.args[0] == 1148
        c.close()
        st = json.loads(cli(p, "status", "--json", "--tables", "servers,rules").stdout)
        assert {s["name"]: s["weight"] for s in st["tables"]["servers"]}["node3"] == 7
        assert st["tables"]["rules"][0]["hits"] == 1

        # a file with an error changes nothing: the error is returned, logged and counted
        good = Path(p.process.config_path).read_text()
        Path(p.process.config_path).write_text(good.replace('name = "reload_u"', 'name = "reload_u"\nweight = 3'))
        r = cli(p, "reload")
        assert r.returncode == 1 and "reload refused, nothing changed" in r.stdout
        assert "users[2].weight: unknown key" in r.stdout, r.stdout
        assert "refused, nothing changed" in p.process.log_tail(50)
        p.connect(user="reload_u", password="reload-pw").close()  # the running configuration stayed
        Path(p.process.config_path).write_text(good)

        # keys that need a restart are reported, not silently ignored
        _edit(p, lambda d: d["proxy"].update(workers=3))
        r = cli(p, "reload")
        assert r.returncode == 0 and "proxy.workers" in r.stdout and "needs a restart" in r.stdout, r.stdout

        # SIGHUP: the user is removed, and a backend too
        def remove(data):
            data["users"] = [u for u in data["users"] if u["name"] != "reload_u"]
            data["backends"] = [b for b in data["backends"] if b["name"] != "node3"]
        _edit(p, remove)
        os.kill(p.process.pid, signal.SIGHUP)

        def refused():
            try:
                p.connect(user="reload_u", password="reload-pw").close()
            except pymysql.err.OperationalError as e:
                return e.args[0] == 1045
            return False
        wait_for(refused, 20, "SIGHUP to remove reload_u")
        servers = json.loads(cli(p, "status", "--json", "--tables", "servers").stdout)["tables"]["servers"]
        assert [s["name"] for s in servers] == ["node1", "node2"]
        for _ in range(10):  # reads keep working on what is left
            with idle.cursor() as cur:
                cur.execute("SELECT 1")
                assert cur.fetchone() == (1,)

        # RELOAD CONFIG from the admin port brings node3 back
        _edit(p, lambda d: d["backends"].append({"name": "node3", "host": "127.0.0.1", "port": cluster.nodes[2].port}))
        a = pymysql.connect(host="127.0.0.1", port=aport, user="admin", password=ADMIN_PW)
        with a.cursor() as cur:
            cur.execute("RELOAD CONFIG")
            rows = cur.fetchall()
            assert rows[0][0] == "ok" and any("node3" in str(r) for r in rows), rows
        a.close()
        wait_for(lambda: any(s["name"] == "node3" and s["in_read_pool"] for s in json.loads(
            cli(p, "status", "--json", "--tables", "servers").stdout)["tables"]["servers"]), 30, "node3 readable")

        # through all of it, the sessions were never dropped and the open transaction commits
        with in_trx.cursor() as cur:
            cur.execute("INSERT INTO reload_t VALUES (2)")
        in_trx.commit()
        with idle.cursor() as cur:
            cur.execute("SELECT /* primary */ COUNT(*) FROM reload_t FOR UPDATE")
            assert cur.fetchone() == (2,)
        got = samples(http(mport, "/metrics")[1])["rwproxy_config_reloads_total"]
        assert {lb["outcome"]: v for lb, v in got} == {"ok": 4.0, "failed": 1.0}

        # an admin password changed in the file: the old one stops working at once
        _edit(p, lambda d: d["admin"]["users"][0].update(password="new-admin-pw"))
        assert cli(p, "reload").returncode == 0
        with pytest.raises(pymysql.err.OperationalError) as e:
            pymysql.connect(host="127.0.0.1", port=aport, user="admin", password=ADMIN_PW)
        assert e.value.args[0] == 1045
        pymysql.connect(host="127.0.0.1", port=aport, user="admin", password="new-admin-pw").close()
    finally:
        p.process.stop()


# ---- drain ------------------------------------------------------------------------------------------

def test_drain_lets_transactions_finish_then_exits(cluster, tmp_path):
    mport = free_port()
    p = start_proxy(cluster, tmp_path, metrics={"listen": f"127.0.0.1:{mport}"},
                    proxy={"drain_grace": 3.0, "shutdown_timeout": 30})
    try:
        trx, idle = p.connect(autocommit=False), p.connect()
        _open_transaction(trx, "drain_t")
        r = cli(p, "drain")
        assert r.returncode == 0 and "draining" in r.stdout, r.stdout + r.stderr
        assert http(mport, "/health/ready") == (503, "not ready: draining\n")
        assert http(mport, "/health/live")[0] == 200
        p.connect().close()  # within drain_grace a new client is still served (the balancer has not noticed yet)
        # the idle session is closed as a restarting server would close it: the next statement
        # fails with "server has gone away" / "lost connection", never with a wrong answer
        time.sleep(4.0)
        with pytest.raises(pymysql.err.OperationalError) as e:
            with idle.cursor() as cur:
                cur.execute("SELECT 1")
        assert e.value.args[0] in (2006, 2013), e.value
        # past drain_grace new clients are not accepted
        with pytest.raises(pymysql.err.OperationalError):
            p.connect(connect_timeout=2)
        # the transaction goes on and commits
        with trx.cursor() as cur:
            cur.execute("INSERT INTO drain_t VALUES (2)")
        trx.commit()
        assert p.process.proc.wait(20) == 0  # then the proxy exits by itself
        with cluster.primary.connect() as c, c.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM app.drain_t")
            assert cur.fetchone() == (2,)
        assert "draining" in p.process.log_tail(40)
    finally:
        p.process.stop()


def test_sigterm_drains_too(cluster, tmp_path):
    p = start_proxy(cluster, tmp_path, proxy={"shutdown_timeout": 30}, stats={"enabled": False})
    try:
        trx = p.connect(autocommit=False)
        with trx.cursor() as cur:
            cur.execute("SELECT 1 FOR UPDATE")
        # ([stats] enabled = false: no digests are kept)
        assert json.loads(cli(p, "status", "--json", "--tables", "digests").stdout)["tables"]["digests"] == []
        os.kill(p.process.pid, signal.SIGTERM)
        time.sleep(1.0)
        assert p.process.proc.poll() is None  # still there: a transaction is open
        with trx.cursor() as cur:
            cur.execute("SELECT 2")
            assert cur.fetchone() == (2,)
        trx.commit()
        assert p.process.proc.wait(20) == 0
    finally:
        p.process.stop()


def test_shutdown_timeout_ends_a_transaction_that_never_finishes(cluster, tmp_path):
    p = start_proxy(cluster, tmp_path, proxy={"shutdown_timeout": 2.0})
    try:
        trx = p.connect(autocommit=False)
        _open_transaction(trx, "stuck_t")  # and the client never commits
        os.kill(p.process.pid, signal.SIGTERM)
        assert p.process.proc.wait(30) == 0
        assert "shutdown_timeout reached" in p.process.log_tail(40)
        with pytest.raises(pymysql.err.OperationalError):
            with trx.cursor() as cur:
                cur.execute("COMMIT")
        with cluster.primary.connect() as c, c.cursor() as cur:  # rolled back, as when a server restarts
            cur.execute("SELECT COUNT(*) FROM app.stuck_t")
            assert cur.fetchone() == (0,)
    finally:
        p.process.stop()


def test_stats_settings_bound_what_is_kept(cluster, tmp_path):
    mport = free_port()
    p = start_proxy(cluster, tmp_path, proxy={"workers": 1}, metrics={"listen": f"127.0.0.1:{mport}"},
                    stats={"max_digests": 100, "max_digest_length": 64, "events": 10})
    try:
        c = p.connect(autocommit=True)
        with c.cursor() as cur:
            for i in range(300):
                cur.execute(f"SELECT {i} AS c{i}")
            cur.execute("SELECT 1 AS " + ", 1 AS ".join(f"long_column_name_{i}" for i in range(20)))
        c.close()
        for _ in range(12):
            assert cli(p, "reload").returncode == 0  # each one an event
        st = json.loads(cli(p, "status", "--json", "--tables", "digests,events").stdout)["tables"]
        assert 0 < len(st["digests"]) <= 100
        assert all(len(d["digest_text"]) <= 67 for d in st["digests"])
        assert any(d["digest_text"].endswith("...") for d in st["digests"])
        assert len(st["events"]) == 10
        got = samples(http(mport, "/metrics")[1])
        assert got["rwproxy_digests_evicted_total"][0][1] >= 200 and got["rwproxy_digests"][0][1] <= 100
    finally:
        p.process.stop()


@pytest.mark.parametrize("read_only_ok", [False, True])
def test_ready_without_a_primary_only_when_configured(cluster, tmp_path, read_only_ok):
    mport = free_port()
    replicas = [{"name": n.name, "host": "127.0.0.1", "port": n.port} for n in cluster.nodes[1:]]
    p = start_proxy(cluster, tmp_path, backends=replicas, metrics={"listen": f"127.0.0.1:{mport}",
                                                                   "ready_without_primary": read_only_ok},
                    failover={"auto_failover": False, "auto_rejoin": False, "replica_heartbeat_period": 0})
    try:
        time.sleep(1.5)  # the first checks
        status, body = http(mport, "/health/ready")
        if read_only_ok:
            assert status == 200 and "read-only" in body, body
        else:
            assert (status, body) == (503, "not ready: no primary known\n")
    finally:
        p.process.stop()


# ---- behind HAProxy --------------------------------------------------------------------------------

def test_two_instances_behind_haproxy_drain_with_zero_client_errors(cluster, tmp_path):
    haproxy = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    assert haproxy, "haproxy is installed by dev.sh (Debian package haproxy)"
    ports = {name: free_port() for name in ("front", "a", "a_m", "b", "b_m", "stats")}
    a = start_proxy(cluster, tmp_path / "a", proxy={"listen": f"127.0.0.1:{ports['a']}", "drain_grace": 2.0},
                    metrics={"listen": f"127.0.0.1:{ports['a_m']}"})
    b = start_proxy(cluster, tmp_path / "b", proxy={"listen": f"127.0.0.1:{ports['b']}"},
                    metrics={"listen": f"127.0.0.1:{ports['b_m']}"})
    text = (ROOT / "config" / "haproxy.cfg").read_text()
    for old, new in (("127.0.0.1:3306", f"127.0.0.1:{ports['front']}"), ("127.0.0.1:6033", f"127.0.0.1:{ports['a']}"),
                     ("port 9033", f"port {ports['a_m']}"), ("127.0.0.1:6133", f"127.0.0.1:{ports['b']}"),
                     ("port 9133", f"port {ports['b_m']}"), ("127.0.0.1:8404", f"127.0.0.1:{ports['stats']}")):
        assert old in text, old
        text = text.replace(old, new)
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(text)
    log = open(tmp_path / "haproxy.log", "wb")
    hp = subprocess.Popen([haproxy, "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True)

    def up():
        try:
            status, body = http(ports["stats"], "/;csv", timeout=2)
        except OSError:
            return None
        rows = {r.split(",")[1]: r.split(",")[17] for r in body.splitlines() if r.startswith("rwproxy,")}
        return rows if rows.get("rwproxy1") and rows.get("rwproxy2") and status == 200 else None

    def b_statements():
        return sum(v for _, v in samples(http(ports["b_m"], "/metrics")[1])["rwproxy_statements_total"])

    stop = threading.Event()
    ok, errors = [0] * 8, []

    def client(i):
        n = 0
        while not stop.is_set() and n < 100000:
            n += 1
            try:  # a connection per unit of work, as PHP or a serverless function does
                c = pymysql.connect(host="127.0.0.1", port=ports["front"], user="app", password="app",
                                    database="app", connect_timeout=5, read_timeout=10)
                with c.cursor() as cur:
                    cur.execute("SELECT 1")
                    cur.execute("INSERT INTO lb_t (c) VALUES (%s)", (i,))
                c.close()
                ok[i] += 1
            except Exception as e:  # noqa: BLE001 - every failure is what this test counts
                errors.append(repr(e))
                time.sleep(0.05)

    try:
        with cluster.primary.connect() as c, c.cursor() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS app.lb_t (id INT PRIMARY KEY AUTO_INCREMENT, c INT)")
        wait_for(lambda: (r := up()) and r["rwproxy1"] == "UP" and r["rwproxy2"] == "UP", 30, "both servers UP")
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(3)
        before = sum(ok)
        r = cli(a, "drain")
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: a.process.proc.poll() is not None, 40, "the drained instance to exit")
        assert a.process.proc.returncode == 0
        after_exit, b_then = sum(ok), b_statements()
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join(30)
        assert not errors, errors[:5]
        assert before > 20 and sum(ok) > after_exit + 10  # work went on through b
        assert up()["rwproxy1"].startswith("DOWN")
        assert b_statements() > b_then + 10  # ... served by the instance left
    finally:
        stop.set()
        hp.terminate()
        try:
            hp.wait(10)
        except subprocess.TimeoutExpired:
            hp.kill()
        log.close()
        a.process.stop()
        b.process.stop()


# ---- secrets ------------------------------------------------------------------------------------------

def test_passwords_from_environment_file_and_hash(cluster, tmp_path):
    from test_admin import native_hash

    ensure_backend_user(cluster, "hashed_u", "hashed-pw")
    secret = tmp_path / "monitor.secret"
    secret.write_text(cluster.password("rwproxy") + "\n")
    secret.chmod(0o600)
    port = free_port()
    text = (f'[proxy]\nlisten = "127.0.0.1:{port}"\nworkers = 1\n'
            + "".join(f'[[backends]]\nname = "{n.name}"\nhost = "127.0.0.1"\nport = {n.port}\n' for n in cluster.nodes)
            + '[[users]]\nname = "app"\npassword_env = "RWPROXY_TEST_APP_PW"\n'
            + f'[[users]]\nname = "hashed_u"\npassword = "{native_hash("hashed-pw")}"\n'
            + '[monitor]\nuser = "rwproxy"\npassword_file = "monitor.secret"\n')
    assert "app" not in re.findall(r'password = "(\w+)"', text)
    cfg = tmp_path / "rwproxy.toml"
    cfg.write_text(text)
    r = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(cfg)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "users[0].password_env: environment variable RWPROXY_TEST_APP_PW is not set" in r.stderr
    proc = ProxyProcess(str(cfg), "127.0.0.1", port, log_path=str(tmp_path / "rwproxy.log"),
                        env={"RWPROXY_TEST_APP_PW": "app"}).start()
    try:
        c = pymysql.connect(host="127.0.0.1", port=port, user="app", password="app", database="app")
        with c.cursor() as cur:
            cur.execute("SELECT CURRENT_USER()")
            assert cur.fetchone()[0].startswith("app@")
        c.close()
        # a hashed password: the client proves it knows the password, rwproxy logs in to the
        # servers on its behalf (reads on a replica and writes on the primary both work)
        c = pymysql.connect(host="127.0.0.1", port=port, user="hashed_u", password="hashed-pw", database="app")
        with c.cursor() as cur:
            cur.execute("SELECT @@port")
            cur.execute("CREATE TABLE IF NOT EXISTS hashed_t (id INT)")
            cur.execute("INSERT INTO hashed_t VALUES (1)")
        c.close()
        with pytest.raises(pymysql.err.OperationalError) as e:
            pymysql.connect(host="127.0.0.1", port=port, user="hashed_u", password="wrong", database="app")
        assert e.value.args[0] == 1045
        out = subprocess.run(["mariadb", "-h127.0.0.1", f"-P{port}", "-uhashed_u", "-phashed-pw", "-N", "-e",
                              "SELECT 40 + 2"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and out.stdout.strip() == "42", out.stderr
        st = subprocess.run([sys.executable, "-m", "proxy", "status", "--json", "--config", str(cfg)],
                            capture_output=True, text=True, timeout=60, env={**os.environ, "RWPROXY_TEST_APP_PW": "app"})
        assert st.returncode == 0, st.stderr
        assert "hashed-pw" not in open(tmp_path / "rwproxy.log").read()
    finally:
        proc.stop()


def test_reload_moving_a_backend_drops_its_old_connections(cluster, tmp_path):
    """A backend given another address by a reload: no session goes on using a connection to
    the old one. Here node3 moves from TCP to its Unix socket, which the server itself tells
    apart (USER() is app@localhost through a socket)."""
    node2, node3 = cluster.nodes[1], cluster.nodes[2]
    p = start_proxy(cluster, tmp_path, routing={"balance": "round-robin"})
    try:
        s = p.connect(autocommit=True)

        def seen(n=8):
            out = set()
            with s.cursor() as cur:
                for _ in range(n):
                    cur.execute("SELECT @@port, USER()")  # app@localhost through a socket, app@127.0.0.1 by TCP
                    port, user = cur.fetchone()
                    out.add((port, "socket" if user.endswith("@localhost") else "tcp"))
            return out
        wait_for(lambda: seen() == {(node2.port, "tcp"), (node3.port, "tcp")}, 30, "reads on both replicas")
        good = Path(p.process.config_path).read_text()
        _edit(p, lambda d: d["backends"][0].update(socket=str(cluster.nodes[0].socket)))  # the primary: refused
        r = cli(p, "reload")
        assert r.returncode == 1 and "node1 is the primary and cannot be given another address" in r.stdout, r.stdout
        Path(p.process.config_path).write_text(good)
        _edit(p, lambda d: d["backends"][2].update(socket=str(node3.socket)))
        r = cli(p, "reload")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "node3: now at" in p.process.log_tail(20)
        wait_for(lambda: (node3.port, "socket") in seen(), 30, "node3 read through its socket")
        assert (node3.port, "tcp") not in seen(12)  # the session's connection to the old address is gone
    finally:
        p.process.stop()


def test_a_connection_flood_on_the_metrics_port_is_bounded(op_proxy):
    """Hundreds of connections that send nothing: at most MAX_CONNECTIONS get a handler thread,
    the rest are closed at once, the process lives, and the endpoint answers once they go."""
    from proxy.observe.http import MAX_CONNECTIONS
    p = op_proxy
    pid = p.process.pid
    before = len(os.listdir(f"/proc/{pid}/task"))
    socks = []
    try:
        for _ in range(MAX_CONNECTIONS + 100):
            socks.append(socket.create_connection(("127.0.0.1", p.metrics_port), timeout=5))
        closed = 0
        for s in socks[-50:]:  # accepted last: beyond the bound
            s.settimeout(3)
            try:
                closed += s.recv(1) == b""
            except (socket.timeout, ConnectionResetError):
                closed += isinstance(sys.exc_info()[1], ConnectionResetError)
        assert closed == 50
        assert len(os.listdir(f"/proc/{pid}/task")) <= before + MAX_CONNECTIONS + 4
    finally:
        for s in socks:
            s.close()
    def live() -> bool:
        try:
            return http(p.metrics_port, "/health/live", timeout=3)[0] == 200
        except (OSError, urllib.error.URLError):
            return False  # (closed at once while the last handlers finish)
    assert wait_for(live, 20, "/health/live again")
    assert p.process.proc.poll() is None
