"""Pipelined multiplexing against the real cluster: many stateless sessions' reads share a few
server connections, and nothing a client can see changes (values, prepared statements with each
session's own parameters, FOUND_ROWS()/SHOW WARNINGS after a shared read, a killed shared
connection, session state that keeps a session on its own connection).

A probe statement reports the server thread that runs it: it finds itself in the process list by a
marker in its own text, so the test sees which connection answered without asking a
connection-bound function (those never share)."""

from __future__ import annotations

import contextlib
import json
import struct
import subprocess
import sys
import threading
import time

import mysql.connector
import pymysql
import pytest

from proxy.protocol.scan import RESULT
from proxy.testing.clusters import user_connections
from proxy.testing.rawclient import RawClient

from helpers import ensure_backend_user, start_proxy

USER = "mux"
SESSIONS = 12


def probe_sql(tag: str, first: str = "") -> str:
    """Which server connection runs it (its id and server port), after `first` (more columns)."""
    return f"SELECT {first}ID, @@port FROM information_schema.PROCESSLIST WHERE INFO LIKE '%probe-{tag}%' AND USER = '{USER}'"


@pytest.fixture(scope="module")
def mux(cluster, tmp_path_factory):
    """A one-worker proxy (one set of learned digests) with its own user, so that the test can count
    that user's server connections."""
    ensure_backend_user(cluster, USER, USER)
    with cluster.primary.connect(database="app") as c, c.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS mx (id INT PRIMARY KEY, v VARCHAR(20))")
        cur.execute("REPLACE INTO mx VALUES (1,'one'),(2,'two'),(3,'three'),(4,'four'),(5,'five')")
    cluster.wait_replicas_caught_up(30)
    users = [{"name": USER, "password": USER}, {"name": "app", "password": "app"}]
    p = start_proxy(cluster, tmp_path_factory.mktemp("mux"), proxy={"workers": 1}, users=users)
    try:
        yield p
    finally:
        p.process.stop()


@contextlib.contextmanager
def sessions(proxy, n=SESSIONS):
    """n client sessions of USER, closed when the block ends."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(proxy.connect(user=USER, password=USER, autocommit=True)) for _ in range(n)]


def one(c, sql, args=None):
    with c.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchone()


def server_connections(cluster) -> dict[int, int]:
    """Connections of USER on each server (port -> count)."""
    by_name = user_connections(cluster, USER)
    return {n.port: by_name[n.name] for n in cluster.nodes}


def status(proxy) -> dict:
    r = subprocess.run([sys.executable, "-m", "proxy", "status", "--json", "--config", proxy.process.config_path],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def wait_for_replicas(proxy, c, timeout=15.0):
    reps = {n.port for n in proxy.cluster.replicas}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if one(c, "SELECT @@port")[0] in reps:
            return
        time.sleep(0.1)
    raise AssertionError("replicas never joined the read pool")


def test_reads_of_many_sessions_share_a_few_server_connections(mux):
    with sessions(mux) as conns:
        wait_for_replicas(mux, conns[0])
        for c in conns:  # the proxy learns that the probe answers small and fast; shared lines open
            one(c, probe_sql("share"))
        threads = set()
        for _ in range(4):
            for c in conns:
                tid, port = one(c, probe_sql("share"))
                threads.add((port, tid))
                assert one(c, "SELECT v FROM mx WHERE id = %s", (3,)) == ("three",)
        reps = {n.port for n in mux.cluster.replicas}
        assert {p for p, _ in threads} <= reps  # still read/write split
        # 48 reads from 12 sessions ran on the replicas' shared connections (one at a time here:
        # a second one opens only when commands queue up)
        assert len(threads) <= 2 * len(reps), threads
        # the operator sees it: `rwproxy status` counts shared statements and connections
        deadline = time.monotonic() + 5
        while True:  # workers publish their counters twice a second
            st = status(mux)
            shared = {s["name"]: s["shared_connections"] for s in st["servers"]}
            if st["shared_statements"] >= 48 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert st["shared_statements"] >= 48, st
        primary = mux.cluster.primary.name
        assert shared[primary] == 0 and 1 <= sum(shared.values()) <= 2 * len(reps), shared


def test_without_multiplexing_each_session_has_its_own_connection(cluster, tmp_path_factory):
    """The contrast that shows the test above can fail: `multiplex = false`."""
    ensure_backend_user(cluster, USER, USER)
    p = start_proxy(cluster, tmp_path_factory.mktemp("nomux"), proxy={"workers": 1},
                    users=[{"name": USER, "password": USER}], pool={"multiplex": False})
    try:
        with sessions(p) as conns:
            wait_for_replicas(p, conns[0])
            threads = {one(c, probe_sql("own")) for _ in range(2) for c in conns}
            assert len(threads) == SESSIONS
    finally:
        p.process.stop()


def test_prepared_statements_share_with_each_sessions_own_values(mux):
    conns = [mysql.connector.connect(host=mux.host, port=mux.port, user=USER, password=USER, database="app",
                                     autocommit=True) for _ in range(6)]
    try:
        curs = [c.cursor(prepared=True) for c in conns]
        sql = "SELECT v, ? AS echo, p.ID FROM mx JOIN information_schema.PROCESSLIST p ON p.USER = 'mux' " \
              "AND p.INFO LIKE '%probe-ps%' WHERE mx.id = ?"
        threads = set()
        for round_ in range(6):
            for i, cur in enumerate(curs):
                # each session its own parameter types too: an int, a string, a float
                echo = (i * 10 + round_, f"s{i}-{round_}", i + round_ / 4)[i % 3]
                key = (i + round_) % 5 + 1
                cur.execute(sql, (echo, key))
                v, got, tid = cur.fetchone()
                assert v == ("one", "two", "three", "four", "five")[key - 1]
                assert (got.decode() if isinstance(got, (bytes, bytearray)) else got) == echo, (got, echo)
                if round_ > 0:  # after the first round has taught the proxy the statement
                    threads.add(tid)
        assert len(threads) <= 2 * 2, threads  # shared connections only
    finally:
        for c in conns:
            c.close()


def test_found_rows_and_warnings_after_a_shared_read(mux):
    with sessions(mux, 2) as (a, b):
        wait_for_replicas(mux, a)
        for _ in range(3):  # learned: small, fast, no warnings -> shared from now on
            assert one(b, "SELECT CAST(%s AS UNSIGNED)", ("5",)) == (5,)
        assert one(a, "SELECT CAST(%s AS UNSIGNED)", ("x5",)) == (0,)
        with a.cursor() as cur:
            cur.execute("SHOW WARNINGS")
            warnings = cur.fetchall()
        assert len(warnings) == 1 and "Truncated incorrect" in warnings[0][2], warnings
        for _ in range(3):
            assert one(b, "SELECT v FROM mx WHERE id > %s", (0,))
        with a.cursor() as cur:
            cur.execute("SELECT v FROM mx WHERE id > %s", (2,))
            assert len(cur.fetchall()) == 3
        assert one(a, "SELECT FOUND_ROWS()") == (3,)


def test_session_state_keeps_a_session_off_the_others_connections(mux):
    """Sessions share only with sessions of the same SET/USE history (drivers' SET NAMES included):
    a session that set its own value runs on a connection carrying that value. Each probe reads the
    value and the id of the connection that answers in one statement, so it says which connection
    carried what. (A connection may still serve two sessions in turn: one gives it back to the
    pool after idle_release, the pool resets it, the other replays its own SET on it.)"""
    probe = probe_sql("value", first="@@group_concat_max_len, ")
    with sessions(mux, 4) as conns:
        wait_for_replicas(mux, conns[0])
        for c in conns:
            one(c, probe)  # its digest learned
        for i, c in enumerate(conns):
            one(c, f"SET SESSION group_concat_max_len = {1000 + i}")
        time.sleep(0.6)  # (workers publish their counters twice a second)
        shared0 = status(mux)["shared_statements"]
        answered = {}
        for _ in range(3):
            for i, c in enumerate(conns):
                value, thread, port = one(c, probe)
                assert value == 1000 + i, (i, value, thread, port)
                answered.setdefault((thread, port), set()).add(i)
        deadline = time.monotonic() + 5
        while status(mux)["shared_statements"] == shared0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status(mux)["shared_statements"] > shared0, "no probe ran on a shared connection"
        assert len(answered) >= 4, answered  # four values: at least four connections


def test_a_killed_shared_connection_costs_no_client_an_error(mux):
    with sessions(mux, 6) as conns:
        wait_for_replicas(mux, conns[0])
        for c in conns:
            one(c, probe_sql("kill"))
        shared = {}
        for _ in range(2):
            for c in conns:
                tid, port = one(c, probe_sql("kill"))
                shared.setdefault(port, set()).add(tid)
        for node in mux.cluster.replicas:
            with node.connect() as admin, admin.cursor() as cur:
                for tid in shared.get(node.port, ()):
                    try:
                        cur.execute(f"KILL {tid}")
                    except pymysql.err.OperationalError:
                        pass  # a session's own connection already gone
        answered = 0
        for _ in range(5):
            for i, c in enumerate(conns):
                assert one(c, "SELECT v FROM mx WHERE id = %s", (i % 5 + 1,)) == (("one", "two", "three", "four", "five")[i % 5],)
                answered += 1
        assert answered == 30


def test_a_slow_statement_keeps_its_own_connection(mux):
    with sessions(mux, 2) as (a, b):
        # both on the primary (a hint), so that a shared connection would be the same one
        slow = "/* rwproxy:primary */ " + probe_sql("slow").replace("SELECT ID", "SELECT ID + SLEEP(0.05)")
        fast = "/* rwproxy:primary */ " + probe_sql("fast")
        seen = {}
        for _ in range(3):
            for name, c in (("a", a), ("b", b)):
                seen.setdefault(name, set()).add(one(c, slow))
                seen.setdefault(name + "-fast", set()).add(one(c, fast))
        assert seen["a-fast"] & seen["b-fast"], seen  # fast ones share
        # each session ran the slow one on its own connection: the two never met on a shared one
        assert not seen["a"] & seen["b"], seen


def test_reads_queue_on_one_connection_until_work_piles_up(mux):
    """Fast reads fill one shared connection (bigger batches per send and per server wakeup);
    reads whose queued service time passes shared.SPILL_AFTER (1 ms) spill onto a second one,
    so that slower reads from concurrent sessions run side by side, not one behind the other."""
    with sessions(mux, 4) as conns:
        # on the primary (a hint): one server, so the connections seen are the shared ones there
        slower = "/* rwproxy:primary */ " + probe_sql("spill").replace("SELECT ID", "SELECT ID + SLEEP(0.004)")
        for c in conns:
            one(c, slower)  # learned: answers small in ~4 ms (shareable: under multiplex_max_time)
        seen: set = set()
        errors: list = []
        barrier = threading.Barrier(len(conns), timeout=10)

        def run(c):
            try:
                for _ in range(6):
                    barrier.wait()
                    with c.cursor() as cur:
                        cur.execute(slower)
                        # every connection running the probe right now is a row (in no set order):
                        # taking the first row only saw one connection whenever theirs came first
                        seen.update(row[0] for row in cur.fetchall())
            except Exception as e:  # noqa: BLE001 - reported by the assert below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(c,)) for c in conns]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        # 24 reads, 4 at a time: more than one connection ran them, and no more than the
        # pool's shared_connections (2) plus a session's own one for a read that raced the open
        assert 2 <= len(seen) <= 2 + len(conns), seen
        fast = "/* rwproxy:primary */ " + probe_sql("fill")
        for c in conns:
            one(c, fast)
        quick = {one(c, fast)[0] for _ in range(3) for c in conns}
        assert len(quick) == 1, quick  # one after another: all on the first shared connection


def test_kill_query_of_a_statement_queued_on_a_shared_connection(mux, cluster, tmp_path_factory):
    """KILL QUERY for a session whose read waits in a shared connection's queue: that session gets
    ERROR 1317 (interrupted), the read ahead of it is unharmed, and both sessions go on working."""
    ensure_backend_user(cluster, USER, USER)
    # one shared connection, and statements up to 2 s may share: a slow read holds the queue
    p = start_proxy(cluster, tmp_path_factory.mktemp("muxkill"), proxy={"workers": 1},
                    users=[{"name": USER, "password": USER}, {"name": "app", "password": "app"}],
                    pool={"shared_connections": 1, "multiplex_max_time": 2.0})
    stranger = pymysql.connect(host="127.0.0.1", port=p.port, user="app", password="app", database="app")
    try:
        with sessions(p, 3) as (a, b, killer):
            slow = "/* rwproxy:primary */ SELECT SLEEP(%s) AS s"
            fast = "/* rwproxy:primary */ SELECT v FROM app.mx WHERE id = %s"
            for _ in range(3):  # both digests learned (small, fast enough to share), the shared line open
                one(a, slow, (0.01,))
                assert one(b, fast, (2,)) == ("two",)
            got: dict = {}

            def run_slow():
                got["a"] = one(a, slow, (0.8,))

            def run_fast():
                try:
                    got["b"] = one(b, fast, (1,))
                except pymysql.err.OperationalError as e:
                    got["b"] = e.args[0]

            ta = threading.Thread(target=run_slow)
            ta.start()
            time.sleep(0.2)
            tb = threading.Thread(target=run_fast)
            tb.start()
            time.sleep(0.2)  # b's read now waits behind a's on the one shared connection
            assert "b" not in got
            # another user without CONNECTION ADMIN: refused as a server refuses it (no server saw
            # this cancel, so rwproxy asks one first), and b's read goes on waiting
            with stranger.cursor() as cur, pytest.raises(pymysql.err.OperationalError) as e:
                cur.execute(f"KILL QUERY {b.thread_id()}")
            assert e.value.args == (1095, f"You are not owner of thread {b.thread_id()}")
            assert "b" not in got
            with killer.cursor() as cur:
                cur.execute(f"KILL QUERY {b.thread_id()}")
            ta.join(10)
            tb.join(10)
            assert got["b"] == 1317, got
            assert got["a"] == (0,), got
            assert one(b, fast, (3,)) == ("three",)
            assert one(a, fast, (4,)) == ("four",)
    finally:
        stranger.close()
        p.process.stop()


def _execute(sid: int, value: bytes, type_code: int | None) -> bytes:
    """COM_STMT_EXECUTE of a one-parameter statement; type_code None sends no types (flag 0), as
    libmariadb and Connector/J do after the first execute of a binding."""
    head = b"\x17" + struct.pack("<IBI", sid, 0, 1) + b"\x00"  # no cursor, iteration 1, NULL bitmap
    if type_code is None:
        return head + b"\x00" + value
    return head + b"\x01" + bytes((type_code, 0)) + value


def _text_row(c: RawClient) -> list[str]:
    """The first row of a binary result whose columns are all strings (CHAR), as text."""
    payloads = c.response(RESULT)
    assert payloads[0][0] != 0xFF, payloads[0]
    ncols = payloads[0][0]
    row = payloads[1 + ncols]  # after the column count and the definitions (no EOF: deprecate_eof)
    pos, out = 1 + (ncols + 9) // 8, []  # 0x00 header, NULL bitmap with 2 offset bits
    for _ in range(ncols):
        n = row[pos]
        out.append(row[pos + 1: pos + 1 + n].decode())
        pos += 1 + n
    return out


def test_an_execute_without_types_runs_with_its_own_sessions_types_when_shared(mux):
    """Clients send parameter types only with the first execute of a binding. On a shared connection
    another session's execute of the same statement may have sent other types since: the proxy must
    put this session's types back, or the server reads an integer's 8 bytes as a string."""
    sql = ("/* rwproxy:primary */ SELECT CONCAT('', ?) AS echo, CAST(p.ID AS CHAR) AS thread "
           "FROM PROCESSLIST p WHERE p.USER = 'mux' AND p.INFO LIKE '%probe-types%'")
    # RawClient asks for every capability the proxy offers, CLIENT_NO_SCHEMA among them (no db.table
    # names), so the statement names PROCESSLIST from the login database
    a, b = (RawClient(mux.host, mux.port, user=USER, password=USER, db="information_schema") for _ in range(2))
    try:
        sa, _, _ = a.prepare(sql)
        sb, _, _ = b.prepare(sql)
        longlong, var_string = 0x08, 0xFD
        threads = []
        for i in range(4):  # the first executes teach the proxy the statement is small and fast
            a.send(_execute(sa, struct.pack("<q", 100 + i), longlong))
            echo, ta = _text_row(a)
            assert echo == str(100 + i)
            text = f"text-{i}".encode()
            b.send(_execute(sb, bytes((len(text),)) + text, var_string))  # the last types sent: a string
            echo, tb = _text_row(b)
            assert echo == text.decode()
            a.send(_execute(sa, struct.pack("<q", 200 + i), None))  # no types: a's BIGINT binding
            echo, ta2 = _text_row(a)
            assert echo == str(200 + i), echo
            threads.append((ta, tb, ta2))
        last = threads[-1]
        assert last[0] == last[1] == last[2], threads  # all three on one shared server connection
    finally:
        a.close()
        b.close()


@pytest.fixture(scope="module")
def wsx(mux):
    """A table whose trigger records the server thread that ran each insert (a write cannot
    report its own connection: CONNECTION_ID() would keep it off shared connections)."""
    with mux.cluster.primary.connect(database="app") as c, c.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS wsx")
        cur.execute("CREATE TABLE wsx (id INT AUTO_INCREMENT PRIMARY KEY, sess INT, round INT, tid BIGINT)")
        cur.execute("CREATE TRIGGER wsx_tid BEFORE INSERT ON wsx FOR EACH ROW SET NEW.tid = CONNECTION_ID()")
    mux.cluster.wait_replicas_caught_up(30)
    return "wsx"


def session_rows(proxy) -> dict[int, dict]:
    """The proxy's sessions table (`rwproxy status --json --tables sessions`), by session id."""
    r = subprocess.run([sys.executable, "-m", "proxy", "status", "--json", "--tables", "sessions", "--config",
                        proxy.process.config_path], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    return {row["id"]: row for row in json.loads(r.stdout)["tables"]["sessions"]}


def wait_released(proxy, conns, timeout=10.0) -> None:
    """Until the sessions of `conns` hold no server connection of their own (idle_release)."""
    ids = {c.thread_id() for c in conns}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = session_rows(proxy)
        if all(rows[i]["servers"] == "" for i in ids):
            return
        time.sleep(0.2)
    raise AssertionError("sessions kept their connections past idle_release")


def teach_write(proxy, sql, args) -> None:
    """A session runs write `sql` twice, the second time after an unrelated statement: its digest
    is known small and fast and nothing asked about it afterwards, so it may share."""
    with sessions(proxy, 1) as (t,):
        for _ in range(2):
            with t.cursor() as cur:
                cur.execute(sql, args)
                cur.execute("SELECT 1")


def primary_rows(cluster, sql):
    with cluster.primary.connect(database="app") as c, c.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()


def test_autocommit_writes_of_many_sessions_share_a_few_server_connections(mux, wsx):
    """Stateless autocommit writes of sessions holding no connection share connections as reads
    do: 12 idle sessions' inserts ran on a few server threads, each session still gets its own
    insert ids from LAST_INSERT_ID() (after a read on a replica in between, too), and no write was
    lost or doubled."""
    teach_write(mux, "INSERT INTO wsx (sess, round) VALUES (%s, %s)", (1000, 1000))
    before = status(mux)["shared_statements"]
    last = {}
    with sessions(mux) as conns:
        wait_for_replicas(mux, conns[0])
        wait_released(mux, conns)  # as in an application whose clients are mostly idle
        for rnd in range(4):
            for i, c in enumerate(conns):
                with c.cursor() as cur:
                    cur.execute("INSERT INTO wsx (sess, round) VALUES (%s, %s)", (i, rnd))
                    assert cur.rowcount == 1 and cur.lastrowid > 0
                    last[i] = cur.lastrowid
        time.sleep(1.2)  # past read_your_writes_window: the next read goes to a replica
        for i, c in enumerate(conns):
            assert one(c, "SELECT v FROM mx WHERE id = %s", (3,)) == ("three",)
            assert one(c, "SELECT LAST_INSERT_ID()") == (last[i],)
    rows = primary_rows(mux.cluster, "SELECT sess, round, id, tid FROM wsx WHERE sess < 1000 AND round < 100")
    assert sorted((s, r) for s, r, _, _ in rows) == sorted((i, r) for i in range(SESSIONS) for r in range(4))
    assert {s: max(i for s2, _, i, _ in rows if s2 == s) for s, _, _, _ in rows} == last
    # 48 inserts from 12 sessions on at most 3 server threads: the shared connections (the first
    # write that wanted one, while it opened, took a connection of its own, and kept it)
    threads = {t for _, _, _, t in rows}
    assert 1 <= len(threads) <= 3, threads
    deadline = time.monotonic() + 5
    while status(mux)["shared_statements"] - before < 36 and time.monotonic() < deadline:
        time.sleep(0.2)  # (workers publish their counters twice a second)
    assert status(mux)["shared_statements"] - before >= 36


def test_a_write_asked_about_keeps_its_own_connection(mux, wsx):
    """ROW_COUNT() and SHOW WARNINGS ask the connection that ran the previous statement, and a
    write cannot run twice: a write digest followed by such a question keeps to the session's
    own connection, so the answers are the server's own."""
    with sessions(mux, 4) as conns:
        for _ in range(4):
            for i, c in enumerate(conns):
                with c.cursor() as cur:
                    n = cur.execute("UPDATE mx SET v = v WHERE id <= %s", (i + 1,))
                    cur.execute("SELECT ROW_COUNT()")
                    assert cur.fetchone() == (n,)
                    # INSERT IGNORE of an existing key: a warning, which SHOW WARNINGS must find
                    cur.execute("INSERT IGNORE INTO mx VALUES (%s, 'dup')", (i % 5 + 1,))
                    assert cur.rowcount == 0
                    cur.execute("SHOW WARNINGS")
                    warnings = cur.fetchall()
                    assert len(warnings) == 1 and warnings[0][1] == 1062, warnings
                    cur.execute("INSERT INTO wsx (round, sess) VALUES (100, %s)", (i,))
                    cur.execute("SELECT @@warning_count, ROW_COUNT()")
                    assert cur.fetchone() == (0, 1)
    threads = primary_rows(mux.cluster, "SELECT DISTINCT tid FROM wsx WHERE round = 100")
    assert len(threads) >= 4  # each session's own connection ran its inserts


def test_a_write_confirmed_then_asked_about_stops_sharing(mux, wsx):
    """A write digest that shares (nothing asked about it afterwards) and is then followed by
    ROW_COUNT() stops sharing: from then on it runs on the session's own connection, where
    ROW_COUNT() after it is the server's answer."""
    sql = "INSERT INTO wsx (round, sess, tid) VALUES (%s, %s, 0)"
    teach_write(mux, sql, (300, 1000))
    with sessions(mux, 3) as (a, b, c):
        wait_released(mux, [a, b, c])
        with a.cursor() as cur:
            cur.execute(sql, (300, 1))
        assert session_rows(mux)[a.thread_id()]["servers"] == ""  # it shared: no connection taken
        with b.cursor() as cur:
            cur.execute(sql, (300, 2))
            cur.execute("SELECT ROW_COUNT()")  # asked about on the session's own connection
            cur.fetchall()
        with c.cursor() as cur:
            cur.execute(sql, (300, 3))
            assert session_rows(mux)[c.thread_id()]["servers"] == mux.cluster.primary.name  # its own now
            cur.execute("SELECT ROW_COUNT()")
            assert cur.fetchone() == (1,)


def test_a_shared_write_waiting_for_a_lock_holds_up_nobody_and_can_be_killed(mux, wsx):
    """A write waits for a row lock on a shared connection: nothing queues behind a write, so the
    other sessions' writes and reads keep being answered meanwhile; KILL QUERY stops it (ERROR
    1317, the row unchanged), as it would on the session's own connection."""
    upd = "UPDATE mx SET v = %s WHERE id = %s"
    with sessions(mux, 6) as conns:
        wait_for_replicas(mux, conns[0])
        for _ in range(3):  # learned and confirmed: small, fast, nothing asked about it afterwards
            for i, c in enumerate(conns[:4]):
                with c.cursor() as cur:
                    cur.execute(upd, (("one", "two", "three", "four")[i], i + 1))
        with mux.cluster.primary.connect(database="app") as locker, locker.cursor() as lk:
            lk.execute("BEGIN")
            lk.execute("SELECT v FROM mx WHERE id = 5 FOR UPDATE")
            victim, killer = conns[4], conns[5]
            wait_released(mux, [victim])  # the victim holds no connection: its write shares one
            got: dict = {}

            def blocked():
                try:
                    with victim.cursor() as cur:
                        cur.execute(upd, ("changed", 5))
                        got["v"] = cur.rowcount
                except pymysql.err.OperationalError as e:
                    got["v"] = e.args[0]

            t = threading.Thread(target=blocked)
            t.start()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not primary_rows(
                    mux.cluster, "SELECT ID FROM information_schema.PROCESSLIST WHERE INFO LIKE 'UPDATE mx SET v%5'"):
                time.sleep(0.05)
            me = session_rows(mux)[victim.thread_id()]
            assert me["state"] == "in statement (shared)", me
            # meanwhile everyone else's writes and reads are answered
            for _ in range(3):
                for i, c in enumerate(conns[:4]):
                    with c.cursor() as cur:
                        assert cur.execute(upd, (("one", "two", "three", "four")[i], i + 1)) in (0, 1)
                    assert one(c, "/* rwproxy:primary */ SELECT v FROM mx WHERE id = %s", (i + 1,)) == (
                        ("one", "two", "three", "four")[i],)
            assert t.is_alive() and "v" not in got  # still waiting for the lock
            with killer.cursor() as cur:
                cur.execute(f"KILL QUERY {victim.thread_id()}")
            t.join(15)
            assert got.get("v") == 1317, got
            lk.execute("ROLLBACK")
        assert primary_rows(mux.cluster, "SELECT v FROM mx WHERE id = 5") == (("five",),)
        with victim.cursor() as cur:  # the session goes on
            assert cur.execute(upd, ("five", 5)) == 0


def test_a_write_calling_a_stored_function_never_shares(mux, wsx):
    """A stored function can leave user variables on the connection that runs it: a write calling
    one (F_STORED_CALL) goes on the session's own connection, reset before anyone else gets it,
    never on a shared one where the next session's call would see them. bump() counts its calls
    in @bumps: every session's insert must find a fresh connection (1), not a shared one's count."""
    with mux.cluster.primary.connect(database="app") as c, c.cursor() as cur:
        cur.execute("DROP FUNCTION IF EXISTS bump")
        cur.execute("CREATE FUNCTION bump() RETURNS INT NOT DETERMINISTIC NO SQL "
                    "BEGIN SET @bumps = IFNULL(@bumps, 0) + 1; RETURN @bumps; END")
    sql = "INSERT INTO wsx (round, sess) VALUES (%s, bump())"
    teach_write(mux, sql, (499,))  # would be small, fast and never asked about
    with sessions(mux, 4) as conns:
        for rnd in range(2):
            wait_released(mux, conns)
            for i, c in enumerate(conns):
                with c.cursor() as cur:
                    cur.execute(sql, (400 + 10 * rnd + i,))
                    assert cur.rowcount == 1
    calls = primary_rows(mux.cluster, "SELECT round, sess FROM wsx WHERE round BETWEEN 400 AND 420")
    assert sorted(calls) == [(400 + 10 * r + i, 1) for r in range(2) for i in range(4)], calls


def _prepared_on(node) -> int:
    with node.connect() as c, c.cursor() as cur:
        cur.execute("SHOW GLOBAL STATUS LIKE 'Prepared_stmt_count'")
        return int(cur.fetchone()[1])


def _fill_statement_caches(proxy, cluster, tag: str) -> dict:
    """Statements of sessions on both workers, executed until their reads share: the shared
    connections keep them prepared after the sessions are gone. Each replica's count."""
    for i in range(8):
        clients = [RawClient(proxy.host, proxy.port) for _ in range(3)]
        try:
            for c in clients:
                sid, _, _ = c.prepare(f"SELECT ? + {i} AS v{tag}")
                for _ in range(4):
                    c.send(_execute(sid, struct.pack("<q", 1), 0x08))
                    assert c.response(RESULT)[0][0] != 0xFF
        finally:
            for c in clients:
                c.close()
    kept = {n.name: _prepared_on(n) for n in cluster.replicas}
    assert all(v >= 4 for v in kept.values()), kept  # the clients are gone; rwproxy's cache is not
    return kept


@contextlib.contextmanager
def _statement_limit(cluster, limits: dict):
    """max_prepared_stmt_count on each replica (name -> value) for the block."""
    try:
        for n in cluster.replicas:
            with n.connect() as c, c.cursor() as cur:
                cur.execute(f"SET GLOBAL max_prepared_stmt_count = {int(limits[n.name])}")
        yield
    finally:
        for n in cluster.replicas:
            with n.connect() as c, c.cursor() as cur:
                cur.execute("SET GLOBAL max_prepared_stmt_count = DEFAULT")


def _times_seven(c: RawClient, sid: int, values) -> None:
    for v in values:
        c.send(_execute(sid, struct.pack("<q", v), 0x08))
        rows = c.response(RESULT)
        assert rows[0][0] != 0xFF, rows[0]
        assert struct.unpack_from("<q", rows[-2], 2)[0] == 7 * v


def test_statements_kept_on_shared_connections_give_way_at_the_servers_limit(proxy, cluster):
    """Shared connections keep the statements they prepared (up to max_prepared_per_connection each),
    a cache a client connected to the server directly does not have counted against the server's
    max_prepared_stmt_count; ProxySQL's users meet ERROR 1461 from its statement cache. When a server
    refuses a session's prepare with 1461, every worker closes what its shared connections keep
    there and the prepare is tried again: the client's statement is prepared as it would be directly."""
    tag = f"{time.monotonic_ns() % 10**9}"
    kept = _fill_statement_caches(proxy, cluster, tag)
    with _statement_limit(cluster, {n.name: 2 for n in cluster.replicas}):
        c = RawClient(proxy.host, proxy.port)
        try:
            sid, _, _ = c.prepare(f"SELECT ? * 7 AS fresh{tag}")
            _times_seven(c, sid, (2, 3, 4))  # on both replicas (reads are balanced; each prepares it lazily)
        finally:
            c.close()
        after = {n.name: _prepared_on(n) for n in cluster.replicas}
        assert all(v <= 2 for v in after.values()), (kept, after)  # both workers' caches were closed


def test_a_shared_connection_refused_a_prepare_at_the_servers_limit_the_statement_runs_anyway(proxy, cluster):
    """A statement that starts sharing is prepared on the shared connection, pipelined with its
    execute. Refused there with 1461, its execute did not run: it runs on the session's own
    connection instead (prepared there, or again after the caches were closed), and the client gets
    its result, not the 1461 rwproxy's cache caused."""
    tag = f"{time.monotonic_ns() % 10**9}"
    _fill_statement_caches(proxy, cluster, tag)
    c = RawClient(proxy.host, proxy.port)
    try:
        sid, _, _ = c.prepare(f"SELECT ? * 7 AS shared{tag}")
        _times_seven(c, sid, (1,))  # on the session's own connection: now known small and fast
        with _statement_limit(cluster, {n.name: _prepared_on(n) for n in cluster.replicas}):
            _times_seven(c, sid, (5, 6, 7, 8))  # shares: the shared connection must prepare it
    finally:
        c.close()
