"""Planned switchover: move the primary role to a chosen replica without failing a write.

The order matters for "zero failed writes": writes are held (workers stop sending
new ones) before anything changes; the old primary is made read-only only once no
application session is running a statement or holds a writing transaction there;
the target is promoted only after it has applied the old primary's final GTID
position; heartbeat writes on the old primary are paused first, because the
monitor user may bypass read_only.  Until the target is promoted every step can
be undone, and is on failure.  Runs on the caller's thread under Failover's
action lock (no failover can interleave).
"""

from __future__ import annotations

import logging
import time

from proxy.cluster.failover import ops
from proxy.config.schema import format_hostport
from proxy.cluster.failover.ops import Facts, Link, StepError
from proxy.cluster.topology import DOWN, MAINTENANCE

log = logging.getLogger("rwproxy.failover")


def resolve(fo, target: str, topo):
    """A backend by name or host:port."""
    for s in topo.servers.values():
        if target in (s.name, s.address, format_hostport(s.host, s.port)):
            return s
    return None


def run_switchover(fo, target: str, deadline: float, res: dict) -> dict:
    from proxy.cluster.failover.controller import _Steps, label, replicates_from

    topo = fo._latest or fo.monitor.topology
    old_name = fo.monitor.designated
    tgt = resolve(fo, target, topo)
    old = topo.servers.get(old_name) if old_name else None
    problem = None
    if old is None:
        problem = "no primary is known yet"
    elif tgt is None:
        problem = f"unknown backend {target!r} (give its name or host:port)"
    elif tgt.name == old.name:
        problem = f"{tgt.name} is already the primary"
    elif fo._backends[tgt.name].no_promotion:
        problem = f"{tgt.name} has no_promotion = true"
    elif old.state in (DOWN, MAINTENANCE) or old.fails:
        problem = f"the primary {old.name} is not answering: that is failover's job"
    elif tgt.state in (DOWN, MAINTENANCE) or tgt.fails:
        problem = f"{tgt.name} is {tgt.state}"
    elif not replicates_from(tgt, old):
        problem = f"{tgt.name} does not replicate from {old.name}"
    if old is not None:
        res["old"] = old.address
    if tgt is not None:
        res["new"] = tgt.address
    if problem:
        res["message"] = f"switchover refused: {problem}"
        log.warning("%s", res["message"])
        return res

    steps = _Steps("switchover")
    started = time.time()
    log.warning("switchover: %s -> %s", label(old), label(tgt))
    with fo._lock:
        fo._in_progress = "switchover"
    old_link = tgt_link = None
    held_at = None
    read_only_set = promoting = False
    try:
        old_link = fo._link(old)
        tgt_link = fo._link(tgt)
        tf = ops.read_facts(tgt_link, fo._facts(tgt))
        if tf.io_state != "Yes" or tf.sql_state != "Yes":
            raise StepError(f"{tgt.name}: replication is not running (IO:{tf.io_state} SQL:{tf.sql_state})")
        if fo.cfg.pre_failover_hook:
            with steps("pre_failover_hook"):
                fo._hook("pre", old.address, tgt.address, "switchover")
        held_at = time.monotonic()
        fo._hold(True)
        skip = _skip_users(fo)
        with steps(f"{old.name}: wait until no application session is writing") as note:
            time.sleep(SETTLE)
            note["text"] = _wait_quiet(old_link, skip, deadline)
        with steps(f"{old.name}: SET GLOBAL read_only=1"):
            fo.monitor.pause_heartbeat(old.name)
            old_link.q("SET GLOBAL read_only = 1")
            read_only_set = True
            _wait_quiet(old_link, skip, deadline)  # a write that slipped in just before read_only
            row = old_link.q("SELECT @@gtid_binlog_pos AS b, @@gtid_current_pos AS c")[0]
            end = ops.merge(row["b"], row["c"])
        with steps(f"{tgt.name}: catch up to {end or '-'}"):
            left = deadline - time.monotonic()
            if left <= 0 or (end and tgt_link.value("SELECT MASTER_GTID_WAIT(%s, %s) AS r", (end, left)) != 0):
                raise StepError(f"{tgt.name} did not reach {end} within the switchover timeout")
        semi = fo._semi_for(tf)
        with steps(f"{tgt.name}: STOP SLAVE; RESET SLAVE ALL; " + ("semi-sync master on; " if semi else "")
                   + "read_only=0"):
            promoting = True
            ops.promote(tgt_link, semi)
    except Exception as exc:  # StepError, or a bug: put everything back
        if not isinstance(exc, StepError):
            log.exception("switchover: unexpected error")
            exc = ops.describe(exc)
        _undo(fo, old, tgt, old_link, tgt_link if promoting else None, read_only_set)
        if held_at is not None:
            res["write_pause_ms"] = round((time.monotonic() - held_at) * 1000, 1)
        res["message"] = f"switchover failed: {exc}; rolled back: {old.name} is still the primary"
        log.error("%s", res["message"])
        with fo._lock:
            fo._in_progress = None
            fo._last["switchover"] = {"ok": False, "time": started, "old": old.address, "new": tgt.address,
                                      "duration_ms": round(steps.elapsed_ms, 1), "message": res["message"]}
        for link in (old_link, tgt_link):
            if link is not None:
                link.release()
        return res

    # The target is the primary now: from here on nothing is undone, problems only warn, and
    # whatever happens the new primary is published and the writes are released (without
    # semi-sync at once, with it once a replica can acknowledge commits).
    links: dict[str, Link] = {}
    repointed: list[str] = []
    pause = None
    if not semi:
        fo._install(tf, old.name, end, repointed, steps)
        pause = (time.monotonic() - held_at) * 1000
    try:
        with steps(f"{old.name}: replicate from {tgt.name} from GTID {end or '-'}"):
            try:
                ops.replicate_from(old_link, tgt.host, tgt.port, fo.cfg.replication_user,
                                   fo.cfg.replication_password, semi, slave_pos=end,
                                   connect_retry=tf.connect_retry)
                repointed.append(old.name)
                with fo._lock:
                    fo._demoted.pop(old.name, None)
            except StepError as exc:
                log.warning("switchover: %s stays read-only, not replicating yet (the rejoin pass retries): %s",
                            old.name, exc)
        repointed += fo._repoint(_followers(fo, topo, old, tgt, links), tf, semi, links, steps)
        if semi and repointed:
            fo._await_semi(tgt_link, steps)
    except Exception as exc:
        log.warning("switchover: after the promotion: %s", exc)
    finally:
        if semi:
            fo._install(tf, old.name, end, repointed, steps)
            pause = (time.monotonic() - held_at) * 1000
        fo.monitor.pause_heartbeat(old.name, False)
        for link in (old_link, tgt_link, *links.values()):
            link.release()
        with fo._lock:
            fo._in_progress = None
    res.update(ok=True, write_pause_ms=round(pause, 1),
               message=f"{tgt.name} is the primary; {old.name} " + (
                   "replicates from it" if old.name in repointed else "is read-only, rejoin pending"))
    log.warning("switchover done in %.0f ms (writes held %.0f ms): %s", steps.elapsed_ms, pause, res["message"])
    with fo._lock:
        fo._last["switchover"] = {"ok": True, "time": started, "old": old.address, "new": tgt.address,
                                  "duration_ms": round(steps.elapsed_ms, 1), "write_pause_ms": res["write_pause_ms"],
                                  "message": res["message"]}
    if fo.cfg.post_failover_hook:
        fo._hook("post", old.address, tgt.address, "switchover")
    return res


SETTLE = 0.02  # s: statements dispatched just before the hold was published reach the primary


def _skip_users(fo) -> tuple[str, ...]:
    """Sessions not waited for: replication, and the monitor unless applications share its account."""
    skip = [fo.cfg.replication_user] if fo.cfg.replication_user else []
    if fo._user and fo.config.user(fo._user) is None:
        skip.append(fo._user)
    return tuple(skip)


def _wait_quiet(link: Link, skip: tuple[str, ...], deadline: float) -> str:
    """Until two polls 10 ms apart find no application session running a statement or holding writes."""
    quiet, polls = 0, 0
    while True:
        busy = ops.busy_sessions(link, skip)
        polls += 1
        quiet = 0 if busy else quiet + 1
        if quiet >= 2:
            return f"{polls} polls"
        if time.monotonic() > deadline:
            shown = "; ".join(f"id {b['id']} {b['user']} {b['command']} {b['time']}s {b['info'] or ''}".strip()
                              for b in busy[:3])
            raise StepError(f"{len(busy)} application session(s) still busy at the switchover timeout: {shown}")
        time.sleep(0.01)


def _followers(fo, topo, old, tgt, links: dict[str, Link]) -> list[Facts]:
    """Fresh facts of the other reachable replicas of the old primary (they follow the target next)."""
    out = []
    for s in topo.servers.values():
        if s.name in (old.name, tgt.name) or s.state in (DOWN, MAINTENANCE):
            continue
        try:
            link = fo._link(s)
        except StepError as exc:
            log.warning("switchover: cannot repoint %s now (the rejoin pass retries): %s", s.name, exc)
            continue
        links[s.name] = link
        f = ops.read_facts(link, fo._facts(s))
        if f.follows(old.host, old.port, old.server_id):
            out.append(f)
    return out


def _undo(fo, old, tgt, old_link, tgt_link, read_only_set: bool) -> None:
    """Before the target's promotion completed: the target back to a read-only replica (tgt_link is
    given only if its promotion had started), then the old primary writable again - never both
    writable: if the target cannot be made read-only, the old primary stays read-only too."""
    try:
        if tgt_link is not None:
            f = ops.read_facts(tgt_link, fo._facts(tgt))
            if not f.read_only:
                tgt_link.q("SET GLOBAL read_only = 1")
            if not f.replicating:
                ops.replicate_from(tgt_link, old.host, old.port, fo.cfg.replication_user,
                                   fo.cfg.replication_password, None)
            elif f.io_state != "Yes" or f.sql_state != "Yes":
                tgt_link.q("START SLAVE")
        if read_only_set and old_link is not None:
            old_link.q("SET GLOBAL read_only = 0")
    except StepError as exc:
        log.error("switchover: undo incomplete, check %s and %s by hand: %s", old.name, tgt.name, exc)
    finally:
        fo.monitor.pause_heartbeat(old.name, False)
        fo._hold(False)
