"""KILL through rwproxy: ids are rwproxy's session ids (what clients got in the greeting), a
statement is killed on whichever server runs it, from any worker, under the server's own
privilege rules; and a statement whose client went away is killed on the server too.

The victim's statement is an UPDATE waiting for a row lock held by a direct connection, so
it runs until something stops it; after the lock is released the row shows whether the
killed statement ever ran.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import threading
import time

import pymysql
import pytest

from helpers import SHA2_PASSWORD, SHA2_USER, ensure_backend_user, start_proxy
from proxy.testing.rawclient import RawClient

TABLE = "kill_rows"
UPDATE = f"UPDATE {TABLE} SET v = v + 1 WHERE id = 1"


def _worker(conn) -> int:
    return (conn.thread_id() >> 24) - 1


def _session(proxy, worker: int | None = None, spare: list | None = None, **kw):
    """A proxy connection (on the given worker when asked); connections made on the way are kept
    open in `spare` so the kernel's spreading does not hand back the same worker every time."""
    for _ in range(60):
        conn = proxy.connect(**kw)
        if worker is None or _worker(conn) == worker:
            return conn
        (spare if spare is not None else []).append(conn)
    raise AssertionError(f"no connection landed on worker {worker} in 60 tries")


@pytest.fixture
def row(cluster, direct):
    with direct.cursor() as cur:
        cur.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id INT PRIMARY KEY, v INT NOT NULL)")
        cur.execute(f"REPLACE INTO {TABLE} VALUES (1, 0)")
    direct.commit()
    yield
    with direct.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {TABLE}")
    direct.commit()


@pytest.fixture
def locker(cluster, row):
    """A direct connection to the primary holding the row lock (released by commit/rollback)."""
    conn = pymysql.connect(host="127.0.0.1", port=cluster.primary.port, user="app", password="app", database="app")
    with conn.cursor() as cur:
        cur.execute("BEGIN")
        cur.execute(f"SELECT v FROM {TABLE} WHERE id = 1 FOR UPDATE")
    yield conn
    conn.close()


def _waiting(direct) -> list[int]:
    """Backend thread ids on the primary running the victim's UPDATE."""
    with direct.cursor() as cur:
        cur.execute("SELECT ID FROM information_schema.PROCESSLIST WHERE INFO = %s", (UPDATE,))
        return [r[0] for r in cur.fetchall()]


def _wait(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def _start_victim(conn) -> dict:
    """Run the blocked UPDATE on `conn` in a thread; the dict gets 'error' or 'rows' and 'took'."""
    out: dict = {}

    def run():
        t0 = time.monotonic()
        try:
            with conn.cursor() as cur:
                cur.execute("SET SESSION innodb_lock_wait_timeout = 30")
                out["rows"] = cur.execute(UPDATE)
            conn.commit()
        except pymysql.MySQLError as e:
            out["error"] = e.args[0]
        out["took"] = time.monotonic() - t0

    t = threading.Thread(target=run, daemon=True)
    t.start()
    out["thread"] = t
    return out


def _row_value(direct) -> int:
    direct.commit()
    with direct.cursor() as cur:
        cur.execute(f"SELECT v FROM {TABLE} WHERE id = 1")
        return cur.fetchone()[0]


@pytest.mark.parametrize("where", ["same worker", "other worker"])
def test_kill_query_interrupts_the_statement_on_the_server(proxy, direct, locker, where):
    spare: list = []
    try:
        victim = _session(proxy, 0, spare)
        killer = _session(proxy, 0 if where == "same worker" else 1, spare)
        out = _start_victim(victim)
        assert _wait(lambda: _waiting(direct)), "the victim's UPDATE never reached the primary"
        with killer.cursor() as cur:
            cur.execute(f"KILL QUERY {victim.thread_id()}")
        out["thread"].join(15)
        assert out.get("error") == 1317, out  # Query execution was interrupted
        assert _wait(lambda: not _waiting(direct), 5), "the UPDATE still runs on the primary"
        locker.commit()
        assert _row_value(direct) == 0, "the killed UPDATE ran after all"
        with victim.cursor() as cur:  # KILL QUERY leaves the session usable
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
    finally:
        for c in spare:
            c.close()


def _kill_via(how: str, raw: RawClient, target: int) -> bytes:
    """KILL QUERY `target` from `raw` as the client libraries send it; the answer's payload."""
    if how == "text, quoted id":  # Connector/Python's client-side parameter for a str value
        return raw.command(b"\x03" + f"KILL QUERY '{target}'".encode())
    if how == "prepared, literal id":
        sid, _, _ = raw.prepare(f"KILL QUERY {target}")
        return raw.command(b"\x17" + struct.pack("<IBI", sid, 0, 1))
    sid, _, nparams = raw.prepare("KILL QUERY ?")  # DBD::MariaDB's server-side prepares, Connector/J's
    assert nparams == 1
    if how == "prepared, integer parameter":
        param = b"\x08\x00" + struct.pack("<Q", target)
    else:
        text = str(target).encode()
        param = b"\xfd\x00" + bytes((len(text),)) + text
    return raw.command(b"\x17" + struct.pack("<IBI", sid, 0, 1) + b"\x00\x01" + param)


@pytest.mark.parametrize("how", ["text, quoted id", "prepared, literal id", "prepared, integer parameter",
                                 "prepared, string parameter"])
def test_kill_query_as_a_prepared_statement_or_with_a_quoted_id(proxy, direct, locker, how):
    """The id is rwproxy's whichever way the statement comes: it used to reach the primary as
    it was and get ERROR 1094 Unknown thread id (DBD::MariaDB's suite with server-side prepares)."""
    victim = proxy.connect()
    raw = RawClient("127.0.0.1", proxy.port)
    try:
        out = _start_victim(victim)
        assert _wait(lambda: _waiting(direct)), "the victim's UPDATE never reached the primary"
        answer = _kill_via(how, raw, victim.thread_id())
        assert answer[:1] == b"\x00", answer  # OK
        out["thread"].join(15)
        assert out.get("error") == 1317, out  # Query execution was interrupted
        locker.commit()
        assert _row_value(direct) == 0, "the killed UPDATE ran after all"
        if how.startswith("prepared, ") and how.endswith("parameter"):  # its execute cut short: the server's 1210
            sid, _, _ = raw.prepare("KILL ?")
            err = raw.command(b"\x17" + struct.pack("<IBI", sid, 0, 1) + b"\x00\x01\x08\x00\x01")
            assert err[:3] == b"\xff\xba\x04", err  # 1210 Incorrect arguments to mysqld_stmt_execute
            assert raw.command(b"\x0e")[:1] == b"\x00"  # and the session answers on
    finally:
        raw.close()
        victim.close()


def test_kill_connection_ends_the_session_from_another_worker(proxy, direct, locker):
    spare: list = []
    try:
        victim = _session(proxy, 1, spare)
        killer = _session(proxy, 0, spare)
        out = _start_victim(victim)
        assert _wait(lambda: _waiting(direct))
        killer.kill(victim.thread_id())  # PyMySQL's kill() is COM_PROCESS_KILL
        out["thread"].join(15)
        assert out.get("error") in (1317, 1927, 2013), out  # interrupted, or the connection went
        assert _wait(lambda: not _waiting(direct), 5)
        with pytest.raises((pymysql.err.OperationalError, pymysql.err.InterfaceError)):
            with victim.cursor() as cur:
                cur.execute("SELECT 1")
        locker.commit()
        assert _row_value(direct) == 0
        idle = _session(proxy)
        spare.append(idle)
        with killer.cursor() as cur:  # an idle session goes too; the killer's own is untouched
            cur.execute(f"KILL CONNECTION {idle.thread_id()}")
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
        with pytest.raises((pymysql.err.OperationalError, pymysql.err.InterfaceError)):
            with idle.cursor() as cur:
                cur.execute("SELECT 1")
    finally:
        for c in spare:
            c.close()


def test_kill_with_the_id_from_connection_id(proxy, direct, locker):
    """Applications that kill with SELECT CONNECTION_ID()'s value (a backend thread id) still can,
    from any worker: the id is looked up among rwproxy's own sessions' backend threads."""
    spare: list = []
    try:
        victim = _session(proxy, 1, spare)
        killer = _session(proxy, 0, spare)
        with victim.cursor() as cur:
            cur.execute("SELECT CONNECTION_ID()")
            backend_id = cur.fetchone()[0]
        assert backend_id != victim.thread_id()
        out = _start_victim(victim)
        assert _wait(lambda: _waiting(direct) == [backend_id])
        with killer.cursor() as cur:
            cur.execute(f"KILL QUERY {backend_id}")
        out["thread"].join(15)
        assert out.get("error") == 1317, out
        assert _wait(lambda: not _waiting(direct), 5)
        locker.commit()
        assert _row_value(direct) == 0
    finally:
        for c in spare:
            c.close()


def test_kill_with_a_server_thread_id_is_not_forwarded(proxy, cluster, direct):
    """A number that is no rwproxy session never reaches a server, where it would name someone else."""
    bystander = pymysql.connect(host="127.0.0.1", port=cluster.primary.port, user="app", password="app", database="app")
    try:
        with proxy.connect() as conn, conn.cursor() as cur:
            for sql in (f"KILL {bystander.thread_id()}", f"KILL QUERY {bystander.thread_id()}", "KILL 4294967295"):
                with pytest.raises(pymysql.err.MySQLError) as e:
                    cur.execute(sql)
                assert e.value.args[0] == 1094 and "Unknown thread id" in e.value.args[1]
            with pytest.raises(pymysql.err.MySQLError) as e:
                conn.kill(bystander.thread_id())
            assert e.value.args[0] == 1094
        with bystander.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
    finally:
        bystander.close()


def test_killing_another_users_session_needs_the_servers_privilege(proxy, direct, locker):
    spare: list = []
    try:
        victim = _session(proxy, 0, spare)
        other = _session(proxy, 1, spare, user=SHA2_USER, password=SHA2_PASSWORD)
        out = _start_victim(victim)
        assert _wait(lambda: _waiting(direct))
        for sql in (f"KILL QUERY {victim.thread_id()}", f"KILL {victim.thread_id()}"):
            with other.cursor() as cur, pytest.raises(pymysql.err.MySQLError) as e:
                cur.execute(sql)
            assert e.value.args[0] == 1095
            assert e.value.args[1] == f"You are not owner of thread {victim.thread_id()}"
        assert _waiting(direct), "the UPDATE was stopped by a user without the privilege"
        locker.commit()
        out["thread"].join(15)
        assert out.get("rows") == 1, out
        assert _row_value(direct) == 1
    finally:
        for c in spare:
            c.close()


def test_kill_of_another_users_idle_session_is_judged_by_a_server(cluster, tmp_path):
    """An idle session (its connections held, or given back after idle_release) runs nothing a
    server could refuse to kill: KILL QUERY of it by a user without the privilege answered OK
    where a server answers 1095, and KILL of one holding no connection answered 1095 even to a
    user with CONNECTION ADMIN, where a server ends it. rwproxy now asks a server (a KILL QUERY
    of an idle thread, which stops nothing) before it answers."""
    ensure_backend_user(cluster, SHA2_USER, SHA2_PASSWORD)
    ensure_backend_user(cluster, "killer", "killer-pw")
    with cluster.primary.connect() as c, c.cursor() as cur:
        cur.execute("GRANT CONNECTION ADMIN ON *.* TO 'killer'@'%'")
    cluster.wait_replicas_caught_up(30)
    p = start_proxy(cluster, tmp_path, pool={"idle_release": 200}, users=[
        {"name": "app", "password": "app"},
        {"name": SHA2_USER, "password": SHA2_PASSWORD, "auth_plugin": "caching_sha2_password"},
        {"name": "killer", "password": "killer-pw"}])
    conns = []
    try:
        def connect(user, password):
            conns.append(pymysql.connect(host="127.0.0.1", port=p.port, user=user, password=password,
                                         database="app", autocommit=True))
            return conns[-1]

        victim = connect("app", "app")
        other, killer = connect(SHA2_USER, SHA2_PASSWORD), connect("killer", "killer-pw")
        vid = victim.thread_id()
        for idle in (0.0, 1.0):  # connections held; given back to the pool (idle_release 0.2 s)
            with victim.cursor() as cur:
                cur.execute("SELECT 1")
            time.sleep(idle)
            for sql in (f"KILL QUERY {vid}", f"KILL {vid}"):
                with other.cursor() as cur, pytest.raises(pymysql.err.MySQLError) as e:
                    cur.execute(sql)
                assert e.value.args == (1095, f"You are not owner of thread {vid}"), (idle, sql)
            with killer.cursor() as cur:
                cur.execute(f"KILL QUERY {vid}")  # (an idle session: nothing to stop)
            with victim.cursor() as cur:
                cur.execute("SELECT 2")
                assert cur.fetchall() == ((2,),)
        time.sleep(1.0)
        with killer.cursor() as cur:
            cur.execute(f"KILL {vid}")
        with pytest.raises(pymysql.err.OperationalError):
            victim.ping(reconnect=False)
    finally:
        for c in conns:
            c.close()
        p.process.stop()


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT], ids=["client killed", "Ctrl-C"])
def test_mariadb_cli_killed_or_interrupted_stops_its_statement(proxy, direct, locker, signum):
    """SIGKILL: the client vanishes mid-statement, and rwproxy kills what it left running.
    SIGINT (Ctrl-C): the CLI itself sends KILL QUERY <its connection id> on a second connection."""
    cli = subprocess.Popen(["mariadb", "--no-defaults", "-h127.0.0.1", f"-P{proxy.port}", "-uapp", "-papp", "app",
                            "-e", f"SET SESSION innodb_lock_wait_timeout = 30; {UPDATE}"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait(lambda: _waiting(direct)), "the client's UPDATE never reached the primary"
        os.kill(cli.pid, signum)
        out, err = cli.communicate(timeout=15)
        if signum == signal.SIGINT:
            assert "1317" in err and "interrupted" in err, (out, err)
        assert _wait(lambda: not _waiting(direct), 5), "the UPDATE runs on with nobody waiting for it"
        locker.commit()
        assert _row_value(direct) == 0, "the statement ran after all"
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(10)


def test_a_killed_session_sees_its_connection_close_without_an_answer(proxy, cluster):
    """A server ends a connection killed mid-statement without an error packet: the client reports
    a lost connection (2013), never the 1317 its stopped statement got on the server. rwproxy kills
    the backend statement first and closed the client after, and that 1317 reached the client in
    about one kill in three (MariaDB Connector/Node.js's suite, "server close connection during
    query", checks for the plain close). Several kills in a row, directly and through rwproxy."""
    sql = "SELECT SLEEP(10) AS killed_session_probe"
    nodes = [cluster.primary, *cluster.replicas]

    def running() -> bool:
        for n in nodes:
            with n.connect() as c, c.cursor() as cur:
                cur.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO = %s", (sql,))
                if cur.fetchone()[0]:
                    return True
        return False

    got = {}
    for name, port in (("direct", cluster.primary.port), ("rwproxy", proxy.port)):
        outcomes = []
        for _ in range(6):
            kw = dict(host="127.0.0.1", port=port, user="app", password="app", database="app", read_timeout=20)
            victim, killer = pymysql.connect(**kw), pymysql.connect(**kw)
            out: dict = {}

            def run():
                try:
                    with victim.cursor() as cur:
                        cur.execute(sql)
                        out["rows"] = cur.fetchall()
                except pymysql.MySQLError as e:
                    out["error"] = e.args[0]

            t = threading.Thread(target=run, daemon=True)
            t.start()
            assert _wait(running), "the victim's statement never started"
            with killer.cursor() as cur:
                cur.execute(f"KILL {victim.thread_id()}")
            t.join(15)
            outcomes.append(out.get("error", out.get("rows")))
            killer.close()
            victim.close()
            assert _wait(lambda: not running(), 5)
        got[name] = outcomes
    assert got["direct"] == [2013] * 6, got
    assert got["rwproxy"] == got["direct"], got


def _multi_results(conn, sql):
    """Every result set of a multi-statement, or the error that ended it (code, message)."""
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            out = [cur.fetchall()]
            while cur.nextset():
                out.append(cur.fetchall())
            return out
    except pymysql.MySQLError as e:
        return e.args[:2]


def test_kill_inside_a_multi_statement_answers_as_on_the_server(proxy, cluster):
    """KILL among other statements of a multi-statement (node-mysql2's tests send
    `KILL ?; SELECT SLEEP(0.05)` to end a pooled connection) names rwproxy's session ids: rwproxy
    carries it out and the rest runs with what the KILL answered. Sent as it was, the server said
    "Unknown thread id" for every session id (and a small id named another backend thread)."""
    from pymysql.constants import CLIENT

    got = {}
    for name, port in (("direct", cluster.primary.port), ("rwproxy", proxy.port)):
        kw = dict(host="127.0.0.1", port=port, user="app", password="app", database="app",
                  client_flag=CLIENT.MULTI_STATEMENTS)
        killer, victim = pymysql.connect(**kw), pymysql.connect(**kw)
        try:
            out = [_multi_results(killer, f"KILL {victim.thread_id()}; SELECT 7 AS after_kill")]
            try:
                with victim.cursor() as cur:
                    cur.execute("SELECT 1")
                out.append("victim alive")
            except (pymysql.err.OperationalError, pymysql.err.InterfaceError) as e:
                out.append(e.args[0])
            for sql in ("KILL 999999999; SELECT 8", "SELECT 'a;b' AS `c;d` /* ; */; KILL QUERY 999999998",
                        "KILL QUERY 999999999 ; SELECT 9", f"KILL QUERY {killer.thread_id()}; SELECT 10",
                        "KILL 'x'; SELECT 11"):
                out.append(_multi_results(killer, sql))
            out.append(_multi_results(killer, f"KILL CONNECTION {killer.thread_id()}; SELECT 12"))
            out.append(_multi_results(killer, "SELECT 13"))
        finally:
            killer.close()
            victim.close()
        got[name] = out
    assert got["direct"][:2] == [[[], ((7,),)], 2013], got
    assert got["rwproxy"] == got["direct"], got
