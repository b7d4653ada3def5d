"""One worker process: a uvloop event loop serving client sessions with its own pools,
classifier, router and shared connections.

The worker's view of the cluster is the latest topology snapshot the control plane sent down
its pipe (runtime/channels.py); set_topology swaps it in and tells sessions about servers that
went down.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import ssl
import time

from proxy.backend.pool import Pools
from proxy.backend.shared import SharedLines
from proxy.backend.tls import policies_for
from proxy.cluster.topology import DOWN, MAINTENANCE
from proxy.config.diff import readdressed
from proxy.config.schema import MASTER_MASTER, SPREAD_TRANSACTION
from proxy.frontend.login import FAILED_LOGINS, Authenticator
from proxy.protocol import auth
from proxy.routing.classify import Classifier
from proxy.routing.router import Router
from proxy.frontend.accounts import ServerAccounts
from proxy.frontend import idle, kill, sharing
from proxy.frontend.kill import Peers
from proxy.frontend.reader import COMMAND
from proxy.frontend.session import ClientConnection
from proxy.observe import report
from proxy.observe.recorder import Recorder
from proxy.runtime.admission import fds_to_spare
from proxy.runtime.channels import subscribe
from proxy.runtime import rundir
from proxy.runtime.workerctl import WorkerControl

import uvloop

log = logging.getLogger("rwproxy.server")


class Worker:
    """Everything one worker process serves sessions with. Built in the supervisor before the
    fork (or by a test, without running it); run() starts its event loop."""

    def __init__(self, config, index: int, sock, topology, server_version: bytes, rsa_pem: bytes | None,
                 topology_fd: int | None = None, tls_context: ssl.SSLContext | None = None, unix_sock=None):
        self.config = config
        self.index = index
        self.sock, self.unix_sock = sock, unix_sock  # (the Unix one is every worker's: unixsock.py)
        self.topology_fd = topology_fd
        self.server_version = server_version
        self.servers = {b.name: b for b in config.backends}
        self.classifier = Classifier(config.routing.readonly_functions, config.routing.digest_cache_size)
        self.router = Router(config)
        self.multi_master = config.cluster.topology == MASTER_MASTER
        self.spread_per_transaction = self.multi_master and config.cluster.write_spread == SPREAD_TRANSACTION
        self._writer_rr = 0
        self.topology = topology
        self.primary_name = topology.primary.name
        self.live_writers = [s.name for s in topology.writers]
        self.auth_plugin = config.proxy.auth_plugin
        self.authenticator = Authenticator(
            {u.name: u for u in config.users}, self.auth_plugin, auth.RSAKeyPair(rsa_pem) if rsa_pem else None, set(),
            timeout=config.pool.connect_timeout + 8,
            accounts=ServerAccounts(self, config.auth.server_accounts_ttl) if config.auth.server_accounts else None,
        )
        self.tls_context = tls_context  # front-end TLS, loaded (and checked) by the supervisor
        self.backend_tls = policies_for(config)
        self.count = config.proxy.workers or os.cpu_count() or 1  # worker processes in all
        self.pools = Pools(config.pool, self.backend_tls, self.count)
        self.pools.on_pressure = self.release_for
        self.shared = (SharedLines(self.pools, config.pool, config.routing.max_prepared_per_connection)
                       if config.pool.multiplex else None)
        if self.shared is not None:
            self.pools.shed = self.shared.shed
            self.shared.on_refused = sharing.prepare_refused
        self.users = {u.name: u for u in config.users}
        self.gtid_learned = [0, 0]  # GTIDs of writes read from their OK packet, asked for after (gtid mode)
        self.holders: set = set()  # sessions that hold backend connections of their own (idle_release looks at these)
        self.release_after = config.pool.idle_release / 1000.0  # s (0: sessions keep their connections)
        self.peers = None  # kill.Peers: KILL requests to and from the other workers
        self.clients: set = set()
        self.refused: dict[str, int] = {}  # server name -> connections it refused (the user backed off there)
        self.loop = None
        self._next_id = 1
        self.admission = None  # runtime.admission.Admission (proxy-wide limits), set likewise
        self.progress = None  # cluster.progress.Progress (what replicas are known to hold), set by use_progress
        self._user_counts: dict[str, int] = {}  # without `admission` (tests): this worker's clients per user
        self._primary_waiters: list = []
        self._topology_waiters: list = []
        self.primary_ok = True  # a writable primary exists and writes are not held
        st = config.stats
        self.recorder = Recorder(st.max_digests, st.max_digest_length) if st.enabled else None  # per-statement statistics
        self.draining = False  # rwproxy drain / SIGTERM: no new clients; sessions end after their transactions
        self.config_version = 0  # reloads applied
        self.control = None  # runtime.workerctl.WorkerControl: the control plane's questions and orders
        self.listeners: list = []  # the listening asyncio servers (closed when draining)
        self.stop_future = None  # set to end run()

    def set_topology(self, topology) -> None:
        """Swap in a new picture of the cluster (from the control plane)."""
        old = self.topology
        self.topology = topology
        if [s.name for s in topology.readers] != [s.name for s in old.readers]:
            log.debug("worker %d: read pool is now %s", self.index, ", ".join(s.name for s in topology.readers) or "empty")
        primary = topology.primary
        if primary is not None:
            self.primary_name = primary.name
        self.live_writers = [s.name for s in topology.writers]
        for name, s in topology.servers.items():
            before = old.servers.get(name)
            if s.state in (DOWN, MAINTENANCE) and (before is None or before.state != s.state):
                # dead, or taken out by an operator or failover: no reuse of its connections
                self.pools.drop_server(name)  # no reuse of connections to a dead server
                if self.shared is not None:
                    self.shared.drop_server(name)
                for c in list(self.clients):  # nor by sessions; in-flight reads move elsewhere
                    c.server_down(name)
        self.primary_ok = self.writable_primary() is not None
        if len(self.servers) > len(self.config.backends):  # a reload removed servers: forget them once unseen
            configured = {b.name for b in self.config.backends}
            self.servers = {n: b for n, b in self.servers.items() if n in configured or n in topology.servers}
        _wake(self._topology_waiters)
        if self.primary_ok:
            _wake(self._primary_waiters)

    def pick_writer(self) -> str:
        """Master-master: spread sessions (or transactions) over the live masters in turn."""
        live = self.live_writers
        if not live:
            return self.primary_name
        self._writer_rr += 1
        return live[self._writer_rr % len(live)]

    def writable_primary(self):
        """The primary new writes may go to now, or None while failover/switchover holds them."""
        t = self.topology
        p = t.primary
        if t.writes_held or p is None or p.state in (DOWN, MAINTENANCE):
            return None
        return p

    async def next_topology(self, timeout: float) -> None:
        """Wait for the next snapshot from the control plane (or the timeout)."""
        await self._wait(self._topology_waiters, timeout)

    async def _wait(self, waiters: list, timeout: float) -> None:
        """Until set_topology wakes `waiters` (or the timeout)."""
        f = self.loop.create_future()
        waiters.append(f)
        try:
            await asyncio.wait_for(f, timeout)
        except asyncio.TimeoutError:
            pass

    async def wait_for_primary(self) -> str:
        """Hold a statement for the primary until there is one (failover, switchover)."""
        timeout = self.config.failover.write_hold_timeout
        deadline = self.loop.time() + timeout
        while self.writable_primary() is None:
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no writable primary within failover.write_hold_timeout ({timeout:g} s)")
            await self._wait(self._primary_waiters, remaining)
        return self.writable_primary().name

    def admit(self, client) -> bool:
        """A new client, if [proxy] max_connections (across all workers) and the free file descriptors allow it."""
        if not fds_to_spare(client.transport):
            return False
        if self.admission is not None:
            if not self.admission.admit(self.index):
                return False
        elif len(self.clients) >= self.config.proxy.max_connections:
            return False
        self.clients.add(client)
        return True

    def admit_user(self, user) -> bool:
        """A logged-in session of `user`, if its [[users]] max_connections (across all workers) allows it."""
        if self.admission is not None:
            return self.admission.admit(self.index, user.name)
        n = self._user_counts.get(user.name, 0)
        if user.max_connections and n >= user.max_connections:
            return False
        self._user_counts[user.name] = n + 1
        return True

    def release_user(self, name: str) -> None:
        if self.admission is not None:
            self.admission.release(self.index, name)
        elif self._user_counts.get(name):
            self._user_counts[name] -= 1

    def forget(self, client) -> None:
        """A session ended: it no longer counts against the instance's or its user's limits."""
        if client.counted_user is not None:
            self.release_user(client.counted_user)
            client.counted_user = None
        if client in self.clients:
            self.clients.discard(client)
            if self.admission is not None:
                self.admission.release(self.index)

    def _factory(self):
        return ClientConnection(self, self.new_session_id())

    def new_session_id(self) -> int:
        """Session ids are (worker index + 1) << 24 | n: the worker that owns a session is known
        from its id (KILL from another worker), and ids stay clear of the small thread ids
        of freshly started servers, so a backend thread id is not mistaken for a session."""
        n = self._next_id & 0xFFFFFF or 1
        self._next_id = n + 1
        return ((self.index + 1) << 24) | n

    @staticmethod
    def worker_of(session_id: int) -> int | None:
        owner = (session_id >> 24) - 1
        return owner if 0 <= owner < 255 else None

    def run(self) -> None:
        # What exists now (modules, sqlglot's tables, the config) lives as long as the worker:
        # frozen, it is left out of every garbage collection, so a full collection costs a few
        # ms instead of ~40 ms stalls for every client of this worker.
        gc.freeze()
        cpu = pin_worker(self.index, self.config.proxy.cpu_affinity)
        set_scheduling(self.index, self.config.proxy.scheduling)
        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        stop = self.stop_future = self.loop.create_future()
        # SIGINT: stop now. SIGTERM: drain, as the supervisor orders it (a service manager may send
        # SIGTERM to every process of the service at once).
        self.loop.add_signal_handler(signal.SIGINT, lambda: stop.done() or stop.set_result(None))
        p = self.config.proxy
        self.loop.add_signal_handler(signal.SIGTERM, lambda: self.drain(
            p.drain_grace if self.config.metrics.listen else 0.0, max(p.shutdown_timeout, p.drain_grace)))

        async def main():
            self.listeners = [await self.loop.create_server(self._factory, sock=s, backlog=1024)
                              for s in (self.sock, self.unix_sock) if s is not None]
            if self.topology_fd is not None:
                await subscribe(self.loop, self.topology_fd, self.set_topology, lambda: self.drain(0.0, p.shutdown_timeout))
            self.loop.create_task(self._housekeeping())
            self.loop.create_task(self._releases())
            self._start_peers()
            await self._start_control()
            log.info("worker %d serving on %s%s", self.index, self.config.proxy.listen,
                     f" (pinned to CPU {cpu})" if cpu is not None else "")
            await stop
            for server in self.listeners:
                server.close()
            if self.peers is not None:
                self.peers.stop()
            if self.control is not None:
                self.control.stop()
            for c in list(self.clients):
                c.close()
            self.pools.close_all()
            if self.shared is not None:
                self.shared.close_all()

        self.loop.run_until_complete(main())

    def _start_peers(self) -> None:
        peers = Peers(self, rundir.path_for(self.config))
        try:
            peers.start(self.loop)
            self.peers = peers
        except OSError as e:
            log.warning("worker %d: KILL from other workers' sessions will not reach this one: %s", self.index, e)

    async def _start_control(self) -> None:
        ctl = WorkerControl(self.index, rundir.path_for(self.config), self.control_handlers())
        try:
            await ctl.start(self.loop)
            self.control = ctl
        except OSError as e:
            log.warning("worker %d: statistics and reload will not reach this worker: %s", self.index, e)

    def control_handlers(self) -> dict:
        """What the control plane may ask of this worker (runtime/workerctl.py)."""
        return {
            report.SUMMARY: lambda _m: report.summary(self),
            report.SESSIONS: lambda _m: report.sessions(self),
            report.DIGESTS: lambda _m: report.digests(self),
            report.POOLS: lambda _m: report.pools(self),
            "reset-stats": self._reset_stats,
            "kill-session": self._kill_session,
            "reload": lambda m: self.apply_config(m["config"], m["version"]),
            "drain": lambda m: self.drain(m["grace"], m["timeout"]),
        }

    def apply_config(self, config, version: int) -> dict:
        """A reload (the control plane validated it and kept the restart-only keys as they run):
        users, rules, routing, pools, statistics and backends change for every statement from now
        on; sessions go on with the user settings they logged in with."""
        old = self.config
        self.config = config
        self.config_version = version
        new_servers = {b.name: b for b in config.backends}
        moved = {n for n, b in new_servers.items() if n in self.servers and readdressed(self.servers[n], b)}
        for name in (set(self.servers) - set(new_servers)) | moved:  # removed or re-addressed: connections go at once
            self.pools.drop_server(name)
            if self.shared is not None:
                self.shared.drop_server(name)
            for c in list(self.clients):
                c.server_down(name)
        # keep a removed server's entry while the topology still names it (a statement planned on
        # the previous snapshot must still find it); set_topology prunes it
        self.servers = {**{n: b for n, b in self.servers.items() if n in self.topology.servers}, **new_servers}
        r = config.routing
        if (r.readonly_functions, r.digest_cache_size) != (old.routing.readonly_functions, old.routing.digest_cache_size):
            self.classifier = Classifier(r.readonly_functions, r.digest_cache_size)
        balancer = self.router.balancer
        self.router = Router(config)
        self.use_progress(self.progress)
        balancer.policy = self.router.balancer.policy
        self.router.balancer = balancer  # (its counters are the status figures)
        self.users = {u.name: u for u in config.users}
        a = self.authenticator
        a.users = dict(self.users)
        a.timeout = config.pool.connect_timeout + 8
        if config.auth.server_accounts and a.accounts is None:
            a.accounts = ServerAccounts(self, config.auth.server_accounts_ttl)
        elif not config.auth.server_accounts:
            a.accounts = None
        elif a.accounts is not None:
            a.accounts.ttl = config.auth.server_accounts_ttl
        self.pools.cfg = config.pool
        self.release_after = config.pool.idle_release / 1000.0
        if self.shared is not None:
            self.shared.reconfigure(config.pool, r.max_prepared_per_connection)
        st = config.stats
        if not st.enabled:
            self.recorder = None
        elif self.recorder is None:
            self.recorder = Recorder(st.max_digests, st.max_digest_length)
        else:
            self.recorder.max_digests, self.recorder.max_text = st.max_digests, st.max_digest_length
        if self.admission is not None:
            self.admission.reconfigure(config.proxy.max_connections, {u.name: u.max_connections for u in config.users})
        return {"ok": True, "worker": self.index}

    def use_progress(self, progress) -> None:
        """The monitor's board of what each replica holds (session read-your-writes' proof)."""
        self.progress = progress
        if progress is not None:
            progress.add(b.name for b in self.config.backends)  # (reloads: slots as in the control plane)
            self.router.progress = None if self.multi_master else progress

    def drain(self, grace: float, timeout: float) -> dict:
        """rwproxy drain / SIGTERM: keep accepting for `grace` seconds (a load balancer is noticing
        that /health/ready fails), then stop accepting; end every session once it is between
        transactions and quiet for a moment (DRAIN_QUIET), all of them at `timeout`; then exit."""
        if not self.draining:
            self.draining = True
            log.info("worker %d: draining: %d session(s) end after their transactions (at most %g s)",
                     self.index, len(self.clients), timeout)
            self.loop.create_task(self._drain(grace, timeout))
        return {"ok": True, "worker": self.index, "sessions": len(self.clients)}

    async def _drain(self, grace: float, timeout: float) -> None:
        deadline = self.loop.time() + timeout
        stopped_accepting = False
        while True:
            now = self.loop.time()
            if not stopped_accepting and (now - deadline + timeout >= grace or now >= deadline):
                stopped_accepting = True
                for server in self.listeners:
                    server.close()  # connections still in the backlog are served by run()'s end
            mono = time.monotonic()
            for c in list(self.clients):
                st = c.state
                if c.closed or c.phase != COMMAND or st is None:
                    continue
                if not c.busy and not st.open_transaction() and not c.reader.buf and c.idle_for(mono) >= DRAIN_QUIET:
                    c.close()
            if (stopped_accepting and not any(not c.closed for c in self.clients)) or now >= deadline:
                break
            await asyncio.sleep(0.1)
        left = [c for c in self.clients if not c.closed]
        if left:
            log.warning("worker %d: shutdown_timeout reached; closing %d session(s) still in a transaction or "
                        "statement", self.index, len(left))
        if self.stop_future is not None and not self.stop_future.done():
            self.stop_future.set_result(None)

    def _reset_stats(self, _msg) -> dict:
        if self.recorder is not None:
            self.recorder.reset()
            for c in self.clients:
                c.stat_table = None
        self.router.rule_hits = [0] * len(self.router.rules)
        return {"ok": True}

    def _kill_session(self, msg) -> dict:
        """KILL SESSION from the admin port: end session `id` of this worker, as a server's KILL does."""
        for c in list(self.clients):
            if c.conn_id == msg["id"] and not c.closed:
                log.info("session %d: killed from the admin port%s", c.conn_id, " (its statement)" if msg.get("query_only") else "")
                if msg.get("query_only"):
                    kill.stop_running(c, "KILL QUERY from the admin port")
                else:
                    c.close()  # (connection_lost stops what its statement still runs)
                return {"ok": True, "found": True}
        return {"ok": True, "found": False}

    def close_idle_sessions(self) -> None:
        """[proxy] client_idle_timeout, or a session's own shorter SET wait_timeout: close sessions whose
        client sent nothing for that long, as a server does at wait_timeout (the client learns it at its
        next command: the connection is gone)."""
        now = time.monotonic()
        for c in list(self.clients):
            idle.expire(c, now)

    def release_idle(self, now: float) -> None:
        """[pool] idle_release: sessions give back the connections they have not used for that long."""
        idle.sweep(self, now)

    def release_for(self, name: str, wanted: int) -> None:
        """Checkouts wait for a connection to `name` (Pools.on_pressure)."""
        idle.under_pressure(self, name, wanted)

    async def _releases(self):
        """Look for idle connections four times per idle_release (so they go back after 1 to 1.25
        times it), at most every 10 ms."""
        while True:
            after = self.release_after
            await asyncio.sleep(max(0.01, after / 4) if after else 0.5)
            if self.holders:
                self.release_idle(time.monotonic())

    async def _housekeeping(self):
        """Idle sessions close (client_idle_timeout), idle pool connections expire."""
        n = 0
        while True:
            await asyncio.sleep(0.5)
            n += 1
            if n % 2 == 0:
                self.close_idle_sessions()
                FAILED_LOGINS.flush()
            if n % 10 == 0:
                self.pools.expire_idle()
                if self.shared is not None:
                    self.shared.expire_idle(self.config.pool.idle_timeout)


DRAIN_QUIET = 1.0  # s a draining session must be idle before it is closed (a client between two
# statements of one unit of work is not cut off; one idle this long is the pool's, and reconnects)


def _wake(waiters: list) -> None:
    """Release every coroutine waiting on `waiters` (Worker._wait)."""
    pending = waiters[:]
    waiters.clear()
    for f in pending:
        if not f.done():
            f.set_result(None)


def set_scheduling(index: int, policy: str) -> None:
    """scheduling = "batch": the worker runs under SCHED_BATCH (opt-in; default SCHED_OTHER).

    The kernel then never lets a worker that was just woken (a client or server wrote to it)
    preempt the task running on that CPU; it runs when that task yields or its slice ends, and
    finds more events ready by then (0.18 against 0.21-0.34 voluntary context switches per point
    select, ad hoc). Same CPU share (nice is unchanged); nothing changes while a CPU is idle.
    Measured where sysbench and the servers share the proxy's 2 CPUs: ahead at 32 threads, behind
    at 1,024 (docs/performance.md), so not the default. Unprivileged: lowering a policy needs no
    capability. The control plane (monitor, heartbeats) keeps SCHED_OTHER."""
    if policy != "batch":
        return
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (OSError, AttributeError) as exc:  # (not Linux, or a seccomp filter refuses it)
        log.warning("worker %d: cannot switch to SCHED_BATCH (%s); running under the default policy", index, exc)


def pin_worker(index: int, mode: str) -> int | None:
    """cpu_affinity = "spread": worker i runs only on the i-th CPU this process may use.

    A worker that stays on one core keeps its caches warm and is not migrated
    between cores at every wakeup (on the 2-core benchmark machine the gain was
    within noise, so it is opt-in). CPUs come from the inherited affinity, so
    `taskset` and cgroup cpusets are respected. Returns the CPU, or None."""
    if mode != "spread":
        return None
    try:
        cpus = sorted(os.sched_getaffinity(0))
        cpu = cpus[index % len(cpus)]
        os.sched_setaffinity(0, {cpu})
        return cpu
    except OSError as exc:
        log.warning("worker %d: cannot pin to a CPU (%s); running unpinned", index, exc)
        return None
