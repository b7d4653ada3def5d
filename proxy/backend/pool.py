"""Backend connection pools, one per (server, user, session-shaping capabilities, charset, db).

A pooled connection is reused only when its session state is known clean: a
client's connection goes back through COM_RESET_CONNECTION (and is dropped if
that fails). Connections that die while idle remove themselves, so checkout
never hands out a dead one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict

from proxy.backend.connection import BackendConnection, BackendError, connect

log = logging.getLogger("rwproxy.pool")


class Pools:
    """All pools of one worker process."""

    def __init__(self, pool_config, tls: dict | None = None):
        self.cfg = pool_config
        self.tls = tls or {}  # server name -> backend_tls.BackendTLS
        self.idle: dict[tuple, list[BackendConnection]] = defaultdict(list)
        self.open_count: dict[str, int] = defaultdict(int)  # per server name, in use + idle
        self.connects: dict[tuple, list[int]] = {}  # (server, user) -> [connections opened, attempts failed]

    def note_connect(self, server: str, user: str, ok: bool) -> None:
        """Count a connection attempt (admin `pools` table, metrics)."""
        c = self.connects.get((server, user))
        if c is None:
            c = self.connects[(server, user)] = [0, 0]
        c[0 if ok else 1] += 1

    async def acquire(self, server, user: str, password: str, caps: int, charset: int, db: str | None) -> BackendConnection:
        key = (server.name, user, caps, charset, db)
        idle = self.idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
            self._forget(conn)
        if server.max_connections and self.open_count[server.name] >= server.max_connections:
            raise BackendError(1040, "08004", f"Too many connections to backend {server.name} (max_connections reached)")
        self.open_count[server.name] += 1
        try:
            conn = await connect(server, key, caps, user, password, db, charset, self.cfg.connect_timeout,
                                 self.tls.get(server.name), net_buffer=self.cfg.backend_net_buffer)
        except BaseException:
            self.open_count[server.name] -= 1
            self.note_connect(server.name, user, False)
            raise
        self.note_connect(server.name, user, True)
        return conn

    def idle_per_key(self) -> dict[tuple, int]:
        """(server, user) -> idle pooled connections."""
        out: dict[tuple, int] = {}
        for key, conns in self.idle.items():
            n = sum(1 for c in conns if not c.closed)
            if n:
                out[key[:2]] = out.get(key[:2], 0) + n
        return out

    def release(self, conn: BackendConnection) -> None:
        """Return a connection a client no longer needs; it is reset before reuse."""
        conn.client = None
        if conn.closed:
            self._forget(conn)
            return
        if not self.cfg.reset_on_release or len(self.idle[conn.key]) >= self.cfg.max_idle_per_backend:
            conn.close()
            self._forget(conn)
            return
        asyncio.get_running_loop().create_task(self._reset_and_keep(conn))

    async def _reset_and_keep(self, conn: BackendConnection) -> None:
        # COM_RESET_CONNECTION keeps the current database, which a client may have
        # changed (COM_INIT_DB, USE): put back the one this pool key promises.
        db = conn.key[4]
        ok = await conn.reset() and not conn.closed
        if ok and conn.db_touched:
            if db is None:
                ok = False  # a database cannot be unselected
            else:
                try:
                    await conn.init_db(db)
                    conn.db_touched = False
                except (BackendError, ConnectionError, asyncio.TimeoutError):
                    ok = False
        if ok:
            conn.last_used = time.monotonic()
            self.idle[conn.key].append(conn)
        else:
            conn.close()
            self._forget(conn)

    def discard(self, conn: BackendConnection) -> None:
        """Drop a connection whose state is unknown (mid-response, errors)."""
        conn.client = None
        conn.close()
        self._forget(conn)

    def _forget(self, conn: BackendConnection) -> None:
        n = self.open_count[conn.server.name]
        if n > 0:
            self.open_count[conn.server.name] = n - 1

    def drop_server(self, name: str) -> None:
        """Close every idle connection to a server (it died or left the cluster)."""
        for key, conns in self.idle.items():
            if key[0] == name:
                for c in conns:
                    c.close()
                    self._forget(c)
                conns.clear()

    def expire_idle(self) -> None:
        limit = self.cfg.idle_timeout
        if not limit:
            return
        now = time.monotonic()
        for conns in self.idle.values():
            keep = []
            for c in conns:
                if c.closed:
                    self._forget(c)
                elif now - c.last_used > limit:
                    c.close()
                    self._forget(c)
                else:
                    keep.append(c)
            conns[:] = keep

    def close_all(self) -> None:
        for conns in self.idle.values():
            for c in conns:
                c.close()
            conns.clear()
