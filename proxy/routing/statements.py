"""Binary-protocol prepared statements of one session, across several backends.

The client sees one statement id; each backend the statement ran on has its
own. Statements are prepared lazily where they execute. A client sends the
parameter types only with the first COM_STMT_EXECUTE after binding; a backend
that missed that execute would not know them, so the types are kept and put
back into the packet for such a backend.
"""

from __future__ import annotations

from collections import OrderedDict

from proxy.protocol.constants import MAX_PACKET

# MariaDB's direct execution (10.2+): a client may pipeline COM_STMT_PREPARE and a COM_STMT_EXECUTE
# (or SEND_LONG_DATA, RESET, FETCH) whose statement id is -1, "the statement prepared last".
DIRECT_ID = 0xFFFFFFFF


class Stmt:
    __slots__ = ("sql", "cls", "prepare_packet", "nparams", "ids", "types", "types_sent", "long_data", "last")

    def __init__(self, sql: bytes, cls, prepare_packet: bytes, nparams: int):
        self.sql = sql
        self.cls = cls
        self.prepare_packet = prepare_packet  # the client's COM_STMT_PREPARE, to prepare elsewhere
        self.nparams = nparams
        self.ids: dict[str, int] = {}  # server name -> backend statement id
        self.types: bytes | None = None  # last parameter-type block the client sent
        self.types_sent: set[str] = set()  # servers that received `types`
        self.long_data = False  # COM_STMT_SEND_LONG_DATA went to the primary since the last execute
        self.last: str | None = None  # server of the last execute (cursor fetches go there)


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

    def direct(self, pkt: bytes) -> bytes:
        """A statement command with id -1 (direct execution) made to name the statement prepared
        last; unchanged when there is none, so it fails as the server's would (unknown 4294967295)."""
        if self.last:
            return pkt[:5] + self.last.to_bytes(4, "little") + pkt[9:]
        return pkt

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


def execute_packet_for(pkt: bytes, stmt: Stmt, server: str, backend_id: int) -> bytes:
    """Rewrite a client's COM_STMT_EXECUTE for one backend: its statement id, and the
    parameter types if this backend has not seen the current ones."""
    n = stmt.nparams
    if n and len(pkt) < MAX_PACKET:
        bound_at = 4 + 10 + (n + 7) // 8  # header, cmd+id+flags+iteration, NULL bitmap
        if bound_at < len(pkt):
            if pkt[bound_at] == 1:
                stmt.types = pkt[bound_at + 1 : bound_at + 1 + 2 * n]
                stmt.types_sent = {server}
            elif stmt.types is not None and server not in stmt.types_sent:
                body = pkt[4:bound_at] + b"\x01" + stmt.types + pkt[bound_at + 1 :]
                stmt.types_sent.add(server)
                pkt = len(body).to_bytes(3, "little") + pkt[3:4] + body
    if pkt[5:9] != backend_id.to_bytes(4, "little"):
        pkt = pkt[:5] + backend_id.to_bytes(4, "little") + pkt[9:]
    return pkt
