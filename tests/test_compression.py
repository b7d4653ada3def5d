"""The compressed client protocol (CLIENT_COMPRESS) through rwproxy, against real servers.

A client that asks for compression gets compressed packets from rwproxy, as from the server,
and the same answers; the backends are never compressed. Connector/Python compresses whether or
not the greeting offered it, so before rwproxy spoke the protocol such a client hung at its
first command (found by Connector/Python's own test suite, BugOra17022399).
"""

from __future__ import annotations

import re
import struct
import zlib

import MySQLdb
import mysql.connector
import pytest

from proxy.frontend.compress import MAX_FRAME
from proxy.protocol.constants import CLIENT_COMPRESS
from proxy.protocol.packets import frame, parse_err
from proxy.testing.rawclient import RawClient
from test_clients import mariadb_cli, root_exec

BIG_ROWS = "SELECT seq, REPEAT('abc', seq MOD 700), seq * 2 FROM seq_1_to_3000"


def _packets_whole(frames) -> bool:
    """Every compressed packet ends where a MySQL packet ends, unless it is a full one (a longer
    packet's first part): Connector/Python joins a packet from at most two compressed ones."""
    stream = b"".join(f[3] for f in frames)
    ends, pos = set(), 0
    while pos + 4 <= len(stream):
        pos += 4 + int.from_bytes(stream[pos : pos + 3], "little")
        ends.add(pos)
    at = 0
    for f in frames:
        at += len(f[3])
        if at not in ends and len(f[3]) != MAX_FRAME:
            return False
    return True


def _answer(c: RawClient, sql: str) -> list[bytes]:
    c.frames.clear()
    c.send(b"\x03" + sql.encode(), 0)
    return c.read_until_eof()


def test_compressed_packets_carry_the_same_answers_with_the_servers_sequence_ids(proxy, cluster):
    direct = RawClient("127.0.0.1", cluster.primary.port)
    c = RawClient("127.0.0.1", proxy.port, compress=True)
    assert c.greeting.capabilities & CLIENT_COMPRESS
    try:
        for sql in ("SELECT 1", BIG_ROWS, "SELECT REPEAT('x', 17000000) AS v, 1", "SELECT * FROM no_such_table_cz"):
            direct.send(b"\x03" + sql.encode(), 0)
            want = direct.read_until_eof()
            got = _answer(c, sql)
            assert got == want, sql
            assert [f[0] for f in c.frames] == list(range(1, len(c.frames) + 1)), sql  # after the client's 0
            assert _packets_whole(c.frames), sql
        _answer(c, "SELECT REPEAT('x', 17000000) AS v, 1")  # cut only where one compressed packet cannot hold more
        assert max(len(f[3]) for f in c.frames) == MAX_FRAME
        _answer(c, BIG_ROWS)  # compressed, and much smaller
        assert any(f[2] for f in c.frames) and sum(f[1] for f in c.frames) * 3 < sum(len(f[3]) for f in c.frames)
        _answer(c, "SELECT 1")
        assert len(c.frames) == 1 and c.frames[0][2] == 0  # under 50 bytes: stored as is
        # one command in two compressed packets (ids 0 and 1): the answer continues at 2
        pkt = struct.pack("<I", 1 + len(BIG_ROWS))[:3] + b"\x00\x03" + BIG_ROWS.encode()
        c.frames.clear()
        c.send_compressed(pkt[:40], 0)
        c.send_compressed(pkt[40:], 1)
        rows = c.read_until_eof()
        assert len(rows) == 3000 + 5 and c.frames[0][0] == 2
    finally:
        c.close()
        direct.close()


@pytest.mark.parametrize("body, ulen, why", [
    (b"certainly not zlib data, but long enough to be compressed", 400, "bad zlib data"),
    (zlib.compress(b"\x05\x00\x00\x00\x03SELECT 1" * 40), 30, "wrong uncompressed length"),  # says less than it holds
])
def test_a_bad_compressed_packet_is_refused_as_the_server_refuses_it(proxy, cluster, body, ulen, why):
    c = RawClient("127.0.0.1", proxy.port, compress=True)
    bystander = RawClient("127.0.0.1", proxy.port, compress=True)
    try:
        c.sock.sendall(len(body).to_bytes(3, "little") + b"\x00" + ulen.to_bytes(3, "little") + body)
        _, err = c.read()
        code, state, msg = parse_err(err)
        assert (code, state) == (1157, "08S01") and "uncompress" in msg
        with pytest.raises((ConnectionError, OSError)):
            c.read()
        assert _answer(bystander, "SELECT 42")[2] == b"\x0242"
    finally:
        c.sock.close()
        bystander.close()
    assert why in proxy.process.log_tail(40)


def test_mariadb_cli_with_compression(proxy, cluster):
    cases = [["-e", "SELECT 1; SELECT 2"], ["-e", BIG_ROWS], ["-e", "SELECT 1; SELECT * FROM no_such_table_cz"]]
    for args in cases:
        want = mariadb_cli(cluster.primary.port, *args)
        for extra in (["--compress", "--skip-ssl"], ["--compress", "--ssl", f"--ssl-ca={proxy.cert}"]):
            got = mariadb_cli(proxy.port, *extra, *args)
            assert (got.returncode, got.stdout, got.stderr) == (want.returncode, want.stdout, want.stderr), extra + args
    status = mariadb_cli(proxy.port, "--compress", "--ssl", f"--ssl-ca={proxy.cert}", "-e", "status")
    assert re.search(rb"^Protocol:\s+Compressed", status.stdout, re.M), status.stdout
    assert re.search(rb"^SSL:\s+Cipher in use", status.stdout, re.M), status.stdout
    plain = mariadb_cli(proxy.port, "-e", "status")  # without --compress the session is not compressed
    assert plain.returncode == 0 and not re.search(rb"^Protocol:\s+Compressed", plain.stdout, re.M)


def _library_session(connect, port, table):
    out = []
    conn = connect(port)
    try:
        cur = conn.cursor()
        cur.execute(f"DROP TABLE IF EXISTS `{table}`")
        cur.execute(f"CREATE TABLE `{table}` (id INT PRIMARY KEY, b LONGBLOB)")
        blob = bytes(range(256)) * 12000 + zlib.compress(b"noise" * 99999)  # 3 MB, part of it incompressible
        cur.execute(f"INSERT INTO `{table}` VALUES (%s, %s), (%s, %s)", (1, blob, 2, b"short"))
        conn.commit()
        cur.execute(f"SELECT id, LENGTH(b), MD5(b) FROM `{table}` ORDER BY id")
        out.append(cur.fetchall())
        cur.execute(f"SELECT b FROM `{table}` WHERE id = 1")
        out.append(cur.fetchall()[0][0] == blob)
        cur.execute(BIG_ROWS)
        out.append(cur.fetchall())
        cur.execute("SELECT @@session.sql_mode = @@global.sql_mode, DATABASE()")
        out.append(cur.fetchall())
    finally:
        conn.close()
    return out


def test_mysqlclient_and_connector_python_with_compression(proxy, cluster):
    table = "compressed_clients"

    def mysqldb(port):
        return MySQLdb.connect(host="127.0.0.1", port=port, user="app", password="app", database="app",
                               compress=True, connect_timeout=10, read_timeout=60, write_timeout=60)

    def connector(port):
        return mysql.connector.connect(host="127.0.0.1", port=port, user="app", password="app", database="app",
                                       compress=True, use_pure=True, connection_timeout=10, read_timeout=60)

    try:
        for connect in (mysqldb, connector):
            want = _library_session(connect, cluster.primary.port, table)
            got = _library_session(connect, proxy.port, table)
            assert got == want, connect.__name__
            assert got[1] is True and len(got[2]) == 3000
    finally:
        root_exec(cluster, f"DROP TABLE IF EXISTS app.`{table}`")


def test_plain_packet_ids_inside_compressed_packets_are_not_checked(proxy, cluster):
    """A server does not check the ids of the plain packets inside compressed ones, and
    Connector/J relies on it: a command that goes uncompressed gets id 1, and the file of LOAD
    DATA LOCAL is numbered from 0. rwproxy passes them to plain server connections, which do
    check: such commands got ERROR 1156 Got packets out of order (most of Connector/J's suite
    with useCompression=true). The answers must be those of the primary itself."""
    table = "cz_ids"
    root_exec(cluster, f"CREATE TABLE IF NOT EXISTS app.{table} (v INT)", f"DELETE FROM app.{table}")

    def run(port: int) -> list:
        c = RawClient("127.0.0.1", port, compress=True)
        try:
            out = []
            c.send_compressed(frame(b"\x03INSERT INTO " + table.encode() + b" VALUES (1)", 1), 0)  # id 1
            out.append(c.read()[1][:2])
            c.send_compressed(frame(b"\x03LOAD DATA LOCAL INFILE 'ids.txt' INTO TABLE " + table.encode(), 0), 0)
            out.append(c.read()[1][:1])  # 0xFB: the file, please
            c.send_compressed(frame(b"2\n3\n", 0) + frame(b"", 1), c.cseq)  # numbered from 0
            out.append(c.read()[1][:2])  # OK, 2 rows
            c.send_compressed(frame(b"\x03SELECT COUNT(*) FROM " + table.encode(), 0), 0)
            out.append([p[-1:] for p in c.read_until_eof()][-2])  # (the one row's value)
            return out
        finally:
            c.close()

    try:
        assert run(cluster.primary.port) == [b"\x00\x01", b"\xfb", b"\x00\x02", b"3"]
        root_exec(cluster, f"DELETE FROM app.{table}")
        assert run(proxy.port) == [b"\x00\x01", b"\xfb", b"\x00\x02", b"3"]
    finally:
        root_exec(cluster, f"DROP TABLE IF EXISTS app.{table}")


def test_plain_packet_ids_are_renumbered_across_compressed_packets():
    """No servers: the layer numbers plain packets as a plain client would, wherever the
    compressed packets cut them (a 16 MiB packet and its rest, a file after the server's request)."""
    from proxy.frontend.compress import CompressionLayer

    class Sink:
        def write(self, data):
            pass

    layer = CompressionLayer(Sink())

    def stored(plain: bytes, seq: int = 0) -> bytes:  # one compressed packet, stored as is
        return len(plain).to_bytes(3, "little") + bytes((seq,)) + b"\x00\x00\x00" + plain

    def head(n: int, seq: int) -> bytes:
        return n.to_bytes(3, "little") + bytes((seq,))

    big = b"\x03" + b"x" * (0xFFFFFF - 1)  # a 16 MiB packet, then the empty one that ends the command
    stream = head(0xFFFFFF, 5) + big + head(0, 9) + frame(b"\x03SELECT 1", 7)  # ids a plain client would not send
    got = b"".join(layer.feed(stored(stream[i:i + 4_000_000])) for i in range(0, len(stream), 4_000_000))
    assert got == head(0xFFFFFF, 0) + big + head(0, 1) + frame(b"\x03SELECT 1", 0)
    layer.write(frame(b"\xfbids.txt", 1))  # the server asks for a file
    layer.file_follows()
    sent = frame(b"1\n", 0) + frame(b"", 0) + frame(b"\x0e", 3)
    assert layer.feed(stored(sent[:3]) + stored(sent[3:])) == frame(b"1\n", 2) + frame(b"", 3) + frame(b"\x0e", 0)
