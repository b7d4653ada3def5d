"""The classifier's token scan: the flags a statement's tokens carry (user variables, named locks,
connection-bound and stateful functions) and whether anything in it cannot run on a replica.

Shared by every rule (rules.py) and by SET's right-hand sides; one pass over the tokens, no
sqlglot.
"""

from __future__ import annotations

from proxy.routing.classify.const import (
    F_CONN_BOUND, F_CONN_STATE, F_GET_LOCK, F_PREVIOUS, F_RELEASE_LOCK, F_USER_VAR_READ, F_USER_VAR_WRITE,
)
from proxy.routing.classify.funcs import (
    CONN_FUNCS, CONN_VARS, LOCK_FUNCS, PREVIOUS_FUNCS, PREVIOUS_VARS, READONLY_FUNCS, RELEASE_FUNCS, SYNTAX_WORDS,
    WRITE_FUNCS,
)
from proxy.routing.classify.lex import Tok

# Flags a read must not carry: they mean state that lives on the primary / previous connection.
NOT_READ = F_GET_LOCK | F_RELEASE_LOCK | F_CONN_BOUND | F_USER_VAR_WRITE
# Reserved words that never occur in a pure read (INSERT(...) and REPLACE(...) are functions).
_WRITE_WORDS = frozenset(("UPDATE", "DELETE", "INSERT", "REPLACE", "INTO", "LOCK"))
_SEQ_FUNCS = frozenset(("NEXTVAL", "SETVAL"))


def _qualifier(toks: list[Tok], i: int) -> Tok | None:
    """The database word before toks[i] in `db.f(` (a qualified call), else None."""
    if i >= 2 and toks[i - 1].is_o(".") and toks[i - 2].kind in ("w", "q"):
        return toks[i - 2]
    return None


def scan(toks: list[Tok]) -> tuple[int, bool, set[str]]:
    """(flags, write syntax or unsafe call seen, names called that are not known built-ins)."""
    flags = 0
    forced = False
    calls: set[str] = set()
    into = False
    n = len(toks)
    for i, t in enumerate(toks):
        k = t.kind
        nxt = toks[i + 1] if i + 1 < n else None
        if k == "w":
            v = t.val
            if nxt is not None and nxt.kind == "o" and nxt.val == "(":
                if (q := _qualifier(toks, i)) is not None:
                    calls.add(q.name() + "." + v)
                elif v in READONLY_FUNCS or v in SYNTAX_WORDS:
                    pass
                elif v in LOCK_FUNCS:
                    flags |= F_GET_LOCK
                    forced = True
                elif v in RELEASE_FUNCS:
                    flags |= F_RELEASE_LOCK
                    forced = True
                elif v in CONN_FUNCS:
                    flags |= F_CONN_BOUND | F_PREVIOUS if v in PREVIOUS_FUNCS else F_CONN_BOUND
                    forced = True
                    if v == "LAST_INSERT_ID" and i + 2 < n and not toks[i + 2].is_o(")") \
                            and not toks[0].is_w("UPDATE", "INSERT", "REPLACE"):
                        # LAST_INSERT_ID(expr) sets what LAST_INSERT_ID() answers; an UPDATE's or
                        # INSERT's OK packet reports it (kept and restored), a SELECT's result does not
                        flags |= F_CONN_STATE
                elif v in WRITE_FUNCS:
                    forced = True
                    if v in _SEQ_FUNCS:
                        flags |= F_CONN_STATE  # LASTVAL() answers on this connection only
                else:
                    calls.add(v)
                into = False
                continue
            if v in _WRITE_WORDS:
                forced = True
                into = v == "INTO"
                continue
            if v == "SHARE" and i and toks[i - 1].is_w("FOR", "IN"):
                forced = True
            elif v in ("NEXT", "PREVIOUS") and nxt is not None and nxt.is_w("VALUE"):
                forced = True
                flags |= F_CONN_BOUND if v == "PREVIOUS" else F_CONN_STATE
            into = False
        elif k == "u":
            if into or (nxt is not None and nxt.is_o(":=")):
                flags |= F_USER_VAR_WRITE
                forced = True
            else:
                flags |= F_USER_VAR_READ
        elif k == "v":
            name = t.val[2:].rsplit(".", 1)[-1].lower()
            if name in CONN_VARS:
                flags |= F_CONN_BOUND | F_PREVIOUS if name in PREVIOUS_VARS else F_CONN_BOUND
                forced = True
            into = False
        elif k == "q":
            if nxt is not None and nxt.is_o("("):
                q = _qualifier(toks, i)
                calls.add(t.name() if q is None else q.name() + "." + t.name())
            into = False
        elif k == "o":
            if t.val == ":=":
                forced = True
            elif t.val != ",":
                into = False
        else:
            into = False
    return flags, forced, calls
