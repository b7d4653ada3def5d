"""Is the primary dead? Pure decisions on a topology snapshot (no SQL), unit-tested alone."""

from __future__ import annotations

import time

from proxy.cluster import gtid
from proxy.cluster.topology import DOWN, MAINTENANCE, ServerState, Topology

# verdict() kinds
ALIVE, SUSPECT, UNCONFIRMED, DEAD = "alive", "suspect", "unconfirmed", "dead"


def replicates_from(s: ServerState, p: ServerState) -> bool:
    """s is configured to replicate from p: same server id, or the same host:port."""
    if s.source_id is not None and p.server_id is not None and s.source_id == p.server_id:
        return True
    return bool(s.source) and s.source == p.address


def followers(topo: Topology, p: ServerState) -> int:
    """How many other servers are configured to replicate from p."""
    return sum(1 for s in topo.servers.values() if s.name != p.name and replicates_from(s, p))


def verdict(topo: Topology, name: str, failcount: int, verify: bool, silence: float = 0.0,
            now: float | None = None, unanswered: float = 0.0) -> tuple[str, str]:
    """Is the primary `name` dead?  (ALIVE | SUSPECT | UNCONFIRMED | DEAD, detail).

    Dead needs the monitor's DOWN state after at least `failcount` consecutive failed checks
    and, with `verify`, every reachable replica that replicates from it having lost it too
    (IO thread not running). A replica still receiving its binlog means the trouble is between
    rwproxy and the primary, not the primary: no failover.

    A hung primary (a frozen VM, a stuck disk) answers nobody, but its replicas' IO threads keep
    their connections up until slave_net_timeout (60 s by default), and each check of it takes a
    whole read_timeout to fail. With `silence` (seconds, the replica_silence setting) the replicas'
    own evidence decides as soon as it is there: the primary is dead when a check of it failed or
    the one under way has waited `silence` seconds (`unanswered`), it has not answered rwproxy for
    `silence` seconds (`now`: time.time()), and every reachable
    replica of it has lost it or has received nothing from it (no event, no heartbeat) for
    `silence` seconds and for 2.5 of its heartbeat periods. If only rwproxy's path to the primary
    is broken, the replicas still hear its heartbeats: no failover.
    """
    p = topo.servers.get(name)
    if p is None or p.state == MAINTENANCE:
        return ALIVE, ""
    now = time.time() if now is None else now
    if verify and silence and (p.fails or unanswered >= silence) and now - p.last_ok >= silence:
        hung = _silent(topo, p, silence)
        if hung:
            why = f"{p.fails} failed checks: {p.last_error}" if p.fails else "a check unanswered"
            since = f"for {now - p.last_ok:.1f} s" if p.last_ok else "since rwproxy started"
            return DEAD, f"no answer {since} ({why}); {hung}"
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


def _silent(topo: Topology, p: ServerState, silence: float) -> str:
    """'' unless every reachable replica of `p` lost it or has heard nothing from it for long
    enough; then what they say, for the log."""
    mine = [s for s in topo.servers.values() if s.name != p.name and s.state not in (DOWN, MAINTENANCE)
            and replicates_from(s, p)]
    if not mine:
        return ""
    quiet = []
    for s in mine:
        if s.io_running is False:
            continue  # lost it outright
        if s.source_silent is None or s.source_silent < max(silence, 2.5 * (s.heartbeat_period or 0.0)):
            return ""
        quiet.append(s.source_silent)
    return (f"{', '.join(s.name for s in mine)} heard nothing from it "
            + (f"for {min(quiet):.1f} s (heartbeat every {mine[0].heartbeat_period or 0:g} s): hung" if quiet
               else "any more"))


def writable_blocker(topo: Topology, p: ServerState) -> str:
    """'' when the read-only primary `p` may be made writable ([failover] enforce_writable_primary),
    else why not. It may not while it replicates (it is somebody's replica: adopt() decides), while
    another server is writable (a switchover by hand in progress), or while a server holds
    transactions it lacks (it lost some in a crash, or a replica was written to): writing there
    would fork the history its replicas continue."""
    if p.io_running or p.sql_running:
        return f"it replicates from {p.source or 'another server'}"
    live = [s for s in topo.servers.values() if s.name != p.name and s.state not in (DOWN, MAINTENANCE)
            and not s.fails and s.last_ok]
    writable = [s.name for s in live if s.read_only is False]
    if writable:
        return f"{', '.join(writable)} {'is' if len(writable) == 1 else 'are'} writable"
    for s in live:
        extra = gtid.ahead(s.gtid_current_pos, p.gtid_current_pos)
        if extra:
            return f"{s.name} holds {gtid.describe_ahead(extra)} it lacks (its position {s.gtid_current_pos})"
    return ""


def read_only_head(topo: Topology) -> ServerState | None:
    """With no writable server at all (a whole cluster restarted with read_only=1 in its my.cnf):
    the live server that replicates from nobody and that the most replicas follow, if exactly one
    such server stands out (enforce_writable_primary designates it)."""
    heads = [s for s in topo.servers.values() if s.state not in (DOWN, MAINTENANCE) and not s.fails and s.last_ok
             and s.read_only is True and not s.io_running and not s.sql_running]
    ranked = sorted(((followers(topo, s), s.name) for s in heads), reverse=True)
    if not ranked or (len(ranked) > 1 and ranked[0][0] == ranked[1][0]):
        return None
    return topo.servers[ranked[0][1]]
