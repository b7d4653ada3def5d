"""Route kinds, flags and the Classification record (re-exported by `proxy.classify`).

Kept apart from the classifier so the rule modules can build results without import cycles.
"""

from __future__ import annotations

from dataclasses import dataclass

# Route kinds.
READ, WRITE, SESSION = 1, 2, 3

# Flags (OR-ed).
F_BEGIN = 1 << 0
F_READ_ONLY_TXN = 1 << 1
F_COMMIT = 1 << 2
F_ROLLBACK = 1 << 3
F_AUTOCOMMIT_OFF = 1 << 4
F_AUTOCOMMIT_ON = 1 << 5
F_TEMP_TABLE = 1 << 6
F_LOCK_TABLES = 1 << 7
F_UNLOCK_TABLES = 1 << 8
F_GET_LOCK = 1 << 9
F_RELEASE_LOCK = 1 << 10
F_USER_VAR_WRITE = 1 << 11
F_USER_VAR_READ = 1 << 12
F_CONN_BOUND = 1 << 13
F_USE_DB = 1 << 14
F_SQL_PS = 1 << 15
F_MULTI = 1 << 16
F_HINT_PRIMARY = 1 << 17
F_HINT_REPLICA = 1 << 18
F_IMPLICIT_COMMIT = 1 << 19
F_XA = 1 << 20
F_LOAD_DATA = 1 << 21
F_SET_GLOBAL = 1 << 22
F_UNPARSED = 1 << 23
# Additions to the agreed interface:
# COMMIT/ROLLBACK ... RELEASE: the server closes the connection after the statement.
F_RELEASE_SESSION = 1 << 24
# Longer than the classifier's scan limit: classified by a cheap conservative scan (always WRITE);
# flags other than F_MULTI/F_LOAD_DATA/hints are not looked for.
F_OVERSIZED = 1 << 25
# KILL [HARD|SOFT] [CONNECTION|QUERY] ...: numeric ids are rwproxy session ids (proxy/kill.py).
F_KILL = 1 << 26
# Leaves state on its connection that rwproxy neither follows nor can replay on another one:
# text-protocol PREPARE, HANDLER ... OPEN, CALL (a procedure may set user variables or create
# temporary tables), LAST_INSERT_ID(expr), a sequence's NEXTVAL/SETVAL, a big statement with a
# user variable. The session keeps that connection for life (SessionState.conn_state).
F_CONN_STATE = 1 << 27
# SET TRANSACTION ... / SET @@tx_isolation = ... without a scope: the next transaction's
# characteristics only. Not replayed; the session keeps its primary connection until a statement
# there consumes them (SessionState.next_trx).
F_NEXT_TRX = 1 << 28
# SET of a session variable from something rwproxy cannot replay elsewhere (a function it does not
# know, a subquery, a user variable): the session stays on the primary (PIN_HISTORY).
F_SET_UNREPLAYABLE = 1 << 29
# With F_CONN_BOUND: the value belongs to the previous statement (FOUND_ROWS(), ROW_COUNT(), SHOW
# WARNINGS/ERRORS/STATUS, @@warning_count, GET DIAGNOSTICS), so the statement goes where that one ran.
# F_CONN_BOUND alone is a value of the session's writer connection (LAST_INSERT_ID(), LASTVAL(),
# CONNECTION_ID(), @@identity, @@last_gtid...), which a read on a replica in between does not change.
F_PREVIOUS = 1 << 30
# An INSERT/UPDATE/DELETE/REPLACE that calls a function rwproxy does not know (stored or
# user-defined, not declared read-only): it may set user variables or create a temporary table on
# whatever connection runs it, so it never goes on a connection other sessions share.
F_STORED_CALL = 1 << 31
# SET [SESSION] wait_timeout = ... (any spelling of the session scope): the session's own idle limit,
# which rwproxy enforces on the client connection as the server would (frontend/idle.py reads the
# value with session_value(); the digest cache keeps only the flag).
F_WAIT_TIMEOUT = 1 << 32
# DROP {DATABASE | SCHEMA} [IF EXISTS] <name>, with the name in the classification's `db`: if it was
# the session's current database, the server leaves that session without one (frontend/commands.py).
F_DROP_DB = 1 << 33
# A multi-statement with a SET or USE among its statements: it runs on the primary, whose connection
# alone then has what it set, even when a later statement of it failed (RouterState.after).
F_MULTI_SESSION = 1 << 34
# GET DIAGNOSTICS into user variables: where it ran on a replica, they are copied to the writer
# before the session's next statement (frontend/diagnostics.py).
F_DIAG_VARS = 1 << 35
# The flags from here up are rare and tested on the hot path with `flags >= F_RARE`, which allocates
# nothing (`&` on an int this big does).
F_RARE = F_WAIT_TIMEOUT

FLAG_NAMES = {v: k for k, v in globals().items() if k.startswith("F_") and isinstance(v, int)}
ROUTE_NAMES = {READ: "READ", WRITE: "WRITE", SESSION: "SESSION"}


def flag_names(flags: int) -> list[str]:
    """Names of the bits set in `flags` (for logs, tests and the admin interface)."""
    return [name for bit, name in sorted(FLAG_NAMES.items()) if flags & bit]


@dataclass(frozen=True, slots=True)
class Classification:
    """What a statement is; cached per digest, so it must not depend on the statement's literals."""

    route: int
    flags: int
    digest: str  # normalised text: literals -> ?, comments/whitespace folded, rwproxy hints kept
    db: str | None = None  # USE db
    # F_MULTI only: the statements in order (their own route/flags/db), so the router can apply
    # their effects (BEGIN ... COMMIT, USE, SET) in sequence; the packet itself is never split.
    parts: tuple["Classification", ...] = ()

    def __repr__(self) -> str:
        return (f"Classification({ROUTE_NAMES.get(self.route, self.route)}, "
                f"{'|'.join(flag_names(self.flags)) or '0'}, {self.digest!r}"
                + (f", db={self.db!r}" if self.db is not None else "")
                + (f", parts={len(self.parts)}" if self.parts else "") + ")")
