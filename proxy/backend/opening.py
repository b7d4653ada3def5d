"""Opening a backend connection: TCP or unix socket, the handshake, and the larger network
buffer that makes a server send results in fewer, bigger writes."""

from __future__ import annotations

import asyncio
import logging

from proxy.backend.connection import BackendConnection, BackendError
from proxy.protocol.constants import COM_PING
from proxy.protocol.handshake import ServerRefused
from proxy.protocol.packets import ProtocolError, command, parse_err
from proxy.protocol.scan import SIMPLE

log = logging.getLogger("rwproxy.backend")


# Servers (by name, per worker process) that refused the net-buffer packet: not asked again.
_NO_NET_BUFFER: set[str] = set()


async def grow_net_buffer(conn: BackendConnection, size: int, timeout: float) -> bool:
    """Make the server write this connection's results in chunks of about `size` bytes.

    A MariaDB/MySQL server writes a result through its per-connection network buffer,
    flushing it whenever it fills: net_buffer_length, 16 KB by default. So a 130 KB result
    leaves the server in ~8 writes, and a proxy pays a wakeup, a read and a write for each:
    on a loopback VM ~18 us apiece, most of a 1,000-row result's cost. That buffer grows to
    fit the largest packet the server has read on the connection and never shrinks (the
    session value of net_buffer_length is read-only), so one COM_PING carrying `size` bytes
    of padding (the server ignores a ping's payload) makes every later result leave in
    chunks of `size`. The server pays `size` bytes of memory per rwproxy connection.

    False if the server refused it (a packet over its max_allowed_packet: it answers 1153
    and hangs up); the caller then opens a plain connection."""
    try:
        resp = await conn.command(command(COM_PING, bytes(size - 1)), SIMPLE, timeout)
    except asyncio.TimeoutError:  # a slow server, not a refusal: this connection is replaced, later ones try again
        log.info("backend %s did not answer the %d-byte ping within %.1f s; opening a plain connection",
                 conn.server.name, size, timeout)
        return False
    except ConnectionError:
        resp = b""
    if resp[4:5] == b"\x00":
        return True
    why = parse_err(resp[4:])[2] if resp[4:5] == b"\xff" else "connection closed"
    log.warning("backend %s refused a %d-byte packet (%s): until rwproxy restarts, its new connections there "
                "keep the server's own net_buffer_length; raise max_allowed_packet there above %d, or set [pool] "
                "backend_net_buffer = 0", conn.server.name, size, why, size)
    _NO_NET_BUFFER.add(conn.server.name)
    return False


async def connect(server, key, caps: int, user: str, password: str, db, charset: int, timeout: float, tls=None,
                  factory=BackendConnection, net_buffer: int = 0):
    """Open and authenticate a backend connection; raises BackendError with a client-ready error.

    tls: the backend's backend_tls.BackendTLS (None = plaintext).
    net_buffer: > 0 asks the server to send results in chunks of that size (grow_net_buffer)."""
    conn = await _open(server, key, caps, user, password, db, charset, timeout, tls, factory)
    if net_buffer > 0 and server.name not in _NO_NET_BUFFER and not await grow_net_buffer(conn, net_buffer, timeout):
        conn.close()
        conn = await _open(server, key, caps, user, password, db, charset, timeout, tls, factory)
    return conn


async def _open(server, key, caps: int, user: str, password: str, db, charset: int, timeout: float, tls, factory):
    loop = asyncio.get_running_loop()
    make = factory
    factory = lambda: make(server, key, caps)  # noqa: E731
    try:
        if server.socket:  # a server on this host: no TCP/IP stack on either side
            opening = loop.create_unix_connection(factory, server.socket)
        else:
            opening = loop.create_connection(factory, server.host, server.port)
        _, conn = await asyncio.wait_for(opening, timeout)
    except (OSError, asyncio.TimeoutError) as e:
        why = "timed out" if isinstance(e, asyncio.TimeoutError) else (e.strerror or str(e))
        raise BackendError(2003, "HY000", f"Can't connect to backend {server.name} ({server.where}): {why}")
    try:
        await conn.handshake(user, password, db, charset, timeout, tls)
    except BackendError:
        conn.close()
        raise
    except ServerRefused as e:  # full (1040) or blocking this host: the server's own answer, as a client gets it
        conn.close()
        raise BackendError(e.code, e.state, e.message) from None
    except (ConnectionError, asyncio.TimeoutError, ProtocolError, ValueError, IndexError) as e:
        conn.close()
        raise BackendError(2013, "HY000", f"Lost connection to backend {server.name} during handshake: {e or 'timeout'}")
    return conn

