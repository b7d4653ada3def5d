"""What MariaDB clients use that few others do, answered through rwproxy as the primary answers
it: COM_STMT_BULK_EXECUTE (array binding: libmariadb's STMT_ATTR_ARRAY_SIZE, MariaDB
Connector/Python's and Connector/J's executemany), extended column types in result metadata
(MARIADB_CLIENT_EXTENDED_METADATA), and the old administrative commands
COM_PROCESS_INFO, COM_DEBUG and COM_REFRESH (mysql_list_processes(), mysql_dump_debug_info(),
mysql_refresh()). Found by running MariaDB Connector/C's unit tests through rwproxy: its bulk
tests were skipped (rwproxy did not offer the capability) and the others got ERROR 1047."""

from __future__ import annotations

import struct

import pymysql
import pytest

from proxy.protocol.constants import CLIENT_MYSQL, MARIADB_CLIENT_STMT_BULK_OPERATIONS
from proxy.protocol.packets import frame, read_lenenc_int
from proxy.protocol.scan import PREPARE, RESULT
from proxy.testing.rawclient import RawClient

MINUS_ONE = b"\xff\xff\xff\xff"
INT, VARCHAR = 0x03, 0xFD


def _bulk(sid: bytes, rows, types=(INT, VARCHAR)) -> bytes:
    """COM_STMT_BULK_EXECUTE: statement id, flags (the types are sent), the types, then per row
    and parameter an indicator (0 a value follows, 1 NULL) and the value."""
    out = [b"\xfa", sid, struct.pack("<H", 128), b"".join(bytes((t, 0)) for t in types)]
    for row in rows:
        for value, t in zip(row, types):
            if value is None:
                out.append(b"\x01")
            elif t == INT:
                out.append(b"\x00" + struct.pack("<i", value))
            else:
                data = value.encode()
                out.append(b"\x00" + bytes((len(data),)) + data)
    return b"".join(out)


def _answer(p: bytes):
    """An OK as ("ok", affected rows); an ERR as (code, message)."""
    if p[0] == 0x00:
        return "ok", read_lenenc_int(p, 1)[0]
    assert p[0] == 0xFF, p
    return struct.unpack_from("<H", p, 1)[0], p[9:].decode()


def _rows(port: int, table: str):
    with pymysql.connect(host="127.0.0.1", port=port, user="app", password="app", database="app") as c:
        with c.cursor() as cur:
            cur.execute(f"SELECT * FROM `{table}` ORDER BY a")
            return cur.fetchall()


def test_the_greeting_offers_array_binding_as_the_server_does(proxy):
    for port in (proxy.port, proxy.cluster.primary.port):
        c = RawClient("127.0.0.1", port)
        try:
            caps = c.greeting.capabilities
        finally:
            c.close()
        assert not caps & CLIENT_MYSQL, port  # a MariaDB server: its extended capabilities follow
        assert caps & MARIADB_CLIENT_STMT_BULK_OPERATIONS, port


def test_bulk_execute_answers_as_the_server(proxy):
    results = {}
    for label, port in (("proxy", proxy.port), ("direct", proxy.cluster.primary.port)):
        table = f"bulk_raw_{label}"
        seen = []
        c = RawClient("127.0.0.1", port, bulk=True)
        try:
            c.command(f"\x03CREATE OR REPLACE TABLE `{table}` (a INT PRIMARY KEY, b VARCHAR(10))".encode())
            sid, _, _ = c.prepare(f"INSERT INTO `{table}` VALUES (?, ?)")
            sidb = struct.pack("<I", sid)
            c.send(_bulk(sidb, [(1, "one"), (2, None), (3, "three")]))
            seen.append(_answer(c.read()[1]))
            c.send(_bulk(sidb, [(4, "four"), (1, "again")]))  # a duplicate key: the whole command fails
            seen.append(_answer(c.read()[1]))
            c.send(_bulk(struct.pack("<I", 999), [(5, "x")]))
            seen.append(_answer(c.read()[1]))
            assert c.command(b"\x03BEGIN")[0] == 0x00
            c.send(_bulk(sidb, [(10, "ten"), (11, "eleven")]))
            seen.append(_answer(c.read()[1]))
            assert c.command(b"\x03ROLLBACK")[0] == 0x00  # it ran in the transaction: gone again
            # direct execution: PREPARE and a bulk execute of "the statement prepared last", pipelined
            c.sock.sendall(frame(f"\x16UPDATE `{table}` SET b = ? WHERE a = ?".encode(), 0)
                           + frame(_bulk(MINUS_ONE, [("uno", 1), ("tres", 3)], (VARCHAR, INT)), 0))
            seen.append(c.response(PREPARE)[0][0])
            seen.append(_answer(c.read()[1]))
            c.sock.sendall(frame(b"\x16SELEC 1", 0) + frame(_bulk(MINUS_ONE, [(1, "x")]), 0))
            seen.append(_answer(c.read()[1])[0])
            seen.append(_answer(c.read()[1]))  # -1 names no statement after a failed prepare
            assert c.command(b"\x03SELECT 1")[0] == 1  # the session goes on
        finally:
            c.close()
        old = RawClient("127.0.0.1", port)  # a client that did not ask for array binding
        try:
            sid, _, _ = old.prepare(f"INSERT INTO `{table}` VALUES (?, ?)")
            old.send(_bulk(struct.pack("<I", sid), [(7, "seven")]))
            seen.append(_answer(old.read()[1]))
        finally:
            old.close()
        seen.append(_rows(port, table))
        results[label] = seen

    assert results["proxy"] == results["direct"]
    assert results["direct"] == [
        ("ok", 3), (1062, "Duplicate entry '1' for key 'PRIMARY'"),
        (1243, "Unknown prepared statement handler (999) given to mysqld_stmt_execute"),
        ("ok", 2), 0x00, ("ok", 2), 1064,
        (1243, "Unknown prepared statement handler (4294967295) given to mysqld_stmt_execute"),
        (1295, "This command is not supported in the prepared statement protocol yet"),
        ((1, "uno"), (2, None), (3, "tres")),
    ]


def _global_status(node, name: str) -> int:
    with node.connect(user="rwproxy") as c:
        with c.cursor() as cur:
            cur.execute("SHOW GLOBAL STATUS LIKE %s", (name,))
            return int(cur.fetchone()[1])


def test_mariadb_connector_python_executemany_runs_as_one_bulk_command(proxy):
    """MariaDB's own Python connector sends executemany as COM_STMT_BULK_EXECUTE when the server
    offers it: 1,000 rows in a handful of commands instead of 1,000, through rwproxy as directly."""
    import mariadb  # (a test dependency: MariaDB Connector/Python)

    primary = proxy.cluster.primary.port
    results = {}
    for label, port in (("proxy", proxy.port), ("direct", primary)):
        table = f"bulk_connector_{label}"
        c = mariadb.connect(host="127.0.0.1", port=port, user="app", password="app", database="app", autocommit=True)
        seen = []
        try:
            cur = c.cursor()
            cur.execute(f"CREATE OR REPLACE TABLE `{table}` (a INT PRIMARY KEY, b VARCHAR(20), d DOUBLE)")
            rows = [(i, None if i % 3 == 0 else f"row {i}", i / 7) for i in range(1, 1001)]
            before = _global_status(proxy.cluster.primary, "Com_stmt_execute")
            cur.executemany(f"INSERT INTO `{table}` VALUES (?, ?, ?)", rows)
            executes = _global_status(proxy.cluster.primary, "Com_stmt_execute") - before
            seen.append(cur.rowcount)
            cur.execute(f"SELECT COUNT(*), SUM(a), COUNT(b), ROUND(SUM(d), 6) FROM `{table}`")  # right after
            seen.append(cur.fetchall())
            cur.executemany(f"UPDATE `{table}` SET b = ? WHERE a = ?", [("u", 1), ("v", 2), ("w", 5000)])
            seen.append(cur.rowcount)
            with pytest.raises(mariadb.Error) as err:
                cur.executemany(f"INSERT INTO `{table}` VALUES (?, ?, ?)", [(5000, "a", 1.0), (1, "dup", 2.0)])
            seen.append(err.value.errno)
            cur.execute(f"SELECT a, b FROM `{table}` WHERE a IN (1, 2, 3, 5000) ORDER BY a")
            seen.append(cur.fetchall())
            cur.execute(f"DROP TABLE `{table}`")
        finally:
            c.close()
        assert executes < 20, (label, executes)  # not one execute per row
        results[label] = seen
    assert results["proxy"] == results["direct"]
    assert results["direct"][:2] == [1000, [(1000, 500500, 667, round(sum(i / 7 for i in range(1, 1001)), 6))]]


@pytest.mark.parametrize("payload", [b"\x0a", b"\x0d", b"\x07\x04"],
                         ids=["COM_PROCESS_INFO", "COM_DEBUG", "COM_REFRESH"])
def test_old_administrative_commands_answer_as_the_server(proxy, payload):
    """Each goes to the primary; `app` lacks the privileges COM_DEBUG and COM_REFRESH need, so
    the answer to compare is the server's error (before, rwproxy answered 1047 itself)."""
    answers = []
    for port in (proxy.port, proxy.cluster.primary.port):
        c = RawClient("127.0.0.1", port)
        try:
            c.send(payload)
            if payload == b"\x0a":  # the process list: a result set of 9 columns (its rows differ)
                answers.append(c.response(RESULT)[0])
            else:
                first = c.read()[1]
                answers.append(_answer(first) if first[0] in (0x00, 0xFF) else first[:1])
            assert c.command(b"\x03SELECT 1")[0] == 1
        finally:
            c.close()
    assert answers[0] == answers[1]


def test_extended_column_types_reach_mariadb_clients_and_only_them(proxy):
    """MariaDB clients ask for extended type info (MARIADB_CLIENT_EXTENDED_METADATA): column
    definitions then carry one more field naming JSON, UUID, INET4/6 and geometry types. Such a
    session must get server connections that asked for it too, and a client that did not ask
    (PyMySQL) must never get one of those: the extra field would garble its column definitions."""
    import mariadb
    from mariadb.constants import EXT_FIELD_TYPE

    with proxy.connect(autocommit=True) as c, c.cursor() as cur:
        cur.execute("CREATE OR REPLACE TABLE ext_types (j JSON, u UUID, i4 INET4, i6 INET6, p POINT, n INT)")
        cur.execute("INSERT INTO ext_types VALUES ('{\"a\": 1}', '123e4567-e89b-12d3-a456-426614174000', "
                    "'192.0.2.1', '::1', POINT(1, 2), 42)")
    proxy.cluster.wait_replicas_caught_up(30)
    sql = "SELECT j, u, i4, i6, p, n FROM ext_types"
    seen = {}
    for label, port in (("proxy", proxy.port), ("direct", proxy.cluster.primary.port)):
        c = mariadb.connect(host="127.0.0.1", port=port, user="app", password="app", database="app", autocommit=True)
        try:
            cur = c.cursor()
            cur.execute(sql)
            rows = cur.fetchall()
            seen[label] = (cur.metadata["ext_type_or_format"], cur.metadata["type"], [r[:4] + r[5:] for r in rows])
        finally:
            c.close()
    assert seen["proxy"] == seen["direct"]
    assert list(seen["direct"][0][:5]) == [EXT_FIELD_TYPE.JSON, EXT_FIELD_TYPE.UUID, EXT_FIELD_TYPE.INET4,
                                           EXT_FIELD_TYPE.INET6, EXT_FIELD_TYPE.POINT]

    # Both kinds of client, turn about, on the same statement (shared connections keyed apart).
    mc = mariadb.connect(host="127.0.0.1", port=proxy.port, user="app", password="app", database="app", autocommit=True)
    pc = proxy.connect(autocommit=True)
    try:
        mcur, pcur = mc.cursor(), pc.cursor()
        for i in range(200):
            q = f"SELECT {i} AS n, 'x' AS s"
            mcur.execute(q)
            assert mcur.fetchall() == [(i, "x")]
            assert [d[0] for d in mcur.description] == ["n", "s"]
            pcur.execute(q)
            assert pcur.fetchall() == ((i, "x"),)
            assert [d[0] for d in pcur.description] == ["n", "s"]
    finally:
        mc.close()
        pc.close()
        with proxy.connect(autocommit=True) as c, c.cursor() as cur:
            cur.execute("DROP TABLE ext_types")
