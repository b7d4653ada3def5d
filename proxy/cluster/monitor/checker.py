"""The control plane's health and lag monitor: it alone writes the topology.

Runs in the supervisor process on a thread of its own with its own event loop
(the workers' loops never wait on a check).  Per backend there is one check task
and one heartbeat task on that loop, each with its own connection and timeouts,
so a hung server only ever stalls its own tasks; the tasks wake on one grid of
ticks, so a tick is one wakeup for every server (one thread instead of 2N+1; the
idle CPU measured the same as with threads, docs/performance.md). A calm server
leaves the tick and is checked on events instead (cadence.py: its own or its
writer's heartbeats, a closed connection; idle CPU 11-13 -> 4.0 ms/s).  A publisher
thread turns the per-server states into immutable ``Topology`` snapshots and
hands them to ``on_update``: at once when something a router acts on changed,
and at least every second otherwise (lag values).  See docs/monitor.md.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import replace
from typing import Callable

import pymysql
import uvloop

from proxy.cluster.monitor.cadence import GTID_WAIT, Cadence
from proxy.cluster.monitor.health import Observation, Policy, decide, significant
from proxy.cluster.monitor import wire
from proxy.cluster.monitor.node import Node, close_quietly
from proxy.cluster.monitor.heartbeat import HeartbeatWriting
from proxy.cluster.monitor.replication import ReplicationReading
from proxy.cluster.progress import applied_stamp
from proxy.cluster.sqlerrors import describe
from proxy.config.diff import readdressed
from proxy.config.schema import MASTER_MASTER
from proxy.cluster.topology import DOWN, LAGGING, MAINTENANCE, MASTER, PRIMARY, REPLICA, UP, ServerState, Topology, from_config

log = logging.getLogger("rwproxy.monitor")

PUBLISH_EVERY = 1.0  # s: lag values reach the workers at least this often


class Monitor(Cadence, ReplicationReading, HeartbeatWriting):
    """Checks every backend, decides roles/health/read-pool membership, publishes Topology snapshots.

    on_update(topology) runs on the monitor's publisher thread; it must not block for long.
    on_check(server_state), for instrumentation, runs on the monitor's loop after every check.
    """

    def __init__(self, config, on_update: Callable[[Topology], None],
                 on_check: Callable[[ServerState], None] | None = None):
        self.config = config
        self._on_update = on_update
        self._on_check = on_check
        self._settings(config)
        self._schema = config.monitor.heartbeat_schema
        # A replica's newest applied heartbeat from another server: in the check query, or alone (_lag).
        self._hb_newest = f"(SELECT MAX(ts) FROM `{self._schema}`.heartbeat WHERE server_id <> @@server_id)"
        initial = from_config(config)
        self._topology = initial
        self._states: dict[str, ServerState] = dict(initial.servers)
        self._nodes = {b.name: Node(b) for b in config.backends}
        self._cond = threading.Condition()
        self._dirty = False
        # Failover's authority (primary-replica only): the designated primary's name, or None while
        # roles come from the config and read_only. _gen changes with every designation so that a
        # check that was under way across the change is dropped instead of undoing it.
        self._designated: str | None = None
        self._gen = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # the monitor thread's, while it runs
        self._loop_thread: int | None = None  # its threading.get_ident()
        self._stirred = time.monotonic()  # the last event (cadence.py): every server on the tick for a while
        self._ended: asyncio.Event | None = None  # set on the loop by stop()
        self._tasks: list[asyncio.Future] = []
        self._epoch = 0.0  # time.monotonic() of the first tick (see _on_grid)
        self._admin: dict[str, str] = {}  # server -> "offline" / "maintenance", set by an operator
        # The board of what each replica is known to have applied (cluster/progress.py), shared with
        # the workers' routers; set by the control plane before the workers fork.
        self.progress = None
        # on_overdue(name), on the loop: a writer's check or heartbeat has waited `interval` (failover)
        self.on_overdue: Callable[[str], None] | None = None

    def _settings(self, config) -> None:
        """What the monitor takes from the config: at start and again on every reload."""
        m = self._mon = config.monitor
        self._user, self._password = config.monitor_credentials()
        self._policy = Policy(failcount=m.failcount, readmit_after=m.readmit_after,
                              max_lag_ms=config.routing.max_replica_lag * 1000.0,
                              master_master=config.cluster.topology == MASTER_MASTER)
        # A writer whose samples stopped this long ago is "stale": lags are then measured against
        # its last known time. 1 s keeps a caught-up replica's reading (<= half of this) far below
        # any sane max_replica_lag while the primary is unreachable.
        self._stale_after = max(1.0, 3 * m.heartbeat_interval, 3 * m.interval)
        # Workers route on GTID positions only in gtid read-your-writes mode (see significant()).
        self._gtid_routing = "gtid" in {config.routing.read_your_writes, *(u.read_your_writes for u in config.users)}
        # Failed checks are published at once up to this count: failover counts them.
        self._fail_cap = max(m.failcount, config.failover.failcount)

    # ---- public API ------------------------------------------------------------

    @property
    def topology(self) -> Topology:
        """The latest published snapshot."""
        return self._topology

    def start(self) -> "Monitor":
        if self._threads:
            raise RuntimeError("monitor already started")
        self._stop.clear()
        self._spawn("loop", self._run_loop)
        self._spawn("publish", self._publish_loop)
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop (its tasks are cancelled, their connections closed) and the publisher."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
            loop, ended = self._loop, self._ended
        if loop is not None and ended is not None:
            try:
                loop.call_soon_threadsafe(ended.set)
            except RuntimeError:
                pass  # the loop already closed
        limit = timeout if timeout is not None else self._mon.connect_timeout + 2 * self._mon.read_timeout + 1
        deadline = time.monotonic() + limit
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._threads = [t for t in self._threads if t.is_alive()]

    def current_states(self) -> dict[str, ServerState]:
        """Each server's state as of its latest check, published or not (GTID positions and lag
        reach the workers only about once a second; `rwproxy status` shows them fresh)."""
        with self._cond:
            return dict(self._states)

    def wait_until(self, predicate: Callable[[Topology], bool], timeout: float) -> bool:
        """Block until predicate(published topology) is true; False after timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self._topology):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    # ---- failover's authority -------------------------------------------------

    @property
    def designated(self) -> str | None:
        return self._designated

    def designate(self, name: str | None, updates: dict[str, dict] | None = None) -> int:
        """Make `name` the only primary (None: roles from config/read_only again); publish at once.

        Every other server that was a writer becomes a replica at once, whatever its read_only says
        later. `updates` sets facts the caller knows before the next check does (name -> fields,
        e.g. the new source of a repointed replica). Checks already under way are discarded.
        Returns the version from which published snapshots reflect this designation.
        """
        with self._cond:
            self._designated = name
            self._gen += 1
            for node in self._nodes.values():
                node.repl = None  # replication was just changed: read it afresh
            now = time.time()
            for sname, st in list(self._states.items()):
                fields = dict((updates or {}).get(sname, {}))
                if name is not None and sname == name:
                    for key, value in (("role", PRIMARY), ("read_only", False), ("source", ""), ("source_id", None),
                                       ("io_running", None), ("sql_running", None), ("lag_ms", None)):
                        fields.setdefault(key, value)
                    if st.state not in (DOWN, MAINTENANCE):
                        fields.setdefault("readable", True)
                        fields.setdefault("state", UP)
                        fields.setdefault("last_error", "")
                elif name is not None and st.role in (PRIMARY, MASTER):
                    fields.setdefault("role", REPLICA)
                    fields.setdefault("readable", False)
                if fields:
                    new = replace(st, **fields)
                    if new.role != st.role or new.state != st.state:
                        new = replace(new, changed_at=now)
                    self._states[sname] = new
            self._changed()
            return self._topology.version + 1

    def refresh(self) -> None:
        """Publish a snapshot now (on the publisher thread), e.g. after on_update's annotation changed."""
        with self._cond:
            self._changed()

    def _changed(self, stir: bool = True) -> None:
        """(Under self._cond.) Something a router acts on changed: the publisher runs now, and
        (stir) every server is checked on the tick for a while (cadence.py)."""
        self._dirty = True
        self._cond.notify_all()
        if stir:
            self._stir()

    def set_maintenance(self, name: str, reason: str) -> None:
        """Keep a server out of every pool until clear_maintenance (checks only refresh last_check)."""
        with self._cond:
            st = self._states[name]
            self._states[name] = replace(st, state=MAINTENANCE, readable=False, last_error=reason,
                                         role=REPLICA if st.role in (PRIMARY, MASTER) else st.role,
                                         changed_at=time.time())
            self._changed()

    def clear_maintenance(self, name: str) -> None:
        """Judge the server from its checks again (it re-enters the read pool after readmit_after)."""
        with self._cond:
            st = self._states[name]
            if st.state == MAINTENANCE:
                self._states[name] = replace(st, state=LAGGING, last_error="", changed_at=time.time())
                self._nodes[name].tracker.good = 0
                self._changed()

    def reconfigure(self, config) -> list[str]:
        """A reload: new settings, backends added, removed, re-addressed or re-weighted. Returns
        one line per backend change. (The caller refused a reload that removes the primary.)"""
        old = {b.name: b for b in self.config.backends}
        new = {b.name: b for b in config.backends}
        said = []
        with self._cond:
            self.config = config
            self._settings(config)
            fresh = from_config(config).servers
            for name, b in old.items():
                if name not in new or readdressed(b, new[name]):
                    self._nodes.pop(name).retired.set()
                    self._states.pop(name, None)
                    self._admin.pop(name, None)
                    said.append(f"{name}: removed" if name not in new else f"{name}: now at {new[name].where}")
            started = []
            for name, b in new.items():
                if name not in self._nodes:
                    self._nodes[name] = Node(b)
                    self._states[name] = replace(fresh[name], state=LAGGING, last_error="not checked yet")
                    started.append(self._nodes[name])
                    if name not in old:
                        said.append(f"{name}: added ({b.where})")
                else:
                    node = self._nodes[name]
                    node.backend, node.configured_role = b, b.role
                    st = self._states[name]
                    if st.weight != b.weight:
                        self._states[name] = replace(st, weight=b.weight)
                        said.append(f"{name}: weight {st.weight} -> {b.weight}")
            self._changed()
            loop = self._loop  # None: not running (yet); _main watches every node it finds
        for node in started:
            if loop is not None:
                try:
                    loop.call_soon_threadsafe(self._watch, node)
                except RuntimeError:
                    pass  # stopping
        return said

    def admin_states(self) -> dict[str, str]:
        with self._cond:
            return dict(self._admin)

    def set_admin_state(self, name: str, state: str) -> None:
        """An operator's OFFLINE (no new statements; running ones and read-only transactions
        finish), MAINTENANCE (out of every pool at once) or ONLINE ("": judged by its checks
        again, back in the read pool after readmit_after good checks)."""
        with self._cond:
            before = self._admin.pop(name, "")
            if state:
                self._admin[name] = state
            st = self._states[name]
            if state == "offline":
                self._states[name] = replace(st, readable=False, changed_at=time.time())
            self._changed()
        if state == "maintenance":
            self.set_maintenance(name, "set by an operator (SET SERVER ... MAINTENANCE)")
        elif before == "maintenance":
            self.clear_maintenance(name)

    def unanswered(self, name: str) -> float:
        """Seconds the check or heartbeat of `name` under way has waited for its answer (0 when
        none is; a calm primary is probed by its heartbeats alone, cadence.py)."""
        node = self._nodes[name]
        started = [s for s in (node.check_started, node.beat_started) if s]
        return max(0.0, time.monotonic() - min(started)) if started else 0.0

    def quiet(self, name: str, seconds: float) -> None:
        """Do not judge `name`'s checks for a moment: rwproxy itself restarts its replication (a
        replica stopped for a few ms must not leave the read pool for readmit_after checks)."""
        node = self._nodes[name]
        node.quiet_until = time.monotonic() + seconds
        node.repl = None  # (and read its replication afresh after)
        self._stir()

    def pause_heartbeat(self, name: str, paused: bool = True) -> None:
        """Stop (or resume) heartbeat writes on one server; on return no write is under way there.

        Switchover needs this: the monitor user may bypass read_only, so a heartbeat landing on the
        old primary after its final GTID position was taken would be a transaction the new primary
        never gets.
        """
        node = self._nodes[name]
        with node.hb_lock:
            node.hb_paused = paused
        self._stir()

    # ---- the loop --------------------------------------------------------------

    def _run_loop(self) -> None:
        loop = uvloop.new_event_loop()
        try:
            loop.run_until_complete(self._main(loop))
        finally:
            with self._cond:
                self._loop = None
            loop.close()

    async def _main(self, loop) -> None:
        """Every server's checks and heartbeats as tasks of one event loop, until stop()."""
        self._ended = asyncio.Event()
        self._epoch = time.monotonic()
        with self._cond:
            self._loop = loop
            self._loop_thread = threading.get_ident()
            nodes = list(self._nodes.values())
        for node in nodes:
            self._watch(node)
        if not self._stop.is_set():
            await self._ended.wait()
        tasks = [t for t in self._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _watch(self, node: Node) -> None:
        """(On the loop.) Start a server's check task, and its heartbeat task when heartbeats are on."""
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(asyncio.ensure_future(self._check_loop(node)))
        if self._mon.heartbeat:
            self._tasks.append(asyncio.ensure_future(self._heartbeat_loop(node)))

    def _spawn(self, name: str, target, *args) -> None:
        t = threading.Thread(target=target, args=args, name=f"rwproxy-monitor-{name}", daemon=True)
        t.start()
        self._threads.append(t)

    async def _connect(self, node: Node) -> wire.WireConnection:
        m = self._mon
        conn = await wire.connect(self.config, node.backend, self._user, self._password, m.connect_timeout,
                                  m.read_timeout)
        conn.on_lost = lambda: self._lost(node)
        return conn

    async def _heartbeat_loop(self, node: Node) -> None:
        conn: list = [None]
        state = {"table": False, "retry_at": 0.0}
        try:
            await self._paced(lambda: self._mon.heartbeat_interval, lambda: self._beat(node, conn, state), node)
        finally:
            close_quietly(conn[0])

    # ---- checks ----------------------------------------------------------------

    async def _check_once(self, node: Node, conn: list, pos: str | None = None) -> None:
        """One check; pos: a calm replica's, first waiting up to GTID_WAIT to reach it (cadence.py)."""
        gen = self._gen
        # (the answer is due once the wait is over)
        started = node.check_started = time.monotonic() + (GTID_WAIT if pos else 0.0)
        watch = None
        st = self._states.get(node.name)
        if st is not None and st.role in (PRIMARY, MASTER):
            watch = asyncio.get_running_loop().call_later(self._mon.interval, self._overdue, node, started,
                                                          "check_started")
        try:
            obs = await self._observe(node, conn, pos)
        finally:
            node.check_started = 0.0
            if watch is not None:
                watch.cancel()
        self._judge(node, obs, gen)

    def _judge(self, node: Node, obs: Observation, gen: int) -> None:
        """(On the loop.) Turn an observation of `node` (a check's or a calm writer's heartbeat's)
        into its state, log the change, publish what routers act on."""
        node.judged = time.monotonic()
        with self._cond:
            if gen != self._gen or node.retired.is_set():
                return  # a designation happened while this check ran (its view predates it), or a reload removed it
            prev = self._states[node.name]
            designated = None if self._designated is None else self._designated == node.name
        new, message = decide(prev, obs, node.tracker, self._policy, node.configured_role, designated)
        if time.monotonic() < node.quiet_until and obs.ok:
            # rwproxy is restarting its replication (quiet): positions and lag count, health does not
            new = replace(new, state=prev.state, readable=prev.readable, last_error=prev.last_error,
                          io_running=prev.io_running, sql_running=prev.sql_running, changed_at=prev.changed_at)
            message = ""
        if message:  # logged before anyone can see the new state
            worse = (new.state != prev.state and new.state in (DOWN, LAGGING)) or (prev.readable and not new.readable)
            level = logging.WARNING if worse else logging.INFO
            log.log(level, "%s: %s", node.label, message)
        with self._cond:
            if gen != self._gen or self._states.get(node.name) is not prev:
                return  # designated, put in maintenance or removed meanwhile
            if new.readable and self._admin.get(node.name) == "offline":
                new = replace(new, readable=False)  # an operator took it out of the read pool
            self._states[node.name] = new
            if obs.applied_at is not None and self.progress is not None:
                self.progress.record(node.name, obs.applied_at)
            failing = new.fails != prev.fails and new.fails <= self._fail_cap
            if significant(prev, new, self._gtid_routing) or failing:
                self._changed(stir=failing or significant(prev, new, False))
        if self._on_check is not None:
            try:
                self._on_check(new)
            except Exception:
                log.exception("on_check callback failed")

    async def _observe(self, node: Node, conn: list, pos: str | None = None) -> Observation:
        """One round of queries on the node's dedicated connection; any connection error fails it."""
        try:
            if conn[0] is not None and conn[0].lost:  # closed while idle (KILL, wait_timeout, a restart):
                close_quietly(conn[0])  # the connection attempt decides, not the corpse
                conn[0] = None
            if conn[0] is None:
                conn[0] = await self._connect(node)
                node_version = conn[0].get_server_info()
            else:
                node_version = ""
            sent = time.monotonic()  # (before the server's NOW(): what the lag proves, progress.py)
            ro, sid, cur_pos, slave_pos, binlog_pos, now, ac, nbe, hb_ts = await self._check_query(node, conn[0], pos)
            # `at` is when the server answered: the instant the lag estimate refers to
            obs = Observation(ok=True, at=time.time(), read_only=bool(int(ro)), server_id=int(sid),
                              version=node_version, gtid_current_pos=cur_pos or "",
                              gtid_slave_pos=slave_pos or "", autocommit=bool(int(ac)),
                              no_backslash_escapes=bool(int(nbe)))
            if node.server_id != obs.server_id:
                node.repl = None  # another server answers on this address now
            node.server_id = obs.server_id
            if not obs.read_only:
                node.timeline.add(float(now), binlog_pos or "")
            await self._replication(node, conn[0], obs)
            if obs.replicating:
                obs.lag = await self._lag(node, conn[0], obs, float(now), hb_ts)
                obs.applied_at = applied_stamp(sent, obs.lag)
            else:
                node.hb_merge = False
            return obs
        except (pymysql.MySQLError, OSError) as exc:
            close_quietly(conn[0])
            conn[0] = None
            node.repl = None
            return Observation(ok=False, at=time.time(), error=describe(exc))

    # ---- publishing --------------------------------------------------------------

    def _publish_loop(self) -> None:
        last = 0.0
        while not self._stop.is_set():
            with self._cond:
                wait = PUBLISH_EVERY - (time.monotonic() - last)
                if not self._dirty and wait > 0:
                    self._cond.wait(wait)
                if self._stop.is_set():
                    return
                if not self._dirty and time.monotonic() - last < PUBLISH_EVERY:
                    continue
                self._dirty = False
                prev = self._topology
                servers = {name: self._states[name] for name in self._nodes if name in self._states}
                topo = Topology(servers, prev.version + 1, time.time())
                self._topology = topo
                self._cond.notify_all()
            last = time.monotonic()
            try:
                self._on_update(topo)
            except Exception:
                log.exception("on_update callback failed")
