"""Prepared statements across backends (proxy/routing/statements.py) and the one execute-packet
rewriter (proxy/protocol/packets.py), no sockets: backend ids, parameter types a connection
missed, and what may not go to a shared connection."""

from __future__ import annotations

import struct

import pytest

from proxy.protocol.packets import ProtocolError, execute_int_param, execute_types_offset, rewrite_execute
from proxy.routing.statements import DIRECT_ID, StatementMap, Stmt


def execute(stmt_id: int, *, types: bytes | None, value: int, cursor: int = 0) -> bytes:
    """A framed COM_STMT_EXECUTE of one BIGINT parameter."""
    body = b"\x17" + stmt_id.to_bytes(4, "little") + bytes((cursor,)) + (1).to_bytes(4, "little") + b"\x00"
    body += (b"\x01" + types if types is not None else b"\x00") + value.to_bytes(8, "little")
    return len(body).to_bytes(3, "little") + b"\x00" + body


def params(pkt: bytes) -> bytes:
    """What follows the NULL bitmap: the new-params-bound flag, types, values."""
    return pkt[4 + 11:]


def test_rewriter_changes_the_id_and_puts_types_in():
    pkt = execute(7, types=None, value=43)
    at = execute_types_offset(1)
    assert at == 4 + 10 + 1 and pkt[at] == 0
    assert rewrite_execute(pkt, 7) is pkt  # same id, no types: no copy
    out = rewrite_execute(pkt, 99, b"\x08\x00", at)
    assert int.from_bytes(out[:3], "little") == len(out) - 4
    assert out[5:9] == (99).to_bytes(4, "little")
    assert params(out) == b"\x01\x08\x00" + (43).to_bytes(8, "little")
    assert execute_types_offset(0) == -1 and execute_types_offset(9) == 4 + 10 + 2


def test_own_connections_get_types_they_missed_once():
    stmt = Stmt(b"SELECT ?", None, b"", 1)
    first = execute(1, types=b"\x08\x00", value=42)
    out = stmt.packet_for(first, "node1", 5)
    assert out[5:9] == (5).to_bytes(4, "little") and params(out) == params(first)
    assert stmt.types == b"\x08\x00" and stmt.types_sent == {"node1"}
    later = execute(1, types=None, value=43)
    assert params(stmt.packet_for(later, "node1", 5)) == params(later)  # node1 has them
    to_node2 = stmt.packet_for(later, "node2", 3)
    assert params(to_node2) == b"\x01\x08\x00" + (43).to_bytes(8, "little")  # put back for node2
    assert params(stmt.packet_for(later, "node2", 3)) == params(later)  # ... once


def test_shared_connections_always_get_the_types():
    stmt = Stmt(b"SELECT ?", None, b"", 1)
    first = execute(7, types=b"\x08\x00", value=42)
    out = stmt.shared_packet(first, 99)
    assert out[5:9] == (99).to_bytes(4, "little") and out[9:] == first[9:]
    assert stmt.types == b"\x08\x00" and stmt.types_sent == set()
    again = stmt.shared_packet(execute(7, types=None, value=43), 5)
    assert again[5:9] == (5).to_bytes(4, "little")
    assert params(again) == b"\x01\x08\x00" + (43).to_bytes(8, "little")


def test_an_execute_that_cannot_share():
    stmt = Stmt(b"SELECT ?", None, b"", 1)
    assert stmt.shared_packet(execute(7, types=None, value=1), 5) is None  # types never seen
    stmt.types = b"\x08\x00"
    assert stmt.shared_packet(execute(7, types=None, value=1, cursor=1), 5) is None  # a cursor stays put


def test_statement_map_bounds_backend_statements_per_server():
    m = StatementMap(max_per_connection=2)
    ids = [m.add(Stmt(b"q%d" % i, None, b"", 0)) for i in range(3)]
    assert m.last == ids[-1] and DIRECT_ID not in ids
    assert m.bind(ids[0], "node1", 10) == [] and m.bind(ids[1], "node1", 11) == []
    assert m.bind(ids[2], "node1", 12) == [10]  # the least recently used one is closed there
    assert "node1" not in m.stmts[ids[0]].ids
    m.forget_server("node1")
    assert all(not s.ids for s in m.stmts.values())


def _one_param(types: bytes | None, value: bytes, null: bool = False) -> bytes:
    body = b"\x17" + (1).to_bytes(4, "little") + b"\x00" + (1).to_bytes(4, "little") + (b"\x01" if null else b"\x00")
    body += (b"\x01" + types if types is not None else b"\x00") + value
    return len(body).to_bytes(3, "little") + b"\x00" + body


def test_an_executes_only_parameter_as_the_server_makes_it_an_integer():
    """What a prepared `KILL ?` (answered by rwproxy) reads as the thread id."""
    at = execute_types_offset(1)
    longlong, double, varchar = b"\x08\x00", b"\x05\x00", b"\xfd\x00"
    assert execute_int_param(_one_param(longlong, (16777219).to_bytes(8, "little")), at, None) == (16777219, longlong)
    assert execute_int_param(_one_param(b"\x01\x80", b"\xff"), at, None)[0] == 255  # unsigned TINY
    assert execute_int_param(_one_param(b"\x01\x00", b"\xff"), at, None)[0] == -1
    assert execute_int_param(_one_param(double, struct.pack("<d", 1.5)), at, None)[0] == 2  # rounded, as the server
    assert execute_int_param(_one_param(varchar, b"\x0512345"), at, None)[0] == 12345
    assert execute_int_param(_one_param(varchar, b"\x03abc"), at, None)[0] == 0
    assert execute_int_param(_one_param(longlong, b"", null=True), at, None)[0] == 0
    # no types in this execute: the remembered ones
    assert execute_int_param(_one_param(None, b"\x0242"), at, varchar) == (42, varchar)
    for cut in (_one_param(longlong, b"\x01\x00"), _one_param(None, b"\x01"), _one_param(varchar, b"")):
        with pytest.raises(ProtocolError):
            execute_int_param(cut, at, None)
