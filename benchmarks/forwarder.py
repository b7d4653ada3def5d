"""Reference point: the least a Python proxy on uvloop can do per query.

A plain TCP forwarder (one backend connection per client, bytes copied both
ways, no parsing, no routing, no pools), with the same worker layout as rwproxy
(N processes sharing the port with SO_REUSEPORT). Run next to rwproxy in one
alternating benchmark it shows how much of rwproxy's cost is the event loop and
the kernel, which no Python proxy avoids, and how much is rwproxy's own work.

    python -m benchmarks.forwarder LISTEN_PORT BACKEND_PORT [WORKERS]
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys

from proxy.launcher import ProxyProcess


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


def _worker(sock: socket.socket, backend_port: int) -> None:
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)

    def client_factory():
        front = _Half()

        async def link():
            _, back = await loop.create_connection(lambda: _Half(front), "127.0.0.1", backend_port)
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

    def __init__(self, port: int, backend_port: int, workers: int, log_path: str):
        super().__init__("", "127.0.0.1", port, log_path=log_path)
        self.backend_port, self.workers = backend_port, workers

    def command(self) -> list[str]:
        return [sys.executable, "-m", "benchmarks.forwarder", str(self.port), str(self.backend_port), str(self.workers)]

    def _control_ready(self) -> bool:
        return True  # no control socket: listening is all there is


def main(argv=None) -> int:
    args = (argv if argv is not None else sys.argv[1:])
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
                _worker(s, backend)
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
