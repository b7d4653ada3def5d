"""Counters that every worker publishes and the supervisor reads.

An anonymous shared mapping made before forking holds one row of int64
counters per worker; each worker overwrites its row about twice a second
from its own plain-Python counters, so the hot path only bumps dict entries.
"""

from __future__ import annotations

import mmap
import struct


class SharedStats:
    HEAD = 2  # clients, statements relayed

    def __init__(self, workers: int, servers: list[str]):
        self.workers = workers
        self.servers = list(servers)
        self.width = self.HEAD + 2 * len(self.servers)  # + per server: routed, backend connections
        self._row = struct.Struct(f"<{self.width}q")
        self.mm = mmap.mmap(-1, self._row.size * workers)  # MAP_SHARED|MAP_ANONYMOUS: survives fork

    def write(self, worker: int, clients: int, routed: dict, conns: dict) -> None:
        values = [clients, sum(routed.values())]
        for name in self.servers:
            values.append(routed.get(name, 0))
            values.append(conns.get(name, 0))
        self._row.pack_into(self.mm, worker * self._row.size, *values)

    def read(self) -> dict:
        total = [0] * self.width
        for w in range(self.workers):
            row = self._row.unpack_from(self.mm, w * self._row.size)
            total = [a + b for a, b in zip(total, row)]
        out = {"clients": total[0], "statements": total[1], "servers": {}}
        for i, name in enumerate(self.servers):
            out["servers"][name] = {"routed": total[self.HEAD + 2 * i], "connections": total[self.HEAD + 2 * i + 1]}
        return out
