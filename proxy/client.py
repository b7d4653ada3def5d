"""One client session: handshake, then commands relayed to backends.

The command path is synchronous on purpose: a COM_QUERY or COM_STMT_EXECUTE
arriving for a session whose backend connection is open is written to that
backend inside data_received, and the response flows back through
BackendConnection.data_received. Coroutines are used only for the rare slow
paths (handshake, first connection to a backend, PREPARE id rewriting,
COM_CHANGE_USER, COM_RESET_CONNECTION).
"""

from __future__ import annotations

import asyncio
import logging
import ssl

from .backend import BackendError
from .login import AccessDenied, parse_change_user
from .protocol import auth
from .protocol.constants import (
    CLIENT_SSL,
    COM_CHANGE_USER,
    COM_FIELD_LIST,
    COM_INIT_DB,
    COM_PING,
    COM_PROCESS_KILL,
    COM_QUERY,
    COM_QUIT,
    COM_RESET_CONNECTION,
    COM_SET_OPTION,
    COM_STATISTICS,
    COM_STMT_CLOSE,
    COM_STMT_EXECUTE,
    COM_STMT_FETCH,
    COM_STMT_PREPARE,
    COM_STMT_RESET,
    COM_STMT_SEND_LONG_DATA,
    CR_SERVER_LOST,
    ER_ACCESS_DENIED_ERROR,
    ER_HANDSHAKE_ERROR,
    ER_SECURE_TRANSPORT_REQUIRED,
    ER_UNKNOWN_COM_ERROR,
    ER_UNKNOWN_STMT_HANDLER,
    MAX_PACKET,
    PROXY_CAPABILITIES,
    SERVER_STATUS_AUTOCOMMIT,
    SESSION_SHAPING_CAPABILITIES,
)
from .protocol.handshake import build_greeting, parse_response
from .protocol.packets import ProtocolError, err_packet, err_payload, frame, ok_packet
from .tls import TLSLayer
from .protocol.scan import FIELD_LIST, PREPARE, RESULT, ROWS, SIMPLE, STATISTICS

log = logging.getLogger("rwproxy.client")

_HANDSHAKE, _COMMAND, _CLOSING = 0, 1, 2

# Commands relayed as-is to the session's backend, with the response kind to scan.
_RELAY_KIND = {
    COM_QUERY: RESULT,
    COM_FIELD_LIST: FIELD_LIST,
    COM_STATISTICS: STATISTICS,
    COM_PROCESS_KILL: SIMPLE,
}
# Statement commands: (response kind or None for no response).
_STMT_KIND = {
    COM_STMT_EXECUTE: RESULT,
    COM_STMT_FETCH: ROWS,
    COM_STMT_RESET: SIMPLE,
    COM_STMT_SEND_LONG_DATA: None,
    COM_STMT_CLOSE: None,
}


class ClientConnection(asyncio.Protocol):
    def __init__(self, worker, conn_id: int):
        self.worker = worker
        self.conn_id = conn_id
        self.transport = None
        self.phase = _HANDSHAKE
        self.buf = b""
        self.busy = False
        self.closed = False
        self.host = "?"
        self.tls = False
        self.tls_layer = None
        self.salt = b""
        self.user = None  # UserConfig once authenticated
        self.caps = 0
        self.charset = 45
        self.db: str | None = None
        self.status = SERVER_STATUS_AUTOCOMMIT
        self.backends: dict[str, object] = {}  # server name -> BackendConnection
        self.stmts: dict[int, tuple] = {}  # client stmt id -> (backend, backend stmt id)
        self.next_stmt_id = 1
        self.infile_backend = None
        self._if_hdr = b""
        self._if_skip = 0
        self._if_prev = 0
        self._pkt_waiter: asyncio.Future | None = None

    # ---- transport events -----------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self.host = peer[0]
        transport.set_write_buffer_limits(high=256 * 1024)
        if not self.worker.admit(self):
            transport.write(err_packet(0, (1040, b"08004"), "Too many connections"))
            transport.close()
            self.closed = True
            return
        self.worker.loop.create_task(self._handshake())

    def data_received(self, data):
        if self.tls_layer is not None:
            try:
                data = self.tls_layer.feed(data)
            except ssl.SSLError as e:
                log.info("client %s: TLS error: %s", self.host, e)
                return self._close()
            if not data:
                return
        if self.infile_backend is not None:
            self._infile_feed(data)
            return
        if self.buf:
            if type(self.buf) is bytes:
                self.buf = bytearray(self.buf)
            self.buf += data
        else:
            self.buf = data
        if self.phase == _COMMAND and not self.busy:
            self._process()
        elif self._pkt_waiter is not None:
            self._deliver_packet()

    def connection_lost(self, exc):
        self.closed = True
        self.phase = _CLOSING
        w = self._pkt_waiter
        if w is not None and not w.done():
            w.set_exception(ConnectionError("client closed the connection"))
        self._release_all()
        self.worker.forget(self)

    def pause_writing(self):
        # Backpressure: a slow client stops us reading from its backends.
        for be in self.backends.values():
            if be.client is self and not be.closed:
                be.transport.pause_reading()

    def resume_writing(self):
        for be in self.backends.values():
            if be.client is self and not be.closed:
                be.transport.resume_reading()

    # ---- packet reading for the slow paths ------------------------------------
    def _take_packet(self):
        """Pop one logical packet (raw, headers included) from the buffer, or None."""
        buf = self.buf
        blen = len(buf)
        if blen < 4:
            return None
        n = buf[0] | (buf[1] << 8) | (buf[2] << 16)
        end = 4 + n
        if n == MAX_PACKET:
            end = 0
            while True:  # a split packet: find the physical packet shorter than 16 MiB - 1
                if blen < end + 4:
                    return None
                m = buf[end] | (buf[end + 1] << 8) | (buf[end + 2] << 16)
                end += 4 + m
                if m < MAX_PACKET:
                    break
        if blen < end:
            return None
        if end == blen:
            self.buf = b""
            return buf if type(buf) is bytes else bytes(buf)
        pkt = bytes(buf[:end])
        self.buf = buf[end:]
        return pkt

    def _deliver_packet(self):
        pkt = self._take_packet()
        if pkt is not None:
            w = self._pkt_waiter
            self._pkt_waiter = None
            if not w.done():
                w.set_result(pkt)

    async def read_packet(self, timeout: float = 30.0) -> tuple[int, bytes]:
        """Return (seq, payload) of the next client packet (slow paths only)."""
        pkt = self._take_packet()
        if pkt is None:
            if self.closed:
                raise ConnectionError("client closed the connection")
            self._pkt_waiter = self.worker.loop.create_future()
            pkt = await asyncio.wait_for(self._pkt_waiter, timeout)
        return pkt[3], _payload(pkt)

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    # ---- handshake -------------------------------------------------------------
    async def _handshake(self):
        w = self.worker
        try:
            self.salt = auth.nonce()
            offered = PROXY_CAPABILITIES | (CLIENT_SSL if w.tls_context else 0)
            greeting = build_greeting(
                w.server_version, self.conn_id, self.salt, offered, 45, SERVER_STATUS_AUTOCOMMIT, w.auth_plugin
            )
            self.write(frame(greeting, 0))
            seq, payload = await self.read_packet(w.config.pool.connect_timeout + 8)
            resp = parse_response(payload)
            if resp.ssl_request:
                if not w.tls_context:
                    raise ProtocolError("client asked for TLS, which is not configured")
                # Bytes after the SSL request (the ClientHello) are TLS, not packets.
                early, self.buf = self.buf, b""
                self.tls_layer = self.transport = TLSLayer(self.transport, w.tls_context)
                self.tls = True
                if early:
                    self.data_received(early)
                seq, payload = await self.read_packet(10)
                resp = parse_response(payload)
            seq += 1
            if w.config.proxy.tls.require and not self.tls:
                self.write(err_packet(seq, ER_SECURE_TRANSPORT_REQUIRED, "Connections using insecure transport are prohibited while --require_secure_transport=ON."))
                return self._close()
            self.caps = resp.capabilities & (offered | SESSION_SHAPING_CAPABILITIES) & PROXY_CAPABILITIES
            self.charset = resp.charset
            try:
                self.user, seq = await w.authenticator.login(
                    self, resp.user, resp.plugin, resp.auth_response, self.salt, seq, self.host, self.tls
                )
            except AccessDenied as e:
                log.info("client %s: %s", self.host, e)
                self.write(err_packet(e.seq, ER_ACCESS_DENIED_ERROR, str(e), self.caps))
                return self._close()
            if self.user.require_tls and not self.tls:
                msg = f"Access denied for user '{self.user.name}'@'{self.host}': this user must connect with TLS"
                self.write(err_packet(seq, ER_ACCESS_DENIED_ERROR, msg, self.caps))
                return self._close()
            self.db = resp.database
            try:
                await self.primary_backend()
            except BackendError as e:
                self.write(frame(err_payload(e.code, e.sqlstate.encode(), e.message), seq))
                return self._close()
            self.write(ok_packet(seq, self.status))
            self.phase = _COMMAND
            if self.buf:
                self._process()
        except (ProtocolError, ValueError, IndexError) as e:
            self.write(err_packet(2, ER_HANDSHAKE_ERROR, f"Bad handshake: {e}"))
            self._close()
        except (ConnectionError, asyncio.TimeoutError, OSError):
            self._close()

    # ---- command dispatch (the hot path) ---------------------------------------
    def _process(self):
        while not self.busy and not self.closed:
            pkt = self._take_packet()
            if pkt is None:
                return
            cmd = pkt[4] if len(pkt) > 4 else -1
            kind = _RELAY_KIND.get(cmd)
            if kind is not None:
                be = self.backends.get(self.worker.primary_name)
                if cmd == COM_QUERY and pkt[5:8].lower() == b"use" and be is not None:
                    be.db_touched = True  # USE db: the pool must restore the database
                if be is not None and not be.closed:
                    self.busy = True
                    be.relay(pkt, kind, self)
                else:
                    self._spawn(self._relay_after_connect(pkt, kind))
                continue
            skind = _STMT_KIND.get(cmd, -1)
            if skind != -1:
                self._stmt_command(pkt, cmd, skind)
            else:
                self._other_command(pkt, cmd)

    def response_done(self, be):
        """Called by the backend when a relayed response is complete."""
        sc = be.scanner
        if sc.local_infile:
            self.infile_backend = be  # the client now streams the file to this backend
            self._if_hdr, self._if_skip, self._if_prev = b"", 0, 0
            return
        if not sc.error:
            self.status = sc.status
        self.busy = False
        if self.buf and not self.closed:
            self._process()

    def _stmt_command(self, pkt, cmd, kind):
        sid = int.from_bytes(pkt[5:9], "little") if len(pkt) >= 9 else -1
        entry = self.stmts.get(sid)
        if entry is None or entry[0].closed:
            if kind is not None:  # commands without a response get no error either
                self.write(err_packet(1, ER_UNKNOWN_STMT_HANDLER, f"Unknown prepared statement handler ({sid}) given to mysqld_stmt_{_STMT_NAMES[cmd]}"))
            return
        be, bid = entry
        if bid != sid:
            pkt = pkt[:5] + bid.to_bytes(4, "little") + pkt[9:]
        if cmd == COM_STMT_CLOSE:
            del self.stmts[sid]
        if kind is None:
            be.transport.write(pkt)
        else:
            self.busy = True
            be.relay(pkt, kind, self)

    def _other_command(self, pkt, cmd):
        if cmd == COM_PING:
            self.write(ok_packet(1, self.status))
        elif cmd == COM_QUIT:
            self._close()
        elif cmd == COM_STMT_PREPARE:
            self._spawn(self._prepare(pkt))
        elif cmd == COM_INIT_DB:
            self._spawn(self._init_db(pkt))
        elif cmd == COM_SET_OPTION:
            self._spawn(self._set_option(pkt))
        elif cmd == COM_CHANGE_USER:
            self._spawn(self._change_user(pkt))
        elif cmd == COM_RESET_CONNECTION:
            self._spawn(self._reset_connection())
        else:
            self.write(err_packet(1, ER_UNKNOWN_COM_ERROR, f"Unknown command (0x{cmd & 0xFF:02x}): not supported by rwproxy"))

    # ---- LOAD DATA LOCAL INFILE ------------------------------------------------
    def _infile_feed(self, data):
        """Forward the client's file packets until the empty packet that ends them."""
        be = self.infile_backend
        be.transport.write(data)
        i, n, hdr = self._if_skip, len(data), self._if_hdr
        while i < n:
            need = 4 - len(hdr)
            hdr += data[i : i + need]
            i += need
            if len(hdr) < 4:
                break
            ln = hdr[0] | (hdr[1] << 8) | (hdr[2] << 16)
            hdr = b""
            if ln == 0 and self._if_prev != MAX_PACKET:
                self.infile_backend = None
                be.expect(RESULT, self)
                return
            self._if_prev = ln
            i += ln
        self._if_skip = i - n if i > n else 0
        self._if_hdr = hdr

    # ---- slow paths ------------------------------------------------------------
    def _spawn(self, coro):
        self.busy = True
        self.worker.loop.create_task(self._run(coro))

    async def _run(self, coro):
        try:
            await coro
        except BackendError as e:
            self.write(frame(err_payload(e.code, e.sqlstate.encode(), e.message), 1))
        except AccessDenied as e:
            self.write(err_packet(e.seq, ER_ACCESS_DENIED_ERROR, str(e), self.caps))
            self._close()
        except (ConnectionError, asyncio.TimeoutError) as e:
            if not self.closed:
                self.write(err_packet(1, CR_SERVER_LOST, f"Lost connection to backend during query: {e or 'timeout'}"))
        except Exception:
            log.exception("client %s: internal error", self.conn_id)
            self.write(err_packet(1, (1105, b"HY000"), "rwproxy internal error; see the proxy log"))
        if self.infile_backend is None and not (self.busy and self._relaying()):
            self.busy = False
        if not self.busy and self.buf and self.phase == _COMMAND and not self.closed:
            self._process()

    def _relaying(self) -> bool:
        return any(be.client is self and be.mode == 1 for be in self.backends.values())

    async def primary_backend(self):
        w = self.worker
        name = w.primary_name
        be = self.backends.get(name)
        if be is not None and not be.closed:
            return be
        server = w.servers[name]
        be = await w.pools.acquire(server, self.user.name, self.user.password, self.caps & SESSION_SHAPING_CAPABILITIES, self.charset, self.db)
        be.client = self
        self.backends[name] = be
        return be

    async def _relay_after_connect(self, pkt, kind):
        be = await self.primary_backend()
        be.relay(pkt, kind, self)  # busy stays set until response_done

    async def _prepare(self, pkt):
        be = await self.primary_backend()
        resp = await be.command(pkt, PREPARE)
        if resp[4] == 0x00:
            bid = int.from_bytes(resp[5:9], "little")
            sid = self.next_stmt_id
            self.next_stmt_id += 1
            self.stmts[sid] = (be, bid)
            if sid != bid:
                resp = resp[:5] + sid.to_bytes(4, "little") + resp[9:]
        self.write(resp)

    async def _init_db(self, pkt):
        be = await self.primary_backend()
        resp = await be.command(pkt, SIMPLE)
        be.db_touched = True
        if resp[4] != 0xFF:
            self.db = pkt[5:].decode("utf-8", "replace")
            be.db = self.db
        self.write(resp)

    async def _set_option(self, pkt):
        be = await self.primary_backend()
        resp = await be.command(pkt, SIMPLE)
        be.dirty = True
        self.write(resp)

    async def _reset_connection(self):
        for be in list(self.backends.values()):
            if not await be.reset():
                self.worker.pools.discard(be)
                self.backends = {k: v for k, v in self.backends.items() if v is not be}
        self.stmts.clear()
        self.status = SERVER_STATUS_AUTOCOMMIT
        self.write(ok_packet(1, self.status))

    async def _change_user(self, pkt):
        req = parse_change_user(_payload(pkt), self.caps)
        w = self.worker
        self.user, seq = await w.authenticator.login(self, req.user, req.plugin, req.auth_response, self.salt, 1, self.host, self.tls)
        self._release_all()
        self.stmts.clear()
        self.db = req.database
        if req.charset:
            self.charset = req.charset & 0xFF
        self.status = SERVER_STATUS_AUTOCOMMIT
        try:
            await self.primary_backend()
        except BackendError as e:
            self.write(frame(err_payload(e.code, e.sqlstate.encode(), e.message), seq))
            return self._close()
        self.write(ok_packet(seq, self.status))

    def backend_lost(self, be):
        """A backend died while relaying this session's command."""
        self.backends = {k: v for k, v in self.backends.items() if v is not be}
        self.stmts = {k: v for k, v in self.stmts.items() if v[0] is not be}
        self.worker.pools.discard(be)
        self.infile_backend = None
        if be.relayed == 0 and not self.closed:
            msg = f"Lost connection to backend server {be.server.name} ({be.server.host}:{be.server.port}) during query"
            self.write(err_packet(1, CR_SERVER_LOST, msg))
            self.busy = False
            if self.buf:
                self._process()
        else:
            # Part of the result already reached the client: the stream cannot be
            # repaired, so the client sees a lost connection, like a server crash.
            self._close()

    def _release_all(self):
        pools = self.worker.pools
        for be in self.backends.values():
            if be.client is self and be.mode == 1 or be.dirty:
                pools.discard(be)  # mid-response or with options a reset won't undo
            else:
                pools.release(be)
        self.backends = {}

    def _close(self):
        if not self.closed:
            self.closed = True
            self.phase = _CLOSING
            self.transport.close()


_STMT_NAMES = {
    COM_STMT_EXECUTE: "execute",
    COM_STMT_FETCH: "fetch",
    COM_STMT_RESET: "reset",
    COM_STMT_SEND_LONG_DATA: "send_long_data",
    COM_STMT_CLOSE: "close",
}


def _payload(pkt: bytes) -> bytes:
    """Payload of a (possibly split) logical packet given with its headers."""
    n = pkt[0] | (pkt[1] << 8) | (pkt[2] << 16)
    if n < MAX_PACKET:
        return pkt[4 : 4 + n]
    parts, pos = [], 0
    while True:
        m = pkt[pos] | (pkt[pos + 1] << 8) | (pkt[pos + 2] << 16)
        parts.append(pkt[pos + 4 : pos + 4 + m])
        pos += 4 + m
        if m < MAX_PACKET:
            return b"".join(parts)
