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
