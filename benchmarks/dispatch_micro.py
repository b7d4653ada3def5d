"""Python cost of one statement through rwproxy's hot path, without the network.

Real ClientConnection, Router, Classifier, BackendConnection and C scanner;
transports are in-memory stubs, so the figure is the proxy's own Python work
per statement (the syscalls the real path adds are measured by benchmarks.run).

    python -m benchmarks.dispatch_micro
"""

from __future__ import annotations

import asyncio
import os
import time

import uvloop

from proxy.backend import shared as shared_module
from proxy.backend.connection import BackendConnection
from proxy.backend.shared import SharedBackend
from proxy.config.load import build_config
from proxy.frontend.sharing import share_key
from proxy.protocol.constants import PROXY_CAPABILITIES, SERVER_STATUS_AUTOCOMMIT
from proxy.protocol.packets import frame, lenenc_str, ok_payload
from proxy.routing.statements import Stmt
from proxy.cluster.topology import PRIMARY, REPLICA, ServerState, Topology


class StubTransport:
    """Records nothing: the backend 'answers' synchronously in write()."""

    def __init__(self, on_write=None):
        self.on_write = on_write

    def write(self, data):
        if self.on_write is not None:
            self.on_write(data)

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 1) if name == "peername" else default

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def close(self):
        pass

    def is_closing(self):
        return False


def _row_response() -> bytes:
    """A one-row, one-column text result (DEPRECATE_EOF): column count, definition, row, OK."""
    coldef = b"".join(lenenc_str(x) for x in (b"def", b"sbtest", b"sbtest1", b"sbtest1", b"c", b"c")) + b"\x0c\x21\x00\x78\x00\x00\x00\xfe\x00\x00\x00\x00\x00"
    return (frame(b"\x01", 1) + frame(coldef, 2) + frame(lenenc_str(b"x" * 120), 3)
            + frame(ok_payload(status=SERVER_STATUS_AUTOCOMMIT, header_byte=0xFE), 4))


def _session(multiplex: bool):
    """A worker and one logged-in session on it, with stub connections to three servers."""
    from proxy.frontend.session import ClientConnection
    from proxy.runtime.worker import Worker

    data = {
        "proxy": {"listen": "127.0.0.1:0", "workers": 1},
        "backends": [{"name": f"node{i}", "host": "127.0.0.1", "port": 1 + i} for i in range(1, 4)],
        "users": [{"name": "app", "password": "app", "read_your_writes": "none"}],
        "pool": {"multiplex": multiplex},
        # RWPROXY_DISPATCH_STATS=off: without the per-statement statistics ([stats] enabled = false)
        "stats": {"enabled": os.environ.get("RWPROXY_DISPATCH_STATS", "on") != "off"},
    }
    config = build_config(data)
    servers = {"node1": ServerState("node1", "127.0.0.1", 2, role=PRIMARY, readable=True),
               "node2": ServerState("node2", "127.0.0.1", 3, role=REPLICA, readable=True),
               "node3": ServerState("node3", "127.0.0.1", 4, role=REPLICA, readable=True)}
    topo = Topology(servers, 1, time.time())
    worker = Worker(config, 0, None, topo, b"5.5.5-10.11.0-MariaDB", None)
    worker.loop = asyncio.get_event_loop()
    client = ClientConnection(worker, 1)
    client.transport = StubTransport()
    client.phase = 1
    client.caps = PROXY_CAPABILITIES
    client.start_session(config.users[0], "sbtest")
    response = _row_response()
    for name in servers:
        be = BackendConnection(config.backends[0].__class__(name=name, host="127.0.0.1", port=1), None, PROXY_CAPABILITIES)
        be.transport = StubTransport(lambda _data, be=be: be.data_received(response))
        be.client = client
        client.backends[name] = be
    if multiplex:
        _shared_lines(worker, client, servers, config, response)
    return worker, client


def _shared_lines(worker, client, servers, config, response) -> None:
    """One shared connection per server, under the key `client` shares with (sharing.share_key);
    each answers every command of a flush. Their flushes run when run_soon() is called (the
    micro's stand-in for the end of a loop iteration)."""
    for name in servers:
        key = share_key(client, name)
        line = SharedBackend(config.backends[0].__class__(name=name, host="127.0.0.1", port=1), key, PROXY_CAPABILITIES)
        line.transport = StubTransport(lambda data, line=line: line.data_received(response * data.count(b"\x03SELECT")
                                                                                  if data[4] == 3 else response))
        line.lines, line.ready, line.direct_ok = worker.shared, True, True
        worker.shared.lines[key] = [line]


_soon: list = []


def run_soon() -> None:
    while _soon:
        _soon.pop(0)()


def main(n: int = 100_000, only: str = "") -> None:
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    shared_module._call_soon = _soon.append
    worker, client = _session(False)
    sworker, sclient = _session(True)
    for w, c in ((worker, client), (sworker, sclient)):
        sql = b"SELECT c FROM sbtest1 WHERE id=?"  # a prepared point select, executed as sysbench does
        sid = c.stmts.add(Stmt(sql, w.classifier.classify(sql), frame(b"\x16" + sql, 0), 1))
        for i, name in enumerate(("node1", "node2", "node3")):
            c.stmts.bind(sid, name, 100 + i)  # backend ids differ from the client's, as they do for real
        head = b"\x17" + sid.to_bytes(4, "little") + b"\x00" + (1).to_bytes(4, "little") + b"\x00"
        c.data_received(frame(head + b"\x01" + b"\x03\x00" + (5044).to_bytes(4, "little"), 0))  # types, once
    cases = [("point select (replica)", frame(b"\x03SELECT c FROM sbtest1 WHERE id=5044", 0), "classify", False),
             ("UPDATE (primary)", frame(b"\x03UPDATE sbtest1 SET k=k+1 WHERE id=5044", 0), "classify", False),
             ("BEGIN (primary)", frame(b"\x03BEGIN", 0), "classify", False),
             ("prepared point select", frame(head + b"\x00" + (5044).to_bytes(4, "little"), 0), "look up", False),
             # the default configuration (multiplex = true): every point select on a shared connection
             ("shared point select", frame(b"\x03SELECT c FROM sbtest1 WHERE id=5044", 0), "classify", True)]
    for label, pkt, first, multiplexed in cases:
        if only and not label.startswith(only):
            continue
        w, c = (sworker, sclient) if multiplexed else (worker, client)
        for _ in range(1000):  # warm the digest cache (and, multiplexed, learn that the digest may share)
            c.data_received(pkt)
            run_soon()
        before = dict(w.router.balancer.routed)
        shared0 = w.shared.statements if multiplexed else 0
        t0 = time.perf_counter()
        if multiplexed:  # (two loops: the other cases' counts stay comparable with earlier runs)
            for _ in range(n):
                c.data_received(pkt)
                run_soon()
        else:
            for _ in range(n):
                c.data_received(pkt)
        dt = (time.perf_counter() - t0) / max(n, 1) * 1e6
        went = {k: v - before.get(k, 0) for k, v in w.router.balancer.routed.items() if v - before.get(k, 0)}
        if multiplexed and w.shared.statements - shared0 != n:
            raise SystemExit(f"{label}: {w.shared.statements - shared0} of {n} statements went on shared connections")
        if label.startswith("BEGIN"):
            c.data_received(frame(b"\x03COMMIT", 0))
        print(f"{label:24s} {dt:6.2f} µs per statement ({first} + route + relay + bookkeeping); sent to {went}")


if __name__ == "__main__":
    import sys

    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000, sys.argv[2] if len(sys.argv) > 2 else "")
