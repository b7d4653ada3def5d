"""The rarer commands of a session: ping, quit, init db, set option, change user, reset
connection, statement commands other than execute, KILL by id, and commands rwproxy refuses.

Functions of a ClientConnection (`s`), using only its public interface.
"""

from __future__ import annotations

import asyncio

from proxy.backend.connection import BackendError
from proxy.frontend import diagnostics, idle, kill, prepared
from proxy.frontend.login import (
    FAILED_LOGINS, AccessDenied, admit_user, login_ok, parse_change_user, start_status, start_writer,
)
from proxy.logs import clean
from proxy.protocol.constants import (
    COM_CHANGE_USER, COM_DEBUG, COM_FIELD_LIST, COM_INIT_DB, COM_PING, COM_PROCESS_INFO, COM_PROCESS_KILL, COM_QUIT,
    COM_REFRESH, COM_RESET_CONNECTION, COM_SET_OPTION, COM_STATISTICS, COM_STMT_BULK_EXECUTE, COM_STMT_CLOSE,
    COM_QUERY, COM_STMT_FETCH, COM_STMT_PREPARE, COM_STMT_RESET, COM_STMT_SEND_LONG_DATA, ER_ACCESS_DENIED_ERROR,
    ER_NET_READ_INTERRUPTED, ER_UNKNOWN_COM_ERROR, LOGIN_ONLY_CAPABILITIES, SERVER_DEFAULT_CHARSET,
)
from proxy.protocol.packets import (
    ProtocolError, command, err_packet, logical_payload, ok_packet, text_rows,
)
from proxy.protocol.scan import FIELD_LIST, RESULT, SIMPLE, STATISTICS
from proxy.routing import classify as C

# Commands that always run on the primary, with the response kind to scan: mysql_list_fields(),
# mysql_stat(), mysql_list_processes() (the primary's process list), mysql_refresh() (flush
# operations, as FLUSH statements go to the primary), mysql_dump_debug_info().
_PRIMARY_KIND = {COM_FIELD_LIST: FIELD_LIST, COM_STATISTICS: STATISTICS, COM_PROCESS_INFO: RESULT,
                 COM_REFRESH: SIMPLE, COM_DEBUG: SIMPLE}
_STMT_COMMANDS = (COM_STMT_CLOSE, COM_STMT_SEND_LONG_DATA, COM_STMT_RESET, COM_STMT_FETCH)
_ANY_WRITE = C.Classification(C.WRITE, 0, "")
MAX_FAILED_CHANGE_USER = 3  # MariaDB's limit per connection (sql_acl.cc)
_GLOBAL_MODES = command(COM_QUERY, b"SET SESSION sql_mode = @@global.sql_mode, wait_timeout = @@global.wait_timeout")


def run(s, pkt, cmd: int) -> None:
    """Every command but COM_QUERY and COM_STMT_EXECUTE (session.py handles those)."""
    if cmd == COM_PING:
        s.write(ok_packet(1, s.status))
    elif cmd == COM_QUIT:
        s.close()
    elif cmd == COM_STMT_PREPARE:
        s.spawn(prepared.prepare(s, pkt))
    elif cmd in _STMT_COMMANDS:
        prepared.other(s, pkt, cmd)
    elif cmd == COM_STMT_BULK_EXECUTE:
        prepared.bulk_execute(s, pkt)
    elif cmd == COM_PROCESS_KILL:  # mysql_kill(): the id is an rwproxy session id (frontend/kill.py)
        s.spawn(kill.kill(s, True, int.from_bytes(logical_payload(pkt)[1:5].ljust(4, b"\0"), "little")))
    elif cmd in _PRIMARY_KIND:
        s.dispatch(pkt, _ANY_WRITE, _PRIMARY_KIND[cmd])
    elif cmd == COM_INIT_DB:
        db = logical_payload(pkt)[1:].decode("utf-8", "replace")
        s.dispatch(pkt, C.Classification(C.SESSION, C.F_USE_DB, "", db), SIMPLE)
    elif cmd == COM_SET_OPTION:
        s.spawn(_set_option(s, pkt))
    elif cmd == COM_CHANGE_USER:
        s.spawn(_change_user(s, pkt))
    elif cmd == COM_RESET_CONNECTION:
        s.spawn(_reset_connection(s))
    else:
        s.send_error(*ER_UNKNOWN_COM_ERROR, f"Unknown command (0x{cmd & 0xFF:02x}): not supported by rwproxy")


async def _set_option(s, pkt) -> None:
    # Multi-statements on/off shapes how every backend parses COM_QUERY: apply it to all.
    resp = None
    for name in list(s.backends) or [s.writer()]:
        be = await s.backend_for(name)
        resp = await be.command(pkt, SIMPLE)
        be.dirty = True
    s.write(resp)


async def _reset_connection(s) -> None:
    """As on the server: the session is as after login, autocommit the primary's global value."""
    s.status = start_status(s.worker, s.writer())
    for be in list(s.backends.values()):
        if not await be.reset():
            s.drop_backend(be)
        else:
            be.applied = 0  # (replicas run with autocommit on: no snapshot lasts)
            await be.ensure_autocommit(s.status if s.is_writer(be.server.name) else 1)
    s.stmts.clear()
    st = s.state
    st.reset()
    _login_only_caps_gone(s)
    # The server keeps the current database through a reset: connections opened later select it
    # too (they start in the login database), or, with none selected, the session stays where none is.
    if s.db != s.login_db:
        if s.db is None:
            st.history_overflow = True
        else:
            st.record(command(COM_INIT_DB, s.db.encode()), C.F_USE_DB)
    s.write(ok_packet(1, s.status))


def _login_only_caps_gone(s) -> None:
    """After COM_RESET_CONNECTION or COM_CHANGE_USER the server's session has the global sql_mode
    and wait_timeout, without what CLIENT_IGNORE_SPACE and CLIENT_INTERACTIVE gave it at login:
    connections the session opens from now on (whose handshake carries those capabilities) are
    brought there too, by an entry of its replayed history."""
    if s.caps & LOGIN_ONLY_CAPABILITIES:
        s.state.record(_GLOBAL_MODES, 0, s.backends.values())


async def _change_user(s, pkt) -> None:
    """As MariaDB does it: the session is reset first (transaction rolled back, temporary tables,
    variables and prepared statements gone, the character set the servers' default), then the new
    user authenticates. If that fails (wrong password, unknown database, a character set a client
    cannot use, the user's max_connections, a malformed packet) the client gets the error and keeps
    a fresh session of the old user in its old database, in the servers' default character set;
    after three failures every COM_CHANGE_USER gets ERROR 1047, which stops password guessing on
    one connection."""
    try:
        req, malformed = parse_change_user(logical_payload(pkt), s.caps), None
    except ProtocolError as e:
        req, malformed = None, e
    old_user, old_db = s.user, s.db
    for be in list(s.backends.values()):  # awaited: its named, table and row locks are gone before the answer
        if not be.closed and not be.relaying_for(s) and not await be.reset():
            s.drop_backend(be)
    s.release_backends()
    s.stmts.clear()
    s.charset = SERVER_DEFAULT_CHARSET
    s.start_session(old_user, old_db)
    _login_only_caps_gone(s)
    s.status = start_status(s.worker, s.writer())
    if s.failed_change_user >= MAX_FAILED_CHANGE_USER:
        return s.send_error(*ER_UNKNOWN_COM_ERROR, "Unknown command")
    if malformed is not None:  # (the server, too, has reset the session when it finds out)
        s.failed_change_user += 1
        return s.send_error(*ER_UNKNOWN_COM_ERROR, f"Unknown command: malformed COM_CHANGE_USER packet ({malformed})")
    auth = s.worker.authenticator
    try:
        user, seq = await auth.login(s, req.user, req.plugin, req.auth_response, s.salt, 1, s.host, s.tls,
                                     change_user=True)
    except asyncio.TimeoutError:  # as a server's net_read_timeout ends it
        s.send_error(*ER_NET_READ_INTERRUPTED, f"Got timeout reading communication packets: the client did not "
                     f"answer COM_CHANGE_USER's authentication within {auth.timeout:g} s")
        return s.close()
    except AccessDenied as e:
        FAILED_LOGINS.info("client %s: COM_CHANGE_USER: %s", s.host, clean(str(e), 256))
        s.failed_change_user += 1
        return s.write(err_packet(e.seq, ER_ACCESS_DENIED_ERROR, str(e), s.caps))
    if not admit_user(s, user, seq):
        return _keep_old_user(s, old_user)
    s.start_session(user, req.database)
    _login_only_caps_gone(s)
    # A collation id over 255 (MariaDB's UCA 14.0 ones) does not fit a handshake: the servers'
    # connections start in their default and replay SET NAMES ... COLLATE ... instead.
    wide = req.charset or 0
    s.charset = wide if wide <= 0xFF else SERVER_DEFAULT_CHARSET
    try:
        await start_writer(s)
        if wide > 0xFF:
            await _set_wide_collation(s, wide)
    except BackendError as e:  # an unknown database, a user the servers refuse, a charset like utf16
        if e.unavailable and s.worker.topology.readers:  # as at login: reads go on, writes wait
            return s.write(login_ok(s, seq))
        s.release_backends()
        s.charset = SERVER_DEFAULT_CHARSET
        s.start_session(old_user, old_db)
        _login_only_caps_gone(s)
        s.send_error(e.code, e.sqlstate, e.message, seq)
        return _keep_old_user(s, old_user, counts=e.code < 2000)  # (not for a server that is down)
    s.write(login_ok(s, seq))


async def _set_wide_collation(s, cid: int) -> None:
    """Give the session collation `cid` (> 255) by a SET NAMES in its history, if the server knows
    the id; an id it does not know leaves its default, as the server's own COM_CHANGE_USER does.
    (The names come from the server: `SET collation_connection = <id>` takes the id, where
    information_schema would not be reachable for a client that asked for CLIENT_NO_SCHEMA.)"""
    be = s.backends[s.writer()]
    if (await be.command(command(COM_QUERY, b"SET collation_connection = %d" % cid), RESULT))[4] != 0:
        return
    rows = text_rows(await be.command(command(COM_QUERY, b"SELECT @@character_set_connection, @@collation_connection"),
                                      RESULT))
    if rows and rows[0][0] and rows[0][1]:
        s.state.record(command(COM_QUERY, b"SET NAMES %s COLLATE %s" % (rows[0][0], rows[0][1])), 0, s.backends.values())
        await be.replay(s.state.history)


def _keep_old_user(s, old_user, counts: bool = True) -> None:
    """A COM_CHANGE_USER failed after the new user was counted: count the old one again."""
    s.failed_change_user += counts
    if s.counted_user is not None:
        s.worker.release_user(s.counted_user)
        s.counted_user = None
    if s.worker.admit_user(old_user):
        s.counted_user = old_user.name
    else:  # another worker took the last place meanwhile: the session cannot go on as either
        s.close()


def rare_flags(s, cmd, on_primary: bool) -> None:
    """A statement with one of the rare flags (F_RARE and above) succeeded on `s`."""
    cls = cmd.cls
    if cls.flags & C.F_WAIT_TIMEOUT:
        idle.wait_timeout_set(s, cmd)
    if cls.flags & C.F_DIAG_VARS:
        diagnostics.remember(s, cmd, on_primary)
    if not cls.flags & C.F_DROP_DB:
        return
    if cmd.server in s.backends:
        # A connection that dropped its current database has none selected, and a reset keeps
        # that: the pool must select its key's database again (or drop the connection) before
        # another session gets it, or that session's first unqualified table is ERROR 1046.
        s.backends[cmd.server].db_touched = True
    if on_primary:
        dropped = [p.db for p in cls.parts if p.flags & C.F_DROP_DB] if cls.parts else [cls.db]
        s.worker.pools.forget_collations(dropped)  # (created again, it may have another)
        if s.db is not None and s.db in dropped:
            # The server leaves the session without a current database (DATABASE() is NULL, an
            # unqualified table is ERROR 1046); its other connections still have it selected, and
            # a new one would replay USE of a database that is gone: the session stays on the
            # primary connection from now on, as a SET that cannot be replayed keeps it.
            s.db = None
            s.state.history_overflow = True
