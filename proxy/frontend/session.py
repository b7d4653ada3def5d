"""One client session: commands classified, planned by the router, and relayed to backends.

The command path is synchronous on purpose: a COM_QUERY or COM_STMT_EXECUTE for a backend
connection that is open and carries the session's state is written to that backend inside
data_received, and the response flows back through BackendConnection.data_received, which
calls command_done(). Coroutines serve only the rare slow paths: the handshake, a session's
first statement on a server (connect and replay the session's SET/USE history), PREPARE, GTID
waits, COM_CHANGE_USER.

Collaborators call the session only through its public methods: the backend and shared
connections through command_done / command_lost / send_error (the completion interface), the
command modules (prepared, commands, kill) through dispatch / spawn / backend_for / writer.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

from proxy.config.schema import RYW_GTID
from proxy.frontend import commands, diagnostics, idle, kill, losses, prepared, sharing, slowpath
from proxy.frontend.login import admit_user, handshake, open_session
from proxy.frontend.reader import CLOSING, COMMAND, HANDSHAKE, PacketReader
from proxy.frontend.compress import CompressionError, CompressionLayer
from proxy.frontend.tls import TLSLayer
from proxy.logs import clean
from proxy.protocol.constants import (CLIENT_COMPRESS, COM_QUERY, COM_STMT_EXECUTE, CR_SERVER_LOST, MAX_PACKET,
                                      DEFAULT_CHARSET, ER_CON_COUNT_ERROR, SERVER_STATUS_AUTOCOMMIT,
                                      SERVER_STATUS_NO_BACKSLASH_ESCAPES)
from proxy.protocol import tracking
from proxy.protocol.packets import err_packet, err_payload, frame
from proxy.protocol.scan import RESULT
from proxy.routing import classify as C
from proxy.routing.router import WRITER, rule_text
from proxy.routing.state import SessionState
from proxy.routing.statements import StatementMap

log = logging.getLogger("rwproxy.client")

_F_KILL, _F_RARE, _F_USE_DB, _PREVIOUS = C.F_KILL, C.F_RARE, C.F_USE_DB, C.F_PREVIOUS
_READ, _SESSION, _WRITE, _NOT_VAR = C.READ, C.SESSION, C.WRITE, ~C.F_USER_VAR_WRITE
_NO_SHARE = ~(C.F_HINT_PRIMARY | C.F_HINT_REPLICA)  # flags that keep a statement's profile unlearned
_ID_READERS = C.F_CONN_BOUND | C.F_CONN_STATE  # statements about earlier ones (sharing.follow_up)
_STATEMENTS, _NBE, _monotonic = (COM_QUERY, COM_STMT_EXECUTE), SERVER_STATUS_NO_BACKSLASH_ESCAPES, time.monotonic
_NO_SERVERS = frozenset()


class Command:
    """The statement a session has in flight."""

    __slots__ = ("cls", "packet", "kind", "server", "stmt_id")

    def __init__(self, cls, packet, kind: int, server: str, stmt_id: int = 0):
        self.cls = cls  # its Classification
        self.packet = packet  # the client's packet, as received
        self.kind = kind  # how its response is scanned (protocol.scan kinds)
        self.server = server  # the server it was sent to
        self.stmt_id = stmt_id  # client statement id of a COM_STMT_EXECUTE (0: a text statement)


class ClientConnection(asyncio.Protocol):
    """One client's session: its login, its commands, and the backend connections it uses."""

    __slots__ = (
        "worker", "conn_id", "transport", "layer", "reader", "phase", "busy", "closed", "write_paused",
        "host", "tls", "salt", "user", "caps", "charset", "db", "login_db", "status", "state", "backends",
        "stmts", "inflight", "sent_at", "shared_on", "shared_entry", "last_shared", "share_keys", "activity",
        "idle_seen", "idle_since", "counted_user", "stat_rows", "stat_table", "stat_db", "done_at", "started",
        "insert_conn", "unconfirmed", "writes", "idle_watch", "failed_change_user",
    )

    def __init__(self, worker, conn_id: int):
        self.worker = worker  # the Worker (process) that owns this session
        self.conn_id = conn_id  # rwproxy's session id, sent in the greeting (KILL takes it)
        self.transport = None  # what the session writes to: the socket's transport, or its layer
        self.layer = None  # TLSLayer and/or CompressionLayer between the socket and the packets, if asked for
        self.reader = PacketReader(self)  # the client's byte stream: packets, size limit, LOCAL INFILE
        self.phase = HANDSHAKE  # HANDSHAKE, COMMAND, CLOSING
        self.busy = False  # a command is in progress: later packets wait in the reader
        self.closed = False  # the client is gone or being closed
        self.write_paused = False  # the client's socket buffer is full: its backends stop reading
        self.host = "?"  # the client's address, for messages
        self.tls = False  # the connection is encrypted
        self.salt = b""  # the greeting's scramble (COM_CHANGE_USER is checked against it)
        self.user = None  # the UserConfig logged in as
        self.caps = 0  # capability flags agreed with the client
        self.charset = DEFAULT_CHARSET  # the client's character set (part of the pool key)
        self.db: str | None = None  # the current database, as the client set it
        self.login_db: str | None = None  # the database at login: pool key; later USE/INIT_DB are replayed
        self.status = SERVER_STATUS_AUTOCOMMIT  # server status flags as the primary last reported them
        self.state: SessionState | None = None  # pins, SET/USE history, read-your-writes (routing)
        self.backends: dict = {}  # server name -> this session's own BackendConnection
        self.stmts = StatementMap(worker.config.routing.max_prepared_per_connection)  # prepared statements
        self.inflight: Command | None = None  # the command relayed now
        self.sent_at = 0.0  # when it was sent (digest service times)
        self.shared_on = None  # the shared connection answering it (multiplexing), if any
        self.shared_entry = None  # its entry in that connection's queue
        self.last_shared: Command | None = None  # the previous command, if a shared connection answered it
        self.share_keys: dict = {}  # server name -> (history version, key of the shared connections to use)
        self.activity = 0  # chunks received from the client (client_idle_timeout: did it send anything?)
        self.idle_seen = -1  # `activity` as the last idle sweep saw it
        self.idle_since = 0.0  # when a sweep first saw the session waiting for its client
        self.counted_user: str | None = None  # the user this session counts against (max_connections)
        self.stat_rows: dict = {}  # server name -> this user's statistics row there (observe.recorder)
        self.stat_table, self.stat_db = None, None  # the digest table of this user and database, and the database
        self.done_at = 0.0  # when the last statement was answered (sessions table: seconds idle)
        self.started = _monotonic()  # when the client connected
        self.insert_conn = None  # the own connection whose LAST_INSERT_ID() is the session's (state.insert_id)
        self.unconfirmed: str | None = None  # a write digest whose next statement decides if it may share
        self.writes = 0  # writes answered on the writer (which of them to profile on the session's own connection)
        self.idle_watch = None  # the timer of a short SET wait_timeout (idle.watch_wait_timeout)
        self.failed_change_user = 0  # COM_CHANGE_USER attempts refused (MariaDB allows three)

    # ---- transport events -----------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer or peer == "":  # ('' on the Unix socket: MariaDB calls such a client localhost)
            self.host = peer[0] if peer else "localhost"
        transport.set_write_buffer_limits(high=256 * 1024)
        if not self.worker.admit(self):
            transport.write(err_packet(0, ER_CON_COUNT_ERROR, "Too many connections"))
            transport.close()
            self.closed = True
            return
        self.worker.loop.create_task(self._login())

    async def _login(self):
        login = await handshake(self, self.worker, self.conn_id, self.host)
        if login is None:
            return self.close()
        self.salt, self.caps, self.charset, self.tls = login.salt, login.caps, login.charset, login.tls
        if not admit_user(self, login.user, login.seq):
            return self.close()
        self.start_session(login.user, login.database)
        if not await open_session(self, login.seq):
            return self.close()
        self.phase = COMMAND
        self.reader.limit = self.worker.config.proxy.max_allowed_packet
        if self.caps & CLIENT_COMPRESS:  # from now on every byte either way is in compressed packets
            self._add_layer(CompressionLayer(self.transport, self.layer))
        if self.reader.buf:
            self._process()

    def start_session(self, user, db) -> None:
        """A fresh session for `user` (login, COM_CHANGE_USER)."""
        self.user = user
        self.db = self.login_db = db
        self.share_keys = {}
        self.last_shared = None
        self.stat_rows, self.stat_table = {}, None
        cfg = self.worker.config.routing
        before, self.state = self.state, SessionState(user, cfg.read_your_writes, cfg.max_session_history)
        if before is not None:  # COM_CHANGE_USER: the client's own writes stay visible to it
            self.state.keep_writes(before)

    def start_tls(self, context: ssl.SSLContext) -> None:
        """The client sent an SSL request: everything after it is TLS. Bytes that arrived with the
        request (its ClientHello) are fed to the new layer."""
        self._add_layer(TLSLayer(self.transport, context))

    def _add_layer(self, layer) -> None:
        """Bytes that arrived before the layer (a ClientHello, a first command) go through it too."""
        early, self.reader.buf = self.reader.buf, b""
        self.layer = self.transport = layer
        if early:
            self.data_received(early)

    def data_received(self, data):
        self.activity += 1
        if self.layer is not None:
            try:
                data = self.layer.feed(data)
            except (ssl.SSLError, CompressionError) as e:
                log.info("client %s: %s", self.host, clean(f"TLS error: {e}" if isinstance(e, ssl.SSLError) else str(e)))
                return self.close()
            if not data:
                return
        r = self.reader
        if r.infile is not None:
            return r.infile_feed(data)
        if not r.feed(data):
            return
        if self.phase == COMMAND and not self.busy:
            self._process()
        elif r.waiter is not None:
            r.deliver()

    def connection_lost(self, exc):
        self.closed = True
        self.phase = CLOSING
        self.reader.client_gone()
        if self.state is not None:
            kill.stop_running(self)
        if self.shared_on is not None:
            self.shared_on.client_paused(self)  # never leave a shared connection paused for us
        self.release_backends()
        self.worker.holders.discard(self)
        self.worker.forget(self)  # (and what the session counted against its user's max_connections)

    def pause_writing(self):
        self._follow_client(True)

    def resume_writing(self):
        self._follow_client(False)

    def _follow_client(self, paused: bool) -> None:
        self.write_paused = paused
        for be in self.backends.values():  # a slow client stops us reading from its backends
            if be.client is self and not be.closed:
                (be.transport.pause_reading if paused else be.transport.resume_reading)()
        if self.shared_on is not None:
            self.shared_on.client_paused(self)

    # ---- what collaborators call -------------------------------------------------
    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def send_error(self, code: int, sqlstate, message: str, seq: int = 1) -> None:
        """An ERR packet to the client (sqlstate as str or bytes)."""
        if type(sqlstate) is str:
            sqlstate = sqlstate.encode()
        self.write(frame(err_payload(code, sqlstate, message, self.caps), seq))

    async def read_packet(self, timeout: float = 30.0) -> tuple[int, bytes]:
        return await self.reader.read_packet(timeout)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.phase = CLOSING
            self.transport.close()

    # ---- command dispatch (the hot path) ------------------------------------------------
    def _process(self):
        r = self.reader
        while not self.busy and not self.closed:
            pkt = r.take()
            if pkt is None:
                break
            if pkt[3]:  # a command's first packet is numbered 0: the server answers 1156 and hangs up
                return r.refuse_out_of_order(0)
            cmd = pkt[4] if len(pkt) > 4 else -1
            if cmd == COM_QUERY:
                cls = (self.worker.classifier.classify(pkt[5:]) if len(pkt) < MAX_PACKET and not self.status & _NBE
                       else C.classify_unusual(self.worker.classifier, pkt))  # (over 16 MiB, NO_BACKSLASH_ESCAPES)
                if cls.flags & _F_KILL and kill.kill_statement(self, pkt, cls.flags):
                    continue
                self.dispatch(pkt, cls, RESULT)
            elif cmd == COM_STMT_EXECUTE:
                prepared.execute(self, pkt)
            else:
                commands.run(self, pkt, cmd)
        if r.paused:
            r.commands_taken()

    def dispatch(self, pkt, cls, kind: int, stmt_sid: int = 0) -> None:
        """Plan a statement (router) and carry the plan out: relay it on an open connection that
        carries the session's state, queue it on a shared one, or take a slow path."""
        w = self.worker
        st = self.state
        if self.unconfirmed is not None:
            sharing.after_write(self, cls)
        # (a write shares only instead of taking a connection: none held skips the router's checks)
        plan = w.router.plan(st, cls, w.topology, rule_text(pkt) if w.router.rules else "",  # (positional: hot)
                             self.status & SERVER_STATUS_AUTOCOMMIT, w.primary_ok,
                             w.shared is not None and (cls.route == _READ or st.writer not in self.backends),
                             self.last_shared is not None)
        if plan.error is not None:
            return self.send_error(*plan.error)
        to_writer = plan.target is WRITER
        name = self.writer() if to_writer else plan.target
        if st.trx_server is not None and st.in_trx and losses.trx_lost(self, name):
            return
        cmd = Command(cls, pkt, kind, name, stmt_sid)
        if plan.share and sharing.try_shared(self, cmd):
            return
        if cls.flags & _ID_READERS and sharing.follow_up(self, cmd, plan, to_writer):
            return  # (LAST_INSERT_ID(), SHOW WARNINGS... whose answer lives on another connection)
        if st.diag_copy is not None and not cls.flags & _PREVIOUS:  # (GET DIAGNOSTICS @v on a replica)
            self.busy = True
            return self.spawn(diagnostics.copy_then_send(self, cmd, to_writer, plan.wait_gtid))
        be = self.backends.get(name)
        if to_writer and be is not None and not be.closed and be.peer_gone():
            self.drop_backend(be)  # the server closed it (crash, restart, failover): never write into it
            be = None
        self.busy = True
        if plan.hold or plan.wait_gtid or be is None or be.closed or be.applied != len(st.history):
            return self.spawn(slowpath.send(self, cmd, to_writer, plan.wait_gtid))
        out = pkt
        if stmt_sid:
            stmt = self.stmts.stmts[stmt_sid]
            bid = stmt.ids.get(name)
            if bid is None:  # not prepared on this server yet
                return self.spawn(slowpath.send(self, cmd, to_writer))
            self.stmts.touch(stmt_sid, name)
            stmt.last = name
            out = stmt.packet_for(pkt, name, bid)
        self.send(be, out, cmd)

    def send(self, be, out, cmd: Command) -> None:
        """Relay `cmd` (as `out`, its packet for that connection) on the session's connection `be`."""
        self.inflight = cmd
        self.worker.router.balancer.started(cmd.server)
        self.sent_at = _monotonic()
        be.relay(out, cmd.kind, self)

    # ---- completion interface (backend and shared connections) -----------------------------
    def command_done(self, conn, relayed: int = -1, service: float = -1.0) -> None:
        """`conn` (the session's own connection, or a shared one) finished answering the command."""
        sc = conn.scanner
        shared = conn is self.shared_on
        if shared:
            self.shared_on = self.shared_entry = None
        elif sc.local_infile:
            return self.reader.start_infile(conn, sc.infile_seq)  # the client now streams the file to this backend
        w = self.worker
        st = self.state
        name = conn.server.name
        cmd, self.inflight = self.inflight, None
        self.last_shared = cmd if shared else None
        on_primary = name == st.writer or name == w.primary_name
        status, error = sc.status, sc.error
        if on_primary and not error:
            self.status = status
        fetch_gtid = False
        if cmd is not None:
            w.router.balancer.finished(name)
            if w.recorder is not None:
                w.recorder.record(self, cmd, name, error, sc.rows, conn.relayed if relayed < 0 else relayed)
            cls = cmd.cls
            flags = cls.flags
            route = cls.route
            # A write on the session's own connection is profiled the 1st, 17th... time and with warnings:
            # each time cost busy writers 4,700 instructions (+9%); sessions without one need it.
            if w.shared is not None and not flags & _NO_SHARE and not error and (route == _READ or (
                    route == _WRITE and on_primary and (shared or not self.writes & 15 or sc.warnings))):
                if w.shared.profiles.learn(cls.digest, conn.relayed if relayed < 0 else relayed,
                                           _monotonic() - self.sent_at if service < 0 else service,
                                           sc.warnings > 0, route == _WRITE):
                    self.unconfirmed = cls.digest
            # (a SET of user variables to literals is replayed with the history: it ties nothing)
            st.after(flags & _NOT_VAR if route == _SESSION and not cmd.stmt_id else flags, on_primary, name,
                     self.status if on_primary else status, error, cls.digest, route)
            st.warnings, st.last_digest = sc.warnings > 0, cls.digest
            if not error:
                if route == _SESSION:
                    if cmd.stmt_id:  # SET through a prepared statement: cannot be replayed elsewhere
                        st.history_overflow = True
                    else:
                        st.record(cmd.packet, flags, self.backends.values())
                        conn.applied = len(st.history)
                if flags & _F_USE_DB:  # (a multi-statement's: its last USE)
                    conn.db_touched = True
                    self.db = cls.db
                if flags >= _F_RARE:  # (SET wait_timeout, DROP DATABASE: a comparison allocates nothing)
                    commands.rare_flags(self, cmd, on_primary)
                if on_primary and route == _WRITE:
                    self.writes += 1
                    if st.wrote_ok(sc.final):
                        self.insert_conn = None if shared else conn
                if on_primary and cmd.packet[4] in _STATEMENTS and st.write_completed(route, flags):
                    if st.ryw_mode == RYW_GTID:  # from the OK's session state, else one more round trip
                        gtid = conn.gtid_tracked and tracking.last_gtid(sc.final)
                        fetch_gtid = not gtid
                        w.gtid_learned[fetch_gtid] += 1
                        if gtid:
                            st.wrote(gtid)
                    else:
                        st.wrote()
        if st.failed_servers:
            st.failed_servers = _NO_SERVERS
        if w.spread_per_transaction and not st.pin():
            st.writer = None  # the next transaction may go to another master
        if fetch_gtid:  # busy until the GTID it produced is known; _fetch_gtid finishes the command
            w.loop.create_task(slowpath.fetch_gtid(self, conn))
            return
        if w.pools.waiting and self.backends and w.release_after:  # others wait for a connection: give ours back now
            self.busy = False
            idle.release(self, 0.0, 0.0, w.pools.waiters)
        self.finish()

    def command_lost(self, conn, relayed: int, cancelled: bool = False) -> None:
        """`conn` died while answering the command, after `relayed` bytes reached the client."""
        name = conn.server.name
        shared = conn is self.shared_on
        if shared:
            self.shared_on = self.shared_entry = None
        else:
            self.drop_backend(conn)
            self.reader.infile = None
        cmd, self.inflight = self.inflight, None
        if cmd is not None:
            self.worker.router.balancer.finished(name)
            if self.worker.recorder is not None:
                self.worker.recorder.lost(self, cmd, name)
        if self.closed:
            return
        st = self.state
        writer = self.is_writer(name)
        # Nothing reached the client: a read runs again, elsewhere if its server is down, and the
        # client never notices. On the session's own connection only a replica's (a statement on
        # the writer may have had effects); on a shared one any read, never a write (it may have run).
        if relayed == 0 and cmd is not None and not cancelled and (
                cmd.cls.route == _READ if shared else not (writer or st.pin())):
            if not writer:
                st.failed_servers = st.failed_servers | {name}
            log.info("session %d: %s to %s lost during a read; retrying", self.conn_id,
                     "shared connection" if shared else "connection", name)
            self.busy = False
            return self.dispatch(cmd.packet, cmd.cls, cmd.kind, cmd.stmt_id)
        if relayed == 0:
            self.write(err_packet(1, CR_SERVER_LOST, f"Lost connection to backend server {name} "
                                                     f"({conn.server.where}) during query"))
            lost = st.unrestorable() if writer else None
            if lost:
                return losses.end_lost_session(self, name, lost)
            self.finish()
        else:
            # Part of the result already reached the client: the stream cannot be
            # repaired, so the client sees a lost connection, as with a crashed server.
            self.close()

    def finish(self) -> None:
        """The command is over: take the next one the client sent meanwhile."""
        self.busy = False
        if self.reader.buf and self.phase == COMMAND and not self.closed:
            self._process()

    # ---- slow paths --------------------------------------------------------------------
    def spawn(self, coro) -> None:
        """Run a slow path; the session stays busy until it is over."""
        self.busy = True
        self.worker.loop.create_task(slowpath.run(self, coro))

    async def backend_for(self, name: str):
        """The session's connection to `name`, opened and brought up to the session's state."""
        be = self.backends.get(name)
        if be is None or be.closed:
            if be is not None:
                self.drop_backend(be)
            if self.is_writer(name):
                lost = self.state.unrestorable()
                if lost:  # a new connection would silently lack them
                    raise slowpath.SessionLost(name, lost)
            be = await idle.acquire(self, name)
        await be.replay(self.state.history)
        return be

    async def send_command(self, pkt, cls, kind: int, name: str, stmt_id: int = 0) -> None:
        """Send a command to `name` by the slow path (fetch, reset: they follow their statement)."""
        await slowpath.send(self, Command(cls, pkt, kind, name, stmt_id))

    def writer(self) -> str:
        """The server this session writes to: the primary, or in master-master mode the
        master the session (or its current transaction) was given, while it lives."""
        w, st = self.worker, self.state
        if not w.multi_master:
            st.writer = w.primary_name
        elif st.writer is None or st.writer not in w.live_writers:
            st.writer = w.pick_writer()
        return st.writer

    def is_writer(self, name: str) -> bool:
        return name == self.state.writer or name == self.worker.primary_name

    def idle_for(self, now: float) -> float:
        """Seconds this logged-in session has been waiting for its client (frontend/idle.py)."""
        return idle.idle_for(self, now)

    def server_down(self, name: str) -> None:
        """The monitor declared `name` down: stop using it (an in-flight read is retried elsewhere)."""
        be = self.backends.get(name)
        if be is None or be.closed:
            return
        if be.relaying_for(self):
            be.transport.abort()  # -> command_lost(): retried if nothing reached the client yet
        elif self.state is None or self.state.trx_server != name:
            self.drop_backend(be)

    # ---- teardown ------------------------------------------------------------------------
    def drop_backend(self, be) -> None:
        """Stop using a connection whose state is unknown (it is closed, not pooled)."""
        name = be.server.name
        if self.backends.get(name) is be:
            del self.backends[name]
        self.stmts.forget_server(name)
        self.worker.pools.discard(be)

    def release_backends(self) -> None:
        """Give every connection back (to be reset and reused) or drop it (mid-response, or
        options a reset does not undo)."""
        pools = self.worker.pools
        for be in self.backends.values():
            (pools.discard if be.relaying_for(self) or be.dirty else pools.release)(be)
        self.backends = {}
