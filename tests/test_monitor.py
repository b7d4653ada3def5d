"""The health and lag monitor: pure decision/lag logic, then real faults on real sandbox servers.

Destructive tests on the shared `cluster` restore what they change (restart, SIGCONT,
MASTER_DELAY=0, read_only=0, DROP USER); killing the primary uses a private cluster.
"""

from __future__ import annotations

import logging
import os
import signal
import statistics
import threading
import time
from dataclasses import replace

import pymysql
import pytest

from proxy.config.load import build_config
from proxy.cluster.monitor import Monitor
from proxy.cluster.monitor.health import Observation, Policy, Tracker, decide, learned_role, replica_problems
from proxy.cluster.monitor.lag import LagReading, Timeline, estimate, progress
from proxy.cluster.topology import DOWN, LAGGING, MASTER, PRIMARY, REPLICA, UNKNOWN, UP, ServerState

# ---------------------------------------------------------------------------- pure logic


def test_progress_between_positions():
    assert progress({0: 15}, {0: 10}, {0: 20}) == 0.5
    assert progress({0: 10, 1: 5}, {0: 10, 1: 0}, {0: 10, 1: 10}) == 0.5
    assert progress({0: 1}, {0: 1}, {0: 1}) == 0.5  # no transactions in between


def test_timeline_brackets_and_interpolates():
    tl = Timeline()
    for i in range(11):  # the writer commits 10 transactions per second, sampled every 100 ms
        tl.add(100.0 + i * 0.1, f"0-1-{i}")
    # a replica at seq 5 applied everything committed up to t=100.5 and nothing of 100.6
    lower, upper, point = tl.locate({0: 5}, now=101.5)
    assert lower == pytest.approx(0.9) and upper == pytest.approx(1.0) and point == pytest.approx(1.0)
    assert tl.locate({0: 10}, now=101.5)[2] == 0.0  # reached the newest sample: no visible lag
    assert tl.locate({}, now=101.5)[1] is None  # behind the oldest sample kept: only a lower bound
    tl.add(102.0, "0-1-30")  # 20 transactions between 101.0 and 102.0
    assert tl.locate({0: 20}, now=103.0)[2] == pytest.approx(1.5)  # halfway through them
    tl.add(101.9, "0-1-25")  # a late sample from the other thread is ignored
    assert tl.locate({0: 20}, now=103.0)[2] == pytest.approx(1.5)
    tl.add(103.0, "0-1-3")  # positions went backwards (RESET MASTER): start over
    assert len(tl) == 1


def test_estimate_stale_writer_and_heartbeat_cross_check():
    tl = Timeline()
    for i in range(5):
        tl.add(200.0 + i * 0.25, f"0-1-{i}")  # last sample at 201.0; then the writer dies
    fresh = estimate(tl, {0: 4}, now=205.0, hb_ts=201.0, hb_now=205.0, stale=False)
    assert fresh.source == "heartbeat" and fresh.ms == 0.0
    behind = estimate(tl, {0: 2}, now=205.0, hb_ts=200.5, hb_now=205.0, stale=True)
    # measured against the writer's last known time (201.0), not against now: 0.25..0.5 s, not 4.5 s
    assert behind.source == "heartbeat-stale" and 250 <= behind.ms <= 500
    assert estimate(tl, {0: 4}, now=205.0, hb_ts=201.0, hb_now=205.0, stale=True).ms == 0.0
    # a heartbeat newer than a position the replica "lacks": GTIDs do not compare, trust the heartbeat
    odd = estimate(tl, {7: 1}, now=201.1, hb_ts=201.0, hb_now=201.1, stale=False)
    assert odd.note == "gtid contradicts heartbeat" and odd.ms == pytest.approx(100, abs=1)
    assert estimate(None, {}, 1.0, None, None, False) is None
    assert estimate(Timeline(), {0: 1}, now=10.0, hb_ts=9.5, hb_now=10.0, stale=False).ms == pytest.approx(500)


def _replica_obs(lag_ms=10.0, io="Yes", sql="Yes", ok=True, at=1.0, **kw):
    return Observation(ok=ok, at=at, read_only=True, replicating=True, io_state=io, sql_state=sql,
                       lag=LagReading(lag_ms, "heartbeat"), error="" if ok else "timed out", **kw)


def test_hysteresis_failcount_and_readmit_after():
    pol = Policy(failcount=3, readmit_after=5, max_lag_ms=1000)
    tr, st = Tracker(), ServerState("n2", "127.0.0.1", 2)
    st, msg = decide(st, _replica_obs(), tr, pol, "auto")
    assert (st.role, st.state, st.readable) == (REPLICA, UP, True) and "first check" in msg
    st, msg = decide(st, _replica_obs(lag_ms=1420.0), tr, pol, "auto")
    assert (st.state, st.readable) == (LAGGING, False)
    assert msg == "replica left the read pool: lag 1.42 s > max_replica_lag 1.0 s"
    for i in range(4):  # healthy again, but not yet for readmit_after checks
        st, msg = decide(st, _replica_obs(), tr, pol, "auto")
        assert st.state == UP and not st.readable
    st, msg = decide(st, _replica_obs(lag_ms=1001.0), tr, pol, "auto")  # one relapse restarts the count
    for i in range(4):
        st, _ = decide(st, _replica_obs(), tr, pol, "auto")
        assert not st.readable
    st, msg = decide(st, _replica_obs(), tr, pol, "auto")
    assert st.readable and "joined the read pool after 5 consecutive healthy checks" in msg
    for i in range(2):  # failures below failcount change nothing a router sees
        st, msg = decide(st, _replica_obs(ok=False), tr, pol, "auto")
        assert st.readable and st.state == UP and msg == ""
    st, msg = decide(st, _replica_obs(ok=False), tr, pol, "auto")
    assert st.state == DOWN and not st.readable and "down after 3 failed checks: timed out" in msg
    st, msg = decide(st, _replica_obs(), tr, pol, "auto")
    assert st.state == UP and not st.readable and msg.startswith("reachable again")


def test_down_at_startup_gets_no_free_pass():
    pol, tr = Policy(failcount=3, readmit_after=5), Tracker()
    st = ServerState("n2", "127.0.0.1", 2)
    st, _ = decide(st, _replica_obs(ok=False), tr, pol, "auto")
    for i in range(4):
        st, _ = decide(st, _replica_obs(), tr, pol, "auto")
        assert not st.readable
    st, _ = decide(st, _replica_obs(), tr, pol, "auto")
    assert st.readable


def test_replica_problems_and_roles():
    assert replica_problems(_replica_obs(sql="No", sql_error="Duplicate entry"), 1000) == [
        "replication SQL thread stopped: Duplicate entry"]
    assert replica_problems(_replica_obs(io="No"), 1000) == ["replication IO thread stopped"]
    assert replica_problems(_replica_obs(io="Connecting"), 1000) == []  # judged by the lag it causes
    assert "lag unknown" in replica_problems(_replica_obs(lag_ms=None), 1000)[0]
    assert "not replicating" in replica_problems(replace(_replica_obs(), replicating=False), 1000)[0]
    assert learned_role("auto", False, UNKNOWN, mm=False) == PRIMARY
    assert learned_role("auto", False, UNKNOWN, mm=True) == MASTER
    assert learned_role("auto", True, PRIMARY, mm=False) == REPLICA
    assert learned_role("replica", False, UNKNOWN, mm=False) == REPLICA  # the config pins it
    assert learned_role("auto", None, PRIMARY, mm=False) == PRIMARY


# ---------------------------------------------------------------------------- real servers


def monitor_config(cluster, user="rwproxy", password=None, routing=None, **monitor):
    return build_config({
        "backends": [{"name": n.name, "host": "127.0.0.1", "port": n.port} for n in cluster.nodes],
        "users": [{"name": "app", "password": "app"}],
        "monitor": {"user": user, "password": cluster.password(user) if password is None else password, **monitor},
        "cluster": {"topology": cluster.topology},
        **({"routing": routing} if routing else {}),
    })


class Recorder:
    def __init__(self):
        self.checks: list[ServerState] = []
        self.updates = 0
        self.lock = threading.Lock()

    def on_check(self, st):
        with self.lock:
            self.checks.append(st)

    def on_update(self, topo):
        self.updates += 1

    def of(self, name, since=0.0):
        with self.lock:
            return [s for s in self.checks if s.name == name and s.last_check >= since]


@pytest.fixture
def run_monitor():
    """start(cluster, **monitor settings) -> (Monitor, Recorder); stopped after the test."""
    started = []

    def start(cluster, **kw):
        rec = Recorder()
        mon = Monitor(monitor_config(cluster, **kw), rec.on_update, on_check=rec.on_check).start()
        started.append(mon)
        assert mon.wait_until(lambda t: all(s.last_check for s in t.servers.values()), 10)
        return mon, rec

    yield start
    for mon in started:
        mon.stop()
        assert not mon._threads, "monitor threads still running after stop()"


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def readable(mon, name, want=True, timeout=10.0) -> bool:
    return mon.wait_until(lambda t: t.servers[name].readable is want, timeout)


class WriteLoad(threading.Thread):
    """A row every 10 ms on the primary, carrying the primary's clock."""

    def __init__(self, node, table="app.monitor_load"):
        super().__init__(daemon=True)
        self.node, self.table, self.stop = node, table, threading.Event()
        node.query(f"CREATE TABLE IF NOT EXISTS {table} (id BIGINT AUTO_INCREMENT PRIMARY KEY, "
                   "ts DECIMAL(20,6) NOT NULL)")

    def run(self):
        with self.node.connect() as c, c.cursor() as cur:
            while not self.stop.is_set():
                cur.execute(f"INSERT INTO {self.table} (ts) VALUES (UNIX_TIMESTAMP(NOW(6)))")
                time.sleep(0.01)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.join(5)


def test_heartbeat_table_created_and_advancing(cluster, run_monitor):
    mon, rec = run_monitor(cluster)
    topo = mon.topology
    p, r1, r2 = cluster.nodes
    assert topo.servers[p.name].role == PRIMARY and topo.primary.name == p.name
    assert mon.wait_until(lambda t: [s.name for s in t.readers] == [r1.name, r2.name], 5)
    sid = p.variable("server_id")
    q = "SELECT ts, writer FROM rwproxy.heartbeat WHERE server_id = %s"
    q_table = "SELECT 1 FROM information_schema.tables WHERE table_schema = 'rwproxy' AND table_name = 'heartbeat'"
    assert wait_for(lambda: all(n.query(q_table) for n in cluster.nodes), 3)
    time.sleep(0.3)
    first = {n.name: n.query(q, (sid,)) for n in cluster.nodes}
    time.sleep(0.6)
    for n in cluster.nodes:
        row = n.query(q, (sid,))
        assert row and row[0]["writer"] == p.name
        assert row[0]["ts"] > first[n.name][0]["ts"], f"heartbeat not advancing on {n.name}"
    version = mon.topology.version
    time.sleep(1.2)  # lag values are republished at least every second, even when nothing changed
    assert mon.topology.version > version and rec.updates >= 2
    for s in mon.topology.readers:  # (readers: lag measured and under max_replica_lag)
        assert s.lag_ms is not None and s.io_running and s.sql_running
        assert s.source == f"127.0.0.1:{p.port}" and s.gtid_current_pos and s.version


def test_master_delay_lag_measured_and_readmitted(cluster, run_monitor):
    r = cluster.replicas[0]
    mon, rec = run_monitor(cluster)
    with WriteLoad(cluster.primary) as load:
        try:
            r.query("STOP SLAVE")
            r.query("CHANGE MASTER TO MASTER_DELAY=2, MASTER_HEARTBEAT_PERIOD=0.2")  # (a bare CHANGE MASTER
                # resets the period to 30 s, and a live rwproxy of the session would restart replication to fix it)
            r.query("START SLAVE")
            # (STOP SLAVE itself evicts it for a moment, with "thread stopped" as the reason)
            assert mon.wait_until(lambda t: t.servers[r.name].state == LAGGING
                                  and "max_replica_lag" in t.servers[r.name].last_error, 6)
            assert not mon.topology.servers[r.name].readable
            time.sleep(1.5)
            errors = []
            with r.connect() as c, c.cursor() as cur:  # true lag: age of the newest applied row
                # (the load's first rows reach the replica MASTER_DELAY after they were written,
                # which on a loaded machine can be later than the wait above: a CI run read NULL)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    cur.execute(f"SELECT COUNT(*) FROM {load.table}")
                    if cur.fetchone()[0]:
                        break
                    time.sleep(0.1)
                for _ in range(15):
                    t0 = time.time()
                    cur.execute(f"SELECT UNIX_TIMESTAMP(NOW(6)), (SELECT ts FROM {load.table} "
                                "ORDER BY id DESC LIMIT 1)")
                    now, ts = cur.fetchone()
                    reading = rec.of(r.name)[-1]
                    if reading.lag_ms is None:  # (replication restarted under it: another rwproxy of
                        continue                # the session tunes the replicas' heartbeat period)
                    true_ms = (float(now) - float(ts) - (t0 - reading.last_check)) * 1000
                    errors.append(abs(reading.lag_ms - true_ms))
                    assert 900 < reading.lag_ms < 3500 and not reading.readable
                    time.sleep(0.07)
            # an apply burst between the reading and the probe spoils a sample; the median is robust
            assert len(errors) >= 10 and statistics.median(errors) < 150, errors
        finally:
            r.query("STOP SLAVE")
            r.query("CHANGE MASTER TO MASTER_DELAY=0, MASTER_HEARTBEAT_PERIOD=0.2")
            r.query("START SLAVE")
        since = time.time()
        assert readable(mon, r.name, True, 10)
    seq = rec.of(r.name, since)
    first_ok = next(i for i, s in enumerate(seq) if s.state == UP)
    joined = next(i for i, s in enumerate(seq) if s.readable)
    assert joined - first_ok == 4, "readmitted on the 5th consecutive healthy check (readmit_after=5)"
    cluster.primary.query(f"DROP TABLE IF EXISTS {load.table}")


def test_stopped_sql_thread_leaves_and_rejoins(cluster, run_monitor, caplog):
    caplog.set_level(logging.INFO, logger="rwproxy.monitor")
    r = cluster.replicas[1]
    mon, _ = run_monitor(cluster)
    assert readable(mon, r.name, True, 5)
    try:
        r.query("STOP SLAVE SQL_THREAD")
        assert readable(mon, r.name, False, 10)
        st = mon.topology.servers[r.name]
        assert st.sql_running is False and st.io_running is True and "SQL thread stopped" in st.last_error
        assert any(f"{r.name} (127.0.0.1:{r.port}): replica left the read pool: replication SQL thread stopped"
                   in m for m in caplog.messages)
        assert mon.topology.servers[cluster.replicas[0].name].readable
    finally:
        r.query("START SLAVE")
    assert readable(mon, r.name, True, 5)
    assert any("joined the read pool after 5 consecutive healthy checks" in m for m in caplog.messages)


def _slave_status_reads(node) -> int:
    with node.connect() as c, c.cursor() as cur:
        cur.execute("SHOW GLOBAL STATUS LIKE 'Com_show_slave_status'")
        return int(cur.fetchone()[1])


def test_replication_status_read_at_its_own_pace(cluster_factory, run_monitor):
    """SHOW ALL SLAVES STATUS (the costly part of a check) is reused for replication_interval
    while replication is healthy; 0 reads it on every check. Counted by the replica itself, on a
    private cluster that no other monitor watches (checks on the tick: calm checks in
    test_monitor_cadence.py)."""
    c = cluster_factory(replicas=1)
    r = c.replicas[0]
    for interval, low, high in ((0.5, 3, 9), (0.0, 20, 40)):
        mon, rec = run_monitor(c, interval=0.1, replication_interval=interval, steady_checks=False)
        assert readable(mon, r.name, True, 5)
        before, since = _slave_status_reads(r), time.time()
        time.sleep(3.0)
        reads = _slave_status_reads(r) - before
        checks = len(rec.of(r.name, since=since))
        mon.stop()
        assert checks >= 20, checks  # checks kept their 100 ms pace
        assert low <= reads <= high, (interval, reads, checks)
        st = mon.topology.servers[r.name]
        assert st.io_running is True and st.sql_running is True and st.lag_ms is not None


def _selects(node) -> int:
    with node.connect() as c, c.cursor() as cur:
        cur.execute("SHOW GLOBAL STATUS LIKE 'Com_select'")
        return int(cur.fetchone()[1])


def test_lag_read_in_the_check_round_trip(cluster_factory, run_monitor):
    """On a replica the newest heartbeat is read by the check's own SELECT (one statement per
    check, not two); when that read is refused the check falls back to the plain query without
    failing (lag then comes from the GTID timeline alone). Counted by a private cluster's replica."""
    c = cluster_factory(replicas=1)
    r = c.replicas[0]
    c.primary.query("CREATE USER mon_m@'%' IDENTIFIED BY 'pw'")
    c.primary.query("GRANT SLAVE MONITOR ON *.* TO mon_m@'%'")
    c.primary.query("GRANT SELECT, INSERT, UPDATE, CREATE ON rwproxy.* TO mon_m@'%'")
    c.wait_replicas_caught_up(10)
    mon, rec = run_monitor(c, user="mon_m", password="pw", interval=0.1, steady_checks=False)
    assert readable(mon, r.name, True, 5)
    tracker = mon._nodes[r.name].tracker
    assert wait_for(lambda: tracker.last_lag is not None and tracker.last_lag.source == "heartbeat", 3)
    time.sleep(0.3)
    before, since = _selects(r), time.time()
    assert wait_for(lambda: len(rec.of(r.name, since=since)) >= 12, 20)
    selects, checks = _selects(r) - before, len(rec.of(r.name, since=since))
    assert checks - 2 <= selects <= checks + 3, (selects, checks)  # one SELECT per check
    assert tracker.last_lag.source == "heartbeat" and mon.topology.servers[r.name].readable

    with r.connect() as conn, conn.cursor() as cur:  # on the replica only
        cur.execute("SET SESSION sql_log_bin = 0")
        cur.execute("REVOKE SELECT ON rwproxy.* FROM mon_m@'%'")
    since = time.time()
    assert wait_for(lambda: not mon._nodes[r.name].hb_merge, 3)  # back to the plain check
    assert wait_for(lambda: len(rec.of(r.name, since=since)) >= 8, 20)
    after = rec.of(r.name, since=since)
    assert all(s.fails == 0 and s.state == "up" for s in after), after[-1]
    st = mon.topology.servers[r.name]  # lag still measured, from the primary's GTID timeline
    assert st.readable and st.lag_ms is not None, st


def test_gtid_positions_published_at_once_only_for_gtid_routing(cluster_factory, run_monitor):
    """Every heartbeat moves every server's GTID position. Workers route on positions only with
    read_your_writes = "gtid": then each move is published at once; otherwise an idle cluster's
    snapshots go out about once a second (each wakes every worker)."""
    c = cluster_factory(replicas=1)
    published = {}
    for mode, routing in (("session", {}), ("gtid", {"read_your_writes": "gtid"})):
        mon, rec = run_monitor(c, routing=routing)
        time.sleep(0.5)
        before, checks0 = rec.updates, len(rec.checks)
        time.sleep(3.0)
        published[mode] = (rec.updates - before, len(rec.checks) - checks0)
        mon.stop()
    (plain, plain_checks), (gtid_mode, gtid_checks) = published["session"], published["gtid"]
    # without gtid routing an idle cluster's snapshots ride the once-a-second timer (never more
    # than the timer allows, however fast the checks run); with it, moved positions go out at once
    assert 1 <= plain <= 6, published
    assert gtid_mode > plain and gtid_mode * plain_checks > 2 * plain * gtid_checks, published


def test_sigkill_replica_down_fast_then_readmitted(cluster, run_monitor):
    r, other = cluster.replicas
    mon, _ = run_monitor(cluster)
    assert readable(mon, r.name, True, 5)
    try:
        r.kill(signal.SIGKILL, wait=False)
        assert mon.wait_until(lambda t: t.servers[r.name].state == DOWN, 10)  # (its figure: benchmarks/monitor_figures.py)
        topo = mon.topology
        assert not topo.servers[r.name].readable and topo.servers[other.name].readable
        assert "Connection refused" in topo.servers[r.name].last_error or "Lost connection" in \
            topo.servers[r.name].last_error
    finally:
        cluster.up()
    assert readable(mon, r.name, True, 15)


def test_sigstop_replica_times_out_without_slowing_others(cluster, run_monitor):
    r, other = cluster.replicas
    mon, rec = run_monitor(cluster)
    assert readable(mon, r.name, True, 5)
    pid = r.pid()
    stopped = time.time()
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        assert mon.wait_until(lambda t: t.servers[r.name].state == DOWN, 6)
        took = time.monotonic() - t0
        # three timed-out checks (read_timeout / connect_timeout 0.5 s): never sooner than that
        assert took > 1.0, took
        assert "timed out" in mon.topology.servers[r.name].last_error
        assert mon.topology.servers[other.name].readable
        # the other replica kept its pace: many checks for each of the hung one's attempts
        others, hung = len(rec.of(other.name, stopped)), len(rec.of(r.name, stopped))
        assert others > 2 * hung, (others, hung)
        assert all(s.readable for s in rec.of(other.name, stopped))
    finally:
        os.kill(pid, signal.SIGCONT)
    assert readable(mon, r.name, True, 10)


def test_read_only_flip_on_primary_is_followed(cluster, run_monitor, caplog):
    caplog.set_level(logging.INFO, logger="rwproxy.monitor")
    p = cluster.primary
    mon, _ = run_monitor(cluster)
    try:
        p.query("SET GLOBAL read_only=1")
        assert mon.wait_until(lambda t: t.servers[p.name].role == REPLICA, 2)
        assert mon.topology.primary is None
        time.sleep(1.5)  # no writer, no heartbeat: the replicas' lag must not grow as if they lagged
        for r in cluster.replicas:
            st = mon.topology.servers[r.name]
            assert st.readable and st.lag_ms is not None, st  # readable: lag under max_replica_lag
        assert any(f"{p.name} (127.0.0.1:{p.port}): role primary -> replica (read_only=1)" in m
                   for m in caplog.messages)
    finally:
        p.query("SET GLOBAL read_only=0")
    assert mon.wait_until(lambda t: t.primary is not None and t.primary.name == p.name, 2)


def test_monitor_user_privileges_and_fallback(cluster, run_monitor, caplog):
    """The documented minimal grants suffice; without write grants the lag falls back to SBM."""
    caplog.set_level(logging.INFO, logger="rwproxy.monitor")
    p = cluster.primary
    for user, grants in (("mon_min", ["SLAVE MONITOR ON *.*", "SELECT, INSERT, UPDATE, CREATE ON rwproxy.*"]),
                         ("mon_ro", ["SLAVE MONITOR ON *.*", "SELECT ON rwproxy.*"])):
        p.query(f"CREATE USER IF NOT EXISTS {user}@'%' IDENTIFIED BY 'pw'")
        for g in grants:
            p.query(f"GRANT {g} TO {user}@'%'")
    cluster.wait_replicas_caught_up(10)
    try:
        mon, _ = run_monitor(cluster, user="mon_min", password="pw")
        assert mon.wait_until(lambda t: len(t.readers) == 2, 5)
        time.sleep(0.6)
        assert all(s.lag_ms < 200 for s in mon.topology.readers)
        assert not any("cannot write the heartbeat" in m for m in caplog.messages)
        mon.stop()

        mon, _ = run_monitor(cluster, user="mon_ro", password="pw")
        assert mon.wait_until(lambda t: len(t.readers) == 2, 5)
        time.sleep(1.0)
        denied = [m for m in caplog.messages if "cannot write the heartbeat" in m]
        assert len(denied) == 1 and "Seconds_Behind_Master" in denied[0]
        assert all(s.lag_ms == 0.0 and s.readable for s in mon.topology.readers)  # whole seconds
        # no write grant anywhere: the read-only user cannot write on a replica either
        with pytest.raises(pymysql.err.MySQLError):
            with cluster.replicas[0].connect("mon_ro", "pw") as c, c.cursor() as cur:
                cur.execute("INSERT INTO rwproxy.heartbeat (server_id, ts) VALUES (999, 0)")
    finally:
        for user in ("mon_min", "mon_ro"):
            p.query(f"DROP USER IF EXISTS {user}@'%'")


def test_dead_primary_keeps_replicas_readable(cluster_factory, run_monitor):
    c = cluster_factory(replicas=2)
    mon, _ = run_monitor(c)
    assert mon.wait_until(lambda t: len(t.readers) == 2, 5)
    c.primary.kill(signal.SIGKILL)
    assert mon.wait_until(lambda t: t.servers[c.primary.name].state == DOWN, 3)
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:  # IO threads reconnecting, heartbeat stale: still fine read targets
        for r in c.replicas:
            st = mon.topology.servers[r.name]
            assert st.readable and st.lag_ms is not None and st.lag_ms < 1000, st
        time.sleep(0.1)
    assert all(mon.topology.servers[r.name].io_running is False for r in c.replicas)


def test_master_master_roles_and_heartbeats(cluster_factory, run_monitor):
    c = cluster_factory(replicas=1, topology="master-master")
    mon, _ = run_monitor(c)
    m1, m2, r = c.nodes
    assert mon.wait_until(lambda t: [s.name for s in t.readers] == [r.name], 5)
    topo = mon.topology
    assert [s.name for s in topo.writers] == [m1.name, m2.name]
    assert topo.servers[m1.name].role == MASTER and topo.servers[m2.name].role == MASTER
    q_table = "SELECT COUNT(*) AS n FROM information_schema.tables WHERE table_name = 'heartbeat'"
    assert wait_for(lambda: r.query(q_table)[0]["n"] == 1, 3)
    assert wait_for(lambda: len(r.query("SELECT server_id FROM rwproxy.heartbeat")) == 2, 3)
    time.sleep(0.5)
    assert all(s.lag_ms is not None and s.lag_ms < 200 for s in mon.topology.servers.values() if s.source)
