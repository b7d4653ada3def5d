"""The session state machine without servers (tests/sessionkit.py): response completion,
retries after a lost backend or shared connection, holds while writes wait for a primary, a
transaction lost in failover, pins and their release, read-your-writes in gtid mode. The same
behaviour against real MariaDB servers is in test_routing.py, test_multiplex.py,
test_failover.py and test_replica_faults.py."""

from __future__ import annotations

import pytest

from proxy.backend import shared as shared_mod
from proxy.backend.connection import BackendError
from proxy.cluster.topology import DOWN
from proxy.frontend import idle
from proxy.protocol.constants import CLIENT_MULTI_STATEMENTS, CLIENT_SESSION_TRACK, ER_CONNECTION_KILLED
from proxy.protocol.packets import frame, lenenc_str
from proxy.protocol.scan import RESULT

from sessionkit import AUTOCOMMIT, IN_TRANS, FakeBackend, FakeTransport, Kit, err, ok, query, result, run_soon, topology

REPLICAS = ("node2", "node3")


@pytest.fixture
def kit():
    k = Kit()
    yield k
    k.close()


def answered_read(kit, s, sql=b"SELECT v FROM t", value=b"1"):
    """Send a read, answer it from whichever replica got it; returns that server's name."""
    s.send(query(sql))
    name = next(n for n in REPLICAS if kit.sent_to(n) is not None)
    be = kit.sent_to(name)
    assert be.transport.take() == query(sql)
    be.answer(result(value))
    assert s.received() == result(value)
    return name


def test_a_response_completes_and_the_next_pipelined_command_follows(kit):
    s = kit.session()
    s.send(query(b"SELECT a FROM t") + query(b"SELECT b FROM t"))  # pipelined
    first = next(kit.sent_to(n) for n in REPLICAS if kit.sent_to(n) is not None)
    assert first.transport.take() == query(b"SELECT a FROM t")  # the second waits for the first
    assert s.conn.busy
    first.answer(result(b"a")[:10])  # part of the answer: relayed as it comes, still busy
    assert s.received() == result(b"a")[:10] and s.conn.busy
    first.answer(result(b"a")[10:])
    assert s.received() == result(b"a")[10:]
    second = kit.where(b"SELECT b FROM t")
    assert second in REPLICAS
    be = kit.sent_to(second)
    be.transport.take()
    be.answer(result(b"b"))
    assert s.received() == result(b"b")
    assert not s.conn.busy and s.conn.inflight is None


def test_bytes_past_the_end_of_a_response_close_the_connection_not_reach_the_client(kit, caplog):
    """A server that sends more than the response (a scanner bug, a desync) must not have the
    surplus relayed, nor stay in use: the next command would read it as its own answer."""
    s = kit.session()
    s.send(query(b"SELECT v FROM t"))
    name = next(n for n in REPLICAS if kit.sent_to(n) is not None)
    be = kit.sent_to(name)
    be.transport.take()
    be.answer(result(b"1") + ok())
    assert s.received() == result(b"1")
    assert be.closed and not s.conn.busy
    assert "unexpected bytes from the server after the end of a response" in caplog.text
    answered_read(kit, s, value=b"2")  # the session carries on, on another connection


def test_a_read_whose_replica_dies_before_answering_is_retried_elsewhere(kit):
    s = kit.session()
    s.send(query(b"SELECT v FROM t"))
    victim = next(n for n in REPLICAS if kit.sent_to(n) is not None)
    kit.sent_to(victim).hang_up()
    kit.settle()
    other = next(n for n in ("node1", *REPLICAS) if n != victim and kit.sent_to(n) is not None)
    assert other != victim
    be = kit.sent_to(other)
    assert be.transport.take() == query(b"SELECT v FROM t")
    assert victim in s.state.failed_servers  # not tried again for this statement
    be.answer(result(b"7"))
    assert s.received() == result(b"7")  # the client never noticed
    assert s.state.failed_servers == frozenset()  # ... and the next statement may use it again


def test_a_read_cut_off_midway_closes_the_client_connection(kit):
    s = kit.session()
    s.send(query(b"SELECT v FROM t"))
    name = next(n for n in REPLICAS if kit.sent_to(n) is not None)
    be = kit.sent_to(name)
    be.transport.take()
    be.answer(result(b"12345")[:12])  # part of the result reached the client
    be.hang_up()
    kit.settle()
    assert s.received() == result(b"12345")[:12]
    assert s.transport.closed  # the stream cannot be repaired: as with a crashed server


def test_a_write_whose_primary_dies_gets_an_error_not_a_retry(kit):
    s = kit.session()
    s.send(query(b"UPDATE t SET v = 1"))
    be = kit.sent_to("node1")
    assert be.transport.take() == query(b"UPDATE t SET v = 1")
    be.hang_up()
    kit.settle()
    out = s.received()
    assert out[4] == 0xFF and b"Lost connection to backend server node1" in out  # it may have committed
    assert not any(kit.sent_to(n) for n in REPLICAS)
    assert not s.conn.busy


def test_writes_wait_while_failover_holds_them_then_go_to_the_new_primary(kit):
    s = kit.session()
    kit.set_topology(topology(primary="node1", held=True, down=("node1",), version=2))
    s.send(query(b"INSERT INTO t VALUES (1)"))
    assert s.conn.busy and kit.where(b"INSERT") is None  # held: sent nowhere
    kit.set_topology(topology(primary="node2", version=3))  # failover published node2
    be = kit.sent_to("node2")
    assert be is not None and be.transport.take() == query(b"INSERT INTO t VALUES (1)")
    be.answer(ok())
    assert s.received() == ok()


def test_a_held_write_times_out_with_a_clear_error(kit):
    kit = Kit(failover={"write_hold_timeout": 0.2})
    try:
        s = kit.session()
        kit.set_topology(topology(held=True, version=2))
        s.send(query(b"DELETE FROM t"))
        kit.wait(0.4)
        out = s.received()
        assert out[4] == 0xFF and b"no writable primary within failover.write_hold_timeout" in out
    finally:
        kit.close()


def test_a_transaction_on_a_primary_that_stopped_being_one_is_lost_clearly(kit):
    s = kit.session()
    s.send(query(b"BEGIN"))
    be = kit.sent_to("node1")
    be.transport.take()
    be.answer(ok(AUTOCOMMIT | IN_TRANS))
    assert s.received() == ok(AUTOCOMMIT | IN_TRANS) and s.state.in_trx
    kit.set_topology(topology(primary="node2", version=2))  # failover: node2 is the primary now
    s.send(query(b"UPDATE t SET v = 2"))
    out = s.received()
    assert out[4] == 0xFF and out[5:7] == (1213).to_bytes(2, "little") and b"#40001" in out
    assert b"the transaction was lost" in out
    assert not s.state.in_trx and kit.where(b"UPDATE") is None  # sent nowhere
    s.send(query(b"UPDATE t SET v = 3"))  # the next statement starts afresh on the new primary
    assert kit.sent_to("node2").transport.take() == query(b"UPDATE t SET v = 3")


@pytest.mark.parametrize("pin, unpin", [
    (b"CREATE TEMPORARY TABLE tt (a INT)", None),
    (b"LOCK TABLES t WRITE", b"UNLOCK TABLES"),
    (b"SELECT GET_LOCK('x', 1)", b"SELECT RELEASE_LOCK('x')"),
])
def test_pins_keep_reads_on_the_primary_until_released(kit, pin, unpin):
    s = kit.session()
    s.send(query(pin))
    be = kit.sent_to("node1")
    be.transport.take()
    be.answer(result(b"1") if pin.startswith(b"SELECT") else ok())
    s.received()
    assert s.state.pin()
    s.send(query(b"SELECT v FROM t"))
    assert kit.where(b"SELECT v FROM t") == "node1"
    kit.sent_to("node1").transport.take()
    be.answer(result(b"5"))
    assert s.received() == result(b"5")
    if unpin is None:
        return
    s.send(query(unpin))
    kit.sent_to("node1").transport.take()
    be.answer(result(b"1") if unpin.startswith(b"SELECT") else ok())
    s.received()
    assert not s.state.pin()
    s.kit.wait(1.1)  # past the read-your-writes window of the pinning statement, if it counted as a write
    assert answered_read(kit, s) in REPLICAS


def test_a_transaction_pins_until_commit(kit):
    s = kit.session()
    s.send(query(b"BEGIN"))
    p = kit.sent_to("node1")
    p.transport.take()
    p.answer(ok(AUTOCOMMIT | IN_TRANS))
    s.received()
    s.send(query(b"SELECT v FROM t"))
    assert kit.where(b"SELECT v FROM t") == "node1"
    p.transport.take()
    p.answer(result(b"1", AUTOCOMMIT | IN_TRANS))
    s.received()
    s.send(query(b"COMMIT"))
    p.transport.take()
    p.answer(ok())
    s.received()
    assert not s.state.in_trx and not s.state.pin()
    assert answered_read(kit, s) in REPLICAS  # the transaction wrote nothing: no read-your-writes window


def _ok_with_gtid(gtid: bytes, info: bytes = b"") -> bytes:
    """An OK packet carrying last_gtid in its session state (CLIENT_SESSION_TRACK)."""
    var = lenenc_str(b"last_gtid") + lenenc_str(gtid)
    state = bytes((0,)) + lenenc_str(var)
    payload = b"\x00\x01\x00" + (AUTOCOMMIT | 0x4000).to_bytes(2, "little") + b"\x00\x00" + lenenc_str(info) + lenenc_str(state)
    return frame(payload, 1)


def _gtid_session(kit, caps_off: int = 0):
    s = kit.session()
    s.conn.caps &= ~caps_off
    s.state.failed_servers = frozenset({"node3"})  # left by an earlier retried read
    s.send(query(b"INSERT INTO t VALUES (1)"))
    p = kit.sent_to("node1")
    return s, p


def test_gtid_read_your_writes_takes_the_gtid_from_the_ok_packet():
    """A client that negotiated session tracking: last_gtid is tracked on its writer connection
    too, the write's OK carries it, and no SELECT @@last_gtid follows."""
    kit = Kit(routing={"read_your_writes": "gtid"})
    try:
        s, p = _gtid_session(kit)
        assert b"session_track_system_variables" in p.transport.take()  # (added to what the client tracks)
        p.answer(ok())
        kit.settle()
        assert p.transport.take() == query(b"INSERT INTO t VALUES (1)")
        p.answer(_ok_with_gtid(b"0-1-41"))
        assert s.received() == _ok_with_gtid(b"0-1-41")  # the client asked for tracking: it gets the state
        assert s.state.last_gtid == "0-1-41" and not s.conn.busy
        assert p.transport.take() == b""  # no extra round trip
        assert kit.worker.gtid_learned == [1, 0]
    finally:
        kit.close()


def test_a_client_without_session_tracking_gets_the_ok_it_expects():
    kit = Kit(routing={"read_your_writes": "gtid"})
    try:
        s, p = _gtid_session(kit, caps_off=CLIENT_SESSION_TRACK | CLIENT_MULTI_STATEMENTS)
        assert b"session_track_schema = OFF" in p.transport.take()  # last_gtid tracked for the proxy alone
        p.answer(ok())
        kit.settle()
        assert p.transport.take() == query(b"INSERT INTO t VALUES (1)")
        p.answer(_ok_with_gtid(b"0-1-43", info=b"Rows matched: 1"))
        got = s.received()
        assert got == frame(b"\x00\x01\x00" + AUTOCOMMIT.to_bytes(2, "little") + b"\x00\x00"
                            + lenenc_str(b"Rows matched: 1"), 1)  # state gone, flag cleared, info kept
        assert s.state.last_gtid == "0-1-43" and not s.conn.busy
    finally:
        kit.close()


def test_gtid_read_your_writes_fetches_the_gtid_when_the_server_cannot_track_it():
    """The fallback (and the known defect of issue 19: after a write in gtid mode the rest of the
    completion never ran)."""
    kit = Kit(routing={"read_your_writes": "gtid"})
    try:
        s, p = _gtid_session(kit)
        p.transport.take()
        p.answer(err(1193, "Unknown system variable 'session_track_system_variables'", b"HY000"))
        kit.settle()
        assert p.transport.take() == query(b"INSERT INTO t VALUES (1)")
        p.answer(ok())
        kit.settle()
        assert s.conn.busy  # until the GTID is known
        assert p.transport.take() == query(b"SELECT @@last_gtid")
        p.answer(result(b"0-1-42"))
        assert s.received() == ok()  # the client got its OK (and nothing of the proxy's own query)
        assert s.state.last_gtid == "0-1-42" and not s.conn.busy
        assert s.state.failed_servers == frozenset()
        assert kit.worker.gtid_learned == [0, 1]
    finally:
        kit.close()


def test_per_transaction_spreading_moves_to_another_master_after_a_write_in_gtid_mode():
    kit = Kit(routing={"read_your_writes": "gtid"}, cluster={"topology": "master-master", "write_spread": "transaction"})
    try:
        masters = topology()
        masters = type(masters)({n: s.__class__(**{**{f: getattr(s, f) for f in s.__slots__}, "role": "master"})
                                 for n, s in masters.servers.items() if n != "node3"}, 2, masters.updated)
        kit.set_topology(masters)
        s = kit.session()
        s.conn.caps &= ~CLIENT_SESSION_TRACK  # (several statements per packet allowed: GTIDs asked for)
        writers = []
        for i in range(4):
            s.send(query(b"INSERT INTO t VALUES (%d)" % i))
            name = kit.where(b"INSERT INTO t VALUES (%d)" % i)
            writers.append(name)
            be = kit.sent_to(name)
            be.transport.take()
            be.answer(ok())
            kit.settle()
            assert be.transport.take() == query(b"SELECT @@last_gtid")
            be.answer(result(b"0-1-%d" % i))
            s.received()
        assert set(writers) == {"node1", "node2"}  # not always the first one picked
    finally:
        kit.close()


def fake_shared_lines(monkeypatch) -> list:
    """Shared connections open as fake ones (a MariaDB server's); returns the list they are added to."""
    opened = []

    async def connect(server, key, caps, *args, factory, **kw):
        conn = factory(server, key, caps)
        conn.connection_made(FakeTransport(conn))
        conn.server_version = b"10.11.0-MariaDB"
        opened.append(conn)
        return conn

    monkeypatch.setattr(shared_mod, "connect", connect)
    return opened


def test_a_shared_read_whose_connection_dies_is_retried(monkeypatch):
    kit = Kit(pool={"multiplex": True})
    try:
        opened = fake_shared_lines(monkeypatch)
        s = kit.session()
        sql = b"SELECT v FROM t WHERE id = 1"
        line = None
        for _ in range(8):  # own connections until the digest is known small and fast and lines are open
            s.send(query(sql))
            line = next((c for c in opened if c.transport.out), None)
            if line is not None:
                break
            be = next(b for b in kit.pools.opened if b.transport.out)
            be.transport.take()
            be.answer(result(b"1"))
            assert s.received() == result(b"1")
        assert line is not None and s.conn.shared_on is line, "a read went to a shared connection"
        assert line.transport.take() == query(sql)
        line.transport.closed = True  # dies before answering
        run_soon(line.connection_lost, None)
        again = [be for be in kit.pools.opened + opened if be.transport.out and be is not line]
        assert again and again[0].transport.take() == query(sql)
        run_soon(again[0].data_received, result(b"1"))  # (a shared or an own connection)
        assert s.received() == result(b"1")  # the client never noticed
        assert s.conn.shared_on is None and not s.conn.busy
    finally:
        kit.close()


def test_a_shared_write_whose_connection_dies_is_not_run_again(monkeypatch):
    """A write on a shared connection that dies before answering may have run: the client is told
    the connection was lost, as by a server, and nothing sends it a second time."""
    kit = Kit(pool={"multiplex": True})
    try:
        opened = fake_shared_lines(monkeypatch)
        s = kit.session()
        sql = b"UPDATE t SET v = v + 1 WHERE id = 1"
        line = None
        for _ in range(8):  # the session's own connection until the digest is known and a line is open
            s.send(query(sql))
            line = next((c for c in opened if c.transport.out), None)
            if line is not None:
                break
            be = kit.sent_to("node1")
            assert be.transport.take() == query(sql)
            be.answer(ok(AUTOCOMMIT))
            assert s.received()[4] == 0
            idle.release(s.conn, 0.0, 0.0)  # idle: its own connection goes back (a write shares instead of taking one)
        assert line is not None and line.server.name == "node1" and s.conn.shared_on is line
        assert line.transport.take() == query(sql)
        line.transport.closed = True  # dies before answering
        run_soon(line.connection_lost, None)
        assert not [be for be in kit.pools.opened + opened if be.transport.out]  # not sent again
        got = s.received()
        assert got[4] == 0xFF and int.from_bytes(got[5:7], "little") == ER_CONNECTION_KILLED[0], got  # (2013 as a server sends it)
        assert s.conn.shared_on is None and not s.conn.busy
    finally:
        kit.close()


def test_a_replica_that_cannot_be_reached_is_routed_around(kit):
    kit.pools.refuse["node2"] = BackendError(2003, "HY000", "Can't connect to backend node2")
    kit.pools.refuse["node3"] = BackendError(2003, "HY000", "Can't connect to backend node3")
    s = kit.session()
    s.send(query(b"SELECT v FROM t"))
    be = kit.sent_to("node1")  # both replicas failed to connect: the primary answers
    assert be.transport.take() == query(b"SELECT v FROM t")
    be.answer(result(b"9"))
    assert s.received() == result(b"9")


def test_a_server_declared_down_drops_its_idle_connection(kit):
    s = kit.session()
    name = answered_read(kit, s)
    be = s.conn.backends[name]
    kit.set_topology(topology(down=(name,), version=2))
    assert name not in s.conn.backends and be in kit.pools.discarded


def test_the_session_stays_usable_after_an_error(kit):
    s = kit.session()
    s.send(query(b"SELECT * FROM nope"))
    name = next(n for n in REPLICAS if kit.sent_to(n))
    be = kit.sent_to(name)
    be.transport.take()
    be.answer(err())
    assert s.received() == err()
    assert not s.conn.busy
    assert answered_read(kit, s) in REPLICAS


def test_idle_sessions_are_closed_after_client_idle_timeout(kit):
    kit = Kit(proxy={"client_idle_timeout": 0.05})
    try:
        idle, busy = kit.session(), kit.session()
        busy.send(query(b"SELECT SLEEP(10)"))  # a long statement is not idleness
        kit.worker.close_idle_sessions()  # the first sweep that sees them waiting starts the clock
        kit.wait(0.1)
        kit.worker.close_idle_sessions()
        kit.settle()
        assert idle.transport.closed and not busy.transport.closed
    finally:
        kit.close()


def test_kinds_of_answers_are_scanned_not_decoded(kit):
    """A result split at every byte still completes once, and the client gets it byte for byte."""
    s = kit.session()
    s.send(query(b"SELECT v FROM t"))
    be = next(kit.sent_to(n) for n in REPLICAS if kit.sent_to(n))
    be.transport.take()
    assert be.scanner is not None and isinstance(be, FakeBackend)
    data = result(b"x" * 300)
    for i in range(len(data)):
        be.answer(data[i:i + 1])
    assert s.received() == data and not s.conn.busy
    assert RESULT == 0 and DOWN == "down"


def test_state_a_new_connection_cannot_restore_ends_the_session_as_a_server_would(kit):
    """Issue 20: the server ended the session's connection (wait_timeout, KILL, a restart); the
    session had a temporary table there. A silent reconnect would lose it: ERROR 1927, then close."""
    s = kit.session()
    s.send(query(b"CREATE TEMPORARY TABLE tt (a INT)"))
    p = kit.sent_to("node1")
    p.transport.take()
    p.answer(ok())
    s.received()
    p.hang_up()  # idle: the server closed it
    s.send(query(b"SELECT * FROM tt"))
    out = s.received()
    assert out[4] == 0xFF and out[5:7] == (1927).to_bytes(2, "little") and b"temporary tables" in out
    assert s.transport.closed
    assert len(kit.connections("node1")) == 1  # no new connection was opened behind the client's back


@pytest.mark.parametrize("stmt, why", [
    (b"PREPARE st FROM 'SELECT 1'", b"prepared statements (SQL PREPARE)"),
    (b"HANDLER t OPEN AS h", b"open HANDLER tables"),
    (b"CALL p()", b"state left by a stored procedure (CALL)"),
    (b"SELECT LAST_INSERT_ID(42)", b"LAST_INSERT_ID(expr) or sequence values"),
])
def test_state_rwproxy_cannot_replay_ties_the_session_and_is_not_lost_silently(kit, stmt, why):
    s = kit.session()
    s.send(query(stmt))
    p = kit.sent_to("node1")
    p.transport.take()
    p.answer(result(b"42") if stmt.startswith(b"SELECT") else ok())
    s.received()
    assert not s.state.releasable() and why.decode() in s.state.ties()
    p.hang_up()
    s.send(query(b"INSERT INTO t VALUES (1)"))  # the next statement for the primary finds it gone
    out = s.received()
    assert out[4] == 0xFF and out[5:7] == (1927).to_bytes(2, "little") and why in out
    assert s.transport.closed


def test_a_failed_prepare_ties_nothing(kit):
    s = kit.session()
    s.send(query(b"PREPARE st FROM 'SELEC 1'"))
    p = kit.sent_to("node1")
    p.transport.take()
    p.answer(err(1064, "You have an error in your SQL syntax", b"42000"))
    s.received()
    assert s.state.releasable() and s.state.ties() == []


def test_a_session_whose_settings_replay_reconnects_silently(kit):
    s = kit.session()
    s.send(query(b"SET SESSION sql_mode = 'ANSI_QUOTES'"))
    p = kit.sent_to("node1")
    p.transport.take()
    p.answer(ok())
    s.received()
    p.hang_up()
    s.send(query(b"INSERT INTO t VALUES (1)"))
    fresh = kit.connections("node1")[-1]
    assert fresh is not p
    assert fresh.transport.take() == query(b"SET SESSION sql_mode = 'ANSI_QUOTES'")  # replayed first
    fresh.answer(ok())
    kit.settle()
    assert fresh.transport.take() == query(b"INSERT INTO t VALUES (1)")
    fresh.answer(ok())
    assert s.received() == ok() and not s.transport.closed


def test_a_transaction_and_a_named_lock_lost_together_close_the_session(kit):
    s = kit.session()
    s.send(query(b"SELECT GET_LOCK('x', 1)"))
    p = kit.sent_to("node1")
    p.transport.take()
    p.answer(result(b"1"))
    s.received()
    s.send(query(b"BEGIN"))
    p.transport.take()
    p.answer(ok(AUTOCOMMIT | IN_TRANS))
    s.received()
    p.hang_up()
    s.send(query(b"UPDATE t SET v = 1"))
    out = s.received()
    assert out[5:7] == (1213).to_bytes(2, "little") and s.transport.closed  # one error, then closed


@pytest.mark.parametrize("arrival", ["together", "apart", "in pieces"])
def test_a_reset_and_the_reselected_database_cost_one_round_trip(kit, arrival):
    """The pool resets a connection and selects its database again in one write; the two
    answers may arrive in one read or several."""
    server = kit.worker.servers["node1"]
    be = FakeBackend(server, ("node1", "app", 0, 45, "app"), 0)
    be.connection_made(FakeTransport(be))
    done = kit.loop.create_task(be.reset("app"))
    kit.settle()
    assert be.transport.take() == frame(b"\x1f", 0) + frame(b"\x02app", 0)  # both at once
    answers = ok(status=0, seq=1) + ok(seq=1)  # (the reset's status: the servers' global autocommit)
    if arrival == "together":
        be.answer(answers)
    elif arrival == "apart":
        be.answer(ok(status=0, seq=1))
        assert not done.done()
        be.answer(ok(seq=1))
    else:
        for i in range(len(answers)):
            be.answer(answers[i:i + 1])
    kit.settle()
    assert done.result() is True and be.db == "app" and not be.db_touched and be.status == 0
    refused = kit.loop.create_task(be.reset("gone"))
    kit.settle()
    be.transport.take()
    be.answer(ok(seq=1) + err(1049, "Unknown database 'gone'", b"42000"))
    kit.settle()
    assert refused.result() is False  # the pool closes it
