"""Issue 20's defects, against real servers: each test fails on the code before the fix."""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time

import pymysql
import pytest

from helpers import SHA2_PASSWORD, SHA2_USER, self_signed_cert, start_proxy, wait_until
from proxy.protocol import auth
from proxy.protocol.constants import CLIENT_SSL, LOGIN_ONLY_CAPABILITIES, PROXY_CAPABILITIES
from proxy.protocol.handshake import build_response
from proxy.protocol.packets import frame
from proxy.runtime.launcher import free_port
from proxy.testing.rawclient import RawClient


def _kill_backend_of(cluster, session) -> None:
    """KILL, on the primary, the backend connection that carries `session` there (as a DBA would)."""
    with session.cursor() as cur:
        cur.execute("SELECT CONNECTION_ID()")  # connection-bound: answered where the last statement ran
        thread = cur.fetchone()[0]
    cluster.primary.query(f"KILL {int(thread)}")


@pytest.mark.parametrize("setup, then, what", [
    ("CREATE TEMPORARY TABLE lost_tmp (a INT)", "SELECT * FROM lost_tmp", "temporary tables"),
    ("SELECT @lost_v := 42", "SELECT @lost_v", "user variables"),
    ("SELECT GET_LOCK('issue20-lost', 0)", "SELECT RELEASE_LOCK('issue20-lost')", "named locks"),
])
def test_state_lost_with_the_server_connection_is_an_error_then_a_closed_connection(proxy, cluster, setup, then, what):
    c = proxy.connect(autocommit=True)
    try:
        with c.cursor() as cur:
            cur.execute(setup)
            cur.fetchall()
        _kill_backend_of(cluster, c)
        with pytest.raises(pymysql.err.OperationalError) as e:
            with c.cursor() as cur:
                cur.execute(then)
        assert e.value.args[0] == 1927 and what in e.value.args[1], e.value.args  # not a silent NULL / "doesn't exist"
        with pytest.raises((pymysql.err.OperationalError, pymysql.err.InterfaceError)):
            with c.cursor() as cur:  # ... and the connection is closed, as a server closes a killed one
                cur.execute("SELECT 1")
        assert f"a new one cannot restore its {what}" in proxy.process.log_tail(200)
    finally:
        c.close()


def test_state_lost_to_the_servers_wait_timeout(proxy, cluster):
    c = proxy.connect(autocommit=True)
    try:
        with c.cursor() as cur:
            # the server ends the idle backend connection after 1 s, as when its global wait_timeout is
            # below rwproxy's client_idle_timeout (a literal value would be the session's own limit,
            # and rwproxy would close the client connection itself: test_proxy_protocol.py)
            cur.execute("SET SESSION wait_timeout = 1 + 0")
            cur.execute("CREATE TEMPORARY TABLE lost_wt (a INT)")
        time.sleep(2.5)
        with pytest.raises(pymysql.err.OperationalError) as e:
            with c.cursor() as cur:
                cur.execute("INSERT INTO lost_wt VALUES (1)")
        assert e.value.args[0] == 1927 and "temporary tables" in e.value.args[1]
    finally:
        c.close()


def _on_every_node(cluster, sql: str) -> None:
    """A SET GLOBAL (which does not replicate) on the primary and every replica, as root."""
    for node in (cluster.primary, *cluster.replicas):
        with node.connect() as c, c.cursor() as cur:
            cur.execute(sql)


def test_servers_without_backslash_escapes_are_announced_so_clients_escape_as_they_must(cluster, tmp_path):
    """With NO_BACKSLASH_ESCAPES in the servers' global sql_mode, a server's greeting and login OK say
    so in their status flags, and client libraries escape strings by them (PyMySQL, libmariadb's
    mysql_real_escape_string): a quote is doubled, not backslashed. rwproxy's said nothing, so
    PyMySQL sent O\\'Brien, which such a server reads as a string ended by the quote: a syntax error
    at best, an injection at worst. The monitor now reads the mode with autocommit."""
    value = "O'Brien\\' OR '1'='1"
    _on_every_node(cluster, "SET GLOBAL sql_mode = CONCAT(@@global.sql_mode, ',NO_BACKSLASH_ESCAPES')")
    p = start_proxy(cluster, tmp_path, proxy={"workers": 1})
    try:
        def connect(port):
            return pymysql.connect(host="127.0.0.1", port=port, user="app", password="app", database="app",
                                   autocommit=True)
        assert wait_until(lambda: connect(p.port).server_status & 0x200, 10), "the mode never reached new sessions"
        for port in (cluster.primary.port, p.port):
            c = connect(port)
            try:
                assert c.server_status & 0x200, port  # SERVER_STATUS_NO_BACKSLASH_ESCAPES
                with c.cursor() as cur:
                    cur.execute("SELECT %s, %s = 'x'", (value, value))
                    assert cur.fetchall() == ((value, 0),), port
            finally:
                c.close()
    finally:
        _on_every_node(cluster, "SET GLOBAL sql_mode = REPLACE(REPLACE(@@global.sql_mode, "
                                "'NO_BACKSLASH_ESCAPES,', ''), ',NO_BACKSLASH_ESCAPES', '')")
        p.process.stop()
    with cluster.primary.connect() as c, c.cursor() as cur:
        cur.execute("SELECT @@global.sql_mode LIKE '%NO_BACKSLASH%'")
        assert cur.fetchone() == (0,)


def test_a_statement_the_server_refuses_as_too_big_leaves_the_session_answering(cluster, tmp_path):
    """A statement under rwproxy's max_allowed_packet but over the server's: the server answers
    1153 and closes its connection while rwproxy is still sending, with that connection's write
    buffer full and the client's reading paused for it. The client must get the error and then
    answers to its next commands (it used to wait forever: nothing resumed its reading)."""
    _on_every_node(cluster, "SET GLOBAL max_allowed_packet = 4194304")  # (new connections only)
    p = start_proxy(cluster, tmp_path, proxy={"workers": 1})
    try:
        c = pymysql.connect(host="127.0.0.1", port=p.port, user="app", password="app", database="app",
                            max_allowed_packet=64 << 20, read_timeout=20)
        try:
            with c.cursor() as cur:
                with pytest.raises(pymysql.err.MySQLError) as e:
                    cur.execute("SELECT '" + "A" * (12 << 20) + "' FROM DUAL")
                # (whether the server's 1153 arrives before its reset depends on timing; directly
                # the client gets 1153 or a lost connection too)
                assert e.value.args[0] in (1153, 1927), e.value.args
                c.ping(reconnect=False)
                cur.execute("SELECT 40 + 2")
                assert cur.fetchall() == ((42,),)
        finally:
            c.close()
    finally:
        p.process.stop()
        _on_every_node(cluster, "SET GLOBAL max_allowed_packet = 67108864")  # (the sandbox's)


def test_dropping_the_current_database_leaves_the_session_without_one(proxy, cluster):
    """As on the server: after DROP DATABASE of the session's current database, DATABASE() is NULL
    and an unqualified table is ERROR 1046 for every later statement, reads included, although the
    session's replica connections still have it selected (MariaDB's main.mysql-interactive found
    rwproxy answering with the dropped name from a replica)."""
    with cluster.primary.connect() as r, r.cursor() as cur:
        cur.execute("CREATE DATABASE IF NOT EXISTS dropped_hardening")
        cur.execute("CREATE TABLE IF NOT EXISTS dropped_hardening.t (a INT)")
        cur.execute("GRANT ALL ON dropped_hardening.* TO 'app'@'%'")
    cluster.wait_replicas_caught_up(30)
    c = proxy.connect(autocommit=True, database="dropped_hardening")
    try:
        with c.cursor() as cur:
            for _ in range(4):  # reads: the session's replica connections select the database
                cur.execute("SELECT COUNT(*) FROM t")
            cur.execute("DROP DATABASE dropped_hardening")
            cluster.wait_replicas_caught_up(30)
            time.sleep(1.2)  # past read_your_writes_window (1 s): reads go to the replicas again
            for _ in range(4):
                cur.execute("SELECT DATABASE()")
                assert cur.fetchone() == (None,)
                with pytest.raises(pymysql.err.MySQLError) as e:
                    cur.execute("SELECT COUNT(*) FROM t")
                assert e.value.args[0] == 1046  # No database selected
    finally:
        c.close()
        with cluster.primary.connect() as r, r.cursor() as cur:
            cur.execute("DROP DATABASE IF EXISTS dropped_hardening")


def test_a_pooled_connection_whose_database_was_dropped_selects_it_again(cluster, tmp_path):
    """A session that drops its login database leaves its server connection with none selected,
    and COM_RESET_CONNECTION keeps that. When the database is created again, the next session
    logging in to it must not get that connection as it is: its first unqualified table was
    ERROR 1046 (MariaDB's mysql_client_test, whose every test drops and creates its database)."""
    p = start_proxy(cluster, tmp_path, proxy={"workers": 1})
    try:
        for i in range(3):
            with cluster.primary.connect() as r, r.cursor() as cur:
                cur.execute("CREATE DATABASE IF NOT EXISTS pool_dropped")
                cur.execute("GRANT ALL ON pool_dropped.* TO 'app'@'%'")
            a = p.connect(autocommit=True, database="pool_dropped")
            with a.cursor() as cur:
                cur.execute("CREATE TABLE t (a INT)")
                cur.execute("DROP DATABASE pool_dropped")
            a.close()
            with cluster.primary.connect() as r, r.cursor() as cur:
                cur.execute("CREATE DATABASE pool_dropped")
            time.sleep(0.3)  # (the released connection is reset and back in the pool)
            b = p.connect(autocommit=True, database="pool_dropped")
            try:
                with b.cursor() as cur:
                    cur.execute("CREATE TABLE t (a INT)")  # an unqualified table: the database is selected
                    cur.execute("INSERT INTO t VALUES (1)")
                    cur.execute("SELECT DATABASE(), COUNT(*) FROM t")
                    assert cur.fetchone() == ("pool_dropped", 1), i
            finally:
                b.close()
            with cluster.primary.connect() as r, r.cursor() as cur:
                cur.execute("DROP DATABASE pool_dropped")
    finally:
        p.process.stop()


def test_servers_with_global_autocommit_off_give_sessions_autocommit_off(cluster, tmp_path):
    """With autocommit = 0 in the servers' configuration a session starts, and is reset, with
    autocommit off, as logged in to the primary directly: a write waits for COMMIT. rwproxy used
    to say autocommit was on whatever the servers had (mysql_client_test's
    test_connect_autocommit); and before that, its server connections came up with autocommit
    off while the session had been told on, so writes stayed uncommitted holding their locks.
    Replica connections keep autocommit on (reads outside a transaction take a fresh snapshot)."""
    with cluster.primary.connect() as r, r.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS app.ac_off (id INT PRIMARY KEY)")
        cur.execute("DELETE FROM app.ac_off")
    cluster.wait_replicas_caught_up(30)

    def count() -> int:
        with cluster.primary.connect() as r, r.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM app.ac_off")
            return cur.fetchone()[0]

    _on_every_node(cluster, "SET GLOBAL autocommit = 0")
    p = start_proxy(cluster, tmp_path, proxy={"workers": 1})
    try:
        for port in (cluster.primary.port, p.port):
            c = pymysql.connect(host="127.0.0.1", port=port, user="app", password="app", database="app",
                                autocommit=None)  # (PyMySQL then keeps what the greeting said)
            try:
                assert c.get_autocommit() is False, port  # as directly
            finally:
                c.close()
        c = pymysql.connect(host="127.0.0.1", port=p.port, user="app", password="app", database="app",
                            autocommit=None)
        try:
            with c.cursor() as cur:
                cur.execute("SELECT @@autocommit")
                assert cur.fetchone() == (0,)
                cur.execute("SELECT COUNT(*) FROM ac_off")  # a read: a replica connection
                assert cur.fetchone() == (0,)
                cur.execute("INSERT INTO ac_off VALUES (1)")
            assert count() == 0  # waits for COMMIT
            c.commit()
            assert count() == 1
            with c.cursor() as cur:
                cur.execute("INSERT INTO ac_off VALUES (2)")
        finally:
            c.close()  # uncommitted: rolled back
        assert count() == 1
        raw = RawClient("127.0.0.1", p.port)
        try:
            ok = raw.command(b"\x03SET autocommit = 1")
            assert struct.unpack_from("<H", ok, 3)[0] & 2  # SERVER_STATUS_AUTOCOMMIT
            ok = raw.command(b"\x1f")  # COM_RESET_CONNECTION: autocommit as after login
            assert ok[0] == 0 and not struct.unpack_from("<H", ok, 3)[0] & 2, ok
        finally:
            raw.close()
        _on_every_node(cluster, "SET GLOBAL autocommit = 1")  # the monitor sees it within a check or so
        deadline = time.monotonic() + 10
        while True:
            raw = RawClient("127.0.0.1", p.port)
            raw.close()
            if raw.greeting.status & 2:
                break
            assert time.monotonic() < deadline, "SET GLOBAL autocommit = 1 never reached new sessions"
            time.sleep(0.1)
    finally:
        p.process.stop()
        _on_every_node(cluster, "SET GLOBAL autocommit = 1")
        with cluster.primary.connect() as r, r.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS app.ac_off")


def test_a_session_with_only_replayable_state_reconnects_silently(proxy, cluster):
    c = proxy.connect(autocommit=True)
    try:
        with c.cursor() as cur:
            cur.execute("SET SESSION sql_mode = 'ANSI_QUOTES'")
            cur.execute("CREATE TABLE IF NOT EXISTS app.silent (a INT)")
        _kill_backend_of(cluster, c)
        with c.cursor() as cur:
            cur.execute("INSERT INTO silent VALUES (1)")  # a new connection, the SET replayed: no error
            cur.execute("/* rwproxy:primary */ SELECT @@sql_mode")
            assert cur.fetchone()[0] == "ANSI_QUOTES"
    finally:
        c.close()


# ---- 2. instances never cross wires ------------------------------------------------------------

def _cli(p, *args, timeout=30):
    return subprocess.run([sys.executable, "-m", "proxy", *args, "--config", p.process.config_path],
                          capture_output=True, text=True, timeout=timeout)


def test_two_instances_on_one_port_keep_their_own_control_and_kill_sockets(cluster, tmp_path):
    port = free_port()
    a = start_proxy(cluster, tmp_path / "a", proxy={"listen": f"127.0.0.1:{port}", "workers": 2})
    b = start_proxy(cluster, tmp_path / "b", proxy={"listen": f"127.0.0.2:{port}", "workers": 2})
    try:
        for p in (a, b):
            st = json.loads(_cli(p, "status", "--json").stdout)
            assert st["pid"] == p.process.pid and st["listen"] == f"{p.host}:{port}"
        # a session in B running a long statement; A is asked to KILL that id
        victims = [b.connect() for _ in range(3)]
        victim = victims[-1]
        out: dict = {}

        def run():
            try:
                with victim.cursor() as cur:
                    cur.execute("SELECT SLEEP(3)")
                    out["result"] = cur.fetchone()
            except pymysql.err.MySQLError as e:
                out["error"] = e.args

        t = threading.Thread(target=run)
        t.start()
        time.sleep(0.5)
        killers = [a.connect()]  # (ids are per instance: A may have a session with the victim's number)
        while killers[-1].thread_id() == victim.thread_id() and len(killers) < 8:
            killers.append(a.connect())
        killer = killers.pop()
        for c in killers:  # (closed: A must hold no session with the victim's number)
            c.close()
        deadline = time.monotonic() + 10
        while killers and json.loads(_cli(a, "status", "--json").stdout).get("clients") != 1:
            assert time.monotonic() < deadline, "A did not see its extra sessions close"
            time.sleep(0.1)
        assert killer.thread_id() != victim.thread_id()
        with pytest.raises(pymysql.err.OperationalError) as e:
            with killer.cursor() as cur:
                cur.execute(f"KILL QUERY {victim.thread_id()}")
        assert e.value.args[0] == 1094  # Unknown thread id: A has no such session
        t.join(10)
        assert out.get("result") == (0,), out  # B's statement ran to its end
        killer.close()
        for c in victims:
            c.close()
        # stopping B leaves A's control socket alone
        b.process.stop()
        st = json.loads(_cli(a, "status", "--json").stdout)
        assert st["pid"] == a.process.pid
    finally:
        a.process.stop()
        b.process.stop()


def test_a_second_instance_with_the_same_runtime_dir_refuses_to_start(cluster, tmp_path):
    a = start_proxy(cluster, tmp_path / "a", proxy={"workers": 1, "runtime_dir": str(tmp_path / "run")})
    try:
        with pytest.raises(RuntimeError) as e:
            start_proxy(cluster, tmp_path / "b", proxy={"workers": 1, "runtime_dir": str(tmp_path / "run")})
        assert f"another rwproxy (pid {a.process.pid}" in str(e.value)
        assert json.loads(_cli(a, "status", "--json").stdout)["pid"] == a.process.pid  # A untouched
    finally:
        a.process.stop()


def test_a_runtime_dir_on_a_full_disk_is_one_line_at_start(cluster, tmp_path, small_disk):
    try:
        (small_disk / "filler").write_bytes(b"\0" * 128 * 1024)
    except OSError:
        pass  # (full, as meant)
    with pytest.raises(RuntimeError) as e:
        start_proxy(cluster, tmp_path / "a", proxy={"workers": 1, "runtime_dir": str(small_disk / "run")})
    text = str(e.value)
    assert "Traceback" not in text and f"cannot write {small_disk / 'run'}/.instance.json: No space left" in text, text
    (small_disk / "filler").unlink()  # space again: the lock was let go, the same directory serves
    a = start_proxy(cluster, tmp_path / "b", proxy={"workers": 1, "runtime_dir": str(small_disk / "run")})
    a.process.stop()


def test_a_runtime_dir_under_another_users_directory_is_refused(cluster, tmp_path):
    """/tmp/rwproxy-<uid> is a name any local user can create first; its owner could swap the
    runtime directory (and its control socket) for theirs."""
    parent = tmp_path / "theirs"
    parent.mkdir(mode=0o755)
    os.chown(parent, 65534, 65534)  # (nobody; the suite runs as root)
    with pytest.raises(RuntimeError) as e:
        start_proxy(cluster, tmp_path / "a", proxy={"workers": 1, "runtime_dir": str(parent / "run")})
    assert "belongs to another user or others may write it" in str(e.value), str(e.value)


def test_the_cli_refuses_to_talk_to_an_instance_another_config_started(cluster, tmp_path):
    a = start_proxy(cluster, tmp_path / "a", proxy={"workers": 1})
    try:
        other = tmp_path / "copy.toml"
        other.write_text(open(a.process.config_path).read())  # same listen address, another file
        r = subprocess.run([sys.executable, "-m", "proxy", "status", "--config", str(other)],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and f"was started with {os.path.realpath(a.process.config_path)}" in r.stderr
    finally:
        a.process.stop()


def test_status_into_a_closed_pipe_exits_quietly(proxy):
    r = subprocess.run(f"{sys.executable} -m proxy status --config {proxy.process.config_path} | true",
                       shell=True, capture_output=True, text=True, timeout=30)
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


# ---- 5. a replica that refuses connections costs clients nothing --------------------------------

@pytest.fixture
def refusing(cluster_factory, tmp_path):
    cl = cluster_factory(replicas=2)
    p = start_proxy(cl, tmp_path, proxy={"workers": 2}, routing={"read_your_writes": "none"},
                    pool={"multiplex": False, "max_idle_per_backend": 0})  # every session connects anew
    yield cl, p
    p.process.stop()


def _reads(p, sessions: int = 20) -> tuple[set, list]:
    ports, errors = set(), []
    for _ in range(sessions):  # new sessions: each opens its replica connection afresh
        try:
            with p.connect(autocommit=True) as c, c.cursor() as cur:
                cur.execute("SELECT @@port")
                ports.add(cur.fetchone()[0])
        except pymysql.err.MySQLError as e:
            errors.append(e.args)
    return ports, errors


@pytest.mark.parametrize("refusal", ["max_connections", "user dropped"])
def test_reads_go_elsewhere_when_a_replica_refuses_the_connection(refusing, refusal):
    cl, p = refusing
    victim, other = cl.node("node2"), cl.node("node3")
    undo = {"max_connections": ["SET GLOBAL max_connections = 151"],
            "user dropped": ["SET SESSION sql_log_bin = 0", "CREATE USER app@'%' IDENTIFIED BY 'app'",
                             "GRANT ALL PRIVILEGES ON app.* TO app@'%'"]}[refusal]
    hogs = []
    with victim.connect() as admin, admin.cursor() as cur:
        if refusal == "max_connections":
            cur.execute("SET GLOBAL max_connections = 10")  # (MariaDB's least) then fill it: new ones get 1040
            for _ in range(20):
                try:
                    hogs.append(pymysql.connect(host="127.0.0.1", port=victim.port, user="app", password="app"))
                except pymysql.err.OperationalError as e:
                    assert e.args[0] == 1040
                    break
        else:
            cur.execute("SET SESSION sql_log_bin = 0")  # on this replica only: new logins get 1045
            cur.execute("DROP USER app@'%'")
        try:
            ports, errors = _reads(p)
            assert errors == [], errors  # zero client errors while another server can answer
            assert victim.port not in ports and other.port in ports
            st = {s["name"]: s for s in json.loads(_cli(p, "status", "--json").stdout)["servers"]}
            assert st["node2"]["refused"] >= 1
            log = p.process.log_tail(300)
            assert "replica node2 refused user app" in log and ("1040" in log if refusal == "max_connections" else "1045" in log)
        finally:
            for c in hogs:
                c.close()
            for sql in undo:
                cur.execute(sql)


# ---- 3. connection limits hold across workers ------------------------------------------------------

def _try_connect(p, user="app", password="app"):
    try:
        return p.connect(user=user, password=password)
    except pymysql.err.OperationalError as e:
        return e.args


def test_max_connections_is_proxy_wide_and_per_user(cluster, tmp_path):
    p = start_proxy(cluster, tmp_path, proxy={"workers": 2, "max_connections": 4},
                    users=[{"name": "app", "password": "app", "max_connections": 2},
                           {"name": SHA2_USER, "password": SHA2_PASSWORD}])
    opened = []
    try:
        got = [_try_connect(p) for _ in range(3)]
        opened += [c for c in got if not isinstance(c, tuple)]
        assert len(opened) == 2, got  # the user's limit, across both workers
        refused = next(c for c in got if isinstance(c, tuple))
        assert refused[0] == 1203 and "User app already has more than 'max_user_connections'" in refused[1]
        others = [_try_connect(p, SHA2_USER, SHA2_PASSWORD) for _ in range(4)]
        opened += [c for c in others if not isinstance(c, tuple)]
        assert len(opened) == 4, others  # the proxy's limit, across both workers
        assert [c[0] for c in others if isinstance(c, tuple)] == [1040, 1040]
        opened.pop(0).close()  # one of app's sessions ends: a new one fits again
        deadline = time.monotonic() + 10
        again = _try_connect(p)
        while isinstance(again, tuple) and time.monotonic() < deadline:
            time.sleep(0.1)
            again = _try_connect(p)
        assert not isinstance(again, tuple), again
        opened.append(again)
    finally:
        for c in opened:
            c.close()
        p.process.stop()


# ---- 4. a bad TLS certificate or key is one line at start-up ---------------------------------------

@pytest.mark.parametrize("problem", ["missing", "garbage", "mismatched"])
def test_a_bad_tls_certificate_or_key_stops_serve_with_one_line(tmp_path, problem):
    cert, key = self_signed_cert(str(tmp_path))
    if problem == "missing":
        key = str(tmp_path / "nope.pem")
    elif problem == "garbage":
        open(key, "w").write("not a key\n")
    else:
        other = tmp_path / "other"
        other.mkdir()
        key = self_signed_cert(str(other))[1]  # a key that does not belong to the certificate
    cfg = tmp_path / "rw.toml"
    cfg.write_text(f'[proxy]\nlisten = "127.0.0.1:0"\n[proxy.tls]\ncert = "{cert}"\nkey = "{key}"\n'
                   '[[backends]]\nhost = "127.0.0.1"\nport = 1\n[[users]]\nname = "app"\n')
    r = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"proxy.tls: cannot load certificate {cert} / key {key}" in lines[0], r.stderr


def test_the_certificate_goes_with_its_issuer_when_a_ca_is_configured(cluster, tmp_path):
    """[proxy.tls] ca: the certificate's chain goes with it, as a MariaDB server sends the one it
    builds from ssl_ca. Without it, a client that has no copy of the issuer could not verify a
    CA-issued certificate (Connector/C 3.4's default, on 127.0.0.1, refused rwproxy but not
    the server). `openssl s_client -starttls mysql` shows what each sends."""
    from proxy.sandbox.certs import make_authority

    pki = make_authority(tmp_path / "pki")

    def chain(port: int) -> list[str]:
        r = subprocess.run(["openssl", "s_client", "-starttls", "mysql", "-connect", f"127.0.0.1:{port}",
                            "-showcerts"], input="", capture_output=True, text=True, timeout=20)
        return [m.group(1) for m in re.finditer(r"(?m)^\s*\d+ s:(.*)$", r.stdout)]

    for with_ca in (False, True):
        tls = {"cert": pki["server_cert"], "key": pki["server_key"], **({"ca": pki["ca"]} if with_ca else {})}
        p = start_proxy(cluster, tmp_path / str(with_ca), proxy={"workers": 1, "tls": tls})
        try:
            sent = chain(p.port)
        finally:
            p.process.stop()
        assert len(sent) == (2 if with_ca else 1), sent
        if with_ca:
            assert "CA" in sent[1], sent


# ---- 6. client strings in the log are harmless ----------------------------------------------------------

def test_client_supplied_names_cannot_forge_or_flood_log_lines(proxy):
    before = os.path.getsize(proxy.process.log_path)
    forged = "evil\n2026-12-04 12:00:00,000 WARNING rwproxy[1] rwproxy.failover: failover done in 5 ms: FAKE"
    with pytest.raises(pymysql.err.OperationalError):
        pymysql.connect(host=proxy.host, port=proxy.port, user=forged, password="x")
    for _ in range(20):
        with pytest.raises(pymysql.err.OperationalError):
            pymysql.connect(host=proxy.host, port=proxy.port, user="u" * 900_000, password="x")
    time.sleep(1.2)  # the next second's first failed login (or the timer) reports what was left out
    with pytest.raises(pymysql.err.OperationalError):
        pymysql.connect(host=proxy.host, port=proxy.port, user="late", password="x")
    time.sleep(1.2)
    with open(proxy.process.log_path, "rb") as f:
        f.seek(before)
        new = f.read().decode("utf-8", "replace")
    assert len(new) < 50_000, len(new)  # 20 MB before the fix
    assert not any(line.startswith("2026-12-04 12:00:00,000 WARNING") for line in new.splitlines())
    assert "evil\\n2026-12-04" in new  # shown, escaped, on the line it belongs to
    assert "more lines like the one before were left out" in new


# ---- 7. the handshake does not tell who exists -----------------------------------------------------------

def _first_answer(p, user: str) -> bytes:
    """The proxy's first packet after a handshake response for `user` that names mysql_native_password
    and sends no auth data (as libmariadb does when its plugin differs from the server's default)."""
    with socket.create_connection((p.host, p.port), timeout=10) as s:
        s.recv(4096)  # the greeting
        s.sendall(frame(build_response(PROXY_CAPABILITIES & ~CLIENT_SSL, 45, user, b"", "app", auth.NATIVE), 1))
        data = s.recv(4096)
        return data[4:]


def test_known_and_unknown_users_get_the_same_first_answer(cluster, tmp_path):
    p = start_proxy(cluster, tmp_path, proxy={"workers": 1, "auth_plugin": "caching_sha2_password"})
    try:
        known, unknown = _first_answer(p, "app"), _first_answer(p, "nobody-here")
        assert known[:1] == unknown[:1] == b"\xfe"  # both asked to switch (before: unknown users got 1045 at once)
        assert known.split(b"\x00")[0] == unknown.split(b"\x00")[0]  # to the same plugin
    finally:
        p.process.stop()


# ---- 8. an unanswered COM_CHANGE_USER authentication -------------------------------------------------------

def test_unanswered_change_user_authentication_times_out_with_a_reason(cluster, tmp_path):
    p = start_proxy(cluster, tmp_path, proxy={"workers": 1}, pool={"connect_timeout": 0.5})
    try:
        c = RawClient(p.host, p.port)
        # a switch to caching_sha2_password is needed (the user's plugin); the client never answers it
        body = (b"\x11" + SHA2_USER.encode() + b"\x00" + bytes((20,)) + bytes(20) + b"app\x00"
                + (45).to_bytes(2, "little") + b"mysql_native_password\x00")
        c.send(body, 0)
        first = c.read()[1]
        assert first[:1] == b"\xfe", first
        t0 = time.monotonic()
        _, answer = c.read()  # (RawClient's socket timeout is 10 s; the proxy's is connect_timeout + 8)
        assert answer[:1] == b"\xff" and int.from_bytes(answer[1:3], "little") == 1159, answer
        assert b"did not answer COM_CHANGE_USER" in answer and time.monotonic() - t0 < 10
        with pytest.raises((ConnectionError, OSError)):
            c.read()  # then closed, as the server closes it
    finally:
        p.process.stop()


# ---- accounts that exist only on the servers ([auth] server_accounts) --------------------------------------

def test_accounts_only_the_server_knows_log_in_without_rwproxy_knowing_the_password(cluster, tmp_path):
    with cluster.primary.connect() as c, c.cursor() as cur:
        cur.execute("CREATE USER IF NOT EXISTS 'runtime_u'@'%' IDENTIFIED BY 'pw-one'")
        cur.execute("GRANT ALL PRIVILEGES ON app.* TO 'runtime_u'@'%'")
        cur.execute("CREATE USER IF NOT EXISTS 'runtime_ed'@'%' IDENTIFIED VIA unix_socket")
    cluster.wait_replicas_caught_up(30)
    plain = start_proxy(cluster, tmp_path / "off", proxy={"workers": 1})
    p = start_proxy(cluster, tmp_path / "on", proxy={"workers": 1}, auth={"server_accounts": True},
                    routing={"read_your_writes": "none"})
    try:
        with pytest.raises(pymysql.err.OperationalError) as e:  # off by default
            plain.connect(user="runtime_u", password="pw-one")
        assert e.value.args[0] == 1045
        ports = set()
        with p.connect(user="runtime_u", password="pw-one", autocommit=True) as c, c.cursor() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS app.server_acct (a INT)")
            cur.execute("INSERT INTO app.server_acct VALUES (1)")  # the primary, logged in to with SHA1(password)
            for _ in range(6):
                cur.execute("SELECT @@port")  # the replicas, likewise
                ports.add(cur.fetchone()[0])
            cur.execute("SELECT CURRENT_USER()")
            assert cur.fetchone()[0] == "runtime_u@%"
        assert ports & {n.port for n in cluster.replicas}
        for user, password in (("runtime_u", "wrong"), ("nobody-at-all", "x"), ("runtime_ed", "pw-ed")):
            with pytest.raises(pymysql.err.OperationalError) as e:
                p.connect(user=user, password=password)
            assert e.value.args[0] == 1045, (user, e.value.args)
        assert "runtime_ed@127.0.0.1 uses unix_socket" in p.process.log_tail(100)
        # the password changes on the server: the new one works at once (looked up again), the old one not
        with cluster.primary.connect() as c, c.cursor() as cur:
            cur.execute("ALTER USER 'runtime_u'@'%' IDENTIFIED BY 'pw-two'")
        cluster.wait_replicas_caught_up(30)
        with p.connect(user="runtime_u", password="pw-two") as c, c.cursor() as cur:
            cur.execute("SELECT 1")
        with pytest.raises(pymysql.err.OperationalError):
            p.connect(user="runtime_u", password="pw-one")
        assert "pw-one" not in open(p.process.log_path).read() and "pw-two" not in open(p.process.log_path).read()
    finally:
        plain.process.stop()
        p.process.stop()
        with cluster.primary.connect() as c, c.cursor() as cur:
            cur.execute("DROP USER IF EXISTS 'runtime_u'@'%'")
            cur.execute("DROP USER IF EXISTS 'runtime_ed'@'%'")


def _pooled_primary_row(port: int, db: str, sql: str) -> tuple:
    """`sql`'s row in a new session of app in `db`, run in a transaction: on the session's primary
    connection, which goes back to the pool when the client leaves."""
    c = pymysql.connect(host="127.0.0.1", port=port, user="app", password="app", database=db)
    try:
        with c.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute(sql)
            row = cur.fetchone()
            cur.execute("COMMIT")
            return row
    finally:
        c.close()


def test_a_database_with_the_servers_collation_is_not_selected_again_at_every_reset(cluster, tmp_path):
    """Selecting the database again after each reset (below) is needed only for a database whose
    collation is not the server's: the pool learns which (per server and database, for 30 s) and
    skips it otherwise: a release then waits for one answer, not two (at 1,024 point-select threads
    about 4 % of statements take a connection from the pool and give it back)."""
    def changes() -> int:
        return int(cluster.primary.status_vars("Com_change_db")["Com_change_db"])

    server_coll = cluster.primary.variable("collation_server")
    p = start_proxy(cluster, tmp_path, proxy={"workers": 1})
    try:
        rows = cluster.primary.query("SELECT DEFAULT_COLLATION_NAME AS c FROM information_schema.SCHEMATA "
                                     "WHERE SCHEMA_NAME = 'app'")
        assert rows[0]["c"] == server_coll, "the sandbox's app database should have the server's collation"
        before, threads = changes(), set()
        for _ in range(5):
            coll, thread = _pooled_primary_row(p.port, "app", "SELECT @@collation_database, CONNECTION_ID()")
            assert coll == server_coll
            threads.add(thread)
            time.sleep(0.3)  # the reset runs after the client leaves
        assert len(threads) < 4, "connections were not reused: the test proves nothing"
        assert changes() - before <= 1, "the database was selected again at every reset (one is the first, which learns)"
    finally:
        p.process.stop()


def test_a_pooled_connection_shows_the_databases_own_collation(cluster, tmp_path):
    """COM_RESET_CONNECTION keeps a connection's database but sets @@collation_database and
    @@character_set_database to the server's defaults. rwproxy resets a connection before the
    pool hands it to the next client, which used to see the server's collation for a database
    created with its own (DBD::MariaDB's test suite refuses to run on such a connection)."""
    cluster.primary.query("CREATE DATABASE IF NOT EXISTS coll_db CHARACTER SET latin1 COLLATE latin1_swedish_ci")
    cluster.primary.query("GRANT ALL ON coll_db.* TO 'app'@'%'")
    cluster.wait_replicas_caught_up(30)
    p = start_proxy(cluster, tmp_path, proxy={"workers": 1})
    try:
        threads = set()
        for _ in range(3):
            coll, charset, thread = _pooled_primary_row(
                p.port, "coll_db", "SELECT @@collation_database, @@character_set_database, CONNECTION_ID()")
            assert (coll, charset) == ("latin1_swedish_ci", "latin1")
            threads.add(thread)
            time.sleep(0.5)  # the reset runs after the client leaves
        assert len(threads) < 3, "no connection was reused: the test proves nothing"
    finally:
        p.process.stop()
        cluster.primary.query("DROP DATABASE coll_db")


def test_malformed_change_user_packets_get_the_servers_1047_and_the_session_goes_on(proxy):
    """COM_CHANGE_USER cut short: no database field, or (a client that negotiated plugin auth) no
    charset and plugin after it. The server answers ERROR 1047 before any authentication and the
    session carries on; rwproxy took the missing fields as empty and answered with an auth switch,
    which the client then failed (an adversarial probe's finding)."""
    payloads = [b"\x01\x00\x00\x00", b"app\x00", b"app\x00\x00", b"app\x00\x14" + b"a" * 20, b"app\x00\x00app\x00",
                b"app\x00\x00app\x00\x21\x00", b"app\x00\x00app", b"app", b"app\x00\x00\x00\x21\x00", b""]
    answers = {}
    for port in (proxy.port, proxy.cluster.primary.port):
        out = []
        for pl in payloads:
            c = RawClient("127.0.0.1", port)
            try:
                c.send(b"\x11" + pl, 0)
                p = c.read()[1]
                code = struct.unpack_from("<H", p, 1)[0] if p[0] == 0xFF else p[0]
                out.append((code, c.command(b"\x03SELECT 1")[0] if code == 1047 else None))
            finally:
                c.close()
        answers[port] = out
    direct = answers[proxy.cluster.primary.port]
    assert direct[:-1] == [(1047, 1)] * (len(payloads) - 1)  # (the last: the server answers oddly)
    assert answers[proxy.port] == [(1047, 1)] * len(payloads)


def _handshake_answer(port: int, make) -> tuple:
    """Send the handshake response `make(greeting)` builds (whole frames); (code, seq) of the ERR, or
    the first byte of another answer."""
    from proxy.protocol.handshake import parse_greeting

    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        buf = b""
        while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:3], "little"):
            buf += s.recv(65536)
        s.sendall(make(parse_greeting(buf[4:4 + int.from_bytes(buf[:3], "little")])))
        out = b""
        while len(out) < 4 or len(out) < 4 + int.from_bytes(out[:3], "little"):
            chunk = s.recv(65536)
            if not chunk:
                return ("closed",)
            out += chunk
        p = out[4:]
        return (struct.unpack_from("<H", p, 1)[0], out[3]) if p[0] == 0xFF else (p[0],)


def test_handshake_out_of_order_and_pre_41_clients_get_the_servers_errors(proxy):
    """A handshake response with the wrong sequence number is ERROR 1156 (seq 1) on the server, and
    a client without CLIENT_PROTOCOL_41 is told 1251 "consider upgrading"; rwproxy accepted the
    first and answered the second 1043 Bad handshake (adversarial probes)."""
    caps = PROXY_CAPABILITIES & ~(1 << 20)

    def good(seq):
        return lambda g: frame(build_response(caps, 45, "app", auth.native_token("app", g.salt), "app",
                                              "mysql_native_password"), seq)
    cases = [good(1), good(5), good(0), lambda g: frame(struct.pack("<HI", 0x0001, 1 << 24)[:5] + b"app\x00" + b"x" * 8, 1)]
    via = [_handshake_answer(proxy.port, m) for m in cases]
    direct = [_handshake_answer(proxy.cluster.primary.port, m) for m in cases]
    assert direct == [(0,), (1156, 1), (1156, 1), (1251, 2)]
    assert via == direct


@pytest.mark.parametrize("payload", [
    b"\x00" * 10,                                                   # all zero: user '', no scramble
    struct.pack("<H", 0x0004) + b"\x00\x00\x01" + b"app\x00",        # a user, no scramble
    struct.pack("<H", 0x0004) + b"\x00\x00\x01" + b"nobody\x00ABCDEFGH",  # a 4.0 scramble
    struct.pack("<H", 0x0004 | 0x0008) + b"\x00\x00\x01" + b"app\x00ABCDEFGH\x00app\x00",
    struct.pack("<H", 0x8005) + b"\x00\x00\x01" + b"app\x0012345678",  # claims CLIENT_SECURE_CONNECTION
])
def test_pre_41_handshakes_get_the_servers_answer_without_a_sqlstate(proxy, payload):
    """MariaDB reads a 4.0 handshake response and answers 1045, 1251 or 1043 depending on what it
    carries, without the SQLSTATE a 4.0 client cannot read; rwproxy answered every one 1251 with
    a SQLSTATE (adversarial probes)."""
    def answer(port):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.recv(65536)
            s.sendall(frame(payload, 1))
            p = s.recv(65536)
        return struct.unpack_from("<H", p, 5)[0], p[3], p[7:8] == b"#", p[7:].split(b"'@'")[0]
    assert answer(proxy.port) == answer(proxy.cluster.primary.port)


def test_change_user_with_an_empty_token_gets_an_auth_switch_as_on_the_server(proxy):
    """A COM_CHANGE_USER without authentication data is answered, by the server, with an auth switch
    carrying a new salt, and the client's answer to it logs the new user in; rwproxy denied it at
    once (1045)."""
    out = {}
    for port in (proxy.port, proxy.cluster.primary.port):
        c = RawClient("127.0.0.1", port)
        try:
            c.send(b"\x11app\x00\x00app\x00\x2d\x00mysql_native_password\x00", 0)
            seq, p = c.read()
            assert p[0] == 0xFE, p
            plugin, _, salt = p[1:].partition(b"\x00")
            c.send(auth.native_token("app", salt[:20]), seq + 1)
            seq, p = c.read()
            c.send(b"\x03SELECT CURRENT_USER()", 0)
            rows = c.read_until_eof()
            out[port] = (plugin, len(salt.rstrip(b"\x00")), p[0], seq, rows[2][1:].split(b"@")[0])
        finally:
            c.close()
    assert out[proxy.cluster.primary.port] == (b"mysql_native_password", 20, 0, 3, b"app")
    assert out[proxy.port] == out[proxy.cluster.primary.port]


def _change_user_charset(c: RawClient, password: str, charset: int) -> int:
    """COM_CHANGE_USER to app with `charset` (two bytes), answering an auth switch; 0 or the error code."""
    token = auth.native_token(password, c.greeting.salt)
    c.send(b"\x11app\x00" + bytes([len(token)]) + token + b"app\x00" + struct.pack("<H", charset)
           + b"mysql_native_password\x00", 0)
    seq, p = c.read()
    if p[0] == 0xFE:  # the server asks again with a new salt
        c.send(auth.native_token(password, p[1:].partition(b"\x00")[2][:20]), seq + 1)
        seq, p = c.read()
    return 0 if p[0] == 0 else struct.unpack_from("<H", p, 1)[0]


def test_change_user_gives_the_session_the_character_set_the_server_would(proxy):
    """After COM_CHANGE_USER the server's session has the character set the packet names, its default
    when the change fails or names none, and a collation id over 255 (UCA 14.0) as it is; a client
    character set no client can use (utf16) fails the change. rwproxy kept the old character set on
    failure, cut ids to their low byte (2304, utf8mb4_uca1400_ai_ci, became 0), and after a failed
    change to utf16 every later statement failed (a fuzzing run's finding)."""
    cases = [("app", 0), ("wrong", 33), ("app", 33), ("app", 54), ("app", 2304), ("app", 300), ("wrong", 2304)]
    answers = {}
    for port in (proxy.port, proxy.cluster.primary.port):
        out = []
        for password, charset in cases:
            c = RawClient("127.0.0.1", port)
            try:
                assert c.command(b"\x03SET NAMES latin1")[0] == 0
                out.append(_change_user_charset(c, password, charset))
                for sql in (b"SELECT @@collation_connection, @@character_set_results",  # (a replica)
                            b"SELECT /* rwproxy:primary */ @@collation_connection, @@character_set_results"):
                    c.send(b"\x03" + sql, 0)
                    out.append(c.read_until_eof()[-2])
            finally:
                c.close()
        answers[port] = out
    direct = answers[proxy.cluster.primary.port]
    assert direct[::3] == [0, 1045, 0, 1231, 0, 0, 1045]
    assert b"utf8mb4_uca1400_ai_ci" in direct[3 * 4 + 1]
    assert answers[proxy.port] == direct


def test_ignore_space_from_the_handshake_holds_on_pooled_connections_and_goes_at_a_reset(proxy):
    """CLIENT_IGNORE_SPACE puts IGNORE_SPACE in the session's sql_mode at login (and CLIENT_INTERACTIVE
    sets wait_timeout), and the server's COM_RESET_CONNECTION and COM_CHANGE_USER take both away.
    Through rwproxy a session on a pooled connection (reset when its last client left) had lost it at
    login, and one that reset kept it on connections opened afterwards (a fuzzing run's finding)."""
    sql = [b"SELECT @@sql_mode LIKE 'IGNORE_SPACE,%'", b"SELECT /* rwproxy:primary */ @@sql_mode LIKE 'IGNORE_SPACE,%'"]
    answers = {}
    for port in (proxy.port, proxy.cluster.primary.port):
        out = []
        for _ in range(3):  # (from the second round on, rwproxy's pool has connections of this key)
            c = RawClient("127.0.0.1", port, extra_caps=LOGIN_ONLY_CAPABILITIES)  # IGNORE_SPACE, INTERACTIVE
            try:
                for step in ("login", "reset", "change user"):
                    if step == "reset":
                        assert c.command(b"\x1f")[0] == 0
                    elif step == "change user":
                        assert _change_user_charset(c, "app", 45) == 0
                    for q in sql:
                        c.send(b"\x03" + q, 0)
                        out.append((step, c.read_until_eof()[-2]))
            finally:
                c.close()
        answers[port] = out
    direct = answers[proxy.cluster.primary.port]
    assert [v for _, v in direct[:2]] == [b"\x011", b"\x011"] and direct[2][1] == b"\x010"
    assert answers[proxy.port] == direct


def test_login_and_change_user_ok_carry_the_schema_as_session_state_as_the_servers_do(proxy):
    """To a client that negotiated CLIENT_SESSION_TRACK, the server's OK ending a login (or a
    COM_CHANGE_USER) with a database names it as changed session state (SESSION_TRACK_SCHEMA), and a
    connector may keep its current database from there; rwproxy's OK carried none (a differential
    fuzzing run's finding)."""
    from proxy.protocol.handshake import parse_greeting
    from proxy.testing.rawclient import APP_CLIENT_CAPABILITIES

    answers = {}
    for port in (proxy.port, proxy.cluster.primary.port):
        out = []
        for db in ("app", None):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                c = RawClient.__new__(RawClient)
                c.sock, c.buf, c.compressed = s, b"", False
                seq, greeting = c.read()
                c.greeting = parse_greeting(greeting)
                token = auth.native_token("app", c.greeting.salt)
                c.send(build_response(APP_CLIENT_CAPABILITIES, 45, "app", token, db, auth.NATIVE), seq + 1)
                out.append(c.read())
                token = auth.native_token("app", c.greeting.salt)
                c.send(b"\x11app\x00" + bytes([len(token)]) + token + b"app\x00\x2d\x00mysql_native_password\x00", 0)
                seq, p = c.read()
                if p[0] == 0xFE:
                    c.send(auth.native_token("app", p[1:].partition(b"\x00")[2][:20]), seq + 1)
                    seq, p = c.read()
                out.append(p)
        answers[port] = out
    direct = answers[proxy.cluster.primary.port]
    assert direct[0] == (2, b"\x00\x00\x00\x02\x40\x00\x00\x00\x06\x01\x04\x03app")
    assert answers[proxy.port] == direct


def _extreme_sections(largest: bool) -> dict:
    """Every integer and duration key of the runtime sections at its largest (or smallest) allowed value."""
    from proxy.config import schema
    from proxy.config.load import MAX_INT, MAX_SECONDS
    out = {}
    for section, cls in (("proxy", schema.ProxyConfig), ("routing", schema.RoutingConfig),
                         ("monitor", schema.MonitorConfig), ("failover", schema.FailoverConfig),
                         ("pool", schema.PoolConfig), ("stats", schema.StatsConfig), ("admin", schema.AdminConfig)):
        values = {}
        for f in schema.spec_fields(cls):
            m = f.metadata
            if (section, f.name) == ("proxy", "workers"):
                continue
            if m["kind"] == "int":
                values[f.name] = ((m["hi"] if m["hi"] is not None else MAX_INT) if largest
                                  else (m["lo"] if m["lo"] is not None else 0))
            elif m["kind"] == "float" and largest:
                values[f.name] = m.get("hi") or MAX_SECONDS
        out[section] = values
    return out


def test_the_largest_values_the_check_accepts_also_run(cluster, tmp_path):
    """check-config passed `[stats] events = 10**21` and serve then died on an OverflowError; twice
    monitor.connect_timeout past a year stopped the failover thread inside PyMySQL. Every integer
    and duration at the most the check allows must run: clients served, admin and status answer,
    nothing in the log but ordinary lines. (One past the bound is refused: test_config.)"""
    sections = _extreme_sections(True)
    admin_port = free_port()
    sections["proxy"]["listen"] = f"127.0.0.1:{free_port()}"
    sections["admin"].update(listen=f"127.0.0.1:{admin_port}", users=[{"name": "admin", "password": "adm1n-pw"}])
    p = start_proxy(cluster, tmp_path, **sections)
    try:
        with pymysql.connect(host=p.host, port=p.port, user="app", password="app", database="app") as c:
            with c.cursor() as cur:
                cur.execute("SELECT 1")
                assert cur.fetchone() == (1,)
                cur.execute("BEGIN")
                cur.execute("SELECT @@server_id")
                cur.execute("COMMIT")
        with pymysql.connect(host="127.0.0.1", port=admin_port, user="admin", password="adm1n-pw") as a:
            with a.cursor() as cur:
                cur.execute("SELECT name, state FROM servers")
                assert len(cur.fetchall()) == 3
                cur.execute("SELECT COUNT(*) FROM events")
                assert cur.fetchone()[0] > 0
        time.sleep(2)  # (the failover thread's first pass)
    finally:
        p.process.stop()
    log = open(tmp_path / "rwproxy.log", errors="replace").read()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    assert "exceeds the maximum" not in log, log[-3000:]  # (replica_heartbeat_period past MariaDB's)


def _infile_out_of_order(port: int, first_seq: int, end_seq: int) -> list:
    """LOAD DATA LOCAL INFILE with the file's packets numbered as given (in turn: 2 and 3); what
    comes back, as (error code, sequence id), until the connection closes or goes quiet."""
    c = RawClient("127.0.0.1", port, timeout=3)
    got = []
    try:
        c.send(b"\x03LOAD DATA LOCAL INFILE 'ids.txt' INTO TABLE infile_seq", 0)
        seq, p = c.read()
        assert (seq, p[:1]) == (1, b"\xfb")
        c.send(b"1\n2\n", first_seq)
        c.send(b"", end_seq)
        try:
            while len(got) < 3:
                seq, p = c.read()
                got.append((struct.unpack_from("<H", p, 1)[0] if p[0] == 0xFF else p[0], seq))
        except TimeoutError:
            got.append("quiet")
            c.send(b"\x0e", 0)  # COM_PING: the server answers the packet after a bad end of file
            seq, p = c.read()
            got.append((struct.unpack_from("<H", p, 1)[0] if p[0] == 0xFF else p[0], seq))
            c.read()
    except (ConnectionError, OSError):
        got.append("closed")
    finally:
        c.close()
    return got


def test_local_infile_packets_out_of_order_get_the_servers_1156_and_a_close(proxy):
    """A file packet numbered out of turn is ERROR 1156 on the server, numbered as the packet it
    wanted, and the connection ends. rwproxy answered it numbered 0 and kept the session; and an
    end-of-file packet numbered out of turn left client and rwproxy waiting for each other
    (adversarial probes). Sessions after it are served from sound connections."""
    with pymysql.connect(host="127.0.0.1", port=proxy.port, user="app", password="app", database="app",
                         autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS infile_seq")
        cur.execute("CREATE TABLE infile_seq (a INT)")
    direct = proxy.cluster.primary.port
    assert _infile_out_of_order(direct, 2, 3)[0] == (0, 4)  # (the well-numbered file loads)
    assert _infile_out_of_order(proxy.port, 2, 3)[0] == (0, 4)
    # the first file packet out of turn: 1156 numbered 2 at once, then the server hangs up
    assert _infile_out_of_order(direct, 5, 6)[0] == (1156, 2)
    assert _infile_out_of_order(proxy.port, 5, 6) == [(1156, 2), "closed"]
    # the last (empty) one: the server waits and answers the next packet 1156 numbered 3;
    # rwproxy answers it at once
    assert _infile_out_of_order(direct, 2, 7)[:2] == ["quiet", (1156, 3)]
    assert _infile_out_of_order(proxy.port, 2, 7) == [(1156, 3), "closed"]
    def multi(port):  # the request after a result set: the file is numbered on from it (6, 7)
        c = RawClient("127.0.0.1", port, timeout=3)
        got = []
        try:
            c.send(b"\x03SELECT 1; LOAD DATA LOCAL INFILE 'ids.txt' INTO TABLE infile_seq; SELECT 2", 0)
            while len(got) < 12:
                seq, p = c.read()
                got.append((seq, p[:1]))
                if p[:1] == b"\xfb":
                    c.send(b"1\n2\n", seq + 1)
                    c.send(b"", seq + 2)
        except TimeoutError:
            got.append("quiet")
        finally:
            c.close()
        return got
    assert multi(proxy.port) == multi(direct)
    assert multi(proxy.port)[4:7] == [(5, b"\xfb"), (8, b"\x00"), (9, b"\x01")]
    for _ in range(4):  # pooled connections reused after those sessions answer as they should
        with pymysql.connect(host="127.0.0.1", port=proxy.port, user="app", password="app", database="app",
                             autocommit=True) as conn, conn.cursor() as cur:
            cur.execute("INSERT INTO infile_seq VALUES (9)")
            cur.execute("SELECT COUNT(*) FROM infile_seq WHERE a = 9 FOR UPDATE")
            assert cur.fetchone()[0] >= 1


def test_a_command_numbered_out_of_turn_gets_1156_and_a_close_as_on_the_server(proxy):
    """A command's first packet is numbered 0; the server answers any other number with ERROR 1156
    (numbered 0) and hangs up. rwproxy passed the server's error on and kept the session."""
    def answer(port, seq):
        c = RawClient("127.0.0.1", port, timeout=3)
        got = []
        try:
            c.send(b"\x03SELECT 1", seq)
            while len(got) < 5:
                s, p = c.read()
                got.append((struct.unpack_from("<H", p, 1)[0], s) if p[0] == 0xFF else s)
        except TimeoutError:
            got.append("quiet")
        except (ConnectionError, OSError):
            got.append("closed")
        finally:
            c.close()
        return got
    assert answer(proxy.port, 0) == answer(proxy.cluster.primary.port, 0) == [1, 2, 3, 4, "quiet"]
    for seq in (1, 3, 255):
        assert answer(proxy.cluster.primary.port, seq) == [(1156, 0), "closed"]
        assert answer(proxy.port, seq) == [(1156, 0), "closed"]


def test_com_reset_connection_keeps_the_current_database_as_the_server_does(proxy, cluster):
    """COM_RESET_CONNECTION leaves the session in the database it had selected (the server keeps
    it); rwproxy put the session back in its login database, so a database selected with USE
    before the reset was gone from every statement after it (a differential probe against the
    primary). Reads on the replicas and on connections opened after the reset agree too."""
    with cluster.primary.connect() as r, r.cursor() as cur:
        cur.execute("CREATE DATABASE IF NOT EXISTS reset_keeps_db")
        cur.execute("GRANT ALL ON reset_keeps_db.* TO 'app'@'%'")
    cluster.wait_replicas_caught_up(30)
    from proxy.protocol.scan import RESULT

    def run(port, steps):
        c = RawClient("127.0.0.1", port)  # (logs in to the database 'app')
        seen = []
        try:
            for step in steps:
                if step == "sleep":
                    time.sleep(1.2)  # past idle_release (1 s): the session's connections go back to the pool
                    continue
                c.send(b"\x1f" if step == "reset" else b"\x03" + step.encode(), 0)
                ps = c.response(RESULT)
                seen.append(ps[0][:1] if len(ps) == 1 else ps[-2])
        finally:
            c.close()
        return seen

    kept = ("USE reset_keeps_db", "reset", "SELECT DATABASE()", "SELECT DATABASE()", "sleep", "SELECT DATABASE()",
            "SELECT DATABASE()", "SELECT DATABASE() FOR UPDATE", "USE app", "reset", "SELECT DATABASE()",
            "SELECT DATABASE()")
    # a session that dropped its database keeps none through the reset
    dropped = ("CREATE DATABASE reset_drops_db", "USE reset_drops_db", "DROP DATABASE reset_drops_db", "reset",
               "SELECT DATABASE()", "sleep", "SELECT DATABASE()", "SELECT DATABASE()")
    try:
        direct = run(cluster.primary.port, kept)
        assert direct == [b"\x00", b"\x00"] + [b"\x0ereset_keeps_db"] * 5 + [b"\x00", b"\x00", b"\x03app", b"\x03app"]
        assert run(proxy.port, kept) == direct
        with cluster.primary.connect() as r, r.cursor() as cur:
            cur.execute("GRANT ALL ON reset_drops_db.* TO 'app'@'%'")
        direct = run(cluster.primary.port, dropped)
        assert direct == [b"\x00"] * 4 + [b"\xfb"] * 3  # DATABASE() is NULL
        assert run(proxy.port, dropped) == direct
    finally:
        with cluster.primary.connect() as r, r.cursor() as cur:
            cur.execute("DROP DATABASE IF EXISTS reset_keeps_db")


def test_a_set_or_use_inside_a_multi_statement_holds_for_later_reads(proxy, cluster):
    """A multi-statement runs on the primary; a SET or USE among its statements changed only that
    connection, and reads after the read-your-writes window went to replicas without it (the
    previous database, character set, sql_mode; a user variable set before a statement of it that
    failed). Now the session keeps to the primary connection that has it (differential probes)."""
    from proxy.protocol.scan import RESULT
    with cluster.primary.connect() as r, r.cursor() as cur:
        cur.execute("CREATE DATABASE IF NOT EXISTS multi_use_db")
        cur.execute("GRANT ALL ON multi_use_db.* TO 'app'@'%'")
    cluster.wait_replicas_caught_up(30)

    def run(port):
        c = RawClient("127.0.0.1", port)  # (CLIENT_MULTI_STATEMENTS)
        seen = []
        try:
            for sql in ("USE multi_use_db; SELECT 1", "SET NAMES latin1; SELECT 1", "SELECT 1; SET sql_mode = 'ANSI_QUOTES'",
                        "SET @e = 1; SELEC; SET @e = 2", "sleep",
                        "SELECT DATABASE(), @@character_set_client, @@sql_mode, @e",
                        "SELECT DATABASE(), @@character_set_client, @@sql_mode, @e"):
                if sql == "sleep":
                    time.sleep(1.3)  # past read_your_writes_window and idle_release
                    continue
                c.send(b"\x03" + sql.encode(), 0)
                while True:  # each result of the multi-statement
                    ps = c.response(RESULT)
                    last = ps[-1]
                    if ps[0][:1] == b"\xff" or not (struct.unpack_from("<H", last, len(last) - 4 if last[:1] == b"\xfe"
                                                                        and len(last) < 9 else 3)[0] & 0x08):
                        break
                seen.append(ps[-2] if len(ps) > 2 else ps[0][:3])
        finally:
            c.close()
        return seen

    try:
        direct = run(cluster.primary.port)
        assert direct[-1] == b"\x0cmulti_use_db\x06latin1\x0bANSI_QUOTES\x011"
        assert run(proxy.port) == direct
    finally:
        with cluster.primary.connect() as r, r.cursor() as cur:
            cur.execute("DROP DATABASE IF EXISTS multi_use_db")


def test_a_session_holds_at_most_max_prepared_per_session_statements(cluster, tmp_path):
    """rwproxy keeps every statement a session prepared for the session's life (the servers see
    at most max_prepared_per_connection per connection), so a client preparing without closing
    grew a worker's memory without end (40,000 statements taken where a server stops at its
    max_prepared_stmt_count). One over the limit gets the server's 1461; closing one makes room;
    the session goes on, and other sessions are not affected."""
    from proxy.protocol.packets import stmt_close

    p = start_proxy(cluster, tmp_path, proxy={"workers": 1}, routing={"max_prepared_per_session": 5})
    try:
        c = RawClient("127.0.0.1", p.port)
        ids = [c.prepare(f"SELECT {i} + ?")[0] for i in range(5)]
        assert sorted(set(ids)) == sorted(ids)
        with pytest.raises(RuntimeError) as e:
            c.prepare("SELECT 99 + ?")
        assert "1461" in str(e.value) and "42000" in str(e.value), e.value
        assert "max_prepared_stmt_count statements (current value: 5)" in str(e.value)
        c.send(stmt_close(ids[0])[4:], 0)  # (no answer to COM_STMT_CLOSE)
        assert c.prepare("SELECT 98 + ?")[0] not in ids[1:]
        with pytest.raises(RuntimeError):
            c.prepare("SELECT 97 + ?")
        other = pymysql.connect(host="127.0.0.1", port=p.port, user="app", password="app", database="app")
        with other.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchall() == ((1,),)
        other.close()
        assert c.command(b"\x03SELECT 7") == b"\x01"  # the session still answers (a result of one column)
        c.close()
    finally:
        p.process.stop()
