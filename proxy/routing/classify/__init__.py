"""Statement classification for read/write splitting: what kind of statement is this text?

Runs on the hot path of every COM_QUERY / COM_STMT_PREPARE, so:

1. An exact-text table answers the handful of fixed statements drivers send constantly
   (BEGIN, COMMIT, SET autocommit=0 ...).  It is filled at start-up by the full path, so it
   cannot disagree with it.
2. Otherwise a cache key is computed from the raw bytes, in one C-level regex pass when the
   text has no comments or backticks (literals -> ?, comments dropped, executable comments
   unwrapped, rwproxy hints kept, long literal lists folded), and looked up in a bounded LRU of
   Classification objects.  The `digest` shown in a Classification (whitespace and all literal
   lists folded as well) is computed only on a miss.
3. On a miss the statement is lexed (lex.py), split at top-level ';', and each statement
   is classified by its leading keywords (rules.py); query-shaped statements are parsed
   with sqlglot and their AST walked (query.py).  Anything unknown or unparseable is
   WRITE | F_UNPARSED.

A cached result is reused for every text with the same key, so a classification must not
depend on literals.  The only literal-dependent statements (SET autocommit=<value>, USE <db>)
are marked uncacheable and always take the (sqlglot-free) miss path.

Size limits (the miss path lexes in Python at ~1.3 µs per byte):
- statements longer than `max_scan_bytes` (default 32 KiB) skip the key and the lexer: a
  C-level scan classifies them as WRITE | F_OVERSIZED, plus F_MULTI if several statements, plus
  F_UNPARSED unless they are a plain INSERT/REPLACE/UPDATE/DELETE/LOAD without variables or
  stateful functions, plus F_CONN_STATE if they use variables or stateful functions or are a
  CALL/PREPARE/HANDLER/SET.  Never cached.  (A 32 KiB+ SELECT therefore runs on the primary.)
- on a miss, a plain write longer than 2 KiB (batch INSERTs) gets the same cheap scan: its
  route is WRITE anyway.  Not cached, so results never depend on which text came first.
- query-shaped statements whose reduced text (literal IN-lists cut to one element, long strings
  emptied) exceeds `max_parse_chars` (default 16 KiB) are not parsed: WRITE | F_UNPARSED
  (sqlglot's cost grows faster than linearly: ~20 ms for 12 KB with sqlglotc, ~4x without).
- keys longer than 4 KiB are not cached (bounds the cache's memory to ~40 MB worst case at
  10,000 entries; typical keys are 50-300 bytes).

For the router:
- F_CONN_BOUND statements (LAST_INSERT_ID(), FOUND_ROWS(), SHOW WARNINGS, SHOW [SESSION] STATUS,
  @@warning_count, CONNECTION_ID(), GET DIAGNOSTICS ...) always come with route WRITE: check the
  flag before the route. With F_PREVIOUS (FOUND_ROWS(), ROW_COUNT(), SHOW WARNINGS/ERRORS/STATUS,
  @@warning_count, @@error_count, GET DIAGNOSTICS) they ask about the previous statement: send them
  to the connection that ran it. Without, they ask the session's writer connection
  (LAST_INSERT_ID(), LASTVAL(), CONNECTION_ID(), @@identity, @@last_gtid).
- F_STORED_CALL: a DML statement calling a function not known to be free of side effects (a
  stored function can set user variables): never runs on a shared connection.
- F_NEXT_TRX: SET TRANSACTION / SET @@tx_isolation (no scope) set the next transaction's
  characteristics only: WRITE, never replayed. F_SET_UNREPLAYABLE: a session variable set from
  a user variable, an unknown function or another one-shot: WRITE, the session stays on the primary.
- F_CONN_STATE statements leave state only their connection has and rwproxy cannot replay
  (PREPARE, HANDLER ... OPEN, CALL, LAST_INSERT_ID(expr), NEXTVAL/SETVAL/NEXT VALUE FOR): the
  session must keep that connection (it is never released when idle).
- SET: SESSION when every assignment can be replayed elsewhere; an assignment of a user
  variable from anything but constants (SET @a = NOW()), or a value using a stateful/unknown
  function, makes it WRITE (still with F_USER_VAR_WRITE etc.).  Any GLOBAL/PERSIST assignment
  makes the whole statement WRITE | F_SET_GLOBAL (a session part of such a mixed SET is then not
  replayed).  SET ... autocommit=<anything but 1/ON/TRUE> is F_AUTOCOMMIT_OFF (unknown values
  keep the session on the primary).  F_AUTOCOMMIT_ON also commits an open transaction.
- COMMIT/ROLLBACK AND CHAIN set F_BEGIN as well; ... RELEASE sets F_RELEASE_SESSION.
- F_MULTI: route WRITE, flags are the union of the parts', db the last USE's, and `parts`
  gives each statement's classification in order.
- Hints only set F_HINT_PRIMARY / F_HINT_REPLICA; the route stays the statement's own.
- sql_mode NO_BACKSLASH_ESCAPES: the session hands over plain_backslashes(text) (lex.py); the
  server's status flags say when it is on.
- Not handled: sql_mode ANSI_QUOTES with a backslash inside a double-quoted identifier (lexed as a
  string with escapes; no status flag shows the mode), views or triggers hiding side effects,
  HANDLER ... OPEN state (WRITE, no pinning flag).

Not thread-safe: one Classifier per event loop / worker process.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

from proxy.routing.classify.const import (  # noqa: F401  (re-exported interface)
    F_AUTOCOMMIT_OFF, F_AUTOCOMMIT_ON, F_BEGIN, F_COMMIT, F_CONN_BOUND, F_CONN_STATE, F_GET_LOCK, F_HINT_PRIMARY,
    F_HINT_REPLICA, F_IMPLICIT_COMMIT, F_KILL, F_LOAD_DATA, F_LOCK_TABLES, F_MULTI, F_NEXT_TRX, F_OVERSIZED,
    F_PREVIOUS, F_READ_ONLY_TXN, F_RELEASE_LOCK, F_RELEASE_SESSION, F_ROLLBACK, F_SET_GLOBAL, F_SET_UNREPLAYABLE, F_SQL_PS,
    F_STORED_CALL, F_TEMP_TABLE, F_UNLOCK_TABLES, F_UNPARSED, F_USE_DB, F_USER_VAR_READ, F_USER_VAR_WRITE,
    F_DIAG_VARS, F_DROP_DB, F_MULTI_SESSION, F_RARE, F_WAIT_TIMEOUT, F_XA, FLAG_NAMES, READ, ROUTE_NAMES, SESSION, WRITE,
    Classification, flag_names,
)
from proxy.routing.classify.lex import (
    cache_key, cheap_scan, code_text, digest, find_hints, is_write_head, plain_backslashes, split_statements,
    tokenize,
)
from proxy.routing.classify.rules import Rules
from proxy.routing.classify.sets import session_assignment, without_assignment

MAX_SCAN_BYTES = 32 * 1024
BIG_WRITE_BYTES = 2048
MAX_PARSE_CHARS = 16 * 1024
MAX_CACHED_KEY = 4096

# Fixed statements that drivers and pools send all the time, answered by exact text.
_EXACT_SEEDS = [
    "BEGIN", "BEGIN WORK", "COMMIT", "COMMIT WORK", "ROLLBACK", "ROLLBACK WORK",
    "START TRANSACTION", "START TRANSACTION READ ONLY", "START TRANSACTION READ WRITE",
    "START TRANSACTION WITH CONSISTENT SNAPSHOT",
    "SET autocommit=0", "SET autocommit=1", "SET autocommit = 0", "SET autocommit = 1",
    "SET AUTOCOMMIT = 0", "SET AUTOCOMMIT = 1", "SET AUTOCOMMIT=0", "SET AUTOCOMMIT=1",
    "SET @@session.autocommit = OFF", "SET @@session.autocommit = ON",
    "SET SESSION autocommit = 0", "SET SESSION autocommit = 1",
    "SELECT 1", "SELECT @@version", "SELECT VERSION()", "SELECT DATABASE()",
    "SELECT @@session.transaction_read_only", "SELECT @@session.tx_read_only",
    "SELECT @@transaction_isolation", "SELECT @@tx_isolation", "SELECT @@autocommit",
    "SET NAMES utf8mb4", "SET NAMES utf8",
]
_EXACT_MAX_LEN = max(len(t) for t in _EXACT_SEEDS)
_PLAIN_WRITES = {"INSERT": 0, "REPLACE": 0, "UPDATE": 0, "DELETE": 0, "LOAD": F_LOAD_DATA}
# Big statements that (may) leave state on their connection (see F_CONN_STATE).
_STATE_HEADS = frozenset(("CALL", "PREPARE", "HANDLER", "SET"))


class Classifier:
    """Classifies statement texts; see the module docstring for the design and limits."""

    def __init__(self, readonly_functions: Iterable[str] = (), cache_size: int = 10000, *,
                 max_scan_bytes: int = MAX_SCAN_BYTES,
                 max_parse_chars: int = MAX_PARSE_CHARS) -> None:
        """readonly_functions: user-defined/stored functions declared free of side effects
        ("f" or "db.f", case-insensitive), so SELECTs calling them may go to replicas."""
        names = set()
        for f in readonly_functions:
            names.add(f.replace("`", "").strip().upper())
        self.readonly = frozenset(names)
        self.cache_size = max(1, int(cache_size))
        self.max_scan_bytes = max_scan_bytes
        self.hits = self.misses = 0
        self.fast_hits = self.oversized = self.uncacheable = 0
        self._cache: OrderedDict[bytes, Classification] = OrderedDict()
        self._rules = Rules(self.readonly, max_parse_chars)
        self._exact: dict[bytes, Classification] = {}
        for text in _EXACT_SEEDS:
            for variant in (text, text.lower()):
                raw = variant.encode()
                self._exact[raw] = self.full_classify(raw)
        self._rules.parses = 0

    @property
    def parses(self) -> int:
        """Number of sqlglot parses done (cache misses of query-shaped statements)."""
        return self._rules.parses

    def cache_info(self) -> dict:
        total = self.hits + self.misses
        return {
            "hits": self.hits, "misses": self.misses, "parses": self.parses,
            "fast_hits": self.fast_hits, "oversized": self.oversized,
            "uncacheable": self.uncacheable, "size": len(self._cache),
            "maxsize": self.cache_size, "hit_ratio": (self.hits / total) if total else 0.0,
        }

    def cache_clear(self) -> None:
        self._cache.clear()

    def classify(self, sql: bytes | str) -> Classification:
        """Classification of one COM_QUERY / COM_STMT_PREPARE text; never raises."""
        raw = sql if type(sql) is bytes else _to_bytes(sql)
        if len(raw) <= _EXACT_MAX_LEN:
            c = self._exact.get(raw)
            if c is not None:
                self.hits += 1
                self.fast_hits += 1
                return c
        if len(raw) > self.max_scan_bytes:
            self.misses += 1
            self.oversized += 1
            return _cheap(raw)
        try:
            key = cache_key(raw)
        except Exception:
            self.misses += 1
            return Classification(WRITE, F_UNPARSED, "")
        cache = self._cache
        c = cache.get(key)
        if c is not None:
            cache.move_to_end(key)
            self.hits += 1
            return c
        self.misses += 1
        if len(raw) > BIG_WRITE_BYTES and is_write_head(raw):
            self.oversized += 1
            return _cheap(raw)
        c, cacheable = self._full(raw)
        if cacheable and len(key) <= MAX_CACHED_KEY:
            cache[key] = c
            if len(cache) > self.cache_size:
                cache.popitem(last=False)
        else:
            self.uncacheable += 1
        return c

    def full_classify(self, sql: bytes | str) -> Classification:
        """The full path (no exact table, no cache): what `classify` must always agree with."""
        raw = sql if type(sql) is bytes else _to_bytes(sql)
        if len(raw) > self.max_scan_bytes or (len(raw) > BIG_WRITE_BYTES and is_write_head(raw)):
            return _cheap(raw)
        return self._full(raw)[0]

    def _full(self, raw: bytes) -> tuple[Classification, bool]:
        dstr = ""
        try:
            dstr = digest(raw).decode("utf-8", "replace")
            text = raw.decode("utf-8", "surrogateescape")
            code, hints = code_text(text)
            hint_flags = 0
            for h in hints:
                hint_flags |= F_HINT_PRIMARY if h == "primary" else F_HINT_REPLICA
            toks, broken = tokenize(code)
            if broken:  # unterminated quote or comment: the server rejects it anyway
                return Classification(WRITE, F_UNPARSED | hint_flags, dstr), False
            stmts = split_statements(toks)
            if not stmts:
                return Classification(WRITE, F_UNPARSED | hint_flags, dstr), True
            part = self._rules.part
            if len(stmts) == 1:
                route, flags, db, cacheable = part(code, stmts[0])
                return Classification(route, flags | hint_flags, dstr, db), cacheable
            parts = []
            union, db, cacheable = F_MULTI | hint_flags, None, True
            for st in stmts:
                route, flags, pdb, pc = part(code, st)
                sub = code[st[0].start:st[-1].end]
                pd = digest(sub.encode("utf-8", "surrogateescape")).decode("utf-8", "replace")
                parts.append(Classification(route, flags, pd, pdb))
                union |= flags | (F_MULTI_SESSION if route == SESSION else 0)
                db = pdb if pdb is not None and flags & F_USE_DB else db  # (a DROP DATABASE's name is not a USE)
                cacheable = cacheable and pc
            return Classification(WRITE, union, dstr, db, tuple(parts)), cacheable
        except Exception:  # a classifier bug must not break the session: go to the primary
            return Classification(WRITE, F_UNPARSED, dstr), False


def session_value(sql: bytes, name: str) -> str | None:
    """The value text of the last session-scope assignment of system variable `name` in a SET
    text (`SET [SESSION|LOCAL] name = v`, `SET @@[session.]name = v`, among other assignments or
    statements), None if it has none. Lexes the text again: for the rare statements whose flag
    says they set a variable rwproxy acts on (F_WAIT_TIMEOUT); the cache keeps no literals."""
    try:
        code, _ = code_text(sql.decode("utf-8", "surrogateescape"))
        toks, broken = tokenize(code)
        if broken:
            return None
        found = None
        for st in split_statements(toks):
            found = session_assignment(code, st, name) or found
        return found
    except Exception:  # never let a classifier bug break the session
        return None


def replayable_part(sql: bytes, name: str) -> bytes | None:
    """A SET text without its session assignments of system variable `name`, to replay on other
    connections (b"" when nothing else is left; None when it cannot be split: the caller keeps
    the session on the primary). For SETs that change autocommit among other variables
    (Connector/J's `SET autocommit=1, sql_mode=..., <sessionVariables>` at connect): replicas
    must keep autocommit on, and the rest must still reach them."""
    try:
        code, _ = code_text(sql.decode("utf-8", "surrogateescape"))
        toks, broken = tokenize(code)
        stmts = split_statements(toks)
        if broken or len(stmts) != 1:
            return None
        rest = without_assignment(code, stmts[0], name)
        return None if rest is None else rest.encode("utf-8", "surrogateescape")
    except Exception:  # never let a classifier bug break the session
        return None


def statement_texts(sql: bytes) -> list[bytes] | None:
    """The statements of a multi-statement text, each as its code text (comments dropped,
    executable comments unwrapped), in order; None when it does not lex (an open quote or
    comment: the server's syntax error is the answer)."""
    try:
        code, _ = code_text(sql.decode("utf-8", "surrogateescape"))
        toks, broken = tokenize(code)
        if broken:
            return None
        return [code[st[0].start:st[-1].end].encode("utf-8", "surrogateescape") for st in split_statements(toks)]
    except Exception:  # never let a classifier bug break the session
        return None


def _to_bytes(sql) -> bytes:
    if isinstance(sql, str):
        return sql.encode("utf-8", "surrogateescape")
    return bytes(sql)


_HUGE = Classification(WRITE, F_UNPARSED, "<statement over 16 MiB>")


def classify_unusual(classifier: "Classifier", pkt) -> Classification:
    """A COM_QUERY packet (framed) off the hot path: one over 16 MiB (not lexed: the primary), or
    one of a session under sql_mode NO_BACKSLASH_ESCAPES, lexed as plain_backslashes() makes it."""
    if len(pkt) >= 0xFFFFFF:  # (the session's MAX_PACKET test: a packet with a continuation)
        return _HUGE
    return classifier.classify(plain_backslashes(bytes(pkt[5:])))


def _cheap(raw: bytes) -> Classification:
    """Conservative classification of a big statement with C-level passes only (no Python
    lexing, which costs ~1.3 µs per byte): always WRITE | F_OVERSIZED; F_UNPARSED unless it is a
    plain INSERT/REPLACE/UPDATE/DELETE/LOAD without variables or stateful functions."""
    first, multi, executable, stateful, broken = cheap_scan(raw)
    flags = F_OVERSIZED
    if multi:
        flags |= F_MULTI | F_UNPARSED
    elif first in _PLAIN_WRITES and not executable and not broken:
        flags |= _PLAIN_WRITES[first] | (F_UNPARSED if stateful else 0)
    else:
        flags |= F_UNPARSED
    if stateful or first in _STATE_HEADS:  # SET @doc = '<1 MB>' is not replayed: the connection keeps it
        flags |= F_CONN_STATE
    for h in find_hints(raw[:4096]):
        flags |= F_HINT_PRIMARY if h == "primary" else F_HINT_REPLICA
    head = digest(raw[:1024]).decode("utf-8", "replace")
    return Classification(WRITE, flags, head + " ...")
