"""Counters that every worker publishes and the supervisor reads.

An anonymous shared mapping made before forking holds one row of int64
counters per worker; each worker overwrites its row about twice a second
from its own plain-Python counters, so the hot path only bumps dict entries.
"""

from __future__ import annotations

import mmap
import struct


class SharedStats:
    HEAD = 3  # clients, statements relayed, of which over shared connections (multiplexing)
    PER_SERVER = 4  # routed, backend connections, of which shared, connections it refused (back-offs)

    def __init__(self, workers: int, servers: list[str]):
        self.workers = workers
        self.servers = list(servers)
        self.width = self.HEAD + self.PER_SERVER * len(self.servers)
        self._row = struct.Struct(f"<{self.width}q")
        self.mm = mmap.mmap(-1, self._row.size * workers)  # MAP_SHARED|MAP_ANONYMOUS: survives fork

    def write(self, worker: int, clients: int, routed: dict, conns: dict, shared: int = 0,
              shared_conns: dict | None = None, refused: dict | None = None) -> None:
        values = [clients, sum(routed.values()), shared]
        shared_conns, refused = shared_conns or {}, refused or {}
        for name in self.servers:
            values += (routed.get(name, 0), conns.get(name, 0), shared_conns.get(name, 0), refused.get(name, 0))
        self._row.pack_into(self.mm, worker * self._row.size, *values)

    def read(self) -> dict:
        total = [0] * self.width
        for w in range(self.workers):
            row = self._row.unpack_from(self.mm, w * self._row.size)
            total = [a + b for a, b in zip(total, row)]
        out = {"clients": total[0], "statements": total[1], "shared_statements": total[2], "servers": {}}
        for i, name in enumerate(self.servers):
            at = self.HEAD + self.PER_SERVER * i
            out["servers"][name] = {"routed": total[at], "connections": total[at + 1], "shared_connections": total[at + 2],
                                    "refused": total[at + 3]}
        return out
