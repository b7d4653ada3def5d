"""The control plane asks the workers: statistics on demand, and orders (reload, drain, KILL
SESSION, RESET STATS).

Each worker serves a unix stream socket in the instance's runtime directory
(`worker-<i>.ctl.sock`, mode 0600, in a directory only this user can enter). One request frame in,
one reply frame out; a frame is a 4-byte length and a pickle. Pickle is safe here because
both ends are this instance's own processes: the socket is reachable by this user only, and
only the lock holder of the runtime directory creates it (rundir.py). A statistics request
costs the worker a few milliseconds of its event loop (10,000 digests: ~8 ms, measured in
benchmarks/results/issue21-*.md); nothing is computed unless asked.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import socket
import struct
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("rwproxy.workerctl")
_LEN = struct.Struct("<I")
MAX_FRAME = 1 << 30


def ctl_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"worker-{index}.ctl.sock")


class _Conn(asyncio.Protocol):
    def __init__(self, server: "WorkerControl"):
        self.server = server
        self.buf = bytearray()
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buf += data
        if len(self.buf) < 4:
            return
        n = _LEN.unpack_from(self.buf)[0]
        if n > MAX_FRAME:
            self.transport.close()
            return
        if len(self.buf) < 4 + n:
            return
        try:
            msg = pickle.loads(bytes(self.buf[4:4 + n]))
        except Exception:
            self.transport.close()
            return
        del self.buf[:4 + n]
        asyncio.get_running_loop().create_task(self.server.answer(msg, self.transport))


class WorkerControl:
    """Worker side: handlers[cmd](msg) -> a reply (or an awaitable of one)."""

    def __init__(self, index: int, directory: str, handlers: dict):
        self.index = index
        self.path = ctl_path(directory, index)
        self.handlers = handlers
        self.server = None

    async def start(self, loop) -> None:
        try:
            os.unlink(self.path)  # left by this instance's previous worker i (the directory is ours)
        except FileNotFoundError:
            pass
        old = os.umask(0o077)
        try:
            self.server = await loop.create_unix_server(lambda: _Conn(self), self.path)
        finally:
            os.umask(old)

    async def answer(self, msg, transport) -> None:
        fn = self.handlers.get(msg.get("cmd") if isinstance(msg, dict) else None)
        try:
            if fn is None:
                reply = {"ok": False, "message": f"unknown worker command {msg!r:.80}"}
            else:
                reply = fn(msg)
                if asyncio.iscoroutine(reply):
                    reply = await reply
        except Exception as e:  # the control plane must get an answer, and the worker go on serving
            log.exception("worker %d: control command failed", self.index)
            reply = {"ok": False, "message": f"{type(e).__name__}: {e}"}
        data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        if not transport.is_closing():
            transport.write(_LEN.pack(len(data)) + data)

    def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
            try:
                os.unlink(self.path)
            except OSError:
                pass


def ask(directory: str, index: int, msg: dict, timeout: float = 5.0):
    """Control-plane side: one request to worker `index`; its reply, or None if it did not answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(ctl_path(directory, index))
            data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
            s.sendall(_LEN.pack(len(data)) + data)
            head = _recv(s, 4)
            return pickle.loads(_recv(s, _LEN.unpack(head)[0]))
    except (OSError, EOFError, pickle.UnpicklingError, struct.error):
        return None


def _recv(s: socket.socket, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        chunk = s.recv(min(n - got, 1 << 20))
        if not chunk:
            raise EOFError("worker closed the control connection")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


class Workers:
    """Control-plane side: ask every worker at once (a thread each), as they answer in parallel."""

    def __init__(self, directory: str, count: int):
        self.directory = directory
        self.count = count
        self._pool = ThreadPoolExecutor(max_workers=max(1, count), thread_name_prefix="ask-worker")

    def ask_all(self, msg: dict, timeout: float = 5.0) -> list:
        """Replies in worker order; None for a worker that did not answer (restarting, stopped)."""
        futures = [self._pool.submit(ask, self.directory, i, msg, timeout) for i in range(self.count)]
        return [f.result() for f in futures]

    def ask_one(self, index: int, msg: dict, timeout: float = 5.0):
        return ask(self.directory, index, msg, timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
