"""The operator's tables: one list of rows per name, served by the admin port (as SQL tables) and
by `rwproxy status --json` (as JSON), built from the control plane's view and the workers'
reports when asked. Columns are fixed here, so a table has the same shape when it is empty."""

from __future__ import annotations

import dataclasses
import time

from proxy.config.schema import is_native_hash, secret_keys, spec_fields

INT, REAL, TEXT = "INTEGER", "REAL", "TEXT"

COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "servers": (("name", TEXT), ("address", TEXT), ("role", TEXT), ("state", TEXT), ("admin_state", TEXT),
                ("in_read_pool", INT), ("weight", INT), ("lag_ms", REAL), ("gtid", TEXT), ("read_only", INT),
                ("connections", INT), ("shared_connections", INT), ("statements", INT), ("errors", INT),
                ("lost", INT), ("refused", INT), ("last_check", TEXT), ("last_error", TEXT)),
    "digests": (("digest", TEXT), ("digest_text", TEXT), ("user", TEXT), ("db", TEXT), ("route", TEXT),
                ("count", INT), ("total_ms", REAL), ("avg_ms", REAL), ("min_ms", REAL), ("max_ms", REAL),
                ("p50_ms", REAL), ("p99_ms", REAL), ("errors", INT), ("rows_sent", INT), ("first_seen", TEXT),
                ("last_seen", TEXT)),
    "pools": (("server", TEXT), ("user", TEXT), ("in_use", INT), ("idle", INT), ("shared", INT),
              ("connects_ok", INT), ("connects_failed", INT), ("queries", INT), ("errors", INT), ("lost", INT),
              ("bytes_in", INT), ("bytes_out", INT), ("avg_latency_ms", REAL)),
    "sessions": (("id", INT), ("user", TEXT), ("host", TEXT), ("db", TEXT), ("state", TEXT), ("seconds", REAL),
                 ("pinned", TEXT), ("ties", TEXT), ("servers", TEXT), ("digest", TEXT), ("tls", INT), ("worker", INT)),
    "rules": (("id", INT), ("match", TEXT), ("digest", TEXT), ("route", TEXT), ("users", TEXT), ("hits", INT),
              ("error_code", INT), ("error_message", TEXT)),
    "users": (("name", TEXT), ("password", TEXT), ("auth_plugin", TEXT), ("default_route", TEXT),
              ("read_your_writes", TEXT), ("max_connections", INT), ("require_tls", INT)),
    "config": (("variable_name", TEXT), ("variable_value", TEXT)),
    "events": (("id", INT), ("time", TEXT), ("level", TEXT), ("source", TEXT), ("message", TEXT)),
    "status": (("name", TEXT), ("value", TEXT)),
    # [cluster] coordination: every live instance of the cluster (empty without coordination)
    "instances": (("name", TEXT), ("listen", TEXT), ("pid", INT), ("started", TEXT), ("leader", INT),
                  ("this", INT), ("admin", TEXT), ("metrics", TEXT)),
}
NAMES = tuple(COLUMNS)
# what each table needs from the workers (the control plane asks only for that)
NEEDS = {"servers": ("summary",), "digests": ("digests",), "pools": ("pools",), "sessions": ("sessions",),
         "rules": ("summary",), "status": ("summary",)}


def iso(t: float | None) -> str:
    """UTC wall-clock time as text that sorts and reads well ('' for never)."""
    if not t:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}"


def instances(plane) -> list[dict]:
    if plane.coord is None:
        return []
    me = plane.coord.me
    return [{"name": i.get("name"), "listen": i.get("listen"), "pid": i.get("pid"), "started": iso(i.get("started")),
             "leader": int(bool(i.get("leader"))), "this": int(i.get("name") == me), "admin": i.get("admin") or "",
             "metrics": i.get("metrics") or ""} for i in plane.coord.instances()]


def servers(plane, summary: dict) -> list[dict]:
    topo = plane.monitor.topology
    fresh = plane.monitor.current_states()
    admin = plane.server_admin_states()
    out = []
    for name, s in topo.servers.items():
        now = fresh.get(name, s)
        row = summary.get("servers", {}).get(name) or {}
        out.append({
            "name": name, "address": s.address, "role": str(s.role), "state": str(s.state),
            "admin_state": admin.get(name, ""), "in_read_pool": int(bool(s.readable and s.role == "replica")),
            "weight": s.weight, "lag_ms": now.lag_ms, "gtid": now.gtid_current_pos, "read_only": _int(s.read_only),
            "connections": summary.get("open", {}).get(name, 0),
            "shared_connections": summary.get("shared_open", {}).get(name, 0),
            "statements": summary.get("routed", {}).get(name, 0), "errors": sum(row.get("err", ())),
            "lost": sum(row.get("lost", ())), "refused": summary.get("refused", {}).get(name, 0),
            "last_check": iso(now.last_check), "last_error": now.last_error,
        })
    return out


def rules(config, summary: dict) -> list[dict]:
    hits = summary.get("rule_hits") or []
    return [{"id": i + 1, "match": r.match, "digest": r.digest, "route": r.route, "users": ",".join(r.users),
             "hits": hits[i] if i < len(hits) else 0, "error_code": r.error_code if r.route == "reject" else None,
             "error_message": r.error_message if r.route == "reject" else None}
            for i, r in enumerate(config.routing.rules)]


def password_kind(section, key: str = "password") -> str:
    """How a password is given, never its value."""
    if getattr(section, key + "_env", ""):
        return "from $" + getattr(section, key + "_env")
    if getattr(section, key + "_file", ""):
        return "from file " + getattr(section, key + "_file")
    value = getattr(section, key)
    if not value:
        return "(none)"
    return "hashed (mysql_native_password)" if is_native_hash(value) else "set"


def users(config) -> list[dict]:
    return [{"name": u.name, "password": password_kind(u), "auth_plugin": u.auth_plugin or config.proxy.auth_plugin,
             "default_route": u.default_route, "read_your_writes": u.read_your_writes or config.routing.read_your_writes,
             "max_connections": u.max_connections, "require_tls": int(u.require_tls)} for u in config.users]


def config_rows(config) -> list[dict]:
    """Every effective key as `section.key` = value, secrets masked."""
    out: list[dict] = []

    def walk(obj, prefix: str) -> None:
        secrets = set(secret_keys(type(obj)))
        for f in spec_fields(type(obj)):
            value = getattr(obj, f.name)
            path = prefix + f.name
            kind = f.metadata["kind"]
            if kind == "table":
                walk(value, path + ".")
            elif kind == "tables":
                for i, item in enumerate(value):
                    walk(item, f"{path}[{i}].")
            elif f.name in secrets:
                out.append({"variable_name": path, "variable_value": password_kind(obj, f.name)})
            elif f.name.endswith(("_env", "_file")) and f.name.rsplit("_", 1)[0] in secrets:
                continue
            else:
                out.append({"variable_name": path, "variable_value": _text(value)})

    walk(config, "")
    out.append({"variable_name": "source", "variable_value": config.source})
    return out


def events(log) -> list[dict]:
    return [{"id": seq, "time": iso(t), "level": level, "source": source, "message": msg}
            for seq, t, level, source, msg in log.rows()]


def status_rows(plane, summary: dict) -> list[dict]:
    fo = plane.failover.status()
    counts = fo.get("counts") or {}
    cache = summary.get("cache", {})
    vals = {
        "uptime_s": round(time.time() - plane.started, 1), "workers": plane.workers,
        "workers_answering": summary.get("workers_answering", 0), "clients": summary.get("clients", 0),
        "sessions": summary.get("sessions", 0), "statements": summary.get("statements", 0),
        "shared_statements": summary.get("shared_statements", 0),
        "digest_cache_hits": cache.get("hits", 0), "digest_cache_misses": cache.get("misses", 0),
        "digests": summary.get("digests", 0), "digests_evicted": summary.get("evicted", 0),
        "primary": fo.get("primary") or (plane.monitor.topology.primary.name if plane.monitor.topology.primary else ""),
        "writes_held": fo.get("writes_held"), "auto_failover": fo.get("auto_failover"),
        "failovers": counts.get("failover ok", 0), "failovers_failed": counts.get("failover failed", 0),
        "switchovers": counts.get("switchover ok", 0), "switchovers_failed": counts.get("switchover failed", 0),
        "reloads": plane.reloads["ok"], "reloads_failed": plane.reloads["failed"],
        "config_version": plane.config_version, "draining": plane.draining,
        **{f"pinned_{k.replace(' ', '_')}": v for k, v in sorted(summary.get("pinned", {}).items())},
    }
    if plane.backups is not None:  # [backup] schedules / archive_binlogs: the last backup, test restore, archive
        b = plane.backups.status()
        vals.update({"backup_last": iso(b["last_backup"]) if b["last_backup"] else "",
                     "backup_last_ok": b["last_backup_ok"], "backup_last_error": b["last_backup_error"],
                     "backup_last_test_restore": iso(b["last_test_restore"]) if b["last_test_restore"] else "",
                     "backup_archive_lag_s": b["archive_lag_s"], "backup_repository_bytes": b["repository_bytes"],
                     "backup_jobs_failed": b["jobs_failed"]})
    if plane.coord is not None:  # [cluster] coordination: this instance, the leader, etcd
        c = plane.coord.status(with_instances=False)
        vals.update({"coordination_instance": c["instance"], "coordination_leader": c["leader"] or "",
                     "coordination_leading": c["leading"], "coordination_epoch": c["epoch"],
                     "coordination_etcd_ok": c["etcd_ok"], "coordination_etcd_error": c["etcd_error"]})
    return [{"name": k, "value": _text(v)} for k, v in vals.items()]


def _int(v) -> int | None:
    return None if v is None else int(bool(v))


def _text(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, tuple):
        return ",".join(_text(x) for x in v)
    if dataclasses.is_dataclass(v):
        return repr(v)
    return "" if v is None else str(v)
