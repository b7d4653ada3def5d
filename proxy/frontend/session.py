"""One client session: commands classified, routed and relayed to backends.

The command path is synchronous on purpose: a COM_QUERY or COM_STMT_EXECUTE
for a backend connection that is open and carries the session's state is
written to that backend inside data_received, and the response flows back
through BackendConnection.data_received. Coroutines serve only the rare slow
paths: the handshake, a session's first statement on a server (connect and
replay the session's SET/USE history), PREPARE, GTID waits, COM_CHANGE_USER.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

from proxy.routing import classify as C
from proxy.backend.connection import BackendError
from proxy.frontend.login import AccessDenied, handshake
from proxy.protocol.constants import (
    COM_INIT_DB, COM_QUERY, COM_STMT_EXECUTE, CR_SERVER_LOST, ER_ACCESS_DENIED_ERROR, MAX_PACKET,
    SERVER_STATUS_AUTOCOMMIT, SESSION_SHAPING_CAPABILITIES,
)
from proxy.protocol.packets import err_packet, err_payload, frame, read_lenenc_str
from proxy.frontend.commands import OtherCommands
from proxy.frontend.reader import _CLOSING, _COMMAND, _HANDSHAKE, PRE_AUTH_LIMIT, ClientPackets
from proxy.frontend.prepared import StatementCommands
from proxy.frontend.kill import KillCommands
from proxy.protocol.scan import RESULT
from proxy.routing.router import PRIMARY, NoServer, Reject
from proxy.routing.state import SessionState
from proxy.backend.shared import shared_execute_packet, warning_count
from proxy.routing.statements import DIRECT_ID, StatementMap, execute_packet_for

log = logging.getLogger("rwproxy.client")


_F_KILL = C.F_KILL
_F_CONN_BOUND = C.F_CONN_BOUND
_READ = C.READ
# A statement with any flag but a routing hint never goes to a shared connection.
_NO_SHARE = ~(C.F_HINT_PRIMARY | C.F_HINT_REPLICA)
_monotonic = time.monotonic
_HUGE = C.Classification(C.WRITE, C.F_UNPARSED, "<statement over 16 MiB>")


class ClientConnection(ClientPackets, StatementCommands, OtherCommands, KillCommands, asyncio.Protocol):
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
        self.user = None
        self.caps = 0
        self.charset = 45
        self.db: str | None = None
        self.login_db: str | None = None  # pool key database; later USE/INIT_DB are replayed
        self.status = SERVER_STATUS_AUTOCOMMIT
        self.state: SessionState | None = None
        self.backends: dict = {}  # server name -> BackendConnection
        self.stmts = StatementMap(worker.config.routing.max_prepared_per_connection)
        self.inflight = None  # (classification, packet, kind, server name) of the relayed command
        self.infile_backend = None
        self._if_hdr, self._if_skip, self._if_prev = b"", 0, 0
        self._pkt_waiter: asyncio.Future | None = None
        self.packet_limit = PRE_AUTH_LIMIT  # max_allowed_packet once logged in
        self._read_paused = False
        self.write_paused = False
        self.sent_at = 0.0  # when the relayed command was sent (digest service times)
        self.shared_on = None  # the shared connection answering this session's command
        self.shared_entry = None
        self.last_shared = None  # inflight tuple of the last statement answered on a shared connection
        self._share_keys: dict = {}  # server name -> pool key of its shared connections

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
        self.worker.loop.create_task(self._login())

    async def _login(self):
        if await handshake(self):
            self.phase = _COMMAND
            self.packet_limit = self.worker.config.proxy.max_allowed_packet
            if self.buf:
                self._process()
        else:
            self._close()

    def start_session(self, user, db) -> None:
        self.user = user
        self.db = self.login_db = db
        self._share_keys = {}
        self.last_shared = None
        self.state = SessionState(user, self.worker.config.routing.read_your_writes, self.worker.config.routing.max_session_history)

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
        if len(self.buf) > self.packet_limit and self._over_limit():
            return
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
        if self.state is not None:
            self.client_gone()
        if self.shared_on is not None:
            self.shared_on.client_paused(self)  # never leave a shared connection paused for us
        self._release_all()
        self.worker.forget(self)

    def pause_writing(self):
        self.write_paused = True
        for be in self.backends.values():  # a slow client stops us reading from its backends
            if be.client is self and not be.closed:
                be.transport.pause_reading()
        if self.shared_on is not None:
            self.shared_on.client_paused(self)

    def resume_writing(self):
        self.write_paused = False
        for be in self.backends.values():
            if be.client is self and not be.closed:
                be.transport.resume_reading()
        if self.shared_on is not None:
            self.shared_on.client_paused(self)

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def _error(self, code: int, sqlstate: bytes, message: str, seq: int = 1) -> None:
        self.write(frame(err_payload(code, sqlstate, message, self.caps), seq))

    # ---- command dispatch (the hot path) ------------------------------------------------
    def _process(self):
        while not self.busy and not self.closed:
            pkt = self._take_packet()
            if pkt is None:
                break
            cmd = pkt[4] if len(pkt) > 4 else -1
            if cmd == COM_QUERY:
                cls = self.worker.classifier.classify(pkt[5:]) if len(pkt) < MAX_PACKET else _HUGE
                if cls.flags & _F_KILL and self._kill_statement(pkt, cls.flags):
                    continue
                self._dispatch(pkt, cls, RESULT)
            elif cmd == COM_STMT_EXECUTE:
                self._execute(pkt)
            else:
                self._other_command(pkt, cmd)
        if self._read_paused and not self.closed:
            if len(self.buf) <= self.packet_limit:
                self._read_paused = False
                self.transport.resume_reading()
            elif not self.busy:
                self._over_limit()  # the packet waiting behind the last command was too big

    def _dispatch(self, pkt, cls, kind, stmt_sid: int = 0):
        """Route a statement and relay it; falls to the slow path when its backend needs work."""
        w = self.worker
        st = self.state
        try:
            target = w.router.route(st, cls, w.topology, _rule_text(pkt) if w.router.rules else "")
        except Reject as e:
            return self._error(e.code, b"HY000", e.message)
        except NoServer as e:
            return self._error(1105, b"HY000", str(e))
        name = self.writer() if target is PRIMARY else target
        if st.trx_server is not None and st.in_trx and self._trx_lost(name):
            return
        if (w.shared is not None and cls.route == _READ and not cls.flags & _NO_SHARE
                and self.status & SERVER_STATUS_AUTOCOMMIT and not st.pinned() and not st.user_vars
                and st.ro_trx is None and not st.gtid_wait and not st.pending_write and (target is not PRIMARY or w.primary_ok)
                and self._try_shared(pkt, cls, kind, name, stmt_sid)):
            return
        if cls.flags & _F_CONN_BOUND and self.last_shared is not None:
            # LAST_INSERT_ID(), FOUND_ROWS(), SHOW WARNINGS... after a statement that ran on a shared
            # connection: the values it asks about are on that connection, not ours.
            self._spawn(self._replay_shared(pkt, cls, kind, name, stmt_sid, target is PRIMARY))
            return
        be = self.backends.get(name)
        if target is PRIMARY and be is not None and not be.closed and be.peer_gone():
            self._drop_backend(be)  # the server closed it (crash, restart, failover): never write into it
            be = None
        self.busy = True
        if be is None or be.closed or be.applied != len(st.history) or st.gtid_wait or (target is PRIMARY and not w.primary_ok):
            self._spawn(self._slow_send(pkt, cls, kind, name, stmt_sid, target is PRIMARY))
            return
        out = pkt
        if stmt_sid:
            stmt = self.stmts.stmts[stmt_sid]
            bid = stmt.ids.get(name)
            if bid is None:  # not prepared on this server yet
                self._spawn(self._slow_send(pkt, cls, kind, name, stmt_sid))
                return
            self.stmts.touch(stmt_sid, name)
            stmt.last = name
            out = execute_packet_for(pkt, stmt, name, bid)
        self.inflight = (cls, pkt, kind, name, stmt_sid)
        w.router.balancer.started(name)
        self.sent_at = _monotonic()
        be.relay(out, kind, self)

    def _try_shared(self, pkt, cls, kind, name, stmt_sid) -> bool:
        """Queue an eligible statement on a shared connection (shared.py); False: use our own."""
        w = self.worker
        sh = w.shared
        p = sh.profiles.table.get(cls.digest)
        if p is None or not p[2]:  # not known to answer small and fast (yet)
            return False
        st = self.state
        known = self._share_keys.get(name)
        if known is not None and known[0] == st.hversion:
            key = known[1]
        else:  # sessions share only with sessions of the same SET/USE history (SET NAMES, sql_mode...)
            key = (name, self.user.name, self.caps & SESSION_SHAPING_CAPABILITIES, self.charset, self.login_db,
                   tuple(st.history))
            self._share_keys[name] = (st.hversion, key)
        line = sh.pick(w.servers[name], key, self.user.password)
        if line is None or line.closed:
            return False
        if stmt_sid:
            stmt = self.stmts.stmts[stmt_sid]
            bid = line.ps.get(stmt.sql)
            if bid is None:
                if not line.direct_ok:
                    return False
                out = shared_execute_packet(pkt, stmt, DIRECT_ID)
                if out is None:
                    return False
                e = line.send(self, out, kind, p[0], stmt.sql, stmt.prepare_packet)
            else:
                out = shared_execute_packet(pkt, stmt, bid)
                if out is None:
                    return False
                line.ps.move_to_end(stmt.sql)
                e = line.send(self, out, kind, p[0])
        else:
            e = line.send(self, pkt, kind, p[0])
        self.busy = True
        self.shared_on, self.shared_entry = line, e
        self.inflight = (cls, pkt, kind, name, stmt_sid)
        w.router.balancer.started(name)
        return True

    def shared_done(self, line, e, service: float) -> None:
        """A shared connection finished answering this session's command."""
        self.shared_on = self.shared_entry = None
        self.worker.shared.statements += 1
        self.response_done(line, e.relayed, service, True)

    def shared_lost(self, line, e) -> None:
        """The shared connection carrying this session's command died."""
        self.shared_on = self.shared_entry = None
        name = line.server.name
        inflight, self.inflight = self.inflight, None
        if inflight is not None:
            self.worker.router.balancer.finished(name)
        if self.closed:
            return
        if e.relayed == 0 and inflight is not None and not e.cancelled:
            # Nothing reached the client, and it was a read: run it again (elsewhere if the server is down).
            cls, pkt, kind, _, sid = inflight
            if not self._is_writer(name):
                self.state.failed_servers = self.state.failed_servers | {name}
            log.info("session %d: shared connection to %s lost during a read; retrying", self.conn_id, name)
            self.busy = False
            return self._dispatch(pkt, cls, kind, sid)
        if e.relayed == 0:
            self.write(err_packet(1, CR_SERVER_LOST, f"Lost connection to backend server {name} ({line.server.where}) during query"))
            self.busy = False
            if self.buf:
                self._process()
        else:
            self._close()

    async def _replay_shared(self, pkt, cls, kind, name, stmt_sid, to_primary):
        """Run the session's last shared read again on its own connection, then the connection-bound
        statement there, so that it sees what that read left (warnings, FOUND_ROWS()). The digest stops
        sharing, so the next time needs no replay."""
        last, self.last_shared = self.last_shared, None
        lcls, lpkt, lkind, lname, lsid = last
        self.worker.shared.profiles.never(lcls.digest)
        if lname == name:
            be = await self.backend_for(name)
            out = await self._stmt_packet(lpkt, lsid, name, be, quiet=True) if lsid else lpkt
            if out is not None:  # (None: the statement was closed since, or does not prepare there)
                await be.command(out, lkind)
        await self._slow_send(pkt, cls, kind, name, stmt_sid, to_primary)

    def response_done(self, be, relayed: int = -1, service: float = -1.0, shared: bool = False):
        """Called by the backend when a relayed response is complete."""
        sc = be.scanner
        if sc.local_infile:
            self.infile_backend = be  # the client now streams the file to this backend
            self._if_hdr, self._if_skip, self._if_prev = b"", 0, 0
            return
        w = self.worker
        name = be.server.name
        inflight, self.inflight = self.inflight, None
        self.last_shared = inflight if shared else None
        if inflight is not None:
            w.router.balancer.finished(name)
            cls = inflight[0]
            if w.shared is not None and cls.route == _READ and not cls.flags & _NO_SHARE and not sc.error:
                w.shared.profiles.learn(cls.digest, be.relayed if relayed < 0 else relayed,
                                        _monotonic() - self.sent_at if service < 0 else service,
                                        warning_count(sc.final, sc.deprecate_eof) > 0)
        on_primary = name == self.state.writer or name == w.primary_name
        status, error = sc.status, sc.error
        if on_primary and not error:
            self.status = status
        st = self.state
        if inflight is not None:
            cls = inflight[0]
            flags = cls.flags
            st.after(flags, on_primary, name, self.status if on_primary else status, error)
            statement = inflight[1][4] in (COM_QUERY, COM_STMT_EXECUTE)
            if not error:
                if cls.route == C.SESSION:
                    if inflight[4]:  # SET through a prepared statement: cannot be replayed elsewhere
                        st.history_overflow = True
                    else:
                        st.record(inflight[1], flags)
                        be.applied = len(st.history)
                    if flags & C.F_USE_DB:
                        be.db_touched = True
                        self.db = cls.db
                if on_primary and statement and st.write_completed(cls.route, flags):
                    if st.ryw_mode == "gtid":
                        self.worker.loop.create_task(self._fetch_gtid(be))
                        return  # busy until the GTID is known
                    st.wrote()
        st.failed_servers = frozenset()
        if w.spread_per_transaction and not st.pinned():
            st.writer = None  # the next transaction may go to another master
        self.busy = False
        if self.buf and not self.closed:
            self._process()

    def backend_lost(self, be):
        """A backend died while relaying this session's command."""
        name = be.server.name
        self._drop_backend(be)
        self.infile_backend = None
        inflight, self.inflight = self.inflight, None
        if inflight is not None:
            self.worker.router.balancer.finished(name)
        if self.closed:
            return
        st = self.state
        if be.relayed == 0 and inflight is not None and not self._is_writer(name) and not st.pinned():
            # A read on a replica that died before sending anything: run it elsewhere,
            # the client never notices.
            cls, pkt, kind, _, sid = inflight
            st.failed_servers = st.failed_servers | {name}
            log.info("session %d: replica %s lost during a read; retrying elsewhere", self.conn_id, name)
            self.busy = False
            return self._dispatch(pkt, cls, kind, sid)
        if be.relayed == 0:
            msg = f"Lost connection to backend server {be.server.name} ({be.server.where}) during query"
            self.write(err_packet(1, CR_SERVER_LOST, msg))
            self.busy = False
            if self.buf:
                self._process()
        else:
            # Part of the result already reached the client: the stream cannot be
            # repaired, so the client sees a lost connection, as with a crashed server.
            self._close()

    # ---- slow paths --------------------------------------------------------------------
    def _spawn(self, coro):
        self.busy = True
        self.worker.loop.create_task(self._run(coro))

    async def _run(self, coro):
        try:
            await coro
        except BackendError as e:
            self._error(e.code, e.sqlstate.encode(), e.message)
        except AccessDenied as e:
            self.write(err_packet(e.seq, ER_ACCESS_DENIED_ERROR, str(e), self.caps))
            self._close()
        except (ConnectionError, asyncio.TimeoutError) as e:
            if not self.closed:
                self.write(err_packet(1, CR_SERVER_LOST, f"Lost connection to backend during query: {e or 'timeout'}"))
        except Exception:
            log.exception("session %d: internal error", self.conn_id)
            self._error(1105, b"HY000", "rwproxy internal error; see the proxy log")
        if self.inflight is None and self.infile_backend is None:
            self.busy = False
            if self.buf and self.phase == _COMMAND and not self.closed:
                self._process()

    async def backend_for(self, name: str):
        """The session's connection to `name`, opened and brought up to the session's state."""
        be = self.backends.get(name)
        if be is None or be.closed:
            if be is not None:
                self._drop_backend(be)
            w = self.worker
            be = await w.pools.acquire(
                w.servers[name], self.user.name, self.user.password, self.caps & SESSION_SHAPING_CAPABILITIES, self.charset, self.login_db
            )
            be.client = self
            be.applied = 0
            self.backends[name] = be
            if self._is_writer(name) and not self.status & SERVER_STATUS_AUTOCOMMIT:
                # autocommit=0 is not in the replay history (replicas keep autocommit on)
                resp = await be.command(frame(b"\x03SET autocommit=0", 0), RESULT)
                if resp[4] == 0xFF:
                    raise BackendError(1105, "HY000", f"could not restore autocommit=0 on {name}")
        history = self.state.history
        while be.applied < len(history):
            packet = history[be.applied]
            resp = await be.command(packet, RESULT)
            if resp[4] == 0xFF:
                raise BackendError(1105, "HY000", f"could not replay session state on {name}: {resp[13:].decode('utf-8', 'replace')}")
            if packet[4] == COM_INIT_DB or packet[5:8].lower() == b"use":
                be.db_touched = True
            be.applied += 1
        return be

    async def _slow_send(self, pkt, cls, kind, name, stmt_sid, to_primary=False):
        st = self.state
        w = self.worker
        deadline = w.loop.time() + w.config.failover.write_hold_timeout
        while True:
            if to_primary:
                await w.wait_for_primary()  # held while failover/switchover runs
                name = self.writer()
            try:
                be = await self.backend_for(name)
                if st.gtid_wait:
                    st.gtid_wait = False
                    if not await self._gtid_wait(be):
                        to_primary = True
                        continue
                break
            except (BackendError, ConnectionError, asyncio.TimeoutError) as e:
                if isinstance(e, BackendError) and e.code not in (2003, 2013):
                    raise  # the server answered (access denied, unknown database...): not a failure to route around
                if to_primary or self._is_writer(name) or st.pinned():
                    remaining = deadline - w.loop.time()
                    if st.in_trx or remaining <= 0:
                        raise
                    # The primary is unreachable: the monitor will say so and failover will
                    # publish a new one; hold the statement meanwhile.
                    log.info("session %d: primary %s unreachable (%s); holding the statement", self.conn_id, name, e)
                    await w.next_topology(min(0.5, remaining))
                    to_primary = True
                    continue
                log.info("session %d: replica %s unusable (%s); routing elsewhere", self.conn_id, name, e)
                st.failed_servers = st.failed_servers | {name}
                try:
                    target = w.router.route(st, cls, w.topology)
                except NoServer:
                    target = PRIMARY
                to_primary = target is PRIMARY
                name = self.writer() if to_primary else target
        out = pkt
        if stmt_sid:
            out = await self._stmt_packet(pkt, stmt_sid, name, be)
            if out is None:
                return
        self.inflight = (cls, pkt, kind, name, stmt_sid)
        w.router.balancer.started(name)
        self.sent_at = _monotonic()
        be.relay(out, kind, self)

    def writer(self) -> str:
        """The server this session writes to: the primary, or in master-master mode the
        master the session (or its current transaction) was given, while it lives."""
        w = self.worker
        st = self.state
        if not w.multi_master:
            st.writer = w.primary_name
            return st.writer
        if st.writer is None or st.writer not in w.live_writers:
            st.writer = w.pick_writer()
        return st.writer

    def _is_writer(self, name: str) -> bool:
        return name == self.state.writer or name == self.worker.primary_name

    def _trx_lost(self, name: str) -> bool:
        """A transaction whose server died or stopped being the primary cannot continue
        anywhere: tell the client clearly, once, and start afresh."""
        st = self.state
        tb = self.backends.get(st.trx_server)
        if st.trx_server == name and tb is not None and not tb.closed:
            return False
        msg = (f"rwproxy: the transaction was lost because its server {st.trx_server} failed or stopped being "
               f"the primary; it was rolled back there. Restart the transaction.")
        log.info("session %d: %s", self.conn_id, msg)
        st.in_trx = False
        st.trx_server = None
        st.pending_write = False
        self._error(1213, b"40001", msg)
        return True

    def server_down(self, name: str) -> None:
        """The monitor declared `name` down: stop using it (an in-flight read is retried elsewhere)."""
        be = self.backends.get(name)
        if be is None or be.closed:
            return
        if be.relaying_for(self):
            be.transport.abort()  # -> backend_lost(): retried if nothing reached the client yet
        elif self.state is None or self.state.trx_server != name:
            self._drop_backend(be)

    async def _gtid_wait(self, be) -> bool:
        """MASTER_GTID_WAIT on a replica before a read that must see the session's last write."""
        st = self.state
        timeout = self.worker.config.routing.gtid_wait_timeout
        sql = f"SELECT MASTER_GTID_WAIT('{st.last_gtid}', {timeout})".encode()
        resp = await be.command(frame(b"\x03" + sql, 0), RESULT, timeout=timeout + 2)
        return _first_value(resp, be.caps) == b"0"

    async def _fetch_gtid(self, be):
        """After a write in gtid read-your-writes mode: remember the GTID it produced."""
        try:
            resp = await be.command(frame(b"\x03SELECT @@last_gtid", 0), RESULT, timeout=5)
            value = _first_value(resp, be.caps)
            self.state.wrote(value.decode() if value else "")
        except (ConnectionError, asyncio.TimeoutError):
            self.state.wrote()
        self.busy = False
        if self.buf and not self.closed:
            self._process()

    # ---- teardown ------------------------------------------------------------------------
    def _drop_backend(self, be):
        name = be.server.name
        if self.backends.get(name) is be:
            del self.backends[name]
        self.stmts.forget_server(name)
        self.worker.pools.discard(be)

    def _release_all(self):
        pools = self.worker.pools
        for be in self.backends.values():
            if be.relaying_for(self) or be.dirty:
                pools.discard(be)  # mid-response, or options a reset won't undo
            else:
                pools.release(be)
        self.backends = {}

    def _close(self):
        if not self.closed:
            self.closed = True
            self.phase = _CLOSING
            self.transport.close()


def _rule_text(pkt: bytes) -> str:
    return bytes(pkt[5:]).decode("utf-8", "replace") if pkt[4] == COM_QUERY else ""


def _first_value(resp: bytes, caps: int) -> bytes | None:
    """The first column of the first row of a text result set (for the proxy's own queries)."""
    packets, pos = [], 0
    while pos + 4 <= len(resp):
        n = int.from_bytes(resp[pos : pos + 3], "little")
        packets.append(resp[pos + 4 : pos + 4 + n])
        pos += 4 + n
    if not packets or packets[0][:1] in (b"\x00", b"\xff"):
        return None
    ncols = packets[0][0]
    row_index = 1 + ncols + (0 if caps & (1 << 24) else 1)
    if row_index >= len(packets) or packets[row_index][:1] == b"\xfb":
        return None
    value, _ = read_lenenc_str(packets[row_index], 0)
    return value

