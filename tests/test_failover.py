"""Failover, switchover, fencing and rejoin at the control-plane level, with real faults.

Each scenario runs Monitor + Failover in-process against a private sandbox cluster
(it changes roles for good) and records every published topology snapshot. Pure
rules (GTID arithmetic, candidate ranking, the death verdict) are tested first.
"""

from __future__ import annotations

import logging
import re
import signal
import socket
import threading
import time

from dataclasses import replace

import pymysql
import pytest

from proxy.cluster import gtid
from proxy.cluster.failover import ops
from proxy.config.load import build_config, load_config
from proxy.cluster.failover import Failover, verdict
from proxy.cluster.monitor.health import learned_role
from proxy.cluster.topology import DOWN, MAINTENANCE, PRIMARY, REPLICA, UP, ServerState, Topology

# ---------------------------------------------------------------------------- pure rules


def _facts(name, io="", cur="", priority=0, index=0):
    return ops.Facts(name, "127.0.0.1", 1, io_pos=io, current_pos=cur, priority=priority, index=index)


def test_candidate_ranking():
    # received (relay log) beats applied: what it received it will have once applied
    a = _facts("a", io="0-1-20", cur="0-1-5", index=0)
    b = _facts("b", io="0-1-15", cur="0-1-15", index=1)
    assert ops.choose([a, b]) is a
    # equal received: more applied wins, then priority, then config order
    c = _facts("c", io="0-1-20", cur="0-1-20", index=2)
    assert ops.choose([a, c]) is c
    d = _facts("d", io="0-1-20", cur="0-1-20", priority=5, index=3)
    assert ops.choose([c, d]) is d
    e = _facts("e", io="0-1-20", cur="0-1-20", index=4)
    assert ops.choose([e, c]) is c
    # several domains: total transactions
    f = _facts("f", cur="0-1-10,1-2-10", index=5)
    g = _facts("g", cur="0-1-15,1-2-2", index=6)
    assert ops.choose([g, f]) is f and ops.choose([]) is None


def _st(name, port, **kw):
    return ServerState(name, "127.0.0.1", port, **kw)


def test_verdict_needs_failcount_and_the_replicas():
    p = _st("p", 1, role=PRIMARY, state=DOWN, fails=5, server_id=1, last_error="refused")
    r1 = _st("r1", 2, role=REPLICA, state=UP, source="127.0.0.1:1", source_id=1, io_running=False)
    r2 = _st("r2", 3, role=REPLICA, state=UP, source="10.0.0.1:3306", source_id=1, io_running=False)

    def topo(*servers):
        return Topology({s.name: s for s in servers})

    assert verdict(topo(p, r1, r2), "p", 5, True)[0] == "dead"
    assert "r1, r2 lost it too" in verdict(topo(p, r1, r2), "p", 5, True)[1]
    assert verdict(topo(_st("p", 1, state=DOWN, fails=4), r1), "p", 5, True)[0] == "suspect"
    assert verdict(topo(_st("p", 1, state=UP, fails=2), r1), "p", 2, True)[0] == "suspect"
    assert verdict(topo(_st("p", 1, state=UP), r1), "p", 5, True)[0] == "alive"
    # a replica still receiving its binlog (matched by server id, its host spelled differently)
    live = _st("r2", 3, role=REPLICA, state=UP, source="10.0.0.1:3306", source_id=1, io_running=True)
    kind, detail = verdict(topo(p, r1, live), "p", 5, True)
    assert kind == "unconfirmed" and detail == "r2 still receives its binlog"
    assert verdict(topo(p, r1, live), "p", 5, False)[0] == "dead"
    # no witness at all
    assert verdict(topo(p, _st("r1", 2, state=DOWN)), "p", 5, True)[0] == "unconfirmed"


def test_verdict_takes_a_hang_from_the_replicas_silence():
    """A hung primary: one failed check (or one left unanswered), no answer for replica_silence,
    and every replica heard nothing (no event, no heartbeat) for that long and 2.5 heartbeats."""
    now = 1000.0
    p = _st("p", 1, role=PRIMARY, state=UP, fails=1, server_id=1, last_ok=now - 0.7, last_error="timed out")

    def rep(name, silent, period=0.2, io=True):
        return _st(name, 2, role=REPLICA, state=UP, source_id=1, io_running=io, source_silent=silent,
                   heartbeat_period=period)

    def judge(*replicas, primary=p, silence=0.6, **kw):
        return verdict(Topology({s.name: s for s in (primary, *replicas)}), "p", 5, True, silence, now=now, **kw)

    kind, detail = judge(rep("r1", 0.7), rep("r2", 0.65))
    assert kind == "dead" and "r1, r2 heard nothing from it for 0.7 s" in detail and "hung" in detail
    assert judge(rep("r1", 0.7), rep("r2", 0.3))[0] == "suspect"  # r2 still hears it: only rwproxy's path
    assert judge(rep("r1", 0.7), rep("r2", 0.9, period=5.0))[0] == "suspect"  # 0.9 s is no silence at 5 s heartbeats
    assert judge(rep("r1", 0.7), rep("r2", None, io=False))[0] == "dead"  # r2 lost it outright
    assert judge(rep("r1", 0.7), silence=0.0)[0] == "suspect"  # replica_silence = 0: failcount only
    answered = _st("p", 1, role=PRIMARY, state=UP, fails=1, server_id=1, last_ok=now - 0.2)
    assert judge(rep("r1", 0.7), primary=answered)[0] == "suspect"  # it answered 0.2 s ago
    waiting = _st("p", 1, role=PRIMARY, state=UP, fails=0, server_id=1, last_ok=now - 0.7)
    assert judge(rep("r1", 0.7), primary=waiting)[0] == "alive"
    assert judge(rep("r1", 0.7), primary=waiting, unanswered=0.65)[0] == "dead"  # the check under way hangs
    # never answered since rwproxy started: the log line says so (it said "no answer for 1796656722.0 s")
    never = _st("p", 1, role=PRIMARY, state=UP, fails=3, server_id=1, last_ok=0.0, last_error="refused")
    kind, detail = judge(rep("r1", 0.7), primary=never)
    assert kind == "dead" and detail.startswith("no answer since rwproxy started (3 failed checks: refused)"), detail


def test_designation_wins_over_read_only():
    assert learned_role("auto", False, UP, mm=False, designated=False) == REPLICA  # a fenced old primary
    assert learned_role("primary", False, UP, mm=False, designated=False) == REPLICA  # even if configured
    assert learned_role("auto", False, REPLICA, mm=False, designated=True) == PRIMARY
    assert learned_role("auto", True, PRIMARY, mm=False, designated=True) == PRIMARY  # made read-only by hand: 1290s
    assert learned_role("auto", False, REPLICA, mm=True, designated=False) == "master"  # no authority in mm


# ---------------------------------------------------------------------------- harness

MIN_GRANTS = ["SLAVE MONITOR, REPLICATION SLAVE ADMIN, REPLICATION MASTER ADMIN, READ_ONLY ADMIN, PROCESS, RELOAD ON *.*",
              "SELECT, INSERT, UPDATE, CREATE ON rwproxy.*"]


def fo_config(cluster, ports=None, **sections):
    data = {
        "backends": [{"name": n.name, "host": "127.0.0.1", "port": (ports or {}).get(n.name, n.port)}
                     for n in cluster.nodes],
        "users": [{"name": "app", "password": "app"}],
        "monitor": {"user": "rwproxy", "password": cluster.password("rwproxy")},
        "cluster": {"topology": cluster.topology},
        "failover": {"replication_user": "repl", "replication_password": cluster.password("repl")},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return build_config(data)


class Recorder:
    """publish(): every snapshot the workers would get, with the time it was published."""

    def __init__(self):
        self.snaps: list[tuple[float, Topology]] = []
        self.lock = threading.Lock()

    def publish(self, topo):
        with self.lock:
            self.snaps.append((time.monotonic(), topo))

    @property
    def latest(self) -> Topology:
        with self.lock:
            return self.snaps[-1][1]

    def since(self, t0: float) -> list[tuple[float, Topology]]:
        with self.lock:
            return [(t, s) for t, s in self.snaps if t >= t0]

    def wait(self, pred, timeout: float, since: float = 0.0):
        """(time, snapshot) of the first snapshot published after `since` that satisfies pred."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, s in self.since(since):
                if pred(s):
                    return t, s
            time.sleep(0.005)
        raise AssertionError(f"no published snapshot matched within {timeout} s; latest: {self.latest}")


def wait_for(pred, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if pred():
                return True
        except pymysql.MySQLError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(step)


@pytest.fixture
def run_failover():
    started = []

    def start(cluster, ports=None, **sections):
        rec = Recorder()
        fo = Failover(fo_config(cluster, ports, **sections), rec.publish).start()
        started.append(fo)
        if cluster.topology == "primary-replica":
            assert wait_for(lambda: fo.monitor.designated == cluster.primary.name, 10)
        assert wait_for(lambda: all(s.last_check for s in fo.monitor.topology.servers.values()), 10)
        return fo, rec

    yield start
    for fo in started:
        fo.stop()


def writers(topo):
    return [s.name for s in topo.servers.values() if s.is_writer]


def new_primary(name):
    return lambda t: t.primary is not None and t.primary.name == name and t.primary.state == UP and not t.writes_held


def follows(node, source) -> bool:
    ss = node.slave_status() or {}
    return (ss.get("Master_Port") == source.port and ss.get("Slave_IO_Running") == "Yes"
            and ss.get("Slave_SQL_Running") == "Yes")


def count(node, table) -> int:
    return node.query(f"SELECT COUNT(*) AS n FROM {table}")[0]["n"]


def received(replica, source_pos) -> bool:
    io_pos = (replica.slave_status() or {}).get("Gtid_IO_Pos") or ""
    return gtid.reached(io_pos, source_pos)


def insert(node, table, ids, phase):
    with node.connect() as conn, conn.cursor() as cur:
        for i in ids:
            cur.execute(f"INSERT INTO {table} VALUES (%s, %s)", (i, phase))


def create_min_user(cluster, user="fomon"):
    cluster.primary.query(f"CREATE USER IF NOT EXISTS {user}@'%' IDENTIFIED BY 'pw'")
    for g in MIN_GRANTS:
        cluster.primary.query(f"GRANT {g} TO {user}@'%'")
    cluster.wait_replicas_caught_up(10)


# ---------------------------------------------------------------------------- failover


def test_sigkill_promotes_most_advanced_then_fences_and_rejoins(cluster_factory, run_failover, caplog):
    caplog.set_level(logging.INFO, logger="rwproxy.failover")
    c = cluster_factory(replicas=2)
    old, behind, ahead = c.nodes  # config order would pick node2: the GTID ranking must pick node3
    fo, rec = run_failover(c)
    t = "app.fo"
    old.query(f"CREATE TABLE {t} (id INT PRIMARY KEY, phase CHAR(1))")
    insert(old, t, range(1, 21), "A")
    c.wait_replicas_caught_up(10)
    ahead.query("STOP SLAVE SQL_THREAD")  # ahead keeps receiving, applies nothing more
    insert(old, t, range(21, 41), "B")
    assert wait_for(lambda: received(ahead, old.variable("gtid_binlog_pos")), 5)
    assert wait_for(lambda: count(behind, t) == 40, 5)
    behind.query("STOP SLAVE IO_THREAD")  # behind applied more than ahead, but received less
    insert(old, t, range(41, 61), "C")
    fo.monitor.pause_heartbeat(old.name)  # nothing the replicas have not received when it dies
    assert wait_for(lambda: received(ahead, old.variable("gtid_binlog_pos")), 5)
    assert count(ahead, t) == 20 and count(behind, t) == 40

    t0 = time.monotonic()
    old.kill(signal.SIGKILL)
    t1, topo = rec.wait(new_primary(ahead.name), 10, since=t0)
    print(f"\nSIGKILL -> {ahead.name} published writable: {(t1 - t0) * 1000:.0f} ms (figures: benchmarks/failover_figures.py)")
    during = rec.since(t0)
    assert any(s.writes_held for _, s in during if _ < t1), "writes were not held during the promotion"
    assert writers(topo) == [ahead.name] and topo.servers[old.name].role == REPLICA
    assert not rec.latest.writes_held
    # it applied what it had received before taking writes, and the lagging replica follows it
    assert ahead.variable("read_only") == 0 and count(ahead, t) == 60
    assert any(re.search(r"node3: apply the relay log: applied its relay log up to .* \(\d+ ms", m)
               for m in caplog.messages)
    assert wait_for(lambda: follows(behind, ahead) and count(behind, t) == 60, 10)
    assert any("failover done in" in m for m in caplog.messages)

    # the old primary restarts writable (its my.cnf says read_only=0): fenced, then rejoined
    t2 = time.monotonic()
    old.start()
    assert wait_for(lambda: follows(old, ahead), 15)
    assert old.variable("read_only") == 1
    insert(ahead, t, [61], "D")
    assert wait_for(lambda: count(old, t) == 61 and count(behind, t) == 61, 10)
    assert fo.monitor.wait_until(lambda tp: tp.servers[old.name].readable, 10)
    assert all(writers(s) == [ahead.name] for _, s in rec.since(t2)), "the old primary was published as a writer"
    assert any(m.startswith(f"fenced {old.name}") for m in caplog.messages)
    assert any(m.startswith(f"rejoined {old.name} (127.0.0.1:{old.port}) as a replica of {ahead.name}")
               for m in caplog.messages)
    assert fo.status()["last_failover"]["new"] == f"127.0.0.1:{ahead.port}"

    # within failover_cooldown a second death is not failed over automatically
    t3 = time.monotonic()
    ahead.kill(signal.SIGKILL)
    assert wait_for(lambda: any("failover_cooldown holds automatic failover" in m for m in caplog.messages), 10)
    time.sleep(0.5)
    assert old.variable("read_only") == 1 and behind.variable("read_only") == 1
    assert not any(s.writes_held for _, s in rec.since(t3))
    assert fo.status()["cooldown_left_s"] > 0


class Forwarder:
    """A TCP relay rwproxy's monitor reaches the primary through; cut() breaks only that path."""

    def __init__(self, target_port: int):
        self.target = target_port
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.socks: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener = None

    def restore(self) -> "Forwarder":
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        self.listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()
        return self

    def _accept(self, ls):
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=2)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self):
        # shutdown first: a thread blocked in accept() keeps a merely closed listening socket
        # alive and would let one more connection through after the cut
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            socks, self.socks = self.socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def test_blip_between_rwproxy_and_primary_is_not_a_failover(cluster_factory, run_failover, caplog):
    caplog.set_level(logging.INFO, logger="rwproxy.failover")
    c = cluster_factory(replicas=2)
    p, r1, r2 = c.nodes
    fwd = Forwarder(p.port).restore()
    fo, rec = run_failover(c, ports={p.name: fwd.port})
    try:
        t0 = time.monotonic()
        fwd.cut()  # the monitor loses the primary; the replicas still replicate from it directly
        assert fo.monitor.wait_until(lambda t: t.servers[p.name].state == DOWN and t.servers[p.name].fails >= 5, 5)
        p.query("CREATE TABLE app.blip (id INT PRIMARY KEY)")  # the replicas still get what it writes
        p.query("INSERT INTO app.blip VALUES (1)")
        assert wait_for(lambda: count(r1, "app.blip") == 1 and count(r2, "app.blip") == 1, 5)
        time.sleep(1.0)
        lines = [m for m in caplog.messages if "does not answer rwproxy" in m]
        assert len(lines) == 1 and "node2, node3 still receive its binlog: not failing over" in lines[0]
        assert not any(s.writes_held for _, s in rec.since(t0))
        assert r1.variable("read_only") == 1 and r2.variable("read_only") == 1
        assert fo.status()["last_failover"] is None and fo.monitor.designated == p.name
    finally:
        fwd.restore()
    assert fo.monitor.wait_until(lambda t: t.primary.name == p.name and t.primary.state == UP, 5)
    assert wait_for(lambda: any("answers again" in m for m in caplog.messages), 2)


def test_failed_pre_hook_disables_then_enable_and_extra_transactions_keep_old_primary_out(
        cluster_factory, run_failover, caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="rwproxy.failover")
    c = cluster_factory(replicas=2)
    p, r1, r2 = c.nodes
    allow, env_file = tmp_path / "allow", tmp_path / "post.env"
    fo, rec = run_failover(c, failover={"pre_failover_hook": f"test -f {allow}",
                                        "post_failover_hook": f"env | grep -E '^RWPROXY_(EVENT|NEW_PRIMARY|OLD_PRIMARY)=' | sort > {env_file}"})
    for r in (r1, r2):
        r.query("STOP SLAVE IO_THREAD")
    p.query("CREATE TABLE app.lost (id INT PRIMARY KEY)")  # the cluster never sees these
    p.query("INSERT INTO app.lost VALUES (1)")
    p.kill(signal.SIGKILL)
    assert wait_for(lambda: any("failed after" in m and "pre_failover_hook: exited with 1; automatic failover is "
                                "disabled" in m for m in caplog.messages), 10)
    assert wait_for(lambda: not fo.status()["in_progress"], 5)
    st = fo.status()
    assert st["auto_failover"] is False and st["last_failover"]["ok"] is False
    assert r1.variable("read_only") == 1 and r2.variable("read_only") == 1 and r1.slave_status()
    assert writers(rec.latest) == [] and not rec.latest.writes_held
    time.sleep(0.6)  # still nothing: disabled
    assert r1.variable("read_only") == 1 and r2.variable("read_only") == 1

    allow.touch()
    fo.enable_auto_failover()
    _, topo = rec.wait(lambda t: t.primary is not None and t.primary.name != p.name and not t.writes_held, 10)
    new = c.node(topo.primary.name)
    assert wait_for(lambda: fo.status()["last_failover"]["ok"] is True, 5) and fo.status()["auto_failover"] is True
    assert wait_for(lambda: env_file.exists() and len(env_file.read_text().split()) == 3, 5)
    assert env_file.read_text().split() == ["RWPROXY_EVENT=failover", f"RWPROXY_NEW_PRIMARY=127.0.0.1:{new.port}",
                                            f"RWPROXY_OLD_PRIMARY=127.0.0.1:{p.port}"]

    t0 = time.monotonic()
    p.start()
    want = re.compile(r"^node1 has \d+ transactions? in domain 0 the new primary never saw; not rejoining: "
                      r"resolve by hand")
    assert wait_for(lambda: any(want.match(m) for m in caplog.messages), 10)
    assert fo.monitor.wait_until(lambda t: t.servers[p.name].state == MAINTENANCE, 5)
    assert p.variable("read_only") == 1 and not p.slave_status()
    assert p.query("SELECT COUNT(*) AS n FROM app.lost")[0]["n"] == 1
    assert want.match(fo.status()["kept_out"][p.name])
    assert all(writers(s) == [new.name] for _, s in rec.since(t0))


# ---------------------------------------------------------------------------- switchover


class Writer(threading.Thread):
    """Writes uniquely numbered rows to whatever the published topology says is the primary,
    waiting while writes are held; a read-only refusal during a role change is retried (as the
    workers do: the statement did not run)."""

    def __init__(self, rec, cluster, table):
        super().__init__(daemon=True)
        self.rec, self.cluster, self.table = rec, cluster, table
        self.stop, self.acked, self.failures, self.retries = threading.Event(), [], [], 0
        self.times: list[float] = []

    def run(self):
        conns, n = {}, 0
        while not self.stop.is_set():
            topo = self.rec.latest
            p = topo.primary
            if topo.writes_held or p is None or p.state != UP:
                time.sleep(0.001)
                continue
            try:
                if p.name not in conns:
                    conns[p.name] = self.cluster.node(p.name).connect("app", database="app")
                with conns[p.name].cursor() as cur:
                    cur.execute(f"INSERT INTO {self.table} VALUES (%s)", (n + 1,))
                n += 1
                self.acked.append(n)
                self.times.append(time.monotonic())
            except pymysql.MySQLError as exc:
                now = self.rec.latest
                moved = now.writes_held or now.primary is None or now.primary.name != p.name
                if exc.args and exc.args[0] == 1290 and moved:
                    self.retries += 1
                else:
                    self.failures.append(repr(exc))
            time.sleep(0.003)
        for conn in conns.values():
            conn.close()


def test_two_writable_servers_at_start_the_one_replicas_follow_wins_the_other_rejoins(cluster_factory,
                                                                                        run_failover, caplog):
    """Split brain found at start-up (a replica detached and made writable by hand): the writable
    server the replicas follow is the primary; the other is fenced and rejoined under it."""
    caplog.set_level(logging.INFO, logger="rwproxy.failover")
    c = cluster_factory(replicas=2)
    primary, follower, stray = c.nodes
    for sql in ("STOP SLAVE", "RESET SLAVE ALL", "SET GLOBAL read_only = 0"):
        stray.query(sql)
    fo, rec = run_failover(c)
    assert fo.monitor.designated == primary.name
    assert wait_for(lambda: stray.variable("read_only") == 1 and follows(stray, primary), 20), stray.slave_status()
    assert "several writable servers" in caplog.text and f"{primary.name} is the primary" in caplog.text
    assert writers(rec.latest) == [primary.name] and follows(follower, primary)
    primary.query("CREATE TABLE app.split (id INT PRIMARY KEY)")
    primary.query("INSERT INTO app.split VALUES (1)")
    c.wait_replicas_caught_up(10)
    assert stray.query("SELECT id FROM app.split") == [{"id": 1}]


def test_a_switchover_made_by_hand_is_followed_not_fenced(cluster_factory, run_failover, caplog):
    """An operator (or another tool) switches over without rwproxy: old primary read-only and
    replicating from the new one. rwproxy designates the new writer and leaves it writable."""
    caplog.set_level(logging.INFO, logger="rwproxy.failover")
    c = cluster_factory(replicas=1)
    old, new = c.nodes
    fo, rec = run_failover(c)
    old.query("SET GLOBAL read_only = 1")
    c.wait_replicas_caught_up(10)
    for sql in ("STOP SLAVE", "RESET SLAVE ALL", "SET GLOBAL read_only = 0"):
        new.query(sql)
    old.query(f"CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={new.port}, MASTER_USER='repl', "
              f"MASTER_PASSWORD='{c.password('repl')}', MASTER_USE_GTID=slave_pos")
    old.query("START SLAVE")
    rec.wait(lambda t: t.primary is not None and t.primary.name == new.name and t.primary.state == UP, 20)
    assert "following that switchover made outside rwproxy" in caplog.text
    time.sleep(1.0)  # (a few monitor rounds: nothing fences the new writer)
    assert new.variable("read_only") == 0 and old.variable("read_only") == 1 and follows(old, new)
    assert writers(rec.latest) == [new.name]


def test_writable_blocker_and_read_only_head():
    """enforce_writable_primary's two decisions, on snapshots: when a read-only primary may be made
    writable, and which server is the primary of a cluster where every server is read-only."""
    from proxy.cluster.failover.detect import read_only_head, writable_blocker
    p = _st("p", 1, role=PRIMARY, read_only=True, server_id=1, gtid_current_pos="0-1-10", last_ok=1.0)
    r1 = _st("r1", 2, role=REPLICA, read_only=True, source="127.0.0.1:1", source_id=1, io_running=True,
             sql_running=True, gtid_current_pos="0-1-10", last_ok=1.0)
    r2 = _st("r2", 3, role=REPLICA, read_only=True, source="127.0.0.1:1", source_id=1, io_running=True,
             sql_running=True, gtid_current_pos="0-1-9", last_ok=1.0)
    topo = Topology({s.name: s for s in (p, r1, r2)})
    assert writable_blocker(topo, p) == ""
    assert "replicates from 127.0.0.1:9" in writable_blocker(topo, replace(p, source="127.0.0.1:9", io_running=True))
    wr = Topology({**topo.servers, "r2": replace(r2, read_only=False)})
    assert writable_blocker(wr, p) == "r2 is writable"
    ahead = Topology({**topo.servers, "r1": replace(r1, gtid_current_pos="0-2-11")})
    assert writable_blocker(ahead, p).startswith("r1 holds 1 transaction in domain 0 it lacks")
    other_domain = Topology({**topo.servers, "r1": replace(r1, gtid_current_pos="0-1-10,1-2-3")})
    assert "domain 1" in writable_blocker(other_domain, p)
    down = Topology({**ahead.servers, "r1": replace(ahead.servers["r1"], state=DOWN, fails=5)})
    assert writable_blocker(down, p) == ""  # (what a down server holds is unknown until it is back)
    assert read_only_head(topo) is p
    assert read_only_head(Topology({**topo.servers, "p": replace(p, state=DOWN, fails=5)})) is None
    # two servers that replicate from nobody, followed by as many replicas: no guess
    lone = _st("q", 4, read_only=True, server_id=4, last_ok=1.0)
    assert read_only_head(Topology({"p": p, "q": lone})) is None
    assert read_only_head(Topology({"p": p, "q": lone, "r1": r1})) is p


def test_enforce_writable_primary_undoes_read_only_unless_a_replica_is_ahead(cluster_factory, run_failover,
                                                                              caplog):
    """[failover] enforce_writable_primary: a cluster whose servers all start read-only (read_only=1
    in every my.cnf) gets the server its replicas follow as primary, made writable; a later
    read_only=1 on it is undone too. Once a replica holds a transaction the primary lacks, the
    primary stays read-only and one error line says why."""
    caplog.set_level(logging.INFO, logger="rwproxy.failover")
    c = cluster_factory(replicas=2)
    primary, r1, _ = c.nodes
    primary.query("SET GLOBAL read_only = 1")
    fo, rec = run_failover(c, failover={"enforce_writable_primary": True})
    assert wait_for(lambda: primary.variable("read_only") == 0, 20), caplog.text
    assert "replicates from nobody and 2 replica(s) follow it" in caplog.text
    primary.query("SET GLOBAL read_only = 1")
    assert wait_for(lambda: primary.variable("read_only") == 0, 20), caplog.text
    assert caplog.text.count("SET GLOBAL read_only=0 (enforce_writable_primary)") == 2
    primary.query("CREATE TABLE app.ew (id INT PRIMARY KEY, phase CHAR(1))")  # writable for real
    insert(primary, "app.ew", [1], "A")
    c.wait_replicas_caught_up(10)
    # a transaction written on a replica only (as root, who passes read_only)
    r1.query("INSERT INTO app.ew VALUES (2, 'E')")
    primary.query("SET GLOBAL read_only = 1")
    assert wait_for(lambda: "it lacks" in caplog.text, 20), caplog.text
    time.sleep(1.5)  # (three passes of the failover thread: it stays read-only)
    assert primary.variable("read_only") == 1
    assert f"{r1.name} holds 1 transaction in domain 0 it lacks" in caplog.text
    assert caplog.text.count("SET GLOBAL read_only=0 (enforce_writable_primary)") == 2


def test_a_cluster_that_starts_all_read_only_has_the_head_as_read_only_primary(cluster_factory, run_failover,
                                                                                 caplog):
    """Every server read-only at start (read_only=1 in each my.cnf): the server the replicas follow
    is designated (writes get its 1290 at once, as from a primary made read-only by hand; before,
    no primary was designated and writes waited write_hold_timeout for 1927), and stays
    read-only without enforce_writable_primary."""
    caplog.set_level(logging.INFO, logger="rwproxy.failover")
    c = cluster_factory(replicas=1)
    primary = c.nodes[0]
    primary.query("SET GLOBAL read_only = 1")
    fo, rec = run_failover(c)  # (waits for the designation)
    assert "it is the primary, read-only (writes get its read-only error 1290" in caplog.text
    time.sleep(1.0)
    assert primary.variable("read_only") == 1 and fo.monitor.designated == primary.name
    assert "read_only=0" not in caplog.text


def test_a_promotion_that_fails_half_way_is_undone(cluster_factory, run_failover, caplog):
    """The target refuses read_only=0 (its copy of the monitor account lacks READ_ONLY ADMIN) after
    STOP SLAVE and RESET SLAVE ALL ran: the switchover puts the target back as a read-only replica of
    the old primary, and the old primary is writable again."""
    caplog.set_level(logging.INFO, logger="rwproxy.failover")
    c = cluster_factory(replicas=1)
    old, target = c.nodes
    create_min_user(c)
    with target.connect() as conn, conn.cursor() as cur:  # (on the target only: not replicated)
        cur.execute("SET SESSION sql_log_bin = 0")
        cur.execute("REVOKE READ_ONLY ADMIN ON *.* FROM fomon@'%'")
    fo, rec = run_failover(c, monitor={"user": "fomon", "password": "pw"})
    res = fo.switchover(target.name)
    assert not res["ok"] and "rolled back" in res["message"], res
    assert "STOP SLAVE; RESET SLAVE ALL; read_only=0" in res["message"] and "1227" in res["message"], res
    assert target.variable("read_only") == 1 and old.variable("read_only") == 0
    assert wait_for(lambda: follows(target, old), 10), target.slave_status()
    assert rec.latest.primary.name == old.name and not rec.latest.writes_held
    old.query("CREATE TABLE app.undone (id INT PRIMARY KEY)")
    old.query("INSERT INTO app.undone VALUES (1)")
    c.wait_replicas_caught_up(10)
    assert target.query("SELECT id FROM app.undone") == [{"id": 1}]
    assert "undo incomplete" not in caplog.text


def test_a_switchover_waits_for_a_reconnecting_replica(cluster_factory, run_failover):
    """The target's IO thread is Connecting (replication restarted a moment ago, here held there by
    a locked replication account for about a second): the switchover waits for it instead of
    refusing, as long as the SQL thread runs."""
    c = cluster_factory(replicas=1)
    old, target = c.nodes
    fo, rec = run_failover(c)
    with old.connect() as conn, conn.cursor() as cur:
        cur.execute("SET SESSION sql_log_bin = 0")
        cur.execute("ALTER USER repl@'%' ACCOUNT LOCK")
    target.query("STOP SLAVE IO_THREAD")
    target.query("START SLAVE IO_THREAD")
    assert (target.slave_status() or {}).get("Slave_IO_Running") == "Connecting"

    def unlock():
        time.sleep(1.5)
        with old.connect() as conn, conn.cursor() as cur:
            cur.execute("SET SESSION sql_log_bin = 0")
            cur.execute("ALTER USER repl@'%' ACCOUNT UNLOCK")
    t = threading.Thread(target=unlock)
    t.start()
    try:
        res = fo.switchover(target.name)
    finally:
        t.join(10)
    assert res["ok"], res
    assert rec.latest.primary.name == target.name and target.variable("read_only") == 0
    assert wait_for(lambda: follows(old, target), 10), old.slave_status()


def test_switchover_under_write_load_with_minimal_grants(cluster_factory, run_failover, caplog):
    caplog.set_level(logging.INFO, logger="rwproxy.failover")
    c = cluster_factory(replicas=2)
    old, target, other = c.nodes
    create_min_user(c)
    fo, rec = run_failover(c, monitor={"user": "fomon", "password": "pw"})
    old.query("CREATE TABLE app.sw (id INT PRIMARY KEY)")
    c.wait_replicas_caught_up(10)
    assert fo.switchover(old.name)["message"] == "switchover refused: node1 is already the primary"
    assert "unknown backend" in fo.switchover("nosuch:1")["message"]

    # an application transaction that never ends: the switchover gives up and puts everything back
    blocker = old.connect("app", database="app", autocommit=False)
    with blocker.cursor() as cur:
        cur.execute("INSERT INTO sw VALUES (0)")
    res = fo.switchover(target.name, timeout=0.5)
    assert not res["ok"] and "still busy" in res["message"] and "rolled back" in res["message"]
    assert old.variable("read_only") == 0 and target.variable("read_only") == 1 and follows(target, old)
    assert rec.latest.primary.name == old.name and not rec.latest.writes_held
    blocker.commit()
    blocker.close()

    writer = Writer(rec, c, "app.sw")
    writer.start()
    assert wait_for(lambda: len(writer.acked) >= 5, 10)  # writing before the switchover
    res = fo.switchover(f"127.0.0.1:{target.port}")
    done = len(writer.acked)
    assert wait_for(lambda: len(writer.acked) >= done + 5, 10)  # and after it, on the new primary
    writer.stop.set()
    writer.join(5)
    print(f"\nswitchover: {res}; writer retries {writer.retries}")
    assert res["ok"], res
    assert res["old"] == f"127.0.0.1:{old.port}" and res["new"] == f"127.0.0.1:{target.port}"
    assert res["write_pause_ms"] is not None  # measured (its figure: benchmarks/failover_figures.py)
    assert writer.failures == []  # no write failed across the switchover
    gaps = [b - a for a, b in zip(writer.times, writer.times[1:])]
    print(f"longest gap between two acknowledged writes: {max(gaps) * 1000:.0f} ms")
    topo = rec.latest
    assert writers(topo) == [target.name] and not topo.writes_held
    assert target.variable("read_only") == 0 and old.variable("read_only") == 1
    assert wait_for(lambda: follows(old, target) and follows(other, target), 5)
    c.wait_replicas_caught_up(10)
    ids = {r["id"] for r in target.query("SELECT id FROM app.sw")}
    assert set(writer.acked) <= ids
    for n in (old, other):
        assert {r["id"] for r in n.query("SELECT id FROM app.sw")} == ids
    assert fo.status()["last_switchover"]["ok"] is True


# ---------------------------------------------------------------------------- semi-sync, master-master


def test_semi_sync_failover_keeps_semi_sync(cluster_factory, run_failover):
    c = cluster_factory(replicas=2, semi_sync=True)
    old = c.primary
    create_min_user(c)
    fo, rec = run_failover(c, monitor={"user": "fomon", "password": "pw"})
    old.query("CREATE TABLE app.semi (id INT PRIMARY KEY, phase CHAR(1))")
    insert(old, "app.semi", range(1, 11), "A")
    fo.monitor.pause_heartbeat(old.name)
    c.wait_replicas_caught_up(10)
    t0 = time.monotonic()
    old.kill(signal.SIGKILL)
    t1, topo = rec.wait(lambda t: t.primary is not None and t.primary.name != old.name and not t.writes_held,
                        10, since=t0)
    print(f"\nsemi-sync: SIGKILL -> published writable: {(t1 - t0) * 1000:.0f} ms")
    new = c.node(topo.primary.name)
    assert new.variable("rpl_semi_sync_master_enabled") == 1
    assert new.variable("rpl_semi_sync_master_wait_point") == "AFTER_SYNC"
    assert new.variable("rpl_semi_sync_master_timeout") == 2000  # the old primary's setting
    assert wait_for(lambda: new.status_vars("Rpl_semi_sync_master_clients")["Rpl_semi_sync_master_clients"] != "0", 5)
    def acks():
        st = new.status_vars("Rpl_semi_sync_master_%_tx")
        return int(st["Rpl_semi_sync_master_yes_tx"]), int(st["Rpl_semi_sync_master_no_tx"])

    yes, no = acks()
    insert(new, "app.semi", [11], "B")  # (heartbeat writes are counted too)
    assert acks()[0] > yes and acks()[1] == no, "a write was not acknowledged by a replica"
    old.start()
    assert wait_for(lambda: follows(old, new), 15)
    assert old.variable("rpl_semi_sync_slave_enabled") == 1 and old.variable("rpl_semi_sync_master_enabled") == 0
    assert wait_for(lambda: count(old, "app.semi") == 11, 10)


def test_master_master_no_promotion(cluster_factory, run_failover):
    c = cluster_factory(replicas=1, topology="master-master")
    m1, m2, r = c.nodes
    sandbox_cfg = load_config(str(c.config_path))  # what `rwproxy sandbox up` wrote works for failover too
    assert (sandbox_cfg.failover.replication_user, sandbox_cfg.failover.replication_password) == \
        ("repl", c.password("repl"))
    fo, rec = run_failover(c)
    assert fo.monitor.wait_until(lambda t: writers(t) == [m1.name, m2.name], 5)
    assert "master-master" in fo.switchover(m2.name)["message"]
    t0 = time.monotonic()
    m1.kill(signal.SIGKILL)
    assert fo.monitor.wait_until(lambda t: t.servers[m1.name].state == DOWN and t.servers[m1.name].fails >= 5, 5)
    time.sleep(1.0)
    assert writers(rec.latest) == [m2.name] and rec.latest.servers[m2.name].role == "master"
    assert not any(s.writes_held for _, s in rec.since(t0))
    assert fo.monitor.designated is None and fo.status()["last_failover"] is None
    assert m2.variable("read_only") == 0 and (r.slave_status() or {})["Master_Port"] == m1.port
    m2.query("CREATE TABLE app.mm (id INT PRIMARY KEY)")
    m2.query("INSERT INTO app.mm VALUES (2)")
    m1.start()  # replication resumes by itself in both directions
    assert fo.monitor.wait_until(lambda t: writers(t) == [m1.name, m2.name], 10)
    assert wait_for(lambda: count(m1, "app.mm") == 1, 10)
    m1.query("INSERT INTO app.mm VALUES (1)")
    assert wait_for(lambda: count(m2, "app.mm") == 2 and count(r, "app.mm") == 2, 10)
