"""The control plane: one per proxy, in the supervisor process.

It owns the monitor (the only writer of the topology), the shared counters the
workers fill, and the control socket operators talk to (`rwproxy status`).
Topology snapshots leave through `publish`, which reaches every worker.
"""

from __future__ import annotations

import logging
import os
import time

from proxy.cluster.topology import PRIMARY, REPLICA, UP
from proxy.runtime import rundir
from proxy.runtime.control import ControlServer
from proxy.runtime.stats import SharedStats

log = logging.getLogger("rwproxy.controlplane")


class ControlPlane:
    def __init__(self, config, workers: int, publish):
        from proxy.cluster.failover import Failover

        self.config = config
        self.workers = workers
        self.started = time.time()
        self.stats = SharedStats(workers, [b.name for b in config.backends])
        # monitor -> failover (fencing, writes_held) -> publish to the workers
        self.failover = Failover(config, publish)
        self.monitor = self.failover.monitor
        self.control: ControlServer | None = None

    def start(self) -> None:
        """Call after forking the workers: the control plane's threads live in the supervisor only."""
        self.failover.start()
        path = rundir.control_socket(self.config)
        handlers = {
            "hello": lambda _req: {"ok": True, **self.identity()},
            "status": self.status,
            "switchover": lambda req: self.failover.switchover(req["to"], req.get("timeout")),
            "enable-failover": self._enable_failover,
            "rejoin": self._rejoin,
        }
        try:
            self.control = ControlServer(path, handlers)
        except OSError as e:
            log.warning("control socket %s unavailable (%s); `rwproxy status` will not work", path, e)

    def identity(self) -> dict:
        """Which instance this is (the CLI checks it reached the one its --config names)."""
        return {"pid": os.getpid(), "config": os.path.realpath(self.config.source), "listen": self.config.proxy.listen}

    def _enable_failover(self, _req) -> dict:
        self.failover.enable_auto_failover()
        return {"ok": True, "message": "automatic failover enabled"}

    def _rejoin(self, req) -> dict:
        self.failover.rejoin(req["server"])
        return {"ok": True, "message": f"{req['server']}: fencing/rejoin will be retried"}

    def stop(self) -> None:
        if self.control is not None:
            self.control.close()
        self.failover.stop()

    def status(self, _req=None) -> dict:
        topo = self.monitor.topology  # what the routers act on
        fresh = self.monitor.current_states()  # positions and lag as of the latest checks
        fo = self.failover.status()  # writes_held lives here, not in the monitor's snapshot
        counters = self.stats.read()
        servers = []
        for name, s in topo.servers.items():
            c = counters["servers"].get(name, {})
            now = fresh.get(name, s)
            servers.append({
                "name": name, "address": s.address, "role": s.role, "state": s.state, "readable": s.readable,
                "read_only": s.read_only,
                "lag_ms": now.lag_ms, "gtid": now.gtid_current_pos, "io_running": s.io_running,
                "sql_running": s.sql_running, "source": s.source, "last_error": s.last_error,
                "connections": c.get("connections", 0), "shared_connections": c.get("shared_connections", 0),
                "routed": c.get("routed", 0), "refused": c.get("refused", 0),
            })
        return {
            "ok": True, "pid": os.getpid(), "listen": self.config.proxy.listen, "workers": self.workers,
            "uptime_s": round(time.time() - self.started, 1), "clients": counters["clients"],
            "statements": counters["statements"], "shared_statements": counters["shared_statements"],
            "topology_version": topo.version,
            "writes_held": fo["writes_held"], "servers": servers, "failover": fo,
        }


def format_status(st: dict) -> str:
    """The operator's table for `rwproxy status`."""
    head = ("SERVER", "ADDRESS", "ROLE", "STATE", "READS", "LAG_MS", "GTID", "CONNS", "SHARED", "ROUTED")
    rows = [head]
    for s in st["servers"]:
        lag = "-" if s["lag_ms"] is None else f"{s['lag_ms']:.0f}"
        role = s["role"] + (" (read-only)" if s["role"] == PRIMARY and s.get("read_only") else "")
        rows.append((s["name"], s["address"], role, s["state"], "yes" if s["readable"] and s["role"] == REPLICA else "-",
                     lag, s["gtid"] or "-", str(s["connections"]), str(s.get("shared_connections", 0)), str(s["routed"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(v.ljust(widths[i]) for i, v in enumerate(r)).rstrip() for r in rows]
    lines.append("")
    lines.append(f"rwproxy pid {st['pid']} on {st['listen']}, {st['workers']} worker(s), up {st['uptime_s']:.0f} s; "
                 f"{st['clients']} client(s), {st['statements']} statement(s) routed"
                 f" ({st.get('shared_statements', 0)} over shared connections)"
                 + ("; WRITES HELD" if st.get("writes_held") else ""))
    for s in st["servers"]:
        if s["last_error"] and s["state"] != UP:
            lines.append(f"{s['name']}: {s['last_error']}")
    fo = st.get("failover") or {}
    if fo:
        lines.append("failover: " + ", ".join(f"{k}={v}" for k, v in fo.items() if v not in (None, "", {}, [])))
    return "\n".join(lines)
