"""The monitor's own MySQL client: asyncio, the text protocol, nothing else.

Why its own: the monitor runs ~40 queries a second at the default intervals (a check every
100 ms on each of three servers, a heartbeat write every 250 ms). Through PyMySQL a query cost
84-100 µs of CPU (its result object, field descriptors and type converters), a raw round trip
16 µs (docs/performance.md). Why asyncio: one monitor thread serves every server's checks and
heartbeats, each with its own timeouts (the idle CPU is the same as with a blocking thread per
server, 12-13 against 13.5-13.8 ms/s in alternating rounds: fewer wakeups, more per query).

It speaks what the monitor needs: the protocol-10 handshake with the auth plugins rwproxy's
backend connections speak (proxy.protocol.auth), TLS under the backend's policy
(backend/tls.py, upgraded with loop.start_tls), TCP or a Unix socket, timeouts. Rows come back
as tuples of str (None for NULL): the monitor converts the few values it uses. Server errors
are raised as pymysql.err.OperationalError(code, message), so the monitor's error handling
(sqlerrors.describe/error_code) reads them like PyMySQL's.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque

import pymysql

from proxy.backend.tls import DISABLED, CR_SSL_CONNECTION_ERROR, policies_for
from proxy.protocol import auth
from proxy.protocol.constants import (
    CLIENT_LONG_FLAG, CLIENT_LONG_PASSWORD, CLIENT_MULTI_RESULTS, CLIENT_MULTI_STATEMENTS, CLIENT_SSL,
    CLIENT_TRANSACTIONS, COM_QUERY, COM_QUIT, SERVER_MORE_RESULTS_EXISTS, SERVER_STATUS_AUTOCOMMIT,
)
from proxy.protocol.handshake import build_response, build_ssl_request, parse_greeting, response_caps
from proxy.protocol.packets import command, frame, packet_length, parse_err, read_lenenc_int, read_lenenc_str

UTF8MB4 = 45  # utf8mb4_general_ci
# Multi-statements: the heartbeat's write and the reading after it go in one round trip.
_CAPS = CLIENT_LONG_PASSWORD | CLIENT_LONG_FLAG | CLIENT_TRANSACTIONS | CLIENT_MULTI_STATEMENTS | CLIENT_MULTI_RESULTS
CR_SERVER_LOST = 2013
CR_CONN_HOST_ERROR = 2003


class WireError(pymysql.err.OperationalError):
    """An error from the server (its code and message) or from the connection (2003, 2013)."""


def _lost(what: str) -> WireError:
    return WireError(CR_SERVER_LOST, f"Lost connection to server: {what}")


class WireConnection(asyncio.Protocol):
    """One monitor connection; used by one coroutine at a time, on the loop that opened it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.server_version = ""
        self.read_timeout = 1.0
        self.seq = 0
        self._buf = bytearray()
        self._packets: deque[tuple[bytes, int]] = deque()
        self._waiter: asyncio.Future | None = None
        self._gone: Exception | None = None
        self._names: tuple[bytes, list[str]] = (b"", [])  # the last column definitions read, and their names
        # Called (no arguments, on the loop) when the server closes the connection or it breaks,
        # not when close() ends it: a dead server is noticed at once, not at the next check.
        self.on_lost = None

    # ---- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos, end = 0, len(buf)
        while end - pos >= 4:
            n = packet_length(buf, pos)
            if end - pos < 4 + n:
                break
            self._packets.append((bytes(buf[pos + 4:pos + 4 + n]), buf[pos + 3]))
            pos += 4 + n
        if pos:
            del buf[:pos]
        self._wake()

    def connection_lost(self, exc) -> None:
        self._gone = exc or ConnectionResetError("the server closed the connection")
        self._wake()
        told, self.on_lost = self.on_lost, None
        if told is not None:
            told()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # ---- what the monitor calls ------------------------------------------------------------
    @property
    def lost(self) -> bool:
        """The server closed it (or it broke) while nothing was asked."""
        return self._gone is not None

    def get_server_info(self) -> str:
        return self.server_version

    async def query(self, sql: str) -> list[tuple]:
        """Run `sql`; the rows of its (last) result, values as str, NULL as None; [] for none."""
        return (await self._query(sql))[1]

    async def query_dicts(self, sql: str) -> list[dict]:
        names, rows = await self._query(sql, True)
        return [dict(zip(names, r)) for r in rows]

    def close(self) -> None:
        self.on_lost = None
        t = self.transport
        if t is None or t.is_closing():
            return
        try:
            t.write(command(COM_QUIT))
        except Exception:
            pass
        t.close()

    # ---- the protocol ---------------------------------------------------------------------
    async def _query(self, sql: str, names: bool = False) -> tuple[list[str], list[tuple]]:
        """Send `sql` (one statement, or several separated by ';'); the last result's column names
        (when asked for) and rows."""
        packet = command(COM_QUERY, sql.encode())
        try:
            async with asyncio.timeout(self.read_timeout):
                if self._gone is not None:
                    raise self._gone
                self.transport.write(packet)
                while True:
                    cols, rows, status = await self._result(names)
                    if not status & SERVER_MORE_RESULTS_EXISTS:
                        return cols, rows
        except TimeoutError:
            raise _lost("timed out waiting for the server's answer") from None
        except WireError:
            raise
        except OSError as e:
            raise _lost(str(e)) from None
        except (IndexError, ValueError, TypeError):
            raise _lost("malformed answer") from None

    async def _result(self, names: bool) -> tuple[list[str], list[tuple], int]:
        first = await self.packet()
        head = first[0]
        if head == 0xFF:
            code, _state, msg = parse_err(first)
            raise WireError(code, msg)
        if head == 0x00:
            _, pos = read_lenenc_int(first, 1)
            _, pos = read_lenenc_int(first, pos)
            return [], [], first[pos] | first[pos + 1] << 8
        ncols, _ = read_lenenc_int(first, 0)
        defs = [await self.packet() for _ in range(ncols or 0)]
        cols = self._column_names(defs) if names else []
        await self.packet()  # EOF after the column definitions (CLIENT_DEPRECATE_EOF is not asked for)
        rows = []
        while True:
            p = await self.packet()
            if p[0] == 0xFE and len(p) < 9:
                return cols, rows, p[3] | p[4] << 8
            if p[0] == 0xFF:
                code, _state, msg = parse_err(p)
                raise WireError(code, msg)
            row = []
            pos = 0
            for _ in range(ncols):
                if p[pos] == 0xFB:
                    row.append(None)
                    pos += 1
                else:
                    v, pos = read_lenenc_str(p, pos)
                    row.append(v.decode("utf-8", "replace"))
            rows.append(tuple(row))

    def _column_names(self, defs: list[bytes]) -> list[str]:
        """The columns' names; only SHOW ALL SLAVES STATUS asks (the checks read by position), and
        its 60-odd definitions are the same every time: decoded once per connection."""
        key = b"".join(defs)
        if key != self._names[0]:
            cols = []
            for col in defs:
                pos = 0
                for _skip in range(4):  # catalog, schema, table, org_table
                    _, pos = read_lenenc_str(col, pos)
                name, _ = read_lenenc_str(col, pos)
                cols.append(name.decode("utf-8", "replace"))
            self._names = (key, cols)
        return self._names[1]

    async def packet(self) -> bytes:
        """The next packet's payload (large packets are not expected by the monitor)."""
        while not self._packets:
            if self._gone is not None:
                raise self._gone
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        payload, self.seq = self._packets.popleft()
        return payload

    def send_packet(self, payload: bytes, seq: int) -> None:
        self.transport.write(frame(payload, seq))


async def connect(config, backend, user: str, password: str, connect_timeout: float,
                  read_timeout: float) -> WireConnection:
    """A monitor connection to `backend` (a BackendConfig) under its TLS policy."""
    tls = policies_for(config).get(backend.name)
    loop = asyncio.get_running_loop()
    conn = WireConnection()
    try:
        async with asyncio.timeout(connect_timeout):
            try:
                if backend.socket:
                    await loop.create_unix_connection(lambda: conn, backend.socket)
                else:
                    transport, _ = await loop.create_connection(lambda: conn, backend.host, backend.port)
                    sock = transport.get_extra_info("socket")
                    if sock is not None:
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as e:
                raise WireError(CR_CONN_HOST_ERROR, f"Can't connect to server on {backend.where} ({e})") from None
            await _handshake(conn, loop, backend, tls, user, password)
        conn.read_timeout = read_timeout
        return conn
    except TimeoutError:
        conn.close()
        if conn.transport is None:
            raise WireError(CR_CONN_HOST_ERROR, f"Can't connect to server on {backend.where} (timed out)") from None
        raise _lost("timed out during the handshake") from None
    except WireError:
        conn.close()
        raise
    except (OSError, IndexError, ValueError) as e:
        conn.close()
        raise _lost(f"during the handshake: {e}") from None


async def _handshake(conn: WireConnection, loop, backend, tls, user: str, password: str) -> None:
    g = parse_greeting(await conn.packet())
    conn.server_version = g.server_version.decode("utf-8", "replace")
    caps = _CAPS & g.capabilities
    seq = conn.seq
    if tls is not None and tls.mode != DISABLED:
        if g.capabilities & CLIENT_SSL:
            caps |= CLIENT_SSL
            seq += 1
            conn.send_packet(build_ssl_request(response_caps(caps, None, None), UTF8MB4), seq)
            conn.transport = await loop.start_tls(conn.transport, conn, tls.context, server_hostname=tls.hostname)
        elif tls.required:
            raise WireError(CR_SSL_CONNECTION_ERROR, f"TLS to backend {backend.name} is required (backend_tls mode "
                            f"{tls.mode}) but the server does not offer it")
    plugin = g.plugin if g.plugin in auth.BACKEND else auth.NATIVE
    conn.send_packet(build_response(caps, UTF8MB4, user, auth.token_for(plugin, password, g.salt), None, plugin), seq + 1)
    while True:
        p = await conn.packet()
        if p[0] == 0x00:
            break
        if p[0] == 0xFF:
            code, _state, msg = parse_err(p)
            raise WireError(code, msg)
        if p[0] == 0xFE:  # auth switch
            end = p.index(b"\x00", 1)
            plugin = p[1:end].decode()
            if plugin not in auth.BACKEND:
                raise WireError(1251, f"the server asks for the unsupported auth plugin {plugin}")
            conn.send_packet(auth.token_for(plugin, password, p[end + 1:]), conn.seq + 1)
        else:
            raise WireError(1251, f"unexpected packet 0x{p[0]:02x} during authentication")
    if not g.status & SERVER_STATUS_AUTOCOMMIT:
        await conn.query("SET autocommit=1")


def quote(value: str) -> str:
    """A string literal for SQL the monitor builds itself (backend names)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''").replace("\x00", "\\0") + "'"
