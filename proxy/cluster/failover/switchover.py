"""Planned switchover: move the primary role to a chosen replica without failing a write.

The order matters for "zero failed writes": writes are held (workers stop sending
new ones) before anything changes; the old primary is made read-only only once no
application session is running a statement or holds a writing transaction there;
the target is promoted only after it has applied the old primary's final GTID
position; heartbeat writes on the old primary are paused first, because the
monitor user may bypass read_only.  Until the target is promoted every step can
be undone, and is on failure.  Runs on the caller's thread under Failover's
action lock (no failover can interleave), with the failover's Actions (act).
"""

from __future__ import annotations

import logging
import time

from proxy.cluster import gtid
from proxy.cluster.failover import ops
from proxy.cluster.failover.actions import Steps, label
from proxy.cluster.failover.detect import replicates_from
from proxy.cluster.failover.ops import Facts, Link, StepError
from proxy.cluster.topology import DOWN, MAINTENANCE
from proxy.config.schema import format_hostport

log = logging.getLogger("rwproxy.failover")


def resolve(target: str, topo):
    """A backend by name or host:port."""
    for s in topo.servers.values():
        if target in (s.name, s.address, format_hostport(s.host, s.port)):
            return s
    return None


CONNECTING = ("Preparing", "Connecting")
CONNECT_WAIT = 5.0


def _running_facts(act, link: Link, s, deadline: float) -> Facts:
    """The target's facts once its IO thread has (re)connected. Replication restarted a moment ago
    (the controller's heartbeat tuning does so once per replica, seconds after start) shows the IO
    thread as Preparing or Connecting for a few hundred ms: waited for, up to CONNECT_WAIT, rather
    than refusing a switchover asked for in that moment."""
    until = min(deadline, time.monotonic() + CONNECT_WAIT)
    f = act.read_facts(link, s)
    while f.io_state in CONNECTING and f.sql_state == "Yes" and time.monotonic() < until:
        time.sleep(0.05)
        f = act.read_facts(link, s)
    return f


def run(act, topo, target: str, deadline: float, res: dict) -> dict:
    """Switch the primary role to `target` (name or host:port) by `deadline`; fills and returns `res`."""
    state, cfg = act.state, act.cfg
    old_name = act.monitor.designated
    tgt = resolve(target, topo)
    old = topo.servers.get(old_name) if old_name else None
    problem = None
    if old is None:
        problem = "no primary is known yet"
    elif tgt is None:
        problem = f"unknown backend {target!r}; the servers are: {', '.join(topo.servers)} (a name or host:port)"
    elif tgt.name == old.name:
        problem = f"{tgt.name} is already the primary"
    elif act.backends[tgt.name].no_promotion:
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

    steps = Steps("switchover")
    started = time.time()
    log.warning("switchover: %s -> %s", label(old), label(tgt))
    state.begin("switchover")
    old_link = tgt_link = None
    held_at = None
    read_only_set = promoting = False
    try:
        old_link = act.link(old)
        tgt_link = act.link(tgt)
        tf = _running_facts(act, tgt_link, tgt, deadline)
        if tf.io_state != "Yes" or tf.sql_state != "Yes":
            raise StepError(f"{tgt.name}: replication is not running (IO:{tf.io_state} SQL:{tf.sql_state})")
        if cfg.pre_failover_hook:
            with steps("pre_failover_hook"):
                act.hook("pre", old.address, tgt.address, "switchover")
        held_at = time.monotonic()
        act.hold(True)
        skip = _skip_users(act)
        with steps(f"{old.name}: wait until no application session is writing") as note:
            time.sleep(SETTLE)
            note["text"] = _wait_quiet(old_link, skip, deadline)
        act.guard("switchover", old_link)
        with steps(f"{old.name}: SET GLOBAL read_only=1"):
            act.monitor.pause_heartbeat(old.name)
            old_link.q("SET GLOBAL read_only = 1")
            read_only_set = True
            _wait_quiet(old_link, skip, deadline)  # a write that slipped in just before read_only
            row = old_link.q("SELECT @@gtid_binlog_pos AS b, @@gtid_current_pos AS c")[0]
            end = gtid.merge(row["b"], row["c"])
        with steps(f"{tgt.name}: catch up to {end or '-'}"):
            left = deadline - time.monotonic()
            if left <= 0 or (end and tgt_link.value("SELECT MASTER_GTID_WAIT(%s, %s) AS r", (end, left)) != 0):
                raise StepError(f"{tgt.name} did not reach {end} within the switchover timeout")
        semi = act.semi_for(tf)
        promoting = True
        act.promote(tgt_link, tf, semi, steps)
    except Exception as exc:  # StepError, or a bug: put everything back
        if not isinstance(exc, StepError):
            log.exception("switchover: unexpected error")
            exc = ops.describe(exc)
        _undo(act, old, tgt, old_link, tgt_link if promoting else None, read_only_set)
        if held_at is not None:
            res["write_pause_ms"] = round((time.monotonic() - held_at) * 1000, 1)
        res["message"] = f"switchover failed: {exc}; rolled back: {old.name} is still the primary"
        log.error("%s", res["message"])
        state.end()
        state.record("switchover", {"ok": False, "time": started, "old": old.address, "new": tgt.address,
                                    "duration_ms": round(steps.elapsed_ms, 1), "message": res["message"]})
        for link in (old_link, tgt_link):
            if link is not None:
                link.release()
        return res

    # The target is the primary now: from here on nothing is undone, problems only warn, and
    # whatever happens the new primary is published and the writes are released.
    links: dict[str, Link] = {}

    def repoint() -> list[str]:
        done = []
        with steps(f"{old.name}: replicate from {tgt.name} from GTID {end or '-'}"):
            try:
                ops.replicate_from(old_link, tgt.host, tgt.port, cfg.replication_user, cfg.replication_password,
                                   semi, slave_pos=end, connect_retry=tf.connect_retry,
                                   heartbeat=cfg.replica_heartbeat_period)
                done.append(old.name)
                state.undemote(old.name)
            except StepError as exc:
                log.warning("switchover: %s stays read-only, not replicating yet (the rejoin pass retries): %s",
                            old.name, exc)
        return done + act.repoint(_followers(act, topo, old, tgt, links), tf, semi, links, steps, "switchover")

    try:
        repointed, released = act.take_over(tf, tgt_link, old.name, end, semi, steps, repoint)
    finally:
        act.monitor.pause_heartbeat(old.name, False)
        for link in (old_link, tgt_link, *links.values()):
            link.release()
        state.end()
    pause = (released - held_at) * 1000
    res.update(ok=True, write_pause_ms=round(pause, 1),
               message=f"{tgt.name} is the primary; {old.name} " + (
                   "replicates from it" if old.name in repointed else "is read-only, rejoin pending"))
    log.warning("switchover done in %.0f ms (writes held %.0f ms): %s", steps.elapsed_ms, pause, res["message"])
    state.record("switchover", {"ok": True, "time": started, "old": old.address, "new": tgt.address,
                                "duration_ms": round(steps.elapsed_ms, 1), "write_pause_ms": res["write_pause_ms"],
                                "message": res["message"]})
    if cfg.post_failover_hook:
        act.hook("post", old.address, tgt.address, "switchover")
    return res


SETTLE = 0.02  # s: statements dispatched just before the hold was published reach the primary


def _skip_users(act) -> tuple[str, ...]:
    """Sessions not waited for: replication, and the monitor unless applications share its account."""
    skip = [act.cfg.replication_user] if act.cfg.replication_user else []
    if act.user and act.config.user(act.user) is None:
        skip.append(act.user)
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


def _followers(act, topo, old, tgt, links: dict[str, Link]) -> list[Facts]:
    """Fresh facts of the other reachable replicas of the old primary (they follow the target next)."""
    out = []
    for s in topo.servers.values():
        if s.name in (old.name, tgt.name) or s.state in (DOWN, MAINTENANCE):
            continue
        try:
            link = act.link(s)
        except StepError as exc:
            log.warning("switchover: cannot repoint %s now (the rejoin pass retries): %s", s.name, exc)
            continue
        links[s.name] = link
        f = act.read_facts(link, s)
        if f.follows(old.host, old.port, old.server_id):
            out.append(f)
    return out


def _undo(act, old, tgt, old_link, tgt_link, read_only_set: bool) -> None:
    """Before the target's promotion completed: the target back to a read-only replica (tgt_link is
    given only if its promotion had started), then the old primary writable again - never both
    writable: if the target cannot be made read-only, the old primary stays read-only too."""
    try:
        if tgt_link is not None:
            f = act.read_facts(tgt_link, tgt)
            if not f.read_only:
                tgt_link.q("SET GLOBAL read_only = 1")
            if not f.replicating:
                ops.replicate_from(tgt_link, old.host, old.port, act.cfg.replication_user,
                                   act.cfg.replication_password, None)
            elif f.io_state != "Yes" or f.sql_state != "Yes":
                tgt_link.q("START SLAVE")
        if read_only_set and old_link is not None:
            old_link.q("SET GLOBAL read_only = 0")
    except StepError as exc:
        log.error("switchover: undo incomplete, check %s and %s by hand: %s", old.name, tgt.name, exc)
    finally:
        act.monitor.pause_heartbeat(old.name, False)
        act.hold(False)
