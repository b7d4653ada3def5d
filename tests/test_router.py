"""The router's pure decisions: balancing policies and GTID coverage (no servers needed)."""

from __future__ import annotations

import collections

from proxy.routing.router import Balancer
from proxy.cluster.topology import REPLICA, ServerState


def reps(*specs):
    return [ServerState(name, "127.0.0.1", 1000 + i, weight=w, role=REPLICA, readable=True, lag_ms=lag)
            for i, (name, w, lag) in enumerate(specs)]


def test_least_outstanding_prefers_idle_and_respects_weight():
    b = Balancer("least-outstanding")
    pool = reps(("a", 1, 0.0), ("b", 1, 0.0))
    b.outstanding = {"a": 3, "b": 0}
    assert all(b.pick(pool).name == "b" for _ in range(10))
    # with weights 3:1 and equal load, the heavier server takes the read
    pool = reps(("a", 3, 0.0), ("b", 1, 0.0))
    b.outstanding = {"a": 1, "b": 0}
    assert b.pick(pool).name == "a"


def test_least_outstanding_spreads_when_idle():
    b = Balancer("least-outstanding")
    pool = reps(("a", 1, 0.0), ("b", 1, 0.0), ("c", 1, 0.0))
    counts = collections.Counter(b.pick(pool).name for _ in range(300))
    assert set(counts) == {"a", "b", "c"} and min(counts.values()) >= 80
    two = reps(("a", 1, 0.0), ("b", 1, 0.0))  # (two servers take a path of their own)
    assert collections.Counter(b.pick(two).name for _ in range(300)) == {"a": 150, "b": 150}
    b.outstanding = {"a": 2, "b": 1}
    assert {b.pick(two).name for _ in range(10)} == {"b"}
    b.outstanding = {"a": 1, "b": 1}  # equal load: weights decide, whichever is looked at first
    assert {b.pick(reps(("a", 1, 0.0), ("b", 2, 0.0))).name for _ in range(10)} == {"b"}
    assert {b.pick(reps(("a", 2, 0.0), ("b", 1, 0.0))).name for _ in range(10)} == {"a"}


def test_round_robin_is_weighted():
    b = Balancer("round-robin")
    pool = reps(("a", 2, 0.0), ("b", 1, 0.0))
    counts = collections.Counter(b.pick(pool).name for _ in range(300))
    assert counts == {"a": 200, "b": 100}


def test_lowest_lag_and_unknown_lag_last():
    b = Balancer("lowest-lag")
    pool = reps(("a", 1, 40.0), ("b", 1, 5.0), ("c", 1, None))
    assert b.pick(pool).name == "b"


def test_weight_zero_and_exclusions_are_never_picked():
    b = Balancer("least-outstanding")
    pool = reps(("a", 0, 0.0), ("b", 1, 0.0))
    assert {b.pick(pool).name for _ in range(20)} == {"b"}
    assert {b.pick(list(reversed(pool))).name for _ in range(20)} == {"b"}
    assert b.pick(pool, frozenset({"b"})) is None
    assert b.pick(reps(("a", 0, 0.0), ("b", 0, 0.0))) is None


# ---- plans: where statements about earlier ones go, and which writes may share ------------------

def _plan_kit(ryw="session"):
    from proxy.cluster.topology import PRIMARY, Topology
    from proxy.config.load import build_config
    from proxy.routing.classify import Classifier
    from proxy.routing.router import Router
    from proxy.routing.state import SessionState

    cfg = build_config({
        "proxy": {"listen": "127.0.0.1:6033"},
        "backends": [{"name": f"node{i}", "host": "127.0.0.1", "port": 3305 + i} for i in (1, 2)],
        "users": [{"name": "app", "password": "app"}],
        "routing": {"read_your_writes": ryw},
    })
    servers = {"node1": ServerState("node1", "127.0.0.1", 3306, role=PRIMARY)}
    servers.update({r.name: r for r in reps(("node2", 1, 0.0))})
    st = SessionState(cfg.users[0], cfg.routing.read_your_writes, cfg.routing.max_session_history)
    clf = Classifier()
    router = Router(cfg)
    topo = Topology(servers)

    def plan(sql, **kw):
        kw.setdefault("sharing", True)
        return router.plan(st, clf.classify(sql.encode()), topo, **kw)
    return st, plan


def test_last_insert_id_asks_the_writer_even_after_a_read_on_a_replica():
    """MariaDB answers LAST_INSERT_ID() with the session's last insert whatever ran since; the
    replica connection that ran the read in between never saw that insert."""
    from proxy.routing.router import WRITER
    st, plan = _plan_kit()
    st.last_backend = "node2"  # the previous statement was a read on the replica
    for sql in ("SELECT LAST_INSERT_ID()", "SELECT @@identity", "SELECT CONNECTION_ID()", "SELECT LASTVAL(s)"):
        assert plan(sql).target is WRITER, sql
    # ... while a statement about the previous statement goes where that one ran
    for sql in ("SHOW WARNINGS", "SELECT FOUND_ROWS()", "SELECT ROW_COUNT()", "SELECT @@warning_count"):
        assert plan(sql).target == "node2", sql
    # right after a shared read only those replay it (a read); LAST_INSERT_ID() needs no replay
    assert plan("SHOW WARNINGS", after_shared=True).replay_shared
    assert not plan("SELECT LAST_INSERT_ID()", after_shared=True).replay_shared


def test_autocommit_writes_may_share_unless_something_ties_them():
    st, plan = _plan_kit()
    assert plan("INSERT INTO t (v) VALUES (1)").share
    assert plan("UPDATE t SET v = 2 WHERE id = 3").share
    assert not plan("UPDATE t SET v = 2 WHERE id = 3", sharing=False).share
    assert not plan("INSERT INTO t (v) VALUES (1)", autocommit=False).share
    assert not plan("INSERT INTO t (v) VALUES (1)", primary_ok=False).share  # held in a failover
    assert not plan("INSERT INTO t (v) VALUES (@x)").share  # a user variable
    assert not plan("INSERT INTO t (v) VALUES (LAST_INSERT_ID())").share
    assert not plan("CREATE TABLE t2 (a INT)").share  # implicit commit
    assert not plan("XA START 'x'").share
    st.in_trx = True
    assert not plan("INSERT INTO t (v) VALUES (1)").share  # a transaction
    st.in_trx = False
    st.next_trx = True  # SET TRANSACTION pending: the next write on the primary uses it
    assert not plan("INSERT INTO t (v) VALUES (1)").share
    st.next_trx = False
    st.temp_tables = True
    assert not plan("INSERT INTO t (v) VALUES (1)").share


def test_with_no_writable_primary_a_set_or_use_runs_on_a_replica():
    """A session's SET/USE waits for no primary that is not there (down, failover off or held):
    it runs on a replica and is replayed elsewhere; a change of autocommit (followed on the writer
    alone), writes, and anything of a pinned session still go to the writer and wait."""
    from proxy.routing.router import WRITER, Why
    st, plan = _plan_kit()
    for sql in ("SET NAMES latin1", "SET time_zone = '+03:00'", "USE app", "SET @x = 1"):
        assert plan(sql).target is WRITER, sql  # with a primary: the writer, as always
        p = plan(sql, primary_ok=False)
        assert (p.target, p.why, p.hold) == ("node2", Why.NO_PRIMARY, False), sql
    for sql in ("SET autocommit = 1", "set autocommit=1, sql_mode='STRICT_TRANS_TABLES'"):  # (it stays on)
        assert plan(sql, primary_ok=False).target == "node2", sql
        assert plan(sql, primary_ok=False, autocommit=False).target is WRITER, sql  # it turns it on: the writer
    for sql in ("SET autocommit = 0", "INSERT INTO t VALUES (1)", "SET GLOBAL x = 1", "SET TRANSACTION READ ONLY",
                "BEGIN"):
        p = plan(sql, primary_ok=False)
        assert p.target is WRITER and p.hold, sql
    st.temp_tables = True  # pinned: its statements keep to the writer
    assert plan("SET NAMES latin1", primary_ok=False).target is WRITER


def test_writes_do_not_share_in_gtid_mode():
    """gtid read-your-writes learns each write's GTID from its own connection's OK packet."""
    _, plan = _plan_kit("gtid")
    assert not plan("INSERT INTO t (v) VALUES (1)").share
    assert plan("SELECT v FROM t WHERE id = 1").share


def test_a_write_digest_shares_once_confirmed_and_only_if_plain_dml():
    from proxy.backend.shared import Profiles, plain_dml
    assert plain_dml("INSERT INTO t VALUES (?)") and plain_dml("update t set v=?") and plain_dml("REPLACE INTO t")
    assert not plain_dml("SELECT ? FOR UPDATE") and not plain_dml("DO ?") and not plain_dml("")
    p = Profiles(65536, 0.01)
    assert p.learn("UPDATE t SET v=? WHERE id=?", 11, 0.0001, False, write=True)  # waits for confirmation
    assert p.shareable("UPDATE t SET v=? WHERE id=?") is None
    p.confirm("UPDATE t SET v=? WHERE id=?")
    assert p.shareable("UPDATE t SET v=? WHERE id=?") is not None
    p.never("UPDATE t SET v=? WHERE id=?")  # a statement about it followed it
    assert p.shareable("UPDATE t SET v=? WHERE id=?") is None
    p.confirm("UPDATE t SET v=? WHERE id=?")
    assert p.shareable("UPDATE t SET v=? WHERE id=?") is None  # never is for good
    assert not p.learn("SELECT ? FOR UPDATE", 11, 0.0001, False, write=True)  # not DML: never, nothing to confirm
    p.confirm("SELECT ? FOR UPDATE")
    assert p.shareable("SELECT ? FOR UPDATE") is None
    assert not p.learn("INSERT INTO t VALUES (?)", 11, 0.0001, True, write=True)  # warnings: never
    assert not p.learn("SELECT v FROM t", 50, 0.0001, False)  # reads need no confirmation
    assert p.shareable("SELECT v FROM t") is not None


# ---- session read-your-writes past the window: only where the write is known applied ---------

def test_past_the_window_a_session_that_wrote_reads_only_where_its_write_is_known_applied():
    import time as _time

    from proxy.cluster.progress import NO_PROOF, Progress
    from proxy.cluster.topology import PRIMARY, Topology
    from proxy.config.load import build_config
    from proxy.routing.classify import Classifier
    from proxy.routing.router import WRITER, Router, Why
    from proxy.routing.state import SessionState

    cfg = build_config({
        "proxy": {"listen": "127.0.0.1:6033"},
        "backends": [{"name": f"node{i}", "host": "127.0.0.1", "port": 3305 + i} for i in (1, 2, 3)],
        "users": [{"name": "app", "password": "app"}],
        "routing": {"read_your_writes": "session", "read_your_writes_window": 1.0},
    })
    servers = {"node1": ServerState("node1", "127.0.0.1", 3306, role=PRIMARY)}
    servers.update({r.name: r for r in reps(("node2", 1, 0.0), ("node3", 1, 0.0))})
    topo = Topology(servers)
    router = Router(cfg)
    board = router.progress = Progress(["node1", "node2", "node3"])
    st = SessionState(cfg.users[0], cfg.routing.read_your_writes, cfg.routing.max_session_history)
    read = Classifier().classify(b"SELECT v FROM t WHERE id = 1")

    def where():
        p = router.plan(st, read, topo)
        return p.target, p.why

    assert {where()[0] for _ in range(10)} == {"node2", "node3"}  # never wrote: the board is not asked
    st.last_write = _time.monotonic()
    board.record("node2", 0.0)
    board.record("node3", 0.0)
    assert where() == (WRITER, Why.RYW_WINDOW)  # inside the window nothing changes
    st.last_write -= 2.0  # past the window: neither replica is known to hold the write
    assert {where() for _ in range(10)} == {(WRITER, Why.RYW_UNPROVEN)}
    board.record("node3", st.last_write + 0.001)  # node3's check proved it applied
    assert {where() for _ in range(10)} == {("node3", Why.READ)}
    board.record("node2", st.last_write)
    assert {where()[0] for _ in range(10)} == {"node2", "node3"}
    st.failed_servers = frozenset({"node2", "node3"})  # (both failed this statement: the writer)
    assert where()[0] is WRITER
    st.failed_servers = frozenset()
    board.record("node2", 0.0)
    board.record("node3", NO_PROOF)  # no heartbeat to bound its lag: the window alone decides
    assert {where()[0] for _ in range(10)} == {"node3"}
    router.progress = None  # master-master (and tests without a board): the window alone
    board.record("node3", 0.0)
    assert {where()[0] for _ in range(10)} == {"node2", "node3"}


def test_the_progress_board_is_shared_with_forked_workers_and_follows_the_lag_bound():
    import os

    from proxy.cluster.monitor.lag import LagReading
    from proxy.cluster.progress import NO_PROOF, Progress, applied_stamp

    board = Progress(["a", "b"])
    assert board.applied("a") == NO_PROOF and board.applied("unknown") == NO_PROOF
    pid = os.fork()
    if pid == 0:  # the monitor's side lives in another process than the routers
        board.record("b", 123.5)
        os._exit(0)
    os.waitpid(pid, 0)
    assert board.applied("b") == 123.5 and board.applied("a") == NO_PROOF
    board.add(["c", "a"])  # a reload adds a server: a slot of its own, the others unchanged
    assert board.slots == {"a": 0, "b": 1, "c": 2} and board.applied("c") == NO_PROOF
    assert applied_stamp(10.0, LagReading(250.0, "heartbeat", 0.0, 400.0)) == 10.0 - 0.4  # the upper bound
    assert applied_stamp(10.0, LagReading(250.0, "heartbeat", 0.0, None)) is None  # beyond the timeline: keep
    assert applied_stamp(10.0, LagReading(2000.0, "seconds_behind")) == NO_PROOF
    assert applied_stamp(10.0, LagReading(200.0, "heartbeat-stale", 0.0, 200.0)) is None  # writer not sampled
    assert applied_stamp(10.0, LagReading(2000.0, "frozen")) is None
    assert applied_stamp(10.0, None) is None


def test_gtid_mode_skips_the_wait_on_a_replica_proven_to_hold_the_write():
    """The topology's positions reach a worker about once a second; the monitor's proof as soon as a
    check ends: a replica proven past the write needs no MASTER_GTID_WAIT round trip."""
    import time as _time

    from proxy.cluster.progress import NO_PROOF, Progress
    from proxy.cluster.topology import PRIMARY, Topology
    from proxy.config.load import build_config
    from proxy.routing.classify import Classifier
    from proxy.routing.router import Router, Why
    from proxy.routing.state import SessionState

    cfg = build_config({
        "proxy": {"listen": "127.0.0.1:6033"},
        "backends": [{"name": f"node{i}", "host": "127.0.0.1", "port": 3305 + i} for i in (1, 2)],
        "users": [{"name": "app", "password": "app"}],
        "routing": {"read_your_writes": "gtid"},
    })
    servers = {"node1": ServerState("node1", "127.0.0.1", 3306, role=PRIMARY)}
    servers.update({r.name: r for r in reps(("node2", 1, 0.0))})  # (its position: unknown to this snapshot)
    topo = Topology(servers)
    router = Router(cfg)
    st = SessionState(cfg.users[0], cfg.routing.read_your_writes, cfg.routing.max_session_history)
    st.wrote("0-1-7")
    read = Classifier().classify(b"SELECT v FROM t WHERE id = 1")
    p = router.plan(st, read, topo)
    assert (p.target, p.why, p.wait_gtid) == ("node2", Why.GTID_WAIT, True)  # no board: wait there
    board = router.progress = Progress(["node1", "node2"])
    p = router.plan(st, read, topo)
    assert (p.target, p.why, p.wait_gtid) == ("node2", Why.GTID_WAIT, True)  # NO_PROOF proves nothing here
    board.record("node2", st.last_write - 0.01)
    assert router.plan(st, read, topo).wait_gtid
    board.record("node2", _time.monotonic())
    p = router.plan(st, read, topo)
    assert (p.target, p.why, p.wait_gtid) == ("node2", Why.GTID_CAUGHT_UP, False)
    assert NO_PROOF > _time.monotonic()


def test_what_a_read_only_transaction_refuses_is_the_servers_list():
    """START TRANSACTION READ ONLY refuses changed and locked rows, sequences and new temporary tables
    with 1792 (measured on MariaDB 10.11), and lets the rest run where the transaction runs."""
    from proxy.routing.classify import Classifier
    from proxy.routing.router import refused_read_only

    c = Classifier()
    refused = ["INSERT INTO t VALUES (1)", "update t set a = 1", "(DELETE FROM t)", "REPLACE INTO t VALUES (1)",
               "LOAD DATA LOCAL INFILE 'f' INTO TABLE t", "CREATE TEMPORARY TABLE x (a INT)",
               "SELECT * FROM t FOR UPDATE", "SELECT NEXTVAL(s)", "SELECT NEXT VALUE FOR s", "SELECT SETVAL(s, 5)",
               "INSERT INTO t SELECT * FROM t"]
    allowed = ["SAVEPOINT a", "SELECT * FROM t LOCK IN SHARE MODE", "DO GET_LOCK('x', 0)", "SET @q := (SELECT 1)",
               "SELECT 'INSERT INTO t'", "SELECT updated FROM t", "CALL p()"]
    assert [q for q in refused if not refused_read_only(c.classify(q.encode()))] == []
    assert [q for q in allowed if refused_read_only(c.classify(q.encode()))] == []
