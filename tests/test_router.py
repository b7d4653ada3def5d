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
    assert b.pick(pool, frozenset({"b"})) is None
