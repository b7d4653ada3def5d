"""The control plane: one per proxy, in the supervisor process.

It owns the monitor (the only writer of the topology), the operator's ways in (the control
socket behind `rwproxy status`/`switchover`/`reload`/`drain`, the admin SQL port, the metrics
and health endpoint), reloads, drains, and the workers' reports merged into one picture.
Topology snapshots leave through `publish`, which reaches every worker.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from proxy.cluster.progress import Progress
from proxy.cluster.topology import MASTER, PRIMARY
from proxy.config import diff
from proxy.config.load import ConfigError, load_config
from proxy.observe import merge, report, tables
from proxy.observe.events import EventLog
from proxy.runtime import rundir
from proxy.runtime.control import ControlServer
from proxy.runtime.workerctl import Workers

log = logging.getLogger("rwproxy.controlplane")
rlog = logging.getLogger("rwproxy.reload")
dlog = logging.getLogger("rwproxy.drain")


class CommandError(ValueError):
    """An operator command refused or failed: the message says why, for a person; `code` is the
    MySQL error the admin port answers with."""

    def __init__(self, message: str, code: int = 1105):
        super().__init__(message)
        self.code = code


class ControlPlane:
    def __init__(self, config, workers: int, publish):
        from proxy.cluster.failover import Failover

        self.config = config
        self.workers = workers
        self.started = time.time()
        # monitor -> failover (fencing, writes_held) -> publish to the workers
        self.failover = Failover(config, publish)
        self.monitor = self.failover.monitor
        # what each replica is known to hold, shared with the workers forked later (cluster/progress.py)
        self.progress = self.monitor.progress = Progress(b.name for b in config.backends)
        self.coord = None  # proxy.coord.Coordinator with [cluster] coordination = "etcd"
        self.kept = None  # without it: the decisions in the runtime directory (coord/local.py)
        if config.cluster.coordination == "etcd":
            from proxy.coord.coordinator import Coordinator

            self.coord = Coordinator(config, self.failover)
            self.coord.requests.handlers.update({
                "switchover": lambda a: self.failover.switchover(a["to"], a.get("timeout")),
                "enable-failover": lambda a: self._enable_failover(a),
                "rejoin": lambda a: self._rejoin(a),
                "server-state": lambda a: self._ok(self._set_server_state(a["server"], a["state"], a.get("lock", ""))),
            })
        self.control: ControlServer | None = None
        self.ask = Workers(rundir.path_for(config), workers)  # the workers' reports and orders
        self.events = EventLog(config.stats.events)  # the admin `events` table
        self.reloads = {"ok": 0, "failed": 0}
        self.config_version = 0  # reloads applied
        self.draining = False  # rwproxy drain / SIGTERM under way: not ready
        self.drain_grace_used = 0.0  # s the workers kept accepting after the drain began
        self.drained = threading.Event()  # set when a drain has been ordered (the supervisor waits on it)
        self._reload_lock = threading.Lock()
        self.admin = None  # proxy.admin.server.AdminServer when [[admin.users]] exist
        self.http = None  # proxy.observe.http.MetricsServer when [metrics] listen is set
        self.backups = None  # proxy.backup.daemon.BackupDaemon when [backup] schedules or archive_binlogs are set
        if config.admin.enabled:
            from proxy.admin.server import AdminServer, logging_quiet

            logging_quiet()
            self.admin = AdminServer(self, config)
        if config.metrics.listen:
            from proxy.observe.http import MetricsServer

            self.http = MetricsServer(self, config.metrics)

    def bind(self) -> None:
        """Before forking: the admin and metrics ports (an address in use is a start-up error)."""
        for what, srv, key in (("admin port", self.admin, "admin.listen"), ("metrics", self.http, "metrics.listen")):
            if srv is None:
                continue
            try:
                srv.bind()
            except OSError as e:
                raise OSError(f"cannot listen on {getattr(self.config, key.split('.')[0]).listen} for the {what}: "
                              f"{e.strerror or e}; stop what uses the port or change [{key.split('.')[0]}] listen") from None

    def listening_fds(self) -> list[int]:
        """Sockets the workers must close after fork."""
        return [srv.sock.fileno() for srv in (self.admin, self.http) if srv is not None and srv.sock is not None]

    def start(self) -> None:
        """Call after forking the workers: the control plane's threads live in the supervisor only."""
        self.events.attach()
        if self.coord is not None:
            self.coord.start()
        else:
            from proxy.coord.local import LocalDecisions

            self.kept = LocalDecisions(rundir.path_for(self.config), self.failover, self.config)
            self.kept.restore()
            self.kept.start()
        self.failover.start()
        path = rundir.control_socket(self.config)
        handlers = {
            "hello": lambda _req: {"ok": True, **self.identity()},
            "status": self.status,
            "switchover": lambda req: self.switchover(req["to"], req.get("timeout")),
            "enable-failover": lambda req: self._leader_runs("enable-failover", {}, self._enable_failover),
            "rejoin": lambda req: self._leader_runs("rejoin", {"server": req["server"]}, self._rejoin),
            "tables": lambda req: {"ok": True, "tables": self.tables(req.get("names") or tables.NAMES)},
            "reload": lambda req: self.reload("rwproxy reload"),
            "drain": lambda req: self.drain("rwproxy drain"),
            "server-state": lambda req: self._ok(self.set_server_state(req["server"], req["state"], req.get("lock", ""))),
            "kill": lambda req: self._ok(self.kill_session(int(req["id"]), bool(req.get("query_only")))),
            "reset-stats": lambda req: self._ok(self.reset_stats()),
        }
        try:
            self.control = ControlServer(path, handlers)
        except OSError as e:
            log.warning("control socket %s unavailable (%s); `rwproxy status` will not work", path, e)
        for srv in (self.admin, self.http):
            if srv is not None:
                srv.start()
        if self.admin is not None:
            log.info("admin port on %s (%d user(s))", self.config.admin.listen, len(self.config.admin.users))
        if self.http is not None:
            log.info("metrics and health checks on http://%s/metrics, /health/live, /health/ready",
                     self.config.metrics.listen)
        self._start_backups()

    def _start_backups(self) -> None:
        """At start, and after a reload that touched [backup], the backends or the monitor login:
        the schedules and the archiver run on the config that runs (a reload used to report
        backup keys as changed while the daemon went on with the old ones)."""
        b = self.config.backup
        if not (b.enabled and (b.archive_binlogs or b.schedule_full or b.schedule_incremental
                               or b.schedule_test_restore)):
            if self.backups is not None:
                self.backups.join(10)
                self.backups = None
                log.warning("backups: no schedule and no archiving in the config any more; stopped")
            return
        from proxy.backup.context import BackupContext
        from proxy.backup.daemon import BackupDaemon

        try:
            ctx = BackupContext(self.config)
        except Exception as e:  # noqa: BLE001 - the proxy serves on; the operator gets the one line
            log.error("backups not %s: %s", "started" if self.backups is None else "reconfigured", e)
            return
        if self.backups is not None:
            self.backups.reconfigure(ctx.config, ctx.repo, ctx.keys, ctx.spool())
            return
        self.backups = BackupDaemon(ctx.config, ctx.repo, ctx.keys, ctx.spool(),
                                    log_step=logging.getLogger("rwproxy.backup").info,
                                    may_run=lambda: self.coord is None or self.coord.leading())
        self.backups.run()

    @staticmethod
    def _ok(message: str) -> dict:
        return {"ok": True, "message": message}

    def identity(self) -> dict:
        """Which instance this is (the CLI checks it reached the one its --config names)."""
        return {"pid": os.getpid(), "config": os.path.realpath(self.config.source), "listen": self.config.proxy.listen}

    def _leader_runs(self, op: str, args: dict, here, timeout: float = 30.0) -> dict:
        """Run an operator command here, or, when another instance leads the cluster, there."""
        if self.coord is None or self.coord.leading():
            return here(args)
        return self.coord.requests.forward(op, args, timeout)

    def switchover(self, target: str, timeout: float | None = None) -> dict:
        limit = self.config.failover.switchover_timeout if timeout is None else timeout
        return self._leader_runs("switchover", {"to": target, "timeout": timeout},
                                 lambda a: self.failover.switchover(a["to"], a.get("timeout")), limit + 15.0)

    def _enable_failover(self, _req) -> dict:
        """After a failed failover stopped it; never against the config file, which a restart or a
        reload would quietly bring back."""
        if not self.config.failover.auto_failover:
            return {"ok": False, "message": "auto_failover = false in the config: set it to true there and "
                                            "reload (ENABLE FAILOVER re-enables what a failed failover stopped)"}
        was, why, _ = self.failover.state.auto()
        self.failover.enable_auto_failover()
        return {"ok": True, "message": "automatic failover was already enabled" if was else
                f"automatic failover enabled (it was disabled: {why})"}

    def _rejoin(self, req) -> dict:
        name = self._server_name(req["server"])  # (CommandError naming the servers, not a KeyError)
        self.failover.rejoin(name)
        return {"ok": True, "message": f"{name}: fencing/rejoin will be retried"}

    def stop(self) -> None:
        if self.backups is not None:
            self.backups.join(10)
        for srv in (self.admin, self.http):
            if srv is not None:
                srv.stop()
        if self.control is not None:
            self.control.close()
        if self.coord is not None:
            self.coord.stop()  # the lease revoked: another instance leads at once
        self.failover.stop()
        if self.kept is not None:
            self.kept.stop()
        self.ask.close()
        self.events.detach()

    # ---- readiness --------------------------------------------------------------------------
    def ready(self) -> tuple[bool, str]:
        """/health/ready: serving, not draining, and a writable primary known (or read-only mode
        allowed by [metrics] ready_without_primary)."""
        if self.draining:
            return False, "draining"
        topo = self.monitor.topology
        p = topo.primary
        if p is not None and p.is_writer:  # (a read-only one still serves reads; its writes get 1290)
            return True, (f"primary {p.name}" + (" (read-only: writes get its 1290)" if p.read_only else "")
                          + ("; writes held (failover or switchover)" if topo.writes_held else ""))
        if self.config.metrics.ready_without_primary and topo.readers:
            return True, "no primary; read-only (ready_without_primary)"
        return False, "no primary known"

    # ---- reload ------------------------------------------------------------------------------
    def reload(self, how: str) -> dict:
        """Re-read the config file; apply what changed, or change nothing if anything is wrong."""
        with self._reload_lock:
            try:
                new = load_config(self.config.source)
                self._check_reload(new)
            except ConfigError as e:
                self.reloads["failed"] += 1
                for line in e.errors:
                    rlog.error("reload (%s) refused, nothing changed: %s", how, line)
                return {"ok": False, "message": "reload refused, nothing changed:\n" + "\n".join(e.errors),
                        "errors": e.errors}
            old = self.config
            changed = diff.changes(old, new)
            later = [k for k in changed if diff.restart_only(k)]
            if self.admin is None and new.admin.enabled:
                later.append("admin.users")  # no admin port was opened at start: it opens at the next
            if not changed:
                rlog.info("reload (%s): nothing changed", how)
                return {"ok": True, "message": "nothing changed", "changed": [], "restart_required": []}
            run = diff.effective(old, new)
            t0 = time.monotonic()
            said = self.failover.reconfigure(run)
            self.progress.add(b.name for b in run.backends)
            self.config = run
            self.config_version += 1
            self.events.resize(run.stats.events)
            if self.admin is not None:
                self.admin.reconfigure(run)
            if self.http is not None:
                self.http.reconfigure(run.metrics)
            if any(k.startswith(("backup.", "backends", "monitor.")) for k in changed):
                self._start_backups()
            replies = self.ask.ask_all({"cmd": "reload", "config": run, "version": self.config_version}, timeout=10.0)
            applied = sum(1 for r in replies if r and r.get("ok"))
            ms = (time.monotonic() - t0) * 1000
            self.reloads["ok"] += 1
            rlog.warning("config reloaded (%s) in %.0f ms: %d key(s) changed%s%s; %d of %d worker(s) applied it%s",
                         how, ms, len(changed), (": " + ", ".join(said)) if said else "",
                         "" if not later else f"; need a restart (still running the old value): {', '.join(later)}",
                         applied, self.workers, "" if applied == self.workers else " (the others get it when they restart)")
            return {"ok": True, "message": f"reloaded: {len(changed)} key(s) changed" +
                    (f"; restart needed for {', '.join(later)}" if later else ""), "changed": changed,
                    "restart_required": later, "servers": said, "workers_applied": applied, "apply_ms": round(ms, 1),
                    "summary": diff.summary(old, new)}

    def _check_reload(self, new) -> None:
        """Changes a running proxy refuses (ConfigError: nothing changes)."""
        now = {b.name: b for b in new.backends}
        was = {b.name: b for b in self.config.backends}
        writers = [s.name for s in self.monitor.topology.servers.values() if s.role in (PRIMARY, MASTER) and s.is_writer]
        gone = [w for w in writers if w not in now]
        if gone:
            raise ConfigError([f"{new.source}: backends: {', '.join(gone)} is the primary and cannot be removed by a "
                               "reload; switch over to another server first"])
        moved = [w for w in writers if w in was and diff.readdressed(was[w], now[w])]
        if moved:  # its open transactions would end as if it had failed
            raise ConfigError([f"{new.source}: backends: {', '.join(moved)} is the primary and cannot be given "
                               "another address by a reload; switch over to another server first"])

    # ---- operator commands ---------------------------------------------------------------------
    def admin_command(self, cmd) -> tuple[list[str], list[tuple]]:
        """An admin-port command (admin/commands.py): (column names, rows) for a person to read;
        CommandError when refused."""
        if cmd.verb == "switchover":
            r = self.switchover(self._server_name(cmd.target))
            if not r.get("ok"):
                raise CommandError(r.get("message") or "switchover failed")
            return (["result", "new_primary", "old_primary", "write_pause_ms", "message"],
                    [("ok", r.get("new"), r.get("old"), r.get("write_pause_ms"), r.get("message"))])
        if cmd.verb in ("enable-failover", "rejoin"):
            args = {"server": self._server_name(cmd.target)} if cmd.verb == "rejoin" else {}
            r = self._leader_runs(cmd.verb, args, self._enable_failover if cmd.verb == "enable-failover" else self._rejoin)
            if not r.get("ok"):
                raise CommandError(r.get("message") or f"{cmd.verb} failed")
            return ["result", "message"], [("ok", r.get("message"))]
        if cmd.verb == "server-state":
            return ["result", "message"], [("ok", self.set_server_state(cmd.target, cmd.state))]
        if cmd.verb == "reload":
            r = self.reload("RELOAD CONFIG")
            if not r["ok"]:
                raise CommandError(r["message"])
            rows = [("ok", r["message"])] + [("changed", k) for k in r.get("changed", [])] + \
                   [("restart required", k) for k in r.get("restart_required", [])]
            return ["result", "message"], rows
        if cmd.verb == "kill":
            return ["result", "message"], [("ok", self.kill_session(cmd.session, cmd.query_only))]
        if cmd.verb == "reset-stats":
            return ["result", "message"], [("ok", self.reset_stats())]
        raise CommandError(f"unknown command {cmd.verb}")

    def _server_name(self, name: str) -> str:
        servers = self.monitor.topology.servers
        if name in servers:
            return name
        for s in servers.values():
            if s.address == name:
                return s.name
        raise CommandError(f"unknown server {name!r}; the servers are: {', '.join(servers)}")

    def set_server_state(self, name: str, state: str, lock: str = "") -> str:
        """Here, or on the leader when another instance leads (which then publishes it to all).
        lock: a backup's OFFLINE, held while its process holds that lock on the server."""
        if self.coord is None or self.coord.leading():
            return self._set_server_state(name, state, lock)
        self._server_name(name)
        r = self.coord.requests.forward("server-state", {"server": name, "state": state, "lock": lock}, 30.0)
        if not r.get("ok"):
            raise CommandError(r.get("message") or "the leader refused")
        return r.get("message", "") + f" (on every instance; set by the leader {r.get('ran_on')})"

    def _set_server_state(self, name: str, state: str, lock: str = "") -> str:
        name = self._server_name(name)
        self.failover.state.paused_by_backup(name, lock if state.lower() == "offline" else "")
        state = state.lower()
        s = self.monitor.topology.servers[name]
        if state in ("offline", "maintenance") and s.is_writer:
            raise CommandError(f"{name} is the {s.role}: it cannot be taken out while it takes the writes; "
                               f"SWITCHOVER TO another server first")
        kept = (self.failover.status().get("kept_out") or {}).get(name)
        if state == "online" and kept:
            raise CommandError(f"{name} is kept out by failover ({kept}); resolve that, then REJOIN SERVER '{name}'")
        self.monitor.set_admin_state(name, "" if state == "online" else state)
        if self.coord is not None:
            self.coord.poke()  # the leader publishes it: every instance applies it
        logging.getLogger("rwproxy.admin").warning("server %s set %s by an operator", name, state.upper())
        return {"offline": f"{name} is OFFLINE: no new statements go there; running ones and read-only transactions "
                           "finish",
                "maintenance": f"{name} is in MAINTENANCE: out of every pool, its connections closed",
                "online": f"{name} is ONLINE: it serves again once its checks are good"}[state]

    def kill_session(self, session_id: int, query_only: bool = False) -> str:
        from proxy.runtime.worker import Worker

        owner = Worker.worker_of(session_id)
        r = self.ask.ask_one(owner, {"cmd": "kill-session", "id": session_id, "query_only": query_only}) \
            if owner is not None and owner < self.workers else None
        if not r or not r.get("found"):
            raise CommandError(f"Unknown session id: {session_id} (see the sessions table)", 1094)
        return f"session {session_id}: " + ("its statement was killed" if query_only else "closed")

    def reset_stats(self) -> str:
        replies = self.ask.ask_all({"cmd": "reset-stats"})
        logging.getLogger("rwproxy.admin").info("statistics reset (digests, rule hits)")
        return f"digests and rule hits cleared in {sum(1 for r in replies if r)} worker(s)"

    # ---- drain ---------------------------------------------------------------------------------
    def drain(self, how: str) -> dict:
        """Not ready at once; the workers keep accepting while a load balancer notices (only when
        something polls /health/ready), then stop; sessions end between transactions; the proxy
        exits when they are gone or at shutdown_timeout."""
        if self.draining:
            return {"ok": True, "message": "already draining"}
        self.draining = True
        grace = self.drain_grace_used = self.config.proxy.drain_grace if self.http is not None else 0.0
        timeout = max(self.config.proxy.shutdown_timeout, grace)
        dlog.warning("draining (%s): not ready; accepting for %.1f s more, then sessions end after their "
                     "transactions (at most %g s)", how, grace, timeout)
        msg = {"cmd": "drain", "grace": grace, "timeout": timeout}
        replies = self.ask.ask_all(msg)
        # A worker still starting (its control socket not up yet) is asked again, or it would
        # serve on and the proxy never exit. Bounded: a dead one is the watchdog's business.
        until = time.monotonic() + 10.0
        while None in replies and time.monotonic() < until:
            time.sleep(0.1)
            replies = [r if r is not None else self.ask.ask_one(i, msg, timeout=2.0) for i, r in enumerate(replies)]
        self.drained.set()
        n = sum(r.get("sessions", 0) for r in replies if r)
        return {"ok": True, "message": f"draining {n} session(s); rwproxy exits when they are done "
                                       f"(at most {timeout:g} s)"}

    def reports(self, kinds) -> dict:
        """What the workers report, merged: kind -> merged value (asked once per kind)."""
        out = {}
        for kind in kinds:
            replies = self.ask.ask_all({"cmd": kind}, timeout=5.0)
            if kind == report.SUMMARY:
                out[kind] = merge.summaries(replies)
            elif kind == report.DIGESTS:
                out[kind] = merge.digests(replies)
            elif kind == report.POOLS:
                out[kind] = merge.pools(replies)
            else:
                out[kind] = [row for r in replies if r for row in r]
        return out

    def tables(self, names) -> dict[str, list[dict]]:
        """Rows of the named operator tables (observe/tables.py), asking the workers only for what
        those tables need."""
        names = [n for n in names if n in tables.COLUMNS]
        got = self.reports({k for n in names for k in tables.NEEDS.get(n, ())})
        summary = got.get(report.SUMMARY, {})
        cfg = self.config
        build = {
            "servers": lambda: tables.servers(self, summary),
            "digests": lambda: got[report.DIGESTS],
            "pools": lambda: got[report.POOLS],
            "sessions": lambda: sorted(got[report.SESSIONS], key=lambda r: r["id"]),
            "rules": lambda: tables.rules(cfg, summary),
            "users": lambda: tables.users(cfg),
            "config": lambda: tables.config_rows(cfg),
            "events": lambda: tables.events(self.events),
            "status": lambda: tables.status_rows(self, summary),
            "instances": lambda: tables.instances(self),
        }
        out = {}
        for n in names:
            rows = build[n]()
            if n == "digests":
                rows = [dict(r, first_seen=tables.iso(r["first_seen"]), last_seen=tables.iso(r["last_seen"])) for r in rows]
            out[n] = rows
        return out

    def server_admin_states(self) -> dict[str, str]:
        """Servers an operator set OFFLINE or MAINTENANCE -> that state."""
        return self.monitor.admin_states()

    def status(self, _req=None) -> dict:
        topo = self.monitor.topology  # what the routers act on
        fresh = self.monitor.current_states()  # positions and lag as of the latest checks
        fo = self.failover.status()  # writes_held lives here, not in the monitor's snapshot
        summary = self.reports([report.SUMMARY])[report.SUMMARY]
        admin = self.server_admin_states()
        servers = []
        for name, s in topo.servers.items():
            now = fresh.get(name, s)
            servers.append({
                "name": name, "address": s.address, "role": s.role, "state": s.state, "readable": s.readable,
                "read_only": s.read_only, "admin_state": admin.get(name, ""), "weight": s.weight,
                "lag_ms": now.lag_ms, "gtid": now.gtid_current_pos, "io_running": s.io_running,
                "sql_running": s.sql_running, "source": s.source, "last_error": s.last_error,
                "connections": summary["open"].get(name, 0), "shared_connections": summary["shared_open"].get(name, 0),
                "routed": summary["routed"].get(name, 0), "refused": summary["refused"].get(name, 0),
            })
        ready, why = self.ready()
        return {
            "ok": True, "pid": os.getpid(), "listen": self.config.proxy.listen, "socket": self.config.proxy.socket,
            "workers": self.workers,
            "workers_answering": summary["workers_answering"],
            "uptime_s": round(time.time() - self.started, 1), "clients": summary["clients"],
            "statements": summary["statements"], "shared_statements": summary["shared_statements"],
            **{k: summary.get(k, 0) for k in merge.COUNTERS},
            "pinned": summary["pinned"], "topology_version": topo.version, "ready": ready, "ready_reason": why,
            "draining": self.draining, "config_version": self.config_version, "reloads": dict(self.reloads),
            "writes_held": fo["writes_held"], "servers": servers, "failover": fo,
            "coordination": self.coord.status() if self.coord is not None else None,
        }

