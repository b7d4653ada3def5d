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
import select
import signal
import socket
import ssl
import threading
import time

from proxy.backend.tls import BackendTLSError, policies_for
from proxy.config.exposure import exposed
from proxy.cluster import topology as topo_mod
from proxy.runtime.admission import Admission
from proxy.runtime.channels import Publisher
from proxy.runtime.rundir import RuntimeDir, RuntimeDirError, path_for
from proxy.runtime.controlplane import ControlPlane
from proxy.runtime.unixsock import UnixListener, UnixSocketError
from proxy.runtime.worker import Worker

log = logging.getLogger("rwproxy.server")


class Reaper:
    """Waits for the workers, and only for them.

    A blanket wait(2) would also reap the processes the control plane's threads start (failover
    hooks, mariadb-backup, mariadb-binlog, test restores): their Popen then finds no child and
    reports exit status 0, so a pre_failover_hook's veto was lost and the switchover went ahead,
    and a failed backup program looked like a finished one. Each worker gets a pidfd (Linux 5.3+)
    to sleep on; without one, its pid is polled every POLL seconds."""

    POLL = 0.2

    def __init__(self):
        self.fds: dict[int, int] = {}

    def add(self, pid: int) -> None:
        try:
            self.fds[pid] = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pass

    def close(self) -> None:
        """In a forked worker: the supervisor's pidfds are not its business."""
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def wait(self, pids, timeout: float = 1.0) -> list[tuple[int, int | None]]:
        """(pid, wait status, None if it was lost) of each of `pids` that ended, after sleeping
        until one may have (at most `timeout` seconds)."""
        fds = [self.fds[p] for p in pids if p in self.fds]
        if len(fds) == len(pids):
            poller = select.poll()
            for fd in fds:
                poller.register(fd, select.POLLIN)
            poller.poll(timeout * 1000)
        else:
            time.sleep(min(timeout, self.POLL))
        ended = []
        for pid in pids:
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                got, status = pid, None
            if got:
                ended.append((pid, status))
                fd = self.fds.pop(pid, None)
                if fd is not None:
                    os.close(fd)
        return ended


def describe_exit(status: int | None) -> str:
    """A worker's wait status in words: exit code, or the signal that ended it."""
    if status is None:
        return "ended (its exit status was lost)"
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exited with status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"was killed by {name}"


class StartupError(Exception):
    """One line for the operator saying what is wrong and how to fix it."""


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


def raise_fd_limit() -> int:
    """Each client may hold a socket per backend: use all the file descriptors we may (the
    soft limit, raised to the hard one, is returned)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def check_fd_limit(config, workers: int, limit: int) -> None:
    """One line at start when RLIMIT_NOFILE cannot hold a worker's share of max_connections
    plus the server connections it may open (containers often start with 1,024)."""
    from proxy.runtime.admission import fd_reserve

    per_server = config.pool.max_server_connections or 1024
    need = -(-config.proxy.max_connections // workers) + per_server * len(config.backends) + 64
    if limit < need:
        log.warning("RLIMIT_NOFILE is %d: a worker with its share of max_connections = %d may need about %d file "
                    "descriptors; past about %d clients per worker new clients are refused (1040 Too many connections). "
                    "Raise the limit (systemd LimitNOFILE=, docker --ulimit nofile=, ulimit -n) or lower "
                    "max_connections", limit, config.proxy.max_connections, need, limit - fd_reserve(limit))


def make_tls_context(config) -> ssl.SSLContext | None:
    """The front end's TLS context, loaded once here before the workers fork (they inherit it),
    so a missing, unreadable or mismatched certificate or key is one start-up error, not a
    crash in every worker."""
    tls = config.proxy.tls
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as e:
        raise StartupError(f"{config.source}: proxy.tls: cannot load certificate {tls.cert} / key {tls.key}: "
                           f"{getattr(e, 'strerror', None) or e}") from None
    if tls.ca:  # OpenSSL sends the chain it builds from these with the certificate, as MariaDB does
        try:  # with ssl_ca: a client holding only the root (or trusting a local server's root,
            ctx.load_verify_locations(tls.ca)  # Connector/C 3.4) verifies a CA-issued certificate
        except (OSError, ssl.SSLError) as e:
            raise StartupError(f"{config.source}: proxy.tls.ca: cannot load {tls.ca}: "
                               f"{getattr(e, 'strerror', None) or e}") from None
    return ctx


def serve(config) -> int:
    if (warning := exposed(config.source)):
        log.warning("%s", warning)
    workers = config.proxy.workers or os.cpu_count() or 1
    tls_context = make_tls_context(config)
    try:
        policies_for(config)  # unreadable backend_tls files: one line now, not at the first query
    except BackendTLSError as e:
        raise StartupError(str(e)) from None
    rdir = RuntimeDir(path_for(config))
    try:
        rdir.claim({"pid": os.getpid(), "config": os.path.realpath(config.source), "listen": config.proxy.listen})
    except RuntimeDirError as e:
        raise StartupError(str(e)) from None
    try:
        return _serve(config, workers, tls_context)
    finally:
        rdir.release()


def _serve(config, workers: int, tls_context) -> int:
    check_fd_limit(config, workers, raise_fd_limit())
    socks = bind_sockets(config.proxy.host, config.proxy.port, workers)
    try:
        unix = UnixListener(config.proxy.socket) if config.proxy.socket else None
    except UnixSocketError as e:
        for s in socks:
            s.close()
        raise StartupError(str(e)) from None
    try:
        return _serve_on(config, socks, unix, tls_context)
    finally:
        if unix is not None:
            unix.remove()


def _serve_on(config, socks, unix, tls_context) -> int:
    topology = topo_mod.probe(config)
    primary = topology.primary
    version = config.proxy.server_version or (primary.version or "10.11.0-MariaDB-rwproxy")
    server_version = version.encode() if version.startswith("5.5.5-") else b"5.5.5-" + version.encode()
    rsa_pem = _rsa_pem(config)
    log.info(
        "rwproxy listening on %s%s with %d worker(s); primary %s (%s:%s); servers: %s",
        config.proxy.listen, f" and {config.proxy.socket}" if unix else "", len(socks), primary.name, primary.host, primary.port,
        ", ".join(f"{s.name}={s.role}/{s.state}" for s in topology.servers.values()),
    )
    # Even with one worker the control plane gets its own process: the monitor's
    # threads would otherwise compete with the event loop for the GIL.
    publisher = Publisher(len(socks))
    plane = ControlPlane(config, len(socks), publisher.publish)
    try:
        plane.bind()  # the admin and metrics ports: taken now, or a start-up error
    except OSError as e:
        for s in socks:
            s.close()
        raise StartupError(str(e)) from None
    admission = Admission(len(socks), config.proxy.max_connections, {u.name: u.max_connections for u in config.users})
    try:
        return _supervise(socks, unix, topology, server_version, rsa_pem, tls_context, publisher, plane, admission)
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


def _supervise(socks, unix, topology, server_version, rsa_pem, tls_context, publisher, plane, admission) -> int:
    """Fork the workers, restart any that dies, and stop: at once on SIGINT, by draining on
    SIGTERM or `rwproxy drain`; SIGHUP reloads the config."""
    children: dict[int, int] = {}  # pid -> worker index
    reaper = Reaper()
    stopping = crashing = False

    def spawn(i: int) -> None:
        admission.reset_worker(i)  # a predecessor's clients died with it
        fd = publisher.new_pipe(i)
        gc.freeze()  # collections in the child then leave the pages it shares with us untouched
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                publisher.close_in_worker(i)
                reaper.close()
                for j, s in enumerate(socks):
                    if j != i:
                        s.close()
                for fd_ in plane.listening_fds():
                    os.close(fd_)
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)
                # The reload is the supervisor's: `systemctl kill -s HUP` or `pkill -HUP` reach every
                # process of the service, and a worker would die of SIGHUP's default action.
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                start = publisher.latest or topology
                worker = Worker(plane.config, i, socks[i], start, server_version, rsa_pem, topology_fd=fd,
                                tls_context=tls_context, unix_sock=unix.sock if unix else None)
                worker.config_version = plane.config_version
                worker.admission = admission
                worker.use_progress(plane.progress)
                worker.run()
            except BaseException:
                log.exception("worker %d crashed", i)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = i
        reaper.add(pid)
        publisher.forked(i)

    def on_stop(signum, frame):
        """SIGINT: stop now (every worker closes its sessions)."""
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    def in_thread(fn, *args):
        threading.Thread(target=fn, args=args, daemon=True).start()

    def on_term(signum, frame):
        """SIGTERM: drain (a service manager's stop, or a rolling restart behind a load balancer)."""
        in_thread(plane.drain, "SIGTERM")

    def on_hup(signum, frame):
        in_thread(plane.reload, "SIGHUP")

    def watchdog():
        """After a drain was ordered: once the workers stop accepting, our copies of their listening
        sockets close too (else a new client would wait in a backlog nobody accepts from, instead
        of being refused at once and tried elsewhere); workers that outlive shutdown_timeout are
        stopped."""
        plane.drained.wait()
        grace = plane.drain_grace_used
        time.sleep(grace)
        for s in socks:
            s.close()
        if unix is not None:
            unix.close()
        time.sleep(max(plane.config.proxy.shutdown_timeout, grace) - grace + 5)
        on_stop(signal.SIGINT, None)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    in_thread(watchdog)
    for i in range(len(socks)):
        spawn(i)
    plane.start()  # after forking: the monitor's threads live in the supervisor only
    restarts: list[float] = []
    while children:
        for pid, status in reaper.wait(list(children)):
            i = children.pop(pid)
            if stopping or plane.draining:
                continue
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < 60] + [now]
            if len(restarts) > 10:
                log.error("worker %d (pid %d) %s; workers keep crashing (more than 10 restarts in a minute): "
                          "stopping", i, pid, describe_exit(status))
                on_stop(signal.SIGTERM, None)
                crashing = True
                continue
            log.error("worker %d (pid %d) %s; restarting it", i, pid, describe_exit(status))
            spawn(i)
    return 1 if crashing else 0
