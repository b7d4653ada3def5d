"""User variables that GET DIAGNOSTICS set on a replica, carried to the writer.

`SELECT * FROM t` (a read: a replica answers), then `GET DIAGNOSTICS CONDITION 1 @msg =
MESSAGE_TEXT` (about the previous statement: the same replica connection answers it) leaves @msg
on that replica's connection only, where the next `SELECT @msg` or `INSERT ... VALUES (@msg)`
(user variables set by statements are read on the writer) does not find it: NULL, silently.

The values cannot be copied at once: any statement run on that connection empties its
diagnostics area, which a second GET DIAGNOSTICS (`GET DIAGNOSTICS @n = NUMBER` after the one for
CONDITION 1, the usual pair) still reads. So the session remembers the variables (commands.py,
after the GET DIAGNOSTICS succeeded), keeps that connection meanwhile (they are user variables:
it is tied), and before its next statement that is not about the previous one reads them there
and sets them on the writer, keeping each value's type and character set.
"""

from __future__ import annotations

import re

from proxy.frontend import slowpath
from proxy.protocol.constants import COM_QUERY
from proxy.protocol.packets import command, payloads, read_lenenc_int, read_lenenc_str, text_rows
from proxy.protocol.scan import RESULT
from proxy.routing.classify.lex import code_text, tokenize

_INT_TYPES = frozenset((1, 2, 3, 8, 9, 13))  # TINY, SHORT, LONG, LONGLONG, INT24, YEAR
_NUMERIC = _INT_TYPES | frozenset((0, 4, 5, 246))  # and DECIMAL, FLOAT, DOUBLE, NEWDECIMAL
_NUMBER = re.compile(rb"-?\d+(\.\d+)?([eE][-+]?\d+)?")
_COLLATION = re.compile(r"[a-z0-9_]+")


def variables(sql: bytes) -> list[str]:
    """The user variables a GET DIAGNOSTICS statement assigns, as spelled (`@msg`, `@'a b'`)."""
    toks, _ = tokenize(code_text(sql.decode("utf-8", "replace"))[0])
    seen: list[str] = []
    for t in toks:
        if t.kind == "u" and len(t.val) > 1 and t.val not in seen:
            seen.append(t.val)
    return seen


def remember(s, cmd, on_writer: bool) -> None:
    """After a GET DIAGNOSTICS that set user variables succeeded on `cmd.server`."""
    names = variables(cmd.packet[5:]) if cmd.packet[4] == COM_QUERY and not on_writer else []
    if not names:
        return
    before = s.state.diag_copy  # (GET DIAGNOSTICS statements in a row ask the same connection)
    if before is not None and before[0] == cmd.server:
        names = before[1] + [n for n in names if n not in before[1]]
    s.state.diag_copy = (cmd.server, names)


def _column_types(resp: bytes) -> list[int]:
    """The type byte of each column definition of a text result set."""
    packets = payloads(resp)
    ncols, _ = read_lenenc_int(packets[0], 0)
    out = []
    for p in packets[1:1 + (ncols or 0)]:
        pos = 0
        for _ in range(6):  # catalog, schema, table, org_table, name, org_name
            _, pos = read_lenenc_str(p, pos)
        out.append(p[pos + 1 + 2 + 4])  # (the 0x0c length, charset, column length, then the type)
    return out


def assignments(resp: bytes, names: list[str]) -> list[str]:
    """`@v = literal` for each variable, from `SELECT @v, HEX(@v), COLLATION(@v), ...`."""
    rows = text_rows(resp)
    if not rows:
        return []
    types, row, out = _column_types(resp), rows[0], []
    for i, name in enumerate(names):
        value, hexed, collation = row[3 * i], row[3 * i + 1], (row[3 * i + 2] or b"").decode()
        if value is None:
            literal = "NULL"
        elif types[3 * i] in _NUMERIC and _NUMBER.fullmatch(value):
            literal = value.decode()
        elif collation == "binary" or not _COLLATION.fullmatch(collation):
            literal = f"X'{hexed.decode()}'"
        else:
            literal = f"CONVERT(X'{hexed.decode()}' USING {collation.split('_')[0]}) COLLATE {collation}"
        out.append(f"{name} = {literal}")
    return out


async def copy_then_send(s, cmd, to_writer: bool, wait_gtid: bool) -> None:
    """Set the remembered variables on the writer, then send `cmd` as the slow path does. (With no
    writable primary the values stay where they are: waiting for one would hold up a read.)"""
    server, names = s.state.diag_copy
    s.state.diag_copy = None
    be = s.backends.get(server)
    if be is not None and not be.closed and s.worker.primary_ok:
        sql = "SELECT " + ", ".join(f"{n}, HEX({n}), COLLATION({n})" for n in names)
        sets = assignments(await be.command(command(COM_QUERY, sql.encode()), RESULT), names)
        if sets:
            writer = await s.backend_for(s.writer())
            await writer.command(command(COM_QUERY, ("SET " + ", ".join(sets)).encode()), RESULT)
    await slowpath.send(s, cmd, to_writer, wait_gtid)
