"""MariaDB's direct execution through the proxy: COM_STMT_PREPARE pipelined with a
COM_STMT_EXECUTE whose statement id is -1 ("the statement prepared last"), as MariaDB
connectors send it to a MariaDB >= 10.2 server. The proxy must answer as the server does."""

from __future__ import annotations

import ctypes
import ctypes.util
import struct

import pytest

from proxy.protocol.packets import frame
from proxy.protocol.scan import PREPARE, RESULT
from proxy.testing.rawclient import RawClient

MINUS_ONE = b"\xff\xff\xff\xff"


def _execute(sid: bytes, value: int) -> bytes:
    """COM_STMT_EXECUTE of a one-parameter statement: no cursor, types sent, a BIGINT value."""
    return b"\x17" + sid + b"\x00" + struct.pack("<I", 1) + b"\x00" + b"\x01" + b"\x08\x00" + struct.pack("<q", value)


def _error(p: bytes) -> tuple[int, str]:
    assert p[0] == 0xFF, p
    return struct.unpack_from("<H", p, 1)[0], p[9:].decode()


def _through_and_direct(proxy, run) -> tuple[list, list]:
    """`run(client)`'s answers through rwproxy and straight from the primary, each on a new raw
    connection."""
    answers = {}
    for port in (proxy.port, proxy.cluster.primary.port):
        c = RawClient("127.0.0.1", port)
        try:
            answers[port] = run(c)
        finally:
            c.close()
    return answers[proxy.port], answers[proxy.cluster.primary.port]


def _pipelined(port: int, sql: bytes, value: int) -> tuple[list[bytes], list[bytes]]:
    c = RawClient("127.0.0.1", port)
    try:
        c.sock.sendall(frame(b"\x16" + sql, 0) + frame(_execute(MINUS_ONE, value), 0))
        return c.response(PREPARE), c.response(RESULT)
    finally:
        c.close()


def test_prepare_and_execute_minus_one_pipelined_answer_like_the_server(proxy):
    sql = b"SELECT ? + 1 AS v, 'direct' AS how"
    via = _pipelined(proxy.port, sql, 41)
    direct = _pipelined(proxy.cluster.primary.port, sql, 41)
    assert via[0][0][0] == 0x00, via[0]  # the prepare's OK
    assert via[0][0][5:] == direct[0][0][5:] and via[0][1:] == direct[0][1:]  # all but the statement id
    assert via[1] == direct[1]  # the execute's result, byte for byte
    row = via[1][-2]
    assert struct.unpack_from("<q", row, 2)[0] == 42 and row.endswith(b"\x06direct")


def test_minus_one_after_a_failed_prepare_is_unknown_as_on_the_server(proxy):
    answers = []
    for port in (proxy.port, proxy.cluster.primary.port):
        c = RawClient("127.0.0.1", port)
        try:
            first, _, _ = c.prepare("SELECT ? - 1")  # prepared fine, but a failed prepare follows it
            c.sock.sendall(frame(b"\x16SELEC 1", 0) + frame(_execute(MINUS_ONE, 1), 0))
            answers.append((_error(c.read()[1])[0], _error(c.read()[1])))
            c.send(_execute(struct.pack("<I", first), 1), 0)  # the earlier statement is still there
            assert struct.unpack_from("<q", c.response(RESULT)[-2], 2)[0] == 0
            sid, _, _ = c.prepare("SELECT ? * 2")  # a good one: -1 names it from now on
            c.send(b"\x1a" + MINUS_ONE, 0)  # COM_STMT_RESET
            assert c.read()[1][0] == 0x00
            c.send(_execute(MINUS_ONE, 21), 0)
            row = c.response(RESULT)[-2]
            assert struct.unpack_from("<q", row, 2)[0] == 42
            c.send(_execute(struct.pack("<I", sid), 5), 0)  # and its own id still works
            assert struct.unpack_from("<q", c.response(RESULT)[-2], 2)[0] == 10
            assert c.command(b"\x03SELECT 1")[0] == 1
        finally:
            c.close()
    assert answers[0] == answers[1]
    assert answers[0][0] == 1064
    assert answers[0][1] == (1243, "Unknown prepared statement handler (4294967295) given to mysqld_stmt_execute")


def _libmariadb():
    name = ctypes.util.find_library("mariadb")
    if name is None:
        pytest.fail("libmariadb not found (the test setup installs libmariadb-dev)")
    lib = ctypes.CDLL(name)
    p = ctypes.c_void_p
    for fn, res, args in (
        ("mysql_init", p, [p]),
        ("mysql_real_connect", p, [p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                   ctypes.c_uint, ctypes.c_char_p, ctypes.c_ulong]),
        ("mysql_error", ctypes.c_char_p, [p]),
        ("mysql_stmt_init", p, [p]),
        ("mariadb_stmt_execute_direct", ctypes.c_int, [p, ctypes.c_char_p, ctypes.c_size_t]),
        ("mysql_stmt_store_result", ctypes.c_int, [p]),
        ("mysql_stmt_num_rows", ctypes.c_ulonglong, [p]),
        ("mysql_stmt_error", ctypes.c_char_p, [p]),
        ("mysql_stmt_close", ctypes.c_char, [p]),
        ("mysql_close", None, [p]),
    ):
        f = getattr(lib, fn)
        f.restype, f.argtypes = res, args
    return lib


def test_libmariadb_execute_direct_through_the_proxy(proxy):
    """Connector/C's mariadb_stmt_execute_direct(), the real client library's API for it: it must
    work through the proxy whatever the library chooses to send."""
    lib = _libmariadb()
    m = lib.mysql_init(None)
    try:
        assert lib.mysql_real_connect(m, b"127.0.0.1", b"app", b"app", b"app", proxy.port, None, 0), lib.mysql_error(m)
        for n in (5, 1000):
            st = lib.mysql_stmt_init(m)
            q = f"SELECT seq FROM seq_1_to_{n}".encode()
            assert lib.mariadb_stmt_execute_direct(st, q, len(q)) == 0, lib.mysql_stmt_error(st)
            assert lib.mysql_stmt_store_result(st) == 0, lib.mysql_stmt_error(st)
            assert lib.mysql_stmt_num_rows(st) == n
            lib.mysql_stmt_close(st)
    finally:
        lib.mysql_close(m)


def test_minus_one_without_parameter_types_is_malformed_as_on_the_server(proxy):
    """The server takes a direct execution (-1) of a statement with parameters only with their
    types, even when an earlier execute by the real id sent them: 1835 otherwise, where the real id
    gets 1210 or runs. rwproxy names the statement by its id and answered those like the real id
    (MariaDB Connector/Node.js's `execute('SELECT ?', [])`, which pipelines PREPARE and an execute of
    -1 without parameters, then succeeded or got 1210 instead of its 1835)."""
    sql = "SELECT ? AS a, ? AS b"
    bodies = [b"", b"\x00", b"\x00\x00", b"\x00\x00" + struct.pack("<q", 5), b"\x03\x00",
              b"\x00\x01\x08\x00\x08\x00" + struct.pack("<qq", 5, 6)]
    def run(c):
        out = []
        for body in bodies:
            for by_id in (False, True):
                sid, _, _ = c.prepare(sql)
                c.send(b"\x17" + (struct.pack("<I", sid) if by_id else MINUS_ONE) + b"\x00\x01\x00\x00\x00" + body, 0)
                p = c.read()[1]
                if p[0] == 0xFF:
                    out.append(_error(p))
                else:
                    rows = c.read_until_eof()
                    out.append(("rows", len(rows)))
        c.sock.sendall(frame(b"\x16" + sql.encode(), 0) + frame(b"\x17" + MINUS_ONE + b"\x00\x01\x00\x00\x00", 0))
        assert c.response(PREPARE)[0][0] == 0x00
        out.append(_error(c.read()[1]))  # pipelined, as Connector/Node.js sends it
        return out
    via, direct = _through_and_direct(proxy, run)
    assert direct[-1] == (1835, "Malformed communication packet")
    assert via == direct


def test_statement_commands_too_short_to_name_a_statement_answer_as_on_the_server(proxy):
    """An adversarial client's truncated statement commands: an execute shorter than its id, flags
    and iteration count, and an array-binding execute shorter than id and flags, are 1835 on the
    server (rwproxy answered 1243 for -1, and 1295 for the array binding), and a FETCH or RESET
    with a partial id is 1243 (the server completes the id with whatever its buffer held from an
    earlier command, so only the code and the wording are compared)."""
    packets = [bytes([cmd]) + fill * n for cmd, most in ((0x17, 9), (0xFA, 6), (0x1C, 4), (0x1A, 4))
               for fill in (b"\x00", b"\x01", b"\xff") for n in range(most + 1)]
    packets += [b"\x19", b"\x19\x01", b"\x18\x01\x00"]  # CLOSE and SEND_LONG_DATA: no answer at all
    def run(c):
        out = []
        for pkt in packets:
            c.send(pkt, 0)
            if pkt[0] in (0x18, 0x19):
                continue
            p = c.read()[1]
            code, text = _error(p) if p[0] == 0xFF else (p[:1], "")
            if pkt[0] in (0x1A, 0x1C) and len(pkt) < 5:
                text = text.split("(")[0] + "(...) " + text.split(") ", 1)[-1]
            out.append((code, text))
        out.append(c.command(b"\x03SELECT 1")[:1])  # the connection goes on
        return out
    via, direct = _through_and_direct(proxy, run)
    assert (1835, "Malformed communication packet") in direct and (
        1243, "Unknown prepared statement handler (...) given to mysqld_stmt_fetch") in direct
    assert via == direct


def test_executes_with_odd_parameter_blocks_get_the_servers_answers(proxy):
    """Executes whose new-params-bound flag is neither 0 nor 1, or whose parameter block is cut
    short, compared with the primary. rwproxy took a flag of 0xFF for "no new types" and put the
    types remembered from an earlier execute in front of the client's bytes, so a statement the
    server refuses (1835) ran (an adversarial probe's finding)."""
    bodies = [b"\x00\x01\x08\x00\x08\x00" + b"\x01" * 16, b"\x00\x00" + b"\x01" * 16, b"", b"\x00", b"\x00\x01",
              b"\x00\x01\x08\x00", b"\xff\xff\x01\x08\x00\x08\x00", b"\x00\x02\x08\x00\x08\x00" + b"\x01" * 16,
              b"\x00\x01\xfe\x00\xfe\x00\xfc\xff\xffab", b"\x00\x01\x0f\x00\x0f\x00\x02hi\x02yo"]
    def run(c):
        out = []
        for sql in ("SELECT ?, ?", "SELECT ? + 1"):
            sid, _, _ = c.prepare(sql)
            head = b"\x17" + struct.pack("<I", sid) + b"\x00\x01\x00\x00\x00"
            for _ in range(2):  # (the second round may run on shared connections)
                for body in bodies:
                    c.send(head + body, 0)
                    p = c.read()[1]
                    out.append(_error(p) if p[0] == 0xFF else ("rows", len(c.read_until_eof())))
        c.send(b"\x03SELECT 1", 0)
        out.append(len(c.read_until_eof()))
        return out
    via, direct = _through_and_direct(proxy, run)
    assert (1835, "Malformed communication packet") in direct
    assert via == direct
