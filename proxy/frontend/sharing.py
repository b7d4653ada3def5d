"""Putting a session's statement on a shared connection (multiplexing, backend/shared.py).

The router's plan says a statement may share; here the session's shared-connection key is
found (sessions share only with sessions of the same server, user, capabilities, charset,
login database and SET/USE history), a connection picked, and the statement queued on it. A
function of a ClientConnection (`s`) on the hot path, using its public interface.
"""

from __future__ import annotations

from proxy.protocol.constants import SESSION_SHAPING_CAPABILITIES
from proxy.routing.statements import DIRECT_ID


def try_shared(s, cmd) -> bool:
    """Queue an eligible statement on a shared connection (backend/shared.py); False: use our own."""
    w = s.worker
    sh = w.shared
    est = sh.profiles.shareable(cmd.cls.digest)
    if est is None:  # not known to answer small and fast (yet)
        return False
    st = s.state
    name = cmd.server
    known = s.share_keys.get(name)
    if known is not None and known[0] == st.hversion:
        key = known[1]
    else:  # sessions share only with sessions of the same SET/USE history (SET NAMES, sql_mode...)
        key = (name, s.user.name, s.caps & SESSION_SHAPING_CAPABILITIES, s.charset, s.login_db,
               tuple(st.history))
        s.share_keys[name] = (st.hversion, key)
    line = sh.pick(w.servers[name], key, s.user.password)
    if line is None or line.closed:
        return False
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
