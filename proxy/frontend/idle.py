"""A session's own server connections: taken from the pool (acquire), and given back when the
session is idle ([pool] idle_release).

Why: one server connection per client session, held for the session's life, is what made 3,000
idle clients cost 3,010 server connections, and the 2,001st get `Too many connections` from
the servers. A session with nothing that ties it to its connections (SessionState.releasable:
no transaction, temporary table, lock, expression-set user variable, unreplayable SET, open
cursor, unread warnings, pending FOUND_ROWS()) gives back a connection it has not used for
`idle_release`, and at once when other sessions wait for a connection to that server
(backend/pool.py's queue at max_server_connections). Its next statement takes a connection from
the pool and replays the session's SET/USE history there (ClientConnection.backend_for), as a
session's first statement on a replica always has.

Functions of a ClientConnection (`s`) and a Worker (`w`), using their public attributes.
"""

from __future__ import annotations

import logging
import re
import time

from proxy.frontend.reader import COMMAND
from proxy.config.schema import RYW_GTID
from proxy.protocol import tracking
from proxy.protocol.constants import (
    CLIENT_MULTI_STATEMENTS, CLIENT_SESSION_TRACK, COM_QUERY, SERVER_STATUS_AUTOCOMMIT,
    SESSION_SHAPING_CAPABILITIES,
)
from proxy.protocol.packets import command
from proxy.protocol.scan import RESULT
from proxy.routing.classify import session_value

_INTEGER = re.compile(r"[+-]?\d{1,20}")
WAIT_TIMEOUT_MAX = 31536000  # the server's largest wait_timeout (365 days)
FINE_BELOW = 10.0  # s: shorter session limits get their own timer (the worker's sweep runs once a second)
log = logging.getLogger("rwproxy.client")


def idle_for(s, now: float) -> float:
    """Seconds logged-in session `s` has been waiting for its client, as seen by the worker's
    sweeps (once a second): from the first sweep that found it idle with nothing received
    since the sweep before. 0 while a command runs or before login. Counting received chunks
    instead of stamping every command keeps the clock off the hot path."""
    if s.phase != COMMAND or s.busy or s.activity != s.idle_seen:
        s.idle_seen, s.idle_since = s.activity, now
        return 0.0
    return now - s.idle_since


def limit(s) -> float:
    """Seconds session `s` may wait for its client before it is closed (0: never): its own SET
    wait_timeout, bounded by [proxy] client_idle_timeout (as ProxySQL bounds a client's
    wait_timeout by mysql-wait_timeout), else client_idle_timeout."""
    own, cap = s.state.wait_timeout if s.state is not None else 0.0, s.worker.config.proxy.client_idle_timeout
    return own if own and (not cap or own < cap) else cap


def expire(s, now: float) -> bool:
    """Close session `s` if its client has been idle longer than its limit (the client learns it at
    its next command: the connection is gone, as after a server's wait_timeout). True if closed."""
    lim = limit(s)
    waited = idle_for(s, now) if lim and not s.closed else 0.0
    if waited <= lim:
        return False
    own = s.state is not None and lim == s.state.wait_timeout
    log.info("session %d: idle for %.1f s (%s %g s); closing it", s.conn_id, waited,
             "its wait_timeout" if own else "client_idle_timeout", lim)
    s.close()
    return True


def wait_timeout_set(s, cmd) -> None:
    """A SET of the session's wait_timeout succeeded: from now on session `s` closes after that
    many idle seconds, as on the server (whose own copy, on the session's connections, only
    closes connections rwproxy reopens). A literal value or DEFAULT; an expression is left to
    the server and the limit stays as it was. Values out of the server's range are clamped as
    the server clamps them (1 .. 31536000)."""
    sql = s.stmts.stmts[cmd.stmt_id].sql if cmd.stmt_id else cmd.packet[5:]
    value = session_value(sql, "wait_timeout")
    if value is None:
        return
    if value.upper() == "DEFAULT":
        s.state.wait_timeout = 0.0
    elif _INTEGER.fullmatch(value):
        s.state.wait_timeout = float(min(max(int(value), 1), WAIT_TIMEOUT_MAX))
    else:
        return
    lim = limit(s)
    if lim and lim < FINE_BELOW and s.idle_watch is None:
        s.idle_watch = s.worker.loop.call_later(lim / 10, watch_wait_timeout, s)


def watch_wait_timeout(s) -> None:
    """A short wait_timeout (under FINE_BELOW s) is watched ten times per period, not by the worker's
    once-a-second sweep: a client that set 1 s and slept 2 finds its connection gone, as on the server."""
    s.idle_watch = None
    lim = limit(s)
    if s.closed or not lim or lim >= FINE_BELOW or expire(s, time.monotonic()):
        return
    s.idle_watch = s.worker.loop.call_later(lim / 10, watch_wait_timeout, s)


async def acquire(s, name: str):
    """A connection to `name` for session `s` from the pool (it may wait in line there), set up
    for the session: the state the SET/USE history does not carry is restored on the writer.
    (The caller replays the history.)"""
    w = s.worker
    track = gtid_tracking(s, name)
    be = await w.pools.acquire(w.servers[name], s.user.name, s.user.password,
                               s.caps & SESSION_SHAPING_CAPABILITIES | (CLIENT_SESSION_TRACK if track else 0),
                               s.charset, s.login_db)
    if s.closed:  # (the client left while it waited for the connection)
        w.pools.release(be)
        raise ConnectionError("client gone")
    be.client = s
    be.applied = 0
    be.hold, be.gtid_tracked = None, False
    s.backends[name] = be
    w.holders.add(s)
    if s.is_writer(name):
        await restore_writer(be, s.status & SERVER_STATUS_AUTOCOMMIT, s.state.insert_id, track)
        if s.state.insert_id:
            s.insert_conn = be
    else:
        await be.ensure_autocommit(1)  # replicas run with autocommit on (no snapshot lasts)
    return be


def gtid_tracking(s, name: str) -> int:
    """How session `s`'s new connection to `name` learns the GTIDs of its writes
    (protocol/tracking.py): 0 = not at all (SELECT @@last_gtid after each write, or no gtid
    read-your-writes), 1 = the client tracks session state too, 2 = tracked for the proxy alone.
    A client sending several statements in one packet gets 0 in place of 2: the OK packets
    between them would carry state that only the final one is stripped of."""
    if s.state.ryw_mode != RYW_GTID or not s.is_writer(name):
        return 0
    if s.caps & CLIENT_SESSION_TRACK:
        return 1
    return 0 if s.caps & CLIENT_MULTI_STATEMENTS else 2


async def restore_writer(be, autocommit: int, insert_id: int, track: int = 0) -> None:
    """A new connection to the session's writer: what the SET/USE history does not carry."""
    be.hold = bytearray() if track == 2 else None
    be.gtid_tracked = False
    if track:
        resp = await be.command(command(COM_QUERY, tracking.TRACK_ALSO if track == 1 else tracking.TRACK_ONLY), RESULT)
        be.gtid_tracked = resp[4] != 0xFF  # (a server that cannot track last_gtid: asked after each write)
    await be.ensure_autocommit(autocommit)  # (not in the replay history: replicas keep it on)
    if insert_id:  # LAST_INSERT_ID() answers on this connection as it did on the one given back
        await be.command(command(COM_QUERY, b"DO LAST_INSERT_ID(%d)" % insert_id), RESULT)


def release(s, now: float, min_idle: float, servers=None) -> int:
    """Give back to the pool the connections of session `s` unused for `min_idle` seconds (of
    `servers` only, a mapping whose true values name them, if given) when nothing ties the
    session to them. Returns how many went back."""
    st = s.state
    if s.busy or s.closed or s.phase != COMMAND or st is None or s.reader.infile is not None:
        return 0
    if not st.releasable() or s.stmts.long_data_pending():
        return 0
    pools = s.worker.pools
    n = 0
    for name, be in list(s.backends.items()):
        if servers is not None and not servers.get(name):
            continue
        if be.closed or (min_idle > 0 and now - max(be.done_at, be.last_used) < min_idle):
            continue
        del s.backends[name]
        s.stmts.forget_server(name)  # (prepared again there, or elsewhere, at the next execute)
        if be.dirty:
            pools.discard(be)
        else:
            pools.release(be)
        n += 1
    pools.given_back += n
    return n


def sweep(w, now: float) -> None:
    """Every session holding connections gives back those idle for idle_release."""
    after = w.release_after
    if not after:
        return
    holders = w.holders
    for c in list(holders):
        if not c.closed and c.backends:
            release(c, now, after)
        if c.closed or not c.backends:
            holders.discard(c)


def under_pressure(w, name: str, wanted: int) -> None:
    """`wanted` checkouts wait for a connection to `name`: sessions holding an idle one there,
    with nothing tying them to it, give it back now."""
    if not w.release_after:
        return
    given = 0
    only = {name: True}
    holders = w.holders
    for c in list(holders):
        if name in c.backends:
            given += release(c, 0.0, 0.0, only)
            if not c.backends:
                holders.discard(c)
            if given >= wanted:
                return
