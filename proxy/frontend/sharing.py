"""Putting a session's statement on a shared connection (multiplexing, backend/shared.py), and
answering the statements that ask about an earlier one wherever that one ran.

The router's plan says a statement may share; here the session's shared-connection key is
found (sessions share only with sessions of the same server, user, capabilities, charset,
login database and SET/USE history), a connection picked, and the statement queued on it.

What a statement leaves on its connection, and how a later one still finds it:
- LAST_INSERT_ID() (and LASTVAL(), CONNECTION_ID(), @@identity...) asks the session's writer
  connection (Router.plan). The AUTO_INCREMENT value of a write that ran on a shared connection
  (or on another master) is in the session's state, read from its OK packet: the writer
  connection gets it (`DO LAST_INSERT_ID(n)`) before the statement that may read it.
- SHOW WARNINGS, ROW_COUNT(), FOUND_ROWS()... (F_PREVIOUS) ask the connection that ran the
  previous statement. A shared read runs again on the session's own connection first; a
  shared write cannot, so a write digest shares only after the statement that followed a run
  of it on the session's own connection did not ask about it (Profiles.confirm), and any
  statement that asks about the previous one stops that one's digest from sharing.
Functions of a ClientConnection (`s`) using its public interface; try_shared is on the hot path.
"""

from __future__ import annotations

from proxy.backend.shared import EXCLUSIVE
from proxy.frontend import slowpath
from proxy.protocol.constants import SESSION_SHAPING_CAPABILITIES
from proxy.routing import classify as C
from proxy.routing.statements import DIRECT_ID


_READ = C.READ


def try_shared(s, cmd) -> bool:
    """Queue an eligible statement on a shared connection (backend/shared.py); False: use our own."""
    w = s.worker
    cls = cmd.cls
    read = cls.route == _READ
    name = cmd.server
    if not read and name in s.backends:
        # a write shares only instead of taking a connection: one already held costs nothing more
        # (a shared write holds its line alone, so it gains no batching: 32 busy writers sharing
        # too ran -9% QPS at +24% CPU per UPDATE, issue22-busy-writers-share-experiment) while
        # the shared line saves a connection when the session has none
        return False
    sh = w.shared
    est = sh.profiles.shareable(cls.digest)
    if est is None:  # not known to answer small and fast (yet)
        return False
    st = s.state
    known = s.share_keys.get(name)
    if known is not None and known[0] == st.hversion:
        key = known[1]
    else:
        key = share_key(s, name)
        s.share_keys[name] = (st.hversion, key)
    line = sh.pick(w.servers[name], key, s.user.password)
    if line is None or line.closed:
        return False
    if not read:
        est += EXCLUSIVE  # nothing queues behind a write
    sid = cmd.stmt_id
    if sid:
        stmt = s.stmts.stmts[sid]
        bid = line.prepared(stmt.sql)
        if bid is None:
            if not line.direct_ok:
                return False
            out = stmt.shared_packet(cmd.packet, DIRECT_ID)
            if out is None:
                return False
            e = line.send(s, out, cmd.kind, est, stmt.sql, stmt.prepare_packet)
        else:
            out = stmt.shared_packet(cmd.packet, bid)
            if out is None:
                return False
            e = line.send(s, out, cmd.kind, est)
    else:
        e = line.send(s, cmd.packet, cmd.kind, est)
    s.busy = True
    s.shared_on, s.shared_entry = line, e
    s.inflight = cmd
    s.sent_at = e.sent
    w.router.balancer.started(name)
    return True


def prepare_refused(s, line) -> None:
    """The statement's PREPARE on shared connection `line` was refused at the server's
    max_prepared_stmt_count (1461), so its execute never ran; the shared connections of this
    worker have closed what they kept prepared there. The statement runs on the session's own
    connection, whose prepare has every worker close theirs and tries again (prepared.py), as
    a client connected to the server directly would not be refused for rwproxy's cache."""
    cmd = s.inflight
    s.shared_on = s.shared_entry = None
    s.worker.router.balancer.finished(line.server.name)
    s.spawn(slowpath.send(s, cmd, s.is_writer(cmd.server)))


def share_key(s, name: str) -> tuple:
    """The key of the shared connections to `name` that session `s` may use: sessions share only
    with sessions of the same user, capabilities, charset, login database and SET/USE history
    (SET NAMES, sql_mode...)."""
    return (name, s.user.name, s.caps & SESSION_SHAPING_CAPABILITIES, s.charset, s.login_db,
            tuple(s.state.history))


def after_write(s, cls) -> None:
    """The statement after a run of a write whose digest waits for confirmation (Profiles.confirm):
    if it does not ask about that write, the write may share from now on."""
    if not cls.flags & C.F_PREVIOUS:
        s.worker.shared.profiles.confirm(s.unconfirmed)
    s.unconfirmed = None


def follow_up(s, cmd, plan, to_writer: bool) -> bool:
    """A statement that may ask about an earlier one (F_CONN_BOUND, F_CONN_STATE): take a slow path
    when its answer must first be put where it runs. True if one was taken."""
    st = s.state
    if cmd.cls.flags & C.F_PREVIOUS:
        if s.worker.shared is not None:  # the previous digest keeps to one connection from now on
            s.worker.shared.profiles.never(st.last_digest)
        if plan.replay_shared:  # it ran on a shared connection
            s.spawn(slowpath.replay_shared(s, cmd, to_writer))
            return True
    elif st.insert_id and s.backends.get(cmd.server) is not s.insert_conn:
        # the session's last AUTO_INCREMENT value came from a shared connection or another master
        s.spawn(slowpath.send(s, cmd, to_writer, plan.wait_gtid, restore_id=True))
        return True
    return False
