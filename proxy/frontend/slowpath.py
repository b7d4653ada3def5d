"""A session's slow paths: a statement whose connection needs work first (connect and replay
the session's SET/USE history, wait for a writable primary during failover or switchover, wait
for a GTID on a replica, route around a replica that cannot be used), and the bookkeeping of
read-your-writes in gtid mode.

Functions of a ClientConnection (`s`), using only its public interface; they run as
coroutines the session spawned (it stays busy meanwhile).
"""

from __future__ import annotations

import asyncio
import logging

from proxy.backend.connection import BackendError
from proxy.logs import clean
from proxy.frontend import losses, prepared
from proxy.protocol.constants import COM_QUERY, CR_SERVER_LOST, ER_UNKNOWN_ERROR
from proxy.protocol.packets import command, err_packet, first_value
from proxy.protocol.scan import RESULT
from proxy.routing import classify as C
from proxy.routing.router import WRITER

log = logging.getLogger("rwproxy.client")

_LAST_GTID = command(COM_QUERY, b"SELECT @@last_gtid")


class SessionLost(Exception):
    """The server ended the connection holding state a new connection cannot restore (temporary
    tables, named locks, user variables...): the client must be told, as a server would tell it,
    by an error and a closed connection."""


async def run(s, coro) -> None:
    """Run one of the session's slow paths, answering the client when it fails; then finish the
    command unless it is still relayed (its backend calls command_done)."""
    try:
        await coro
    except SessionLost as e:
        losses.end_lost_session(s, *e.args)
    except BackendError as e:
        s.send_error(e.code, e.sqlstate, e.message)
    except (ConnectionError, asyncio.TimeoutError) as e:
        if not s.closed:
            s.write(err_packet(1, CR_SERVER_LOST, f"Lost connection to backend during query: {e or 'timeout'}"))
    except Exception:
        log.exception("session %d: internal error", s.conn_id)
        s.send_error(ER_UNKNOWN_ERROR[0], "HY000", "rwproxy internal error; see the proxy log")
    if s.inflight is None and s.reader.infile is None:
        s.finish()


async def send(s, cmd, to_writer: bool = False, wait_gtid: bool = False, restore_id: bool = False):
    """Send a statement whose connection needs work first: connect and replay, wait for a
    writable primary (failover, switchover), wait for a GTID, give LAST_INSERT_ID() the value the
    session's last write generated elsewhere (restore_id); route around a replica that cannot be
    used."""
    st = s.state
    w = s.worker
    name = cmd.server
    deadline = w.loop.time() + w.config.failover.write_hold_timeout
    while True:
        if to_writer:
            await w.wait_for_primary()  # held while failover/switchover runs
            name = s.writer()
        try:
            be = await s.backend_for(name)
            if wait_gtid:
                wait_gtid = False
                if not await gtid_wait(s, be):
                    to_writer = True
                    continue
            break
        except (BackendError, ConnectionError, asyncio.TimeoutError) as e:
            writer = to_writer or s.is_writer(name) or st.pin()
            if writer and isinstance(e, BackendError) and e.code not in (2003, 2013):
                raise  # the writer answered (access denied, unknown database...): that is the answer
            if writer:
                remaining = deadline - w.loop.time()
                if st.in_trx or remaining <= 0:
                    raise
                # The primary is unreachable: the monitor will say so and failover will
                # publish a new one; hold the statement meanwhile.
                log.info("session %d: primary %s unreachable (%s); holding the statement", s.conn_id, name,
                         clean(str(e), 256))
                await w.next_topology(min(0.5, remaining))
                to_writer = True
                continue
            # A replica that cannot take the read, for whatever reason (down, full, the user missing
            # there): nothing reached the client yet, so another server answers, and the user's new
            # reads stay off this one for a while.
            st.failed_servers = st.failed_servers | {name}
            if isinstance(e, BackendError) and e.code not in (2003, 2013) and w.router.back_off(s.user.name, name):
                w.refused[name] = w.refused.get(name, 0) + 1
                log.warning("replica %s refused user %s (%s); its reads go to other servers for %g s",
                            name, clean(s.user.name), clean(f"{e.code}: {e.message}", 256), w.router.backoff_secs)
            else:
                log.info("session %d: replica %s unusable (%s); routing elsewhere", s.conn_id, name,
                         clean(str(e), 256))
            plan = w.router.plan(st, cmd.cls, w.topology)
            to_writer = plan.target is WRITER or plan.error is not None
            wait_gtid = plan.wait_gtid
            name = s.writer() if to_writer else plan.target
    cmd.server = name
    if restore_id and st.insert_id and be is not s.insert_conn:
        await be.command(command(COM_QUERY, b"DO LAST_INSERT_ID(%d)" % st.insert_id), RESULT)
        s.insert_conn = be
    out = cmd.packet
    if cmd.stmt_id:
        out = await prepared.stmt_packet(s, out, cmd.stmt_id, name, be)
        if out is None:
            return
    s.send(be, out, cmd)


async def replay_shared(s, cmd, to_writer: bool):
    """Run the session's last shared read again on its own connection, then the statement about it
    there, so that it sees what that read left (warnings, FOUND_ROWS()). The digest stops sharing
    (ClientConnection.dispatch), so the next time needs no replay. A shared write cannot run again:
    the statement runs on the session's own connection, where ROW_COUNT() and SHOW WARNINGS answer
    about that connection's last statement, as after a reconnect (docs/multiplexing.md)."""
    last, s.last_shared = s.last_shared, None
    if last.server == cmd.server and last.cls.route == C.READ:
        be = await s.backend_for(cmd.server)
        out = (await prepared.stmt_packet(s, last.packet, last.stmt_id, cmd.server, be, quiet=True)
               if last.stmt_id else last.packet)
        if out is not None:  # (None: the statement was closed since, or does not prepare there)
            await be.command(out, last.kind)
    await send(s, cmd, to_writer)


async def gtid_wait(s, be) -> bool:
    """MASTER_GTID_WAIT on a replica before a read that must see the session's last write."""
    timeout = s.worker.config.routing.gtid_wait_timeout
    sql = f"SELECT MASTER_GTID_WAIT('{s.state.last_gtid}', {timeout})".encode()
    resp = await be.command(command(COM_QUERY, sql), RESULT, timeout=timeout + 2)
    return first_value(resp) == b"0"


async def fetch_gtid(s, be):
    """After a write in gtid read-your-writes mode: remember the GTID it produced."""
    try:
        value = first_value(await be.command(_LAST_GTID, RESULT, timeout=5))
        s.state.wrote(value.decode() if value else "")
    except (ConnectionError, asyncio.TimeoutError):
        s.state.wrote()
    s.finish()
