"""Is the primary dead? Pure decisions on a topology snapshot (no SQL), unit-tested alone."""

from __future__ import annotations

from proxy.cluster.topology import DOWN, MAINTENANCE, ServerState, Topology

# verdict() kinds
ALIVE, SUSPECT, UNCONFIRMED, DEAD = "alive", "suspect", "unconfirmed", "dead"


def replicates_from(s: ServerState, p: ServerState) -> bool:
    """s is configured to replicate from p: same server id, or the same host:port."""
    if s.source_id is not None and p.server_id is not None and s.source_id == p.server_id:
        return True
    return bool(s.source) and s.source == p.address


def verdict(topo: Topology, name: str, failcount: int, verify: bool) -> tuple[str, str]:
    """Is the primary `name` dead?  (ALIVE | SUSPECT | UNCONFIRMED | DEAD, detail).

    Dead needs the monitor's DOWN state after at least `failcount` consecutive failed checks
    and, with `verify`, every reachable replica that replicates from it having lost it too
    (IO thread not running). A replica still receiving its binlog means the trouble is between
    rwproxy and the primary, not the primary: no failover.
    """
    p = topo.servers.get(name)
    if p is None or p.state == MAINTENANCE:
        return ALIVE, ""
    if p.state != DOWN or p.fails < failcount:
        return (SUSPECT if p.fails else ALIVE), ""
    detail = f"{p.fails} failed checks: {p.last_error}"
    if not verify:
        return DEAD, detail
    others = [s for s in topo.servers.values() if s.name != name and s.state not in (DOWN, MAINTENANCE)]
    if not others:
        return UNCONFIRMED, "no replica answers to confirm it"
    still = [s.name for s in others if replicates_from(s, p) and s.io_running]
    if still:
        return UNCONFIRMED, f"{', '.join(still)} still receive{'s' if len(still) == 1 else ''} its binlog"
    lost = [s.name for s in others if replicates_from(s, p)]
    return DEAD, detail + (f"; {', '.join(lost)} lost it too" if lost else "")
