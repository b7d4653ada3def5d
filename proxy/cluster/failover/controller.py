"""Failover, planned switchover, fencing and rejoin: the control plane's authority over the writer.

Wiring (supervisor): ``Failover(config, publish)`` owns the Monitor; every
monitor snapshot goes ``monitor -> Failover.observe -> publish``.  observe()
never blocks: it stamps ``writes_held`` while a failover/switchover runs and
hands the snapshot on; decisions and all SQL run on the Failover's own thread
(or, for a switchover, on the caller's thread), one action at a time.

Roles are authoritative here, not learned: once the primary is known,
``Monitor.designate`` makes every other server a replica whatever its
read_only says, so an old primary restarting writable never becomes a second
writer.  State shared between threads lives in FailoverState (state.py), what
an action does to the servers in Actions (actions.py).  See docs/failover.md
for the rules, steps and log lines.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Callable

from proxy.cluster import gtid
from proxy.cluster.failover import ops, rejoin, switchover
from proxy.cluster.failover.actions import Actions, Steps, label
from proxy.cluster.failover.detect import ALIVE, DEAD, UNCONFIRMED, replicates_from, verdict
from proxy.cluster.failover.ops import Facts, Link, StepError
from proxy.cluster.failover.state import FailoverState
from proxy.cluster.monitor import Monitor
from proxy.cluster.topology import DOWN, MAINTENANCE, ServerState, Topology
from proxy.config.schema import MASTER_MASTER

log = logging.getLogger("rwproxy.failover")


class Failover:
    """Detects a dead primary and promotes a replica; switchover; fences and rejoins old primaries."""

    def __init__(self, config, publish: Callable[[Topology], None], **monitor_kwargs):
        self.config, self.cfg = config, config.failover
        self._publish = publish
        self._mm = config.cluster.topology == MASTER_MASTER
        self._action = threading.Lock()  # one failover / switchover / rejoin pass at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._suspect = False  # the primary failed a check: judge it often (its replicas' silence grows)
        self._tuned: dict[str, float] = {}  # replica -> when its heartbeat period was last set (or tried)
        self.state = FailoverState(self.cfg.auto_failover)
        self.monitor = Monitor(config, self.observe, **monitor_kwargs)
        self.monitor.on_overdue = self._overdue
        self.actions = Actions(config, self.monitor, self.state)
        # proxy/coord: with [cluster] coordination, only the leader instance acts (None: this one alone)
        self.coord = None

    # ---- public API --------------------------------------------------------------

    def start(self) -> "Failover":
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rwproxy-failover", daemon=True)
        self._thread.start()
        self.monitor.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        self.monitor.stop(timeout)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout if timeout is not None else 15.0)
        self.actions.close()

    def observe(self, topo: Topology) -> None:
        """Monitor callback: annotate and publish at once; decisions happen on the failover thread."""
        held = self.state.observe(topo)
        self._publish(replace(topo, writes_held=True) if held and not topo.writes_held else topo)
        self._wake.set()

    def reconfigure(self, config) -> list[str]:
        """A reload (the caller checked that the primary stays in the config)."""
        with self._action:  # never in the middle of a failover or switchover
            was = self.cfg.auto_failover
            self.config, self.cfg = config, config.failover
            self.actions.reconfigure(config)
            said = self.monitor.reconfigure(config)
        if config.failover.auto_failover != was:  # the operator changed it (not a failed failover's stop)
            if config.failover.auto_failover:
                self.state.enable()
            else:
                self.state.disable("auto_failover = false in the config")
        self._wake.set()
        return said

    def wake(self) -> None:
        """Judge the cluster now (e.g. this instance just became the leader)."""
        self._wake.set()

    def enable_auto_failover(self) -> None:
        self.state.enable()
        log.warning("automatic failover enabled")
        self._wake.set()

    def rejoin(self, name: str) -> None:
        """Operator: retry fencing/rejoining a server kept out (after resolving its extra transactions)."""
        self.monitor.clear_maintenance(name)
        self.state.let_back(name)
        self._wake.set()

    def status(self) -> dict:
        """For `rwproxy status`."""
        return {"topology": self.config.cluster.topology, "primary": self.monitor.designated, **self.state.snapshot()}

    def switchover(self, target: str, timeout: float | None = None) -> dict:
        """Planned: hold writes, drain, old primary read-only, target catches up, promote, old follows it.

        Blocks up to `timeout` (default switchover_timeout) for the drain and the catch-up; on any
        failure before the target is promoted everything is put back and ok is False.
        """
        limit = self.cfg.switchover_timeout if timeout is None else timeout
        res = {"ok": False, "old": None, "new": None, "write_pause_ms": None, "message": ""}
        if self._mm:
            res["message"] = "master-master: every master is already a writer; there is nothing to switch"
            return res
        if not self._action.acquire(timeout=max(0.0, limit)):
            res["message"] = "another failover or switchover is in progress"
            return res
        try:
            topo = self.state.latest or self.monitor.topology
            return switchover.run(self.actions, topo, target, time.monotonic() + limit, res)
        finally:
            self._action.release()

    # ---- the failover thread ----------------------------------------------------------

    def _overdue(self, name: str) -> None:
        """Monitor callback (its loop): a check or heartbeat of `name` has waited `interval`."""
        if name == self.monitor.designated:
            self._wake.set()

    def _run(self) -> None:
        complained, last = 0.0, 0.0
        slow = 2 * self.config.monitor.interval
        while not self._stop.is_set():
            # A published change, a primary under suspicion, or one whose check hangs (nothing is
            # published while it does; the monitor says when an answer is overdue) is judged at
            # once, and then every interval; otherwise twice a second (no wakeup in between:
            # ten a second cost the idle control plane about 1 ms/s).
            designated = self.monitor.designated
            busy = self._suspect or (designated is not None and self.monitor.unanswered(designated) > 0)
            woken = self._wake.wait(self.config.monitor.interval if busy else 0.5)
            self._wake.clear()
            designated = self.monitor.designated
            if not (woken or self._suspect or time.monotonic() - last >= 0.5
                    or (designated is not None and self.monitor.unanswered(designated) > slow)):
                continue
            last = time.monotonic()
            topo = self.state.latest
            if self._stop.is_set() or self._mm or not self.state.actionable(topo):
                continue
            if self.coord is not None and not self.coord.may_act():
                continue  # another instance leads (or nobody can): this one only follows
            if not self._action.acquire(blocking=False):
                continue  # a switchover runs on its caller's thread
            try:
                self._tick(topo)
            except Exception:
                if time.monotonic() - complained > 60:
                    complained = time.monotonic()
                    log.exception("unexpected error in the failover thread (logged at most once a minute)")
            finally:
                self._action.release()

    def _tick(self, topo: Topology) -> None:
        name = self.monitor.designated
        if name is None:
            rejoin.designate_initial(self.actions, topo)
            return
        # the replicas' latest readings (their silence grows with every check, published or not)
        topo = replace(topo, servers={n: self.monitor.current_states().get(n, s) for n, s in topo.servers.items()})
        kind, detail = verdict(topo, name, self.cfg.failcount, self.cfg.verify_with_replicas, self.cfg.replica_silence,
                               unanswered=self.monitor.unanswered(name))
        p = topo.servers[name]
        self._suspect = kind != ALIVE
        if kind == DEAD:
            self._on_dead(topo, p, detail)
        elif kind == UNCONFIRMED:
            self._once("unconfirmed", logging.WARNING,
                       f"primary {label(p)} does not answer rwproxy ({p.fails} failed checks: {p.last_error}), "
                       f"but {detail}: not failing over (trouble between rwproxy and {p.name}?)")
        elif kind == ALIVE:
            if self.state.forget("unconfirmed", "off", "disabled", "cooldown", "answered"):
                log.warning("primary %s answers again", label(p))
            if not rejoin.adopt(self.actions, topo, p):
                rejoin.fence_and_rejoin(self.actions, topo, p)
                self._tune_heartbeats(topo, p)
            rejoin.release_abandoned_pauses(self.actions, topo)
        self.actions.warm(topo)

    def _tune_heartbeats(self, topo: Topology, p: ServerState) -> None:
        """Give healthy replicas of the primary replica_heartbeat_period, so that its silence can be
        told from its idleness (verdict). Once per replica (retried after a minute if it failed);
        the monitor ignores the moment replication is restarted."""
        period = self.cfg.replica_heartbeat_period
        if not period:
            return
        now = time.monotonic()
        for s in topo.servers.values():
            if (s.name == p.name or s.state in (DOWN, MAINTENANCE) or s.fails or not s.io_running or not s.sql_running
                    or s.heartbeat_period is None or abs(s.heartbeat_period - period) < 0.001
                    or not replicates_from(s, p) or now - self._tuned.get(s.name, -1e9) < 60):
                continue
            self._tuned[s.name] = now
            self.monitor.quiet(s.name, 0.5)
            try:
                with self.actions.link(s) as link:
                    ops.set_heartbeat(link, period)
                log.info("%s: MASTER_HEARTBEAT_PERIOD %g -> %g s (replica_heartbeat_period: a silent primary is "
                         "told from an idle one within replica_silence)", label(s), s.heartbeat_period, period)
            except StepError as exc:
                log.warning("%s: could not set MASTER_HEARTBEAT_PERIOD (retried in a minute): %s", label(s), exc)

    def _once(self, key: str, level: int, message: str) -> None:
        if self.state.first_time(key):
            log.log(level, "%s", message)

    # ---- failover ------------------------------------------------------------------------

    def _on_dead(self, topo: Topology, p: ServerState, detail: str) -> None:
        auto, reason, until = self.state.auto()
        if not auto:
            self._once("disabled", logging.ERROR, f"primary {label(p)} is down ({detail}); automatic failover is "
                       f"disabled ({reason}): not failing over until enable_auto_failover()")
            return
        left = until - time.time()
        if left > 0:
            self._once("cooldown", logging.WARNING, f"primary {label(p)} is down ({detail}), but a failover "
                       f"happened {self.cfg.failover_cooldown - left:.0f} s ago: failover_cooldown holds automatic "
                       f"failover for {left:.0f} s more")
            return
        # One more check, on a new connection, with more patience than the monitor's: a primary
        # starved of CPU (not hung) falls silent for a second or so, its replicas with it, and
        # the hang rule alone failed such a healthy primary over three times on the loaded
        # benchmark machine (docs/failover.md), where asynchronous replication lost what the old
        # primary had committed last. A crashed server refuses at once; a hung one costs this wait.
        took = self.actions.answers(p, max(1.0, 2 * self.cfg.replica_silence))
        if took is not None:
            self._once("answered", logging.WARNING, f"primary {label(p)} looked down ({detail}), but answered a new "
                       f"connection in {took:.2f} s: slow, not dead; not failing over")
            return
        self._failover(topo, p, detail)

    def _failover(self, topo: Topology, old: ServerState, detail: str) -> None:
        act = self.actions
        try:
            act.guard("failover")
        except StepError as exc:
            self._once("notleader", logging.ERROR, f"primary {label(old)} is down ({detail}); not failing over: {exc}")
            return
        self.state.forget("notleader")
        steps, started = Steps("failover"), time.time()
        log.warning("failover: primary %s is down (%s); promoting a replica", label(old), detail)
        self.state.begin("failover")
        act.hold(True)
        links: dict[str, Link] = {}
        best = None
        stopped: list[str] = []
        try:
            with steps("stop the replicas' IO threads") as note:
                stopped = self._stop_io(topo, old)
                note["text"] = ", ".join(stopped) or "none reachable"
            with steps("survey the replicas") as note:
                facts = self._survey(topo, old, links)
                note["text"] = "; ".join(f"{f.name} received {f.received or '-'} applied {f.applied or '-'}"
                                         for f in facts)
            best = ops.choose([f for f in facts if not ops.why_not(f)])
            if best is None:
                raise StepError("no candidate: no reachable replica may be promoted" + (
                    " (" + "; ".join(f"{f.name}: {ops.why_not(f)}" for f in facts) + ")" if facts else ""))
            self._warn_if_behind(best, facts)
            if self.cfg.pre_failover_hook:
                with steps("pre_failover_hook"):
                    act.hook("pre", old.address, best.address, "failover")
            link = links[best.name]
            with steps(f"{best.name}: apply the relay log") as note:
                note["text"] = ops.catch_up(link, best, self.cfg.catchup_timeout)
            semi = act.semi_for(best)
            promo_pos = act.promote(link, best, semi, steps)
        except Exception as exc:  # StepError, or a bug: either way this failover failed
            if not isinstance(exc, StepError):
                log.exception("failover: unexpected error")
            self._fail("failover", old, best, str(exc) if isinstance(exc, StepError) else ops.describe(exc),
                       steps, started)
            for link in links.values():
                link.release()
            self._restart_io(topo, stopped)
            self._end()
            return
        # best is the primary now: whatever else fails, it is published and the writes are released.
        others = [f for f in facts if f is not best and f.follows(old.host, old.port, old.server_id)]
        try:
            act.take_over(best, link, old.name, promo_pos, semi, steps,
                          lambda: act.repoint(others, best, semi, links, steps))
        finally:
            for link in links.values():
                link.release()
            self._end()
        took = steps.elapsed_ms
        log.warning("failover done in %.0f ms: %s is the primary (was %s)", took, label(best), label(old))
        self.state.record("failover", {"ok": True, "time": started, "old": old.address, "new": best.address,
                                       "duration_ms": round(took, 1), "message": detail},
                          cooldown=self.cfg.failover_cooldown)
        self.state.forget("cooldown")
        if self.cfg.post_failover_hook:
            act.hook("post", old.address, best.address, "failover")

    def _stop_io(self, topo: Topology, old: ServerState) -> list[str]:
        """STOP SLAVE IO_THREAD on every reachable replica of the dead primary, all at once: their
        relay logs are final before one is chosen, and the promotion and repointing steps after it
        no longer wait on a connection to a hung primary (a semi-sync replica's IO thread takes
        2 s to stop then: MariaDB first tries to KILL its dump thread over a new connection)."""
        # Not where the SQL thread is stopped: with both threads stopped, MariaDB (GTID mode) drops
        # the relay log when the SQL thread starts again, and with it what was received but not
        # applied (catch_up starts that SQL thread while the IO thread still runs).
        mine = [s for s in topo.servers.values() if s.name != old.name and s.state not in (DOWN, MAINTENANCE)
                and replicates_from(s, old) and s.sql_running]

        def stop(s) -> str | None:
            try:
                with self.actions.link(s) as link:
                    link.q("STOP SLAVE IO_THREAD")
                return s.name
            except StepError as exc:
                log.warning("failover: %s: %s", s.name, exc)
                return None

        if not mine:
            return []
        with ThreadPoolExecutor(max_workers=len(mine)) as pool:
            return [n for n in pool.map(stop, mine) if n]

    def _restart_io(self, topo: Topology, names: list[str]) -> None:
        """The failover failed: the replicas whose IO threads it stopped go back to their source."""
        for name in names:
            try:
                with self.actions.link(topo.servers[name]) as link:
                    link.q("START SLAVE IO_THREAD")
            except StepError as exc:
                log.warning("failover: could not restart %s's IO thread: %s", name, exc)

    def _survey(self, topo: Topology, old: ServerState, links: dict[str, Link]) -> list[Facts]:
        """Fresh facts from every reachable server but the old primary (in parallel, config order)."""
        names = [s.name for s in topo.servers.values() if s.name != old.name and s.state not in (DOWN, MAINTENANCE)]

        def look(name: str) -> Facts | None:
            s = topo.servers[name]
            try:
                link = self.actions.link(s)
            except StepError as exc:
                log.warning("failover: leaving %s out: %s", s.name, exc)
                return None
            links[name] = link
            try:
                return self.actions.read_facts(link, s)
            except StepError as exc:
                log.warning("failover: leaving %s out: %s", s.name, exc)
                return None

        with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
            found = [f for f in pool.map(look, names) if f is not None]
        for f in found:
            if f.connect_retry:
                self.state.set_connect_retry(f.connect_retry)
        return found

    def _warn_if_behind(self, best: Facts, facts: list[Facts]) -> None:
        for f in facts:
            extra = gtid.ahead(f.received, best.received)
            if f is not best and extra:
                log.warning("failover: %s holds %s that %s lacks; it cannot replicate from %s without them",
                            f.name, gtid.describe_ahead(extra), best.name, best.name)

    def _fail(self, kind: str, old: ServerState, best: Facts | None, message: str, steps: Steps,
              started: float) -> None:
        self.state.disable(f"the {kind} at {time.strftime('%H:%M:%S', time.localtime(started))} failed")
        self.state.record(kind, {"ok": False, "time": started, "old": old.address,
                                 "new": best.address if best else None, "duration_ms": round(steps.elapsed_ms, 1),
                                 "message": message})
        self.actions.hold(False)
        log.error("%s failed after %.0f ms: %s; automatic failover is disabled until enable_auto_failover()",
                  kind, steps.elapsed_ms, message)

    def _end(self) -> None:
        if self.state.end():
            self.actions.hold(False)
