"""The monitor's reading of replication: thread states (SHOW ALL SLAVES STATUS, reused while
healthy) and lag (heartbeat + GTID timeline, else Seconds_Behind_Master). A mixin of Monitor,
kept apart so that checker.py holds the loop, checks and publishing."""

from __future__ import annotations

import time

import pymysql

from proxy.cluster.monitor import wire
from proxy.cluster.monitor.cadence import CALM_REPLICATION, GTID_WAIT
from proxy.cluster.monitor.health import Observation
from proxy.cluster.gtid import seqs
from proxy.cluster.monitor.lag import LagReading, estimate
from proxy.cluster.sqlerrors import describe, error_code
from proxy.cluster.topology import DOWN, MASTER, PRIMARY

DENIED = {1044, 1045, 1142, 1143, 1227, 1370}
NO_TABLE = {1049, 1146}  # heartbeat schema/table not replicated here (yet)
READ_ONLY = 1290
# What a session starts with on a server, read by every check and by a calm writer's heartbeat
# (login.start_status): its global autocommit, and whether its global sql_mode has
# NO_BACKSLASH_ESCAPES (client libraries escape strings by that status flag).
SESSION_GLOBALS = "@@global.autocommit, FIND_IN_SET('NO_BACKSLASH_ESCAPES', @@global.sql_mode) > 0"


# Observation fields that come from SHOW ALL SLAVES STATUS (reused between readings).
_REPL_FIELDS = ("replicating", "repl_error", "io_state", "sql_state", "io_error", "sql_error",
                "seconds_behind", "source", "source_id", "heartbeat_period")


class ReplicationReading:
    """Methods of Monitor (uses its _mon, _nodes, _states, _hb_newest, _stale_after, _slow); the
    check query itself is here too, since on a replica it reads the heartbeat."""

    async def _replication(self, node, conn, obs: Observation) -> None:
        """Replication threads' state. SHOW ALL SLAVES STATUS costs a PyMySQL client ~0.45 ms of
        CPU (60-odd columns), five times the rest of a check, so a healthy reading is reused for
        up to `replication_interval`; it is read afresh at once after any problem, a read_only
        flip, a reconnect, or while lag can only come from Seconds_Behind_Master. A calm server
        (cadence.py) reuses it CALM_REPLICATION times as long (10 s): a stopped thread shows as lag
        first, within a heartbeat or two, and that ends the calm."""
        cached = node.repl
        src = self._source_node(node)
        if src is not None and (src.tracker.fails or self._slow(src)):
            cached = None  # its source is slow to answer us, or stopped: read afresh what the replica hears from it
        if cached is not None:
            fields, read_only, at = cached
            reuse = self._mon.replication_interval * (CALM_REPLICATION if node.calm else 1)
            if (read_only == obs.read_only and time.monotonic() - at < reuse
                    and (not fields["replicating"] or self._heartbeat_usable(node))):
                for k, v in fields.items():
                    setattr(obs, k, v)
                # silence is known only as of the reading: a reused one must not grow it (failover's
                # hang rule reads it; when the source is slow the reading is taken afresh anyway)
                obs.source_silent = max(0.0, at - node.heard_at)
                return
        node.repl = None
        await self._read_replication(node, conn, obs)
        healthy = obs.replicating is False or (obs.replicating and obs.io_state == "Yes" and obs.sql_state == "Yes")
        if healthy and (not obs.replicating or self._heartbeat_usable(node)):
            node.repl = ({k: getattr(obs, k) for k in _REPL_FIELDS}, obs.read_only, time.monotonic())

    _CHECK = ("SELECT @@read_only, @@server_id, @@gtid_current_pos, @@gtid_slave_pos, @@gtid_binlog_pos, "
              "UNIX_TIMESTAMP(NOW(6)), " + SESSION_GLOBALS)

    async def _check_query(self, node, conn, pos: str | None = None) -> tuple:
        """The check's one round trip. On a replica whose heartbeat table was readable last time
        it also reads the newest heartbeat (else _lag would need a second round trip every check:
        a third of the monitor's queries). hb_ts is a 1-tuple (value) when it was read, else None.
        pos: first wait (MASTER_GTID_WAIT, up to GTID_WAIT) for the replica to reach the heartbeat
        that woke its check, in the same round trip (a server that refuses the wait is not asked again)."""
        wait = f"SELECT MASTER_GTID_WAIT({wire.quote(pos)}, {GTID_WAIT}); " if pos and node.gtid_wait else ""
        if node.hb_merge:
            try:
                *row, hb_ts = (await conn.query(f"{wait}{self._CHECK}, {self._hb_newest}"))[0]
                return (*row, (hb_ts,))
            except pymysql.MySQLError as exc:
                code = error_code(exc)
                if code in NO_TABLE | DENIED:
                    node.hb_merge = False  # table gone or not readable: plain check; _lag finds out
                elif wait and code < 2000:
                    node.gtid_wait, wait = False, ""
                else:
                    raise
        try:
            return (*(await conn.query(f"{wait}{self._CHECK}"))[0], None)
        except pymysql.MySQLError as exc:
            if not (wait and error_code(exc) < 2000):
                raise
            node.gtid_wait = False
            return (*(await conn.query(self._CHECK))[0], None)

    def _heartbeat_usable(self, node) -> bool:
        writer = self._writer_for(node)
        return self._mon.heartbeat and writer is not None and not writer.hb_denied and bool(len(writer.timeline))

    async def _read_replication(self, node, conn, obs: Observation) -> None:
        try:
            rows = [r for r in await conn.query_dicts("SHOW ALL SLAVES STATUS") if r.get("Master_Host")]
        except pymysql.MySQLError as exc:
            if error_code(exc) not in DENIED:
                raise
            obs.replicating, obs.repl_error = None, describe(exc)
            return
        obs.replicating = bool(rows)
        if not rows:
            node.source_id, node.source_addr = None, ""
            return
        main = next((r for r in rows if not r.get("Connection_name")), rows[0])

        def worst(key: str) -> str:  # every channel must run for the replica to be current
            states = [r.get(key) or "No" for r in rows]
            return next((s for s in ("No", "Connecting") if s in states), "Yes")

        obs.io_state, obs.sql_state = worst("Slave_IO_Running"), worst("Slave_SQL_Running")
        obs.io_error = "; ".join(r["Last_IO_Error"] for r in rows if r.get("Last_IO_Error"))
        obs.sql_error = "; ".join(r["Last_SQL_Error"] for r in rows if r.get("Last_SQL_Error"))
        sbm = [r["Seconds_Behind_Master"] for r in rows]
        obs.seconds_behind = None if any(s is None for s in sbm) else max(int(s) for s in sbm)
        obs.source = f"{main['Master_Host']}:{main['Master_Port']}"
        period = main.get("Slave_heartbeat_period")
        obs.heartbeat_period = float(period) if period is not None else None
        # Anything received from the source (an event, or a heartbeat while it is idle) moves one of these.
        heard = (main.get("Slave_received_heartbeats"), main.get("Gtid_IO_Pos"), main.get("Read_Master_Log_Pos"),
                 main.get("Master_Log_File"))
        now = time.monotonic()
        if heard != node.heard:
            node.heard, node.heard_at = heard, now
        obs.source_silent = now - node.heard_at
        node.source_id = int(main["Master_Server_Id"]) if main.get("Master_Server_Id") else None
        obs.source_id = node.source_id
        node.source_addr = obs.source

    # ---- lag -------------------------------------------------------------------

    def _writer_for(self, node) -> object | None:
        """Follow the replication chain upwards to the writable server whose timeline applies."""
        seen = {node.name}
        cur = node
        for _ in range(len(self._nodes)):
            src = self._source_node(cur)
            if src is None or src.name in seen:
                return None
            st = self._states[src.name]
            if st.role in (PRIMARY, MASTER) or st.read_only is False:
                return src
            seen.add(src.name)
            cur = src
        return None

    def _source_node(self, node) -> object | None:
        for other in self._nodes.values():
            if other is not node and node.source_id is not None and other.server_id == node.source_id:
                return other
        for other in self._nodes.values():
            if other is not node and f"{other.host}:{other.port}" == node.source_addr:
                return other
        return None

    async def _lag(self, node, conn, obs: Observation, now: float, merged: tuple | None = None) -> LagReading | None:
        """Heartbeat + timeline estimate when the writer's heartbeat works, else Seconds_Behind_Master.
        `merged`: (newest heartbeat ts,) when the check query already read it at `now`."""
        writer = self._writer_for(node)
        use_hb = self._heartbeat_usable(node)
        reading = None
        if use_hb:
            hb_ts = hb_now = None
            if merged is not None:
                hb_now, hb_ts = now, merged[0]
            else:
                try:
                    hb_now, hb_ts = (await conn.query(f"SELECT UNIX_TIMESTAMP(NOW(6)), {self._hb_newest}"))[0]
                    node.hb_merge = True  # readable: the next checks read it in the same round trip
                except pymysql.MySQLError as exc:
                    if error_code(exc) not in NO_TABLE | DENIED:
                        raise
            stale = time.monotonic() - writer.timeline.updated > self._stale_after
            reading = estimate(writer.timeline, seqs(obs.gtid_current_pos), now,
                               float(hb_ts) if hb_ts is not None else None,
                               float(hb_now) if hb_now is not None else None, stale)
        if reading is None:
            reading = self._sbm_lag(node, obs, writer)
        node.tracker.last_lag = reading
        return reading

    def _sbm_lag(self, node, obs: Observation, writer) -> LagReading:
        """Whole seconds from the server; while the source is down, the last value (frozen)."""
        if obs.seconds_behind is not None:
            return LagReading(obs.seconds_behind * 1000.0, "seconds_behind")
        last = node.tracker.last_lag
        src = self._source_node(node)
        src_lost = src is not None and (self._states[src.name].state == DOWN or src.tracker.fails > 0)
        if obs.io_state == "Connecting" and obs.sql_state == "Yes" and src_lost and last and last.ms is not None:
            return LagReading(last.ms, "frozen", note="source unreachable, last known value")
        return LagReading(None, "", note="no heartbeat and Seconds_Behind_Master is NULL")
