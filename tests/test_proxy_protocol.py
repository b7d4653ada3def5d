"""The proxy's front end and data path against the real sandbox cluster:
authentication, TLS, commands no library exposes, malformed input, and faults."""

from __future__ import annotations

import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import MySQLdb
import mysql.connector
import pymysql
import pytest

from helpers import SHA2_PASSWORD, SHA2_USER, self_signed_cert, start_proxy
from proxy.runtime.launcher import ProxyProcess, free_port
from proxy.protocol.constants import MAX_PACKET
from proxy.protocol.packets import frame
from proxy.testing.rawclient import RawClient


def _err(excinfo) -> tuple[int, str]:
    return excinfo.value.args[0], excinfo.value.args[1]


# ---- authentication ------------------------------------------------------------------

def test_wrong_password_is_denied_like_mysql(proxy):
    with pytest.raises(pymysql.err.OperationalError) as e:
        proxy.connect(password="wrong", ssl_disabled=True)
    assert _err(e) == (1045, "Access denied for user 'app'@'127.0.0.1' (using password: YES)")


def test_unknown_user_and_empty_password_are_denied(proxy):
    with pytest.raises(pymysql.err.OperationalError) as e:
        proxy.connect(user="nobody", password="", ssl_disabled=True)
    assert _err(e) == (1045, "Access denied for user 'nobody'@'127.0.0.1' (using password: NO)")


def test_mariadb_cli_denied_message_and_sqlstate(proxy):
    r = subprocess.run(
        ["mariadb", "-h127.0.0.1", f"-P{proxy.port}", "-uapp", "-pnope", "--skip-ssl", "app", "-e", "SELECT 1"],
        capture_output=True, text=True, timeout=20,
    )
    assert r.returncode == 1
    assert "ERROR 1045 (28000): Access denied for user 'app'@'127.0.0.1' (using password: YES)" in r.stderr


def test_caching_sha2_full_auth_with_rsa_then_fast_path(proxy, tmp_path):
    # sha2user is configured for caching_sha2_password while the greeting offers
    # mysql_native_password, so PyMySQL first gets an auth switch. Without TLS the
    # first login must go through the RSA public-key exchange; later ones are fast.
    # A proxy of its own: its workers have not seen this user yet (the shared one may have).
    proxy = start_proxy(proxy.cluster, tmp_path)
    for _ in range(4):  # two workers: every worker sees at least one first login
        with proxy.connect(user=SHA2_USER, password=SHA2_PASSWORD, ssl_disabled=True) as c, c.cursor() as cur:
            cur.execute("SELECT CURRENT_USER()")
            assert cur.fetchone()[0] == f"{SHA2_USER}@%"
    log = open(proxy.process.log_path).read()
    assert f"user {SHA2_USER}: caching_sha2_password full authentication (RSA) succeeded" in log
    with pytest.raises(pymysql.err.OperationalError) as e:
        proxy.connect(user=SHA2_USER, password="bad", ssl_disabled=True)
    assert _err(e)[0] == 1045
    proxy.process.stop()


def test_caching_sha2_over_tls_with_mariadb_cli(proxy):
    r = subprocess.run(
        ["mariadb", "-h127.0.0.1", f"-P{proxy.port}", f"-u{SHA2_USER}", f"-p{SHA2_PASSWORD}", "--ssl",
         "--ssl-verify-server-cert=0", "--default-auth=caching_sha2_password", "app", "-e", "SELECT CURRENT_USER()"],
        capture_output=True, text=True, timeout=20,
    )
    assert r.returncode == 0, r.stderr
    assert f"{SHA2_USER}@%" in r.stdout


def test_tls_required_refuses_plain_clients(cluster, tmp_path):
    cert, key = self_signed_cert(str(tmp_path))
    p = start_proxy(cluster, tmp_path, proxy={"workers": 1, "tls": {"cert": cert, "key": key, "require": True}})
    try:
        with pytest.raises(pymysql.err.OperationalError) as e:
            pymysql.connect(host="127.0.0.1", port=p.port, user="app", password="app", ssl_disabled=True)
        assert _err(e)[0] == 3159
        with pymysql.connect(host="127.0.0.1", port=p.port, user="app", password="app", ssl_ca=cert) as c:
            assert c._sock.version().startswith("TLS")
            with c.cursor() as cur:
                cur.execute("SELECT 1")
                assert cur.fetchone() == (1,)
    finally:
        p.process.stop()


# ---- commands ------------------------------------------------------------------------

def test_unsupported_command_gets_error_and_session_survives(proxy):
    c = RawClient(proxy.host, proxy.port)
    try:
        p = c.command(b"\x0f")  # COM_TIME (the server does not support it either)
        assert p[0] == 0xFF and struct.unpack_from("<H", p, 1)[0] == 1047
        p = c.command(b"\x03SELECT 41 + 1")
        assert p[0] == 1  # one column: the session still works
    finally:
        c.close()


def test_unknown_statement_id_is_an_error(proxy):
    c = RawClient(proxy.host, proxy.port)
    try:
        p = c.command(b"\x17" + struct.pack("<IBI", 999, 0, 1))
        assert p[0] == 0xFF and struct.unpack_from("<H", p, 1)[0] == 1243
    finally:
        c.close()


@pytest.mark.parametrize("deprecate_eof", [True, False])
def test_cursor_fetch_through_proxy(proxy, deprecate_eof):
    c = RawClient(proxy.host, proxy.port, deprecate_eof=deprecate_eof)
    try:
        sid, ncols, _ = c.prepare("SELECT seq FROM seq_1_to_10")
        c.send(b"\x17" + struct.pack("<IBI", sid, 1, 1), 0)  # execute with a read-only cursor
        head = c.read_until_eof() if not deprecate_eof else None
        if deprecate_eof:  # column count, definitions, then EOF/OK with CURSOR_EXISTS
            head = [c.read()[1] for _ in range(2)] + c.read_until_eof()
        assert head[0][0] == 1
        rows = []
        for _ in range(4):
            c.send(b"\x1c" + struct.pack("<II", sid, 3), 0)  # COM_STMT_FETCH 3 rows
            packets = c.read_until_eof()
            rows += [p for p in packets if p[0] == 0x00]
            if packets[-1][0] == 0xFE and struct.unpack_from("<H", packets[-1], 3)[0] & 0x80:
                break
        assert len(rows) == 10
        assert [struct.unpack_from("<Q", r, 2)[0] for r in rows] == list(range(1, 11))
        c.send(b"\x19" + struct.pack("<I", sid), 0)  # close: no response
        assert c.command(b"\x03SELECT 1")[0] == 1
    finally:
        c.close()


def test_field_list(proxy, direct):
    with direct.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS fl (a INT, b VARCHAR(5))")
    via, dir_ = RawClient(proxy.host, proxy.port, deprecate_eof=False), RawClient("127.0.0.1", proxy.cluster.primary.port, deprecate_eof=False)
    try:
        got = [c.command(b"\x04fl\x00") and c.read_until_eof() for c in (via, dir_)]
        assert len(got[0]) == len(got[1]) == 2  # column b and the EOF (a was the first reply)
        assert got[0][0] == got[1][0]
    finally:
        via.close()
        dir_.close()


def test_malformed_handshake_gets_error_and_proxy_keeps_serving(proxy):
    s = socket.create_connection((proxy.host, proxy.port), timeout=5)
    s.recv(1024)  # greeting
    s.sendall(b"\x05\x00\x00\x01garbage")
    reply = s.recv(1024)
    assert reply[4] == 0xFF and struct.unpack_from("<H", reply, 5)[0] == 1043
    assert s.recv(1024) == b""  # and the connection is closed
    s.close()
    with proxy.connect() as c, c.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)


@pytest.mark.parametrize("payload", [b"\x11app", b"\x11app\x00", b"\x11app\x00\x14abc", b"\x11\xff\xfe"],
                         ids=["no-nul", "no-token", "short-token", "garbage"])
def test_malformed_change_user_gets_error_and_session_carries_on(proxy, payload):
    """Answered as MariaDB answers it (1047 Unknown command), not as an internal error; the session
    keeps its user and, as on the server (which resets the session before it reads the packet),
    loses its variables and gets the servers' default character set."""
    answers = []
    for port in (proxy.port, proxy.cluster.primary.port):
        c = RawClient(proxy.host, port)
        try:
            assert c.command(b"\x03SET @keep = 7")[0] == 0
            assert c.command(b"\x03SET NAMES latin1")[0] == 0
            reply = c.command(payload)
            assert reply[0] == 0xFF and struct.unpack_from("<H", reply, 1)[0] == 1047, reply
            assert reply[4:9] == b"08S01"
            c.send(b"\x03SELECT CURRENT_USER(), @keep, @@character_set_client", 0)
            answers.append(c.read_until_eof()[-2])
        finally:
            c.close()
    assert answers[0] == answers[1] == b"\x05app@%\xfb\x07utf8mb4"


def test_set_option_turns_multi_statements_on_and_off(proxy):
    import MySQLdb

    c = MySQLdb.connect(host=proxy.host, port=proxy.port, user="app", password="app", database="app",
                        multi_statements=False)
    try:
        cur = c.cursor()
        with pytest.raises(MySQLdb.ProgrammingError):
            cur.execute("SELECT 1; SELECT 2")  # multi-statements are off for this client
        c.set_server_option(0)  # MYSQL_OPTION_MULTI_STATEMENTS_ON
        cur.execute("SELECT 1; SELECT 2")
        assert cur.fetchall() == ((1,),)
        assert cur.nextset() and cur.fetchall() == ((2,),)
        cur.close()
        c.set_server_option(1)  # OFF again
        cur = c.cursor()
        with pytest.raises(MySQLdb.ProgrammingError):
            cur.execute("SELECT 1; SELECT 2")
    finally:
        c.close()


def test_ping_and_init_db(proxy):
    with proxy.connect() as c, c.cursor() as cur:
        c.ping()
        c.select_db("information_schema")
        cur.execute("SELECT DATABASE()")
        assert cur.fetchone() == ("information_schema",)
        with pytest.raises(pymysql.err.OperationalError) as e:
            c.select_db("no_such_db")
        assert _err(e)[0] in (1044, 1049)


# ---- streaming and faults --------------------------------------------------------------

def test_slow_client_reading_big_result_is_not_buffered(proxy):
    """A 100 MB result to a client that stops reading must not pile up in the proxy."""
    before = proxy.process.rss_kib()
    c = proxy.connect(cursorclass=pymysql.cursors.SSCursor)
    try:
        cur = c.cursor()
        cur.execute("SELECT seq, REPEAT('x', 1000) FROM seq_1_to_100000")
        assert cur.fetchone()[0] == 1
        time.sleep(2.0)  # the client stalls; the backend keeps trying to send
        grown_mib = (proxy.process.rss_kib() - before) / 1024
        n = 1 + sum(1 for _ in cur)
        assert n == 100000
        assert grown_mib < 40, f"proxy RSS grew by {grown_mib:.0f} MiB while the client stalled"
    finally:
        c.close()


CLIENT_SCRIPT = textwrap.dedent(
    """
    import pymysql, sys, time
    c = pymysql.connect(host="127.0.0.1", port=int(sys.argv[1]), user="app", password="app", database="app",
                        cursorclass=pymysql.cursors.SSCursor)
    cur = c.cursor()
    cur.execute("SELECT /* killed-client */ seq, REPEAT('y', 2000) FROM seq_1_to_200000")
    cur.fetchone()
    print("reading", flush=True)
    time.sleep(60)
    """
)


def _backend_sessions(cluster, marker: str) -> int:
    with cluster.primary.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE %s AND INFO NOT LIKE '%%PROCESSLIST%%'", (f"%{marker}%",))
        return cur.fetchone()[0]


def test_client_killed_mid_result(proxy, cluster):
    p = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, str(proxy.port)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "reading"
        assert _backend_sessions(cluster, "killed-client") == 1
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        deadline = time.monotonic() + 10
        while _backend_sessions(cluster, "killed-client") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _backend_sessions(cluster, "killed-client") == 0, "the backend query outlived its client"
        with proxy.connect() as c, c.cursor() as cur:
            cur.execute("SELECT 2")
            assert cur.fetchone() == (2,)
    finally:
        if p.poll() is None:
            p.kill()


def test_backend_killed_mid_query(cluster_factory, tmp_path):
    cl = cluster_factory(replicas=0)
    p = start_proxy(cl, tmp_path, proxy={"workers": 1})
    try:
        victim = p.connect()
        bystander = p.connect()
        result = {}

        def run():
            t0 = time.monotonic()
            try:
                with victim.cursor() as cur:
                    cur.execute("SELECT SLEEP(20)")
                result["ok"] = True
            except pymysql.err.MySQLError as e:
                result["error"] = e.args
            result["seconds"] = time.monotonic() - t0

        t = threading.Thread(target=run)
        t.start()
        time.sleep(0.5)
        cl.primary.kill(signal.SIGKILL)
        t.join(15)
        assert not t.is_alive()
        assert result.get("error", (None,))[0] == 1927, result  # not 2013: see wire_code
        assert "Lost connection to backend server node1" in result["error"][1]  # not SLEEP's end
        # The proxy process is alive and answers everyone with clear errors meanwhile.
        assert p.process.proc.poll() is None
        with pytest.raises(pymysql.err.MySQLError) as e:
            with bystander.cursor() as cur:
                cur.execute("SELECT 1")
        assert e.value.args[0] in (9001, 1927, 2013)  # 2013 only if PyMySQL saw the socket close first
        cl.up()
        with p.connect() as c, c.cursor() as cur:
            cur.execute("SELECT 3")
            assert cur.fetchone() == (3,)
    finally:
        p.process.stop()


def test_too_many_connections(cluster, tmp_path):
    p = start_proxy(cluster, tmp_path, proxy={"workers": 1, "max_connections": 2})
    try:
        held = [p.connect(), p.connect()]
        with pytest.raises(pymysql.err.OperationalError) as e:
            p.connect()
        assert _err(e) == (1040, "Too many connections")
        held[0].close()
        time.sleep(0.3)
        with p.connect() as c, c.cursor() as cur:
            cur.execute("SELECT 1")
        held[1].close()
    finally:
        p.process.stop()


def test_max_allowed_packet_refuses_bigger_packets_like_the_server(cluster, tmp_path):
    """A packet over proxy.max_allowed_packet gets 1153 and a closed connection (rwproxy holds
    a packet whole, so this is its memory bound per client); one under it, split or not, goes
    through; other sessions do not notice."""
    p = start_proxy(cluster, tmp_path, proxy={"workers": 1, "max_allowed_packet": 4 << 20})
    try:
        bystander = p.connect()
        with p.connect() as c, c.cursor() as cur:
            cur.execute("SELECT LENGTH(%s)", ("x" * (3 << 20),))
            assert cur.fetchone() == (3 << 20,)
        c = RawClient(p.host, p.port)
        c.sock.sendall(frame(b"\x03SELECT '" + b"y" * (5 << 20) + b"'", 0))
        reply = c.read()[1]
        assert reply[0] == 0xFF and struct.unpack_from("<H", reply, 1)[0] == 1153, reply[:80]
        assert b"max_allowed_packet" in reply
        with pytest.raises(ConnectionError):
            c.read()  # and the connection is closed
        c.sock.close()
        c = RawClient(p.host, p.port)  # a split packet (over 16 MiB) is counted whole
        c.sock.sendall(b"\xff\xff\xff\x00\x03" + b"z" * (MAX_PACKET - 1))
        reply = c.read()[1]
        assert reply[0] == 0xFF and struct.unpack_from("<H", reply, 1)[0] == 1153
        c.sock.close()
        with bystander.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
        bystander.close()
    finally:
        p.process.stop()


def test_pipelined_commands_beyond_max_allowed_packet_all_answered(cluster, tmp_path):
    """Commands a client sends without waiting pile up while one runs: rwproxy stops reading
    past max_allowed_packet (bounded memory) and resumes as it works them off; all are answered,
    in order."""
    p = start_proxy(cluster, tmp_path, proxy={"workers": 1, "max_allowed_packet": 64 << 10})
    c = RawClient(p.host, p.port)
    try:
        n, pad = 300, b"-" * 2000  # ~600 KB of commands, ten times the limit
        c.sock.sendall(b"".join(frame(b"\x03SELECT %d /* %s */" % (i, pad), 0) for i in range(n)))
        for i in range(n):
            rows = c.read_until_eof()
            assert rows[-2] == b"%c%d" % (len(str(i)), i), (i, rows)
    finally:
        c.close()
        p.process.stop()


def test_busy_port_is_reported_clearly(cluster, tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port = s.getsockname()[1]
    try:
        cfg = tmp_path / "busy.toml"
        cfg.write_text(f'[proxy]\nlisten = "127.0.0.1:{port}"\n[[backends]]\nhost = "127.0.0.1"\nport = {cluster.primary.port}\n[[users]]\nname = "app"\npassword = "app"\n')
        r = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 1
        assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in r.stderr
        assert "Traceback" not in r.stderr
    finally:
        s.close()


def test_unreachable_backend_gives_client_a_clear_error(cluster, tmp_path):
    port = free_port()
    dead = free_port()
    cfg = tmp_path / "dead.toml"
    cfg.write_text(f'[proxy]\nlisten = "127.0.0.1:{port}"\nworkers = 1\n[[backends]]\nname = "gone"\nhost = "127.0.0.1"\nport = {dead}\n[[users]]\nname = "app"\npassword = "app"\n')
    with ProxyProcess(str(cfg), "127.0.0.1", port) as proc:
        with pytest.raises(pymysql.err.OperationalError) as e:
            pymysql.connect(host="127.0.0.1", port=port, user="app", password="app", connect_timeout=10)
        code, msg = _err(e)
        assert code == 9001 and f"Can't connect to backend gone (127.0.0.1:{dead})" in msg
        # libmariadb clients get the message too: a 2xxx code would show as "2027 Received malformed packet"
        cli = subprocess.run(["mariadb", "--no-defaults", "-h127.0.0.1", f"-P{port}", "-uapp", "-papp", "-e", "SELECT 1"],
                             capture_output=True, text=True, timeout=30)
        assert cli.returncode == 1
        assert f"ERROR 9001 (HY000): Can't connect to backend gone (127.0.0.1:{dead})" in cli.stderr, cli.stderr
        with pytest.raises(MySQLdb.OperationalError) as e:
            MySQLdb.connect(host="127.0.0.1", port=port, user="app", passwd="app", connect_timeout=10)
        assert e.value.args[0] == 9001 and "Can't connect to backend gone" in e.value.args[1]
        assert proc.proc.poll() is None


def test_connector_prepared_statements_map_ids(proxy):
    c = mysql.connector.connect(host=proxy.host, port=proxy.port, user="app", password="app", database="app")
    try:
        curs = [c.cursor(prepared=True) for _ in range(3)]
        for i, cur in enumerate(curs):
            cur.execute(f"SELECT ? + {i}", (10,))
            assert cur.fetchall() == [(10 + i,)]
        for cur in curs:
            cur.close()
    finally:
        c.close()


@pytest.mark.parametrize("how", ["init_db", "use"])
def test_pooled_connection_comes_back_with_the_clients_database(proxy, how):
    """A backend connection whose database a client changed must not leak it to the next client."""
    for _ in range(6):  # enough reconnects to reuse pooled connections in both workers
        with proxy.connect() as c, c.cursor() as cur:
            if how == "init_db":
                c.select_db("information_schema")
            else:
                cur.execute("USE information_schema")
        time.sleep(0.05)
        with proxy.connect() as c, c.cursor() as cur:
            cur.execute("SELECT DATABASE()")
            assert cur.fetchone() == ("app",)


def _keep_talking(conn, seconds: float) -> None:
    """Ping every 0.3 s for `seconds`: a client that is never idle for long."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        conn.ping(reconnect=False)
        time.sleep(0.3)


def _assert_gone(conn) -> None:
    """The proxy closed `conn`: its next statement finds the connection gone, as after a server's
    wait_timeout."""
    with pytest.raises(pymysql.err.OperationalError) as e:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
    assert e.value.args[0] in (2006, 2013)  # server has gone away / lost connection


def test_client_idle_timeout_closes_idle_sessions_like_wait_timeout(cluster, tmp_path):
    """[proxy] client_idle_timeout: a client idle that long finds its connection gone at its next
    statement, as with a server's wait_timeout; a client that keeps talking is not touched."""
    p = start_proxy(cluster, tmp_path / "idle", proxy={"workers": 1, "client_idle_timeout": 1.0})
    try:
        idle, busy = p.connect(), p.connect()
        _keep_talking(busy, 3.5)  # ~3 sweeps of the worker's housekeeping
        with busy.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
        _assert_gone(idle)
        assert "idle for" in p.process.log_tail(50) and "client_idle_timeout" in p.process.log_tail(50)
    finally:
        p.process.stop()


def test_a_sessions_own_wait_timeout_closes_it_when_idle_that_long(cluster, tmp_path):
    """SET SESSION wait_timeout = N: the client connection closes after N idle seconds, as the
    server would close it (PyMySQL's own test suite checks this); the server still reports the
    value; talking resets the clock; DEFAULT goes back to client_idle_timeout; another session
    is not affected. Without the proxy's own clock the backend connection would time out and be
    reopened silently, and the client would never notice."""
    p = start_proxy(cluster, tmp_path / "wait", proxy={"workers": 1})
    try:
        short, chatty, reset, other = (p.connect() for _ in range(4))
        for c in (short, chatty, reset):
            with c.cursor() as cur:
                cur.execute("SET SESSION wait_timeout = 1")
        with short.cursor() as cur:
            cur.execute("SELECT @@wait_timeout")
            assert cur.fetchone() == (1,)
        with reset.cursor() as cur:
            cur.execute("SET @@wait_timeout = DEFAULT")
        _keep_talking(chatty, 2.5)
        for c in (chatty, reset, other):
            with c.cursor() as cur:
                cur.execute("SELECT 1")
                assert cur.fetchone() == (1,)
        _assert_gone(short)
        assert "its wait_timeout 1 s" in p.process.log_tail(50)
    finally:
        p.process.stop()
