"""A session's binary-protocol statements: prepare where the statement runs, execute with
the backend's id and parameter types, fetch/reset/close/long data (mixed into ClientConnection)."""

from __future__ import annotations

import asyncio

from proxy.routing import classify as C
from proxy.backend.connection import BackendError
from proxy.protocol.constants import COM_STMT_CLOSE, COM_STMT_EXECUTE, COM_STMT_FETCH, COM_STMT_RESET, COM_STMT_SEND_LONG_DATA
from proxy.protocol.packets import frame, logical_payload as _payload
from proxy.protocol.scan import PREPARE, RESULT, ROWS, SIMPLE
from proxy.routing.router import PRIMARY, NoServer, Reject
from proxy.routing.statements import DIRECT_ID, Stmt, execute_packet_for

_STMT_NAMES = {COM_STMT_EXECUTE: "execute", COM_STMT_FETCH: "fetch", COM_STMT_RESET: "reset"}
_SESSION_READ = C.Classification(C.READ, 0, "")


class StatementCommands:
    def _execute(self, pkt):
        sid = int.from_bytes(pkt[5:9], "little") if len(pkt) >= 9 else -1
        if sid == DIRECT_ID:
            pkt = self.stmts.direct(pkt)
            sid = int.from_bytes(pkt[5:9], "little")
        stmt = self.stmts.stmts.get(sid)
        if stmt is None:
            return self._error(1243, b"HY000", f"Unknown prepared statement handler ({sid}) given to mysqld_stmt_execute")
        if stmt.long_data:  # long data was sent to the primary; the execute must follow it
            stmt.long_data = False
            return self._dispatch(pkt, C.Classification(C.WRITE, stmt.cls.flags, stmt.cls.digest), RESULT, sid)
        self._dispatch(pkt, stmt.cls, RESULT, sid)

    async def _stmt_packet(self, pkt, sid, name, be, quiet: bool = False):
        """The statement packet for backend `name`, preparing the statement there if needed.
        None when that fails; the client is told why unless `quiet` (the proxy's own replay)."""
        stmt = self.stmts.stmts.get(sid)
        if stmt is None:
            if not quiet:
                self._error(1243, b"HY000", f"Unknown prepared statement handler ({sid})")
            return None
        bid = stmt.ids.get(name)
        if bid is None:
            resp = await be.command(stmt.prepare_packet, PREPARE)
            if resp[4] == 0xFF:
                if not quiet:
                    self.write(resp[:3] + b"\x01" + resp[4:])
                return None
            bid = int.from_bytes(resp[5:9], "little")
            for old in self.stmts.bind(sid, name, bid):
                be.transport.write(frame(b"\x19" + old.to_bytes(4, "little"), 0))
        else:
            self.stmts.touch(sid, name)
        stmt.last = name
        if pkt[4] == COM_STMT_EXECUTE:
            return execute_packet_for(pkt, stmt, name, bid)
        return pkt[:5] + bid.to_bytes(4, "little") + pkt[9:]

    async def _prepare(self, pkt):
        self.stmts.last = 0  # until this prepare succeeds, -1 names no statement
        sql = bytes(_payload(pkt)[1:])  # bytes: shared connections key their statements by it
        cls = self.worker.classifier.classify(sql)
        st = self.state
        try:
            target = self.worker.router.route(st, cls, self.worker.topology)
        except (Reject, NoServer):
            target = PRIMARY
        name = self.writer() if target is PRIMARY else target
        st.gtid_wait = False
        try:
            be = await self.backend_for(name)
        except (BackendError, ConnectionError, asyncio.TimeoutError):
            if self._is_writer(name):
                raise
            name = self.writer()
            be = await self.backend_for(name)
        resp = await be.command(pkt, PREPARE)
        if resp[4] == 0x00:
            nparams = int.from_bytes(resp[11:13], "little")
            sid = self.stmts.add(Stmt(sql, cls, pkt, nparams))
            for old in self.stmts.bind(sid, name, int.from_bytes(resp[5:9], "little")):
                be.transport.write(frame(b"\x19" + old.to_bytes(4, "little"), 0))
            resp = resp[:5] + sid.to_bytes(4, "little") + resp[9:]
        self.write(resp)

    def _stmt_other(self, pkt, cmd):
        sid = int.from_bytes(pkt[5:9], "little") if len(pkt) >= 9 else -1
        if sid == DIRECT_ID and cmd != COM_STMT_CLOSE:  # the server ignores COM_STMT_CLOSE of -1
            pkt = self.stmts.direct(pkt)
            sid = int.from_bytes(pkt[5:9], "little")
        stmt = self.stmts.stmts.get(sid)
        if stmt is None:
            if cmd in _STMT_NAMES:  # CLOSE and SEND_LONG_DATA have no response, so no error either
                self._error(1243, b"HY000", f"Unknown prepared statement handler ({sid}) given to mysqld_stmt_{_STMT_NAMES[cmd]}")
            return
        if cmd == COM_STMT_CLOSE:
            self.stmts.remove(sid)
            for name, bid in stmt.ids.items():
                be = self.backends.get(name)
                if be is not None and not be.closed:
                    be.transport.write(frame(b"\x19" + bid.to_bytes(4, "little"), 0))
            return
        primary = self.writer()
        if cmd == COM_STMT_SEND_LONG_DATA:
            stmt.long_data = True
            self._spawn(self._send_no_reply(pkt, sid, primary))
            return
        name = stmt.last or next(iter(stmt.ids), primary)
        kind = ROWS if cmd == COM_STMT_FETCH else SIMPLE
        self._spawn(self._slow_send(pkt, _SESSION_READ if cmd == COM_STMT_FETCH else stmt.cls, kind, name, sid))

    async def _send_no_reply(self, pkt, sid, name):
        be = await self.backend_for(name)
        pkt = await self._stmt_packet(pkt, sid, name, be)
        if pkt is not None:
            be.transport.write(pkt)
