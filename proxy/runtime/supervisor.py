"""Process layout: one supervisor (the control plane) and N worker processes.

The supervisor binds one SO_REUSEPORT listening socket per worker before
forking, so a busy port is reported once, clearly, and the kernel spreads new
connections over the workers. Each worker runs its own uvloop event loop with
its own pools; Python's GIL never caps the proxy at one core. With
`workers = 1` there are still two processes: the control plane never shares a GIL with an event loop.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import ssl
import sys
import time

from proxy.cluster import topology as topo_mod
from proxy.backend.tls import BackendTLSError, policies_for
from proxy.frontend.login import Authenticator
from proxy.backend.pool import Pools
from proxy.backend.shared import SharedLines
from proxy.protocol import auth

log = logging.getLogger("rwproxy.server")


class StartupError(Exception):
    """One line for the operator saying what is wrong and how to fix it."""


class Worker:
    def __init__(self, config, index: int, sock: socket.socket, topology, server_version: bytes, rsa_pem: bytes | None,
                 topology_fd: int | None = None):
        from proxy.routing.classify import Classifier
        from proxy.routing.router import Router

        self.config = config
        self.index = index
        self.sock = sock
        self.topology_fd = topology_fd
        self.server_version = server_version
        self.servers = {b.name: b for b in config.backends}
        self.classifier = Classifier(config.routing.readonly_functions, config.routing.digest_cache_size)
        self.router = Router(config)
        self.multi_master = config.cluster.topology == "master-master"
        self.spread_per_transaction = self.multi_master and config.cluster.write_spread == "transaction"
        self._writer_rr = 0
        self.topology = topology
        self.primary_name = topology.primary.name
        self.live_writers = [s.name for s in topology.writers]
        self.auth_plugin = config.proxy.auth_plugin
        self.authenticator = Authenticator(
            {u.name: u for u in config.users}, self.auth_plugin, auth.RSAKeyPair(rsa_pem) if rsa_pem else None, set()
        )
        self.tls_context = make_tls_context(config)
        self.backend_tls = policies_for(config)
        self.pools = Pools(config.pool, self.backend_tls)
        self.shared = (SharedLines(self.pools, config.pool, config.routing.max_prepared_per_connection)
                       if config.pool.multiplex else None)
        self.users = {u.name: u for u in config.users}
        self.count = config.proxy.workers or os.cpu_count() or 1  # worker processes in all
        self.peers = None  # kill.Peers: KILL requests to and from the other workers
        self.clients: set = set()
        self.loop = None
        self._next_id = 1
        self.stats = None  # SharedStats, set by the process that runs this worker
        self._primary_waiters: list = []
        self._topology_waiters: list = []
        self.primary_ok = True  # a writable primary exists and writes are not held

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
            if s.state == "down" and (before is None or before.state != "down"):
                self.pools.drop_server(name)  # no reuse of connections to a dead server
                if self.shared is not None:
                    self.shared.drop_server(name)
                for c in list(self.clients):  # nor by sessions; in-flight reads move elsewhere
                    c.server_down(name)
        self.primary_ok = self.writable_primary() is not None
        if self._topology_waiters:
            waiters, self._topology_waiters = self._topology_waiters, []
            for f in waiters:
                if not f.done():
                    f.set_result(None)
        if self._primary_waiters and self.primary_ok:
            waiters, self._primary_waiters = self._primary_waiters, []
            for f in waiters:
                if not f.done():
                    f.set_result(None)

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
        if t.writes_held or p is None or p.state in ("down", "maintenance"):
            return None
        return p

    async def next_topology(self, timeout: float) -> None:
        """Wait for the next snapshot from the control plane (or the timeout)."""
        import asyncio

        f = self.loop.create_future()
        self._topology_waiters.append(f)
        try:
            await asyncio.wait_for(f, timeout)
        except asyncio.TimeoutError:
            pass

    async def wait_for_primary(self) -> str:
        """Hold a statement for the primary until there is one (failover, switchover)."""
        import asyncio

        timeout = self.config.failover.write_hold_timeout
        deadline = self.loop.time() + timeout
        while self.writable_primary() is None:
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no writable primary within failover.write_hold_timeout ({timeout:g} s)")
            f = self.loop.create_future()
            self._primary_waiters.append(f)
            try:
                await asyncio.wait_for(f, remaining)
            except asyncio.TimeoutError:
                pass
        return self.writable_primary().name

    def admit(self, client) -> bool:
        if len(self.clients) >= self.config.proxy.max_connections:
            return False
        self.clients.add(client)
        return True

    def forget(self, client) -> None:
        self.clients.discard(client)

    def _factory(self):
        return self._session_class(self, self.new_session_id())

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
        import asyncio

        import uvloop

        from proxy.frontend.session import ClientConnection

        self._session_class = ClientConnection  # loaded now, before the freeze below

        # What exists now (modules, sqlglot's tables, the config) lives as long as the worker:
        # frozen, it is left out of every garbage collection, so a full collection costs a few
        # ms instead of ~40 ms stalls for every client of this worker.
        gc.freeze()
        cpu = pin_worker(self.index, self.config.proxy.cpu_affinity)
        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        stop = self.loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))

        async def main():
            server = await self.loop.create_server(self._factory, sock=self.sock, backlog=1024)
            if self.topology_fd is not None:
                from proxy.runtime.control import subscribe

                await subscribe(self.loop, self.topology_fd, self.set_topology)
            self.loop.create_task(self._housekeeping())
            self._start_peers()
            log.info("worker %d serving on %s%s", self.index, self.config.proxy.listen,
                     f" (pinned to CPU {cpu})" if cpu is not None else "")
            await stop
            server.close()
            if self.peers is not None:
                self.peers.stop()
            for c in list(self.clients):
                c._close()
            self.pools.close_all()
            if self.shared is not None:
                self.shared.close_all()

        self.loop.run_until_complete(main())

    def _start_peers(self) -> None:
        from proxy.runtime.control import socket_path
        from proxy.frontend.kill import Peers

        peers = Peers(self, socket_path(self.config)[: -len(".sock")])
        try:
            peers.start(self.loop)
            self.peers = peers
        except OSError as e:
            log.warning("worker %d: KILL from other workers' sessions will not reach this one: %s", self.index, e)

    async def _housekeeping(self):
        """Counters to the control plane twice a second; idle pool connections expire."""
        import asyncio

        n = 0
        while True:
            await asyncio.sleep(0.5)
            if self.stats is not None:
                sh = self.shared
                self.stats.write(self.index, len(self.clients), self.router.balancer.routed, self.pools.open_count,
                                 sh.statements if sh is not None else 0, sh.open_per_server() if sh is not None else None)
            n += 1
            if n % 10 == 0:
                self.pools.expire_idle()
                if self.shared is not None:
                    self.shared.expire_idle(self.config.pool.idle_timeout)


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


def make_tls_context(config):
    tls = config.proxy.tls
    if not tls.cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as e:
        raise StartupError(f"{config.source}: proxy.tls: cannot load certificate {tls.cert} / key {tls.key}: {e}")
    return ctx


def bind_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # A plain bind first: SO_REUSEPORT would let us silently share the port with
    # another process of the same user, so make sure the port is really free.
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    except OSError as e:
        raise StartupError(f"cannot listen on {host}:{port}: {e.strerror}; stop what uses the port or change [proxy] listen")
    finally:
        probe.close()
    socks = []
    for _ in range(count):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, port))
        s.listen(1024)
        s.setblocking(False)
        socks.append(s)
    return socks


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s rwproxy[%(process)d] %(name)s: %(message)s",
        stream=sys.stderr,
    )


def raise_fd_limit() -> None:
    """Each client may hold a socket per backend: use all the file descriptors we may."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def serve(config) -> int:
    workers = config.proxy.workers or os.cpu_count() or 1
    raise_fd_limit()
    socks = bind_sockets(config.proxy.host, config.proxy.port, workers)
    try:
        policies_for(config)  # unreadable backend_tls files: one line now, not at the first query
    except BackendTLSError as e:
        raise StartupError(str(e)) from None
    topology = topo_mod.probe(config)
    primary = topology.primary
    version = config.proxy.server_version or (primary.version or "10.11.0-MariaDB-rwproxy")
    server_version = version.encode() if version.startswith("5.5.5-") else b"5.5.5-" + version.encode()
    rsa_pem = _rsa_pem(config)
    log.info(
        "rwproxy listening on %s with %d worker(s); primary %s (%s:%s); servers: %s",
        config.proxy.listen, workers, primary.name, primary.host, primary.port,
        ", ".join(f"{s.name}={s.role}/{s.state}" for s in topology.servers.values()),
    )
    from proxy.runtime.controlplane import ControlPlane

    # Even with one worker the control plane gets its own process: the monitor's
    # threads would otherwise compete with the event loop for the GIL.
    from proxy.runtime.control import Publisher

    publisher = Publisher(workers)
    plane = ControlPlane(config, workers, publisher.publish)
    try:
        return _supervise(config, socks, topology, server_version, rsa_pem, publisher, plane)
    finally:
        plane.stop()
        publisher.stop()


def _rsa_pem(config) -> bytes:
    path = config.proxy.tls.rsa_private_key
    if path:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise StartupError(f"{config.source}: proxy.tls.rsa_private_key: cannot read {path}: {e.strerror}")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _supervise(config, socks, topology, server_version, rsa_pem, publisher, plane) -> int:
    children: dict[int, int] = {}  # pid -> worker index
    stopping = False

    def spawn(i: int) -> None:
        fd = publisher.new_pipe(i)
        gc.freeze()  # collections in the child then leave the pages it shares with us untouched
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                publisher.close_in_worker(i)
                for j, s in enumerate(socks):
                    if j != i:
                        s.close()
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                start = publisher.latest or topology
                worker = Worker(config, i, socks[i], start, server_version, rsa_pem, topology_fd=fd)
                worker.stats = plane.stats
                worker.run()
            except BaseException:
                log.exception("worker %d crashed", i)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = i
        publisher.forked(i)

    def on_stop(signum, frame):
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    for i in range(len(socks)):
        spawn(i)
    plane.start()  # after forking: the monitor's threads live in the supervisor only
    restarts: list[float] = []
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        i = children.pop(pid, None)
        if i is None or stopping:
            continue
        log.error("worker %d (pid %d) exited with status %d; restarting it", i, pid, status)
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < 60] + [now]
        if len(restarts) > 10:
            log.error("workers keep crashing (more than 10 restarts in a minute); stopping")
            on_stop(signal.SIGTERM, None)
            return 1
        spawn(i)
    return 0
