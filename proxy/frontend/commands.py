"""The rarer commands of a session: ping, quit, init db, set option, change user, reset
connection, and commands rwproxy refuses (mixed into ClientConnection)."""

from __future__ import annotations

from proxy.routing import classify as C
from proxy.backend.connection import BackendError
from proxy.frontend.login import parse_change_user
from proxy.protocol.constants import (
    COM_CHANGE_USER, COM_FIELD_LIST, COM_INIT_DB, COM_PING, COM_PROCESS_KILL, COM_QUIT, COM_RESET_CONNECTION,
    COM_SET_OPTION, COM_STATISTICS, COM_STMT_CLOSE, COM_STMT_FETCH, COM_STMT_PREPARE, COM_STMT_RESET,
    COM_STMT_SEND_LONG_DATA, ER_UNKNOWN_COM_ERROR, SERVER_STATUS_AUTOCOMMIT,
)
from proxy.protocol.packets import ProtocolError, logical_payload as _payload, ok_packet
from proxy.protocol.scan import FIELD_LIST, SIMPLE, STATISTICS

# Commands that always run on the primary, with the response kind to scan.
_PRIMARY_KIND = {COM_FIELD_LIST: FIELD_LIST, COM_STATISTICS: STATISTICS}


class OtherCommands:
    def _other_command(self, pkt, cmd):
        if cmd == COM_PING:
            self.write(ok_packet(1, self.status))
        elif cmd == COM_QUIT:
            self._close()
        elif cmd == COM_STMT_PREPARE:
            self._spawn(self._prepare(pkt))
        elif cmd in (COM_STMT_CLOSE, COM_STMT_SEND_LONG_DATA, COM_STMT_RESET, COM_STMT_FETCH):
            self._stmt_other(pkt, cmd)
        elif cmd == COM_PROCESS_KILL:  # mysql_kill(): the id is an rwproxy session id (proxy/kill.py)
            self._spawn(self._kill(True, int.from_bytes(_payload(pkt)[1:5].ljust(4, b"\0"), "little")))
        elif cmd in _PRIMARY_KIND:
            self._dispatch(pkt, C.Classification(C.WRITE, 0, ""), _PRIMARY_KIND[cmd])
        elif cmd == COM_INIT_DB:
            db = _payload(pkt)[1:].decode("utf-8", "replace")
            self._dispatch(pkt, C.Classification(C.SESSION, C.F_USE_DB, "", db), SIMPLE)
        elif cmd == COM_SET_OPTION:
            self._spawn(self._set_option(pkt))
        elif cmd == COM_CHANGE_USER:
            self._spawn(self._change_user(pkt))
        elif cmd == COM_RESET_CONNECTION:
            self._spawn(self._reset_connection())
        else:
            self._error(*ER_UNKNOWN_COM_ERROR, f"Unknown command (0x{cmd & 0xFF:02x}): not supported by rwproxy")

    async def _set_option(self, pkt):
        # Multi-statements on/off shapes how every backend parses COM_QUERY: apply it to all.
        resp = None
        for name in list(self.backends) or [self.writer()]:
            be = await self.backend_for(name)
            resp = await be.command(pkt, SIMPLE)
            be.dirty = True
        self.write(resp)

    async def _reset_connection(self):
        for be in list(self.backends.values()):
            if not await be.reset():
                self._drop_backend(be)
            else:
                be.applied = 0
        self.stmts.clear()
        self.state.reset()
        self.db = self.login_db
        self.status = SERVER_STATUS_AUTOCOMMIT
        self.write(ok_packet(1, self.status))

    async def _change_user(self, pkt):
        try:
            req = parse_change_user(_payload(pkt), self.caps)
        except ProtocolError as e:  # as MariaDB answers: the session carries on unchanged
            return self._error(*ER_UNKNOWN_COM_ERROR, f"Unknown command: malformed COM_CHANGE_USER packet ({e})")
        w = self.worker
        user, seq = await w.authenticator.login(self, req.user, req.plugin, req.auth_response, self.salt, 1, self.host, self.tls)
        self._release_all()
        self.stmts.clear()
        if req.charset:
            self.charset = req.charset & 0xFF
        self.start_session(user, req.database)
        self.status = SERVER_STATUS_AUTOCOMMIT
        try:
            await self.backend_for(self.writer())
        except BackendError as e:
            self._error(e.code, e.sqlstate.encode(), e.message, seq)
            return self._close()
        self.write(ok_packet(seq, self.status))
