"""The cluster's decisions as one value: what the leader publishes and every instance applies.

The leader's Failover owns the decisions (which server is the primary, whether writes are held,
which servers await fencing or are kept out, what an operator set OFFLINE, whether automatic
failover is on); `decisions()` reads them as a plain dict, `changed()` says whether a publish is
due, and `apply()` makes a follower's Failover (and through it its monitor and workers) act on
the leader's. Nothing here talks to etcd.
"""

from __future__ import annotations

import logging

log = logging.getLogger("rwproxy.coord")

# keys that are facts of the moment, not decisions: a change in them alone is not republished
_VOLATILE = ("at", "epoch", "leader")


def decisions(failover) -> dict:
    st = failover.state.snapshot()
    return {
        "primary": failover.monitor.designated,
        "writes_held": bool(st["writes_held"]),
        "in_progress": st["in_progress"],
        "demoted": failover.state.demoted(),
        "kept_out": st["kept_out"],
        "admin": failover.monitor.admin_states(),
        "backup_pauses": failover.state.backup_pauses(),  # (the next leader resumes one a dead backup left)
        "auto_failover": st["auto_failover"],
        "disabled_reason": st["disabled_reason"],
        "cooldown_until": st["cooldown_until"],
        "last_failover": st["last_failover"],
        "last_switchover": st["last_switchover"],
    }


def changed(now: dict, published: dict | None) -> bool:
    if published is None:
        return True
    return any(now.get(k) != published.get(k) for k in now if k not in _VOLATILE)


def apply(failover, state: dict, *, as_leader: bool = False) -> list[str]:
    """Make this instance's picture the published one; returns what changed (for the log).

    A follower applies everything. An instance taking the lead applies the same once, so it
    carries on from where the last leader stopped (the servers it was fencing, its cooldown,
    what the operator set) instead of judging the cluster afresh."""
    said = []
    servers = failover.monitor.topology.servers
    primary = state.get("primary")
    if primary and primary in servers and primary != failover.monitor.designated:
        failover.actions.designate(primary)
        said.append(f"primary {primary}")
    held = bool(state.get("writes_held")) and not as_leader
    if failover.state.snapshot()["writes_held"] != held:
        failover.state.hold(held)
        failover.monitor.refresh()
        said.append("writes held" if held else "writes released")
    mine = failover.monitor.admin_states()
    theirs = {k: v for k, v in (state.get("admin") or {}).items() if k in servers}
    for name in set(mine) | set(theirs):
        if mine.get(name, "") != theirs.get(name, ""):
            failover.monitor.set_admin_state(name, theirs.get(name, ""))
            said.append(f"{name} {theirs.get(name) or 'online'}")
    pauses = state.get("backup_pauses") or {}
    for name in set(failover.state.backup_pauses()) | set(pauses):
        failover.state.paused_by_backup(name, pauses.get(name, ""))
    failover.state.mirror(state)
    return said
