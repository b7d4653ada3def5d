"""Reads through rwproxy while replicas fail for real: killed, hung, lagging, stopped."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pymysql
import pytest

from helpers import start_proxy, wait_until
from proxy.testing.loadgen import Load, select_port


def Readers(proxy, n=8):
    """8 clients running `SELECT @@port` through the proxy."""
    return Load(lambda: proxy.connect(autocommit=True, ssl_disabled=True, read_timeout=30), select_port, clients=n)


def _status(p) -> dict:
    r = subprocess.run([sys.executable, "-m", "proxy", "status", "--json", "--config", p.process.config_path],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    return {s["name"]: s for s in json.loads(r.stdout)["servers"]}


@pytest.fixture
def setup(cluster_factory, tmp_path):
    cl = cluster_factory(replicas=2)
    p = start_proxy(cl, tmp_path, proxy={"workers": 2}, routing={"read_your_writes": "none"})
    reps = {n.port for n in cl.replicas}
    try:
        with p.connect(autocommit=True) as c, c.cursor() as cur:  # both replicas serve reads
            assert wait_until(lambda: cur.execute("SELECT @@port") is not None and cur.fetchone()[0] in reps, 15)
        yield cl, p
    finally:
        p.process.stop()


def test_sigkill_replica_under_read_load(setup):
    cl, p = setup
    victim, other = cl.replicas
    with Readers(p) as r:
        assert wait_until(lambda: r.values_between(0, time.monotonic()) == {victim.port, other.port}, 15)
        victim.kill(signal.SIGKILL)
        assert wait_until(lambda: not _status(p)["node2"]["readable"], 10)
        since = time.monotonic()
        assert wait_until(lambda: r.count_since(since) >= 100, 30)
        after = r.values_between(since, time.monotonic())
        assert after == {other.port}, "the dead replica's share of reads moved to the other one"
        victim.start()  # restart: readmitted after readmit_after healthy checks
        assert wait_until(lambda: _status(p)["node2"]["readable"], 20)
        back = time.monotonic()
        assert wait_until(lambda: victim.port in r.values_between(back, time.monotonic()), 15)
    assert r.errors == [], f"clients saw errors: {r.errors[:5]}"


def test_sigstop_replica_no_client_waits_past_detection(setup):
    cl, p = setup
    victim, other = cl.replicas
    with Readers(p) as r:
        assert wait_until(lambda: r.values_between(0, time.monotonic()) == {victim.port, other.port}, 15)
        victim.kill(signal.SIGSTOP, wait=False)
        try:
            assert wait_until(lambda: not _status(p)["node2"]["readable"], 10)
            # Reads stuck on the hung replica are moved once it is declared down: while it is
            # still stopped, every client completes further reads, all on the other replica.
            at_detection, since = r.completed(), time.monotonic()
            assert wait_until(lambda: all(b >= a + 3 for a, b in zip(at_detection, r.completed())), 20), \
                (at_detection, r.completed())
            assert r.values_between(since, time.monotonic()) == {other.port}
        finally:
            victim.kill(signal.SIGCONT, wait=False)
        assert wait_until(lambda: _status(p)["node2"]["readable"], 20)
    assert r.errors == [], f"clients saw errors: {r.errors[:5]}"


def test_lagging_and_stopped_replicas_leave_and_return(setup):
    cl, p = setup
    victim, other = cl.replicas
    with victim.connect() as c, c.cursor() as cur:
        cur.execute("STOP SLAVE SQL_THREAD")
    try:
        assert wait_until(lambda: not _status(p)["node2"]["readable"], 15)  # a behaviour bound: the status subprocess is slow on a loaded machine
        with p.connect(autocommit=True) as c, c.cursor() as cur:
            for _ in range(20):
                cur.execute("SELECT @@port")
                assert cur.fetchone()[0] == other.port
    finally:
        with victim.connect() as c, c.cursor() as cur:
            cur.execute("START SLAVE")
    assert wait_until(lambda: _status(p)["node2"]["readable"], 20)
    # replication delay: a steady write load and MASTER_DELAY=3 make it lag past max_replica_lag
    with victim.connect() as c, c.cursor() as cur:
        cur.execute("STOP SLAVE")
        cur.execute("CHANGE MASTER TO MASTER_DELAY=3, MASTER_HEARTBEAT_PERIOD=0.2")
        cur.execute("START SLAVE")
    stop = threading.Event()

    def writer():
        with cl.primary.connect(database="app") as c, c.cursor() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS lagload (id INT AUTO_INCREMENT PRIMARY KEY)")
            end = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < end:
                cur.execute("INSERT INTO lagload VALUES ()")
                time.sleep(0.05)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        assert wait_until(lambda: _status(p)["node2"]["state"] == "lagging", 10)
        st = _status(p)["node2"]
        assert not st["readable"] and st["lag_ms"] > 1000
        with p.connect(autocommit=True) as c, c.cursor() as cur:
            for _ in range(20):
                cur.execute("SELECT @@port")
                assert cur.fetchone()[0] == other.port
        with victim.connect() as c, c.cursor() as cur:
            cur.execute("STOP SLAVE")
            cur.execute("CHANGE MASTER TO MASTER_DELAY=0, MASTER_HEARTBEAT_PERIOD=0.2")
            cur.execute("START SLAVE")
        assert wait_until(lambda: _status(p)["node2"]["readable"], 20)
    finally:
        stop.set()
        t.join(10)


def test_a_primary_made_read_only_by_hand_answers_writes_with_its_own_error(setup):
    """Issue 20: writes to a primary set read_only by hand (no failover, no switchover) waited
    write_hold_timeout and then failed with 1927; they get the server's own 1290 now."""
    cl, p = setup
    with p.connect(autocommit=True) as c, c.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS flip (id INT)")
    with cl.primary.connect() as admin, admin.cursor() as cur:
        cur.execute("SET GLOBAL read_only=1")
        try:
            assert wait_until(lambda: _status(p)["node1"]["read_only"] is True, 5)
            assert _status(p)["node1"]["role"] == "primary"  # still the primary: no failover for this
            with p.connect(autocommit=True) as c, c.cursor() as wcur:
                with pytest.raises(pymysql.err.MySQLError) as e:
                    wcur.execute("INSERT INTO flip VALUES (1)")
                assert e.value.args[0] == 1290 and "read-only" in e.value.args[1], e.value.args
                wcur.execute("SELECT COUNT(*) FROM flip")  # reads carry on
        finally:
            cur.execute("SET GLOBAL read_only=0")
    assert wait_until(lambda: _status(p)["node1"]["read_only"] is False, 5)
    with p.connect(autocommit=True) as c, c.cursor() as cur:
        cur.execute("INSERT INTO flip VALUES (1)")


def test_a_full_primary_answers_1040_and_sessions_go_on(setup):
    """A primary at max_connections answers a new connection with 1040 in place of its greeting.
    rwproxy took that for a lost connection: a write was held write_hold_timeout and then failed
    with 1927 "Lost connection to backend ... during handshake". It gets the server's 1040 (08004)
    now; a session that logs in meanwhile reads on the replicas, and writes once there is room."""
    from proxy.testing.rawclient import RawClient

    cl, p = setup
    reps = {n.port for n in cl.replicas}
    with p.connect(autocommit=True) as c, c.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS full_primary (id INT)")
    held, refused = [], None
    with cl.primary.connect() as admin, admin.cursor() as acur:  # (root's own seat, kept open)
        acur.execute("SELECT @@max_connections")
        before = acur.fetchone()[0]
        acur.execute("SELECT COUNT(*) FROM information_schema.processlist")
        acur.execute(f"SET GLOBAL max_connections = {acur.fetchone()[0] + 2}")
        try:
            for _ in range(20):  # each session writes in a transaction: one primary connection each
                s = RawClient(p.host, p.port)
                answer = s.command(b"\x03BEGIN")  # (the write's or the BEGIN's primary connection)
                if answer[0] == 0:
                    answer = s.command(b"\x03INSERT INTO full_primary VALUES (1)")
                if answer[0] == 0xFF:
                    refused = s
                    break
                held.append(s)
            assert refused is not None, "the primary never filled up"
            assert answer[1:3] == (1040).to_bytes(2, "little") and answer[3:9] == b"#08004", answer
            late = RawClient(p.host, p.port)  # logs in while the primary is full
            late.send(b"\x03SELECT @@port")
            assert int(late.read_until_eof()[-2][1:]) in reps
        finally:
            for s in held:
                s.command(b"\x03ROLLBACK")
                s.close()
            acur.execute(f"SET GLOBAL max_connections = {before}")
    for s in (refused, late):  # the same sessions write once there is room
        assert s.command(b"\x03ROLLBACK")[0] == 0
        assert s.command(b"\x03INSERT INTO full_primary VALUES (2)")[0] == 0
        s.close()


def test_status_reports_counts(setup):
    cl, p = setup
    with p.connect(autocommit=True) as c, c.cursor() as cur:
        for _ in range(10):
            cur.execute("SELECT 1")
    time.sleep(0.8)  # workers publish their counters twice a second
    st = _status(p)
    assert sum(s["routed"] for s in st.values()) >= 10
    assert st["node1"]["role"] == "primary" and st["node2"]["role"] == "replica"
    assert st["node2"]["lag_ms"] is not None


def test_status_shows_positions_of_the_latest_checks(setup):
    """Heartbeats move every server's GTID 4 times a second; workers get positions about once a
    second (no gtid routing here), but `rwproxy status` shows them as of the latest 100 ms checks."""
    cl, p = setup

    def primary_seq() -> int:
        return int(cl.primary.variable("gtid_binlog_pos").split("-")[-1])

    for _ in range(4):
        before = primary_seq()  # the status command (a new Python process) may take a while to
        st = _status(p)         # start on a busy machine: bracket the moment it asks
        after = primary_seq()
        for name, s in st.items():
            seq = int(s["gtid"].split("-")[-1])
            # at most one or two heartbeats behind the primary as it was when status asked
            assert before - 2 <= seq <= after, (name, s["gtid"], before, after)
        time.sleep(0.3)


def test_with_no_writable_primary_a_new_session_sets_itself_up_and_reads(cluster_factory, tmp_path):
    """The primary down and nobody promoting another (auto_failover off here; otherwise no replica
    fit to promote, or the failover cooldown): a client that sets its session up at connect (SET
    NAMES, time_zone, USE: what Connector/J, ORMs and pools send) waited write_hold_timeout at each
    SET and got ERROR 1927, so it could not even read. A SET or USE now runs on a replica and is
    replayed elsewhere as always; writes still wait for a primary, and once it is back the session
    writes there with its settings."""
    cl = cluster_factory(replicas=2)
    p = start_proxy(cl, tmp_path, proxy={"workers": 1},
                    failover={"auto_failover": False, "write_hold_timeout": 1.0})
    reps = {n.port for n in cl.replicas}
    old = cl.primary
    try:
        with p.connect(autocommit=True) as c, c.cursor() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS nop (id INT)")
            assert wait_until(lambda: cur.execute("SELECT @@port") is not None and cur.fetchone()[0] in reps, 15)
        old.kill(signal.SIGKILL)
        assert wait_until(lambda: _status(p)[old.name]["state"] == "down", 15)
        with p.connect(autocommit=True) as c, c.cursor() as cur:
            cur.execute("SET time_zone = '+03:00'")
            cur.execute("SET NAMES latin1")
            cur.execute("USE app")
            cur.execute("set autocommit=1, sql_mode='ANSI_QUOTES'")  # (Connector/J's, at every connect)
            cur.execute("SELECT @@time_zone, @@character_set_client, DATABASE(), @@sql_mode, @@port")
            tz, cs, db, mode, port = cur.fetchone()
            assert (tz, cs, db, mode) == ("+03:00", "latin1", "app", "ANSI_QUOTES") and port in reps
            cur.execute("SELECT COUNT(*) FROM nop")  # (on the other replica too: the settings follow)
            with pytest.raises(pymysql.err.MySQLError) as e:
                cur.execute("INSERT INTO nop VALUES (1)")
            assert e.value.args[0] == 1927, e.value.args
            old.start()
            assert wait_until(lambda: _status(p)[old.name]["state"] == "up", 30)
            cur.execute("INSERT INTO nop VALUES (1)")
            cur.execute("/* rwproxy:primary */ SELECT @@time_zone, @@character_set_client, DATABASE(), @@sql_mode, "
                        "@@autocommit, @@port")
            assert cur.fetchone() == ("+03:00", "latin1", "app", "ANSI_QUOTES", 1, old.port)
    finally:
        p.process.stop()
