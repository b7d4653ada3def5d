"""One connection from the proxy to a backend MariaDB/MySQL server.

Two modes. While connecting (and for the proxy's own small commands such as
COM_RESET_CONNECTION or a PREPARE whose id must be rewritten) responses are
collected and handed to a coroutine. While relaying a client's command, every
chunk read from the server is fed to the response scanner and written straight
to the client's transport: no packet objects, no copies, no decoding.
"""

from __future__ import annotations

import asyncio
import logging
import select
import ssl
import time

from proxy.backend.tls import CR_SSL_CONNECTION_ERROR, DISABLED
from proxy.protocol import auth, tracking
from proxy.protocol.constants import (
    CLIENT_CONNECT_ATTRS,
    CLIENT_DEPRECATE_EOF,
    CLIENT_LONG_PASSWORD,
    CLIENT_PLUGIN_AUTH,
    CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA,
    CLIENT_PROTOCOL_41,
    CLIENT_SECURE_CONNECTION,
    CLIENT_SSL,
    CLIENT_TRANSACTIONS,
    COM_INIT_DB,
    COM_QUERY,
    COM_QUIT,
    COM_RESET_CONNECTION,
    ER_UNKNOWN_ERROR,
    MARIADB_CLIENT_STMT_BULK_OPERATIONS,
    SERVER_STATUS_AUTOCOMMIT,
)
from proxy.protocol.handshake import build_response, build_ssl_request, parse_greeting, response_caps
from proxy.protocol.packets import ProtocolError, command, frame, packet_length, parse_err, parse_ok
from proxy.protocol.scan import RESULT, SIMPLE, Scanner

log = logging.getLogger("rwproxy.backend")

# Flags the proxy always asks of a backend, on top of the client's session-shaping ones.
BASE_BACKEND_CAPS = (
    CLIENT_LONG_PASSWORD
    | CLIENT_PROTOCOL_41
    | CLIENT_TRANSACTIONS
    | CLIENT_SECURE_CONNECTION
    | CLIENT_PLUGIN_AUTH
    | CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
    | CLIENT_CONNECT_ATTRS
    | MARIADB_CLIENT_STMT_BULK_OPERATIONS  # (changes nothing but allowing COM_STMT_BULK_EXECUTE)
)

_SET_AUTOCOMMIT = (command(COM_QUERY, b"SET autocommit=0"), command(COM_QUERY, b"SET autocommit=1"))
# Idle time after which a write first polls the connection for a close (see peer_gone).
PEER_CHECK_IDLE = 0.002
_monotonic = time.monotonic

# Scanner kinds for the relay path are module-level ints for speed.
_MODE_COLLECT = 0
_MODE_RELAY = 1


class BackendError(Exception):
    """A backend could not be reached or refused us; `err` is a ready (code, sqlstate, msg)."""

    def __init__(self, code: int, sqlstate: str, message: str):
        super().__init__(message)
        self.code = code
        self.sqlstate = sqlstate
        self.message = message

    @property
    def unavailable(self) -> bool:
        """Down, unreachable or full (1040): the server could not take a connection just now, which
        says nothing about the user or the database (at login, reads go on on the replicas)."""
        return self.code in (2003, 2013, 1040)


class BackendConnection(asyncio.Protocol):
    __slots__ = (
        "server",
        "key",
        "caps",
        "transport",
        "scanner",
        "mode",
        "client",
        "db",
        "closed",
        "last_used",
        "thread_id",
        "server_version",
        "_buf",
        "_waiter",
        "_collect",
        "stalled",
        "relayed",
        "dirty",
        "db_touched",
        "applied",
        "done_at",
        "_poll",
        "hold",
        "gtid_tracked",
        "status",
    )

    def __init__(self, server, key, caps: int):
        self.server = server  # a BackendConfig-like object with .name .host .port
        self.key = key
        self.caps = caps
        self.transport = None
        self.scanner = Scanner(bool(caps & CLIENT_DEPRECATE_EOF))
        self.mode = _MODE_COLLECT
        self.client = None
        self.db = None
        self.closed = False
        self.last_used = time.monotonic()
        self.thread_id = 0
        self.server_version = b""
        self._buf = bytearray()
        self._waiter: asyncio.Future | None = None
        self._collect = False
        self.stalled = None  # the client whose reading this connection's full write buffer paused
        self.relayed = 0  # bytes of the current response already sent to the client
        self.dirty = False  # session options a reset does not undo (COM_SET_OPTION)
        self.db_touched = False  # the client may have changed the current database
        self.applied = 0  # how many entries of the owning session's history this connection carries
        self.done_at = 0.0  # monotonic time the last relayed response ended (0: none yet)
        self._poll = None
        # Session tracking negotiated for the proxy's sake only (protocol/tracking.py): each
        # response's last bytes are held back so its final OK's session state can be stripped.
        self.hold: bytearray | None = None
        self.gtid_tracked = False  # its OK packets report last_gtid (read-your-writes in gtid mode)
        self.status = SERVER_STATUS_AUTOCOMMIT  # of its login's or last reset's OK: autocommit is the global then

    # ---- asyncio.Protocol -------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=256 * 1024)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._poll = select.poll()
            self._poll.register(sock.fileno(), select.POLLIN | select.POLLRDHUP)

    def peer_gone(self) -> bool:
        """True if an idle connection has something to read: the server hung up (or sent an
        unsolicited error before closing). Checked before sending a write, so that a write
        never goes into a connection the server already closed but the loop has not yet seen
        closing; costs one poll(2) with a zero timeout.

        A connection whose last response ended less than PEER_CHECK_IDLE ago is not polled
        (False): a close in that window is the same race as a close just after our write, and
        skipping the syscall saves ~0.5 us per statement of a busy session."""
        p = self._poll
        return p is not None and _monotonic() - self.done_at >= PEER_CHECK_IDLE and bool(p.poll(0))

    def data_received(self, data):
        if self.mode == _MODE_RELAY:
            n = self.scanner.feed(data)
            client = self.client
            if client is not None:
                if n >= 0 and n != len(data):  # bytes past the end of the response (rare path)
                    return self._surplus(data, n, client)
                if self.hold is not None:
                    data = self._held(data, n)
                client.transport.write(data)
                self.relayed += len(data)
                if n >= 0:
                    self.mode = _MODE_COLLECT
                    self.done_at = _monotonic()
                    client.command_done(self)
            return
        self._buf += data
        if self._collect:
            n = self.scanner.feed(data)
            if n >= 0:
                self._collect = False
                self._wake(bytes(self._buf))
                self._buf.clear()
        elif self._waiter is not None:
            self._wake(None)

    def _held(self, data, n: int) -> bytes:
        """Relay all but the response's last HOLD bytes; at its end, the rest with the final OK
        packet's session state stripped (a client that did not negotiate session tracking)."""
        h = self.hold
        h += data
        if n < 0:
            if len(h) <= tracking.HOLD:
                return b""
            out = bytes(h[:-tracking.HOLD])
            del h[:-tracking.HOLD]
            return out
        out = bytes(h)
        h.clear()
        return tracking.rewrite_tail(out, self.scanner.final)

    def _surplus(self, data, n: int, client) -> None:
        """A chunk that ends the response and carries more: the response is relayed and finished,
        the surplus never reaches the client, and the connection is closed as out of step. (Apart
        from data_received's relay so that its common path pays one comparison for this.)"""
        data = data[:n]
        if self.hold is not None:
            data = self._held(data, n)
        client.transport.write(data)
        self.relayed += len(data)
        self.mode = _MODE_COLLECT
        self.done_at = _monotonic()
        client.command_done(self)
        self.out_of_step("after the end of a response")

    def out_of_step(self, where: str) -> None:
        """The server sent bytes no command of ours asked for: whatever comes next on this
        connection would be read as the answer to the wrong command, so it is closed (the
        session opens another and replays its state, or says what was lost)."""
        log.warning("connection to %s (thread %d): unexpected bytes from the server %s; closing it",
                    self.server.name, self.thread_id, where)
        self.transport.abort()

    def connection_lost(self, exc):
        self.closed = True
        if self.hold is not None:
            self.hold.clear()
        client = self.client
        if self.mode == _MODE_RELAY and client is not None:
            self.mode = _MODE_COLLECT
            client.command_lost(self, self.relayed)
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(ConnectionError(f"lost connection to backend {self.server.name}"))
        self._waiter = None
        self.resume_writing()  # (a server that closes while its write buffer is full never drains it)

    def pause_writing(self):
        # The backend is slower than the client's upload (LOAD DATA, big blobs).
        if self.client is not None:
            self.stalled = self.client
            self.client.transport.pause_reading()

    def resume_writing(self):
        """The client this connection stalled reads again: its write buffer drained, or the server
        closed it (after refusing a packet over its max_allowed_packet with 1153, mid-send)."""
        client, self.stalled = self.stalled, None
        if client is not None and not client.closed and not client.reader.paused:
            client.transport.resume_reading()

    # ---- relay path -------------------------------------------------------
    def relaying_for(self, client) -> bool:
        """True while this connection streams `client`'s command's response (mid-statement)."""
        return self.client is client and self.mode == _MODE_RELAY and not self.closed

    def relay(self, packet, kind: int, client) -> None:
        """Send a client's command and stream the response to it (no await)."""
        self.client = client
        if self.hold:
            self.hold.clear()
        self.scanner.start(kind)
        self.mode = _MODE_RELAY
        self.relayed = 0
        self.transport.write(packet)

    def expect(self, kind: int, client) -> None:
        """Relay a response that follows bytes the client already sent (LOCAL INFILE data)."""
        self.client = client
        self.scanner.start(kind)
        self.mode = _MODE_RELAY

    # ---- collected commands -------------------------------------------------
    def _wake(self, value):
        w = self._waiter
        self._waiter = None
        if w is not None and not w.done():
            w.set_result(value)

    async def command(self, packet: bytes, kind: int = SIMPLE, timeout: float | None = None) -> bytes:
        """Send a command and return its whole response (framed bytes)."""
        if self.closed:
            raise ConnectionError(f"backend connection to {self.server.name} is closed")
        self.mode = _MODE_COLLECT
        self.scanner.start(kind)
        self._collect = True
        self._buf.clear()
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(packet)
        if timeout is None:
            return await self._waiter
        return await asyncio.wait_for(self._waiter, timeout)

    async def _read_packet(self, timeout: float) -> tuple[int, bytes]:
        """Handshake-phase packet reader (single physical packets only)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            buf = self._buf
            if len(buf) >= 4:
                n = packet_length(buf)
                if len(buf) >= 4 + n:
                    seq = buf[3]
                    payload = bytes(buf[4 : 4 + n])
                    del buf[: 4 + n]
                    return seq, payload
            if self.closed:
                raise ConnectionError("connection closed during handshake")
            self._waiter = loop.create_future()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise asyncio.TimeoutError()
            await asyncio.wait_for(self._waiter, remaining)

    async def _start_tls(self, tls, caps: int, charset: int, seq: int, timeout: float) -> None:
        """SSL request, then the TLS handshake on this connection; the login continues encrypted."""
        self.transport.write(frame(build_ssl_request(caps, charset), seq))
        loop = asyncio.get_running_loop()
        try:
            self.transport = await loop.start_tls(self.transport, self, tls.context, server_hostname=tls.hostname,
                                                  ssl_handshake_timeout=timeout)
        except ssl.SSLCertVerificationError as e:
            raise BackendError(CR_SSL_CONNECTION_ERROR, "HY000", f"TLS to backend {self.server.name} failed: certificate verify "
                               f"failed: {e.verify_message} (backend_tls mode {tls.mode})")
        except (ssl.SSLError, ConnectionError, OSError) as e:
            raise BackendError(CR_SSL_CONNECTION_ERROR, "HY000", f"TLS to backend {self.server.name} failed: {e}")
        self.transport.set_write_buffer_limits(high=256 * 1024)

    async def handshake(self, user: str, password: str, db: str | None, charset: int, timeout: float,
                        tls=None) -> None:
        seq, payload = await self._read_packet(timeout)
        g = parse_greeting(payload)
        self.server_version = g.server_version
        self.thread_id = g.connection_id
        caps = (self.caps | BASE_BACKEND_CAPS) & (g.capabilities | CLIENT_CONNECT_ATTRS)
        attrs = {"_client_name": "rwproxy", "program_name": "rwproxy"}
        if tls is not None and tls.mode != DISABLED:
            if g.capabilities & CLIENT_SSL:
                caps |= CLIENT_SSL
                seq += 1
                await self._start_tls(tls, response_caps(caps, db, attrs), charset, seq, timeout)
            elif tls.required:
                raise BackendError(CR_SSL_CONNECTION_ERROR, "HY000", f"TLS to backend {self.server.name} is required (backend_tls "
                                   f"mode {tls.mode}) but the server does not offer it (have_ssl is not YES there)")
        plugin = g.plugin or auth.NATIVE
        if plugin not in auth.SUPPORTED or isinstance(password, auth.Stage1):
            plugin = auth.NATIVE
        token = auth.token_for(plugin, password, g.salt)
        resp = build_response(caps, charset, user, token, db, plugin, attrs)
        self.transport.write(frame(resp, seq + 1))
        salt = g.salt
        while True:
            seq, payload = await self._read_packet(timeout)
            first = payload[0] if payload else 0
            if first == 0x00:
                self.db = db
                self.status = parse_ok(payload).status
                return
            if first == 0xFF:
                code, state, msg = parse_err(payload)
                raise BackendError(code, state, msg)
            if first == 0xFE:  # auth switch request
                name_end = payload.index(b"\x00", 1)
                plugin = payload[1:name_end].decode()
                salt = payload[name_end + 1 :]  # kept whole: each plugin takes its length (ed25519's may end in 0x00)
                if plugin not in auth.BACKEND:
                    raise BackendError(1251, "08004", f"backend asks for unsupported auth plugin {plugin}")
                try:
                    answer = auth.token_for(plugin, password, salt)
                except ValueError as e:  # a Stage1 (server account) and a plugin that needs the password
                    raise BackendError(1251, "08004", f"backend {self.server.name}: {e}") from None
                self.transport.write(frame(answer, seq + 1))
            elif first == 0x01:  # caching_sha2 more data
                if payload[1:2] == auth.SHA2_FAST_AUTH_OK:
                    continue
                raise BackendError(
                    2061, "HY000", f"backend {self.server.name} requires caching_sha2 full authentication over TLS"
                )
            else:
                raise ProtocolError(f"unexpected packet 0x{first:02x} during backend authentication")

    async def replay(self, history, timeout: float | None = None) -> None:
        """Bring this connection up to a session's SET/USE history (raw command packets, in
        order); `applied` counts the entries it already carries."""
        while self.applied < len(history):
            packet = history[self.applied]
            resp = await self.command(packet, RESULT, timeout)
            if resp[4] == 0xFF:
                code, state, msg = parse_err(resp[4:])
                raise BackendError(ER_UNKNOWN_ERROR[0], "HY000", f"could not replay session state on "
                                   f"{self.server.name} ({bytes(packet[5:60])!r}...): {msg} ({code})")
            if packet[4] == COM_INIT_DB or packet[5:8].lower() == b"use":
                self.db_touched = True
            self.applied += 1

    async def reset(self, db: str | None = None) -> bool:
        """COM_RESET_CONNECTION: make the session state clean for the next client. With `db`,
        COM_INIT_DB of it goes in the same write (the reset keeps the database but sets
        @@collation_database to the server's default, not that database's): two answers for
        one round trip."""
        pkt = command(COM_RESET_CONNECTION)
        if db is not None:
            pkt += command(COM_INIT_DB, db.encode())
        try:
            resp = await self.command(pkt, timeout=5)
            end = 4 + packet_length(resp, 0)  # (an OK or ERR: one packet)
            ok = resp[4] == 0x00
            if ok:
                self.dirty = False
                self.status = parse_ok(resp[4:end]).status
            if db is not None:
                ok = (await self._next_answer(resp[end:], 5))[4] == 0x00 and ok
                self.db, self.db_touched = db, db != self.key[4]
        except (ConnectionError, asyncio.TimeoutError, IndexError):
            return False
        return ok

    async def _next_answer(self, early: bytes, timeout: float) -> bytes:
        """The OK or ERR that follows the response command() just returned, for a second command
        sent in the same write; `early`: its bytes that came with that response."""
        self._buf[:0] = early  # (after that response, data_received keeps what arrives in _buf)
        self.scanner.start(SIMPLE)
        if self._buf and self.scanner.feed(bytes(self._buf)) >= 0:
            out = bytes(self._buf)
            self._buf.clear()
            return out
        self._collect = True
        self._waiter = asyncio.get_running_loop().create_future()
        return await asyncio.wait_for(self._waiter, timeout)

    async def ensure_autocommit(self, on) -> None:
        """Autocommit as the session using it has it (the servers' global value may be off)."""
        if bool(on) == bool(self.status & SERVER_STATUS_AUTOCOMMIT):
            return
        resp = await self.command(_SET_AUTOCOMMIT[1 if on else 0], RESULT)
        if resp[4] == 0xFF:
            raise BackendError(ER_UNKNOWN_ERROR[0], "HY000", f"could not set autocommit on {self.server.name}")
        self.status ^= SERVER_STATUS_AUTOCOMMIT

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            try:
                self.transport.write(command(COM_QUIT))
            except Exception:
                pass
            self.transport.close()
        self.closed = True
