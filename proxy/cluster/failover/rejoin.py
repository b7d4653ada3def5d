"""Who may write: the first primary, switchovers made outside rwproxy, fencing and rejoin.

Failover decides *that* a primary changes; this module keeps the cluster honest
afterwards.  Every server that is not the designated primary is made read-only
when it shows up writable while the primary is writable (fenced); while the
primary is read-only, a writable server may be the target of a switchover made
by hand.  Old primaries, and replicas still pointing at one, are made replicas
of the new primary, but only if they hold no
transaction the new primary never saw: their GTID position is compared with the
position the new primary had when it took over (the end of the shared history),
per domain.  A server that is ahead is kept out (MAINTENANCE) with one plain log
line, because rejoining it would either fail or silently drop those
transactions.  Functions take the failover's Actions (act) and run on its thread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from proxy.cluster import gtid
from proxy.cluster.failover import ops
from proxy.cluster.failover.actions import label
from proxy.cluster.failover.detect import followers, read_only_head, replicates_from, writable_blocker
from proxy.cluster.failover.ops import StepError
from proxy.cluster.topology import DOWN, MAINTENANCE, PRIMARY, ServerState, Topology

log = logging.getLogger("rwproxy.failover")

REJOIN_RETRY = 5.0  # s between two fence/rejoin attempts on one server


def _once(act, key: str, level: int, message: str) -> None:
    if act.state.first_time(key):
        log.log(level, "%s", message)


def designate_initial(act, topo: Topology) -> None:
    """The first primary: the live writer (the one most replicas follow if several), else the dead
    server the replicas follow (so a primary that died before rwproxy started is failed over), else
    the read-only server they follow (writes get its 1290, as from a primary made read-only by
    hand, instead of waiting write_hold_timeout for a primary nobody would bring)."""
    servers = topo.servers
    if not all(s.last_check for s in servers.values()):
        return  # wait for every server's first check

    live = [s for s in servers.values() if s.role == PRIMARY and s.state not in (DOWN, MAINTENANCE)]
    if live:
        chosen = max(live, key=lambda p: (followers(topo, p), -act.order[p.name]))
        if len(live) > 1:
            log.warning("several writable servers (%s): %s is the primary (%d replicas follow it); "
                        "the others are fenced", ", ".join(s.name for s in live), chosen.name, followers(topo, chosen))
            act.state.demote_unless_known([s.name for s in live if s is not chosen])
    else:
        dead = [s for s in servers.values() if s.state == DOWN and followers(topo, s)]
        head = None if dead else read_only_head(topo)
        if dead:
            chosen = max(dead, key=lambda s: followers(topo, s))
            log.warning("no writable server; the replicas follow %s, which is down", label(chosen))
        elif head is not None:  # (a whole cluster restarted with read_only=1 in every my.cnf)
            chosen = head
            log.warning("no writable server; %s replicates from nobody and %d replica(s) follow it: it is the "
                        "primary, read-only (%s)", label(head), followers(topo, head),
                        "enforce_writable_primary makes it writable" if act.cfg.enforce_writable_primary else
                        "writes get its read-only error 1290 until it is writable; see enforce_writable_primary")
        else:
            _once(act, "noprimary", logging.WARNING,
                  "no writable server, and no server that the replicas follow is up: no primary yet")
            return
    act.designate(chosen.name)
    log.info("primary: %s", label(chosen))
    act.learn_semi(chosen)


def adopt(act, topo: Topology, p: ServerState) -> bool:
    """The primary went read-only and replicates from a writable server: someone switched over
    by hand (or with another tool). Follow it rather than fence the new writer."""
    if p.state in (DOWN, MAINTENANCE) or p.fails or p.read_only is not True:
        act.state.forget("readonly", "handover", "writable-blocked")
        return False
    src = next((s for s in topo.servers.values() if s.name != p.name and s.read_only is False
                and s.state not in (DOWN, MAINTENANCE) and not s.fails and replicates_from(p, s)), None)
    if src is None:
        if act.cfg.enforce_writable_primary:
            make_writable(act, topo, p)
        else:
            _once(act, "readonly", logging.WARNING,
                  f"the primary {label(p)} is read-only: writes get its read-only error (1290) until it is "
                  f"writable again (use switchover to change primaries, or set enforce_writable_primary)")
        return False
    log.warning("the primary %s is read-only and replicates from %s, which is writable: following that "
                "switchover made outside rwproxy", label(p), label(src))
    act.designate(src.name)
    act.learn_semi(src)
    return True


def make_writable(act, topo: Topology, p: ServerState) -> None:
    """enforce_writable_primary: SET GLOBAL read_only=0 on the read-only primary (a restart with
    read_only=1 in its my.cnf, a SET by hand) unless writable_blocker objects, judged on the
    snapshot and again on fresh facts of the primary. At most every REJOIN_RETRY seconds."""
    why = writable_blocker(topo, p)
    if not why:
        if not act.state.retry_due("writable", REJOIN_RETRY):
            return
        try:
            with act.link(p) as link:
                f = act.read_facts(link, p)
                if not f.read_only:
                    return
                why = writable_blocker(topo, replace(p, gtid_current_pos=f.applied, io_running=f.io_state == "Yes",
                                                     sql_running=f.sql_state == "Yes"))
                if not why:
                    act.guard(f"make {p.name} writable", link)
                    link.q("SET GLOBAL read_only = 0")
        except StepError as exc:
            log.warning("the primary %s is read-only; making it writable failed (retrying in %.0f s): %s",
                        label(p), REJOIN_RETRY, exc)
            return
    if why:
        _once(act, "writable-blocked", logging.ERROR,
              f"the primary {label(p)} is read-only and stays so although enforce_writable_primary is set: "
              f"{why}. Writes get its read-only error (1290); resolve by hand")
        return
    act.state.forget("writable-blocked")
    log.warning("the primary %s was read-only: SET GLOBAL read_only=0 (enforce_writable_primary)", label(p))


def fence_and_rejoin(act, topo: Topology, p: ServerState) -> None:
    """While the primary is healthy: fence every other writable server, rejoin old primaries and the
    replicas still following one (each server at most every REJOIN_RETRY seconds)."""
    if p.state in (DOWN, MAINTENANCE) or p.fails:
        return
    for s in topo.servers.values():
        if s.name == p.name or s.state in (DOWN, MAINTENANCE) or s.fails or not s.last_ok:
            continue
        demoted = act.state.demoted()
        src = next((d for d in demoted if d in topo.servers and replicates_from(s, topo.servers[d])), None)
        if not (s.read_only is False or s.name in demoted or src):
            continue
        if p.read_only is not False and s.name not in demoted and src is None:
            # Two writers are what fencing prevents; with the primary read-only there is one. An
            # operator switching over by hand makes the new server writable before pointing the old
            # primary at it: fencing it in between left no writable server at all (seen in a test).
            _once(act, "handover", logging.WARNING,
                  f"{label(s)} is writable while the primary {p.name} is read-only: a switchover by hand? "
                  f"{s.name} becomes the primary once {p.name} replicates from it; not fenced meanwhile")
            continue
        if not act.state.retry_due(s.name, REJOIN_RETRY):
            continue
        try:
            rejoin(act, s, p, demoted, src)
        except StepError as exc:
            log.warning("rejoin of %s failed (retrying in %.0f s): %s", s.name, REJOIN_RETRY, exc)


def rejoin(act, s: ServerState, p: ServerState, demoted: dict, src: str | None) -> None:
    """Fence s; if it is (or follows) a demoted server, make it a replica of p unless it is ahead.

    Decided on fresh facts, not on the snapshot that triggered it. Its gtid_slave_pos is set to
    everything it holds (binlog and applied) first: an old primary's own slave position is empty
    or ancient, and MASTER_USE_GTID=slave_pos would otherwise replay history it already has.
    """
    t = time.monotonic()
    cfg, state = act.cfg, act.state
    with act.link(s) as link:
        act.guard(f"fence {s.name}", link)
        f = act.read_facts(link, s)
        if not f.read_only:
            link.q("SET GLOBAL read_only = 1")
            log.warning("fenced %s: SET GLOBAL read_only=1 (it was writable; %s is the primary)", label(s), p.name)
        if s.name not in demoted and src is None:
            return  # a stray writable replica: fencing was all it needed
        if f.follows(p.host, p.port, p.server_id):
            state.undemote(s.name)  # already done (the snapshot that brought us here was older)
            return
        if not cfg.auto_rejoin:
            log.warning("%s stays fenced and out of replication (auto_rejoin = false)", label(s))
            state.undemote(s.name)
            return
        if f.replicating:  # from a demoted server: stop it so the position compared is the one used
            link.q("STOP SLAVE")
            f = act.read_facts(link, s)
        with act.link(p) as plink:
            pf = act.read_facts(plink, p)
        base = demoted.get(s.name) if s.name in demoted else demoted.get(src)
        if base is None:
            base = pf.applied
        mine = f.applied
        extra = gtid.ahead(mine, base)
        if extra:
            msg = (f"{s.name} has {gtid.describe_ahead(extra)} the new primary never saw; not rejoining: "
                   f"resolve by hand")
            log.error("%s (its position %s, the primary took over at %s)", msg, mine, base)
            state.keep_out(s.name, msg)
            act.monitor.set_maintenance(s.name, msg)
            return
        if not cfg.replication_user and not f.master_user:
            raise StepError(f"{s.name} has no replication credentials of its own: set [failover] "
                            f"replication_user and replication_password")
        semi = {"enabled": True} if pf.semi_master else None
        ops.replicate_from(link, p.host, p.port, cfg.replication_user, cfg.replication_password,
                           semi, slave_pos=mine, connect_retry=None if f.replicating else state.connect_retry,
                           heartbeat=cfg.replica_heartbeat_period)
    state.undemote(s.name)
    log.warning("rejoined %s as a replica of %s from GTID %s (%.0f ms)", label(s), p.name, mine or "-",
                (time.monotonic() - t) * 1000)


def release_abandoned_pauses(act, topo: Topology) -> None:
    """A backup takes a replica out of the read pool and stops its SQL thread while holding a named
    lock on its own connection there. A backup process that dies (SIGKILL, the OOM killer) cannot
    undo that, but its lock goes with its connection: then replication starts again and the
    replica returns to the read pool, instead of falling behind for good while out of the pool."""
    for name, lock in act.state.backup_pauses().items():
        s = topo.servers.get(name)
        if act.monitor.admin_states().get(name) != "offline" or s is None:
            act.state.paused_by_backup(name, "")  # put back (by the backup, or an operator)
            continue
        if s.state in (DOWN, MAINTENANCE) or not act.state.retry_due(f"pause:{name}", 1.0):
            continue
        try:
            with act.link(s) as link:
                if link.value("SELECT IS_USED_LOCK(%s) AS h", (lock,)) is not None:
                    continue  # the backup is still running
                act.guard(f"resume {name}", link)
                f = act.read_facts(link, s)
                if f.replicating and f.sql_state != "Yes":
                    link.q("START SLAVE SQL_THREAD")
        except StepError as exc:
            log.warning("%s: cannot resume it after an abandoned backup yet: %s", label(s), exc)
            continue
        act.state.paused_by_backup(name, "")
        act.monitor.set_admin_state(name, "")
        log.warning("%s: the backup that took it out of the read pool ended without putting it back (its "
                    "lock %s is free): replication SQL thread started, back in the read pool after its checks",
                    label(s), lock)
