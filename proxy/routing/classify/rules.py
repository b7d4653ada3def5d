"""Statement rules of the classifier: one handler per leading keyword (the token scan for
flags and suspicious constructs is flagscan.py).

Statement kinds that sqlglot misparses (SAVEPOINT and HELP as aliases, XA/HANDLER/LOAD DATA/DO/
FLUSH/RESET/... as errors, CALL/LOCK/GRANT/... as opaque Commands) never reach sqlglot: their
meaning is fixed by their leading keywords.  Only query-shaped statements (SELECT, WITH, '(',
TABLE, VALUES) are parsed, because whether they may run on a replica depends on their
structure.  Every result is (route, flags, db, cacheable).
"""

from __future__ import annotations

from proxy.routing.classify.const import (
    F_AUTOCOMMIT_OFF, F_AUTOCOMMIT_ON, F_BEGIN, F_COMMIT, F_CONN_BOUND, F_CONN_STATE, F_IMPLICIT_COMMIT, F_PREVIOUS,
    F_KILL, F_LOAD_DATA, F_LOCK_TABLES, F_NEXT_TRX, F_READ_ONLY_TXN, F_RELEASE_SESSION, F_ROLLBACK,
    F_SET_GLOBAL, F_SET_UNREPLAYABLE, F_SQL_PS, F_STORED_CALL, F_TEMP_TABLE, F_UNLOCK_TABLES, F_UNPARSED, F_USE_DB,
    F_USER_VAR_READ, F_USER_VAR_WRITE, F_WAIT_TIMEOUT, F_XA, READ, SESSION, WRITE, F_DROP_DB, F_DIAG_VARS,
)
from proxy.routing.classify.flagscan import NOT_READ, scan
from proxy.routing.classify.funcs import SET_SCOPES
from proxy.routing.classify.lex import Tok, reduced_sql
from proxy.routing.classify.query import QueryParser, check_tree
from proxy.routing.classify.sets import set_target, split_commas

Result = tuple  # (route, flags, db, cacheable)
UNPARSED: Result = (WRITE, F_UNPARSED, None, True)
# Set as @@name without a scope, these are the next transaction's only (as SET TRANSACTION is).
_NEXT_TRX_VARS = frozenset(("tx_isolation", "transaction_isolation", "tx_read_only", "transaction_read_only"))


def _words(toks: list[Tok], start: int = 1, limit: int = 8) -> list[str]:
    """Leading keyword values from `start` (non-words become '')."""
    return [t.val if t.kind == "w" else "" for t in toks[start:start + limit]]


class Rules:
    """Classifies one statement (a token list of the code text) without caching."""

    def __init__(self, readonly: frozenset[str], max_parse_chars: int) -> None:
        self.readonly = readonly
        self.max_parse_chars = max_parse_chars
        self.parses = 0
        self._qp = QueryParser()
        self._handlers = {
            "SELECT": self._query, "WITH": self._query, "TABLE": self._query,
            "VALUES": self._query, "SHOW": self._show, "DESCRIBE": self._explain,
            "DESC": self._explain, "EXPLAIN": self._explain, "ANALYZE": self._analyze,
            "HELP": lambda c, t: (READ, 0, None, True), "SET": self._set, "USE": self._use,
            "BEGIN": self._begin, "START": self._start, "COMMIT": self._commit,
            "ROLLBACK": self._rollback, "XA": self._xa, "CREATE": self._ddl, "ALTER": self._ddl,
            "DROP": self._ddl, "RENAME": self._ddl, "TRUNCATE": self._ddl, "LOCK": self._lock,
            "UNLOCK": self._unlock, "FLUSH": self._flush, "LOAD": self._load,
            "PREPARE": self._ps, "DEALLOCATE": self._ps, "EXECUTE": self._execute,
            "GET": self._get, "CALL": self._call, "HANDLER": self._handler,
        }
        for kw in "INSERT UPDATE DELETE REPLACE".split():
            self._handlers[kw] = self._dml
        for kw in ("DO PURGE SHUTDOWN RESTART BINLOG "
                   "CHECKSUM SIGNAL RESIGNAL IMPORT CLONE BACKUP SAVEPOINT RELEASE").split():
            self._handlers[kw] = self._write
        self._handlers["KILL"] = lambda code, toks: self._write(code, toks, F_KILL)
        for kw in "GRANT REVOKE OPTIMIZE REPAIR CHECK RESET CHANGE STOP INSTALL UNINSTALL CACHE".split():
            self._handlers[kw] = self._admin

    def part(self, code: str, toks: list[Tok]) -> Result:
        if not toks:
            return UNPARSED
        first = toks[0]
        if first.kind == "o" and first.val == "(":
            return self._query(code, toks)
        handler = self._handlers.get(first.val) if first.kind == "w" else None
        if handler is None:
            return UNPARSED
        return handler(code, toks)

    # ------------------------------------------------------------ reads

    def _query(self, code: str, toks: list[Tok]) -> Result:
        flags, forced, calls = scan(toks)
        sql = reduced_sql(code, toks)
        if len(sql) > self.max_parse_chars:
            return WRITE, flags | F_UNPARSED, None, True
        try:
            self.parses += 1
            trees = self._qp.parse(sql)
            if len(trees) != 1 or trees[0] is None:
                return WRITE, flags | F_UNPARSED, None, True
            write, aliases = check_tree(trees[0], self.readonly)
        except Exception:  # ParseError, TokenError, RecursionError on absurd nesting...
            return WRITE, flags | F_UNPARSED, None, True
        if write or forced or (flags & NOT_READ) or self._unknown(calls - aliases):
            return WRITE, flags, None, True
        return READ, flags, None, True

    def _unknown(self, calls: set[str]) -> bool:
        """Any call to a function that may write (user-defined, not declared read-only)?"""
        for name in calls:
            if name in self.readonly:
                continue
            if "." in name and name.rsplit(".", 1)[1] in self.readonly:
                continue
            return True
        return False

    def _read_unless_unsafe(self, toks: list[Tok]) -> Result:
        flags, forced, calls = scan(toks)
        if forced or (flags & NOT_READ) or self._unknown(calls):
            return WRITE, flags, None, True
        return READ, flags, None, True

    _PRIMARY_SHOW = ("MASTER STATUS", "BINLOG STATUS", "BINARY LOGS", "MASTER LOGS",
                     "BINLOG EVENTS", "SLAVE HOSTS", "REPLICA HOSTS", "BINARY LOG STATUS")

    def _show(self, code: str, toks: list[Tok]) -> Result:
        w = _words(toks, 1, 4) + ["", "", ""]
        head = " ".join(x for x in w[:3] if x)
        if any(head.startswith(p) for p in self._PRIMARY_SHOW):
            return WRITE, 0, None, True
        if (w[0] in ("WARNINGS", "ERRORS", "PROFILE", "PROFILES", "STATUS")
                or (w[0] in ("SESSION", "LOCAL") and w[1] == "STATUS")
                or (w[0] == "COUNT" and toks[-1].is_w("WARNINGS", "ERRORS"))):
            return WRITE, F_CONN_BOUND | F_PREVIOUS, None, True
        if w[0] in ("EXPLAIN", "ANALYZE"):  # SHOW EXPLAIN FOR <connection id on the primary>
            return WRITE, 0, None, True
        return self._read_unless_unsafe(toks)

    _INNER = frozenset(("SELECT", "WITH", "TABLE", "VALUES", "INSERT", "UPDATE", "DELETE", "REPLACE"))

    def _explain(self, code: str, toks: list[Tok]) -> Result:
        i, analyze = 1, False
        while i < len(toks):
            t = toks[i]
            if t.is_w("EXTENDED", "PARTITIONS"):
                i += 1
            elif t.is_w("ANALYZE"):
                analyze, i = True, i + 1
            elif t.is_w("FORMAT") and i + 2 < len(toks) and toks[i + 1].is_o("="):
                i += 3
            else:
                break
        if i >= len(toks):
            return UNPARSED
        t = toks[i]
        if t.is_w("FOR"):  # EXPLAIN FOR CONNECTION n: a connection of the primary
            return WRITE, 0, None, True
        if t.is_o("(") or (t.kind == "w" and t.val in self._INNER):
            inner = self.part(code, toks[i:])
            if analyze:  # executes the statement
                return inner
            return (READ if inner[0] == READ else WRITE), inner[1] & F_UNPARSED, None, inner[3]
        if analyze:
            return UNPARSED
        return self._read_unless_unsafe(toks)  # DESCRIBE tbl [col]

    def _analyze(self, code: str, toks: list[Tok]) -> Result:
        """MariaDB: ANALYZE <stmt> executes the statement; ANALYZE TABLE is maintenance."""
        i = 1
        if i + 2 < len(toks) and toks[i].is_w("FORMAT") and toks[i + 1].is_o("="):
            i += 3
        if i < len(toks) and (toks[i].is_o("(") or (toks[i].kind == "w" and toks[i].val in self._INNER
                                                     and toks[i].val != "TABLE")):
            return self.part(code, toks[i:])
        return self._admin(code, toks)  # ANALYZE [NO_WRITE_TO_BINLOG | LOCAL] TABLE ...

    # ------------------------------------------------------------ session state

    def _use(self, code: str, toks: list[Tok]) -> Result:
        if len(toks) != 2 or toks[1].kind not in ("w", "q"):
            return UNPARSED
        t = toks[1]
        db = code[t.start:t.end] if t.kind == "w" else t.val[1:-1].replace("``", "`")
        return SESSION, F_USE_DB, db, False

    def _set(self, code: str, toks: list[Tok]) -> Result:
        t = toks[1:]
        if not t:
            return UNPARSED
        w = _words(t, 0, 3) + ["", ""]
        if w[0] == "STATEMENT":
            return self._set_statement(code, t)
        if w[0] == "PASSWORD" or (w[0] == "DEFAULT" and w[1] == "ROLE"):
            return WRITE, F_IMPLICIT_COMMIT | scan(t)[0], None, True
        if w[0] == "ROLE":
            return SESSION, 0, None, True
        if w[0] == "TRANSACTION":  # the next transaction only: never replayed on another connection
            return WRITE, F_NEXT_TRX, None, True
        if w[0] in SET_SCOPES and w[1] == "TRANSACTION":
            if SET_SCOPES[w[0]] == "global":
                return WRITE, F_SET_GLOBAL, None, True
            return SESSION, 0, None, True
        flags, scope, cacheable = 0, "session", True
        global_seen = unreplayable = sys_unreplayable = next_trx = False
        items = split_commas(t)
        for item in items:
            k = 0
            if item and item[0].kind == "w" and item[0].val in SET_SCOPES:
                scope, k = SET_SCOPES[item[0].val], 1
            if k >= len(item):
                return UNPARSED
            tgt = item[k]
            if tgt.is_w("NAMES", "CHARSET") or (tgt.is_w("CHARACTER") and k + 1 < len(item)
                                                and item[k + 1].is_w("SET")):
                f, forced, calls = scan(item[k + 1:])
                flags |= f
                bad = forced or bool(f & (NOT_READ | F_USER_VAR_READ)) or self._unknown(calls)
                unreplayable |= bad
                sys_unreplayable |= bad
                continue
            target = set_target(item, k, scope)
            if target is None:
                return UNPARSED
            item_scope, name, k = target
            # @@tx_isolation without a scope: the next transaction's only
            next_trx |= tgt.kind == "v" and "." not in tgt.val and name in _NEXT_TRX_VARS
            rhs = item[k:]
            f, forced, calls = scan(rhs)
            flags |= f
            bad = forced or bool(f & NOT_READ) or self._unknown(calls)
            unreplayable |= bad
            if item_scope == "user":
                flags |= F_USER_VAR_WRITE
                unreplayable |= not all(_is_constant(x) for x in rhs)
            elif item_scope == "session" and (bad or f & F_USER_VAR_READ):
                # replayed elsewhere it would get another value (a user variable may exist only on
                # the primary): the session stays on the primary instead
                sys_unreplayable = unreplayable = True
            elif item_scope == "global":
                global_seen = True
            elif name == "autocommit":
                flags |= F_AUTOCOMMIT_ON if _autocommit_on(rhs) else F_AUTOCOMMIT_OFF
                cacheable = False  # literal-dependent: never served from the digest cache
            elif name == "wait_timeout":
                flags |= F_WAIT_TIMEOUT
        if global_seen:
            return WRITE, flags | F_SET_GLOBAL, None, cacheable
        if next_trx:  # alone, a one-shot; with other assignments, nothing of it can be replayed
            extra = F_NEXT_TRX | (F_SET_UNREPLAYABLE if len(items) > 1 else 0)
            return WRITE, flags | extra, None, cacheable
        if sys_unreplayable:
            return WRITE, flags | F_SET_UNREPLAYABLE, None, cacheable
        return (WRITE if unreplayable else SESSION), flags, None, cacheable

    def _set_statement(self, code: str, t: list[Tok]) -> Result:
        """MariaDB SET STATEMENT var=value[, ...] FOR <stmt>: the inner statement decides."""
        depth = 0
        for j, tok in enumerate(t):
            if tok.kind == "o":
                depth += tok.val == "("
                depth -= tok.val == ")"
            elif depth == 0 and tok.is_w("FOR") and j > 1:
                f, forced, _ = scan(t[1:j])
                route, flags, db, cacheable = self.part(code, t[j + 1:])
                if forced or (f & NOT_READ):
                    route = WRITE
                return route, flags | f, db, cacheable
        return UNPARSED

    # ------------------------------------------------------------ transactions

    def _begin(self, code: str, toks: list[Tok]) -> Result:
        w = _words(toks, 1, 3)
        if len(toks) == 1 or (len(toks) == 2 and w[0] == "WORK"):
            return WRITE, F_BEGIN, None, True
        if w[:2] == ["NOT", "ATOMIC"]:  # compound statement: runs anything
            return WRITE, scan(toks)[0], None, True
        return UNPARSED

    def _start(self, code: str, toks: list[Tok]) -> Result:
        if len(toks) < 2 or not toks[1].is_w("TRANSACTION"):
            return self._admin(code, toks)  # START SLAVE / REPLICA / ALL SLAVES ...
        ro = rw = False
        for item in (split_commas(toks[2:]) if len(toks) > 2 else []):
            w = [x.val if x.kind == "w" else "" for x in item]
            if w == ["READ", "ONLY"]:
                ro = True
            elif w == ["READ", "WRITE"]:
                rw = True
            elif w != ["WITH", "CONSISTENT", "SNAPSHOT"]:
                return UNPARSED
        if ro and not rw:
            return READ, F_BEGIN | F_READ_ONLY_TXN, None, True
        return WRITE, F_BEGIN, None, True

    def _commit(self, code: str, toks: list[Tok]) -> Result:
        extra = _completion(toks, 1)
        return UNPARSED if extra is None else (WRITE, F_COMMIT | extra, None, True)

    def _rollback(self, code: str, toks: list[Tok]) -> Result:
        i = 2 if len(toks) > 1 and toks[1].is_w("WORK") else 1
        if i < len(toks) and toks[i].is_w("TO"):  # ROLLBACK TO [SAVEPOINT] sp
            return WRITE, 0, None, True
        extra = _completion(toks, 1)
        return UNPARSED if extra is None else (WRITE, F_ROLLBACK | extra, None, True)

    def _xa(self, code: str, toks: list[Tok]) -> Result:
        w = _words(toks, 1, 1) + [""]
        extra = {"START": F_BEGIN, "BEGIN": F_BEGIN, "COMMIT": F_COMMIT, "ROLLBACK": F_ROLLBACK}
        return WRITE, F_XA | extra.get(w[0], 0), None, True

    # ------------------------------------------------------------ writes

    def _write(self, code: str, toks: list[Tok], extra: int = 0) -> Result:
        return WRITE, scan(toks)[0] | extra, None, True

    def _dml(self, code: str, toks: list[Tok]) -> Result:
        flags, _forced, calls = scan(toks)
        if calls and self._unknown(calls - _insert_target(toks)):
            flags |= F_STORED_CALL
        return WRITE, flags, None, True

    def _admin(self, code: str, toks: list[Tok]) -> Result:
        return self._write(code, toks, F_IMPLICIT_COMMIT)

    def _call(self, code: str, toks: list[Tok]) -> Result:
        # The procedure may leave user variables, temporary tables or prepared statements that
        # rwproxy cannot see: F_CONN_STATE keeps the session's primary connection.
        flags = scan(toks)[0] | F_CONN_STATE
        if flags & F_USER_VAR_READ:  # CALL p(@out): OUT parameters assign user variables
            flags |= F_USER_VAR_WRITE
        return WRITE, flags, None, True

    def _handler(self, code: str, toks: list[Tok]) -> Result:
        """HANDLER t OPEN [AS h] opens a cursor-like handle that only this connection has."""
        opens = any(t.is_w("OPEN") for t in toks[2:6])
        return WRITE, scan(toks)[0] | (F_CONN_STATE if opens else 0), None, True

    def _ddl(self, code: str, toks: list[Tok]) -> Result:
        w = _words(toks, 1, 4) + ["", "", ""]
        if w[0] == "OR" and w[1] == "REPLACE":
            w = w[2:]
        if w[0] == "TEMPORARY":  # CREATE/DROP TEMPORARY TABLE: no implicit commit
            return self._write(code, toks, F_TEMP_TABLE)
        if toks[0].val == "DROP" and w[0] == "PREPARE":
            return WRITE, F_SQL_PS, None, True
        if toks[0].val == "DROP" and w[0] in ("DATABASE", "SCHEMA"):
            i = 4 if w[1] == "IF" and w[2] == "EXISTS" else 2
            if len(toks) == i + 1 and toks[i].kind in ("w", "q"):  # the name: literal-dependent, not cached
                t = toks[i]
                name = code[t.start:t.end] if t.kind == "w" else t.val[1:-1].replace("``", "`")
                return WRITE, F_IMPLICIT_COMMIT | F_DROP_DB, name, False
        return self._admin(code, toks)

    def _lock(self, code: str, toks: list[Tok]) -> Result:
        if len(toks) > 1 and toks[1].is_w("TABLE", "TABLES"):
            return WRITE, F_LOCK_TABLES | F_IMPLICIT_COMMIT, None, True
        return WRITE, 0, None, True  # LOCK INSTANCE FOR BACKUP

    def _unlock(self, code: str, toks: list[Tok]) -> Result:
        if len(toks) > 1 and toks[1].is_w("TABLE", "TABLES"):
            return WRITE, F_UNLOCK_TABLES, None, True
        return WRITE, 0, None, True

    def _flush(self, code: str, toks: list[Tok]) -> Result:
        text = " ".join(t.val for t in toks if t.kind == "w")
        extra = F_LOCK_TABLES if ("WITH READ LOCK" in text or "FOR EXPORT" in text) else 0
        return WRITE, F_IMPLICIT_COMMIT | extra, None, True

    def _load(self, code: str, toks: list[Tok]) -> Result:
        if len(toks) > 1 and toks[1].is_w("DATA", "XML"):
            return self._write(code, toks, F_LOAD_DATA)
        return self._admin(code, toks)  # LOAD INDEX INTO CACHE

    def _ps(self, code: str, toks: list[Tok]) -> Result:
        # PREPARE name FROM ...: the statement exists on this connection only (EXECUTE follows it)
        extra = F_CONN_STATE if toks[0].val == "PREPARE" else 0
        return WRITE, F_SQL_PS | extra | scan(toks)[0], None, True

    def _execute(self, code: str, toks: list[Tok]) -> Result:
        if len(toks) > 1 and toks[1].is_w("IMMEDIATE"):
            return self._write(code, toks)
        return self._ps(code, toks)

    def _get(self, code: str, toks: list[Tok]) -> Result:
        """GET [CURRENT|STACKED] DIAGNOSTICS reads the previous statement's diagnostics area; the
        user variables it sets live on that connection only (reads of them must go there)."""
        sets = F_USER_VAR_WRITE | F_DIAG_VARS if any(t.kind == "u" for t in toks) else 0
        return WRITE, F_CONN_BOUND | F_PREVIOUS | sets, None, True


_INSERT_MODIFIERS = frozenset(("LOW_PRIORITY", "DELAYED", "HIGH_PRIORITY", "IGNORE", "INTO"))


def _insert_target(toks: list[Tok]) -> set[str]:
    """The table an INSERT/REPLACE names, as the scan spells a call (`INSERT INTO db.t (a, b)`:
    {'DB.T'}), which it takes for one when a column list follows it."""
    if not toks[0].is_w("INSERT", "REPLACE"):
        return set()
    i, n = 1, len(toks)
    while i < n and toks[i].kind == "w" and toks[i].val in _INSERT_MODIFIERS:
        i += 1
    if i < n and toks[i].kind in ("w", "q"):
        if i + 2 < n and toks[i + 1].is_o(".") and toks[i + 2].kind in ("w", "q"):
            return {toks[i].name() + "." + toks[i + 2].name()}
        return {toks[i].name()}
    return set()


def _completion(toks: list[Tok], i: int) -> int | None:
    """COMMIT/ROLLBACK [WORK] [AND [NO] CHAIN] [[NO] RELEASE] -> extra flags, None if malformed."""
    w = [t.val if t.kind == "w" else "" for t in toks[i:]]
    if w[:1] == ["WORK"]:
        w = w[1:]
    extra = 0
    if w[:2] == ["AND", "CHAIN"]:
        extra |= F_BEGIN  # a new transaction starts at once
        w = w[2:]
    elif w[:3] == ["AND", "NO", "CHAIN"]:
        w = w[3:]
    if w == ["RELEASE"]:
        return extra | F_RELEASE_SESSION
    if w in ([], ["NO", "RELEASE"]):
        return extra
    return None


_CONSTANT_WORDS = frozenset(("NULL", "TRUE", "FALSE"))


def _is_constant(t: Tok) -> bool:
    """Part of a constant expression: replaying it elsewhere yields the same value."""
    if t.kind in ("s", "n"):
        return True
    if t.kind == "o":
        return t.val in ("?", "-", "+", "(", ")", "*", "/", "||")
    return t.kind == "w" and t.val in _CONSTANT_WORDS


_ON = frozenset(("1", "ON", "TRUE", "'ON'", '"ON"', "'1'", '"1"'))


def _autocommit_on(rhs: list[Tok]) -> bool:
    """Only an unmistakable 1/ON/TRUE counts as ON; anything else (DEFAULT, expressions,
    variables) is taken as OFF, which at worst keeps the session on the primary."""
    if len(rhs) != 1:
        return False
    v = rhs[0].val.upper() if rhs[0].kind == "s" else rhs[0].val
    return v in _ON
