"""When a server goes away under a session: a transaction lost with it ends as a rolled-back
transaction (ERROR 1213, the session goes on), and state a new connection cannot restore
(temporary tables, named locks, user variables, LOCK TABLES...) ends the session the way a server
ends a killed connection (ERROR 1927, then the connection closes). Either way the client is told;
a session whose SET/USE history restores everything reconnects without a word.

Functions of a ClientConnection (`s`), using only its public interface.
"""

from __future__ import annotations

import logging

from proxy.logs import clean
from proxy.protocol.constants import ER_CONNECTION_KILLED

log = logging.getLogger("rwproxy.client")


def trx_lost(s, name: str) -> bool:
    """A transaction whose server died or stopped being the primary cannot continue
    anywhere: tell the client clearly, once, and start afresh (or, if the session held more
    than the transaction there, end it as end_lost_session does)."""
    st = s.state
    tb = s.backends.get(st.trx_server)
    if st.trx_server == name and tb is not None and not tb.closed:
        return False
    server = st.trx_server
    msg = (f"rwproxy: the transaction was lost because its server {server} failed or stopped being "
           f"the primary; it was rolled back there. Restart the transaction.")
    log.info("session %d: %s", s.conn_id, msg)
    st.in_trx = False
    st.trx_server = None
    st.pending_write = False
    s.send_error(1213, "40001", msg)
    lost = st.unrestorable()
    if lost:
        end_lost_session(s, server, lost, told=True)
    return True

def end_lost_session(s, server: str, lost: list[str], told: bool = False) -> None:
    """The connection to `server` that held `lost` is gone: the session cannot go on without the
    client noticing, so it ends the way a server ends a killed connection (ERROR 1927, then
    the connection closes; `told`: the error was already sent)."""
    what = ", ".join(lost)
    log.warning("session %d (user %s): its connection to %s ended, and a new one cannot restore its %s; "
                "closing the client connection", s.conn_id, clean(s.user.name), server, what)
    if not told:
        s.send_error(ER_CONNECTION_KILLED[0], ER_CONNECTION_KILLED[1],
                        f"rwproxy: the connection to backend server {server} ended and took this session's "
                        f"{what} with it; reconnect")
    s.close()
