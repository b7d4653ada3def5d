"""Reference point: the least a Python proxy on uvloop can do per query.

A plain TCP forwarder (one backend connection per client, bytes copied both
ways, no parsing, no routing, no pools), with the same worker layout as rwproxy
(N processes sharing the port with SO_REUSEPORT). Run next to rwproxy in one
alternating benchmark it shows how much of rwproxy's cost is the event loop and
the kernel, which no Python proxy avoids, and how much is rwproxy's own work.

    python -m benchmarks.forwarder LISTEN_PORT BACKEND_PORT [WORKERS] [--pipeline M]

With --pipeline M it is instead a pipelining multiplexer, the reference for what
connection multiplexing could give: each client logs in through its own backend
connection (bytes passed through), then its commands go to one of M shared
connections per worker (the first M clients' own; the others are closed), written
as soon as they arrive, without waiting for the commands queued ahead of them, and
the responses, which come back in order, are split by the response scanner and
handed to their clients. Text protocol only (COM_QUERY, COM_PING, COM_QUIT; run
sysbench with --db-ps-mode=disable); anything else gets an error. Session state
is not tracked and a shared connection keeps the capabilities its first client
negotiated, so it is only for stateless loads from like clients (one sysbench run).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections import deque

from proxy.runtime.launcher import ProxyProcess
from proxy.protocol.constants import CLIENT_DEPRECATE_EOF
from proxy.protocol.packets import err_payload, frame
from proxy.protocol.scan import RESULT, SIMPLE, Scanner


class _Half(asyncio.Protocol):
    """One side of a forwarded connection; writes what it receives to its peer."""

    def __init__(self, peer: "_Half | None" = None):
        self.peer = peer
        self.transport = None
        self.pending: list[bytes] = []

    def connection_made(self, transport):
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data):
        peer = self.peer
        if peer is not None and peer.transport is not None:
            if not peer.transport.is_closing():
                peer.transport.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc):
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self):  # backpressure: stop reading the other side
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self):
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


_COM_QUIT, _COM_QUERY, _COM_PING = 0x01, 0x03, 0x0E


def _packets(buf: bytearray):
    """Take the complete packets (header included) off the front of buf, one at a time."""
    while len(buf) >= 4:
        end = 4 + int.from_bytes(buf[:3], "little")
        if len(buf) < end:
            return
        packet = bytes(buf[:end])
        del buf[:end]
        yield packet


class _Shared(asyncio.Protocol):
    """--pipeline: a backend connection; first one client's login, then shared by many.

    `queue` holds the clients whose commands were written and not yet fully answered,
    oldest first; the scanner finds where the oldest one's response ends."""

    def __init__(self, front: "_PipedFront"):
        self.front = front  # the client logging in through this connection
        self.transport = None
        self.shared = False
        self.queue: deque = deque()
        self.scanner = None
        self.login = bytearray()

    def connection_made(self, transport):
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data):
        if not self.shared:
            self._login_bytes(data)
            return
        queue, scanner = self.queue, self.scanner
        while data and queue:
            n = scanner.feed(data)
            if n < 0:
                queue[0].write(data)
                return
            queue.popleft().write(data[:n] if n < len(data) else data)
            data = data[n:]
            if queue:
                scanner.start(queue[0].kind)

    def _login_bytes(self, data):
        """Pass the login through; the server's OK to the client's response (seq >= 2) ends it."""
        front = self.front
        front.write(data)
        self.login += data
        for packet in _packets(self.login):
            if packet[3] >= 2 and packet[4:5] == b"\x00":
                front.logged_in(self)
                return

    def send(self, front: "_PipedFront", packet: bytes, kind: int) -> None:
        if self.transport.is_closing():  # the server went away: so does the client
            front.transport.close()
            return
        front.kind = kind
        self.queue.append(front)
        if len(self.queue) == 1:
            self.scanner.start(kind)
        self.transport.write(packet)

    def connection_lost(self, exc):
        for front in self.queue:
            front.transport.close()
        self.queue.clear()


class _PipedFront(asyncio.Protocol):
    """--pipeline: one client; after login its commands go to a shared connection."""

    def __init__(self, pool: "_SharedPool"):
        self.pool = pool
        self.transport = None
        self.peer: _Shared | None = None  # its login connection
        self.target: _Shared | None = None
        self.pending: list[bytes] = []
        self.caps = 0
        self.buf = bytearray()
        self.kind = RESULT

    def connection_made(self, transport):
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def write(self, data) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

    def logged_in(self, back: _Shared) -> None:
        self.target = self.pool.assign(back, bool(self.caps & CLIENT_DEPRECATE_EOF))
        if self.target is not back:
            back.transport.write(frame(bytes((_COM_QUIT,)), 0))
            back.transport.close()
        self.peer = None

    def data_received(self, data):
        if self.target is None:  # logging in
            if not self.caps and len(data) >= 8:
                self.caps = int.from_bytes(data[4:8], "little")  # the handshake response's flags
            if self.peer is None:
                self.pending.append(data)
            else:
                self.peer.transport.write(data)
            return
        self.buf += data
        for packet in _packets(self.buf):
            self._command(packet)

    def _command(self, packet: bytes) -> None:
        cmd = packet[4] if len(packet) > 4 else -1
        if cmd == _COM_QUIT:
            self.transport.close()
        elif cmd in (_COM_QUERY, _COM_PING):
            self.target.send(self, packet, RESULT if cmd == _COM_QUERY else SIMPLE)
        else:
            self.write(frame(err_payload(1235, b"42000", f"the pipelining forwarder relays only COM_QUERY and "
                                         f"COM_PING, not command 0x{cmd & 0xFF:02x}"), 1))

    def connection_lost(self, exc):
        if self.peer is not None:
            self.peer.transport.close()


class _SharedPool:
    """--pipeline: the first `size` logged-in clients' connections, then round robin over them."""

    def __init__(self, size: int):
        self.size = size
        self.conns: list[_Shared] = []
        self.turn = 0

    def assign(self, back: _Shared, deprecate_eof: bool) -> _Shared:
        self.conns = [c for c in self.conns if not c.transport.is_closing()]
        if len(self.conns) < self.size:
            back.shared = True
            back.scanner = Scanner(deprecate_eof)
            self.conns.append(back)
            return back
        self.turn += 1
        return self.conns[self.turn % len(self.conns)]


def _worker(sock: socket.socket, backend_port: int, pipeline: int = 0) -> None:
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    pool = _SharedPool(pipeline)

    def client_factory():
        front = _PipedFront(pool) if pipeline else _Half()
        back_protocol = _Shared if pipeline else _Half

        async def link():
            _, back = await loop.create_connection(lambda: back_protocol(front), "127.0.0.1", backend_port)
            front.peer = back
            for chunk in front.pending:
                back.transport.write(chunk)
            front.pending.clear()

        loop.create_task(link())
        return front

    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    loop.run_until_complete(loop.create_server(client_factory, sock=sock, backlog=1024))
    loop.run_forever()


class ForwarderProcess(ProxyProcess):
    """The forwarder as a child process, started, waited for, measured and stopped like rwproxy."""

    def __init__(self, port: int, backend_port: int, workers: int, log_path: str, pipeline: int = 0):
        super().__init__("", "127.0.0.1", port, log_path=log_path)
        self.backend_port, self.workers, self.pipeline = backend_port, workers, pipeline

    def command(self) -> list[str]:
        return [sys.executable, "-m", "benchmarks.forwarder", str(self.port), str(self.backend_port), str(self.workers),
                *(["--pipeline", str(self.pipeline)] if self.pipeline else [])]

    stop_signal = signal.SIGTERM  # (the forwarder stops on SIGTERM only)

    def _control_ready(self) -> bool:
        return True  # no control socket: listening is all there is


def main(argv=None) -> int:
    args = list(argv if argv is not None else sys.argv[1:])
    pipeline = 0
    if "--pipeline" in args:
        i = args.index("--pipeline")
        pipeline = int(args[i + 1])
        del args[i : i + 2]
    listen, backend = int(args[0]), int(args[1])
    workers = int(args[2]) if len(args) > 2 else (os.cpu_count() or 1)
    socks = []
    for _ in range(workers):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", listen))
        s.listen(1024)
        socks.append(s)
    pids = []
    for s in socks:
        pid = os.fork()
        if pid == 0:
            try:
                _worker(s, backend, pipeline)
            finally:
                os._exit(0)
        pids.append(pid)
    signal.signal(signal.SIGTERM, lambda *_: [os.kill(p, signal.SIGTERM) for p in pids])
    for _ in pids:
        try:
            os.wait()
        except ChildProcessError:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
