"""A session's binary-protocol statements: prepare where the statement runs, execute with the
backend's id and parameter types, fetch/reset/close/long data.

Functions of a ClientConnection (`s`), using only its public interface; the statement map
itself is routing/statements.py.
"""

from __future__ import annotations

import asyncio
import logging

from proxy.backend.connection import BackendError
from proxy.frontend.kill import kill_prepared, parse_kill
from proxy.protocol.constants import (
    COM_STMT_BULK_EXECUTE, COM_STMT_CLOSE, COM_STMT_EXECUTE, COM_STMT_FETCH, COM_STMT_RESET, COM_STMT_SEND_LONG_DATA,
    ER_MALFORMED_PACKET, ER_MAX_PREPARED_STMT_COUNT_REACHED, ER_UNKNOWN_STMT_HANDLER, ER_UNSUPPORTED_PS,
    MARIADB_CLIENT_STMT_BULK_OPERATIONS, SERVER_STATUS_NO_BACKSLASH_ESCAPES,
)
from proxy.protocol.packets import at_statement_limit, logical_payload, stmt_close
from proxy.protocol.scan import CURSOR, PREPARE, RESULT, ROWS, SIMPLE
from proxy.routing import classify as C
from proxy.routing.router import WRITER
from proxy.routing.statements import DIRECT_ID, Stmt

_STMT_NAMES = {COM_STMT_EXECUTE: "execute", COM_STMT_FETCH: "fetch", COM_STMT_RESET: "reset",
               COM_STMT_BULK_EXECUTE: "execute"}  # (as the server names the bulk one)
_SESSION_READ = C.Classification(C.READ, 0, "")

log = logging.getLogger("rwproxy.prepared")


def _unknown(sid: int, cmd: int | None = None) -> tuple:
    """(code, sqlstate, message) for a statement id the session does not know, as MariaDB words it."""
    where = f" given to mysqld_stmt_{_STMT_NAMES[cmd]}" if cmd in _STMT_NAMES else ""
    code, state = ER_UNKNOWN_STMT_HANDLER
    return code, state, f"Unknown prepared statement handler ({sid}){where}"


def _named(s, pkt, direct: bool = True) -> tuple[int, bytes]:
    """The client statement id a statement command names, and the packet naming it: with
    `direct`, -1 (MariaDB's direct execution) is the statement prepared last. (Its callers
    have answered a packet too short to hold an id.)"""
    sid = int.from_bytes(pkt[5:9], "little")
    if sid == DIRECT_ID and direct and s.stmts.last:
        sid = s.stmts.last
        pkt = pkt[:5] + sid.to_bytes(4, "little") + pkt[9:]
    return sid, pkt


def execute(s, pkt) -> None:
    """COM_STMT_EXECUTE (the hot path of prepared statements: _named's work, inline)."""
    if len(pkt) < 14:  # shorter than id, flags and iteration count: the server's answer
        return s.send_error(*ER_MALFORMED_PACKET, "Malformed communication packet")
    sid = int.from_bytes(pkt[5:9], "little")
    if sid == DIRECT_ID and s.stmts.last:  # MariaDB's direct execution: the statement prepared last
        sid = s.stmts.last
        pkt = pkt[:5] + sid.to_bytes(4, "little") + pkt[9:]
        stmt = s.stmts.stmts.get(sid)
        if stmt is not None and stmt.nparams and not (len(pkt) > stmt.types_at and pkt[stmt.types_at] == 1):
            # The server takes a direct execution only with its parameters' types (they
            # cannot have been sent before), whatever an earlier execute sent
            return s.send_error(*ER_MALFORMED_PACKET, "Malformed communication packet")
    else:
        stmt = s.stmts.stmts.get(sid)
    if stmt is None:
        return s.send_error(*_unknown(sid, COM_STMT_EXECUTE))
    if stmt.kill is not None:
        return kill_prepared(s, stmt, pkt)
    kind = RESULT
    if len(pkt) > 9 and pkt[9]:  # a cursor: its fetches need this connection (idle_release keeps it)
        s.state.cursor = True
        kind = CURSOR
    if stmt.long_data:  # long data was sent to the primary; the execute must follow it
        stmt.long_data = False
        return s.dispatch(pkt, C.Classification(C.WRITE, stmt.cls.flags, stmt.cls.digest), kind, sid)
    s.dispatch(pkt, stmt.cls, kind, sid)


def bulk_execute(s, pkt) -> None:
    """COM_STMT_BULK_EXECUTE, MariaDB's array binding: one prepared statement run for many rows of
    parameters in one command (libmariadb's STMT_ATTR_ARRAY_SIZE, MariaDB Connector/J and
    Connector/Python's executemany), answered with one OK, an error, or RETURNING's rows. It is a
    write: it runs on the writer with the backend's statement id; the server reads the rows."""
    if len(pkt) < 11:  # shorter than id and flags: the server's answer, before it looks at anything
        return s.send_error(*ER_MALFORMED_PACKET, "Malformed communication packet")
    if not s.caps & MARIADB_CLIENT_STMT_BULK_OPERATIONS:  # as the server answers a client that did not ask
        return s.send_error(*ER_UNSUPPORTED_PS, "This command is not supported in the prepared statement protocol yet")
    sid, pkt = _named(s, pkt)
    stmt = s.stmts.stmts.get(sid)
    if stmt is None:
        return s.send_error(*_unknown(sid, COM_STMT_BULK_EXECUTE))
    if stmt.kill is not None:  # as the server answers array binding of a KILL
        return s.send_error(*ER_UNSUPPORTED_PS, "This command is not supported in the prepared statement protocol yet")
    stmt.long_data = False
    s.dispatch(pkt, C.Classification(C.WRITE, stmt.cls.flags, stmt.cls.digest), RESULT, sid)


async def _prepare(s, be, name: str, packet: bytes) -> bytes:
    """The response to COM_STMT_PREPARE `packet` on `be` (server `name`). A server at its
    max_prepared_stmt_count (1461) is asked again after every worker closed the statements its
    shared connections keep prepared there (a cache the client would not have directly; ProxySQL's
    users meet this error from its statement cache), a few times, as the closes reach the server
    on other connections."""
    resp = await be.command(packet, PREPARE)
    if not at_statement_limit(resp) or be.closed:
        return resp
    w = s.worker
    freed = w.shared.forget_statements(name) if w.shared is not None else 0
    if w.peers is not None:
        freed += await w.peers.free_statements(name)
    if not freed:
        return resp
    log.info("%s refused a prepare at its max_prepared_stmt_count: closed the %d statement(s) rwproxy's shared "
             "connections kept prepared there", name, freed)
    for pause in (0.0, 0.02, 0.1, 0.3):
        await asyncio.sleep(pause)
        resp = await be.command(packet, PREPARE)
        if not at_statement_limit(resp) or be.closed:
            break
    return resp


async def stmt_packet(s, pkt, sid: int, name: str, be, quiet: bool = False):
    """The statement command `pkt` for backend `name`, preparing the statement there first if
    needed. None when that fails; the client is told why unless `quiet` (the proxy's own replay)."""
    stmt = s.stmts.stmts.get(sid)
    if stmt is None:
        if not quiet:
            s.send_error(*_unknown(sid))
        return None
    bid = stmt.ids.get(name)
    if bid is None:
        resp = await _prepare(s, be, name, stmt.prepare_packet)
        if resp[4] == 0xFF:
            if not quiet:
                s.write(resp[:3] + b"\x01" + resp[4:])
            return None
        bid = int.from_bytes(resp[5:9], "little")
        for old in s.stmts.bind(sid, name, bid):
            be.transport.write(stmt_close(old))
    else:
        s.stmts.touch(sid, name)
    stmt.last = name
    if pkt[4] == COM_STMT_EXECUTE:
        return stmt.packet_for(pkt, name, bid)
    return pkt[:5] + bid.to_bytes(4, "little") + pkt[9:]


async def prepare(s, pkt) -> None:
    """COM_STMT_PREPARE: prepared where the router would run the statement; the client gets
    rwproxy's statement id."""
    s.stmts.last = 0  # until this prepare succeeds, -1 names no statement
    limit = s.worker.config.routing.max_prepared_per_session
    if len(s.stmts.stmts) >= limit:  # (each is kept here for the session's life: bound the memory)
        return s.send_error(ER_MAX_PREPARED_STMT_COUNT_REACHED, b"42000", "Can't create more than "
                            f"max_prepared_stmt_count statements (current value: {limit})")
    sql = bytes(logical_payload(pkt)[1:])  # bytes: shared connections key their statements by it
    w = s.worker
    cls = w.classifier.classify(sql if not s.status & SERVER_STATUS_NO_BACKSLASH_ESCAPES else C.plain_backslashes(sql))
    plan = w.router.plan(s.state, cls, w.topology)
    name = s.writer() if plan.target is WRITER or plan.error is not None else plan.target
    try:
        be = await s.backend_for(name)
    except (BackendError, ConnectionError, asyncio.TimeoutError):
        if s.is_writer(name):
            raise
        name = s.writer()
        be = await s.backend_for(name)
    resp = await _prepare(s, be, name, pkt)
    if resp[4] == 0x00:
        nparams = int.from_bytes(resp[11:13], "little")
        stmt = Stmt(sql, cls, pkt, nparams)
        stmt.kill = parse_kill(sql) if cls.flags & C.F_KILL and not cls.flags & C.F_MULTI else None
        sid = s.stmts.add(stmt)
        bid = int.from_bytes(resp[5:9], "little")
        if stmt.kill is None:
            for old in s.stmts.bind(sid, name, bid):
                be.transport.write(stmt_close(old))
        else:  # executed by rwproxy (the id is its own): the server's statement is not needed
            be.transport.write(stmt_close(bid))
        resp = resp[:5] + sid.to_bytes(4, "little") + resp[9:]
    s.write(resp)


def other(s, pkt, cmd: int) -> None:
    """COM_STMT_CLOSE, SEND_LONG_DATA, RESET and FETCH."""
    if len(pkt) < 9:  # a short id: unknown (the server completes it with stale buffer bytes; zero-padded here)
        if cmd in _STMT_NAMES:
            s.send_error(*_unknown(int.from_bytes(pkt[5:9], "little"), cmd))
        return
    sid, pkt = _named(s, pkt, cmd != COM_STMT_CLOSE)  # (the server ignores CLOSE of -1)
    stmt = s.stmts.stmts.get(sid)
    if stmt is None:
        if cmd in _STMT_NAMES:  # CLOSE and SEND_LONG_DATA have no response, so no error either
            s.send_error(*_unknown(sid, cmd))
        return
    if cmd == COM_STMT_CLOSE:
        s.stmts.remove(sid)
        for name, bid in stmt.ids.items():
            be = s.backends.get(name)
            if be is not None and not be.closed:
                be.transport.write(stmt_close(bid))
        return
    primary = s.writer()
    if cmd == COM_STMT_SEND_LONG_DATA:
        stmt.long_data = True
        s.spawn(_send_no_reply(s, pkt, sid, primary))
        return
    name = stmt.last or next(iter(stmt.ids), primary)
    if cmd == COM_STMT_RESET and stmt.long_data:  # the long data to discard waits on the primary
        name, stmt.long_data = primary, False
    kind = ROWS if cmd == COM_STMT_FETCH else SIMPLE
    s.spawn(s.send_command(pkt, _SESSION_READ if cmd == COM_STMT_FETCH else stmt.cls, kind, name, sid))


async def _send_no_reply(s, pkt, sid: int, name: str) -> None:
    be = await s.backend_for(name)
    pkt = await stmt_packet(s, pkt, sid, name, be)
    if pkt is not None:
        be.transport.write(pkt)
