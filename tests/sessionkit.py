"""Driving a real ClientConnection without servers, the way uvicorn tests its protocol classes:
in-memory transports, a real Worker (router, classifier, pools' interface), and a test that
plays both the client and every server by reading what the session wrote and feeding bytes back.

    kit = Kit()                          # a worker with node1 (primary), node2 and node3 (replicas)
    s = kit.session()                    # logged in as app, idle
    s.send(query(b"SELECT 1"))           # the client's bytes
    be = kit.sent_to("node2")            # the backend connection that got it (its bytes: be.transport.out)
    be.answer(result(b"1"))              # the server's answer, relayed to the client
    assert s.received() == result(b"1", seq=...)
"""

from __future__ import annotations

import asyncio
import time

from proxy.backend.connection import BackendConnection, BackendError
from proxy.cluster.topology import PRIMARY, REPLICA, ServerState, Topology
from proxy.config import build_config
from proxy.frontend.reader import COMMAND
from proxy.frontend.session import ClientConnection
from proxy.protocol.constants import (
    COM_QUERY, PROXY_CAPABILITIES, SERVER_STATUS_AUTOCOMMIT, SERVER_STATUS_IN_TRANS, SESSION_SHAPING_CAPABILITIES,
)
from proxy.protocol.packets import err_payload, frame, lenenc_str, ok_payload
from proxy.runtime.worker import Worker

AUTOCOMMIT, IN_TRANS = SERVER_STATUS_AUTOCOMMIT, SERVER_STATUS_IN_TRANS


# ---- wire bytes ---------------------------------------------------------------------------------

def query(sql: bytes) -> bytes:
    return frame(bytes((COM_QUERY,)) + sql, 0)


def ok(status: int = AUTOCOMMIT, seq: int = 1, warnings: int = 0) -> bytes:
    return frame(ok_payload(status=status, warnings=warnings), seq)


def err(code: int = 1146, message: str = "Table 'app.nope' doesn't exist", sqlstate: bytes = b"42S02") -> bytes:
    return frame(err_payload(code, sqlstate, message), 1)


def result(value: bytes, status: int = AUTOCOMMIT) -> bytes:
    """A one-row, one-column text result set, as a server sends it with CLIENT_DEPRECATE_EOF."""
    coldef = b"".join(lenenc_str(x) for x in (b"def", b"", b"", b"", b"v", b"v")) + bytes(13)
    return (frame(b"\x01", 1) + frame(coldef, 2) + frame(lenenc_str(value), 3)
            + frame(ok_payload(status=status, header_byte=0xFE), 4))


# ---- transports ---------------------------------------------------------------------------------

def run_soon(fn, *args) -> None:
    """Call fn from inside the running loop (protocol callbacks run there), then run what it started."""
    loop = asyncio.get_event_loop()
    loop.call_soon(fn, *args)
    for _ in range(20):
        loop.run_until_complete(asyncio.sleep(0))


class FakeTransport:
    """Records what the protocol writes; close/abort end the connection as the loop would."""

    def __init__(self, protocol=None):
        self.protocol = protocol
        self.out = bytearray()
        self.closed = False
        self.reading = True

    def write(self, data) -> None:
        if not self.closed:
            self.out += data

    def take(self) -> bytes:
        data, self.out = bytes(self.out), bytearray()
        return data

    def close(self) -> None:
        self._end()

    def abort(self) -> None:
        self._end()

    def _end(self) -> None:
        if not self.closed:
            self.closed = True
            if self.protocol is not None:
                asyncio.get_event_loop().call_soon(self.protocol.connection_lost, None)

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


class FakeBackend(BackendConnection):
    """A backend connection whose server is the test."""

    __slots__ = ()

    def answer(self, data: bytes) -> None:
        """The server sends `data` (a whole response, or part of one); delivered by the loop, as
        asyncio delivers it."""
        run_soon(self.data_received, data)

    def hang_up(self) -> None:
        """The server closes the connection (crash, KILL, wait_timeout)."""
        self.transport.closed = True
        run_soon(self.connection_lost, None)


class FakePools:
    """The pools' interface: every acquire opens a FakeBackend (or fails, for servers told to)."""

    def __init__(self):
        self.opened: list[FakeBackend] = []
        self.refuse: dict[str, BackendError] = {}  # server name -> the error its connects fail with
        self.released: list = []
        self.discarded: list = []
        self.open_count: dict[str, int] = {}
        self.waiting = 0  # (the real pools' queue at max_server_connections: never used here)
        self.waiters: dict = {}
        self.given_back = 0
        self.queued: dict = {}

    async def acquire(self, server, user, password, caps, charset, db) -> FakeBackend:
        if server.name in self.refuse:
            raise self.refuse[server.name]
        be = FakeBackend(server, (server.name, user, caps, charset, db), caps)
        be.connection_made(FakeTransport(be))
        be.thread_id = 100 + len(self.opened)
        self.opened.append(be)
        return be

    def release(self, be) -> None:
        self.released.append(be)

    def discard(self, be) -> None:
        self.discarded.append(be)
        be.close()

    def drop_server(self, name: str) -> None:
        pass

    def expire_idle(self) -> None:
        pass

    def close_all(self) -> None:
        pass


# ---- the kit ----------------------------------------------------------------------------------------

def topology(primary: str = "node1", held: bool = False, down: tuple = (), version: int = 1) -> Topology:
    servers = {}
    for i, name in enumerate(("node1", "node2", "node3")):
        role = PRIMARY if name == primary else REPLICA
        servers[name] = ServerState(name, "127.0.0.1", 3306 + i, role=role, readable=name not in down,
                                    state="down" if name in down else "up")
    return Topology(servers, version, time.time(), writes_held=held)


class Session:
    """The client's end of one ClientConnection."""

    def __init__(self, kit: "Kit", conn: ClientConnection):
        self.kit, self.conn = kit, conn
        self.transport: FakeTransport = conn.transport

    def send(self, data: bytes) -> None:
        run_soon(self.conn.data_received, data)

    def received(self) -> bytes:
        self.kit.settle()
        return self.transport.take()

    @property
    def state(self):
        return self.conn.state


class Kit:
    def __init__(self, **sections):
        data = {
            "proxy": {"listen": "127.0.0.1:6033", "workers": 1},
            "backends": [{"name": f"node{i}", "host": "127.0.0.1", "port": 3305 + i} for i in (1, 2, 3)],
            "users": [{"name": "app", "password": "app"}],
            "pool": {"multiplex": False},
        }
        for key, value in sections.items():
            data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
        self.config = build_config(data)
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.worker = Worker(self.config, 0, None, topology(), b"5.5.5-10.11.0-MariaDB", None)
        self.worker.loop = self.loop
        self.pools = self.worker.pools = FakePools()
        self._ids = 0

    def close(self) -> None:
        self.loop.close()
        asyncio.set_event_loop(None)

    def settle(self, rounds: int = 20) -> None:
        """Let the session's slow paths run as far as they can without new input."""
        for _ in range(rounds):
            self.loop.run_until_complete(asyncio.sleep(0))

    def wait(self, seconds: float) -> None:
        self.loop.run_until_complete(asyncio.sleep(seconds))
        self.settle()

    def session(self, user: str = "app", db: str | None = "app") -> Session:
        """A logged-in, idle session (the handshake itself is tested against real clients)."""
        self._ids += 1
        conn = ClientConnection(self.worker, (1 << 24) | self._ids)
        conn.transport = FakeTransport(conn)
        conn.phase = COMMAND
        conn.caps = PROXY_CAPABILITIES
        conn.start_session(self.config.user(user), db)
        self.worker.clients.add(conn)
        conn.reader.limit = self.config.proxy.max_allowed_packet
        return Session(self, conn)

    def set_topology(self, topo: Topology) -> None:
        self.worker.set_topology(topo)
        self.settle()

    def connections(self, server: str) -> list[FakeBackend]:
        return [be for be in self.pools.opened if be.server.name == server]

    def sent_to(self, server: str) -> FakeBackend | None:
        """The connection to `server` that has unanswered bytes from the session, if any."""
        for be in reversed(self.connections(server)):
            if be.transport.out:
                return be
        return None

    def where(self, sql: bytes) -> str | None:
        """The server whose connection got `sql` last (its bytes are left in place)."""
        for be in reversed(self.pools.opened):
            if bytes(sql) in bytes(be.transport.out):
                return be.server.name
        return None


CAPS = PROXY_CAPABILITIES & SESSION_SHAPING_CAPABILITIES
