"""Per-session routing state: what ties a session to the primary, and the history of
session-changing statements that every backend connection of the session must carry.

Transactions are followed from the primary's status flags (SERVER_STATUS_IN_TRANS,
SERVER_STATUS_AUTOCOMMIT) rather than from parsing, so `SET autocommit=0`, implicit
commits by DDL and `COMMIT AND CHAIN` are all handled the way the server itself sees them.
"""

from __future__ import annotations

import itertools
import time

from proxy.routing import classify as C
from proxy.protocol.constants import COM_QUERY, SERVER_STATUS_AUTOCOMMIT, SERVER_STATUS_IN_TRANS
from proxy.protocol.packets import command, parse_ok


_versions = itertools.count(1)
_F_RARE, _F_MULTI_SESSION = C.F_RARE, C.F_MULTI_SESSION  # (module constants: read per statement)

# What pins a session to the primary (SessionState.pin; also a Plan's `why`).
PIN_TRANSACTION = "transaction"
PIN_TEMP_TABLE = "temporary table"
PIN_LOCK_TABLES = "LOCK TABLES"
PIN_NAMED_LOCK = "named lock"
PIN_HISTORY = "session history not replayable"
# What else keeps a session's connections from going back to the pool when it is idle (idle_release):
TIE_WARNINGS = "warnings not yet read"  # SHOW WARNINGS must find them on the same connection
TIE_FOUND_ROWS = "FOUND_ROWS() pending"  # after SQL_CALC_FOUND_ROWS
TIE_CURSOR = "open cursor"  # a prepared statement executed with a cursor: fetches go to its connection
# State a statement left on the connection that rwproxy neither follows nor can replay (F_CONN_STATE),
# by the statement's first word; kept for the session's life, like ProxySQL's multiplexing switch.
TIE_CONN_STATE = {"PREPARE": "prepared statements (SQL PREPARE)", "HANDLER": "open HANDLER tables",
                  "CALL": "state left by a stored procedure (CALL)"}
TIE_CONN_VALUE = "LAST_INSERT_ID(expr) or sequence values"
TIE_NEXT_TRX = "SET TRANSACTION pending"  # the next transaction's characteristics: never replayed
# Every reason ties() gives (read-only transactions without the server name): /metrics shows each, 0 or not.
TIE_REASONS = (PIN_TRANSACTION, PIN_TEMP_TABLE, PIN_LOCK_TABLES, PIN_NAMED_LOCK, PIN_HISTORY, "user variable",
               "read-only transaction", TIE_WARNINGS, TIE_FOUND_ROWS, TIE_CURSOR, *TIE_CONN_STATE.values(),
               TIE_CONN_VALUE, TIE_NEXT_TRX)


def conn_state_reason(digest: str) -> str:
    """Why a F_CONN_STATE statement ties its session (TIE_CONN_STATE, by the first word of the
    digest or of one of its statements)."""
    for part in digest.split(";"):
        why = TIE_CONN_STATE.get(part.lstrip(" (").split(" ", 1)[0].upper())
        if why:
            return why
    return TIE_CONN_VALUE


class SessionState:
    __slots__ = (
        "user", "ryw_mode", "in_trx", "ro_trx", "temp_tables", "lock_tables", "named_locks",
        "user_vars", "history", "history_overflow", "max_history", "last_backend", "last_write",
        "last_gtid", "failed_servers", "pending_write", "trx_server", "writer", "hversion", "trx_since",
        "insert_id", "warnings", "last_digest", "cursor", "conn_state", "next_trx", "wait_timeout",
        "diag_copy",
    )

    def __init__(self, user, default_ryw: str, max_history: int):
        self.user = user  # the UserConfig the client logged in as
        self.ryw_mode = user.read_your_writes or default_ryw  # read-your-writes: none, session, gtid
        self.max_history = max_history  # SET/USE entries kept for replay before the session pins
        # The client's own writes stay its own across COM_RESET_CONNECTION and COM_CHANGE_USER (a
        # reset does not make them invisible on the server either): not part of reset().
        self.last_write = 0.0  # monotonic time of the last write that became visible (session mode)
        self.last_gtid = ""  # the GTID of that write (gtid mode)
        self.reset()

    def keep_writes(self, before: SessionState) -> None:
        """COM_CHANGE_USER: the client's last write (read-your-writes) carries over from `before`."""
        self.last_write, self.last_gtid = before.last_write, before.last_gtid

    def reset(self) -> None:
        """A fresh session (login, COM_CHANGE_USER, COM_RESET_CONNECTION)."""
        self.in_trx = False  # a transaction is open (or autocommit is off) on the primary
        self.trx_since = 0.0  # monotonic time in_trx last became true (sessions table)
        self.trx_server: str | None = None  # the primary a transaction runs on
        self.writer: str | None = None  # the master this session writes to (master-master)
        self.ro_trx: str | None = None  # replica running a START TRANSACTION READ ONLY
        self.temp_tables = False  # CREATE TEMPORARY TABLE ran: its tables live on the primary connection
        self.lock_tables = False  # LOCK TABLES held
        self.named_locks = 0  # GET_LOCK() calls not yet released
        self.user_vars = False  # a user variable was set by an expression (only the primary knows it)
        self.history: list[bytes] = []  # raw command packets (seq 0) to replay on other backends
        self.hversion = next(_versions)  # changes with `history` (shared connections are keyed by it)
        self.history_overflow = False  # more SET/USE than max_history, or a SET prepared: primary only
        self.last_backend: str | None = None  # where the previous statement ran (connection-bound reads)
        self.pending_write = False  # a write ran on the primary whose transaction has not ended yet
        self.failed_servers: frozenset = frozenset()  # replicas that failed the statement being retried
        # What a released connection would take with it, kept or tied (idle_release):
        self.insert_id = 0  # the last AUTO_INCREMENT value a write generated (LAST_INSERT_ID() on a new connection)
        self.warnings = False  # the last statement left warnings
        self.last_digest = ""  # the last statement's digest (FOUND_ROWS() after SQL_CALC_FOUND_ROWS needs its connection)
        self.cursor = False  # a prepared statement was executed with a cursor (fetches follow it)
        self.conn_state = ""  # why the primary connection holds state rwproxy cannot replay ("" = none)
        self.next_trx = False  # SET TRANSACTION (no scope) ran; no statement on the primary has used it yet
        self.wait_timeout = 0.0  # the session's own SET wait_timeout, seconds (0: the server default)
        self.diag_copy: tuple | None = None  # (server, [@var...]) GET DIAGNOSTICS set there (diagnostics.py)

    def pin(self) -> str:
        """Why only the primary connection may see this session's statements now ("" when nothing
        pins it): a transaction, temporary tables, LOCK TABLES, named locks, or a SET/USE history
        that cannot be replayed elsewhere."""
        if self.in_trx:
            return PIN_TRANSACTION
        if self.temp_tables:
            return PIN_TEMP_TABLE
        if self.lock_tables:
            return PIN_LOCK_TABLES
        if self.named_locks > 0:
            return PIN_NAMED_LOCK
        if self.history_overflow:
            return PIN_HISTORY
        return ""

    def open_transaction(self) -> bool:
        """A transaction really runs (the server said SERVER_STATUS_IN_TRANS), on the primary or a
        read-only one on a replica; autocommit off alone is none (drain closes such a session)."""
        return self.trx_server is not None or self.ro_trx is not None

    def ties(self) -> list[str]:
        """Everything that ties this session to its connections now (sessions table): its pin,
        and user variables (reads that use them go to the primary)."""
        out = [self.pin()] if self.pin() else []
        if self.user_vars:
            out.append("user variable")
        if self.ro_trx is not None:
            out.append("read-only transaction on " + self.ro_trx)
        if self.warnings:
            out.append(TIE_WARNINGS)
        if self.found_rows_pending():
            out.append(TIE_FOUND_ROWS)
        if self.cursor:
            out.append(TIE_CURSOR)
        if self.conn_state:
            out.append(self.conn_state)
        if self.next_trx:
            out.append(TIE_NEXT_TRX)
        return out

    def releasable(self) -> bool:
        """Nothing ties the session to its connections: an idle one may go back to the pool and a
        new one (its SET/USE history replayed, LAST_INSERT_ID() restored) serve the next statement.
        autocommit=0 alone does not tie it (PyMySQL's default): no transaction is open until the
        server says one is (SERVER_STATUS_IN_TRANS), and a new connection gets autocommit=0 back."""
        return not (self.trx_server is not None or self.temp_tables or self.lock_tables or self.named_locks > 0
                    or self.history_overflow or self.user_vars or self.ro_trx is not None or self.warnings
                    or self.cursor or self.pending_write or self.found_rows_pending() or self.conn_state
                    or self.next_trx)

    def found_rows_pending(self) -> bool:
        """The last statement was a SELECT SQL_CALC_FOUND_ROWS (checked when idle, not per statement)."""
        return "SQL_CALC_FOUND_ROWS" in self.last_digest.upper()

    def unrestorable(self) -> list[str]:
        """What a new connection to the writer could not give back: the state that lives only on
        the connection the session has been using there ([] when the SET/USE history, replayed,
        restores everything). An open transaction is not listed: it ends as a rolled-back
        transaction (ERROR 1213), after which the session can go on."""
        lost = []
        if self.temp_tables:
            lost.append("temporary tables")
        if self.lock_tables:
            lost.append("LOCK TABLES")
        if self.named_locks > 0:
            lost.append("named locks (GET_LOCK)")
        if self.user_vars:
            lost.append("user variables")
        if self.history_overflow:
            lost.append("session settings that cannot be replayed")
        if self.conn_state:
            lost.append(self.conn_state)
        if self.next_trx:
            lost.append("next transaction's characteristics (SET TRANSACTION)")
        return lost

    def record(self, packet: bytes, flags: int, conns=()) -> None:
        """Keep a successful session-changing command for lazy replay (bounded, de-duplicated).
        `conns`: the session's server connections, whose `applied` counts of history entries
        are corrected when an older copy of the command moves to the end."""
        if flags & (C.F_AUTOCOMMIT_OFF | C.F_AUTOCOMMIT_ON) and not flags & C.F_USE_DB:
            # autocommit is followed from status flags; replicas always run with autocommit=1.
            # Other variables set beside it are replayed without it.
            if b"," not in packet:
                return
            rest = C.replayable_part(bytes(packet[5:]), "autocommit")
            if rest is None:  # (cannot be split: the primary connection alone keeps it)
                self.history_overflow = True
                return
            if not rest:
                return
            packet = command(COM_QUERY, rest)
        self.hversion = next(_versions)
        if packet in self.history:  # keep the latest position (order matters for SET)
            at = self.history.index(packet)
            del self.history[at]
            for conn in conns:  # one that ran the old copy runs it again where it is now (SET
                if conn.applied > at:  # @v='a', SET @v='b', SET @v='a': a connection that ran the
                    conn.applied -= 1  # first two must end with 'a' too, not stay at 'b')
        self.history.append(packet)
        if len(self.history) > self.max_history:
            # Too much to replay on a new connection: stay on the primary from now on.
            self.history.pop(0)
            self.history_overflow = True

    _PIN_FLAGS = (C.F_TEMP_TABLE | C.F_LOCK_TABLES | C.F_UNLOCK_TABLES | C.F_GET_LOCK | C.F_RELEASE_LOCK
                  | C.F_USER_VAR_WRITE | C.F_CONN_STATE | C.F_NEXT_TRX | C.F_SET_UNREPLAYABLE)

    # Statements that do not use up a SET TRANSACTION: itself, SETs, reads of connection values.
    _NOT_USING_TRX = C.F_NEXT_TRX | C.F_SET_UNREPLAYABLE | C.F_CONN_BOUND | C.F_USER_VAR_WRITE

    def after(self, flags: int, on_primary: bool, server: str, status: int, error: bool, digest: str = "",
              route: int = 0) -> None:
        """Update pins after a statement (`digest`, its `route`) finished on `server`."""
        self.last_backend = server
        if on_primary:
            in_trx = bool(status & SERVER_STATUS_IN_TRANS) or not status & SERVER_STATUS_AUTOCOMMIT
            if in_trx and not self.in_trx:
                self.trx_since = time.monotonic()
            self.in_trx = in_trx
            self.trx_server = server if status & SERVER_STATUS_IN_TRANS else None
        elif (self.ro_trx is not None or flags & C.F_READ_ONLY_TXN) and not error:
            # (an ERR carries no status: a statement refused inside the read-only transaction, such
            # as a write's 1792, leaves it open on the server, and its next statements must go there)
            self.ro_trx = server if status & SERVER_STATUS_IN_TRANS else None
        if self.next_trx and on_primary and not error and (
                status & SERVER_STATUS_IN_TRANS or (route == C.WRITE and not flags & self._NOT_USING_TRX)):
            self.next_trx = False  # a transaction (or an autocommit write) on the primary used it
        if flags >= _F_RARE and flags & _F_MULTI_SESSION:
            self.history_overflow = True  # (not replayable apart from the rest; error or not, it may have run)
        if error or not flags & self._PIN_FLAGS:
            return
        if flags & C.F_TEMP_TABLE:
            self.temp_tables = True
        if flags & C.F_LOCK_TABLES:
            self.lock_tables = True
        if flags & C.F_UNLOCK_TABLES:
            self.lock_tables = False
        if flags & C.F_GET_LOCK:
            self.named_locks += 1
        if flags & C.F_RELEASE_LOCK:
            self.named_locks = max(0, self.named_locks - 1)
        if flags & C.F_USER_VAR_WRITE:
            self.user_vars = True
        if flags & C.F_CONN_STATE and not self.conn_state:
            self.conn_state = conn_state_reason(digest)
        if flags & C.F_NEXT_TRX:
            self.next_trx = True
        if flags & C.F_SET_UNREPLAYABLE:
            self.history_overflow = True  # the primary keeps the value; nothing else could have it

    # Routed to the primary but changing no data: transaction control, named locks,
    # and reads of connection-bound values (LAST_INSERT_ID(), FOUND_ROWS()).
    _NOT_DATA = (C.F_BEGIN | C.F_COMMIT | C.F_ROLLBACK | C.F_GET_LOCK | C.F_RELEASE_LOCK | C.F_CONN_BOUND
                 | C.F_NEXT_TRX | C.F_SET_UNREPLAYABLE)

    def write_completed(self, route: int, flags: int) -> bool:
        """After a statement succeeded on the primary: True when a write became durable
        for other sessions (an autocommit write, or the COMMIT of a transaction that wrote)."""
        if route == C.WRITE and not flags & self._NOT_DATA:
            self.pending_write = True
        elif flags & C.F_ROLLBACK:
            self.pending_write = False
        if self.pending_write and not self.in_trx:
            self.pending_write = False
            return True
        return False

    def wrote_ok(self, final: bytes) -> bool:
        """A write succeeded on the primary; `final` is its OK packet's payload: keep the
        AUTO_INCREMENT value it generated, if any (LAST_INSERT_ID() on another connection).
        True if it generated one."""
        if final and final[0] == 0:
            iid = parse_ok(final).last_insert_id
            if iid:
                self.insert_id = iid
                return True
        return False

    def wrote(self, gtid: str = "") -> None:
        self.last_write = time.monotonic()
        if gtid:
            self.last_gtid = gtid
