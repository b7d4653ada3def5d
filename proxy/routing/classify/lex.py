"""Lexing for the classifier: the hot-path digest (bytes, C-level regex passes) and, on a cache
miss, the "code text" (comments removed, executable comments unwrapped) and its token list.

Assumes the server's default string syntax (backslash escapes, '' and "" doubling). A session
under sql_mode NO_BACKSLASH_ESCAPES, where a backslash is an ordinary character, has its
statements classified as plain_backslashes() makes them.
"""

from __future__ import annotations

import os
import re

try:  # _B_LIT.sub(b"?", raw) in one C loop; None for texts with comments, backticks, open quotes
    from proxy.routing.classify._lexkey import literal_key as _c_literal_key
except ImportError:  # not built (no compiler at install time)
    _c_literal_key = None
_literal_key = None if os.environ.get("RWPROXY_PURE_PYTHON") == "1" else _c_literal_key

# Pieces shared by the bytes (digest) and str (code/token) patterns.  The scanning patterns
# start with one character class and dispatch with look-behinds: sre then skips uninteresting
# bytes in a tight loop (6x faster than a leading alternation on this hot path).
_SQ_REST = r"[^'\\]*(?:(?:\\.|'')[^'\\]*)*'"
_DQ_REST = r'[^"\\]*(?:(?:\\.|"")[^"\\]*)*"'
_BQ_REST = r"[^`]*(?:``[^`]*)*`"
_SQ, _DQ, _BQ = "'" + _SQ_REST, '"' + _DQ_REST, "`" + _BQ_REST
# "-- " starts a comment only when followed by whitespace/control or the end (MySQL rule).
_P1_SRC = (r"""['"`/\-#](?:(?<=')""" + _SQ_REST + r'|(?<=")' + _DQ_REST + r"|(?<=`)" + _BQ_REST
           + r"|(?<=/)\*.*?\*/|(?<=-)-(?=[\x00-\x20]|\Z)[^\n]*|(?<=\#)[^\n]*)")

_B_P1 = re.compile(_P1_SRC.encode(), re.S)
# A number not glued to an identifier (sbtest1, t.5, @v1 keep their digits).
_NOT_AFTER_WORD = r"(?<![\w$@.\x80-\xff]{c})"
_NUM_BODY = (r"(?:(?<=[0-9])" + _NOT_AFTER_WORD.format(c="[0-9]")
             + r"[0-9]*(?:[xX][0-9a-fA-F]+|[bB][01]+|\.[0-9]*)?"
             + r"|(?<=\.)" + _NOT_AFTER_WORD.format(c=r"\.") + r"[0-9]+)"
             + r"(?:[eE][-+]?[0-9]+)?(?![\w$\x80-\xff])")
_B_NUM = re.compile((r"[0-9.]" + _NUM_BODY).encode())
_B_LIT = re.compile((r"""['"0-9.](?:(?<=')""" + _SQ_REST + r'|(?<=")' + _DQ_REST + "|"
                     + _NUM_BODY + ")").encode(), re.S)
# Comment or quoted-identifier markers.
_B_SPECIAL = re.compile(rb"[-#`/](?:(?<=[#`])|(?<=/)(?=\*)|(?<=-)(?=-))")
_B_LIST = re.compile(rb"\(\s*\?(?:\s*,\s*\?)+\s*\)")
_B_ROWS = re.compile(rb"\(\?\)(?:\s*,\s*\(\?\))+")
_B_HINT = re.compile(rb"/\*\s*rwproxy\s*:\s*(primary|replica)\s*\*/", re.I)
_B_VERSION = re.compile(rb"\d{5,6}")
_HINT_PRIMARY = b" /* rwproxy:primary */ "
_HINT_REPLICA = b" /* rwproxy:replica */ "


def plain_backslashes(text: bytes) -> bytes:
    """`text` as the default lexer must see it to lex it as the server does under sql_mode
    NO_BACKSLASH_ESCAPES: every backslash doubled is an ordinary character inside a string. Left
    as it was, 'a\\', @v := 5 -- ' read as one string and a comment, and a user variable set (or a
    sequence advanced, a lock taken) went unseen to a replica."""
    return text.replace(b"\\", b"\\\\") if b"\\" in text else text


def _exec_body(t: bytes | str) -> bytes | str:
    """Content of an executable comment /*!NNNNN ... */ or /*M!NNNNNN ... */, version removed.

    Every version is treated as executed: extra code can only make a statement look more like a
    write, never less.
    """
    body = t[3:-2] if t[2] in (b"!"[0], "!") else t[4:-2]
    m = (_B_VERSION if isinstance(body, bytes) else _S_VERSION).match(body)
    return body[m.end():] if m else body


def _is_exec(t: bytes | str) -> bool:
    head = t[2:4]  # /*m! is taken as executable too: treating a comment as code is the safe error
    return head[:1] in (b"!", "!") or head in (b"M!", "M!", b"m!", "m!")


def _key_repl(m: re.Match) -> bytes:
    t = m.group()
    c = t[0]
    if c == 39 or c == 34:  # ' "
        return b"?"
    if c == 96:  # `
        return t
    if c == 47:  # /
        if _is_exec(t):
            return b" " + _B_P1.sub(_key_repl, _exec_body(t)) + b" "
        h = _B_HINT.fullmatch(t)
        if h:
            return _HINT_PRIMARY if h.group(1).lower() == b"primary" else _HINT_REPLICA
    return b" "


def cache_key(raw: bytes) -> bytes:
    """The digest-cache key: the text with literals -> ?, comments dropped (executable ones
    unwrapped, rwproxy hints kept in a canonical spelling), literal lists and multi-row VALUES
    folded when the statement has more than four literals.

    Statements with the same key differ only in literals, comments or list lengths, which no
    classification depends on (literal-dependent ones are never cached).  This runs for every
    statement: one C pass in the common case (no comments, no backticks; _lexkey.c, or the
    _B_LIT regex where it is not built).
    """
    s = _literal_key(raw) if _literal_key is not None else None  # C: same bytes, or None
    if s is None:
        s = _B_LIT.sub(b"?", raw)
        # The first comment marker or backtick outside string literals survives that pass (numbers
        # and strings contain none before it), so if none is left the pass lexed like the server.
        if len(s.translate(None, b"-#`/")) != len(s) and _B_SPECIAL.search(s) is not None:
            s = _B_NUM.sub(b"?", _B_P1.sub(_key_repl, raw))
    if s.count(b"?") > 4:  # fold IN-lists and multi-row VALUES (cheap test first: hot path)
        s = _B_LIST.sub(b"(?)", s)
        if b"(?)" in s:
            s = _B_ROWS.sub(b"(?)", s)
    return s


def digest(raw: bytes) -> bytes:
    """Normalised text shown to users and rules: the cache key with whitespace folded, all
    literal lists and multi-row VALUES folded, trailing ';' dropped.  Computed on misses only.

    Identifier and keyword case is kept (as ProxySQL and MaxScale do): folding it would cost a
    per-word pass, gain no hits for application-generated SQL, and USE needs the db's case.
    """
    s = b" ".join(cache_key(raw).split())
    s = _B_ROWS.sub(b"(?)", _B_LIST.sub(b"(?)", s))
    return s.rstrip(b"; ")


# ---------------------------------------------------------------- miss path (str)

_S_P1 = re.compile(_P1_SRC, re.S)
_S_VERSION = re.compile(r"\d{5,6}")
_S_HINT = re.compile(r"/\*\s*rwproxy\s*:\s*(primary|replica)\s*\*/", re.I)


def code_text(text: str) -> tuple[str, list[str]]:
    """(text with comments replaced by spaces and executable comments unwrapped, hints seen).

    String literals and quoted identifiers are kept verbatim, so token offsets into the code
    text give the client's literal values (USE db, SET autocommit=<value>).
    """
    hints: list[str] = []

    def repl(m: re.Match) -> str:
        t = m.group()
        c = t[0]
        if c in "'\"`":
            return t
        if c == "/":
            if _is_exec(t):
                return " " + _S_P1.sub(repl, _exec_body(t)) + " "
            h = _S_HINT.fullmatch(t)
            if h:
                hints.append(h.group(1).lower())
        return " "

    return _S_P1.sub(repl, text), hints


_TOKEN = re.compile(
    rf"""
     (?P<s>{_SQ}|{_DQ})
    |(?P<q>{_BQ})
    |(?P<v>@@(?:[\w$]+\.)?[\w$]+)
    |(?P<u>@(?:[\w$.]+|{_SQ}|{_DQ}|{_BQ})?)
    |(?P<n>(?:0[xX][0-9a-fA-F]+|0[bB][01]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)(?![\w$]))
    |(?P<w>[\w$]+)
    |(?P<o>:=|<=>|->>|->|<<|>>|<=|>=|<>|!=|\|\||&&|[^\s\w])
    """,
    re.S | re.X,
)


class Tok:
    """One token of the code text; `val` is upper-cased for words, the raw text otherwise.

    Kinds: s string, q `quoted identifier`, v @@system_var, u @user_var, h @host of an account,
    n number, w word, o operator/punctuation (incl. the ? placeholder).
    """

    __slots__ = ("kind", "val", "start", "end")

    def __init__(self, kind: str, val: str, start: int, end: int) -> None:
        self.kind, self.val, self.start, self.end = kind, val, start, end

    def __repr__(self) -> str:
        return f"{self.kind}:{self.val}"

    def is_w(self, *words: str) -> bool:
        return self.kind == "w" and self.val in words

    def is_o(self, op: str) -> bool:
        return self.kind == "o" and self.val == op

    def name(self) -> str:
        """A word's or `quoted identifier`'s name, upper-cased (as function and table names compare)."""
        return self.val if self.kind == "w" else self.val[1:-1].replace("``", "`").upper()


def tokenize(code: str) -> tuple[list[Tok], bool]:
    """(tokens, broken): broken means an unterminated quote or comment was left in the text."""
    toks: list[Tok] = []
    broken = False
    prev_slash = -1
    for m in _TOKEN.finditer(code):
        kind = m.lastgroup
        t = m.group()
        if kind == "w":
            t = t.upper()
        elif kind == "u" and toks and toks[-1].end == m.start() and toks[-1].kind in "sqw":
            kind = "h"  # 'user'@'host' in GRANT / CREATE USER / DEFINER=: not a variable
        elif kind == "o":
            if t in "'\"`":
                broken = True
            elif t == "*" and prev_slash == m.start():
                broken = True
            prev_slash = m.end() if t == "/" else -1
        toks.append(Tok(kind, t, m.start(), m.end()))
    return toks, broken


def split_statements(toks: list[Tok]) -> list[list[Tok]]:
    """Statements separated by top-level ';' (empty ones dropped)."""
    parts: list[list[Tok]] = []
    cur: list[Tok] = []
    for t in toks:
        if t.kind == "o" and t.val == ";":
            if cur:
                parts.append(cur)
            cur = []
        else:
            cur.append(t)
    if cur:
        parts.append(cur)
    return parts


_LITERAL_KINDS = ("s", "n")
LONG_LITERAL = 256


def reduced_sql(code: str, toks: list[Tok]) -> str:
    """The statement's code with literal IN-lists cut to their first element and long string
    literals emptied: the classification does not depend on literals, and parse cost grows
    faster than linearly with length (ORMs send IN-lists of thousands of ids)."""
    if not toks:
        return ""
    out: list[str] = []
    pos = toks[0].start
    n = len(toks)
    i = 0
    while i < n:
        t = toks[i]
        if t.kind == "s" and t.end - t.start > LONG_LITERAL:
            out.append(code[pos:t.start])
            out.append("''")
            pos = t.end
        elif (t.kind == "w" and t.val == "IN" and i + 3 < n and toks[i + 1].is_o("(")
              and _is_lit(toks[i + 2]) and toks[i + 3].is_o(",")):
            j = i + 3
            while j + 1 < n and toks[j].is_o(",") and _is_lit(toks[j + 1]):
                j += 2
            if j < n and toks[j].is_o(")"):
                out.append(code[pos:toks[i + 2].end])
                pos = toks[j].start
                i = j
                continue
        i += 1
    out.append(code[pos:toks[-1].end])
    return "".join(out)


def _is_lit(t: Tok) -> bool:
    return t.kind in _LITERAL_KINDS or (t.kind == "o" and t.val == "?")


# ---------------------------------------------------------------- big statements

# Skips code, literals and comments up to the next top-level ';' or '@' (or an unterminated
# quote) inside the regex engine: one match call per stop, not one Python call per literal.
_B_SKIP = re.compile(
    (r"""(?:[^'"`/#\-;@]++|""" + _SQ + "|" + _DQ + "|" + _BQ
     + r"|/\*.*?\*/|--(?=[\x00-\x20]|\Z)[^\n]*|\#[^\n]*|[/\-])*+").encode(), re.S)
_B_SPACE = re.compile(rb"(?:[\s;]+|/\*(?![!]|M!).*?\*/|--[\x00-\x20][^\n]*|\#[^\n]*)*+", re.S)
# The first keyword, after ordinary comments (an executable comment first gives no match).
_B_FIRST = re.compile(rb"(?:[\s(]+|/\*(?![!]|M!).*?\*/|--[\x00-\x20][^\n]*\n|\#[^\n]*\n)*([A-Za-z_]+)",
                      re.S)
# Functions whose flags the cheap scan does not work out (substring tests on the upper-cased
# text; a false positive, e.g. inside a string, only adds F_UNPARSED).
_STATEFUL = (b"LAST_INSERT_ID", b"FOUND_ROWS", b"ROW_COUNT", b"CONNECTION_ID", b"GET_LOCK",
             b"RELEASE_LOCK", b"RELEASE_ALL_LOCKS", b"IS_FREE_LOCK", b"IS_USED_LOCK", b"NEXTVAL",
             b"SETVAL", b"LASTVAL", b"NEXT VALUE", b"PREVIOUS VALUE")


def is_write_head(raw: bytes) -> bool:
    m = _B_FIRST.match(raw[:4096])
    return m is not None and m.group(1).upper() in (b"INSERT", b"REPLACE", b"UPDATE", b"DELETE", b"LOAD")


def cheap_scan(raw: bytes) -> tuple[str, bool, bool, bool, bool]:
    """(first keyword, multi-statement?, executable comment?, stateful?, broken?) using
    regex-engine loops only (no per-literal Python work): ~10-15 ms per MB."""
    m = _B_FIRST.match(raw[:4096])
    first = m.group(1).upper().decode() if m else ""
    multi = at_var = broken = False
    n = len(raw)
    pos = 0
    while True:
        pos = _B_SKIP.match(raw, pos).end()
        if pos >= n:
            break
        c = raw[pos]
        if c == 59:  # ';' followed by more than blanks/comments/';' -> another statement
            if _B_SPACE.match(raw, pos).end() < n:
                multi = True
                break
            break
        if c == 64:  # '@'
            at_var = True
            pos += 1
            continue
        broken = True  # unterminated quote
        break
    executable = b"/*!" in raw or b"/*M!" in raw
    upper = raw.upper()
    stateful = at_var or any(w in upper for w in _STATEFUL)
    return first, multi, executable, stateful, broken


def find_hints(raw: bytes) -> set[str]:
    return {h.group(1).lower().decode() for h in _B_HINT.finditer(raw)}
