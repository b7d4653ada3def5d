"""The benchmark runner's own logic: the order of runs inside each round decides what a run
inherits from the one before it (a write test's replication backlog), so it must be fair."""

from __future__ import annotations

import itertools

import pytest

from benchmarks.run import balanced_rounds, minimal_toml, round_order
from proxy.config.load import parse_config


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_round_order_runs_each_endpoint_first_and_after_each_other_equally_often(n):
    items = [f"ep{i}" for i in range(n)]
    rounds = n if n % 2 == 0 else 2 * n  # a Williams design balances in n rounds (2n when n is odd)
    orders = [round_order(items, r) for r in range(rounds)]
    for order in orders:
        assert sorted(order) == sorted(items)  # every endpoint runs once per round
    firsts = [o[0] for o in orders]
    assert all(firsts.count(x) == rounds // n for x in items)
    follows = [(o[i], o[i + 1]) for o in orders for i in range(n - 1)]
    pairs = list(itertools.permutations(items, 2))
    assert sorted(set(follows)) == sorted(pairs)  # each endpoint runs right after each other one...
    assert all(follows.count(p) == follows.count(pairs[0]) for p in pairs)  # ...equally often


def test_a_plain_rotation_would_not_be_fair():
    """What round_order replaced: rotating [direct, split, ...] kept split right after direct."""
    items = ["direct", "split", "before", "haproxy"]
    rotated = [items[r:] + items[:r] for r in range(4)]
    after_direct = {o[(o.index("direct") + 1) % 4] for o in rotated}
    assert after_direct == {"split"}
    fair = {o[o.index("direct") + 1] for r in range(4) if (o := round_order(items, r)).index("direct") < 3}
    assert len(fair) == 3


def test_a_modes_config_names_only_what_the_mode_sets():
    """A baseline checkout (MODE@before) refuses keys it predates, so the runner writes only the
    keys a mode sets; the text must still mean what the mode asked for."""
    data = {"proxy": {"listen": "127.0.0.1:7001", "workers": 2, "cpu_affinity": "none"},
            "backends": [{"name": "node1", "host": "127.0.0.1", "port": 7002},
                         {"name": "node2", "host": "127.0.0.1", "port": 7003}],
            "users": [{"name": "app", "password": "app"}],
            "monitor": {"user": "rwproxy", "password": "rwproxy"},
            "routing": {"read_write_split": True}, "failover": {"auto_failover": False}}
    text = minimal_toml(data)
    assert "[proxy.tls]" not in text and "max_prepared_per_connection" not in text
    cfg = parse_config(text, "mode.toml")
    assert [b.port for b in cfg.backends] == [7002, 7003]
    assert cfg.proxy.workers == 2 and cfg.routing.read_write_split and not cfg.failover.auto_failover


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_balanced_rounds_balance_the_order(n):
    """Over balanced_rounds(n) rounds each entry follows each other one equally often; over n
    rounds of an odd n it does not (direct, A and B over 3 rounds: A followed direct twice)."""
    def follows(rounds):
        seen = {}
        for r in range(rounds):
            row = round_order(list(range(n)), r)
            for a, b in zip(row, row[1:]):
                seen[(a, b)] = seen.get((a, b), 0) + 1
        return seen
    full = follows(balanced_rounds(n))
    assert len(full) == n * (n - 1) and len(set(full.values())) == 1
    if n % 2:
        assert len(set(follows(n).values())) > 1 or len(follows(n)) < n * (n - 1)
