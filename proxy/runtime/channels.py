"""How the control plane's picture of the cluster reaches every worker.

The supervisor owns the monitor; each worker process gets the read end of a
pipe. Every new topology snapshot is pickled once and written to all pipes
as a length-prefixed frame; a worker's event loop reads its pipe like any
other socket and swaps in the new snapshot. Snapshots are small (a few
hundred bytes per server) and only sent when something changed or about
once a second, so this costs nothing on the data path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import struct
import threading

log = logging.getLogger("rwproxy.channels")
_LEN = struct.Struct("<I")


class Publisher:
    """Supervisor side: one pipe per worker, each fed by its own writer thread.

    A stuck worker (SIGSTOP, a long pause) blocks only its own writer thread,
    never the monitor; when it reads again it gets the newest snapshot, not a
    backlog. Each (re)spawn of a worker gets a fresh pipe, and the supervisor
    keeps no read ends, so writes to a dead worker fail at once (EPIPE).
    """

    def __init__(self, count: int):
        self.pipes: list[tuple[int, int] | None] = [None] * count
        self.latest = None
        self._cond = threading.Condition()
        self._locks = [threading.Lock() for _ in range(count)]
        self._pending: list[bytes | None] = [None] * count
        self._stopped = False
        for i in range(count):
            threading.Thread(target=self._writer, args=(i,), name=f"topology-pipe-{i}", daemon=True).start()

    def new_pipe(self, i: int) -> int:
        """Before forking worker i: a fresh pipe; returns the read end for the child."""
        with self._locks[i]:
            old = self.pipes[i]
            if old is not None:
                os.close(old[1])
            r, w = os.pipe()
            self.pipes[i] = (r, w)
        return r

    def forked(self, i: int) -> None:
        """In the supervisor after forking worker i: the read end is the child's."""
        r, w = self.pipes[i]
        os.close(r)
        self.pipes[i] = (-1, w)  # never close that number again: it may be reused
        with self._cond:  # the new worker starts from the newest snapshot
            if self.latest is not None:
                self._pending[i] = self._frame(self.latest)
                self._cond.notify_all()

    def close_in_worker(self, i: int) -> None:
        """In worker i after fork: keep only its own read end."""
        for j, p in enumerate(self.pipes):
            if p is not None:
                os.close(p[1])
                if j != i and p[0] >= 0:
                    os.close(p[0])

    @staticmethod
    def _frame(topology) -> bytes:
        data = pickle.dumps(topology, protocol=pickle.HIGHEST_PROTOCOL)
        return _LEN.pack(len(data)) + data

    def publish(self, topology) -> None:
        frame = self._frame(topology)
        with self._cond:
            self.latest = topology
            self._pending = [frame] * len(self._pending)
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def _writer(self, i: int) -> None:
        while True:
            with self._cond:
                while self._pending[i] is None and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                frame, self._pending[i] = self._pending[i], None
            with self._locks[i]:
                if self.pipes[i] is None:
                    continue
                view = memoryview(frame)
                try:
                    while view:
                        view = view[os.write(self.pipes[i][1], view):]
                except OSError:
                    pass  # the worker is gone; its successor gets a new pipe


class _Reader(asyncio.Protocol):
    def __init__(self, on_topology, on_orphaned):
        self.on_topology = on_topology
        self.on_orphaned = on_orphaned
        self.buf = bytearray()

    def connection_lost(self, exc):
        """Only the supervisor holds the write end: it is gone (SIGKILL, the OOM killer). No monitor,
        failover or reload reaches this worker any more, so it must not go on routing by a frozen
        picture of the cluster (after a failover elsewhere it would write to the old primary)."""
        log.error("the supervisor (the control plane) is gone: this worker drains its sessions and exits")
        if self.on_orphaned is not None:
            self.on_orphaned()

    def data_received(self, data):
        buf = self.buf
        buf += data
        while len(buf) >= 4:
            n = _LEN.unpack_from(buf)[0]
            if len(buf) < 4 + n:
                break
            topo = pickle.loads(bytes(buf[4 : 4 + n]))
            del buf[: 4 + n]
            self.on_topology(topo)


async def subscribe(loop, fd: int, on_topology, on_orphaned=None) -> None:
    """Worker side: call on_topology(snapshot) for every frame read from fd, and on_orphaned()
    when the supervisor's end closes."""
    pipe = os.fdopen(fd, "rb", buffering=0)
    await loop.connect_read_pipe(lambda: _Reader(on_topology, on_orphaned), pipe)
