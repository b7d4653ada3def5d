"""The one picture of the cluster: servers, roles, health, lag, GTID position.

The monitor (control plane) is the only writer; it publishes immutable
snapshots that every worker's router reads. Failover changes the picture in
one place: here. Snapshots are plain dataclasses so they pickle cheaply across
the supervisor -> worker pipes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from enum import StrEnum

log = logging.getLogger("rwproxy.topology")

class Role(StrEnum):
    """What a server is in the cluster (a str, so status JSON and messages show the word)."""
    PRIMARY = "primary"
    REPLICA = "replica"
    MASTER = "master"  # master-master: one of several writers
    UNKNOWN = "unknown"  # not checked yet


class State(StrEnum):
    """How a server is doing, as the monitor judged it."""
    UP = "up"
    LAGGING = "lagging"  # answers, but may not serve reads (lag, replication stopped)
    DOWN = "down"  # failed `failcount` checks in a row
    MAINTENANCE = "maintenance"  # kept out by an operator or by failover (rejoin refused)


PRIMARY, REPLICA, MASTER, UNKNOWN = Role.PRIMARY, Role.REPLICA, Role.MASTER, Role.UNKNOWN
UP, LAGGING, DOWN, MAINTENANCE = State.UP, State.LAGGING, State.DOWN, State.MAINTENANCE


@dataclass(frozen=True, slots=True)
class ServerState:
    name: str
    host: str
    port: int
    weight: int = 1
    role: Role = UNKNOWN
    state: State = UP
    read_only: bool | None = None
    autocommit: bool = True  # @@global.autocommit: a session starts with it, as logged in there
    # NO_BACKSLASH_ESCAPES in @@global.sql_mode: a session starts with the status flag saying so, from
    # which client libraries choose how to escape strings (mysql_real_escape_string, PyMySQL)
    no_backslash_escapes: bool = False
    readable: bool = False  # in the read pool (after hysteresis); set by the monitor
    lag_ms: float | None = None  # heartbeat age on a replica; None when unknown
    seconds_behind: int | None = None  # Seconds_Behind_Master as the server reports it
    gtid_current_pos: str = ""
    gtid_slave_pos: str = ""
    io_running: bool | None = None
    sql_running: bool | None = None
    source: str = ""  # host:port this server replicates from
    last_error: str = ""
    version: str = ""
    last_check: float = 0.0  # time.time() of the last check
    last_ok: float = 0.0
    changed_at: float = 0.0  # when state/role last changed
    # For failover: consecutive failed checks (a verdict needs failover.failcount of them), and the
    # server ids that tie a replica to its source even when hosts are spelled differently.
    fails: int = 0
    server_id: int | None = None
    source_id: int | None = None  # Master_Server_Id while this server replicates
    # Replica evidence of a silent source (a hung primary): seconds since this replica last
    # received anything from its source, event or heartbeat (None: unknown), and its
    # MASTER_HEARTBEAT_PERIOD (an idle source sends a heartbeat that often).
    source_silent: float | None = None
    heartbeat_period: float | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def is_writer(self) -> bool:
        return self.role in (PRIMARY, MASTER) and self.state not in (DOWN, MAINTENANCE)


@dataclass(frozen=True, slots=True)
class Topology:
    servers: dict[str, ServerState] = field(default_factory=dict)
    version: int = 0
    updated: float = 0.0
    # Set by failover/switchover while the writer is changing: workers hold new statements
    # for the primary (up to failover.write_hold_timeout) instead of sending them.
    writes_held: bool = False

    @property
    def primary(self) -> ServerState | None:
        """The writable server sessions write to (the first live one; a dead one if none)."""
        writers = [s for s in self.servers.values() if s.role in (PRIMARY, MASTER)]
        for s in writers:
            if s.state not in (DOWN, MAINTENANCE):
                return s
        return writers[0] if writers else None

    @property
    def writers(self) -> list[ServerState]:
        return [s for s in self.servers.values() if s.is_writer]

    @property
    def readers(self) -> list[ServerState]:
        """Replicas currently in the read pool."""
        return [s for s in self.servers.values() if s.readable and s.role == REPLICA]

    def with_server(self, s: ServerState) -> "Topology":
        servers = dict(self.servers)
        servers[s.name] = s
        return Topology(servers, self.version + 1, time.time(), self.writes_held)


def from_config(config) -> Topology:
    """The picture before any check: configured roles, everything assumed up."""
    servers = {}
    for b in config.backends:
        role = Role(b.role) if b.role != "auto" else UNKNOWN
        servers[b.name] = ServerState(b.name, b.host, b.port, weight=b.weight, role=role)
    return Topology(servers, 0, time.time())


def probe(config) -> Topology:
    """Learn roles from read_only once, with short timeouts (PyMySQL, control plane only)."""
    from proxy.backend.tls import control_connect

    user, password = config.monitor_credentials()
    topo = from_config(config)
    backends = {b.name: b for b in config.backends}
    servers = {}
    for s in topo.servers.values():
        try:
            conn = control_connect(
                config, backends[s.name], user=user, password=password,
                connect_timeout=max(config.monitor.connect_timeout * 2, 1.0),
                read_timeout=max(config.monitor.read_timeout * 4, 2.0),
            )
            with conn.cursor() as cur:
                cur.execute("SELECT @@read_only, VERSION()")
                ro, version = cur.fetchone()
            conn.close()
            role = s.role if s.role != UNKNOWN else (REPLICA if ro else PRIMARY)
            s = replace(s, read_only=bool(ro), version=version, role=role, last_ok=time.time())
        except Exception as e:  # an unreachable server is reported, not fatal
            s = replace(s, state=DOWN, last_error=str(e))
            log.warning("backend %s (%s) is not reachable: %s", s.name, s.address, e)
        servers[s.name] = s
    topo = Topology(servers, 1, time.time())
    if topo.primary is None:
        # No writable server seen: fall back to the first backend so the proxy still
        # answers (with the backend's own error) instead of refusing everything.
        first = next(iter(servers.values()))
        log.warning("no writable backend found; using %s as the primary", first.name)
        topo = topo.with_server(replace(first, role=PRIMARY))
    return topo
