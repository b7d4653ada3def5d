"""Pipelined multiplexing: autocommit reads of stateless sessions share a few backend connections.

Why: with one backend connection per client, a proxy adds two socket hops and a sleeping
server thread to every query. Writing each eligible command at once onto one of a few shared
connections per worker (`pool.shared_connections`), without waiting for the ones ahead of it,
lets the server's thread find the next command already waiting and lets the proxy read several
responses per wakeup (docs/multiplexing.md has the measurements). Responses come back in
order; the scanner splits them and each goes to the client whose command it answers.

Which statements may share (the router's plan decides, Router.plan's `share`): a READ with
no flag but routing hints, from a session with autocommit on, no transaction, no temporary
tables, locks or user variables. Sessions share only with sessions of the same server, user,
login database, charset, capabilities and SET/USE history (the key of `SharedLines`); a new
shared connection replays that history when it opens. A statement's digest must also be known
to answer small and fast: `Profiles` learns each digest's response size, service time and
warnings, starting on the session's own connection; a digest that answers big, slowly or with
warnings keeps using the session's own connection, so nothing queued on a shared connection
waits long behind it, and SHOW WARNINGS finds its warnings.

Prepared statements are prepared once per shared connection, without a round trip: the
COM_STMT_PREPARE is pipelined with a COM_STMT_EXECUTE of statement id -1 (MariaDB's direct
execution); the proxy reads the backend id from the prepare's response itself. The parameter
types always go with the execute, since another session's types may be the last ones sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque

from proxy.backend.connection import BackendConnection, BackendError
from proxy.backend.opening import connect
from proxy.logs import clean
from proxy.protocol.constants import ER_QUERY_INTERRUPTED
from proxy.protocol.packets import at_statement_limit, stmt_close
from proxy.protocol.scan import PREPARE

log = logging.getLogger("rwproxy.shared")

_monotonic = time.monotonic
_EWMA = 0.2  # weight of the newest service time in a digest's average
_call_soon = None  # the worker's loop.call_soon, set when the first shared connection opens
RETRY_AFTER = 5.0  # seconds before opening a shared connection is tried again after a failure
# ... and after max_server_connections refused it: asking the sessions to give connections back
# (Pools.on_pressure) at every statement that wanted a line cost 15% of the QPS of 256 writers
# on 64 connections (measured, 2026-12-05).
FULL_RETRY = 0.1
# A shared connection takes new commands until the work queued on it (the digests' average
# service times) reaches this; only then does the next one (opened on demand) take them.
# Filling one connection first keeps batches big: each send(2) and each wakeup of the
# server's thread carries more commands (1 vs 2 per worker measured 0.72x vs 0.68x direct,
# 19.7 vs 21.7 us per point select), while slow reads still spread out and run in parallel.
SPILL_AFTER = 0.001
# A write counts as this much queued work: nothing is queued behind it, so a write that waits for
# a row lock (up to innodb_lock_wait_timeout) holds up no other session's statement, and KILL
# QUERY of its connection's thread can only stop that write (frontend/kill.py).
EXCLUSIVE = 1e6


class Entry:
    """One command queued on a shared connection: a client's, or the proxy's own PREPARE."""

    __slots__ = ("client", "kind", "sent", "est", "relayed", "sql", "buf", "substitute", "cancelled")

    def __init__(self, client, kind: int, sent: float, sql: bytes | None = None, est: float = 0.0):
        self.client = client
        self.kind = kind
        self.sent = sent
        self.est = est  # expected service time (the digest's average)
        self.relayed = 0
        self.sql = sql  # the proxy's own PREPARE: the statement text it prepares
        self.buf = bytearray() if client is None else None
        self.substitute = None  # an error to send instead of the response (failed PREPARE)
        self.cancelled = False  # KILL QUERY before the response began: answer 1317 instead


class SharedBackend(BackendConnection):
    """A backend connection that carries a queue of commands from many sessions."""

    __slots__ = ("queue", "ps", "lines", "direct_ok", "reading_paused", "ready", "out", "pending", "reserved")

    def __init__(self, server, key, caps: int):
        super().__init__(server, key, caps)
        self.queue: deque[Entry] = deque()
        self.ps: OrderedDict[bytes, int] = OrderedDict()  # statement text -> backend statement id
        self.lines = None  # the SharedLines that owns this connection
        self.direct_ok = False  # the server does MariaDB direct execution (prepare + execute -1)
        self.reading_paused = False
        self.ready = False  # logging in and replaying the key's session history: plain collected commands
        self.out: list = []  # commands queued in this loop iteration, written together (one send)
        self.pending = 0.0  # expected seconds of work queued (sum of the entries' est)
        self.reserved = 0.0  # EXCLUSIVE while a KILL for the write on it runs: nothing new is queued

    def send(self, client, packet: bytes, kind: int, est: float, prepare_sql: bytes | None = None,
             prepare_packet: bytes = b""):
        """Queue `client`'s command (after preparing `prepare_sql` here first) and write it now."""
        q = self.queue
        now = _monotonic()
        start = not q
        if prepare_sql is not None:
            q.append(Entry(None, PREPARE, now, prepare_sql))
            packet = prepare_packet + packet
        e = Entry(client, kind, now, None, est)
        q.append(e)
        self.pending += est
        if start:
            self.scanner.start(q[0].kind)
            self._follow_head()
        out = self.out
        if not out:
            _call_soon(self._flush)
        out.append(packet)
        return e

    def prepared(self, sql: bytes) -> int | None:
        """This connection's id for a statement text prepared on it (None: not prepared here)."""
        bid = self.ps.get(sql)
        if bid is not None:
            self.ps.move_to_end(sql)
        return bid

    def forget_statements(self) -> int:
        """Close the statements kept prepared here (after the commands already queued; each is
        prepared again, pipelined, at its next use); how many."""
        ps, self.ps = self.ps, OrderedDict()
        if ps and not self.closed:
            self.out.extend(stmt_close(bid) for bid in ps.values())
            self._flush()  # now: the prepare that was refused is tried again (a flush due later writes nothing)
        return len(ps)

    def _flush(self) -> None:
        """Write the commands of this loop iteration in one send: with many clients, several
        commands arrive per wakeup, and each send(2) costs more than the bytes it carries."""
        out, self.out = self.out, []
        if not self.closed:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def data_received(self, data):
        if not self.ready:
            return BackendConnection.data_received(self, data)
        q = self.queue
        scanner = self.scanner
        while data:
            if not q:
                log.warning("shared connection to %s: %d unexpected bytes from the server; closing it",
                            self.server.name, len(data))
                self.transport.abort()
                return
            e = q[0]
            n = scanner.feed(data)
            part = data if n < 0 or n == len(data) else data[:n]
            c = e.client
            if c is None:
                e.buf += part
            elif e.substitute is None and not e.cancelled:
                c.write(part)
            e.relayed += len(part)
            if n < 0:
                return
            q.popleft()
            self.pending = self.pending - e.est if q else self.reserved
            now = _monotonic()
            started = e.sent if e.sent > self.done_at else self.done_at
            self.done_at = now
            self._finish(e, now - started)
            if q:
                scanner.start(q[0].kind)
                self._follow_head()
            data = data[n:] if n < len(data) else b""

    def _finish(self, e: Entry, service: float) -> None:
        sc = self.scanner
        c = e.client
        if c is None:  # the proxy's own PREPARE
            if sc.error:
                nxt = self.queue[0] if self.queue else None
                b = e.buf
                if nxt is not None:  # its execute (id -1) fails as "unknown statement": tell the real reason
                    nxt.substitute = bytes(b[:3]) + b"\x01" + bytes(b[4:])
                if at_statement_limit(b):  # make room for the next try
                    self.lines.forget_statements(self.server.name)
                return
            self.ps[e.sql] = sc.stmt_id
            limit = self.lines.max_statements
            while len(self.ps) > limit:
                _, old = self.ps.popitem(last=False)
                self.transport.write(stmt_close(old))
            return
        if c.closed:
            return
        self.lines.statements += 1
        if e.substitute is not None:
            if at_statement_limit(e.substitute) and self.lines.on_refused is not None:
                return self.lines.on_refused(c, self)
            c.write(e.substitute)
        elif e.cancelled:
            c.send_error(*ER_QUERY_INTERRUPTED, "Query execution was interrupted")
        c.command_done(self, e.relayed, service)

    def _follow_head(self) -> None:
        """Read from the server only while the client at the head of the queue can take data."""
        e = self.queue[0]
        c = e.client
        want_pause = c is not None and c.write_paused and not c.closed
        if want_pause != self.reading_paused and not self.closed:
            self.reading_paused = want_pause
            if want_pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def reserve(self, on: bool) -> None:
        """Take no new statement (on) while a KILL for the write on this connection runs, or again."""
        d = EXCLUSIVE if on else -EXCLUSIVE
        self.reserved += d
        self.pending += d

    def client_paused(self, client) -> None:
        """The client's write buffer crossed a mark (or it closed): follow it if it is at the head."""
        if self.queue and self.queue[0].client is client:
            self._follow_head()

    def connection_lost(self, exc):
        self.closed = True
        if self.lines is not None:
            self.lines.forget(self)
        q, self.queue = self.queue, deque()
        for e in q:
            c = e.client
            if c is not None and not c.closed:
                c.command_lost(self, e.relayed, e.cancelled)


class SharedLines:
    """The shared connections of one worker, per pool key, and what they have learned."""

    def __init__(self, pools, pool_config, max_statements: int):
        self.pools = pools
        self.size = pool_config.shared_connections
        self.max_bytes = pool_config.multiplex_max_bytes
        self.max_secs = pool_config.multiplex_max_time
        self.max_statements = max_statements
        self.lines: dict[tuple, list[SharedBackend]] = {}
        self.opening: dict[tuple, int] = {}
        self.failed: dict[tuple, float] = {}  # keys whose last connection attempt failed -> when to try again
        self.profiles = Profiles(self.max_bytes, self.max_secs)
        self.statements = 0  # commands answered over shared connections
        # (session, connection): the statement's PREPARE here was refused at the server's
        # max_prepared_stmt_count and its execute did not run; the session runs it on its own
        # connection (frontend/sharing.py prepare_refused)
        self.on_refused = None

    def reconfigure(self, pool_config, max_statements: int) -> None:
        """A reload: new limits for what may share and how many connections per key."""
        self.size = pool_config.shared_connections
        self.max_bytes = pool_config.multiplex_max_bytes
        self.max_secs = pool_config.multiplex_max_time
        self.max_statements = max_statements
        self.profiles.max_bytes, self.profiles.max_secs = self.max_bytes, self.max_secs

    def pick(self, server, key: tuple, password: str) -> SharedBackend | None:
        """The first shared connection with less than SPILL_AFTER of work queued; when all have
        more, the least loaded one unless a write is queued on each (EXCLUSIVE), and another is
        opened in the background (up to the limit)."""
        conns = self.lines.get(key)
        if conns:
            best = None
            for c in conns:
                if c.pending < SPILL_AFTER:
                    return c
                if best is None or c.pending < best.pending:
                    best = c
            if len(conns) + self.opening.get(key, 0) < self.size:
                self._open(server, key, password)
            return best if best.pending < EXCLUSIVE else None
        if not self.opening.get(key):
            self._open(server, key, password)
        return None

    def _open(self, server, key, password) -> None:
        again = self.failed.get(key)
        if again is not None:
            if _monotonic() < again:
                return
            del self.failed[key]
        pools = self.pools
        limit = pools.limit(server)
        if limit and pools.open_count[server.name] >= limit and not pools.make_room(server.name, shared=False):
            self.failed[key] = _monotonic() + FULL_RETRY
            # Sessions give back idle connections (they go to the pool, where the next try closes
            # one): a shared connection serves many sessions; the statement uses its own meanwhile.
            if pools.on_pressure is not None:
                pools.on_pressure(server.name, 1)
            return
        self.opening[key] = self.opening.get(key, 0) + 1
        pools.open_count[server.name] += 1
        asyncio.get_running_loop().create_task(self._connect(server, key, password))

    async def _connect(self, server, key, password) -> None:
        name, user, caps, charset, db, history = key
        pools = self.pools
        conn = None
        try:
            conn = await connect(server, key, caps, user, password, db, charset, pools.cfg.connect_timeout,
                                 pools.tls.get(name), factory=SharedBackend, net_buffer=pools.cfg.backend_net_buffer)
            await conn.replay(history, pools.cfg.connect_timeout)  # the SET/USE history every session of this key ran
            await conn.ensure_autocommit(1)  # (only autocommit statements share)
        except (BackendError, ConnectionError, OSError, asyncio.TimeoutError) as e:
            pools.uncount(name)
            pools.note_connect(name, user, False)
            if conn is not None:
                conn.close()
            self.failed[key] = _monotonic() + RETRY_AFTER
            log.info("shared connection to %s not opened: %s", name, clean(getattr(e, "message", None) or str(e), 256))
            return
        finally:
            self.opening[key] -= 1
        pools.note_connect(name, user, True)
        conn.lines = self
        conn.direct_ok = b"mariadb" in conn.server_version.lower()
        if conn.closed:
            pools.uncount(name)
            return
        conn.ready = True
        conn.done_at = _monotonic()
        global _call_soon
        _call_soon = asyncio.get_running_loop().call_soon
        self.lines.setdefault(key, []).append(conn)

    def open_per_key(self) -> dict[tuple, int]:
        """(server, user) -> open shared connections."""
        out: dict[tuple, int] = {}
        for key, conns in self.lines.items():
            out[key[:2]] = out.get(key[:2], 0) + len(conns)
        return out

    def open_per_server(self) -> dict[str, int]:
        """Open shared connections per server name (for `rwproxy status`)."""
        out: dict[str, int] = {}
        for key, conns in self.lines.items():
            out[key[0]] = out.get(key[0], 0) + len(conns)
        return out

    def expire_idle(self, limit: float) -> None:
        """Close shared connections nobody used for `limit` seconds (pool.idle_timeout)."""
        if not limit:
            return
        now = _monotonic()
        for key, conns in list(self.lines.items()):
            for c in list(conns):
                if not c.queue and now - c.done_at > limit:
                    conns.remove(c)
                    self._uncount(c)
                    c.close()
            if not conns:
                del self.lines[key]
        for key, when in list(self.failed.items()):
            if now > when:
                del self.failed[key]

    def shed(self, name: str) -> bool:
        """The pool is at its limit for `name`: close one of its shared connections with nothing
        queued (it opens again on demand). True if one was closed."""
        for key, conns in self.lines.items():
            if key[0] == name:
                for c in conns:
                    if not c.queue and not c.out:
                        conns.remove(c)
                        self._uncount(c)
                        c.close()
                        return True
        return False

    def forget_statements(self, name: str) -> int:
        """Server `name` refused a prepare for its max_prepared_stmt_count: close the statements
        this worker's shared connections keep prepared there. They are only a cache (up to
        routing.max_prepared_per_connection per connection), and a client connected to the server
        directly would not have them counted against it. How many were closed."""
        return sum(c.forget_statements() for key, conns in self.lines.items() if key[0] == name for c in conns)

    def forget(self, conn: SharedBackend) -> None:
        conns = self.lines.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)
            self._uncount(conn)

    def _uncount(self, conn: SharedBackend) -> None:
        self.pools.uncount(conn.server.name)

    def drop_server(self, name: str) -> None:
        """The server went down: end its shared connections (their reads are retried elsewhere)."""
        for key, conns in list(self.lines.items()):
            if key[0] == name:
                for c in list(conns):
                    c.transport.abort()

    def close_all(self) -> None:
        for conns in self.lines.values():
            for c in list(conns):
                c.close()


_DML = frozenset(("INSERT", "UPDATE", "DELETE", "REPLACE"))


def plain_dml(digest: str) -> bool:
    """An INSERT, UPDATE, DELETE or REPLACE (by the digest's first word): the only writes that may share."""
    return digest.split(None, 1)[0].upper() in _DML if digest else False


class Profiles:
    """Per digest: average service time, its floor, largest response, and whether it may share.

    [ewma seconds, max bytes, shareable, never, floor seconds, confirmed] -- `never` after a
    warning, or once a statement about the previous one (SHOW WARNINGS, ROW_COUNT()...) followed
    it, or for a write that is not plain DML. A write shares only once `confirmed`: a run of it on
    a session's own connection was followed by a statement that did not ask about it (confirm),
    since what a shared write leaves (ROW_COUNT(), its warnings) cannot be asked for afterwards,
    while a shared read can run again where the question goes.

    Whether a digest is fast enough to share is judged on its floor, not its average: the
    fastest recent service time, which drifts up by 2% of the gap with each slower sample. A
    proxy or server under load makes every statement look slow now and then (a 50 ms stall of the
    event loop lands on the responses read after it), and judging on the average made a point
    select flap in and out of sharing at 1,024 clients (30,000 of 230,000 statements a second
    took the slow path through the pool instead of a shared connection). A slow statement is
    slow every time: its floor is high from the start; one that becomes slow for good crosses
    the limit after a few dozen samples. The average is what queued work is estimated with.
    """

    LIMIT = 20000
    DRIFT = 0.02

    def __init__(self, max_bytes: int, max_secs: float):
        self.max_bytes = max_bytes
        self.max_secs = max_secs
        self.table: dict[str, list] = {}

    def shareable(self, digest: str) -> float | None:
        """The digest's average service time (s) if it may share a connection, else None."""
        p = self.table.get(digest)
        return p[0] if p is not None and p[2] else None

    def learn(self, digest: str, size: int, secs: float, warnings: bool, write: bool = False) -> bool:
        """One more answer of `digest`. True when it is a write waiting for confirm()."""
        p = self.table.get(digest)
        if p is None:
            if len(self.table) >= self.LIMIT:
                self.table.clear()
            # FOUND_ROWS() must find its connection; of writes, only INSERT/UPDATE/DELETE/REPLACE
            # share (not SELECT ... FOR UPDATE, DO, or anything else a WRITE route may hold)
            never = "SQL_CALC_FOUND_ROWS" in digest.upper() or (write and not plain_dml(digest))
            p = self.table[digest] = [secs, size, False, never, secs, not write]
        else:
            p[0] += (secs - p[0]) * _EWMA
            if size > p[1]:
                p[1] = size
            floor = p[4]
            p[4] = secs if secs < floor else floor + (secs - floor) * self.DRIFT
        if warnings:
            p[3] = True
        p[2] = p[5] and not p[3] and p[4] <= self.max_secs and p[1] <= self.max_bytes
        return not p[5] and not p[3]

    def confirm(self, digest: str) -> None:
        """The statement after a run of write `digest` did not ask about it: it may share."""
        p = self.table.get(digest)
        if p is not None and not p[5]:
            p[5] = True
            p[2] = not p[3] and p[4] <= self.max_secs and p[1] <= self.max_bytes

    def never(self, digest: str) -> None:
        p = self.table.get(digest)
        if p is not None:
            p[2], p[3] = False, True


__all__ = ["SharedBackend", "SharedLines", "Profiles", "plain_dml", "EXCLUSIVE"]
