"""Failover, planned switchover, fencing and rejoin: the control plane's authority over the writer.

Wiring (supervisor): ``Failover(config, publish)`` owns the Monitor; every
monitor snapshot goes ``monitor -> Failover.observe -> publish``.  observe()
never blocks: it stamps ``writes_held`` while a failover/switchover runs and
hands the snapshot on; decisions and all SQL run on the Failover's own thread
(or, for a switchover, on the caller's thread), one action at a time.

Roles are authoritative here, not learned: once the primary is known,
``Monitor.designate`` makes every other server a replica whatever its
read_only says, so an old primary restarting writable never becomes a second
writer.  See docs/failover.md for the rules, steps and log lines.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from typing import Callable

from proxy.cluster.failover import ops
from proxy.backend.tls import policies_for
from proxy.cluster.failover import rejoin as fencing
from proxy.cluster.failover.ops import Facts, Link, StepError
from proxy.cluster.failover.rejoin import label, replicates_from
from proxy.cluster.monitor.checker import Monitor
from proxy.cluster.topology import DOWN, MAINTENANCE, ServerState, Topology

log = logging.getLogger("rwproxy.failover")


def verdict(topo: Topology, name: str, failcount: int, verify: bool) -> tuple[str, str]:
    """Is the primary `name` dead?  ('alive' | 'suspect' | 'unconfirmed' | 'dead', detail).

    Dead needs the monitor's DOWN state after at least `failcount` consecutive failed checks
    and, with `verify`, every reachable replica that replicates from it having lost it too
    (IO thread not running). A replica still receiving its binlog means the trouble is between
    rwproxy and the primary, not the primary: no failover.
    """
    p = topo.servers.get(name)
    if p is None or p.state == MAINTENANCE:
        return "alive", ""
    if p.state != DOWN or p.fails < failcount:
        return ("suspect" if p.fails else "alive"), ""
    detail = f"{p.fails} failed checks: {p.last_error}"
    if not verify:
        return "dead", detail
    others = [s for s in topo.servers.values() if s.name != name and s.state not in (DOWN, MAINTENANCE)]
    if not others:
        return "unconfirmed", "no replica answers to confirm it"
    still = [s.name for s in others if replicates_from(s, p) and s.io_running]
    if still:
        return "unconfirmed", f"{', '.join(still)} still receive{'s' if len(still) == 1 else ''} its binlog"
    lost = [s.name for s in others if replicates_from(s, p)]
    return "dead", detail + (f"; {', '.join(lost)} lost it too" if lost else "")


class _Steps:
    """One INFO line per step with its duration and the time since the action began."""

    def __init__(self, kind: str):
        self.kind, self.t0 = kind, time.monotonic()

    @contextmanager
    def __call__(self, what: str):
        t = time.monotonic()
        note: dict = {}
        try:
            yield note
        except StepError as exc:
            raise StepError(f"{what}: {exc}") from None
        extra = f": {note['text']}" if note.get("text") else ""
        log.info("%s: %s%s (%.0f ms; %.0f ms since start)", self.kind, what, extra,
                 (time.monotonic() - t) * 1000, self.elapsed_ms)

    @property
    def elapsed_ms(self) -> float:
        return (time.monotonic() - self.t0) * 1000


class Failover:
    """Detects a dead primary and promotes a replica; switchover; fences and rejoins old primaries."""

    def __init__(self, config, publish: Callable[[Topology], None], **monitor_kwargs):
        self.config, self.cfg = config, config.failover
        self._publish = publish
        self._mm = config.cluster.topology == "master-master"
        self._user, self._password = config.monitor_credentials()
        self._backends = {b.name: b for b in config.backends}
        self._order = {b.name: i for i, b in enumerate(config.backends)}
        self._lock = threading.Lock()  # the fields below; never held during SQL
        self._action = threading.Lock()  # one failover / switchover / rejoin pass at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._latest: Topology | None = None
        self._min_version = 0  # snapshots older than the last designation are not acted on
        self._holding = False
        self._auto = self.cfg.auto_failover
        self._disabled_reason = "" if self._auto else "auto_failover = false in the config"
        self._cooldown_until = 0.0
        self._last: dict[str, dict] = {}
        self._in_progress: str | None = None
        self._demoted: dict[str, str | None] = {}  # to fence/rejoin -> GTID end of its history (None: unknown)
        self._kept_out: dict[str, str] = {}
        self._retry_at: dict[str, float] = {}
        self._said: set[str] = set()
        self._semi: dict | None = None  # the primary's semi-sync settings, read while it was alive
        self._connect_retry: int | None = None
        self._links = ops.LinkCache(self._connect)
        self.monitor = Monitor(config, self.observe, **monitor_kwargs)

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
        self._links.close()

    def observe(self, topo: Topology) -> None:
        """Monitor callback: annotate and publish at once; decisions happen on the failover thread."""
        with self._lock:
            self._latest = topo
            held = self._holding
        self._publish(replace(topo, writes_held=True) if held and not topo.writes_held else topo)
        self._wake.set()

    def enable_auto_failover(self) -> None:
        with self._lock:
            self._auto, self._disabled_reason = True, ""
            self._said.discard("disabled")
        log.warning("automatic failover enabled")
        self._wake.set()

    def rejoin(self, name: str) -> None:
        """Operator: retry fencing/rejoining a server kept out (after resolving its extra transactions)."""
        self.monitor.clear_maintenance(name)
        with self._lock:
            self._kept_out.pop(name, None)
            self._demoted[name] = None  # compare with the primary's current position
            self._retry_at.pop(name, None)
        self._wake.set()

    def state(self) -> dict:
        """For `rwproxy status`."""
        with self._lock:
            left = max(0.0, self._cooldown_until - time.time())
            return {"topology": self.config.cluster.topology, "primary": self.monitor.designated,
                    "auto_failover": self._auto, "disabled_reason": self._disabled_reason,
                    "in_progress": self._in_progress, "writes_held": self._holding,
                    "cooldown_until": self._cooldown_until if left else None, "cooldown_left_s": round(left, 1),
                    "last_failover": self._last.get("failover"), "last_switchover": self._last.get("switchover"),
                    "kept_out": dict(self._kept_out), "awaiting_rejoin": sorted(self._demoted)}

    # ---- the failover thread ----------------------------------------------------------

    def _run(self) -> None:
        complained = 0.0
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            topo = self._latest
            if self._stop.is_set() or topo is None or self._mm or topo.version < self._min_version:
                continue
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
            fencing.designate_initial(self, topo)
            return
        kind, detail = verdict(topo, name, self.cfg.failcount, self.cfg.verify_with_replicas)
        p = topo.servers[name]
        if kind == "dead":
            self._on_dead(topo, p, detail)
        elif kind == "unconfirmed":
            self._once("unconfirmed", logging.WARNING,
                       f"primary {label(p)} does not answer rwproxy ({p.fails} failed checks: {p.last_error}), "
                       f"but {detail}: not failing over (trouble between rwproxy and {p.name}?)")
        elif kind == "alive":
            if self._said & {"unconfirmed", "off", "disabled", "cooldown"}:
                log.warning("primary %s answers again", label(p))
                self._said -= {"unconfirmed", "off", "disabled", "cooldown"}
            if not fencing.adopt(self, topo, p):
                fencing.fence_and_rejoin(self, topo, p)
        self._warm(topo)

    def _designate(self, name: str, updates: dict | None = None) -> None:
        self._min_version = self.monitor.designate(name, updates)

    def _once(self, key: str, level: int, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            log.log(level, "%s", message)

    def _learn_semi(self, p: ServerState) -> None:
        """Remember the primary's semi-sync settings so a promoted replica gets the same."""
        try:
            with self._link(p) as link:
                f = ops.read_facts(link, self._facts(p))
        except StepError:
            return
        self._semi = {"enabled": f.semi_master, "timeout": f.semi_timeout, "wait_point": f.semi_wait_point}

    def _semi_for(self, f: Facts) -> dict | None:
        if self._semi is not None:
            return self._semi if self._semi["enabled"] else None
        return {"timeout": None, "wait_point": "AFTER_SYNC"} if f.semi_slave else None

    # ---- failover ------------------------------------------------------------------------

    def _on_dead(self, topo: Topology, p: ServerState, detail: str) -> None:
        with self._lock:
            auto, reason, until = self._auto, self._disabled_reason, self._cooldown_until
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
        self._failover(topo, p, detail)

    def _failover(self, topo: Topology, old: ServerState, detail: str) -> None:
        steps, started = _Steps("failover"), time.time()
        log.warning("failover: primary %s is down (%s); promoting a replica", label(old), detail)
        self._begin("failover")
        links: dict[str, Link] = {}
        best = None
        try:
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
                    self._hook("pre", old.address, best.address, "failover")
            link = links[best.name]
            with steps(f"{best.name}: apply the relay log") as note:
                note["text"] = ops.catch_up(link, best, self.cfg.catchup_timeout)
            semi = self._semi_for(best)
            with steps(f"{best.name}: STOP SLAVE; RESET SLAVE ALL; " + ("semi-sync master on; " if semi else "")
                       + "read_only=0"):
                promo_pos = ops.promote(link, semi)
        except Exception as exc:  # StepError, or a bug: either way this failover failed
            if not isinstance(exc, StepError):
                log.exception("failover: unexpected error")
            self._fail("failover", old, best, str(exc) if isinstance(exc, StepError) else ops.describe(exc),
                       steps, started)
            for link in links.values():
                link.release()
            self._end()
            return
        # best is the primary now: whatever else fails, it is published and the writes are released.
        # Without semi-sync at once; with it only once a replica can acknowledge commits.
        repointed: list[str] = []
        if not semi:
            self._install(best, old.name, promo_pos, repointed, steps)
        try:
            repointed = self._repoint([f for f in facts if f is not best and f.follows(old.host, old.port,
                                      old.server_id)], best, semi, links, steps)
            if semi and repointed:
                self._await_semi(link, steps)
        except Exception as exc:
            log.warning("failover: after the promotion: %s", exc)
        finally:
            if semi:
                self._install(best, old.name, promo_pos, repointed, steps)
            for link in links.values():
                link.release()
            self._end()
        took = steps.elapsed_ms
        log.warning("failover done in %.0f ms: %s is the primary (was %s)", took, label(best), label(old))
        with self._lock:
            self._cooldown_until = time.time() + self.cfg.failover_cooldown
            self._last["failover"] = {"ok": True, "time": started, "old": old.address, "new": best.address,
                                      "duration_ms": round(took, 1), "message": detail}
        self._said -= {"cooldown"}
        if self.cfg.post_failover_hook:
            self._hook("post", old.address, best.address, "failover")

    def _survey(self, topo: Topology, old: ServerState, links: dict[str, Link]) -> list[Facts]:
        """Fresh facts from every reachable server but the old primary (in parallel, config order)."""
        names = [s.name for s in topo.servers.values() if s.name != old.name and s.state not in (DOWN, MAINTENANCE)]

        def look(name: str) -> Facts | None:
            s = topo.servers[name]
            try:
                link = self._link(s)
            except StepError as exc:
                log.warning("failover: leaving %s out: %s", s.name, exc)
                return None
            links[name] = link
            try:
                return ops.read_facts(link, self._facts(s))
            except StepError as exc:
                log.warning("failover: leaving %s out: %s", s.name, exc)
                return None

        with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
            found = [f for f in pool.map(look, names) if f is not None]
        for f in found:
            if f.connect_retry:
                self._connect_retry = f.connect_retry
        return found

    def _warn_if_behind(self, best: Facts, facts: list[Facts]) -> None:
        for f in facts:
            extra = ops.ahead(f.received, best.received)
            if f is not best and extra:
                log.warning("failover: %s holds %s that %s lacks; it cannot replicate from %s without them",
                            f.name, ops.describe_ahead(extra), best.name, best.name)

    def _repoint(self, others: list[Facts], best: Facts, semi, links: dict[str, Link], steps: _Steps) -> list[str]:
        """Every other replica of the old primary follows the new one (in parallel); failures only warn:
        the rejoin pass retries them."""
        def one(f: Facts) -> str | None:
            try:
                with steps(f"{f.name}: replicate from {best.name} (CHANGE MASTER ... MASTER_USE_GTID=slave_pos)"):
                    ops.replicate_from(links[f.name], best.host, best.port, self.cfg.replication_user,
                                       self.cfg.replication_password, semi)
                return f.name
            except StepError as exc:
                log.warning("failover: could not repoint %s (retried later): %s", f.name, exc)
                return None

        if not others:
            return []
        with ThreadPoolExecutor(max_workers=len(others)) as pool:
            return [n for n in pool.map(one, others) if n]

    def _await_semi(self, link: Link, steps: _Steps) -> None:
        """Semi-sync: release writes once a replica can acknowledge them (at most 1 s), so the first
        commits do not sit out rpl_semi_sync_master_timeout."""
        with steps("wait for a semi-sync replica") as note:
            deadline = time.monotonic() + 1.0
            while ops.semi_clients(link) < 1:
                if time.monotonic() > deadline:
                    note["text"] = "none yet; commits fall back to asynchronous after the semi-sync timeout"
                    return
                time.sleep(0.01)

    def _install(self, best: Facts, old: str, end_of_old: str, repointed: list[str], steps: _Steps) -> None:
        """Publish the new primary, then release the held writes. An old primary that does not follow
        it yet is left to the rejoin pass, which compares it with end_of_old (where best took over)."""
        with steps(f"publish {best.name} as the primary"):
            updates = {n: {"source": best.address, "source_id": best.server_id} for n in repointed}
            updates[best.name] = {"server_id": best.server_id}
            with self._lock:
                if old not in repointed:
                    self._demoted[old] = end_of_old
            self._designate(best.name, updates)
            self._hold(False)
        self._semi = self._semi if self._semi is not None else {"enabled": best.semi_slave, "timeout": None,
                                                                  "wait_point": "AFTER_SYNC"}

    def _fail(self, kind: str, old: ServerState, best: Facts | None, message: str, steps: _Steps,
              started: float) -> None:
        with self._lock:
            self._auto = False
            self._disabled_reason = f"the {kind} at {time.strftime('%H:%M:%S', time.localtime(started))} failed"
            self._last[kind] = {"ok": False, "time": started, "old": old.address,
                                "new": best.address if best else None, "duration_ms": round(steps.elapsed_ms, 1),
                                "message": message}
        self._said.add("disabled")
        self._hold(False)
        log.error("%s failed after %.0f ms: %s; automatic failover is disabled until enable_auto_failover()",
                  kind, steps.elapsed_ms, message)

    def _begin(self, kind: str) -> None:
        with self._lock:
            self._in_progress = kind
        self._hold(True)

    def _end(self) -> None:
        with self._lock:
            self._in_progress = None
            held = self._holding
        if held:
            self._hold(False)

    def _hold(self, held: bool) -> None:
        with self._lock:
            self._holding = held
        self.monitor.refresh()

    def _hook(self, which: str, old: str, new: str, event: str) -> None:
        cmd = self.cfg.pre_failover_hook if which == "pre" else self.cfg.post_failover_hook
        env = {**os.environ, "RWPROXY_OLD_PRIMARY": old, "RWPROXY_NEW_PRIMARY": new, "RWPROXY_EVENT": event}
        t = time.monotonic()
        code, out = ops.run_hook(cmd, env, self.cfg.hook_timeout)
        took = (time.monotonic() - t) * 1000
        if code == 0:
            if which == "post":
                log.info("%s: post_failover_hook ok (%.0f ms)", event, took)
            return
        why = f"timed out after {self.cfg.hook_timeout:g} s" if code is None else f"exited with {code}"
        msg = why + (f": {out}" if out else "")
        if which == "pre":
            raise StepError(msg)  # the step's name says which hook
        log.error("%s: post_failover_hook %s", event, msg)

    def _link(self, s) -> Link:
        """A cached admin connection (release() returns it); a new one only when none is idle."""
        return self._links.take(s)

    def _connect(self, s) -> Link:
        m, c = self.config.monitor, self.cfg
        # long enough for the longest single wait (MASTER_GTID_WAIT up to switchover_timeout)
        return Link(self._backends[s.name], self._user, self._password, connect_timeout=max(1.0, 2 * m.connect_timeout),
                    read_timeout=max(c.switchover_timeout, c.catchup_timeout) + 10.0,
                    tls=policies_for(self.config).get(s.name))

    def _warm(self, topo: Topology) -> None:
        """Keep an idle admin connection to every healthy server, so a failover starts without connecting."""
        for s in topo.servers.values():
            if s.state not in (DOWN, MAINTENANCE) and not s.fails and not self._links.has(s.name):
                try:
                    self._link(s).release()
                except StepError:
                    pass

    def _facts(self, s: ServerState) -> Facts:
        b = self._backends.get(s.name)
        return Facts(s.name, s.host, s.port, priority=b.priority if b else 0, index=self._order.get(s.name, 0),
                     no_promotion=bool(b and b.no_promotion))

    # ---- switchover ----------------------------------------------------------------------

    def switchover(self, target: str, timeout: float | None = None) -> dict:
        """Planned: hold writes, drain, old primary read-only, target catches up, promote, old follows it.

        Blocks up to `timeout` (default switchover_timeout) for the drain and the catch-up; on any
        failure before the target is promoted everything is put back and ok is False.
        """
        from proxy.cluster.failover.switchover import run_switchover

        limit = self.cfg.switchover_timeout if timeout is None else timeout
        res = {"ok": False, "old": None, "new": None, "write_pause_ms": None, "message": ""}
        if self._mm:
            res["message"] = "master-master: every master is already a writer; there is nothing to switch"
            return res
        if not self._action.acquire(timeout=max(0.0, limit)):
            res["message"] = "another failover or switchover is in progress"
            return res
        try:
            return run_switchover(self, target, time.monotonic() + limit, res)
        finally:
            self._action.release()
