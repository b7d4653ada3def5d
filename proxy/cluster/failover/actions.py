"""What failover, switchover and rejoin do to the cluster, as one toolkit they share.

Admin connections (cached), fresh facts about a server, hooks, holding and releasing writes,
repointing replicas, and the one promote-then-publish sequence (promote, then take_over): a
promoted server is published as the primary and the held writes are released at once without
semi-sync, or, with it, once a replica can acknowledge commits. Every method blocks (SQL over
PyMySQL); they run on the failover thread or a switchover's caller, one action at a time.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from proxy.backend.tls import policies_for
from proxy.cluster.failover import ops
from proxy.cluster.failover.ops import Facts, Link, StepError
from proxy.cluster.topology import DOWN, MAINTENANCE, ServerState

log = logging.getLogger("rwproxy.failover")


def label(s) -> str:
    return f"{s.name} ({s.address})"


class Steps:
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


class Actions:
    def __init__(self, config, monitor, state):
        self.config, self.cfg = config, config.failover
        self.monitor = monitor  # designates the primary, publishes, pauses heartbeats
        self.state = state  # FailoverState
        self.user, self.password = config.monitor_credentials()
        self.backends = {b.name: b for b in config.backends}
        self.order = {b.name: i for i, b in enumerate(config.backends)}
        self.links = ops.LinkCache(self._connect)
        # proxy/coord's Coordinator when several instances share the cluster: check(what, link)
        # before any step that changes a server, record(link) on a promoted one, poke() to publish
        self.fence = None

    def guard(self, what: str, link: Link | None = None) -> None:
        """StepError unless this instance may still change the servers (always, without coordination)."""
        if self.fence is not None:
            self.fence.check(what, link)

    def reconfigure(self, config) -> None:
        """A reload: new settings and backends (cached links to a re-addressed server are dropped
        when they fail; a removed server is never acted on, the monitor no longer reports it)."""
        self.config, self.cfg = config, config.failover
        self.user, self.password = config.monitor_credentials()
        self.backends = {b.name: b for b in config.backends}
        self.order = {b.name: i for i, b in enumerate(config.backends)}

    # ---- connections and facts ---------------------------------------------------------
    def link(self, s) -> Link:
        """A cached admin connection (release() returns it); a new one only when none is idle."""
        return self.links.take(s)

    def _connect(self, s) -> Link:
        m, c = self.config.monitor, self.cfg
        # long enough for the longest single wait (MASTER_GTID_WAIT up to switchover_timeout)
        return self._open(self.backends[s.name], max(1.0, 2 * m.connect_timeout),
                          max(c.switchover_timeout, c.catchup_timeout) + 10.0)

    def _open(self, backend, connect_timeout: float, read_timeout: float) -> Link:
        return Link(backend, self.user, self.password, connect_timeout=connect_timeout, read_timeout=read_timeout,
                    tls=policies_for(self.config).get(backend.name))

    def answers(self, s, timeout: float) -> float | None:
        """Seconds `s` took to connect and answer SELECT 1 on a new connection, None if it did not
        within `timeout` for each (failover's last check before promoting: controller._on_dead)."""
        backend = self.backends.get(s.name)
        if backend is None:  # (removed by a reload)
            return None
        t0 = time.monotonic()
        try:
            link = self._open(backend, timeout, timeout)
        except StepError:
            return None
        try:
            link.value("SELECT 1")
            return time.monotonic() - t0
        except StepError:
            return None
        finally:
            link.close()

    def warm(self, topo) -> None:
        """Keep an idle admin connection to every healthy server, so a failover starts without connecting."""
        for s in topo.servers.values():
            if s.state not in (DOWN, MAINTENANCE) and not s.fails and not self.links.has(s.name):
                try:
                    self.link(s).release()
                except StepError:
                    pass

    def facts(self, s) -> Facts:
        """An empty Facts for server `s` with its configured promotion preferences."""
        b = self.backends.get(s.name)
        return Facts(s.name, s.host, s.port, priority=b.priority if b else 0, index=self.order.get(s.name, 0),
                     no_promotion=bool(b and b.no_promotion))

    def read_facts(self, link: Link, s) -> Facts:
        return ops.read_facts(link, self.facts(s))

    # ---- holding writes, designating, hooks ------------------------------------------------
    def hold(self, held: bool) -> None:
        """Hold (or release) new writes in every worker: published with the next snapshot, now."""
        self.state.hold(held)
        self.monitor.refresh()
        if self.fence is not None:
            self.fence.poke()

    def designate(self, name: str, updates: dict | None = None) -> None:
        self.state.designated(self.monitor.designate(name, updates))
        if self.fence is not None:
            self.fence.poke()

    def learn_semi(self, p: ServerState) -> None:
        """Remember the primary's semi-sync settings so a promoted replica gets the same."""
        try:
            with self.link(p) as link:
                f = self.read_facts(link, p)
        except StepError:
            return
        self.state.set_semi({"enabled": f.semi_master, "timeout": f.semi_timeout, "wait_point": f.semi_wait_point})

    def semi_for(self, f: Facts) -> dict | None:
        semi = self.state.semi
        if semi is not None:
            return semi if semi["enabled"] else None
        return {"timeout": None, "wait_point": "AFTER_SYNC"} if f.semi_slave else None

    def hook(self, which: str, old: str, new: str, event: str) -> None:
        """Run the pre or post failover hook; a failing pre hook stops the action (StepError)."""
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

    # ---- promote, then publish --------------------------------------------------------------
    def promote(self, link: Link, best: Facts, semi: dict | None, steps: Steps) -> str:
        """Make `best` writable (no longer a replica); returns its GTID position then: the end of
        the history it shares with the old primary."""
        self.guard(f"promote {best.name}", link)
        with steps(f"{best.name}: STOP SLAVE; RESET SLAVE ALL; " + ("semi-sync master on; " if semi else "")
                   + "read_only=0"):
            return ops.promote(link, semi)

    def take_over(self, best: Facts, link: Link, old: str, end_of_old: str, semi: dict | None, steps: Steps,
                  repoint) -> tuple[list[str], float]:
        """The promoted `best` becomes the published primary and the held writes go: at once without
        semi-sync, after repoint() with it (and once a replica acknowledges, at most 1 s later), so
        the first commits do not sit out rpl_semi_sync_master_timeout. repoint() makes the other
        servers follow `best` and returns their names; its failures only warn (the rejoin pass
        retries). Whatever fails, the new primary is published and writes are released.
        Returns (the servers repointed, time.monotonic() when writes were released)."""
        repointed: list[str] = []
        released = 0.0
        if not semi:
            self._install(best, old, end_of_old, repointed, steps)
            released = time.monotonic()
        try:
            repointed = repoint()
            if semi and repointed:
                self._await_semi(link, steps)
        except Exception as exc:
            log.warning("%s: after the promotion: %s", steps.kind, exc)
        finally:
            if semi:
                self._install(best, old, end_of_old, repointed, steps)
                released = time.monotonic()
        self.state.set_semi({"enabled": best.semi_slave, "timeout": None, "wait_point": "AFTER_SYNC"},
                            only_if_unknown=True)
        if self.fence is not None:
            # after the writes are released: with semi-sync this commit waits for a replica's
            # acknowledgement, which only a repointed replica gives (2 s of timeout before)
            try:
                with steps(f"{best.name}: record the leader epoch"):
                    self.fence.record(link)
            except StepError as exc:
                log.warning("%s: could not record the leader epoch on %s (a stale leader is still stopped by "
                            "etcd): %s", steps.kind, best.name, exc)
        return repointed, released

    def _install(self, best: Facts, old: str, end_of_old: str, repointed: list[str], steps: Steps) -> None:
        """Publish the new primary, then release the held writes. An old primary that does not follow
        it yet is left to the rejoin pass, which compares it with end_of_old (where best took over)."""
        with steps(f"publish {best.name} as the primary"):
            updates = {n: {"source": best.address, "source_id": best.server_id} for n in repointed}
            updates[best.name] = {"server_id": best.server_id}
            if old not in repointed:
                self.state.demote(old, end_of_old)
            self.designate(best.name, updates)
            self.hold(False)

    def repoint(self, others: list[Facts], best: Facts, semi, links: dict[str, Link], steps: Steps,
                kind: str = "failover") -> list[str]:
        """Every replica in `others` follows `best` (in parallel); failures only warn: the rejoin pass
        retries them."""
        def one(f: Facts) -> str | None:
            try:
                self.guard(f"repoint {f.name}", links[f.name])
                with steps(f"{f.name}: replicate from {best.name} (CHANGE MASTER ... MASTER_USE_GTID=slave_pos)"):
                    ops.replicate_from(links[f.name], best.host, best.port, self.cfg.replication_user,
                                       self.cfg.replication_password, semi, heartbeat=self.cfg.replica_heartbeat_period)
                return f.name
            except StepError as exc:
                log.warning("%s: could not repoint %s (retried later): %s", kind, f.name, exc)
                return None

        if not others:
            return []
        with ThreadPoolExecutor(max_workers=len(others)) as pool:
            return [n for n in pool.map(one, others) if n]

    def _await_semi(self, link: Link, steps: Steps) -> None:
        """Semi-sync: release writes once a replica can acknowledge them (at most 1 s), so the first
        commits do not sit out rpl_semi_sync_master_timeout."""
        with steps("wait for a semi-sync replica") as note:
            deadline = time.monotonic() + 1.0
            while ops.semi_clients(link) < 1:
                if time.monotonic() > deadline:
                    note["text"] = "none yet; commits fall back to asynchronous after the semi-sync timeout"
                    return
                time.sleep(0.01)

    def close(self) -> None:
        self.links.close()
