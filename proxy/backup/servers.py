"""The cluster as the backup commands see it: each configured server's role, lag and position.

The backup commands run with or without a running proxy, so they look at the servers themselves
(PyMySQL, the control plane's client) rather than at the proxy's topology; a running proxy is
only told what they do (a replica paused for a backup leaves its read pool).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pymysql
import pymysql.cursors

SYSTEM_SCHEMAS = ("mysql", "information_schema", "performance_schema", "sys")


class BackupError(Exception):
    """One line for the operator: why the backup command cannot do what was asked."""


@dataclass
class ServerInfo:
    name: str
    address: str
    up: bool
    error: str = ""
    server_id: int = 0
    read_only: bool = False
    version: str = ""
    datadir: str = ""
    gtid_current: str = ""
    gtid_binlog: str = ""
    is_replica: bool = False
    replicating: bool = False    # IO and SQL threads both running
    lag: float | None = None     # Seconds_Behind_Master
    log_bin: bool = False

    @property
    def role(self) -> str:
        return "replica" if self.is_replica else ("primary" if not self.read_only else "standalone")


def credentials(config) -> tuple[str, str]:
    b = config.backup
    if b.user:
        return b.user, b.password
    return config.monitor_credentials()


def connect(config, backend, *, timeout: float = 5.0, read_timeout: float = 3600.0, dict_rows: bool = True,
            database: str | None = None):
    user, password = credentials(config)
    kw: dict[str, Any] = {"user": user, "password": password, "autocommit": True, "connect_timeout": timeout,
                          "read_timeout": read_timeout, "charset": "utf8mb4", "database": database}
    if dict_rows:
        kw["cursorclass"] = pymysql.cursors.DictCursor
    if backend.socket:
        kw["unix_socket"] = backend.socket
    else:
        kw.update(host=backend.host, port=backend.port)
    return pymysql.connect(**kw)


def rows(conn, sql: str, args=None) -> list[dict]:
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return list(cur.fetchall())


def take_lock(conn, name: str):
    """GET_LOCK(name) on `conn` without waiting, held for as long as the connection lives (its
    wait_timeout raised: it idles through a whole backup or archive run). None when taken, else
    the connection id of the holder."""
    rows(conn, "SET SESSION wait_timeout = 31536000")
    if rows(conn, "SELECT GET_LOCK(%s, 0) AS g", (name,))[0]["g"] == 1:
        return None
    return rows(conn, "SELECT IS_USED_LOCK(%s) AS h", (name,))[0]["h"]


def inspect(config, backend) -> ServerInfo:
    addr = f"{backend.host}:{backend.port}"
    try:
        conn = connect(config, backend, timeout=3, read_timeout=10)
    except pymysql.MySQLError as e:
        return ServerInfo(backend.name, addr, False, error=str(e.args[-1] if e.args else e))
    try:
        v = rows(conn, "SELECT @@server_id AS sid, @@read_only AS ro, @@version AS ver, @@datadir AS dd, "
                       "@@gtid_current_pos AS cur, @@gtid_binlog_pos AS bin, @@log_bin AS lb")[0]
        slaves = rows(conn, "SHOW ALL SLAVES STATUS")
    except pymysql.MySQLError as e:
        return ServerInfo(backend.name, addr, False, error=str(e.args[-1] if e.args else e))
    finally:
        conn.close()
    info = ServerInfo(backend.name, addr, True, server_id=int(v["sid"]), read_only=bool(v["ro"]),
                      version=v["ver"], datadir=v["dd"], gtid_current=v["cur"] or "", gtid_binlog=v["bin"] or "",
                      log_bin=bool(v["lb"]))
    if slaves:
        s = slaves[0]
        info.is_replica = True
        info.replicating = s.get("Slave_IO_Running") == "Yes" and s.get("Slave_SQL_Running") == "Yes"
        lag = s.get("Seconds_Behind_Master")
        info.lag = None if lag is None else float(lag)
    return info


def survey(config) -> list[ServerInfo]:
    return [inspect(config, b) for b in config.backends]


def backend_named(config, name: str):
    for b in config.backends:
        if name in (b.name, f"{b.host}:{b.port}"):
            return b
    raise BackupError(f"unknown server {name!r}; the servers are: {', '.join(b.name for b in config.backends)}")


def primary(config, servers: list[ServerInfo] | None = None) -> ServerInfo:
    servers = servers if servers is not None else survey(config)
    writers = [s for s in servers if s.up and not s.read_only and not s.is_replica]
    if not writers:  # master-master: both writable and replicating; the first configured writable one
        writers = [s for s in servers if s.up and not s.read_only]
    if not writers:
        down = "; ".join(f"{s.name}: {s.error}" for s in servers if not s.up)
        raise BackupError("no primary found among the configured servers" + (f" ({down})" if down else ""))
    return writers[0]


def choose_source(config, servers: list[ServerInfo], wanted: str | None = None) -> ServerInfo:
    """`--from NODE`, else the healthy replica with the lowest lag, else (if allowed) the primary."""
    if wanted:
        b = backend_named(config, wanted)
        s = next(s for s in servers if s.name == b.name)
        if not s.up:
            raise BackupError(f"{s.name} is not reachable: {s.error}")
        return s
    replicas = [s for s in servers if s.up and s.is_replica and s.replicating and s.read_only]
    if replicas:
        return min(replicas, key=lambda s: (s.lag if s.lag is not None else float("inf"), s.name))
    if config.backup.from_primary:
        return primary(config, servers)
    states = "; ".join(f"{s.name}: {'down (' + s.error + ')' if not s.up else s.role + (', not replicating' if s.is_replica and not s.replicating else '')}"
                       for s in servers)
    raise BackupError(f"no healthy replica to back up ({states}); backing up the primary needs "
                      f"[backup] from_primary = true or --from")


def user_tables(conn) -> list[tuple[str, str]]:
    got = rows(conn, "SELECT TABLE_SCHEMA AS s, TABLE_NAME AS t FROM information_schema.TABLES "
                     "WHERE TABLE_TYPE = 'BASE TABLE' AND TABLE_SCHEMA NOT IN %s ORDER BY 1, 2",
               (SYSTEM_SCHEMAS,))
    return [(r["s"], r["t"]) for r in got]


def quote_ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def table_checksums(conn) -> dict[str, dict]:
    """`db.table` -> rows and CHECKSUM TABLE, for every user table (what a test restore compares)."""
    out = {}
    for schema, table in user_tables(conn):
        q = f"{quote_ident(schema)}.{quote_ident(table)}"
        n = rows(conn, f"SELECT COUNT(*) AS n FROM {q}")[0]["n"]
        c = rows(conn, f"CHECKSUM TABLE {q}")[0]["Checksum"]
        out[f"{schema}.{table}"] = {"rows": int(n), "checksum": None if c is None else int(c)}
    return out


def data_size(conn) -> int:
    """Bytes of tables and indexes: the estimate a progress bar counts towards."""
    r = rows(conn, "SELECT COALESCE(SUM(DATA_LENGTH + INDEX_LENGTH), 0) AS n FROM information_schema.TABLES")
    return int(r[0]["n"])
