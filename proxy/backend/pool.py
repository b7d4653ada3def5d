"""Backend connection pools, one per (server, user, session-shaping capabilities, charset, db).

A pooled connection is reused only when its session state is known clean: a
client's connection goes back through COM_RESET_CONNECTION (and is dropped if
that fails). Connections that die while idle remove themselves, so checkout
never hands out a dead one.

Each server gets at most `[pool] max_server_connections` connections from the instance (a
backend's own `max_connections` overrides it), split evenly over the workers. At that limit a
checkout first closes an idle connection of another key, then asks sessions holding idle
connections to that server to give them back (`on_pressure`), then waits in line for up to
`queue_timeout`; only then does the client get ERROR 1040. This is what lets ten thousand
clients share a few dozen server connections (docs/multiplexing.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque

from proxy.backend.connection import BackendConnection, BackendError
from proxy.backend.opening import connect
from proxy.protocol.constants import COM_QUERY, LOGIN_ONLY_CAPABILITIES
from proxy.protocol.packets import command, first_value
from proxy.protocol.scan import RESULT

log = logging.getLogger("rwproxy.pool")


class QueueTimeout(BackendError):
    """rwproxy's own limit ([pool] max_server_connections) held a client past queue_timeout: the
    operator's cap is the answer, at login too (a full server is not: BackendError.unavailable)."""

    @property
    def unavailable(self) -> bool:
        return False


class Pools:
    """All pools of one worker process."""

    def __init__(self, pool_config, tls: dict | None = None, workers: int = 1):
        self.cfg = pool_config
        self.tls = tls or {}  # server name -> backend_tls.BackendTLS
        self.workers = max(1, workers)  # worker processes sharing the instance-wide limits
        self.idle: dict[tuple, list[BackendConnection]] = defaultdict(list)
        self.open_count: dict[str, int] = defaultdict(int)  # per server name, in use + idle
        self.connects: dict[tuple, list[int]] = {}  # (server, user) -> [connections opened, attempts failed]
        self.waiters: dict[str, deque] = {}  # server name -> futures of checkouts waiting at the limit
        self.waiting = 0  # checkouts waiting now, all servers (sessions look at it after every statement)
        self.queued: dict[str, list[int]] = {}  # server name -> [checkouts that waited, that timed out]
        self.given_back = 0  # connections sessions gave back while idle (idle_release, pressure)
        self.on_pressure = None  # callable(server name, how many): sessions give back idle connections
        self.shed = None  # callable(server name) -> bool: close an idle shared connection (SharedLines.shed)
        # (server name, database) -> (the database's collation is the server's?, until when known)
        self.own_collation: dict[tuple, tuple[bool, float]] = {}

    def limit(self, server) -> int:
        """This worker's share of the connections `server` may get (0: no limit)."""
        total = server.max_connections or self.cfg.max_server_connections
        return -(-total // self.workers) if total else 0

    def note_connect(self, server: str, user: str, ok: bool) -> None:
        """Count a connection attempt (admin `pools` table, metrics)."""
        c = self.connects.get((server, user))
        if c is None:
            c = self.connects[(server, user)] = [0, 0]
        c[0 if ok else 1] += 1

    async def acquire(self, server, user: str, password: str, caps: int, charset: int, db: str | None) -> BackendConnection:
        key = (server.name, user, caps, charset, db)
        name = server.name
        deadline = 0.0
        again = False
        while True:
            idle = self.idle.get(key)
            while idle:
                conn = idle.pop()
                if not conn.closed:
                    conn.last_used = time.monotonic()
                    return conn
                self._forget(conn)
            limit = self.limit(server)
            if not limit or self.open_count[name] < limit or self.make_room(name):
                break
            loop = asyncio.get_running_loop()
            if not deadline:
                deadline = loop.time() + self.cfg.queue_timeout
                self.queued.setdefault(name, [0, 0])[0] += 1
            left = deadline - loop.time()
            if left <= 0:
                self.queued.setdefault(name, [0, 0])[1] += 1
                raise QueueTimeout(1040, "08004", f"Too many connections: no connection to backend {name} became "
                                   f"free within queue_timeout ({self.cfg.queue_timeout:g} s; this instance opens at "
                                   f"most {limit * self.workers} to it)")
            await self._wait(name, left, again)
            again = True
        self.open_count[name] += 1
        try:
            conn = await connect(server, key, caps, user, password, db, charset, self.cfg.connect_timeout,
                                 self.tls.get(server.name), net_buffer=self.cfg.backend_net_buffer)
        except BaseException:
            self.open_count[server.name] -= 1
            self.note_connect(server.name, user, False)
            raise
        self.note_connect(server.name, user, True)
        return conn

    def make_room(self, name: str, shared: bool = True) -> bool:
        """At the limit: close one idle connection to `name` (pooled, of any key, else a shared
        one with nothing queued) so a new one may open."""
        for key, conns in self.idle.items():
            if key[0] == name:
                while conns:
                    c = conns.pop(0)
                    if not c.closed:
                        c.close()
                    self._forget(c)
                    return True
        return shared and self.shed is not None and self.shed(name)

    async def _wait(self, name: str, timeout: float, again: bool) -> None:
        """Wait in line for a connection to `name` (one freed wakes the first in line)."""
        q = self.waiters.get(name)
        if q is None:
            q = self.waiters[name] = deque()
        f = asyncio.get_running_loop().create_future()
        if again:
            q.appendleft(f)  # (woken but beaten to it: keep its place at the front)
        else:
            q.append(f)
        self.waiting += 1
        try:
            if self.on_pressure is not None:
                self.on_pressure(name, len(q))
            await asyncio.wait_for(f, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            self.waiting -= 1
            if not f.done():
                f.cancel()
            try:
                q.remove(f)
            except ValueError:
                pass

    def _wake(self, name: str) -> None:
        """A connection to `name` became available (idle again, or closed): the first in line looks."""
        q = self.waiters.get(name)
        while q:
            f = q.popleft()
            if not f.done():
                f.set_result(None)
                return

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
        if (not self.cfg.reset_on_release or len(self.idle[conn.key]) >= self.cfg.max_idle_per_backend
                or conn.key[2] & LOGIN_ONLY_CAPABILITIES):
            conn.close()
            self._forget(conn)
            return
        asyncio.get_running_loop().create_task(self._reset_and_keep(conn))

    async def _reset_and_keep(self, conn: BackendConnection) -> None:
        # COM_RESET_CONNECTION keeps the current database, which a client may have
        # changed (COM_INIT_DB, USE) or dropped: put back the one this pool key promises.
        # The reset also sets @@collation_database and @@character_set_database to the
        # server's defaults, so a database with a collation of its own is selected again
        # even when untouched (in the reset's write: one round trip, but a second answer to
        # wait for, often in a wakeup of its own); one with the server's collation is not.
        db = conn.key[4]
        ok = not (db is None and conn.db_touched)  # (a database cannot be unselected)
        again = db is not None and (conn.db_touched or not self._collation_is_servers(conn.server.name, db))
        ok = ok and await conn.reset(db if again else None) and not conn.closed
        if ok and again and (conn.server.name, db) not in self.own_collation:
            ok = await self._learn_collation(conn, db) and not conn.closed
        if ok:
            conn.last_used = time.monotonic()
            self.idle[conn.key].append(conn)
            self._wake(conn.server.name)
        else:
            conn.close()
            self._forget(conn)

    COLLATION_TTL = 30.0  # s a database's collation is trusted to stay what it was (ALTER DATABASE)

    def _collation_is_servers(self, server: str, db: str) -> bool:
        known = self.own_collation.get((server, db))
        if known is None:
            return False
        if known[1] < time.monotonic():
            del self.own_collation[(server, db)]
            return False
        return known[0]

    def forget_collations(self, dbs) -> None:
        """Databases dropped (and perhaps about to be created again with another collation)."""
        for key in [k for k in self.own_collation if k[1] in dbs]:
            del self.own_collation[key]

    async def _learn_collation(self, conn: BackendConnection, db: str) -> bool:
        """Whether `db`'s collation is the server's (then a reset leaves it right and the
        database need not be selected again), asked on `conn` with `db` just selected; known for
        COLLATION_TTL seconds. False if the connection failed."""
        try:
            resp = await conn.command(command(COM_QUERY, b"SELECT @@collation_database = @@collation_server"),
                                      RESULT, timeout=5)
        except (ConnectionError, asyncio.TimeoutError):
            return False
        self.own_collation[(conn.server.name, db)] = (first_value(resp) == b"1", time.monotonic() + self.COLLATION_TTL)
        return True

    def discard(self, conn: BackendConnection) -> None:
        """Drop a connection whose state is unknown (mid-response, errors)."""
        conn.client = None
        conn.close()
        self._forget(conn)

    def _forget(self, conn: BackendConnection) -> None:
        self.uncount(conn.server.name)

    def uncount(self, name: str) -> None:
        """A connection counted here (pooled or shared) closed: one fewer, and the first in line looks."""
        n = self.open_count[name]
        if n > 0:
            self.open_count[name] = n - 1
        if self.waiting:
            self._wake(name)

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
