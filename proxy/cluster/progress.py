"""How far each replica is known to have applied the primary's writes, shared live between
the monitor (control plane) and every worker: the proof behind session read-your-writes.

After each check of a replica the monitor has an upper bound U of its lag (cluster/monitor/
lag.py: it holds every transaction the writer committed before the writer's time now - U).
The check was sent at S (time.monotonic(), one clock for every process on the host), so the
replica holds every write committed before S - U. A session whose write was acknowledged at W
may read there once that stamp is >= W (routing/router.py). Without it, `session` mode trusted
the read-your-writes window alone, and a replica whose lag jumped past `max_replica_lag`
served stale reads until the next check took it out of the pool (a Django suite run through
rwproxy, replicas applying a burst of TRUNCATEs: a session read the rows it had just deleted).

The topology snapshot reaches the workers about once a second; this board is a shared mapping
made before forking, written after every check (one 8-byte store), read by a router only for a
session that has written, so a proof reaches the routers as soon as the monitor has it.

Slots follow the order of `[[backends]]` and of the servers reloads add, the same in every
process (each applies the same reloads in the same order); a server without a slot, or whose
lag the monitor cannot bound (no heartbeat table), reads NO_PROOF: the window alone decides.
"""

from __future__ import annotations

import math
import mmap
import struct

SLOTS = 256
NO_PROOF = math.inf  # "applied through forever": the window alone decides, as before the board
_F64 = struct.Struct("<d")


class Progress:
    """Per-server stamps: time.monotonic() before which every write is known applied there."""

    def __init__(self, names):
        self._mm = mmap.mmap(-1, _F64.size * SLOTS)  # MAP_SHARED: forked workers see the monitor's stores
        self.slots: dict[str, int] = {}
        self.add(names)

    def add(self, names) -> None:
        """Give new servers a slot (start and reloads), NO_PROOF until the monitor knows more."""
        for name in names:
            if name not in self.slots and len(self.slots) < SLOTS:
                i = self.slots[name] = len(self.slots)
                _F64.pack_into(self._mm, i * _F64.size, NO_PROOF)

    def record(self, name: str, stamp: float) -> None:
        """(Monitor) `name` holds every write acknowledged before `stamp`; NO_PROOF: cannot tell."""
        i = self.slots.get(name)
        if i is not None:
            _F64.pack_into(self._mm, i * _F64.size, stamp)

    def applied(self, name: str) -> float:
        """(Router) the newest stamp recorded for `name` (NO_PROOF without a slot)."""
        i = self.slots.get(name)
        return NO_PROOF if i is None else _F64.unpack_from(self._mm, i * _F64.size)[0]


def applied_stamp(sent: float, lag) -> float | None:
    """The stamp one check proves: `sent` (monotonic, before the check query) minus the lag's
    upper bound; NO_PROOF when the lag comes from Seconds_Behind_Master (no heartbeat); None
    (keep the last stamp, still true) when it is measured against a writer no longer sampled,
    beyond its timeline, or its source is unreachable.

    Conservative: the check's NOW() ran after `sent`, and the bound is a difference of server
    times (the writer's and the replica's clocks must agree, as lag.py assumes)."""
    if lag is None:
        return None
    if lag.source == "heartbeat":
        return None if lag.upper_ms is None else sent - lag.upper_ms / 1000.0
    if lag.source == "seconds_behind":  # no heartbeat table here: whole seconds bound nothing
        return NO_PROOF
    return None
