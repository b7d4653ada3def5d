"""Pure logic of pipelined multiplexing (proxy/shared.py), no sockets: which shared connection a
command goes to, what a digest's profile lets share, and how a client's COM_STMT_EXECUTE is
rewritten for a shared connection. The behaviour on real servers is in test_multiplex.py."""

from __future__ import annotations

from types import SimpleNamespace

from proxy.backend.shared import SPILL_AFTER, Profiles, SharedLines, shared_execute_packet

KEY = ("node2", "app", 0, 45, "", ())


def lines(size: int, *pending: float):
    sl = SharedLines(None, SimpleNamespace(shared_connections=size, multiplex_max_bytes=65536,
                                           multiplex_max_time=0.01), 64)
    sl.lines[KEY] = [SimpleNamespace(name=f"c{i}", pending=p) for i, p in enumerate(pending)]
    opened = []
    sl._open = lambda server, key, password: opened.append(key)
    return sl, opened


def test_the_first_connection_with_room_takes_the_command():
    sl, opened = lines(2, SPILL_AFTER * 0.9, 0.0)
    assert sl.pick(None, KEY, "").name == "c0"  # not the emptier c1: batches stay big
    assert opened == []


def test_a_full_first_connection_spills_to_the_next():
    sl, opened = lines(3, SPILL_AFTER * 2, 0.0)
    assert sl.pick(None, KEY, "").name == "c1"
    assert opened == []


def test_when_all_are_full_the_least_loaded_takes_it_and_another_opens():
    sl, opened = lines(3, SPILL_AFTER * 3, SPILL_AFTER * 2)
    assert sl.pick(None, KEY, "").name == "c1"
    assert opened == [KEY]
    sl, opened = lines(2, SPILL_AFTER * 3, SPILL_AFTER * 2)
    assert sl.pick(None, KEY, "").name == "c1"
    assert opened == []  # at shared_connections already


def test_profiles_share_only_small_fast_quiet_digests():
    p = Profiles(max_bytes=1000, max_secs=0.01)
    p.learn("a", 100, 0.001, False)
    p.learn("big", 5000, 0.001, False)
    p.learn("slow", 100, 0.5, False)
    p.learn("warns", 100, 0.001, True)
    p.learn("SELECT SQL_CALC_FOUND_ROWS x", 100, 0.001, False)
    assert [d for d, v in p.table.items() if v[2]] == ["a"]
    p.learn("warns", 100, 0.001, False)  # a warning once is enough: SHOW WARNINGS must find it
    assert not p.table["warns"][2]


def test_an_execute_gets_the_backend_id_and_the_types_the_client_sent_once():
    stmt = SimpleNamespace(nparams=1, types=None, types_sent=set())
    body = b"\x17" + (7).to_bytes(4, "little") + b"\x00" + (1).to_bytes(4, "little")
    first = body + b"\x00" + b"\x01" + b"\x08\x00" + (42).to_bytes(8, "little")  # types sent
    pkt = len(first).to_bytes(3, "little") + b"\x00" + first
    out = shared_execute_packet(pkt, stmt, 99)
    assert out[5:9] == (99).to_bytes(4, "little") and out[9:] == pkt[9:]
    assert stmt.types == b"\x08\x00"
    again = body + b"\x00" + b"\x00" + (43).to_bytes(8, "little")  # types not sent again
    pkt2 = len(again).to_bytes(3, "little") + b"\x00" + again
    out2 = shared_execute_packet(pkt2, stmt, 5)
    payload = out2[4:]
    assert int.from_bytes(out2[:3], "little") == len(payload)
    assert payload[1:5] == (5).to_bytes(4, "little")
    assert payload[10:] == b"\x00" + b"\x01" + b"\x08\x00" + (43).to_bytes(8, "little")  # types put back


def test_an_execute_that_cannot_share():
    stmt = SimpleNamespace(nparams=1, types=None, types_sent=set())
    body = b"\x17" + (7).to_bytes(4, "little") + b"\x00" + (1).to_bytes(4, "little") + b"\x00" + b"\x00" + b"\x01" * 8
    pkt = len(body).to_bytes(3, "little") + b"\x00" + body
    assert shared_execute_packet(pkt, stmt, 5) is None  # types never seen: cannot supply them
    cursor = bytearray(pkt)
    cursor[9] = 1  # CURSOR_TYPE_READ_ONLY: a cursor lives on one connection
    assert shared_execute_packet(bytes(cursor), stmt, 5) is None
