"""Idle sessions give their server connections back ([pool] idle_release) and many clients share
a bounded number of server connections ([pool] max_server_connections, queue_timeout), against
the real cluster: what each client reads back after its connection went back to the pool, what
keeps a session on its connection, how many connections the servers saw, and the error a client
gets when none became free in time."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pymysql
import pytest

from proxy.testing.clusters import user_connections

from helpers import ensure_backend_user, start_proxy

USER = "idl"


@pytest.fixture(scope="module")
def idle_proxy(cluster, tmp_path_factory):
    """One worker (its limits are the instance's), connections back after 200 ms idle, at most 4
    per server, 2 s in line."""
    ensure_backend_user(cluster, USER, USER)
    with cluster.primary.connect(database="app") as c, c.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS idl (id INT AUTO_INCREMENT PRIMARY KEY, v VARCHAR(20))")
        cur.execute("CREATE DATABASE IF NOT EXISTS idl_other")
        cur.execute("INSERT INTO idl (v) VALUES ('seed')")  # FOUND_ROWS() > 0 whichever test runs first
        cur.execute("CREATE OR REPLACE TABLE idl_handler (x INT)")
        cur.execute("CREATE OR REPLACE TABLE idl_blob (id INT PRIMARY KEY, b LONGBLOB)")
        cur.execute("INSERT INTO idl_handler VALUES (7)")
        cur.execute("CREATE SEQUENCE IF NOT EXISTS idl_seq")
        cur.execute("CREATE OR REPLACE PROCEDURE idl_proc() BEGIN SET @idl_pv = 42; END")
        cur.execute("GRANT ALL ON idl_other.* TO 'idl'@'%'")
    cluster.wait_replicas_caught_up(30)
    p = start_proxy(cluster, tmp_path_factory.mktemp("idle"), proxy={"workers": 1},
                    users=[{"name": USER, "password": USER}],
                    pool={"idle_release": 200, "max_server_connections": 4, "queue_timeout": 2.0})
    try:
        yield p
    finally:
        p.process.stop()


def connect(p, **kw):
    return p.connect(user=USER, password=USER, autocommit=True, **kw)


def one(c, sql, args=None):
    with c.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchone()


def sessions_table(p) -> list[dict]:
    r = subprocess.run([sys.executable, "-m", "proxy", "status", "--json", "--tables", "sessions",
                        "--config", p.process.config_path], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["tables"]["sessions"]


def wait_until(pred, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout} s")


def holds(p) -> list[str]:
    """The servers each session of USER holds a connection to (comma-separated, "" = none)."""
    return [r["servers"] for r in sessions_table(p) if r["user"] == USER]


def test_an_idle_session_gives_its_connection_back_and_keeps_its_state(idle_proxy):
    c = connect(idle_proxy, database="app")
    try:
        one(c, "SET SESSION sql_mode = 'ANSI_QUOTES'")
        one(c, "SET @greeting = 'hello'")  # a literal user variable: replayed, does not tie the session
        one(c, "INSERT INTO idl (v) VALUES ('a')")
        inserted = one(c, "SELECT LAST_INSERT_ID()")[0]
        one(c, "USE idl_other")
        wait_until(lambda: holds(idle_proxy) == [""], what="the session giving its connection back")
        # a new connection (or the same one, reset by COM_RESET_CONNECTION) serves the session now
        assert one(c, "SELECT LAST_INSERT_ID()")[0] == inserted
        assert "ANSI_QUOTES" in one(c, "SELECT @@SESSION.sql_mode")[0]
        assert one(c, "SELECT DATABASE()")[0] == "idl_other"
        assert one(c, "SELECT @greeting")[0] == "hello"
        one(c, "INSERT INTO app.idl (v) VALUES ('b')")
        assert one(c, "SELECT LAST_INSERT_ID()")[0] == inserted + 1
    finally:
        c.close()


def test_a_prepared_statement_survives_its_connection_going_back(idle_proxy):
    import mysql.connector

    mc = mysql.connector.connect(host=idle_proxy.host, port=idle_proxy.port, user=USER, password=USER,
                                 database="app", autocommit=True)
    try:
        cur = mc.cursor(prepared=True)
        cur.execute("INSERT INTO idl (v) VALUES (%s)", ("ps",))
        cur.execute("SELECT COUNT(*) FROM idl WHERE v = %s", ("ps",))
        n = cur.fetchall()[0][0]
        assert n >= 1
        wait_until(lambda: all(h == "" for h in holds(idle_proxy)), what="connections given back")
        cur.execute("INSERT INTO idl (v) VALUES (%s)", ("ps",))  # prepared again on a new connection
        cur.execute("SELECT COUNT(*) FROM idl WHERE v = %s", ("ps",))
        assert cur.fetchall()[0][0] == n + 1
        cur.close()
    finally:
        mc.close()


@pytest.mark.parametrize("setup,check,tie", [
    (["BEGIN", "INSERT INTO idl (v) VALUES ('trx')"], "SELECT COUNT(*) FROM idl WHERE v = 'trx'", "transaction"),
    (["CREATE TEMPORARY TABLE tmp_idl (x INT)", "INSERT INTO tmp_idl VALUES (7)"], "SELECT x FROM tmp_idl",
     "temporary table"),
    (["SELECT GET_LOCK('idl_lock', 1)"], "SELECT IS_USED_LOCK('idl_lock') = CONNECTION_ID()", "named lock"),
    (["SET @n := (SELECT 41 + 1)"], "SELECT @n", "user variable"),
    (["SELECT SQL_CALC_FOUND_ROWS id FROM idl LIMIT 1"], "SELECT FOUND_ROWS() > 0", "FOUND_ROWS() pending"),
    # state rwproxy cannot carry to a new connection (found by probing: each was lost after idle_release)
    (["PREPARE idl_st FROM 'SELECT 41 + 1'"], "EXECUTE idl_st", "prepared statements (SQL PREPARE)"),
    (["HANDLER idl_handler OPEN AS idl_h"], "HANDLER idl_h READ FIRST", "open HANDLER tables"),
    (["CALL idl_proc()"], "SELECT @idl_pv", "state left by a stored procedure (CALL)"),
    (["SELECT LAST_INSERT_ID(42)"], "SELECT LAST_INSERT_ID()", "LAST_INSERT_ID(expr) or sequence values"),
    (["SELECT NEXTVAL(idl_seq)"], "SELECT LASTVAL(idl_seq) IS NOT NULL", "LAST_INSERT_ID(expr) or sequence values"),
    (["SET TRANSACTION READ ONLY"], "/* rwproxy:primary */ SELECT 7", "SET TRANSACTION pending"),
    (["SET @idl_tz := CONCAT('+0', '5:00')", "SET time_zone = @idl_tz"], "SELECT @@time_zone = '+05:00'",
     "session history not replayable"),
])
def test_what_ties_a_session_keeps_its_connection(idle_proxy, setup, check, tie):
    c = connect(idle_proxy, database="app")
    try:
        for sql in setup:
            one(c, sql)
        found_rows = tie == "FOUND_ROWS() pending"  # (CONNECTION_ID() would answer FOUND_ROWS' question)
        thread = None if found_rows else one(c, "SELECT CONNECTION_ID()")[0]
        time.sleep(0.6)  # three times idle_release
        rows = [r for r in sessions_table(idle_proxy) if r["user"] == USER]
        assert len(rows) == 1
        assert tie in rows[0]["ties"], rows[0]
        assert rows[0]["servers"], rows[0]  # it still holds its connection
        if not found_rows:
            assert rows[0]["servers"] == idle_proxy.cluster.primary.name
        assert one(c, check)[0] in (1, 7, 42)
        if thread is not None:
            assert one(c, "SELECT CONNECTION_ID()")[0] == thread
    finally:
        c.close()


def test_long_data_sent_in_pauses_reaches_the_execute_whole(idle_proxy):
    """COM_STMT_SEND_LONG_DATA chunks sent with pauses longer than idle_release (a client
    streaming a blob from a slow source): the server holds them on the connection until the
    execute, so the session keeps it; a release between the chunks stored half the blob."""
    import io

    import mysql.connector

    class Slow(io.RawIOBase):
        def __init__(self):
            self.parts = [b"a" * 100000, None, b"b" * 50000]

        def readable(self):
            return True

        def read(self, n=-1):
            while self.parts:
                part = self.parts.pop(0)
                if part is None:
                    time.sleep(0.6)  # three times idle_release between two chunks
                    continue
                return part
            return b""

    c = mysql.connector.connect(host=idle_proxy.host, port=idle_proxy.port, user=USER, password=USER,
                                database="app", use_pure=True, autocommit=True)
    try:
        stmt = c.cmd_stmt_prepare(b"INSERT INTO idl_blob (id, b) VALUES (1, ?)")
        c.cmd_stmt_execute(stmt["statement_id"], data=(Slow(),), parameters=stmt["parameters"])
        cur = c.cursor()
        cur.execute("SELECT LENGTH(b), LEFT(b, 1) = 'a', RIGHT(b, 1) = 'b' FROM idl_blob WHERE id = 1 "
                    "/* rwproxy:primary */")
        assert cur.fetchall() == [(150000, 1, 1)]
        cur.close()
    finally:
        c.close()


def test_set_transaction_binds_the_next_transaction_only(idle_proxy):
    """SET TRANSACTION without a scope is the next transaction's only: it outlives an idle pause
    (ERROR 1792 as a server gives), and once used it is not replayed onto a later transaction
    on a new connection (found by probing: the replay made the next transaction read-only)."""
    c = connect(idle_proxy, database="app")
    try:
        one(c, "SET TRANSACTION READ ONLY")
        time.sleep(0.6)  # three times idle_release: the connection that has it stays
        one(c, "BEGIN")
        with pytest.raises(pymysql.err.OperationalError) as e:
            one(c, "INSERT INTO idl (v) VALUES ('ro')")
        assert e.value.args[0] == 1792
        one(c, "ROLLBACK")
        one(c, "SET TRANSACTION READ ONLY")
        one(c, "BEGIN")
        one(c, "SELECT COUNT(*) FROM idl")
        one(c, "COMMIT")
        wait_until(lambda: all(h == "" for h in holds(idle_proxy)), what="connections given back")
        one(c, "BEGIN")
        one(c, "INSERT INTO idl (v) VALUES ('rw')")  # a new connection, and a read-write transaction
        one(c, "COMMIT")
        assert one(c, "SELECT @@session.tx_read_only")[0] == 0
    finally:
        c.close()


def test_warnings_are_read_on_the_connection_that_left_them(idle_proxy):
    c = connect(idle_proxy, database="app")
    try:
        one(c, "SELECT CAST('12abc' AS SIGNED)")
        time.sleep(0.6)
        with c.cursor() as cur:
            cur.execute("SHOW WARNINGS")
            rows = cur.fetchall()
        assert rows and rows[0][1] == 1292, rows
    finally:
        c.close()


def test_many_clients_share_a_few_server_connections(idle_proxy):
    """40 clients writing and reading at once through at most 4 connections per server: every
    client gets every answer right, and the servers never see more than 4 of this user's
    connections."""
    cluster = idle_proxy.cluster
    stop = threading.Event()
    peaks = {n.name: 0 for n in cluster.nodes}

    def sample():
        while not stop.is_set():
            for name, n in user_connections(cluster, USER).items():
                peaks[name] = max(peaks[name], n)
            time.sleep(0.05)

    errors: list = []

    def client(i: int):
        try:
            c = connect(idle_proxy, database="app")
            try:
                for j in range(5):
                    one(c, "INSERT INTO idl (v) VALUES (%s)", (f"m{i}-{j}",))
                    iid = one(c, "SELECT LAST_INSERT_ID()")[0]
                    assert one(c, "SELECT v FROM idl WHERE id = %s", (iid,)) in (None, (f"m{i}-{j}",))
                    assert one(c, "SELECT %s", (i * 100 + j,))[0] == i * 100 + j
            finally:
                c.close()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"client {i}: {e!r}")

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    sampler.join(10)
    assert not errors, errors[:5]
    assert all(not t.is_alive() for t in threads)
    assert max(peaks.values()) <= 4, peaks
    assert peaks[cluster.primary.name] >= 1


def test_a_client_gets_too_many_connections_when_none_becomes_free(idle_proxy):
    """Four sessions hold the primary's four connections in open transactions: a fifth client
    waits in line at login and gets the server's 1040 once queue_timeout (2 s) has passed. A
    connection freed 4 s in comes too late for it (with the default 10 s it would have been
    served), and serves the next client instead."""
    held = [connect(idle_proxy, database="app") for _ in range(4)]
    outcome: dict = {}

    def fifth():
        try:
            outcome["conn"] = connect(idle_proxy, database="app")
        except pymysql.err.OperationalError as e:
            outcome["error"] = e.args

    try:
        for i, c in enumerate(held):
            one(c, "BEGIN")
            one(c, "INSERT INTO idl (v) VALUES (%s)", (f"held-{i}",))
        waiter = threading.Thread(target=fifth)
        waiter.start()
        time.sleep(4.0)
        one(held[0], "COMMIT")  # a connection is free from now on
        waiter.join(30)
        assert not waiter.is_alive()
        if "conn" in outcome:
            outcome["conn"].close()
        assert "error" in outcome, "the fifth client was served: queue_timeout was not applied"
        assert outcome["error"][0] == 1040 and "queue_timeout" in outcome["error"][1], outcome
        late = connect(idle_proxy, database="app")
        try:
            assert one(late, "SELECT 1")[0] == 1
        finally:
            late.close()
        for i, c in enumerate(held[1:], 1):  # their transactions were untouched
            assert one(c, "SELECT COUNT(*) FROM idl WHERE v = %s", (f"held-{i}",))[0] == 1
            one(c, "COMMIT")
    finally:
        for c in held:
            c.close()


def test_autocommit_off_sessions_queue_and_keep_autocommit_off(idle_proxy):
    """PyMySQL's default session (autocommit=0, no transaction open yet) holds nothing: twelve of
    them log in one after the other through four connections; a new connection gets autocommit=0
    back, so a ROLLBACK still undoes what the session wrote."""
    conns = []
    try:
        for _ in range(12):
            conns.append(idle_proxy.connect(user=USER, password=USER, database="app"))
        for i, c in enumerate(conns):
            one(c, "INSERT INTO idl (v) VALUES (%s)", (f"ac0-{i}",))
            assert one(c, "SELECT @@autocommit")[0] == 0
            c.rollback()
        check = connect(idle_proxy, database="app")
        try:
            assert one(check, "SELECT COUNT(*) FROM idl WHERE v LIKE 'ac0-%%'")[0] == 0
        finally:
            check.close()
    finally:
        for c in conns:
            c.close()
