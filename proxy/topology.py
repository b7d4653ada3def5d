"""The one picture of the cluster: servers, roles, health.

The control plane is the only writer; workers read snapshots. For now the
picture is seeded once at startup from the config and each server's
read_only flag; the live monitor (lag, health, GTID) will keep it current.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger("rwproxy.topology")

PRIMARY, REPLICA, MASTER, UNKNOWN = "primary", "replica", "master", "unknown"
UP, DOWN = "up", "down"


@dataclass(slots=True)
class ServerState:
    name: str
    host: str
    port: int
    role: str = UNKNOWN
    state: str = UP
    read_only: bool | None = None
    version: str = ""
    error: str = ""


@dataclass(slots=True)
class Topology:
    servers: dict[str, ServerState] = field(default_factory=dict)
    version: int = 0

    @property
    def primary(self) -> ServerState | None:
        writers = [s for s in self.servers.values() if s.role in (PRIMARY, MASTER)]
        for s in writers:
            if s.state == UP:
                return s
        return writers[0] if writers else None


def probe(config) -> Topology:
    """Learn roles from read_only once, with short timeouts (PyMySQL, control plane only)."""
    import pymysql

    user, password = config.monitor_credentials()
    topo = Topology()
    for b in config.backends:
        s = ServerState(b.name, b.host, b.port)
        if b.role != "auto":
            s.role = b.role
        try:
            conn = pymysql.connect(
                host=b.host, port=b.port, user=user, password=password,
                connect_timeout=config.monitor.connect_timeout * 2, read_timeout=config.monitor.read_timeout * 4,
            )
            with conn.cursor() as cur:
                cur.execute("SELECT @@read_only, VERSION()")
                ro, version = cur.fetchone()
            conn.close()
            s.read_only = bool(ro)
            s.version = version
            if s.role == UNKNOWN:
                s.role = REPLICA if ro else PRIMARY
        except Exception as e:  # an unreachable server is reported, not fatal
            s.state = DOWN
            s.error = str(e)
            log.warning("backend %s (%s:%s) is not reachable: %s", b.name, b.host, b.port, e)
        topo.servers[b.name] = s
    if topo.primary is None:
        # No writable server seen: fall back to the first backend so the proxy still
        # answers (with the backend's own error) instead of refusing everything.
        first = next(iter(topo.servers.values()))
        log.warning("no writable backend found; using %s as the primary", first.name)
        first.role = PRIMARY
    return topo
