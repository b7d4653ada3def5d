"""The heartbeat writes: a row per writer, read by the replicas' checks for sub-second lag (lag.py).
A mixin of Monitor, kept apart so that checker.py holds the loop, checks and publishing."""

from __future__ import annotations

import asyncio
import logging
import time

import pymysql

from proxy.cluster.monitor import wire
from proxy.cluster.monitor.cadence import WRITER
from proxy.cluster.monitor.health import Observation
from proxy.cluster.monitor.node import Node, close_quietly
from proxy.cluster.monitor.replication import DENIED, READ_ONLY, SESSION_GLOBALS
from proxy.cluster.sqlerrors import describe, error_code
from proxy.cluster.topology import DOWN, MAINTENANCE, MASTER, PRIMARY

log = logging.getLogger("rwproxy.monitor")


class HeartbeatWriting:
    """Methods of Monitor (uses its _states, _schema, _user, _connect, _gen, _nodes, _replication,
    _judge, _stir, _overdue and _beat_landed)."""

    async def _beat(self, node: Node, conn: list, state: dict) -> None:
        """Write this server's heartbeat row if it is a live writer; never counts as a check.

        A writer is what the topology says (role), not just read_only=0: a fenced old primary
        that restarted writable must not get rows the rest of the cluster never sees. node.hb_lock
        is held across the write (pause_heartbeat waits for it from another thread); only this
        server's heartbeat task takes it on the loop.
        """
        with node.hb_lock:
            if not node.retired.is_set():
                started = node.beat_started = time.monotonic()
                watch = asyncio.get_running_loop().call_later(self._mon.interval, self._overdue, node, started)
                try:
                    await self._beat_locked(node, conn, state)
                finally:
                    node.beat_started = 0.0
                    watch.cancel()

    async def _beat_locked(self, node: Node, conn: list, state: dict) -> None:
        st = self._states[node.name]
        if (st.read_only is not False or st.state in (DOWN, MAINTENANCE) or st.role not in (PRIMARY, MASTER)
                or node.hb_paused):
            if conn[0] is not None:
                close_quietly(conn[0])
                conn[0] = None
                state["table"] = False
            return
        if node.hb_denied and time.monotonic() < state["retry_at"]:
            return
        schema = self._schema
        try:
            if conn[0] is None:
                conn[0] = await self._connect(node)
            c = conn[0]
            if not state["table"]:
                if not await self._beat_setup(c, schema):
                    return
                state["table"] = True
            # The row, then where the writer's clock and binlog stood right after it (a timeline sample
            # that brackets the heartbeat's own transaction; see lag.py), and what a check reads (a
            # calm writer's heartbeats are its checks, cadence.py): one round trip. The row is written
            # only while read_only is off: the monitor user is not stopped by read_only, and a beat on
            # a primary a switchover has just made read-only (another coordinated instance's monitor,
            # which has not heard of it yet) would be a transaction the new primary never gets; the old
            # primary's replication would stop at the new one's first write (1950). An INSERT ... SELECT
            # of no row is not binlogged in ROW or MIXED format (_beat_setup keeps STATEMENT away).
            gen = self._gen
            row = (await c.query(f"INSERT INTO `{schema}`.heartbeat (server_id, ts, writer) "
                                 f"SELECT @@server_id, UNIX_TIMESTAMP(NOW(6)), {wire.quote(node.name)} FROM DUAL "
                                 "WHERE @@global.read_only = 0 "
                                 "ON DUPLICATE KEY UPDATE ts = VALUES(ts), writer = VALUES(writer); "
                                 "SELECT UNIX_TIMESTAMP(NOW(6)), @@gtid_binlog_pos, @@read_only, @@server_id, "
                                 "@@gtid_current_pos, @@gtid_slave_pos, " + SESSION_GLOBALS))[0]
            if row[2] != "0":  # read-only now: no beat landed; a check finds out what changed
                node.wake()
                return
            pos = row[1] or ""
            node.timeline.add(float(row[0]), pos)
            node.beat_ok = time.monotonic()
            self._beat_landed(node, pos)  # calm replicas check after it (cadence.py)
            if node.calm == WRITER:
                await self._judge_beat(node, c, row, gen)
            if node.hb_denied:
                node.hb_denied = False
                log.info("%s: heartbeat writes work again; replica lag is measured by heartbeat", node.label)
        except (pymysql.MySQLError, OSError) as exc:
            self._stir()  # a failed heartbeat is an event: every server back on the tick
            code = error_code(exc)
            if code in DENIED:
                if not node.hb_denied:
                    log.error("%s: cannot write the heartbeat (%s): the monitor user %r needs CREATE, INSERT and "
                              "UPDATE on `%s`.*; replica lag falls back to Seconds_Behind_Master (whole seconds)",
                              node.label, describe(exc), self._user, schema)
                node.hb_denied = True
                state["retry_at"] = time.monotonic() + 30.0
                return
            if code != READ_ONLY:  # read_only just flipped: the checker will notice the role change
                log.debug("%s: heartbeat write failed: %s", node.label, describe(exc))
            close_quietly(conn[0])
            conn[0] = None
            state["table"] = False

    async def _beat_setup(self, c, schema: str) -> bool:
        """Before the first beat on a connection: the table, created only where it is missing and
        only while read_only is off (CREATE DATABASE IF NOT EXISTS is binlogged even when the
        database exists); and row-based logging for this session on a STATEMENT-format server, so
        that a beat the read_only guard stops leaves no event (tried; without BINLOG ADMIN the
        guard still holds for all but that format). False: read-only, nothing done."""
        ro, fmt, has_db, has_table = (await c.query(
            "SELECT @@global.read_only, @@binlog_format, "
            f"(SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = {wire.quote(schema)}), "
            f"(SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = {wire.quote(schema)} "
            "AND TABLE_NAME = 'heartbeat')"))[0]
        if ro != "0":
            return False
        if fmt == "STATEMENT":
            try:
                await c.query("SET SESSION binlog_format = 'ROW'")
            except pymysql.MySQLError:
                pass
        if has_db == "0":
            await c.query(f"CREATE DATABASE IF NOT EXISTS `{schema}`")
        if has_table == "0":
            await c.query(f"CREATE TABLE IF NOT EXISTS `{schema}`.heartbeat ("
                          " server_id INT UNSIGNED NOT NULL PRIMARY KEY COMMENT '@@server_id of the writer',"
                          " ts DECIMAL(20,6) NOT NULL COMMENT 'writer clock: UNIX_TIMESTAMP(NOW(6))',"
                          " writer VARCHAR(255) NOT NULL DEFAULT '' COMMENT 'backend name in the rwproxy config'"
                          ") ENGINE=InnoDB COMMENT='rwproxy replication heartbeat'")
        return True

    async def _judge_beat(self, node: Node, conn, row: tuple, gen: int) -> None:
        """A calm writer's heartbeat answer judged as its check (its check task naps meanwhile)."""
        obs = Observation(ok=True, at=time.time(), read_only=bool(int(row[2])), server_id=int(row[3]),
                          gtid_current_pos=row[4] or "", gtid_slave_pos=row[5] or "", autocommit=bool(int(row[6])),
                          no_backslash_escapes=bool(int(row[7])))
        if obs.server_id != node.server_id:
            node.wake()  # another server answers here now: a real check finds out
            return
        await self._replication(node, conn, obs)
        if obs.replicating is not False:
            node.wake()  # it replicates now: its checks read lag
            return
        self._judge(node, obs, gen)
