"""The items of a SET statement: each assignment's scope and variable (set_target), the value
the session gives one variable (session_assignment: SET wait_timeout), and the statement
without one variable's assignments (without_assignment: autocommit, which replicas keep on,
beside variables they must get)."""

from __future__ import annotations

from proxy.routing.classify.funcs import SET_SCOPES
from proxy.routing.classify.lex import Tok


def set_target(item: list[Tok], k: int, scope: str) -> tuple[str, str, int] | None:
    """One SET assignment whose target is item[k]: (its scope, the variable's lower-case name,
    the index of its value), scope "user" for @var; None if malformed. `scope` is the one a
    leading GLOBAL/SESSION/... set for plain names."""
    tgt = item[k]
    k += 1
    if tgt.kind == "u":
        item_scope, name = "user", ""
    elif tgt.kind == "v":
        parts = tgt.val[2:].lower().split(".", 1)
        if len(parts) == 2 and parts[0].upper() in SET_SCOPES:
            item_scope, name = SET_SCOPES[parts[0].upper()], parts[1]
        else:
            item_scope, name = "session", tgt.val[2:].lower()
    elif tgt.kind == "w":
        item_scope, name = scope, tgt.val.lower()
        while k + 1 < len(item) and item[k].is_o(".") and item[k + 1].kind == "w":
            name += "." + item[k + 1].val.lower()  # structured: key_cache.key_buffer_size
            k += 2
    else:
        return None
    if k + 1 >= len(item) or not (item[k].is_o("=") or item[k].is_o(":=")):
        return None
    return item_scope, name, k + 1


def _set_items(toks: list[Tok]) -> list[tuple[list[Tok], int, str]] | None:
    """The assignments of one plain SET statement as (its tokens, the index of its target, the
    scope a leading GLOBAL/SESSION/... set for plain names); None if it is no plain SET or an
    assignment is empty."""
    if not toks or not toks[0].is_w("SET") or len(toks) < 2 or toks[1].is_w("STATEMENT"):
        return None
    out, scope = [], "session"
    for item in split_commas(toks[1:]):
        k = 0
        if item and item[0].kind == "w" and item[0].val in SET_SCOPES:
            scope, k = SET_SCOPES[item[0].val], 1
        if k >= len(item):
            return None
        out.append((item, k, scope))
    return out


def session_assignment(code: str, toks: list[Tok], name: str) -> str | None:
    """The value text of the last session-scope assignment of system variable `name` in one SET
    statement (tokens `toks` of `code`; the last one wins, as on the server), None if none."""
    found = None
    for item, k, scope in _set_items(toks) or ():
        target = set_target(item, k, scope)
        if target is not None and target[0] == "session" and target[1] == name:
            found = code[item[target[2]].start:item[-1].end]
    return found


def without_assignment(code: str, toks: list[Tok], name: str) -> str | None:
    """One SET statement's text (tokens `toks` of `code`) with its session-scope assignments of
    system variable `name` left out: "" when nothing else is left, None if it is no plain SET
    (or an item cannot be read). Other items keep their own text; a scope word the dropped item
    carried is not needed by the rest, which are session or user assignments (a SESSION-route SET
    has no global one)."""
    items = _set_items(toks)
    if items is None:
        return None
    kept = []
    for item, k, scope in items:
        tgt = item[k]
        if not (tgt.is_w("NAMES", "CHARSET") or (tgt.is_w("CHARACTER") and k + 1 < len(item)
                                                  and item[k + 1].is_w("SET"))):
            target = set_target(item, k, scope)
            if target is None or target[0] == "global":
                return None
            if target[0] == "session" and target[1] == name:
                continue
        kept.append(code[item[0].start:item[-1].end])
    return f"SET {', '.join(kept)}" if kept else ""


def split_commas(toks: list[Tok]) -> list[list[Tok]]:
    items: list[list[Tok]] = [[]]
    depth = 0
    for t in toks:
        if t.kind == "o":
            if t.val == "(":
                depth += 1
            elif t.val == ")":
                depth -= 1
            elif t.val == "," and depth == 0:
                items.append([])
                continue
        items[-1].append(t)
    return items
