"""Pure logic of pipelined multiplexing (proxy/backend/shared.py), no sockets: which shared
connection a command goes to and what a digest's profile lets share. How an execute is rewritten
for a shared connection is in test_statements.py; the behaviour on real servers in
test_multiplex.py."""

from __future__ import annotations

from types import SimpleNamespace

from proxy.backend.shared import SPILL_AFTER, Profiles, SharedLines

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
    assert [d for d in p.table if p.shareable(d) is not None] == ["a"]
    assert p.shareable("a") == 0.001 and p.shareable("unknown") is None
    p.learn("warns", 100, 0.001, False)  # a warning once is enough: SHOW WARNINGS must find it
    assert p.shareable("warns") is None


def test_a_fast_digest_keeps_sharing_through_stalls_and_a_slow_one_stops():
    p = Profiles(max_bytes=1000, max_secs=0.01)
    for _ in range(50):
        p.learn("fast", 100, 0.0002, False)
    for _ in range(5):  # a stall of the event loop: a few responses read 80 ms late
        p.learn("fast", 100, 0.08, False)
        assert p.shareable("fast") is not None
    p.learn("fast", 100, 0.0002, False)
    assert p.shareable("fast") is not None
    for _ in range(200):  # slow for good (the table grew, an index went): it stops sharing
        p.learn("fast", 100, 0.05, False)
    assert p.shareable("fast") is None
