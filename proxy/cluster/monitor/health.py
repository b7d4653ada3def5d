"""Turning one check's raw result into a server's state, with hysteresis.

Pure logic (no sockets, no threads) so every rule is unit-testable:

* ``failcount`` consecutive failed checks -> DOWN (one failure is not a verdict:
  transient errors must not empty the read pool);
* a replica leaves the read pool at once when its lag exceeds
  ``max_replica_lag``, a replication thread is stopped, or it goes DOWN;
* it returns only after ``readmit_after`` consecutive healthy checks (no
  flapping), except when the monitor's very first check of it succeeds.

Each transition produces one log line that names the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from proxy.cluster.monitor.lag import LagReading
from proxy.cluster.topology import DOWN, LAGGING, MAINTENANCE, MASTER, PRIMARY, REPLICA, UNKNOWN, UP, ServerState


@dataclass(slots=True)
class Observation:
    """What one check saw on one server."""
    ok: bool
    at: float  # time.time() when the check finished
    error: str = ""
    read_only: bool | None = None
    autocommit: bool | None = None  # @@global.autocommit
    no_backslash_escapes: bool | None = None  # NO_BACKSLASH_ESCAPES in @@global.sql_mode
    server_id: int | None = None
    version: str = ""
    gtid_current_pos: str = ""
    gtid_slave_pos: str = ""
    replicating: bool | None = None  # None: replication status unreadable (repl_error says why)
    repl_error: str = ""
    io_state: str = ""  # Slave_IO_Running: Yes / No / Connecting (worst channel)
    sql_state: str = ""
    io_error: str = ""
    sql_error: str = ""
    seconds_behind: int | None = None
    source: str = ""  # host:port of the (default) replication source
    source_id: int | None = None  # Master_Server_Id of the (default) source
    heartbeat_period: float | None = None  # Slave_heartbeat_period of the (default) connection
    source_silent: float | None = None  # seconds since it last received anything from its source
    lag: LagReading | None = None
    applied_at: float | None = None  # monotonic stamp this check proves applied (cluster/progress.py)


@dataclass(slots=True)
class Tracker:
    """Per-server counters that outlive single checks."""
    fails: int = 0
    good: int = 0
    checks: int = 0  # checks made since the monitor started
    last_lag: LagReading | None = field(default=None)


@dataclass(frozen=True, slots=True)
class Policy:
    failcount: int = 3
    readmit_after: int = 5
    max_lag_ms: float = 1000.0
    master_master: bool = False


def learned_role(configured: str, read_only: bool | None, prev: str, mm: bool,
                 designated: bool | None = None) -> str:
    """A role set in the config wins; otherwise read_only decides.

    Once failover has designated the primary (designated is True/False, primary-replica only),
    that choice wins over both: any other server is a replica even when it says read_only=0
    (an old primary restarting from its my.cnf must never look like a second writer), and the
    designated primary stays the primary when someone sets read_only=1 on it by hand: writes
    still go to it and get the server's own answer (ERROR 1290) instead of waiting for a writer
    that no failover will bring (a switchover made outside rwproxy is followed: rejoin.adopt).
    """
    if designated is not None and not mm:
        return PRIMARY if designated else REPLICA
    if configured in (PRIMARY, REPLICA, MASTER):
        return configured
    if read_only is None:
        return prev
    if read_only:
        return REPLICA
    return MASTER if mm else PRIMARY


def replica_problems(obs: Observation, max_lag_ms: float) -> list[str]:
    """Why a replica that answers must not serve reads now (empty: it may)."""
    if obs.replicating is None:
        return [f"cannot read replication status: {obs.repl_error}"]
    if not obs.replicating:
        return ["not replicating (no replication source configured)"]
    out = []
    if obs.sql_state != "Yes":
        out.append("replication SQL thread stopped" + (f": {obs.sql_error}" if obs.sql_error else ""))
    if obs.io_state == "No":  # "Connecting" is judged by the lag it causes, not by itself
        out.append("replication IO thread stopped" + (f": {obs.io_error}" if obs.io_error else ""))
    if out:
        return out
    lag = obs.lag
    if lag is None or lag.ms is None:
        why = lag.note if lag is not None and lag.note else "no heartbeat and Seconds_Behind_Master is NULL"
        return [f"lag unknown ({why})"]
    if lag.ms > max_lag_ms:
        return [f"lag {lag.ms / 1000:.2f} s > max_replica_lag {max_lag_ms / 1000!r} s"]
    return []


def _lag_text(obs: Observation) -> str:
    if obs.lag is None or obs.lag.ms is None:
        return ""
    return f" (lag {obs.lag.ms / 1000:.2f} s)"


def decide(prev: ServerState, obs: Observation, tr: Tracker, policy: Policy,
           configured_role: str, designated: bool | None = None) -> tuple[ServerState, str]:
    """The server's next state and a log message ('' when nothing changed). Updates tr.

    designated: see learned_role (None while no failover authority has chosen the primary).
    """
    tr.checks += 1
    if prev.state == MAINTENANCE:  # set by an operator or failover; only the check time moves
        return replace(prev, last_check=obs.at), ""
    if not obs.ok:
        tr.fails += 1
        tr.good = 0
        if tr.fails >= policy.failcount and prev.state != DOWN:
            new = replace(prev, state=DOWN, readable=False, last_error=obs.error, last_check=obs.at,
                          lag_ms=None, changed_at=obs.at, fails=tr.fails)
            where = "replica left the read pool: " if prev.readable and prev.role == REPLICA else ""
            return new, f"{where}down after {tr.fails} failed checks: {obs.error}"
        return replace(prev, last_error=obs.error, last_check=obs.at, fails=tr.fails), ""

    tr.fails = 0
    first = tr.checks == 1  # the very first look: no history to flap against
    role = learned_role(configured_role, obs.read_only, prev.role, policy.master_master, designated)
    lag_ms = obs.lag.ms if obs.lag is not None else None
    fields = dict(
        role=role, read_only=obs.read_only, version=obs.version or prev.version,
        autocommit=prev.autocommit if obs.autocommit is None else obs.autocommit,
        no_backslash_escapes=(prev.no_backslash_escapes if obs.no_backslash_escapes is None
                              else obs.no_backslash_escapes),
        gtid_current_pos=obs.gtid_current_pos, gtid_slave_pos=obs.gtid_slave_pos,
        io_running=(obs.io_state == "Yes") if obs.replicating else None,
        sql_running=(obs.sql_state == "Yes") if obs.replicating else None,
        seconds_behind=obs.seconds_behind, source=obs.source, lag_ms=lag_ms,
        last_check=obs.at, last_ok=obs.at, fails=0, server_id=obs.server_id,
        source_id=obs.source_id if obs.replicating else None,
        source_silent=obs.source_silent if obs.replicating else None,
        heartbeat_period=obs.heartbeat_period if obs.replicating else None)
    msgs = []
    if designated and prev.read_only is not None and obs.read_only != prev.read_only:
        msgs.append("read_only=1: writes get the server's read-only error (1290) until it is writable again"
                    if obs.read_only else "read_only=0: writable again")
    if role != prev.role and not (first and prev.role == UNKNOWN):
        fenced = " (not the designated primary)" if designated is False and not obs.read_only else ""
        msgs.append(f"role {prev.role} -> {role} (read_only={int(bool(obs.read_only))}){fenced}")
    if prev.state == DOWN:
        msgs.append("reachable again")

    if role == REPLICA:
        problems = replica_problems(obs, policy.max_lag_ms)
        state = LAGGING if problems else UP
        if problems:
            tr.good = 0
            readable = False
            if prev.readable:
                msgs.append("replica left the read pool: " + "; ".join(problems))
            elif prev.state != LAGGING and not first:
                msgs.append("replica not readable: " + "; ".join(problems))
            elif first:
                msgs.append("replica not in the read pool: " + "; ".join(problems))
        else:
            tr.good += 1
            readable = prev.readable or first or tr.good >= policy.readmit_after
            if readable and not prev.readable:
                how = "first check" if first else f"{tr.good} consecutive healthy checks"
                msgs.append(f"replica joined the read pool after {how}{_lag_text(obs)}")
            elif prev.state in (LAGGING, DOWN):
                msgs.append(f"replica healthy again{_lag_text(obs)}; rejoins the read pool after "
                            f"{policy.readmit_after} consecutive healthy checks")
        last_error = "; ".join(problems)
    else:
        state = UP
        readable = role in (PRIMARY, MASTER)
        tr.good += 1
        last_error = ""
        if first:
            msgs.append(f"first check: {role} (read_only={int(bool(obs.read_only))})")
    changed_at = obs.at if (state != prev.state or role != prev.role) else prev.changed_at
    new = replace(prev, state=state, readable=readable, last_error=last_error, changed_at=changed_at, **fields)
    return new, "; ".join(msgs)


# Fields a router acts on: any change is published at once (others at least every second).
SIGNIFICANT = ("role", "state", "readable", "read_only", "io_running", "sql_running", "source")
# Routers read GTID positions only for read_your_writes = "gtid"; they move with every write
# (and every heartbeat), so without that mode they ride the once-a-second snapshots.
GTID_FIELDS = ("gtid_current_pos", "gtid_slave_pos")


def significant(a: ServerState, b: ServerState, gtid: bool = True) -> bool:
    return (any(getattr(a, f) != getattr(b, f) for f in SIGNIFICANT)
            or (gtid and any(getattr(a, f) != getattr(b, f) for f in GTID_FIELDS)))
