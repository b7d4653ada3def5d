"""Binary-protocol prepared statements of one session, across several backends.

The client sees one statement id; each backend the statement ran on has its
own. Statements are prepared lazily where they execute. A client sends the
parameter types only with the first COM_STMT_EXECUTE after binding; a backend
that missed that execute would not know them, so the types are kept and put
back into the packet for such a backend.
"""

from __future__ import annotations

from collections import OrderedDict

from proxy.protocol.constants import COM_STMT_EXECUTE, CURSOR_TYPE_NO_CURSOR, MAX_PACKET
from proxy.protocol.packets import execute_types_offset, rewrite_execute

# MariaDB's direct execution (10.2+): a client may pipeline COM_STMT_PREPARE and a COM_STMT_EXECUTE
# (or SEND_LONG_DATA, RESET, FETCH) whose statement id is -1, "the statement prepared last".
DIRECT_ID = 0xFFFFFFFF


class Stmt:
    __slots__ = ("sql", "cls", "prepare_packet", "nparams", "types_at", "ids", "types", "types_sent", "long_data",
                 "last", "kill")

    def __init__(self, sql: bytes, cls, prepare_packet: bytes, nparams: int):
        self.sql = sql
        self.cls = cls
        self.prepare_packet = prepare_packet  # the client's COM_STMT_PREPARE, to prepare elsewhere
        self.nparams = nparams
        self.types_at = execute_types_offset(nparams)  # where an execute's new-params-bound flag sits
        self.ids: dict[str, int] = {}  # server name -> backend statement id
        self.types: bytes | None = None  # last parameter-type block the client sent
        self.types_sent: set[str] = set()  # servers that received `types`
        self.long_data = False  # COM_STMT_SEND_LONG_DATA went to the primary since the last execute
        self.last: str | None = None  # server of the last execute (cursor fetches go there)
        self.kill: tuple | None = None  # a KILL rwproxy answers: (kills the connection?, id or None for `?`)

    def packet_for(self, pkt: bytes, server: str, backend_id: int) -> bytes:
        """The client's COM_STMT_EXECUTE for the session's own connection to `server`: that
        backend's id, and the parameter types if this connection has not seen the current ones.
        A COM_STMT_BULK_EXECUTE (which carries its own types) only gets the backend's id."""
        if pkt[4] != COM_STMT_EXECUTE:
            return pkt[:5] + backend_id.to_bytes(4, "little") + pkt[9:]
        at = self.types_at
        types = None
        if 0 <= at < len(pkt) < MAX_PACKET:
            if pkt[at] == 1:  # new types bound: remember them; only `server` has seen them
                self.types = pkt[at + 1 : at + 1 + 2 * self.nparams]
                self.types_sent = {server}
            elif self.types is not None and server not in self.types_sent and not pkt[at]:
                types = self.types  # (a flag other than 0 or 1 goes as sent: the server's answer)
                self.types_sent.add(server)
        return rewrite_execute(pkt, backend_id, types, at)

    def shared_packet(self, pkt: bytes, backend_id: int) -> bytes | None:
        """The client's COM_STMT_EXECUTE for a shared connection: the backend's id, and always the
        parameter types (another session's may be the last ones sent there). None when it cannot
        share: it opens a cursor, it is split, the types were never sent, or it is a bulk execute."""
        if len(pkt) < 10 or pkt[9] != CURSOR_TYPE_NO_CURSOR or len(pkt) >= MAX_PACKET or pkt[4] != COM_STMT_EXECUTE:
            return None
        types, at = None, self.types_at
        if self.nparams:
            if at >= len(pkt):
                return None
            if pkt[at] == 1:
                self.types = pkt[at + 1 : at + 1 + 2 * self.nparams]
                self.types_sent = set()  # the session's own connections have not seen these
            elif self.types is None:
                return None
            elif not pkt[at]:
                types = self.types  # (a flag other than 0 or 1 goes as sent: the server's answer)
        return rewrite_execute(pkt, backend_id, types, at)


class StatementMap:
    """Client statement ids -> Stmt, plus a per-server LRU bound of open backend statements."""

    def __init__(self, max_per_connection: int):
        self.stmts: dict[int, Stmt] = {}
        self.next_id = 1
        self.last = 0  # id of the statement prepared last; 0 after a failed prepare (as the server forgets it)
        self.max_per_connection = max_per_connection
        self.lru: dict[str, OrderedDict] = {}  # server -> OrderedDict(client id -> None)

    def add(self, stmt: Stmt) -> int:
        sid = self.next_id
        self.next_id += 1
        self.stmts[sid] = stmt
        self.last = sid
        return sid

    def bind(self, sid: int, server: str, backend_id: int) -> list[int]:
        """Record a backend id; returns backend ids to close on that server to stay within the bound."""
        stmt = self.stmts[sid]
        stmt.ids[server] = backend_id
        lru = self.lru.setdefault(server, OrderedDict())
        lru[sid] = None
        lru.move_to_end(sid)
        evicted = []
        while len(lru) > self.max_per_connection:
            old, _ = lru.popitem(last=False)
            o = self.stmts.get(old)
            if o is not None and server in o.ids:
                evicted.append(o.ids.pop(server))
                o.types_sent.discard(server)
        return evicted

    def touch(self, sid: int, server: str) -> None:
        lru = self.lru.get(server)
        if lru is not None and sid in lru:
            lru.move_to_end(sid)

    def remove(self, sid: int) -> Stmt | None:
        stmt = self.stmts.pop(sid, None)
        if stmt is not None:
            for server in stmt.ids:
                self.lru.get(server, {}).pop(sid, None)
        return stmt

    def long_data_pending(self) -> bool:
        """COM_STMT_SEND_LONG_DATA chunks wait on the primary connection for their execute (the
        server keeps them there only: the connection must not go back to the pool)."""
        return any(stmt.long_data for stmt in self.stmts.values())

    def forget_server(self, server: str) -> None:
        """A backend connection went away: its statements must be prepared again."""
        for stmt in self.stmts.values():
            stmt.ids.pop(server, None)
            stmt.types_sent.discard(server)
        self.lru.pop(server, None)

    def clear(self) -> None:
        self.stmts.clear()
        self.lru.clear()
        self.last = 0
