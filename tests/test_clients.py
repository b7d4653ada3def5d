"""Real client libraries and tools through rwproxy, compared with the same client talking to the primary.

The proxy currently sends everything to the primary, so whatever a client receives
through the proxy must be exactly what it receives from the primary directly.
"""

from __future__ import annotations

import datetime
import decimal
import hashlib
import json
import math
import os
import random
import re
import socket
import ssl
import struct
import subprocess

import MySQLdb
import mysql.connector
import pymysql
import pytest
from pymysql.constants import CLIENT
from sqlalchemy import Numeric, String, create_engine, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from helpers import SHA2_PASSWORD, SHA2_USER, self_signed_cert

D = decimal.Decimal
CMD_TIMEOUT = 60  # seconds, for every external command


# ---- helpers -------------------------------------------------------------------------------------

def root_exec(cluster, *statements):
    """Run statements as root on the primary (they replicate)."""
    with cluster.primary.connect(read_timeout=60) as conn, conn.cursor() as cur:
        cur.execute("SET SESSION lock_wait_timeout = 30")
        for sql in statements:
            cur.execute(sql)


@pytest.fixture
def tables(cluster):
    """Names registered here are dropped (as root, in database app) when the test ends."""
    names: list[str] = []
    yield names
    if names:
        root_exec(cluster, *[f"DROP TABLE IF EXISTS app.`{n}`" for n in names])


def proxy_log_tail(proxy, lines=40) -> str:
    return proxy.process.log_tail(lines)


def big(value):
    """Large str/bytes (also inside tuples and lists) as (type, length, sha256), so that a failing
    comparison prints something readable instead of diffing megabytes."""
    if isinstance(value, (bytes, bytearray, str)) and len(value) > 4096:
        data = value.encode() if isinstance(value, str) else bytes(value)
        return (type(value).__name__, len(value), hashlib.sha256(data).hexdigest()[:16])
    if isinstance(value, (list, tuple)):
        return type(value)(big(v) for v in value)
    return value


def pymysql_conn(port, **kw):
    params = dict(host="127.0.0.1", port=port, user="app", password="app", database="app",
                  charset="utf8mb4", connect_timeout=10, read_timeout=60, write_timeout=60)
    params.update(kw)
    return pymysql.connect(**params)


def connector_conn(port, **kw):
    params = dict(host="127.0.0.1", port=port, user="app", password="app", database="app",
                  charset="utf8mb4", use_pure=True, connection_timeout=10)
    params.update(kw)
    return mysql.connector.connect(**params)


def mysqldb_conn(port, **kw):
    params = dict(host="127.0.0.1", port=port, user="app", password="app", database="app",
                  charset="utf8mb4", connect_timeout=10, read_timeout=60, write_timeout=60)
    params.update(kw)
    return MySQLdb.connect(**params)


# ---- 1. column types round trip -----------------------------------------------------------------

TYPES_DDL = """
CREATE TABLE `{t}` (
  id INT PRIMARY KEY,
  ti TINYINT, tiu TINYINT UNSIGNED, si SMALLINT, siu SMALLINT UNSIGNED,
  mi MEDIUMINT, miu MEDIUMINT UNSIGNED, i INT, iu INT UNSIGNED,
  bi BIGINT, biu BIGINT UNSIGNED,
  dc DECIMAL(30,10), f FLOAT, d DOUBLE,
  dt DATE, tm TIME(6), dtm DATETIME(6), ts TIMESTAMP NULL DEFAULT NULL, yr YEAR,
  ch CHAR(40), vc VARCHAR(200), tx TEXT, bl BLOB, js JSON, bt BIT(10),
  en ENUM('small','médium','😀big'), st SET('a','b','ç')
) ENGINE=InnoDB CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci
"""
TYPE_COLUMNS = ["id", "ti", "tiu", "si", "siu", "mi", "miu", "i", "iu", "bi", "biu", "dc", "f", "d",
                "dt", "tm", "dtm", "ts", "yr", "ch", "vc", "tx", "bl", "js", "bt", "en", "st"]
LONG_TEXT = "Ünïcødé ✓ 😀🎉 — 世界 мир " * 300

TYPE_ROWS = [
    # minimum values
    (1, -128, 0, -32768, 0, -8388608, 0, -2147483648, 0, -(2 ** 63), 0,
     D("-99999999999999999999.9999999999"), -1.5, -1.7976931348623157e308,
     datetime.date(1000, 1, 1), -datetime.timedelta(hours=838, minutes=59, seconds=59),
     datetime.datetime(1000, 1, 1, 0, 0, 0), datetime.datetime(2001, 2, 3, 4, 5, 6), 1901,
     "", "", "", b"", "[]", 0, "small", ""),
    # maximum values, non-ASCII text, every byte value
    (2, 127, 255, 32767, 65535, 8388607, 16777215, 2147483647, 4294967295, 2 ** 63 - 1, 2 ** 64 - 1,
     D("99999999999999999999.9999999999"), 3.25, 2.2250738585072014e-308,
     datetime.date(9999, 12, 31), datetime.timedelta(hours=838, minutes=59, seconds=59),
     datetime.datetime(9999, 12, 31, 23, 59, 59, 999999), datetime.datetime(2037, 12, 31, 23, 59, 59), 2155,
     "Ünïcødé 😀 ½", "Grüße, мир, 世界, עברית, 🎉🚀 \\ ' \" %s ?", LONG_TEXT, bytes(range(256)),
     '{"k": "é😀", "n": [1, 2.5, null, true], "q": "\\"quoted\\""}', 1023, "😀big", "a,ç"),
    # NULL in every column
    (3,) + (None,) * (len(TYPE_COLUMNS) - 1),
    # fractional and negative fractional TIME, small values
    (4, 0, 1, -1, 1, 0, 1, -1, 1, 0, 1,
     D("0.0000000001"), 0.0, 0.1,
     datetime.date(2024, 2, 29), -datetime.timedelta(hours=1, minutes=2, seconds=3, microseconds=456789),
     datetime.datetime(2024, 2, 29, 12, 34, 56, 123456), datetime.datetime(2024, 2, 29, 12, 34, 56), 2024,
     "x", "\x00nul\tand\ncontrol\r", "\u00a0\u200b\U0001F600", b"\x00\xff\x00\n\\'\"", '{"a": {}}', 5,
     "médium", "a,b,ç"),
    (5, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
     D("-12345.6789012345"), -0.25, -2.5e-300,
     datetime.date(1970, 1, 1), datetime.timedelta(hours=12, minutes=34, seconds=56, microseconds=1),
     datetime.datetime(1970, 1, 1, 0, 0, 0, 1), datetime.datetime(1999, 12, 31, 23, 59, 59), 1999,
     "tail", "é", "😀", b"\x80", '"just a string"', 512, "small", "b"),
]

CLIENTS = ["pymysql", "mysqldb", "connector", "connector_prepared"]


class Client:
    """One client library's connection plus the knobs the round trip needs."""

    def __init__(self, kind: str, port: int):
        self.kind = kind
        if kind == "pymysql":
            self.conn = pymysql_conn(port)
        elif kind == "mysqldb":
            self.conn = mysqldb_conn(port)
        else:
            self.conn = connector_conn(port)
        self.prepared = kind == "connector_prepared"
        self.ph = "?" if self.prepared else "%s"

    def cursor(self):
        return self.conn.cursor(prepared=True) if self.prepared else self.conn.cursor()

    def param(self, value):
        # Connector/Python encodes a negative timedelta wrongly as a binary TIME parameter
        # (-01:02:03.456789 arrives as -46:57:56.543211, also directly against the server), so
        # negative times go in as string parameters in binary mode.
        if self.prepared and isinstance(value, datetime.timedelta) and value < datetime.timedelta(0):
            return time_str(value)
        return value

    def close(self):
        self.conn.close()


def time_str(td: datetime.timedelta) -> str:
    """A timedelta as MariaDB prints a TIME(6): [-]HHH:MM:SS.ffffff."""
    sign = "-" if td < datetime.timedelta(0) else ""
    us = abs(td) // datetime.timedelta(microseconds=1)
    s, us = divmod(us, 1_000_000)
    return f"{sign}{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}.{us:06d}"


def _norm(col: str, value):
    """Client-independent form of a value, for comparison with what was inserted."""
    if value is None:
        return None
    if col == "bt":
        return int.from_bytes(value, "big") if isinstance(value, (bytes, bytearray)) else int(value)
    if col == "st":
        items = value if isinstance(value, set) else set(value.split(",")) if value else set()
        return frozenset(items)
    if col == "js":
        return json.loads(value)
    if col in ("bl",) and isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if col in ("ch", "vc", "tx", "en") and isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8")
    return value


def _read_types(client: Client, table: str):
    cur = client.cursor()
    if client.prepared:
        # Connector/Python's binary-row decoder has no case for MYSQL_TYPE_YEAR (it reads the
        # 2-byte integer as a length-coded string and loses its place in the row, also directly
        # against the server), so in binary mode YEAR is fetched as an integer expression.
        cols = ", ".join("CAST(yr AS UNSIGNED) AS yr" if c == "yr" else c for c in TYPE_COLUMNS)
        cur.execute(f"SELECT {cols} FROM `{table}` WHERE id >= ? ORDER BY id", (0,))
    else:
        cur.execute(f"SELECT * FROM `{table}` ORDER BY id")
    rows = [tuple(r) for r in cur.fetchall()]
    desc = [tuple(d) for d in cur.description]
    cur.close()
    client.conn.commit()
    return rows, desc


@pytest.mark.parametrize("kind", CLIENTS)
def test_column_types_round_trip(kind, proxy, cluster, direct, tables):
    table = f"types_{kind}"
    tables.append(table)
    with direct.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS `{table}`")
        cur.execute(TYPES_DDL.format(t=table))

    via_proxy = Client(kind, proxy.port)
    straight = Client(kind, cluster.primary.port)
    try:
        cur = via_proxy.cursor()
        sql = f"INSERT INTO `{table}` ({', '.join(TYPE_COLUMNS)}) VALUES ({', '.join([via_proxy.ph] * len(TYPE_COLUMNS))})"
        for row in TYPE_ROWS:
            cur.execute(sql, tuple(via_proxy.param(v) for v in row))
            assert cur.rowcount == 1
        cur.close()
        via_proxy.conn.commit()

        got_proxy, desc_proxy = _read_types(via_proxy, table)
        got_direct, desc_direct = _read_types(straight, table)
        # TIME as text too: Connector/Python's binary TIME decoder drops the sign of a negative
        # time below one day, so the binary value alone cannot be checked against the input.
        times = []
        for client in (via_proxy, straight):
            cur = client.cursor()
            cur.execute(f"SELECT id, CAST(tm AS CHAR) FROM `{table}` WHERE id > {client.ph} ORDER BY id", (0,))
            times.append([tuple(r) for r in cur.fetchall()])
            cur.close()
    finally:
        via_proxy.close()
        straight.close()

    assert desc_proxy == desc_direct
    assert [d[0] for d in desc_proxy] == TYPE_COLUMNS
    assert len(got_proxy) == len(TYPE_ROWS)
    # Exactly what the same client library receives straight from the primary, value by value.
    for rp, rd in zip(got_proxy, got_direct):
        for col, vp, vd in zip(TYPE_COLUMNS, rp, rd):
            assert type(vp) is type(vd) and vp == vd, (rp[0], col, vp, vd)
    tm = TYPE_COLUMNS.index("tm")
    assert times[0] == times[1] == [(r[0], None if r[tm] is None else time_str(r[tm])) for r in TYPE_ROWS]
    # And what was inserted (floats compared exactly only where the value is exact in FLOAT).
    for row, got in zip(TYPE_ROWS, got_proxy):
        for col, want, have in zip(TYPE_COLUMNS, row, got):
            want, have = _norm(col, want), _norm(col, have)
            if col == "tm" and via_proxy.prepared and want is not None and want < datetime.timedelta(0):
                continue  # checked as text above
            if col == "d" and want is not None:
                assert math.isclose(have, want, rel_tol=1e-15), (row[0], col, have, want)
            else:
                assert have == want, (row[0], col, have, want)


# ---- 2. a 20 MiB BLOB: packets over 16 MiB in both directions -----------------------------------

BIG = 20 * 1024 * 1024
MAX_PACKET = 0xFFFFFF


class RawBinaryClient:
    """Just enough of the client protocol to prepare and execute statements and read binary rows.

    Connector/Python (pure) cannot read a binary-protocol row that spans several packets (its
    binary row reader does not join a 16 MiB - 1 packet with its continuation, also directly
    against the server), so the 20 MiB binary *result* is read with this minimal client.
    mysql_native_password, no TLS, classic EOF packets.
    """

    CAPS = 0x1 | 0x4 | 0x8 | 0x200 | 0x2000 | 0x8000 | 0x20000 | 0x80000

    def __init__(self, port, user="app", password="app", database="app"):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.rfile = self.sock.makefile("rb")
        seq, g = self.read()
        assert g[0] == 10, g[:20]
        pos = g.index(b"\0", 1) + 1 + 4
        salt = g[pos : pos + 8]
        pos += 8 + 1 + 2 + 1 + 2 + 2
        auth_len = g[pos]
        pos += 1 + 10
        salt += g[pos : pos + max(13, auth_len - 8) - 1]
        token = self.native_token(password, salt)
        resp = (struct.pack("<IIB23x", self.CAPS, 1 << 30, 45) + user.encode() + b"\0" + bytes([len(token)])
                + token + database.encode() + b"\0" + b"mysql_native_password\0")
        self.write(resp, seq + 1)
        seq, r = self.read()
        if r[0] == 0xFE:  # auth switch
            plugin, _, data = r[1:].partition(b"\0")
            assert plugin == b"mysql_native_password", plugin
            self.write(self.native_token(password, data[:20]), seq + 1)
            seq, r = self.read()
        assert r[0] == 0, r

    @staticmethod
    def native_token(password, salt):
        h1 = hashlib.sha1(password.encode()).digest()
        h2 = hashlib.sha1(salt + hashlib.sha1(h1).digest()).digest()
        return bytes(a ^ b for a, b in zip(h1, h2))

    def read(self):
        """One logical packet: (sequence id of its last part, payload)."""
        parts = []
        while True:
            hdr = self.rfile.read(4)
            assert len(hdr) == 4, "connection closed"
            n = int.from_bytes(hdr[:3], "little")
            body = self.rfile.read(n)
            assert len(body) == n, "connection closed"
            parts.append(body)
            if n < MAX_PACKET:
                return hdr[3], b"".join(parts)

    def write(self, payload, seq=0):
        out = []
        for off in range(0, len(payload) + 1, MAX_PACKET):
            chunk = payload[off : off + MAX_PACKET]
            out.append(len(chunk).to_bytes(3, "little") + bytes([seq & 0xFF]) + chunk)
            seq += 1
        self.sock.sendall(b"".join(out))

    @staticmethod
    def lenenc(buf, pos):
        b = buf[pos]
        if b < 0xFB:
            return b, pos + 1
        size = {0xFC: 2, 0xFD: 3, 0xFE: 8}[b]
        return int.from_bytes(buf[pos + 1 : pos + 1 + size], "little"), pos + 1 + size

    def _read_until_eof(self):
        while True:
            _, p = self.read()
            if p[0] == 0xFE and len(p) < 9:
                return
            yield p

    def prepare(self, sql):
        self.write(b"\x16" + sql.encode())
        _, r = self.read()
        assert r[0] == 0, r
        stmt_id, ncols, nparams = struct.unpack_from("<IHH", r, 1)
        for _ in range(bool(nparams) + bool(ncols)):
            list(self._read_until_eof())
        return stmt_id

    def execute(self, stmt_id, params):
        """Binary rows (tuples) of a statement with int/bytes parameters; [] for an OK."""
        pkt = b"\x17" + struct.pack("<IBI", stmt_id, 0, 1)
        if params:
            pkt += bytes((len(params) + 7) // 8) + b"\x01"
            pkt += b"".join(b"\x08\x00" if isinstance(v, int) else b"\xfb\x00" for v in params)
            for v in params:
                if isinstance(v, int):
                    pkt += struct.pack("<q", v)
                else:
                    pkt += b"\xfe" + struct.pack("<Q", len(v)) + v
        self.write(pkt)
        _, r = self.read()
        assert r[0] != 0xFF, r
        if r[0] == 0:
            return []
        ncols, _ = self.lenenc(r, 0)
        types = []
        for p in self._read_until_eof():
            pos = 0
            for _ in range(6):
                n, pos = self.lenenc(p, pos)
                pos += n
            _, pos = self.lenenc(p, pos)
            types.append(struct.unpack_from("<HIBH", p, pos)[2:])  # (type, flags)
        assert len(types) == ncols
        rows = []
        for p in self._read_until_eof():
            assert p[0] == 0, p[:40]
            bitmap = p[1 : 1 + (ncols + 9) // 8]
            pos = 1 + len(bitmap)
            row = []
            for i, (t, flags) in enumerate(types):
                if bitmap[(i + 2) // 8] & (1 << ((i + 2) % 8)):
                    row.append(None)
                elif t in (3, 8):  # LONG, LONGLONG
                    size = 4 if t == 3 else 8
                    row.append(int.from_bytes(p[pos : pos + size], "little", signed=not flags & 0x20))
                    pos += size
                else:  # strings and blobs: length-encoded
                    n, pos = self.lenenc(p, pos)
                    row.append(p[pos : pos + n])
                    pos += n
            assert pos == len(p), "row not fully consumed"
            rows.append(tuple(row))
        return rows

    def close(self):
        try:
            self.write(b"\x01")
        finally:
            self.rfile.close()
            self.sock.close()


def test_20mib_blob_text_and_binary_protocol(proxy, cluster, tables):
    table = "big_blob_clients"
    tables.append(table)
    payload = random.Random(20).randbytes(BIG)
    payload2 = bytes(reversed(payload))
    digest = hashlib.sha256(payload).hexdigest()
    max_packet = 64 * 1024 * 1024

    with pymysql_conn(proxy.port, max_allowed_packet=max_packet, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS `{table}`")
        cur.execute(f"CREATE TABLE `{table}` (id INT PRIMARY KEY, b LONGBLOB, n INT)")
        # text protocol: one COM_QUERY of ~21 MiB (a split packet from the client)
        cur.execute(f"INSERT INTO `{table}` VALUES (1, %s, 7)", (payload,))
        cur.execute(f"SELECT b, LENGTH(b), SHA2(b, 256), n FROM `{table}` WHERE id = 1")
        b, n, sha, seven = cur.fetchone()
        assert n == BIG and sha == digest and seven == 7
        assert big(b) == big(payload)  # a text row split over two packets to the client
        cur.execute("SELECT 1")  # the stream is still in sync afterwards
        assert cur.fetchall() == ((1,),)

    c = connector_conn(proxy.port)
    try:
        cur = c.cursor(prepared=True)
        # binary protocol: a COM_STMT_EXECUTE carrying a 20 MiB parameter
        cur.execute(f"INSERT INTO `{table}` VALUES (?, ?, ?)", (2, payload2, 8))
        c.commit()
        cur.execute(f"SELECT id, LENGTH(b), SHA2(b, 256), n FROM `{table}` WHERE id >= ? ORDER BY id", (0,))
        assert cur.fetchall() == [(1, BIG, digest, 7), (2, BIG, hashlib.sha256(payload2).hexdigest(), 8)]
        cur.close()
    finally:
        c.close()

    # binary result rows over 16 MiB, and a 20 MiB parameter once more, with the minimal client.
    # A new session reads from a replica: another session's write is visible there once replicated.
    cluster.wait_replicas_caught_up(60)
    raw = RawBinaryClient(proxy.port)
    try:
        sel = raw.prepare(f"SELECT id, b, n FROM `{table}` WHERE id >= ? ORDER BY id")
        assert big(raw.execute(sel, [0])) == big([(1, payload, 7), (2, payload2, 8)])
        ins = raw.prepare(f"INSERT INTO `{table}` VALUES (?, ?, ?)")
        assert raw.execute(ins, [3, payload[::-1][:BIG - 5] + b"tail!", 9]) == []
        assert big(raw.execute(sel, [3])) == big([(3, payload2[: BIG - 5] + b"tail!", 9)])
        one = raw.prepare("SELECT ?")
        assert raw.execute(one, [5]) == [(5,)]
    finally:
        raw.close()

    with pymysql_conn(cluster.primary.port, max_allowed_packet=max_packet) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT b FROM `{table}` ORDER BY id")
        assert big([r[0] for r in cur.fetchall()]) == big([payload, payload2, payload2[: BIG - 5] + b"tail!"])


# ---- 3. the mariadb and mariadb-admin command-line tools ----------------------------------------

def run_cli(argv, timeout=CMD_TIMEOUT):
    env = dict(os.environ, LC_ALL="C.UTF-8", LANG="C.UTF-8")
    return subprocess.run(argv, capture_output=True, timeout=timeout, env=env)


def mariadb_cli(port, *args, tool="mariadb"):
    base = [tool, "--no-defaults", "-h127.0.0.1", f"-P{port}", "-uapp", "-papp"]
    if tool == "mariadb":
        base += ["--default-character-set=utf8mb4", "app"]
    return run_cli(base + list(args))


def test_mariadb_cli_output_matches_primary(proxy, cluster, direct, tables):
    table = "cli_rows_clients"
    tables.append(table)
    with direct.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS `{table}`")
        cur.execute(f"CREATE TABLE `{table}` (id INT PRIMARY KEY, s VARCHAR(50), d DECIMAL(10,3), t DATETIME(3), n INT)")
        cur.execute(f"INSERT INTO `{table}` VALUES (1, 'héllo 😀', 1.500, '2024-02-29 12:34:56.789', NULL),"
                    "(2, 'tab\there', -0.001, '1999-12-31 23:59:59', 42), (3, '', 0, NULL, 0)")
        direct.commit()

    cases = [
        ["-e", "SELECT 1; SELECT 2"],
        ["-e", "SELECT 'héllo 😀' AS s, NULL AS n, 1.5 AS d, CAST('2024-02-29 12:34:56.789' AS DATETIME(3)) AS dt"],
        ["-e", f"SELECT * FROM `{table}` ORDER BY id"],
        ["-t", "-e", f"SELECT * FROM `{table}` ORDER BY id; SELECT COUNT(*) FROM `{table}`"],
        ["-N", "-B", "-e", f"SELECT s FROM `{table}` WHERE id = 1; SHOW DATABASES LIKE 'app'"],
        ["-e", f"UPDATE `{table}` SET n = n WHERE id = 2; SELECT ROW_COUNT()"],
        ["-e", "SELECT * FROM no_such_table_clients"],  # an error: same message, same exit status
        ["-e", "SELECT 1; SELECT * FROM no_such_table_clients; SELECT 3"],
    ]
    for args in cases:
        want = mariadb_cli(cluster.primary.port, *args)
        # the client's default (it switches to TLS when the server offers it) and plain TCP
        for extra in ([], ["--skip-ssl"]):
            got = mariadb_cli(proxy.port, *extra, *args)
            assert (got.returncode, got.stdout, got.stderr) == (want.returncode, want.stdout, want.stderr), extra + args
    assert b"ERROR 1146" in want.stderr and want.returncode == 1

    # SELECT 1; SELECT 2 produces two result sets
    got = mariadb_cli(proxy.port, "-e", "SELECT 1; SELECT 2")
    assert got.stdout == b"1\n1\n2\n2\n"


def test_mariadb_cli_over_tls(proxy, cluster, tmp_path):
    plain = mariadb_cli(cluster.primary.port, "-e", "SELECT 1; SELECT 2; SELECT 'é😀' AS u")
    assert plain.returncode == 0, plain.stderr
    for ssl_args in (["--ssl", "--ssl-verify-server-cert=0"],
                     ["--ssl", f"--ssl-ca={proxy.cert}", "--ssl-verify-server-cert"]):
        got = mariadb_cli(proxy.port, *ssl_args, "-e", "SELECT 1; SELECT 2; SELECT 'é😀' AS u")
        assert (got.returncode, got.stdout, got.stderr) == (0, plain.stdout, b""), ssl_args
        status = mariadb_cli(proxy.port, *ssl_args, "-e", "status")
        assert status.returncode == 0, status.stderr
        assert re.search(rb"^SSL:\s+Cipher in use is \S+", status.stdout, re.M), status.stdout
    # with --skip-ssl the same command reports no TLS, so the check above means something
    status = mariadb_cli(proxy.port, "--skip-ssl", "-e", "status")
    assert status.returncode == 0, status.stderr
    assert re.search(rb"^SSL:\s+Not in use", status.stdout, re.M), status.stdout
    # a CA that did not sign the proxy's certificate is refused by the client
    other_cert, _ = self_signed_cert(str(tmp_path))
    bad = mariadb_cli(proxy.port, "--ssl", f"--ssl-ca={other_cert}", "--ssl-verify-server-cert", "-e", "SELECT 1")
    assert bad.returncode != 0 and bad.stdout == b""


STATUS_RE = rb"^Uptime: \d+\s+Threads: \d+\s+Questions: \d+\s+Slow queries: \d+\s+Opens: \d+\s+Open tables: \d+\s+Queries per second avg: [\d.]+\s*$"


def test_mariadb_admin_status_and_ping(proxy, cluster):
    for port in (proxy.port, cluster.primary.port):
        st = mariadb_cli(port, "status", tool="mariadb-admin")
        assert st.returncode == 0 and st.stderr == b"", (port, st)
        assert re.match(STATUS_RE, st.stdout), (port, st.stdout)
        ping = mariadb_cli(port, "ping", tool="mariadb-admin")
        assert (ping.returncode, ping.stdout.strip(), ping.stderr) == (0, b"mysqld is alive", b""), (port, ping)
    # several commands on one connection: ping, status, ping again
    many = mariadb_cli(proxy.port, "ping", "status", "ping", tool="mariadb-admin")
    assert many.returncode == 0, many
    lines = many.stdout.decode().splitlines()
    assert lines[0] == "mysqld is alive" and lines[2] == "mysqld is alive", lines
    assert re.match(STATUS_RE, lines[1].encode()), lines


# ---- 4. PyMySQL with and without TLS -------------------------------------------------------------

def test_pymysql_tls_and_plain(proxy, cluster, direct, tmp_path):
    probe = "SELECT %s AS big, 'é😀' AS u, CONNECTION_ID() > 0 AS c"
    blob = ("TLS ✓ " * 600_000)[:3_000_000]  # several MiB each way through the TLS layer
    with direct.cursor() as cur:
        cur.execute("SET NAMES utf8mb4")
        cur.execute(probe, (blob,))
        want = big(cur.fetchall())

    for ssl_kw in ({"ssl": {"ca": proxy.cert}}, {"ssl_ca": proxy.cert, "ssl_verify_cert": True}):
        with proxy.connect(charset="utf8mb4", **ssl_kw) as conn:
            sock = conn._sock
            assert isinstance(sock, ssl.SSLSocket), type(sock)
            assert sock.version() in ("TLSv1.2", "TLSv1.3") and sock.cipher() is not None
            peer = ssl.DER_cert_to_PEM_cert(sock.getpeercert(binary_form=True))
            with open(proxy.cert) as f:
                assert peer.strip() == f.read().strip()  # it is the proxy's certificate
            with conn.cursor() as cur:
                cur.execute(probe, (blob,))
                assert big(cur.fetchall()) == want
                cur.execute("SELECT CURRENT_USER()")
                assert cur.fetchone() == ("app@%",)

    # caching_sha2_password full authentication over TLS (clear password inside TLS)
    with proxy.connect(user=SHA2_USER, password=SHA2_PASSWORD, ssl={"ca": proxy.cert}) as conn:
        assert isinstance(conn._sock, ssl.SSLSocket)
        with conn.cursor() as cur:
            cur.execute("SELECT CURRENT_USER()")
            assert cur.fetchone() == (f"{SHA2_USER}@%",)

    with proxy.connect(charset="utf8mb4", ssl_disabled=True) as conn:
        assert type(conn._sock) is socket.socket
        with conn.cursor() as cur:
            cur.execute(probe, (blob,))
            assert big(cur.fetchall()) == want

    # verification is real: a CA that did not sign the proxy's certificate is refused
    other_cert, _ = self_signed_cert(str(tmp_path))
    with pytest.raises(pymysql.err.OperationalError):
        proxy.connect(ssl={"ca": other_cert}, connect_timeout=10)


# ---- 5. mysql-connector-python: prepared statements, executemany, session commands --------------

@pytest.fixture
def second_database(cluster):
    name = "app2_clients"
    root_exec(cluster, f"CREATE DATABASE IF NOT EXISTS {name}", f"GRANT ALL ON {name}.* TO 'app'@'%'",
              f"GRANT ALL ON {name}.* TO '{SHA2_USER}'@'%'")
    cluster.wait_replicas_caught_up(30)
    yield name
    root_exec(cluster, f"DROP DATABASE IF EXISTS {name}")


def test_connector_prepared_reuse_and_executemany(proxy, cluster, direct, tables):
    table = "connector_ps_clients"
    tables.append(table)
    with direct.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS `{table}`")
        cur.execute(f"CREATE TABLE `{table}` (id INT PRIMARY KEY, v VARCHAR(40), x DOUBLE, d DATETIME(6))")
        direct.commit()
    base = datetime.datetime(2024, 1, 1, 0, 0, 0)

    def row(i):
        return (i, f"v{i}-é😀", i / 7, base + datetime.timedelta(seconds=i, microseconds=i))

    # Connector/Python reuses a cursor's prepared statement only for the very same string object
    # (`operation is not self._executed`), so each statement text is built once.
    insert_sql = f"INSERT INTO `{table}` (id, v, x, d) VALUES (?, ?, ?, ?)"
    select_sql = f"SELECT id, v, x, d FROM `{table}` WHERE id = ?"
    c = connector_conn(proxy.port, ssl_ca=proxy.cert)
    try:
        ins = c.cursor(prepared=True)
        sel = c.cursor(prepared=True)
        # the same INSERT executed many times (one prepare, many COM_STMT_EXECUTE), with a second
        # statement interleaved so two statement ids are live at once
        for i in range(1, 201):
            ins.execute(insert_sql, row(i))
            assert ins.rowcount == 1
            sel.execute(select_sql, (i,))
            assert sel.fetchall() == [row(i)]
            if i == 1:
                ids = (ins._prepared["statement_id"], sel._prepared["statement_id"])
                assert ids[0] != ids[1]
        assert (ins._prepared["statement_id"], sel._prepared["statement_id"]) == ids  # really reused
        # a cursor switching between two texts closes and re-prepares each time
        other = c.cursor(prepared=True)
        for i in range(1, 6):
            other.execute(f"SELECT v FROM `{table}` WHERE id = ?", (i,))
            assert other.fetchall() == [(row(i)[1],)]
            other.execute(f"SELECT x FROM `{table}` WHERE id = ?", (i,))
            assert other.fetchall() == [(row(i)[2],)]
        sel.execute(select_sql, (7,))  # the long-lived statements are unaffected
        assert sel.fetchall() == [row(7)]
        # executemany on a prepared cursor and on a text cursor (a rewritten multi-row INSERT)
        ins.executemany(insert_sql, [row(i) for i in range(201, 301)])
        plain = c.cursor()
        plain.executemany(f"INSERT INTO `{table}` (id, v, x, d) VALUES (%s, %s, %s, %s)", [row(i) for i in range(301, 401)])
        assert plain.rowcount == 100
        c.commit()
        sel.execute(f"SELECT COUNT(*), SUM(id) FROM `{table}` WHERE id > ?", (0,))
        assert sel.fetchall() == [(400, D(400 * 401 // 2))]
        sel.execute(f"SELECT id, v, x, d FROM `{table}` WHERE id BETWEEN ? AND ? ORDER BY id", (1, 1000))
        via_proxy = sel.fetchall()
        for cur in (ins, sel, other, plain):
            cur.close()
    finally:
        c.close()
    assert via_proxy == [row(i) for i in range(1, 401)]

    d = connector_conn(cluster.primary.port)
    try:
        cur = d.cursor(prepared=True)
        cur.execute(f"SELECT id, v, x, d FROM `{table}` WHERE id BETWEEN ? AND ? ORDER BY id", (1, 1000))
        assert cur.fetchall() == via_proxy
    finally:
        d.close()


def _who(c):
    cur = c.cursor()
    cur.execute("SELECT CURRENT_USER(), DATABASE(), @marker")
    r = cur.fetchall()
    cur.close()
    return r[0]


def _set_marker(c):
    cur = c.cursor()
    cur.execute("SET @marker = 'set'")
    cur.close()


def test_connector_change_user_reset_statistics_ping(proxy, cluster, second_database):
    results = {}
    for label, port, kw in (("proxy", proxy.port, {"ssl_ca": proxy.cert}), ("direct", cluster.primary.port, {})):
        c = connector_conn(port, **kw)
        seen = []
        try:
            _set_marker(c)
            seen.append(_who(c))
            c.cmd_change_user(username=SHA2_USER, password=SHA2_PASSWORD, database="app")
            seen.append(_who(c))
            _set_marker(c)
            c.cmd_change_user(username="app", password="app", database=second_database)
            seen.append(_who(c))
            ps = c.cursor(prepared=True)  # statements work after a change of user
            ps.execute("SELECT DATABASE(), ?", ("é😀",))
            seen.append(tuple(ps.fetchall()[0]))
            ps.close()
            c.cmd_change_user(username="app", password="app", database="app")
            seen.append(_who(c))

            # COM_RESET_CONNECTION: user variables and session settings go back to defaults
            cur = c.cursor()
            cur.execute("SET @marker = 'set', SESSION sql_select_limit = 1, SESSION time_zone = '+05:00'")
            cur.execute("SELECT 1 UNION ALL SELECT 2")
            seen.append(cur.fetchall())  # one row: the limit is in effect
            cur.close()
            c.cmd_reset_connection()
            cur = c.cursor()
            cur.execute("SELECT @marker, @@session.sql_select_limit = @@global.sql_select_limit, @@session.time_zone")
            seen.append(cur.fetchall())
            cur.execute("SELECT 1 UNION ALL SELECT 2")
            seen.append(cur.fetchall())
            cur.close()
            seen.append(_who(c))

            stats = c.cmd_statistics()
            assert set(stats) >= {"Uptime", "Threads", "Questions", "Slow queries", "Opens", "Open tables",
                                  "Queries per second avg"}, stats
            assert all(isinstance(v, (int, D)) for v in stats.values()), stats
            seen.append(sorted(stats))
            pong = c.cmd_ping()
            assert pong["field_count"] == 0 and "status_flag" in pong
            c.ping(reconnect=False)
            assert c.is_connected()
            seen.append(_who(c))
        finally:
            c.close()
        results[label] = seen

    assert results["proxy"] == results["direct"]
    expected_who = [
        ("app@%", "app", "set"),
        (f"{SHA2_USER}@%", "app", None),  # COM_CHANGE_USER starts a new session
        ("app@%", second_database, None),
        (second_database, "é😀"),
        ("app@%", "app", None),
    ]
    assert results["proxy"][:5] == expected_who
    assert results["proxy"][5:8] == [[(1,)], [(None, 1, "SYSTEM")], [(1,), (2,)]]


def test_failed_change_user_keeps_a_fresh_session_of_the_old_user_as_mariadb_does(proxy, cluster, second_database):
    """MariaDB resets the session, then authenticates the new user; a refusal leaves the old user
    in its old database on the same connection, and after three refusals COM_CHANGE_USER gets 1047.
    (rwproxy used to close the connection, which a client reusing its connection sees as 2013.)"""

    def errno(call):
        try:
            call()
        except MySQLdb.MySQLError as e:
            return e.args[0]
        return 0

    results = {}
    for label, port, kw in (("proxy", proxy.port, {"compress": 1}), ("proxy", proxy.port, {}),
                            ("direct", cluster.primary.port, {})):
        c = mysqldb_conn(port, **kw)
        seen = []
        try:
            cur = c.cursor()
            cur.execute(f"USE {second_database}")
            cur.execute("SET @v = 1")
            cur.execute("CREATE TEMPORARY TABLE cu_tmp (a INT)")
            cur.execute("BEGIN")
            cur.execute("INSERT INTO cu_tmp VALUES (1)")
            seen.append(errno(lambda: c.change_user("app", "wrong password", "app")))
            cur = c.cursor()
            cur.execute("SELECT CURRENT_USER(), DATABASE(), @v, @@in_transaction")
            seen.append(cur.fetchall())
            seen.append(errno(lambda: cur.execute("SELECT * FROM cu_tmp")))  # reset: the table is gone
            seen.append(errno(lambda: c.change_user("app", "app", "no_such_db_cu")))  # the right password
            cur = c.cursor()
            cur.execute("SELECT CURRENT_USER(), DATABASE()")
            seen.append(cur.fetchall())
            seen.append(errno(lambda: c.change_user("app", "wrong password", "app")))  # the third failure
            seen.append(errno(lambda: c.change_user("app", "wrong password", "app")))
            seen.append(errno(lambda: c.change_user("app", "wrong password", "app")))
            seen.append(errno(lambda: c.change_user("app", "app", "app")))  # even the right one now
            cur = c.cursor()
            cur.execute("SELECT CURRENT_USER(), DATABASE(), 1 + 1")
            seen.append(cur.fetchall())
        finally:
            c.close()
        results.setdefault(label, []).append(seen)

    assert results["direct"][0] == [
        1045, (("app@%", second_database, None, 0),), 1146, 1044, (("app@%", second_database),),
        1045, 1047, 1047, 1047, (("app@%", second_database, 2),)]  # the refused database counts as well
    assert results["proxy"] == results["direct"] * 2


def test_change_user_frees_the_sessions_locks_before_it_answers(proxy, cluster):
    """The server resets the session (named locks, table locks, the transaction) before it
    answers COM_CHANGE_USER; rwproxy handed the connection to its pool to be reset later, so a
    client that asked right after could still find its lock held (Connector/C's test_bug31418)."""
    c = mysqldb_conn(proxy.port)
    check = mysqldb_conn(cluster.primary.port)
    try:
        for i in range(10):
            cur = c.cursor()
            cur.execute("SELECT GET_LOCK('change_user_lock', 0)")
            assert cur.fetchall() == ((1,),)
            c.change_user("app", "app", "app")
            ccur = check.cursor()
            ccur.execute("SELECT IS_FREE_LOCK('change_user_lock')")
            assert ccur.fetchall() == ((1,),), i
    finally:
        c.close()
        check.close()


# ---- 6. SQLAlchemy 2.x ORM -----------------------------------------------------------------------

def test_sqlalchemy_orm(proxy, cluster, tables):
    table = "sa_items_clients"
    tables.append(table)

    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __tablename__ = table
        __table_args__ = {"mysql_charset": "utf8mb4"}
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
        name: Mapped[str] = mapped_column(String(60), index=True)
        qty: Mapped[int]
        price: Mapped[decimal.Decimal] = mapped_column(Numeric(10, 2))
        note: Mapped[str | None] = mapped_column(String(100))

    engine = create_engine(f"mysql+pymysql://app:app@127.0.0.1:{proxy.port}/app?charset=utf8mb4",
                           pool_size=2, max_overflow=0, pool_timeout=10,
                           connect_args={"connect_timeout": 10, "read_timeout": 30})
    direct_engine = create_engine(f"mysql+pymysql://app:app@127.0.0.1:{cluster.primary.port}/app?charset=utf8mb4")
    try:
        Base.metadata.drop_all(engine)
        Base.metadata.create_all(engine)
        with Session(engine) as s:
            s.add_all([Item(name=n, qty=q, price=D(p), note=note) for n, q, p, note in [
                ("apple", 5, "1.20", None), ("banana", 12, "0.35", "ripe 🍌"), ("cherry", 1, "9.99", "é"),
                ("date", 7, "4.50", None), ("elderberry", 3, "12.00", "rare")]])
            s.commit()
            ids = s.scalars(select(Item.id).order_by(Item.id)).all()
            assert len(ids) == 5 and ids == sorted(set(ids))

        with Session(engine) as s:
            got = s.execute(select(Item.name, Item.qty).where(Item.qty >= 3).order_by(Item.qty.desc())).all()
            assert [tuple(r) for r in got] == [("banana", 12), ("date", 7), ("apple", 5), ("elderberry", 3)]
            banana = s.scalars(select(Item).where(Item.name == "banana")).one()
            assert banana.note == "ripe 🍌" and banana.price == D("0.35")
            banana.qty = 20
            s.delete(s.scalars(select(Item).where(Item.name == "cherry")).one())
            s.commit()

        # rollback: an insert and an update that are rolled back are not visible anywhere
        with Session(engine) as s:
            s.add(Item(name="ghost", qty=99, price=D("1.00")))
            s.flush()
            assert s.scalar(select(func.count()).select_from(Item).where(Item.name == "ghost")) == 1
            s.scalars(select(Item).where(Item.name == "apple")).one().qty = 0
            s.flush()
            s.rollback()
        with Session(engine) as s:
            assert s.scalar(select(func.count()).select_from(Item).where(Item.name == "ghost")) == 0
            assert s.scalar(select(Item.qty).where(Item.name == "apple")) == 5

        q = select(Item.name, Item.qty, Item.price, Item.note).order_by(Item.name)
        with Session(engine) as s:
            via_proxy = [tuple(r) for r in s.execute(q).all()]
        with Session(direct_engine) as s:
            straight = [tuple(r) for r in s.execute(q).all()]
        assert via_proxy == straight == [
            ("apple", 5, D("1.20"), None), ("banana", 20, D("0.35"), "ripe 🍌"),
            ("date", 7, D("4.50"), None), ("elderberry", 3, D("12.00"), "rare")]
        Base.metadata.drop_all(engine)
        with direct_engine.connect() as conn:
            assert not direct_engine.dialect.has_table(conn, table)
    finally:
        engine.dispose()
        direct_engine.dispose()


# ---- 7. sysbench oltp_read_write ----------------------------------------------------------------

def _sysbench(port, command, *extra, timeout=CMD_TIMEOUT):
    argv = ["sysbench", "oltp_read_write", "--db-driver=mysql", "--mysql-host=127.0.0.1", f"--mysql-port={port}",
            "--mysql-user=app", "--mysql-password=app", "--mysql-db=sbtest_clients", "--tables=2",
            "--table-size=1000", *extra, command]
    return run_cli(argv, timeout=timeout)


def _stat(out: str, name: str) -> int:
    m = re.search(rf"^\s*{name}:\s+(\d+)", out, re.M)
    assert m, f"no '{name}' in sysbench output:\n{out}"
    return int(m.group(1))


def test_sysbench_oltp_read_write(proxy, cluster):
    root_exec(cluster, "DROP DATABASE IF EXISTS sbtest_clients", "CREATE DATABASE sbtest_clients",
              "GRANT ALL ON sbtest_clients.* TO 'app'@'%'")
    try:
        prep = _sysbench(cluster.primary.port, "prepare")
        assert prep.returncode == 0, prep.stdout.decode() + prep.stderr.decode()
        # (prepared straight on the primary, past rwproxy's read-your-writes: let the replicas have
        # the tables before statements are prepared there)
        cluster.wait_replicas_caught_up(30)
        # Every error is fatal (--mysql-ignore-errors=none), so the workloads must not deadlock
        # on their own: the full statement mix runs on one thread, and the 4-thread run writes
        # a single row per transaction (no lock cycle is possible), reads as usual.
        for extra in (["--threads=1", "--events=300", "--time=0"],
                      ["--threads=4", "--time=5", "--events=0", "--delete_inserts=0", "--index_updates=0",
                       "--non_index_updates=1"]):
            run = _sysbench(proxy.port, "run", *extra, "--report-interval=0", "--db-ps-mode=auto",
                            "--mysql-ignore-errors=none")
            out = run.stdout.decode() + run.stderr.decode()
            assert run.returncode == 0, out + proxy_log_tail(proxy)
            assert "FATAL" not in out, out
            assert _stat(out, "transactions") > 0, out
            assert _stat(out, "ignored errors") == 0, out
            assert _stat(out, "reconnects") == 0, out
        # oltp_read_write keeps the row count (it deletes and re-inserts the same ids)
        with cluster.primary.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT (SELECT COUNT(*) FROM sbtest_clients.sbtest1) + (SELECT COUNT(*) FROM sbtest_clients.sbtest2)")
            assert cur.fetchone() == (2000,)
    finally:
        root_exec(cluster, "DROP DATABASE IF EXISTS sbtest_clients")


# ---- 8. multi-statements and multiple result sets ------------------------------------------------

def _all_sets(cur, sql):
    """Every result of a multi-result query: (column names, rows, rowcount, lastrowid, warnings)."""
    sets = []
    cur.execute(sql)
    while True:
        names = tuple(d[0] for d in cur.description) if cur.description else None
        sets.append((names, cur.fetchall(), cur.rowcount, cur.lastrowid, cur.warning_count))
        if not cur.nextset():
            return sets


def test_multi_statements_and_procedure_result_sets(proxy, cluster, tables):
    table, proc = "multi_clients", "two_sets_clients"
    tables.append(table)
    flags = CLIENT.MULTI_STATEMENTS | CLIENT.MULTI_RESULTS
    multi = (f"SELECT 1 AS one; SELECT 2 AS two, 'é😀' AS u; "
             f"INSERT INTO `{table}` (v) VALUES ('a'), ('b'), ('c'); "
             f"SELECT id, v FROM `{table}` ORDER BY id; UPDATE `{table}` SET v = 'z' WHERE v = 'b'; "
             f"SELECT v, COUNT(*) FROM `{table}` GROUP BY v ORDER BY v")
    results = {}
    with pymysql_conn(cluster.primary.port, autocommit=True) as setup, setup.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS `{table}`")
        cur.execute(f"DROP PROCEDURE IF EXISTS `{proc}`")
        cur.execute(f"CREATE TABLE `{table}` (id INT AUTO_INCREMENT PRIMARY KEY, v VARCHAR(10))")
        cur.execute(f"CREATE PROCEDURE `{proc}`(IN n INT) BEGIN SELECT n AS n, 'first' AS which; "
                    f"SELECT id, v FROM `{table}` WHERE id <= n ORDER BY id; END")
    try:
        for label, port in (("proxy", proxy.port), ("direct", cluster.primary.port)):
            with pymysql_conn(cluster.primary.port, autocommit=True) as setup, setup.cursor() as cur:
                cur.execute(f"TRUNCATE TABLE `{table}`")  # each side starts from the same state
            seen = []
            with pymysql_conn(port, client_flag=flags, autocommit=True) as conn, conn.cursor() as cur:
                seen.append(_all_sets(cur, multi))
                seen.append(_all_sets(cur, f"CALL `{proc}`(2)"))
                seen.append(_all_sets(cur, f"CALL `{proc}`(10); SELECT 'after' AS a"))
                # an error in the middle of a batch stops it; the connection stays usable
                cur.execute("SELECT 'before' AS b; SELECT * FROM no_such_table_clients; SELECT 'never'")
                seen.append(cur.fetchall())
                with pytest.raises(pymysql.err.ProgrammingError) as ei:
                    cur.nextset()
                seen.append(ei.value.args)
                cur.execute("SELECT 'still fine'")
                seen.append(cur.fetchall())
                assert not cur.nextset()
            results[label] = seen
    finally:
        with pymysql_conn(cluster.primary.port, autocommit=True) as setup, setup.cursor() as cur:
            cur.execute(f"DROP PROCEDURE IF EXISTS `{proc}`")

    assert results["proxy"] == results["direct"]
    sets = results["proxy"][0]
    assert [s[0] for s in sets] == [("one",), ("two", "u"), None, ("id", "v"), None, ("v", "COUNT(*)")]
    assert sets[1][1] == ((2, "é😀"),)
    assert sets[2][2] == 3 and sets[4][2] == 1
    assert sets[5][1] == (("a", 1), ("c", 1), ("z", 1))
    call = results["proxy"][1]
    assert [s[1] for s in call[:2]] == [((2, "first"),), ((1, "a"), (2, "z"))]
    assert len(call) == 3 and call[2][0] is None  # the CALL's own OK packet
    assert results["proxy"][2][-1][1] == (("after",),)
    assert results["proxy"][3] == (("before",),) and results["proxy"][4][0] == 1146


def test_results_of_a_stored_program_with_an_open_cursor(proxy, cluster, tables):
    """A stored program looping over a cursor (FOR row IN (SELECT ...) DO ... END FOR) sets
    CURSOR_EXISTS in the EOF packets of the results it sends meanwhile. rwproxy ended such a
    response after its column definitions (the rule for an execute that opens a cursor), so the
    rest of it never reached the client: the mariadb CLI (and MariaDB's own test suite,
    main.keywords) hung. The loop sleeps, so the results arrive in several reads, as they did."""
    table, proc = "cursor_loop_clients", "cursor_loop_clients"
    tables.append(table)
    with pymysql_conn(cluster.primary.port, autocommit=True) as setup, setup.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS `{table}`")
        cur.execute(f"DROP PROCEDURE IF EXISTS `{proc}`")
        cur.execute(f"CREATE TABLE `{table}` (w VARCHAR(20))")
        cur.execute(f"INSERT INTO `{table}` VALUES ('lpad'), ('autocommit'), ('no_such_var')")
        cur.execute(f"""CREATE PROCEDURE `{proc}`()
            BEGIN
              FOR r IN (SELECT w FROM `{table}` ORDER BY w) DO
                BEGIN
                  DECLARE msg TEXT DEFAULT '';
                  DECLARE CONTINUE HANDLER FOR SQLEXCEPTION GET DIAGNOSTICS CONDITION 1 msg = MESSAGE_TEXT;
                  EXECUTE IMMEDIATE CONCAT('SELECT @@', r.w);
                  DO SLEEP(0.05);
                  SELECT CONCAT(r.w, ': ', msg) AS outcome;
                END;
              END FOR;
            END""")
    try:
        for args, expect in ((["-e", f"CALL `{proc}`(); SELECT 'after' AS a"], [b"Unknown system variable", b"after"]),
                             (["--delimiter=//", "-e", f"FOR r IN (SELECT w FROM `{table}` ORDER BY w) DO "
                               "SELECT r.w; DO SLEEP(0.05); END FOR"], [b"no_such_var"])):
            want = mariadb_cli(cluster.primary.port, *args)
            got = mariadb_cli(proxy.port, *args)
            assert (got.returncode, got.stdout, got.stderr) == (want.returncode, want.stdout, want.stderr), args
            assert want.returncode == 0 and all(e in want.stdout for e in expect), want
    finally:
        with pymysql_conn(cluster.primary.port, autocommit=True) as setup, setup.cursor() as cur:
            cur.execute(f"DROP PROCEDURE IF EXISTS `{proc}`")


# ---- 9. LOAD DATA LOCAL INFILE ------------------------------------------------------------------

def _gen_file(path, rows, pad):
    rnd = random.Random(rows)
    lines, expect = [], []
    for i in range(1, rows + 1):
        name = f"row-{i}-é😀-" + "".join(rnd.choice("abcdefghij") for _ in range(pad))
        val = rnd.randint(-10**9, 10**9)
        lines.append(f"{i}\t{name}\t{val}\n")
        expect.append((i, name, val))
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)
    return expect


def test_load_data_local_infile(proxy, cluster, tables, tmp_path):
    table = "infile_clients"
    tables.append(table)
    small = tmp_path / "small.tsv"
    large = tmp_path / "large.tsv"
    want_small = _gen_file(small, 3000, 8)
    want_large = _gen_file(large, 20000, 100)
    assert large.stat().st_size > 2 * 1024 * 1024

    load = (f"LOAD DATA LOCAL INFILE %s INTO TABLE `{table}` CHARACTER SET utf8mb4 "
            "FIELDS TERMINATED BY '\\t' LINES TERMINATED BY '\\n' (id, name, val)")
    missing = str(tmp_path / "does-not-exist.tsv")

    def run(port):
        out = []
        with pymysql_conn(port, local_infile=True, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS `{table}`")
            cur.execute(f"CREATE TABLE `{table}` (id INT PRIMARY KEY, name VARCHAR(200), val INT) CHARACTER SET utf8mb4")
            for path in (small, large):
                n = cur.execute(load, (str(path),))
                out.append((n, cur.warning_count))
                cur.execute(f"SELECT id, name, val FROM `{table}` ORDER BY id")
                out.append(list(cur.fetchall()))
                cur.execute(f"TRUNCATE TABLE `{table}`")
            with pytest.raises(pymysql.err.OperationalError) as ei:
                cur.execute(load, (missing,))
            out.append(ei.value.args)
            cur.execute(f"SELECT COUNT(*) FROM `{table}`")  # the connection is still usable
            out.append(cur.fetchall())
            cur.execute(load, (str(small),))  # and can load again
            cur.execute(f"SELECT COUNT(*), SUM(val) FROM `{table}`")
            out.append(cur.fetchall())
        return out

    via_proxy = run(proxy.port)
    straight = run(cluster.primary.port)
    assert via_proxy == straight
    assert via_proxy[0] == (3000, 0) and via_proxy[1] == want_small
    assert via_proxy[2] == (20000, 0) and via_proxy[3] == want_large
    assert via_proxy[4][0] == 1017 and "does-not-exist.tsv" in via_proxy[4][1]
    assert via_proxy[5] == ((0,),)
    assert via_proxy[6] == ((3000, D(sum(r[2] for r in want_small))),)
