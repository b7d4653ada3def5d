"""Issue 21: the admin SQL port (mysql-mimic), against real servers and real clients."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import time

import pymysql
import pytest

from helpers import start_proxy
from proxy.protocol import auth
from proxy.protocol.constants import PROXY_CAPABILITIES
from proxy.protocol.handshake import build_response, parse_greeting
from proxy.protocol.packets import frame
from proxy.runtime.launcher import free_port

ADMIN_PW, STATS_PW, HASHED_PW = "adm1n-pw", "st4ts-pw", "h4shed-pw"


def native_hash(pw: str) -> str:
    return "*" + hashlib.sha1(hashlib.sha1(pw.encode()).digest()).hexdigest().upper()


@pytest.fixture(scope="module")
def admin_proxy(cluster, tmp_path_factory):
    port = free_port()
    p = start_proxy(cluster, tmp_path_factory.mktemp("admin"), admin={
        "listen": f"127.0.0.1:{port}", "query_timeout": 1.0, "max_rows": 5000,
        "users": [{"name": "admin", "password": ADMIN_PW}, {"name": "watcher", "password": STATS_PW, "role": "stats"},
                  {"name": "hashed", "password": native_hash(HASHED_PW)}]})
    p.admin_port = port
    try:
        yield p
    finally:
        p.process.stop()


def admin(p, user="admin", password=ADMIN_PW, **kw):
    return pymysql.connect(host="127.0.0.1", port=p.admin_port, user=user, password=password, **kw)


def q(conn, sql):
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()


# ---- the two holes of mysql-mimic 3.0.5, and its other soft spots ------------------------------

def _raw_login(port, user, password):
    """Greeting, then a login; returns (socket, the first reply packet's payload)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:3], "little"):
        buf += s.recv(65536)
    n = int.from_bytes(buf[:3], "little")
    greeting = parse_greeting(buf[4:4 + n])
    token = auth.native_token(password, greeting.salt)
    s.sendall(frame(build_response(PROXY_CAPABILITIES & ~(1 << 20), 45, user, token, None, auth.NATIVE), 1))
    reply = b""
    while len(reply) < 4 or len(reply) < 4 + int.from_bytes(reply[:3], "little"):
        chunk = s.recv(65536)
        if not chunk:
            break
        reply += chunk
    return s, reply[4:]


_bufs: dict = {}


def _packet(s) -> bytes:
    """The next packet's payload on socket `s` (what a recv brought beyond it is kept for the next)."""
    buf = _bufs.get(s, b"")
    while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:3], "little"):
        chunk = s.recv(65536)
        assert chunk, "closed"
        buf += chunk
    n = int.from_bytes(buf[:3], "little")
    _bufs[s] = buf[4 + n:]
    return buf[4:4 + n]


def _rest(s) -> bytes:
    """Everything the server still sends until it closes (b"" if it closed at once)."""
    s.settimeout(3)
    out = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk
    except socket.timeout:
        return out + b"<still open>"
    except ConnectionResetError:
        return out


@pytest.mark.parametrize("user, password", [("admin", "wrong"), ("nobody", ADMIN_PW), ("hashed", "*x")])
def test_a_failed_login_closes_the_connection_before_any_query_runs(admin_proxy, user, password):
    """mysql-mimic writes "Access denied" and starts the command phase anyway; a raw client that
    ignores the error must get nothing for the query it sends next."""
    s, reply = _raw_login(admin_proxy.admin_port, user, password)
    assert reply[:1] == b"\xff" and struct.unpack_from("<H", reply, 1)[0] == 1045
    try:
        s.sendall(frame(b"\x03SELECT name, password FROM users", 0))
    except OSError:
        pass  # closed already: nothing can come back
    assert _rest(s) == b""
    s.close()


def test_a_failed_change_user_closes_the_connection(admin_proxy):
    s, reply = _raw_login(admin_proxy.admin_port, "admin", ADMIN_PW)
    assert reply[:1] == b"\x00"
    token = b"\x01" * 20  # not the answer to any scramble
    s.sendall(frame(b"\x11watcher\x00" + bytes([len(token)]) + token + b"\x00" + struct.pack("<H", 45)
                    + b"mysql_native_password\x00", 0))
    first = s.recv(65536)
    assert first[4:5] == b"\xff"  # access denied ...
    try:
        s.sendall(frame(b"\x03SELECT COUNT(*) FROM users", 0))
    except OSError:
        pass
    assert _rest(s) == b""  # ... and the connection ends (it does not stay logged in as admin)
    s.close()


def test_prepared_statements_are_refused_and_never_substituted(admin_proxy):
    """mysql-mimic pastes COM_STMT_EXECUTE parameters into SQL unescaped: every prepared-statement
    command is refused, and an execute of a statement id that a naive server would accept runs
    nothing."""
    s, reply = _raw_login(admin_proxy.admin_port, "admin", ADMIN_PW)
    assert reply[:1] == b"\x00"

    def cmd(payload):
        s.sendall(frame(payload, 0))
        data = s.recv(65536)
        return data[4:4 + int.from_bytes(data[:3], "little")]

    err = cmd(b"\x16SELECT name FROM users WHERE name = ?")
    assert err[:1] == b"\xff" and struct.unpack_from("<H", err, 1)[0] == 1295
    inj = b"x' OR '1'='1"
    execute = (b"\x17" + struct.pack("<IBI", 1, 0, 1) + b"\x00" + b"\x01" + b"\xfe\x00"
               + bytes([len(inj)]) + inj)
    err = cmd(execute)
    assert err[:1] == b"\xff" and struct.unpack_from("<H", err, 1)[0] == 1295
    # the connection is still usable, with text queries
    reply = cmd(b"\x03SELECT 1")
    assert reply[:1] != b"\xff"
    s.close()


def test_oversized_packets_and_silent_clients_are_cut_off(admin_proxy):
    s = socket.create_connection(("127.0.0.1", admin_proxy.admin_port), timeout=5)
    s.recv(65536)  # greeting
    s.sendall(b"\xff\xff\xff\x01" + b"x" * 65536)  # a 16 MiB packet announced before login
    assert _rest(s) == b""  # closed without reading the rest (no error packet, no OOM)
    s.close()
    silent = socket.create_connection(("127.0.0.1", admin_proxy.admin_port), timeout=15)
    silent.recv(65536)
    assert _rest(silent) in (b"", b"<still open>")
    silent.settimeout(15)
    assert silent.recv(100) == b""  # closed by the 10 s login timeout (a timeout here raises)
    silent.close()


def test_packets_that_would_hang_mysql_mimic_are_refused(admin_proxy):
    """mysql-mimic's compiled reader of NUL-terminated strings loops forever at a packet's end:
    an unterminated user name in a login, or a one-byte COM_FIELD_LIST, would stop the port."""
    for login in (struct.pack("<II", 0xFFFFFFFF, 1 << 24) + b"\x21" + bytes(23) + b"admin",  # no NUL, no password yet
                  struct.pack("<II", PROXY_CAPABILITIES, 1 << 24) + b"\x21" + bytes(23) + b"admin\0\x00mysql_nat",
                  b"\x01\x02"):
        s = socket.create_connection(("127.0.0.1", admin_proxy.admin_port), timeout=5)
        s.recv(65536)
        s.sendall(frame(login, 1))
        reply = _rest(s)
        assert b"<still open>" not in reply and b"Bad handshake" in reply, reply
        s.close()
    c = admin(admin_proxy)
    s, reply = _raw_login(admin_proxy.admin_port, "admin", ADMIN_PW)
    assert reply[0] == 0
    s.sendall(frame(b"\x04", 0))  # COM_FIELD_LIST without its table name
    got = s.recv(65536)
    assert got[4] == 0xFF and struct.unpack("<H", got[5:7])[0] == 1835, got
    s.sendall(frame(b"\x03SELECT '\xe9'", 0))  # not UTF-8
    got = s.recv(65536)
    assert struct.unpack("<H", got[5:7])[0] == 1300 and b"Invalid utf8mb4 character string" in got, got
    s.close()
    assert q(c, "SELECT COUNT(*) FROM servers")[0][0] == 3  # and everyone else is still served


def test_bad_text_and_unknown_character_sets_get_the_servers_answers_not_pythons(admin_proxy):
    """mysql-mimic answered these with 1105 and Python's words ("'utf-8' codec can't decode...",
    "0 is not a valid Collation", SQLite's "the query contains a null character"), or refused the
    login (an adversarial probe's finding). A server takes an unknown character set number as its
    default one, and answers text that is not UTF-8 with 1300."""
    for charset in (0, 250):  # a login with a character set mysql-mimic does not know
        s = socket.create_connection(("127.0.0.1", admin_proxy.admin_port), timeout=5)
        salt = parse_greeting(_packet(s)).salt
        s.sendall(frame(build_response(PROXY_CAPABILITIES & ~(1 << 20), charset, "admin",
                                       auth.native_token(ADMIN_PW, salt), None, "mysql_native_password"), 1))
        assert _packet(s)[0] == 0, charset
        s.close()
    s, reply = _raw_login(admin_proxy.admin_port, "admin", ADMIN_PW)
    assert reply[0] == 0
    answers = []
    for payload in (b"\x02\xff\xfe", b"\x04servers\x00\x00\x00", b"\x03a", b"\x11admin\x00\x00\x00" + bytes(8)):
        s.sendall(frame(payload, 0))
        got = _packet(s)
        while payload[0] == 4 and got[0] not in (0xFE, 0xFF):  # a field list's columns, to its end
            got = _packet(s)
        answers.append(struct.unpack("<H", got[1:3])[0] if got[0] == 0xFF else got[0])
    s.close()
    assert answers[:3] == [1300, 0xFE, 1064], answers  # (a field list ends with an EOF)
    assert answers[3] != 1105, answers  # the change_user: authentication, not Python's enum error
    assert q(admin(admin_proxy), "SELECT COUNT(*) FROM servers")[0][0] == 3


def test_field_list_sends_a_packet_per_column_and_1146_for_an_unknown_table(admin_proxy):
    """COM_FIELD_LIST (the mariadb CLI's name completion): mysql-mimic 3.0.5 joined every column
    definition into one packet, so a client saw the first column only, and answered an unknown
    table with an empty packet where a definition belongs."""
    columns = [r[0] for r in q(admin(admin_proxy), "SHOW COLUMNS FROM servers")]
    assert len(columns) > 3
    s, reply = _raw_login(admin_proxy.admin_port, "admin", ADMIN_PW)
    assert reply[0] == 0
    s.sendall(frame(b"\x04servers\x00", 0))
    names = []
    while True:
        p = _packet(s)
        if p[0] in (0xFE, 0xFF) and len(p) < 9:
            break
        pos, fields = 0, []
        for _ in range(6):  # catalog, schema, table, original table, name, original name
            n = p[pos]
            fields.append(p[pos + 1:pos + 1 + n])
            pos += 1 + n
        names.append(fields[4].decode())
    assert p[0] == 0xFE and names == columns
    s.sendall(frame(b"\x04nosuch\x00", 0))
    p = _packet(s)
    assert p[0] == 0xFF and struct.unpack("<H", p[1:3])[0] == 1146, p
    s.close()


def test_seeded_garbage_before_and_after_login_never_stops_the_port(admin_proxy):
    import random

    rnd = random.Random(int(os.environ.get("RWPROXY_FUZZ_SEED", "21")))
    for i in range(120):
        if i % 2:
            s = socket.create_connection(("127.0.0.1", admin_proxy.admin_port), timeout=5)
            s.recv(65536)
            s.sendall(frame(struct.pack("<II", rnd.getrandbits(32), rnd.getrandbits(32)) + bytes([rnd.randrange(256)])
                            + bytes(23) + rnd.randbytes(rnd.randint(0, 60)), 1))
        else:
            s, reply = _raw_login(admin_proxy.admin_port, "admin", ADMIN_PW)
            assert reply[0] == 0
            s.sendall(frame(bytes([rnd.choice([2, 3, 4, 9, 0x0d, 0x0e, 0x11, 0x16, 0x17, 0x1a, 0x1f, 0xff])])
                            + rnd.randbytes(rnd.randint(0, 40)), 0))
        s.settimeout(5)
        try:
            s.recv(65536)  # an answer (or the connection closed), never silence
        except ConnectionResetError:
            pass
        s.close()
    assert q(admin(admin_proxy), "SELECT COUNT(*) FROM servers")[0][0] == 3
    assert "Traceback" not in admin_proxy.process.log_tail(400)


def test_admin_limits_are_the_configured_ones(admin_proxy, cluster, tmp_path):
    c = admin(admin_proxy)  # the fixture: max_rows = 5000, query_timeout = 1 s
    assert len(q(c, "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5000) SELECT n FROM r")) == 5000
    with pytest.raises(pymysql.err.MySQLError) as e:
        q(c, "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5001) SELECT n FROM r")
    assert e.value.args[0] == 1104 and "max_rows" in e.value.args[1]
    with pytest.raises(pymysql.err.MySQLError) as e:
        q(c, "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT COUNT(*) FROM r")
    assert e.value.args[0] == 1969 and "query_timeout of 1 s" in e.value.args[1]
    port = free_port()
    p = start_proxy(cluster, tmp_path, admin={"listen": f"127.0.0.1:{port}", "max_connections": 2,
                                              "users": [{"name": "admin", "password": ADMIN_PW}]})
    try:
        held = [pymysql.connect(host="127.0.0.1", port=port, user="admin", password=ADMIN_PW) for _ in range(2)]
        with pytest.raises(pymysql.err.OperationalError) as e:
            pymysql.connect(host="127.0.0.1", port=port, user="admin", password=ADMIN_PW)
        assert e.value.args[0] == 1040
        held.pop().close()
        wait_until = time.monotonic() + 10
        while True:  # the slot comes back once the server has seen the close
            try:
                pymysql.connect(host="127.0.0.1", port=port, user="admin", password=ADMIN_PW).close()
                break
            except pymysql.err.OperationalError:
                assert time.monotonic() < wait_until
                time.sleep(0.1)
    finally:
        p.process.stop()


def test_no_default_password_and_loopback_by_default(cluster, tmp_path):
    from proxy.config.load import ConfigError, parse_config

    base = (f"[[backends]]\nhost = '127.0.0.1'\nport = {cluster.primary.port}\n"
            "[[users]]\nname = 'app'\npassword = 'app'\n")
    with pytest.raises(ConfigError, match="admin.users: the admin port needs at least one"):
        parse_config(base + "[admin]\nlisten = '127.0.0.1:7032'\n")
    with pytest.raises(ConfigError, match=r"admin.users\[0\].password: required"):
        parse_config(base + "[[admin.users]]\nname = 'admin'\n")
    cfg = parse_config(base + "[[admin.users]]\nname = 'admin'\npassword = 'x'\n")
    assert cfg.admin.host == "127.0.0.1" and cfg.admin.port == 6032
    assert not parse_config(base).admin.enabled  # off unless configured


# ---- roles, tables, commands -------------------------------------------------------------------

def test_stats_role_reads_but_cannot_change_anything(admin_proxy):
    c = admin(admin_proxy, "watcher", STATS_PW)
    assert q(c, "SELECT COUNT(*) FROM servers")[0][0] == 3
    for sql in ("SET SERVER 'node2' OFFLINE", "RESET STATS", "RELOAD CONFIG", "KILL SESSION 1", "ENABLE FAILOVER"):
        with pytest.raises(pymysql.err.OperationalError) as e:
            q(c, sql)
        assert e.value.args[0] == 1227, sql
    with pytest.raises(pymysql.err.MySQLError) as e:
        q(c, "DELETE FROM digests")
    assert e.value.args[0] == 1290


def test_hashed_admin_password_and_the_mariadb_cli(admin_proxy):
    out = subprocess.run(["mariadb", "-h127.0.0.1", f"-P{admin_proxy.admin_port}", "-uhashed", f"-p{HASHED_PW}",
                          "-N", "-e", "SELECT name FROM servers ORDER BY name"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["node1", "node2", "node3"]


def test_other_client_libraries_connect(admin_proxy):
    import MySQLdb
    import mysql.connector

    m = MySQLdb.connect(host="127.0.0.1", port=admin_proxy.admin_port, user="admin", passwd=ADMIN_PW)
    cur = m.cursor()
    cur.execute("SELECT name FROM servers WHERE role = 'primary'")
    assert cur.fetchall() == (("node1",),)
    m.close()
    c = mysql.connector.connect(host="127.0.0.1", port=admin_proxy.admin_port, user="admin", password=ADMIN_PW)
    cur = c.cursor()
    cur.execute("SELECT COUNT(*) FROM servers")
    assert cur.fetchall()[0][0] == 3
    c.close()
    # Connector/Python compresses when asked even though the port does not offer it: refused at
    # login with the reason, instead of a client waiting forever for compressed answers
    with pytest.raises(mysql.connector.Error) as e:
        mysql.connector.connect(host="127.0.0.1", port=admin_proxy.admin_port, user="admin", password=ADMIN_PW,
                                compress=True, use_pure=True, connection_timeout=5, read_timeout=10)
    assert e.value.errno == 1043 and "compressed protocol" in e.value.msg
    # clients that ask only when offered (libmariadb, mysqlclient) go on uncompressed
    m = MySQLdb.connect(host="127.0.0.1", port=admin_proxy.admin_port, user="admin", passwd=ADMIN_PW, compress=1)
    cur = m.cursor()
    cur.execute("SELECT COUNT(*) FROM servers")
    assert cur.fetchall() == ((3,),)
    m.close()


def test_digests_find_the_slowest_statement(admin_proxy):
    app = admin_proxy.connect(autocommit=True)
    with app.cursor() as cur:
        for i in range(20):
            cur.execute("SELECT %s + 1 AS adminquick", (i,))
        cur.execute("SELECT SLEEP(0.3) AS adminslow")
    with pytest.raises(pymysql.err.ProgrammingError):
        with app.cursor() as cur:
            cur.execute("SELECT * FROM no_such_table_admin")
    c = admin(admin_proxy)
    rows = q(c, "SELECT digest_text, count, max_ms, p99_ms, rows_sent, route, user, db FROM digests "
                "WHERE digest_text LIKE '%admin%' ORDER BY max_ms DESC")
    assert rows[0][0] == "SELECT SLEEP(?) AS adminslow" and rows[0][2] >= 290 and rows[0][3] >= 290
    quick = [r for r in rows if r[0] == "SELECT ? + ? AS adminquick"]
    assert quick and quick[0][1] == 20 and quick[0][4] == 20 and quick[0][5] == "read"
    assert quick[0][6:] == ("app", "app")
    err = q(c, "SELECT errors FROM digests WHERE digest_text LIKE '%no_such_table_admin%'")
    assert err == ((1,),)
    # GROUP BY and a join between tables
    by_route = dict(q(c, "SELECT route, SUM(count) FROM digests GROUP BY route"))
    assert by_route.get("read", 0) >= 21
    joined = q(c, "SELECT s.name, s.role, SUM(p.queries) FROM servers s JOIN pools p ON p.server = s.name "
                  "GROUP BY s.name, s.role ORDER BY s.name")
    assert [r[0] for r in joined] and all(r[2] >= 0 for r in joined)
    app.close()


def test_sessions_show_what_pins_them(admin_proxy):
    app = admin_proxy.connect(autocommit=True)
    with app.cursor() as cur:
        cur.execute("CREATE TEMPORARY TABLE admin_tmp (a INT)")
        cur.execute("SELECT CONNECTION_ID()")
    c = admin(admin_proxy)
    rows = q(c, "SELECT id, user, state, pinned, ties, servers FROM sessions WHERE pinned <> ''")
    assert any(r[1] == "app" and r[3] == "temporary table" and "node1" in r[5] for r in rows), rows
    sid = app.thread_id()
    assert q(c, f"SELECT COUNT(*) FROM sessions WHERE id = {sid}")[0][0] == 1
    with c.cursor() as cur:
        cur.execute(f"KILL SESSION {sid}")
        assert "closed" in cur.fetchall()[0][1]
    with pytest.raises(pymysql.err.OperationalError):
        with app.cursor() as cur:
            cur.execute("SELECT 1")
    with pytest.raises(pymysql.err.OperationalError) as e:
        q(c, "KILL SESSION 99999999")
    assert e.value.args[0] == 1094


def test_offline_drains_a_replica_and_online_brings_it_back(admin_proxy, cluster):
    c = admin(admin_proxy)
    app = admin_proxy.connect(autocommit=True)

    def answering(n=40):
        seen = set()
        with app.cursor() as cur:
            for _ in range(n):
                cur.execute("SELECT @@port")
                seen.add(cur.fetchone()[0])
        return seen

    node2 = cluster.nodes[1].port
    deadline = time.monotonic() + 10
    while node2 not in answering() and time.monotonic() < deadline:
        pass
    assert node2 in answering(80)
    msg = q(c, "SET SERVER 'node2' OFFLINE")[0][1]
    assert "OFFLINE" in msg
    time.sleep(0.5)  # the next snapshot reaches the workers
    assert node2 not in answering(80)
    assert q(c, "SELECT admin_state, in_read_pool FROM servers WHERE name = 'node2'") == (("offline", 0),)
    with pytest.raises(pymysql.err.OperationalError) as e:
        q(c, "SET SERVER 'node1' MAINTENANCE")
    assert "SWITCHOVER" in e.value.args[1]
    q(c, "SET SERVER 'node2' ONLINE")
    deadline = time.monotonic() + 10
    while node2 not in answering() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert node2 in answering(80)
    events = [r[0] for r in q(c, "SELECT message FROM events ORDER BY id")]
    assert any("node2 set OFFLINE" in m for m in events) and any("node2 set ONLINE" in m for m in events)
    app.close()


def test_reset_stats_and_rule_hits(admin_proxy):
    c = admin(admin_proxy)
    assert q(c, "SELECT COUNT(*) FROM digests")[0][0] > 0
    q(c, "RESET STATS")
    assert q(c, "SELECT COUNT(*) FROM digests")[0][0] == 0
    assert q(c, "SELECT COUNT(*) FROM rules")[0][0] == 0


def test_users_and_config_never_show_secrets(admin_proxy):
    c = admin(admin_proxy)
    users = q(c, "SELECT name, password FROM users")
    assert dict(users) == {"app": "set", "sha2user": "set"}
    text = json.dumps(q(c, "SELECT * FROM config"), default=str)
    for secret in (ADMIN_PW, STATS_PW, native_hash(HASHED_PW), "s3cret-sha2"):
        assert secret not in text, secret
    pw = dict((r[0], r[1]) for r in q(c, "SELECT variable_name, variable_value FROM config WHERE variable_name LIKE '%password%'"))
    assert pw["monitor.password"] == "set" and pw["admin.users[2].password"] == "hashed (mysql_native_password)"


# ---- hostile SQL stays harmless -------------------------------------------------------------------

@pytest.mark.parametrize("sql, code", [
    ("ATTACH DATABASE '/tmp/x.db' AS x", 1064),
    ("PRAGMA table_info(servers)", 1290),
    ("SELECT * FROM mysql.user", 1049),
    ("SELECT * FROM nosuch", 1146),
    ("SELECT load_extension('/tmp/x')", 1290),
    ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT COUNT(*) FROM r", 1969),
    ("SELECT REPEAT('x', 2000000000)", 1305),
    ("SELECT zeroblob(1000000000)", 1104),
    ("SELECT * FROM digests, digests d2, digests d3, digests d4", None),
    ("CREATE TABLE t (a INT)", 1290),
    ("SELECT (((((((((((((((((((((((((((((((1)))))))))))))))))))))))))))))))", None),
    # markers SQLite would take for bound parameters: the server's errors, not SQLite's binding message
    ("SELECT @x", 1235),
    ("SELECT name FROM servers WHERE name = @x", 1235),
    ("SELECT ?", 1064),
    ("SELECT name FROM servers WHERE name = :a", 1064),
    # several statements in one query: refused as a server without CLIENT_MULTI_STATEMENTS does
    # (mysql-mimic ran each and answered with the last result only)
    ("SELECT COUNT(*) FROM sessions; SELECT 2", 1064),
    # a command with a bad argument: the command's error, not sqlglot's internals or "read-only"
    ("KILL SESSION abc", 1064),
    ("KILL 18446744073709551616", 1064),
    ("RESET STATS now", 1064),
])
def test_hostile_sql_gets_an_error_and_the_port_keeps_serving(admin_proxy, sql, code):
    """(And a statement followed by a comment is one statement.)"""
    c = admin(admin_proxy)
    try:
        q(c, sql)
        got = None
    except pymysql.err.MySQLError as e:
        got = e.args[0]
    if code is not None:
        assert got == code, (sql, got)
    assert q(admin(admin_proxy), "SELECT COUNT(*) FROM servers")[0][0] == 3
    assert q(admin(admin_proxy), "SELECT COUNT(*) FROM servers; -- a comment after the statement")[0][0] == 3


def test_information_schema_and_show_for_gui_clients(admin_proxy):
    c = admin(admin_proxy)
    tables = {r[0] for r in q(c, "SHOW TABLES")}
    assert {"servers", "digests", "pools", "sessions", "rules", "users", "config", "events", "status"} <= tables
    cols = [r[0] for r in q(c, "SHOW COLUMNS FROM digests")]
    assert cols[:3] == ["digest", "digest_text", "user"]
    assert q(c, "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'rwproxy'")[0][0] == len(tables)
    assert q(c, "SELECT DATABASE()")[0][0] == "rwproxy"
    assert "rwproxy" in q(c, "SELECT @@version_comment")[0][0]
    assert q(c, "SHOW INDEX FROM servers") == () and q(c, "SELECT 1 + 1 FROM DUAL") == ((2,),)
    app = admin_proxy.connect()  # SHOW PROCESSLIST lists the proxy's client sessions
    with app.cursor() as cur:
        cur.execute("SELECT CONNECTION_ID()")
    with c.cursor() as cur:
        cur.execute("SHOW FULL PROCESSLIST")
        assert [d[0] for d in cur.description][:3] == ["Id", "User", "Host"]
        assert any(r[1] == "app" for r in cur.fetchall())
    app.close()


def _server(cluster):
    """The primary, as app, with a table to SHOW."""
    conn = pymysql.connect(host="127.0.0.1", port=cluster.primary.port, user="app", password="app", database="app")
    q(conn, "CREATE TABLE IF NOT EXISTS shape (id INT PRIMARY KEY, name TEXT)")
    return conn


def _shape(conn, sql):
    """(column names, rows) or the error code."""
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return [d[0] for d in cur.description or ()], cur.fetchall()
    except pymysql.err.MySQLError as e:
        return e.args[0]


@pytest.mark.parametrize("admin_sql,server_sql", [
    ("SHOW COLUMNS FROM servers", "SHOW COLUMNS FROM app.shape"),
    ("SHOW FULL COLUMNS FROM servers", "SHOW FULL COLUMNS FROM app.shape"),
    ("SHOW FIELDS IN servers FROM rwproxy", "SHOW FIELDS IN shape FROM app"),
    ("DESCRIBE rwproxy.servers", "DESCRIBE app.shape"),
    ("SHOW INDEX FROM servers", "SHOW INDEX FROM app.shape"),
    ("SHOW KEYS IN servers", "SHOW KEYS IN app.shape"),
    ("SHOW CREATE TABLE servers", "SHOW CREATE TABLE app.shape"),
    ("SHOW CREATE DATABASE rwproxy", "SHOW CREATE DATABASE app"),
    ("SHOW TABLE STATUS", "SHOW TABLE STATUS FROM app"),
    ("SHOW FULL TABLES", "SHOW FULL TABLES FROM app"),
])
def test_show_and_describe_have_the_servers_columns(admin_proxy, cluster, admin_sql, server_sql):
    """GUI clients read these results by column name: the admin port's must be the server's (the
    database's name in SHOW TABLES' first column aside). mysql-mimic 3.0.5 ordered SHOW FULL
    COLUMNS differently and refused FIELDS, KEYS, CREATE TABLE/DATABASE and TABLE STATUS."""
    with _server(cluster) as server:
        want = _shape(server, server_sql)
    got = _shape(admin(admin_proxy), admin_sql)
    assert isinstance(want, tuple) and isinstance(got, tuple), (want, got)
    assert [n.replace("Tables_in_app", "Tables_in_rwproxy") for n in want[0]] == got[0]
    if " INDEX " not in admin_sql and " KEYS " not in admin_sql:  # (the admin tables have no indexes)
        assert got[1], admin_sql


def test_show_and_describe_filter_and_name_missing_tables_as_a_server_does(admin_proxy, cluster):
    """mysql-mimic 3.0.5 answered a missing table or database with an empty set and ignored WHERE."""
    c = admin(admin_proxy)
    assert [r[0] for r in q(c, "SHOW COLUMNS FROM servers LIKE 'lag\\_ms'")] == ["lag_ms"]
    assert [r[0] for r in q(c, "SHOW COLUMNS FROM servers LIKE 'lag_m%'")] == ["lag_ms"]
    assert [r[0] for r in q(c, "SHOW FULL FIELDS FROM servers WHERE Field IN ('name', 'gtid')")] == ["name", "gtid"]
    assert [r[0] for r in q(c, "DESCRIBE servers role")] == ["role"]
    assert [r[0] for r in q(c, "SHOW TABLES LIKE 'serv%'")] == ["servers"]
    assert [r[0] for r in q(c, "/* a GUI's comment */ SHOW TABLE STATUS WHERE Name = 'digests'")] == ["digests"]
    assert "CREATE TABLE `servers`" in q(c, "SHOW CREATE TABLE `servers`")[0][1]
    status = dict(q(c, "SHOW GLOBAL STATUS"))  # the status table, as a server's status variables
    assert set(status) == {r[0] for r in q(c, "SELECT name FROM status")} and "uptime_s" in status
    assert [r[0] for r in q(c, "SHOW STATUS LIKE 'uptime%'")] == ["uptime_s"]
    with _server(cluster) as server:  # missing tables and databases: the codes the server gives
        for admin_sql, server_sql in (("SHOW COLUMNS FROM nosuch", "SHOW COLUMNS FROM app.nosuch"),
                                      ("DESCRIBE nosuch", "DESCRIBE app.nosuch"),
                                      ("SHOW INDEX FROM nosuch", "SHOW INDEX FROM app.nosuch"),
                                      ("SHOW CREATE TABLE nosuch", "SHOW CREATE TABLE app.nosuch")):
            want, got = _shape(server, server_sql), _shape(c, admin_sql)
            assert isinstance(want, int) and got == want, (admin_sql, want, got)
    # (app may not look outside its database; a server's root gets these, checked by hand on 10.11)
    assert _shape(c, "SHOW COLUMNS FROM servers IN nosuchdb") == 1146
    assert _shape(c, "SHOW CREATE DATABASE nosuchdb") == 1049
    assert _shape(c, "SHOW TABLES FROM nosuchdb") == 1049 and _shape(c, "SHOW TABLE STATUS FROM nosuchdb") == 1049
    assert _shape(c, "SHOW COLUMNS FROM servers WHERE Field IN (SELECT name FROM servers)") == 1064
    assert _shape(c, "SHOW ENGINES") == 1235 and _shape(c, "EXPLAIN SELECT 1") == 1235
    assert q(c, "SELECT COUNT(*) FROM servers")[0][0] == 3


def test_status_json_covers_every_table(admin_proxy):
    out = subprocess.run([sys.executable, "-m", "proxy", "status", "--config", admin_proxy.process.config_path,
                          "--json", "--all"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert set(st["tables"]) == {"servers", "digests", "pools", "sessions", "rules", "users", "config", "events",
                                 "status", "instances"}
    assert st["tables"]["instances"] == []  # no [cluster] coordination here
    assert [s["name"] for s in st["tables"]["servers"]] == ["node1", "node2", "node3"]


def test_enable_failover_never_overrides_the_config_file(admin_proxy, cluster, tmp_path):
    """ENABLE FAILOVER re-enables what a failed failover stopped; `auto_failover = false` in the
    file stays the operator's choice (a runtime override would vanish at the next restart)."""
    with admin(admin_proxy) as c:
        assert q(c, "ENABLE FAILOVER") == (("ok", "automatic failover was already enabled"),)
    port = free_port()
    p = start_proxy(cluster, tmp_path, failover={"auto_failover": False},
                    admin={"listen": f"127.0.0.1:{port}", "users": [{"name": "admin", "password": ADMIN_PW}]})
    p.admin_port = port
    try:
        with admin(p) as c:
            with pytest.raises(pymysql.err.MySQLError) as e:
                q(c, "ENABLE FAILOVER")
            assert "auto_failover = false in the config" in str(e.value)
        r = subprocess.run([sys.executable, "-m", "proxy", "enable-failover", "--config", p.process.config_path],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and "auto_failover = false in the config" in r.stdout + r.stderr, (r.stdout, r.stderr)
        st = json.loads(subprocess.run([sys.executable, "-m", "proxy", "status", "--json", "--config",
                                        p.process.config_path], capture_output=True, text=True, timeout=30).stdout)
        assert st["failover"]["auto_failover"] is False, st["failover"]
    finally:
        p.process.stop()
