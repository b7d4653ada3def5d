"""Prometheus metrics: one custom collector that builds every family at scrape time from the
control plane's view and the workers' reports (summed across worker processes).

Names follow Prometheus conventions: `rwproxy_` prefix, base units (seconds, bytes), `_total`
for counters. Counters come from the workers' own counts, so they restart from zero when a
worker restarts (Prometheus' rate() treats that as a counter reset) and RESET STATS never
touches them. Per-digest figures are not exported (unbounded label sets are what makes
ProxySQL's exporter heavy); they live in the admin port's `digests` table.
"""

from __future__ import annotations

import math
import os

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import CollectorRegistry

from proxy import __version__
from proxy.observe import report
from proxy.observe.recorder import BOUNDS
from proxy.routing.state import TIE_REASONS
from proxy.runtime.launcher import process_cpu_seconds

ROUTES = ("read", "write", "session")
STATES = ("up", "lagging", "down", "maintenance")
ROLES = ("primary", "replica", "master", "unknown")


class Collector:
    def __init__(self, plane):
        self.plane = plane

    def describe(self):
        return []  # (collected at scrape time only)

    def collect(self):
        plane = self.plane
        got = plane.reports([report.SUMMARY, report.POOLS])
        s, pools = got[report.SUMMARY], got[report.POOLS]
        yield from self._proxy(plane, s)
        yield from self._statements(s)
        yield from self._connections(s, pools)
        yield from self._servers(plane, s)
        yield from self._failover(plane)
        yield from self._backups(plane)
        yield from self._coordination(plane)

    @staticmethod
    def _coordination(plane):
        """[cluster] coordination = "etcd": alert when etcd is unreachable or no instance leads."""
        if plane.coord is None:
            return
        c = plane.coord.status(with_instances=False)
        yield GaugeMetricFamily("rwproxy_coordination_etcd_up", "1 if etcd answered this instance's last request",
                                value=int(c["etcd_ok"]))
        yield GaugeMetricFamily("rwproxy_coordination_leader", "1 if this instance leads the cluster (and may act)",
                                value=int(c["may_act"]))
        yield GaugeMetricFamily("rwproxy_coordination_leader_known", "1 if some instance is known to lead",
                                value=int(bool(c["leader"])))
        yield GaugeMetricFamily("rwproxy_coordination_epoch", "the current leader's epoch (its key's revision)",
                                value=float(c["epoch"] or 0))
        yield CounterMetricFamily("rwproxy_coordination_leadership_changes",
                                  "times this instance became the leader", value=c["leadership_changes"])

    @staticmethod
    def _backups(plane):
        """[backup] in serve: what a backup alert rule needs (pgBackRest users scrape the same four)."""
        if plane.backups is None:
            return
        b = plane.backups.status()
        for name, key, doc in (
                ("rwproxy_backup_last_success_timestamp_seconds", "last_backup", "end of the newest backup"),
                ("rwproxy_backup_last_test_restore_timestamp_seconds", "last_test_restore",
                 "time of the newest successful test restore"),
                ("rwproxy_backup_archive_lag_seconds", "archive_lag_s",
                 "seconds the binlog archive is behind the primary's binlog"),
                ("rwproxy_backup_repository_bytes", "repository_bytes", "bytes stored in the backup repository")):
            if b.get(key) is not None:
                yield GaugeMetricFamily(name, doc, value=float(b[key]))
        if b.get("last_backup_ok") is not None:
            yield GaugeMetricFamily("rwproxy_backup_last_ok", "1 if the last scheduled backup succeeded",
                                    value=int(bool(b["last_backup_ok"])))
        yield CounterMetricFamily("rwproxy_backup_jobs_failed", "scheduled backups and test restores that failed",
                                  value=b["jobs_failed"])

    @staticmethod
    def _proxy(plane, s):
        g = GaugeMetricFamily("rwproxy_info", "rwproxy version", labels=["version"])
        g.add_metric([__version__], 1)
        yield g
        ready, _ = plane.ready()
        yield GaugeMetricFamily("rwproxy_ready", "1 when /health/ready answers 200", value=int(ready))
        yield GaugeMetricFamily("rwproxy_draining", "1 while draining (rwproxy drain, SIGTERM)", value=int(plane.draining))
        yield GaugeMetricFamily("rwproxy_workers", "worker processes configured", value=plane.workers)
        yield GaugeMetricFamily("rwproxy_workers_answering", "worker processes that answered this scrape",
                                value=s["workers_answering"])
        c = CounterMetricFamily("rwproxy_config_reloads", "configuration reloads", labels=["outcome"])
        c.add_metric(["ok"], plane.reloads["ok"])
        c.add_metric(["failed"], plane.reloads["failed"])
        yield c
        yield GaugeMetricFamily("rwproxy_config_version", "reloads applied since start", value=plane.config_version)
        cpu = CounterMetricFamily("rwproxy_cpu_seconds", "CPU time of rwproxy's processes (user + system)",
                                  labels=["process"])
        cpu.add_metric(["supervisor"], process_cpu_seconds(os.getpid()))
        for index, pid in s["pids"]:
            cpu.add_metric([f"worker{index}"], process_cpu_seconds(pid))
        yield cpu

    @staticmethod
    def _statements(s):
        st = CounterMetricFamily("rwproxy_statements", "statements answered, by route, server and outcome",
                                 labels=["route", "server", "outcome"])
        recv = CounterMetricFamily("rwproxy_backend_received_bytes", "bytes relayed from each server to clients",
                                   labels=["server"])
        sent = CounterMetricFamily("rwproxy_backend_sent_bytes", "statement bytes sent to each server", labels=["server"])
        for name, row in sorted(s["servers"].items()):
            for i, route in enumerate(ROUTES, start=1):
                st.add_metric([route, name, "ok"], row["ok"][i])
                st.add_metric([route, name, "error"], row["err"][i])
                st.add_metric([route, name, "lost"], row["lost"][i])
            recv.add_metric([name], row["bytes_in"])
            sent.add_metric([name], row["bytes_out"])
        yield st
        yield recv
        yield sent
        h = HistogramMetricFamily("rwproxy_statement_duration_seconds",
                                  "time from sending a statement to a server to the end of its answer, by route",
                                  labels=["route"])
        for route in ROUTES:
            buckets, total = s["hist"].get(route, ([0] * (len(BOUNDS) + 1), 0.0))
            cum, acc = [], 0
            for bound, n in zip([*map(_le, BOUNDS), "+Inf"], buckets):
                acc += n
                cum.append((bound, acc))
            h.add_metric([route], cum, total)
        yield h
        yield CounterMetricFamily("rwproxy_shared_statements", "statements answered over shared (multiplexed) "
                                  "connections", value=s["shared_statements"])
        yield CounterMetricFamily("rwproxy_idle_releases", "backend connections idle sessions gave back to the pool "
                                  "([pool] idle_release, or at once while others waited)", value=s.get("idle_released", 0))
        yield CounterMetricFamily("rwproxy_backend_queue_waits", "checkouts that waited in line at "
                                  "[pool] max_server_connections", value=s.get("queue_waits", 0))
        yield CounterMetricFamily("rwproxy_backend_queue_timeouts", "checkouts that got no connection within "
                                  "[pool] queue_timeout (the client got ERROR 1040)", value=s.get("queue_timeouts", 0))
        gtid = CounterMetricFamily("rwproxy_write_gtids", "GTIDs of writes learned for read-your-writes (gtid mode), "
                                   "by how", labels=["source"])
        gtid.add_metric(["ok_packet"], s.get("gtid_from_ok", 0))
        gtid.add_metric(["query"], s.get("gtid_fetched", 0))
        yield gtid
        yield CounterMetricFamily("rwproxy_digest_cache_hits", "statement classifications served from the digest cache",
                                  value=s["cache"].get("hits", 0))
        yield CounterMetricFamily("rwproxy_digest_cache_misses", "statement classifications that had to be computed",
                                  value=s["cache"].get("misses", 0))
        yield GaugeMetricFamily("rwproxy_digests", "distinct (digest, user, database) entries kept", value=s["digests"])
        yield CounterMetricFamily("rwproxy_digests_evicted", "digest entries evicted ([stats] max_digests)",
                                  value=s["evicted"])
        r = CounterMetricFamily("rwproxy_rule_hits", "statements each [[routing.rules]] entry decided", labels=["rule"])
        for i, n in enumerate(s["rule_hits"], start=1):
            r.add_metric([str(i)], n)
        yield r

    @staticmethod
    def _connections(s, pools):
        yield GaugeMetricFamily("rwproxy_client_connections", "client connections open", value=s["clients"])
        yield GaugeMetricFamily("rwproxy_client_sessions", "logged-in client sessions", value=s["sessions"])
        p = GaugeMetricFamily("rwproxy_pinned_sessions", "sessions tied to their connections, by reason",
                              labels=["reason"])
        for reason in sorted({*TIE_REASONS, *s["pinned"]}):
            p.add_metric([reason], s["pinned"].get(reason, 0))
        yield p
        b = GaugeMetricFamily("rwproxy_backend_connections", "connections to each server (sessions' own, pooled "
                              "and shared)", labels=["server"])
        for name, n in sorted(s["open"].items()):
            b.add_metric([name], n)
        yield b
        pg = GaugeMetricFamily("rwproxy_pool_connections", "connections per server and user, by state",
                               labels=["server", "user", "state"])
        cn = CounterMetricFamily("rwproxy_backend_connects", "connection attempts per server and user",
                                 labels=["server", "user", "outcome"])
        for row in pools:
            for state in ("in_use", "idle", "shared"):
                pg.add_metric([row["server"], row["user"], state], row[state])
            cn.add_metric([row["server"], row["user"], "ok"], row["connects_ok"])
            cn.add_metric([row["server"], row["user"], "failed"], row["connects_failed"])
        yield pg
        yield cn

    @staticmethod
    def _servers(plane, s):
        topo = plane.monitor.topology
        fresh = plane.monitor.current_states()
        up = GaugeMetricFamily("rwproxy_server_up", "1 unless the monitor judges the server down", labels=["server"])
        state = GaugeMetricFamily("rwproxy_server_state", "the server's state (1 for the current one)",
                                  labels=["server", "state"])
        role = GaugeMetricFamily("rwproxy_server_role", "the server's role (1 for the current one)",
                                 labels=["server", "role"])
        pool = GaugeMetricFamily("rwproxy_server_in_read_pool", "1 while the server takes reads", labels=["server"])
        lag = GaugeMetricFamily("rwproxy_replica_lag_seconds", "replication lag measured by heartbeat",
                                labels=["server"])
        weight = GaugeMetricFamily("rwproxy_server_weight", "configured read weight", labels=["server"])
        admin = GaugeMetricFamily("rwproxy_server_offline", "1 while an operator keeps the server OFFLINE or in "
                                  "MAINTENANCE", labels=["server"])
        states = plane.server_admin_states()
        for name, sv in topo.servers.items():
            now = fresh.get(name, sv)
            up.add_metric([name], int(sv.state != "down"))
            for x in STATES:
                state.add_metric([name, x], int(sv.state == x))
            for x in ROLES:
                role.add_metric([name, x], int(sv.role == x))
            pool.add_metric([name], int(bool(sv.readable and sv.role == "replica")))
            if now.lag_ms is not None and math.isfinite(now.lag_ms):
                lag.add_metric([name], now.lag_ms / 1000.0)
            weight.add_metric([name], sv.weight)
            admin.add_metric([name], int(bool(states.get(name))))
        yield from (up, state, role, pool, lag, weight, admin)

    @staticmethod
    def _failover(plane):
        fo = plane.failover.status()
        counts = fo.get("counts") or {}
        for kind in ("failover", "switchover"):
            c = CounterMetricFamily(f"rwproxy_{kind}s", f"{kind}s run, by outcome", labels=["outcome"])
            c.add_metric(["ok"], counts.get(f"{kind} ok", 0))
            c.add_metric(["failed"], counts.get(f"{kind} failed", 0))
            yield c
            last = fo.get(f"last_{kind}") or {}
            if last.get("duration_ms") is not None:
                yield GaugeMetricFamily(f"rwproxy_last_{kind}_duration_seconds", f"how long the last {kind} took",
                                        value=last["duration_ms"] / 1000.0)
                yield GaugeMetricFamily(f"rwproxy_last_{kind}_timestamp_seconds", f"when the last {kind} started",
                                        value=last.get("time") or 0)
        yield GaugeMetricFamily("rwproxy_writes_held", "1 while failover or switchover holds writes",
                                value=int(bool(fo.get("writes_held"))))
        yield GaugeMetricFamily("rwproxy_auto_failover_enabled", "1 while automatic failover is on",
                                value=int(bool(fo.get("auto_failover"))))


def registry_for(plane) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector(plane))
    return reg


def _le(bound: float) -> str:
    return repr(float(bound))
