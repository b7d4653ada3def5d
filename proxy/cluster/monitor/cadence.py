"""When each server is checked: on every tick while anything needs watching, on events while calm.

Polling three healthy servers ten times a second cost the idle control plane 12-13 ms of CPU a
second, and each query's own Python work was the cost, not the wakeups (docs/performance.md).
So a server whose checks have nothing to find is not polled on the tick:

* a calm **writer** (the primary, heartbeat working, not replicating) is judged from its own
  heartbeat round trip, which reads the check's columns too (heartbeat.py): no check query;
* a calm **replica** (readable, lag measured by heartbeat and well under max_replica_lag) is
  checked right after every CALM_REPLICA_BEATS-th heartbeat of its writer (every 0.5 s at the
  defaults: a check after every heartbeat was 12 round trips a second on the sandbox and a
  control plane of 5.3 ms/s, after every second one 8 and 4.0 in the same alternating
  rounds), and that check first waits up to GTID_WAIT for the heartbeat to arrive
  (MASTER_GTID_WAIT), so the reading is current instead of a heartbeat period old;
* anything else is checked every `interval` on the grid of ticks, as before.

Events end a calm nap at once: the server closing a monitor connection (a killed server is
noticed at once, where polling noticed it at the next tick), a heartbeat failing or going
unanswered for `interval`, a failed check anywhere, any change a router acts on, a designation,
a reload, an operator's command. After an event every server is checked on the tick for
STIR seconds. `[monitor] steady_checks = false` keeps every server on the tick always.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time

from proxy.cluster.monitor.node import close_quietly
from proxy.cluster.topology import PRIMARY, REPLICA, UP

log = logging.getLogger("rwproxy.monitor")

WRITER = "writer"
CALM_REPLICA = "replica"
STIR = 1.0  # s: after an event every server is checked on the tick for at least this long
GTID_WAIT = 0.05  # s a calm replica's check waits for the heartbeat it was woken by
CALM_REPLICATION = 20  # a calm server reuses a healthy replication reading this many replication_intervals
CALM_REPLICA_BEATS = 2  # a calm replica is checked after every this many heartbeats of its writer


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class Cadence:
    """Methods of Monitor (uses its _mon, _policy, _states, _nodes, _admin, _loop, _stop,
    _gtid_routing, _writer_for, _check_once)."""

    # ---- events ------------------------------------------------------------------------------

    def _stir(self) -> None:
        """Something happened: every server goes back to the tick for STIR seconds, and calm naps
        end now. Safe from any thread."""
        self._stirred = time.monotonic()
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._wake_calm()
        else:
            try:
                loop.call_soon_threadsafe(self._wake_calm)
            except RuntimeError:
                pass  # the loop closed: stopping

    def _wake_calm(self) -> None:
        for node in list(self._nodes.values()):
            if node.calm:
                node.wake()

    def _lost(self, node) -> None:
        """(On the loop.) A monitor connection to `node` closed under us: check it now."""
        self._stir()
        node.wake()

    def _overdue(self, node, started: float, what: str = "beat_started") -> None:
        """(On the loop, `interval` after a heartbeat or a writer's check began.) Still unanswered:
        stir, and tell on_overdue (failover judges a primary whose answers are late)."""
        if getattr(node, what) == started:
            self._stir()
            told = self.on_overdue
            if told is not None:
                try:
                    told(node.name)
                except Exception:
                    log.exception("on_overdue callback failed")

    def _slow(self, node) -> bool:
        """A check or heartbeat of `node` has waited longer than `interval` for its answer."""
        now, limit = time.monotonic(), self._mon.interval
        return any(s and now - s > limit for s in (node.check_started, node.beat_started))

    # ---- calm ----------------------------------------------------------------------------------

    def _fresh(self, beats: int = 1) -> float:
        """s within which a working writer's next `beats` heartbeats have landed."""
        return (beats + 1) * self._mon.heartbeat_interval + self._mon.interval

    def _beat_landed(self, writer, pos: str) -> None:
        """(On the loop.) `writer`'s heartbeat answered at `pos`: the calm replicas napping for it
        count it, and each checks after every CALM_REPLICA_BEATS-th, waiting for `pos`."""
        for node in list(self._nodes.values()):
            if node.napping_for is writer:
                node.beats_heard += 1
                if node.beats_heard >= CALM_REPLICA_BEATS:
                    node.wake(pos)

    def _calm(self, node) -> str:
        """WRITER, CALM_REPLICA, or '' (checked on the tick)."""
        m = self._mon
        if not (m.steady_checks and m.heartbeat) or self._policy.master_master:
            return ""
        now = time.monotonic()
        if now - self._stirred < max(STIR, 10 * m.interval) or now < node.quiet_until:
            return ""
        st = self._states.get(node.name)
        if (st is None or st.state != UP or st.fails or node.tracker.good < self._policy.readmit_after
                or node.name in self._admin):
            return ""
        if st.role == PRIMARY:
            repl = node.repl
            if (node.hb_denied or node.hb_paused or now - node.beat_ok > self._fresh() or repl is None
                    or repl[0]["replicating"] is not False):
                return ""
            return WRITER
        if st.role != REPLICA or not st.readable or self._gtid_routing:
            return ""  # in gtid read-your-writes mode routers want replicas' positions every tick
        writer = self._writer_for(node)
        lag = node.tracker.last_lag
        # Lag grows at most one second per second plus a sampling gap: this far below the limit a
        # crossing cannot happen before the replica's next calm check.
        if (writer is None or writer.calm != WRITER or lag is None or lag.ms is None or lag.source != "heartbeat"
                or lag.ms > self._policy.max_lag_ms - 1000 * self._fresh(CALM_REPLICA_BEATS)):
            return ""
        return CALM_REPLICA

    # ---- the check task ------------------------------------------------------------------------

    async def _guarded(self, node, work) -> None:
        """Await a check or heartbeat: a bug in it must not silently end the server's task (logged
        at most once a minute per server)."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception:
            if time.monotonic() - node.complained > 60:
                node.complained = time.monotonic()
                log.exception("unexpected error in the monitor's %s task (logged at most once a minute)", node.name)

    async def _nap(self, node, seconds: float, writer=None):
        """Sleep up to `seconds` unless node.wake() ends it; what the waker passed (None: slept it out)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        node.waker, node.napping_for, node.beats_heard = fut, writer, 0
        handle = loop.call_later(max(0.0, seconds), _expire, fut)
        try:
            return await fut
        finally:
            handle.cancel()
            node.waker = node.napping_for = None

    def _on_grid(self, due: float, period: float) -> float:
        """When to run something due at `due`: the next check tick at or after it when its period is
        at least the check interval, so that heartbeats go out in the checks' wakeup instead of one of
        their own."""
        step = self._mon.interval
        if period < step:
            return due
        k = math.ceil((due - self._epoch) / step - 1e-6)
        return self._epoch + k * step

    async def _check_loop(self, node) -> None:
        """A server's checks until stopped or retired: on the tick, or on events while calm."""
        conn: list = [None]
        due = time.monotonic()
        skip, pos = False, None
        try:
            while not self._stop.is_set() and not node.retired.is_set():
                if not skip:
                    await self._guarded(node, self._check_once(node, conn, pos))
                skip, pos = False, None
                node.calm = self._calm(node)
                now = time.monotonic()
                if node.calm == WRITER:
                    got = await self._nap(node, self._fresh())
                    # slept it out while its heartbeats judged it: nothing to ask
                    skip = got is None and time.monotonic() - node.judged < self._fresh()
                    due = 0.0  # (back on the tick: the first tick after the next check)
                elif node.calm == CALM_REPLICA:
                    got = await self._nap(node, self._fresh(CALM_REPLICA_BEATS), self._writer_for(node))
                    pos = got if isinstance(got, str) else None
                    due = 0.0
                else:
                    p = self._mon.interval
                    due = max(due + p, now)
                    if await self._nap(node, self._on_grid(due, p) - now) is not None:
                        due = 0.0  # woken early: after the check it asked for, the next tick
        finally:
            close_quietly(conn[0])

    # ---- the heartbeat task --------------------------------------------------------------------

    async def _paced(self, period, body, node) -> None:
        """Await body() every period() seconds (no bursts after an overrun) until stopped or the node
        is retired by a reload. period is read each round, so a reload changes it."""
        due = time.monotonic()
        while not self._stop.is_set() and not node.retired.is_set():
            await self._guarded(node, body())
            p = period()
            due = max(due + p, time.monotonic())
            await asyncio.sleep(max(0.0, self._on_grid(due, p) - time.monotonic()))
