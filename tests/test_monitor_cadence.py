"""Calm servers are checked on events, not on the tick (proxy/cluster/monitor/cadence.py).

Counted by the servers themselves, on private clusters that no other monitor watches: a calm
primary gets no check query of its own (its heartbeats are its checks), a calm replica one check
per CALM_REPLICA_BEATS heartbeats (the GTID wait and the check in one round trip), and a connection that the server
closes is replaced at once instead of at a tick that a calm server no longer has.
"""

from __future__ import annotations

import time

from proxy.cluster.monitor.cadence import CALM_REPLICA_BEATS
from tests.test_monitor import readable, run_monitor, wait_for  # noqa: F401 (run_monitor is a fixture)


def _status(node, *names) -> dict[str, int]:
    with node.connect() as c, c.cursor() as cur:
        cur.execute("SHOW GLOBAL STATUS WHERE Variable_name IN (%s)" % ", ".join(["%s"] * len(names)), names)
        return {k: int(v) for k, v in cur.fetchall()}


def _calm(mon, primary, replica) -> bool:
    nodes = mon._nodes
    return nodes[primary.name].calm == "writer" and nodes[replica.name].calm == "replica"


def _monitor_connections(node, user="rwproxy") -> dict[int, int]:
    """id -> ms idle, of the monitor user's connections."""
    with node.connect() as c, c.cursor() as cur:
        cur.execute("SELECT ID, TIME_MS FROM information_schema.PROCESSLIST WHERE USER = %s", (user,))
        return {int(i): int(ms) for i, ms in cur.fetchall()}


def test_calm_cluster_is_checked_by_its_heartbeats(cluster_factory, run_monitor):
    c = cluster_factory(replicas=1)
    p, r = c.primary, c.replicas[0]
    seen = {}
    for steady in (True, False):
        mon, rec = run_monitor(c, steady_checks=steady)
        assert readable(mon, r.name, True, 10)
        if not steady:
            time.sleep(1.0)
            assert not any(x.calm for x in mon._nodes.values())
        for _attempt in range(3):  # a window with no event in it (a heartbeat late on a busy machine stirs)
            if steady:
                assert wait_for(lambda: _calm(mon, p, r), 10), {n: x.calm for n, x in mon._nodes.items()}
            stirred = mon._stirred
            a_p, a_r, since = _status(p, "Com_select", "Com_insert_select"), _status(r, "Com_select"), time.time()
            time.sleep(3.0)
            b_p, b_r = _status(p, "Com_select", "Com_insert_select"), _status(r, "Com_select")
            if not steady or mon._stirred == stirred:
                break
        assert not steady or mon._stirred == stirred, "something stirred the monitor in every window"
        beats = b_p["Com_insert_select"] - a_p["Com_insert_select"]  # (a heartbeat is an INSERT ... SELECT)
        p_selects, r_selects = b_p["Com_select"] - a_p["Com_select"], b_r["Com_select"] - a_r["Com_select"]
        p_checks, r_checks = len(rec.of(p.name, since)), len(rec.of(r.name, since))
        states = mon.current_states()
        mon.stop()
        assert beats >= 4, beats
        assert all(s.fails == 0 for s in rec.of(p.name, since) + rec.of(r.name, since))
        assert states[r.name].readable and states[r.name].lag_ms is not None, states[r.name]
        seen[steady] = (beats, p_selects, r_selects, p_checks, r_checks)
        if steady:
            # the primary's only SELECTs are its heartbeats' own, and each heartbeat judged it
            assert p_selects <= beats + 1, seen
            assert p_checks >= beats - 2, seen
            # the replica: one check per CALM_REPLICA_BEATS heartbeats, each a MASTER_GTID_WAIT and the check
            assert beats // CALM_REPLICA_BEATS - 2 <= r_checks <= beats // CALM_REPLICA_BEATS + 2, seen
            assert 2 * r_checks - 3 <= r_selects <= 2 * r_checks + 3, seen
            assert states[r.name].lag_ms < 100, states[r.name]  # it waited for the heartbeat it checks
    # on the tick every server is asked every 100 ms, whatever the heartbeats do
    assert seen[False][1] > seen[False][0] + 10 and seen[False][4] > 2 * seen[False][0], seen


def test_connection_closed_under_a_calm_primary_is_replaced_at_once(cluster_factory, run_monitor):
    """A calm primary's check connection sits idle (its heartbeats judge it); when the server
    closes it (here KILL; a crash or restart alike) the monitor connects again at once, and a
    closed idle connection is no failed check: only the new attempt counts."""
    c = cluster_factory(replicas=1)
    p, r = c.primary, c.replicas[0]
    mon, rec = run_monitor(c)
    assert wait_for(lambda: _calm(mon, p, r), 10)
    assert wait_for(lambda: any(ms >= 800 for ms in _monitor_connections(p).values()), 5)
    before = _monitor_connections(p)
    idle = [i for i, ms in before.items() if ms >= 800]
    assert len(idle) == 1, before  # the check connection; the heartbeat's is busy every 250 ms
    since = time.time()
    with p.connect() as conn, conn.cursor() as cur:
        cur.execute(f"KILL {idle[0]}")
    assert wait_for(lambda: set(_monitor_connections(p)) - set(before), 3), _monitor_connections(p)
    assert idle[0] not in _monitor_connections(p)
    assert all(s.fails == 0 and s.state == "up" for s in rec.of(p.name, since))
    assert mon.topology.servers[p.name].state == "up"
