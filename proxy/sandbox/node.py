"""One sandbox mariadbd: its my.cnf, its process (found and signalled by pid), its connections."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pymysql
import pymysql.cursors

from proxy.sandbox.util import PortInUse, SandboxError, file_size, private_dir, process_alive, process_cmdline, tail

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
# rpl_semi_sync_master_timeout: long enough for an ack on a busy 2-core box, short enough
# that killing every replica only stalls the primary's commits for 2 s before it falls back to async.
SEMI_SYNC_TIMEOUT_MS = 2000


# Options the sandbox sets itself (layout, replication, identity): overriding them would break it.
OWN_OPTIONS = frozenset({
    "datadir", "port", "bind_address", "socket", "pid_file", "log_error", "server_id", "log_bin", "relay_log",
    "log_slave_updates", "gtid_strict_mode", "gtid_domain_id", "read_only", "auto_increment_increment",
    "auto_increment_offset", "ssl_ca", "ssl_cert", "ssl_key", "skip_name_resolve",
})


def check_server_option(option: str) -> str:
    """A `name[=value]` line for every node's [mariadbd] section, or SandboxError saying why not."""
    name, _, value = option.partition("=")
    key = name.strip().replace("-", "_").lower()
    if not re.fullmatch(r"[a-z0-9_.]+", key) or "\n" in value or "\r" in value:
        raise SandboxError(f"--server-option {option!r}: expected NAME or NAME=VALUE, e.g. "
                           "thread_handling=pool-of-threads")
    if key in OWN_OPTIONS or key.startswith("rpl_semi_sync"):
        raise SandboxError(f"--server-option {option!r}: the sandbox sets {name.strip()} itself")
    return f"{name.strip()}={value.strip()}" if value else name.strip()


class Node:
    """A sandbox node. Built from its sandbox.json entry so any process can manage it."""

    def __init__(self, spec: dict[str, Any], *, mariadbd: str | None = None,
                 users: dict[str, str] | None = None, semi_sync: bool = False, tls_dir: Path | None = None,
                 options: tuple[str, ...] = ()):
        self.name: str = spec["name"]
        self.role: str = spec["role"]  # "primary", "master" or "replica"
        self.port: int = int(spec["port"])
        self.server_id: int = int(spec["server_id"])
        self.gtid_domain_id: int = int(spec.get("gtid_domain_id", 0))
        self.master: str | None = spec.get("master")  # name of the node it replicates from
        self.auto_increment_offset: int | None = spec.get("auto_increment_offset")
        self.dir = Path(spec["dir"])
        self.datadir = Path(spec["datadir"])
        self.socket = Path(spec["socket"])
        self.pid_file = Path(spec["pid_file"])
        self.cnf = Path(spec["cnf"])
        self.error_log = Path(spec["error_log"])
        self.mariadbd = mariadbd
        self.users = dict(users or {})
        self.semi_sync = semi_sync
        self.tls_dir = tls_dir  # ca.pem, server-cert.pem, server-key.pem: the server accepts TLS
        self.options = tuple(options)  # the operator's extra [mariadbd] lines (check_server_option)
        self._proc: subprocess.Popen | None = None
        self._log_offset = 0
        self._out_offset = 0
        self.out_log = self.dir / "mariadbd.out"  # stdout/stderr: option errors land here, not in log-error

    def __repr__(self) -> str:
        return f"<Node {self.name} {self.role} :{self.port}>"

    @property
    def is_master(self) -> bool:
        return self.role in ("primary", "master")

    def spec(self) -> dict[str, Any]:
        return {
            "name": self.name, "role": self.role, "port": self.port, "server_id": self.server_id,
            "gtid_domain_id": self.gtid_domain_id, "master": self.master,
            "auto_increment_offset": self.auto_increment_offset, "dir": str(self.dir),
            "datadir": str(self.datadir), "socket": str(self.socket), "pid_file": str(self.pid_file),
            "cnf": str(self.cnf), "error_log": str(self.error_log),
        }

    # ---- configuration -------------------------------------------------------------

    def render_cnf(self) -> str:
        """The node's whole configuration; --defaults-file means nothing in /etc/mysql is read."""
        lines = [
            "# Written by rwproxy sandbox; regenerated on every `sandbox up`.",
            "[mariadbd]",
            f"datadir={self.datadir}",
            f"port={self.port}",
            "bind-address=127.0.0.1",
            f"socket={self.socket}",
            f"pid-file={self.pid_file}",
            f"log-error={self.error_log}",
            f"server_id={self.server_id}",
            "log_bin=binlog",
            "relay_log=relay-bin",
            "binlog_format=ROW",
            "log_slave_updates=ON",
            "gtid_strict_mode=ON",
            f"gtid_domain_id={self.gtid_domain_id}",
            f"read_only={0 if self.is_master else 1}",
            "slave_net_timeout=10",
            "innodb_buffer_pool_size=32M",
            "innodb_log_file_size=16M",
            "innodb_use_native_aio=0",
            "innodb_flush_log_at_trx_commit=2",
            "skip-name-resolve",
            "performance_schema=OFF",
            "max_allowed_packet=64M",  # rwproxy's own default: clients size packets by the server's value
            "max_connections=2000",  # the idle-connection benchmark holds 1,000 sessions
            "character_set_server=utf8mb4",
            "collation_server=utf8mb4_general_ci",
        ]
        if self.options:
            lines += ["# --server-option", *self.options]
        if self.tls_dir is not None:
            lines += [f"ssl_ca={self.tls_dir / 'ca.pem'}", f"ssl_cert={self.tls_dir / 'server-cert.pem'}",
                      f"ssl_key={self.tls_dir / 'server-key.pem'}"]
        if self.auto_increment_offset is not None:
            # master-master: interleaved ids so concurrent inserts on both masters never collide
            lines += ["auto_increment_increment=2", f"auto_increment_offset={self.auto_increment_offset}"]
        if self.semi_sync:
            if self.is_master:
                lines += ["rpl_semi_sync_master_enabled=ON",
                          f"rpl_semi_sync_master_timeout={SEMI_SYNC_TIMEOUT_MS}",
                          "rpl_semi_sync_master_wait_point=AFTER_SYNC",
                          # crash-safe: at restart a crashed primary truncates binlog transactions no
                          # replica acknowledged (MDEV-21117), so it can rejoin as a replica
                          "rpl_semi_sync_slave_enabled=ON"]
            if self.master is not None:
                lines.append("rpl_semi_sync_slave_enabled=ON")
        lines += ["", "# lets `mariadb --defaults-file=<this file>` log in as root over the socket",
                  "[client]", f"socket={self.socket}", "user=root", ""]
        return "\n".join(lines)

    def write_cnf(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cnf.write_text(self.render_cnf())

    # ---- process -------------------------------------------------------------------

    def _is_ours(self, pid: int) -> bool:
        """Only a mariadbd started with exactly our defaults file is ever signalled."""
        argv = process_cmdline(pid)
        if not argv:
            return False
        exe = os.path.basename(argv[0])
        if exe not in ("mariadbd", "mysqld") and argv[0] != self.mariadbd:
            return False
        return f"--defaults-file={self.cnf}" in argv[1:]

    def pid(self) -> int | None:
        """Pid of this node's live mariadbd, or None. Pid file first, /proc scan as fallback."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            pid = None
        if pid and self._is_ours(pid) and process_alive(pid):
            return pid
        if self._proc is not None and self._proc.poll() is None and self._is_ours(self._proc.pid):
            return self._proc.pid
        # e.g. pid file not written yet, or removed by hand: look for our exact command line
        for entry in os.listdir("/proc"):
            if entry.isdigit() and self._is_ours(int(entry)) and process_alive(int(entry)):
                return int(entry)
        return None

    def is_running(self) -> bool:
        return self.pid() is not None

    def spawn(self) -> bool:
        """Start mariadbd in its own session (so it outlives us) without waiting; False if already up."""
        if self.is_running():
            return False
        if not self.mariadbd:
            raise SandboxError(f"{self.name}: no mariadbd binary configured")
        # root@localhost has no password (the admin shell): only this user may reach the socket,
        # else any local user could log in as root through it (seen: `nobody` got root@localhost)
        if self.dir.is_dir():
            self.dir.chmod(0o700)
        private_dir(self.socket.parent)
        argv = [self.mariadbd, f"--defaults-file={self.cnf}"]
        if os.geteuid() == 0:
            argv.append("--user=root")
        # readiness errors show this start's lines only
        self._log_offset = file_size(self.error_log)
        self._out_offset = file_size(self.out_log)
        with open(self.out_log, "ab") as out:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.dir, start_new_session=True, close_fds=True)
        return True

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Poll a root socket connection; fail fast with the error log if the process died."""
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                log = self._start_log()
                if "Address already in use" in log:
                    raise PortInUse(self.port, f"{self.name} could not bind it")
                raise SandboxError(f"{self.name} (mariadbd on port {self.port}) exited with code "
                                   f"{self._proc.returncode}; {log}")
            try:
                self.connect(connect_timeout=1).close()
                return
            except pymysql.err.OperationalError:
                pass
            if time.monotonic() > deadline:
                if self._proc is not None and self._proc.poll() is None:
                    self.stop(timeout=10)
                raise SandboxError(f"{self.name} (port {self.port}) not ready after {timeout:.0f}s; "
                                   f"{self._start_log()}")
            time.sleep(0.1)

    def _start_log(self) -> str:
        """What this start wrote to the error log (or, for option errors, to stderr)."""
        for path, offset in ((self.error_log, self._log_offset), (self.out_log, self._out_offset)):
            text = tail(path, 10, offset)
            if text.strip():
                return f"last lines of {path}:\n{_indent(text)}"
        return f"nothing in {self.error_log} or {self.out_log}"

    def start(self, timeout: float = READY_TIMEOUT) -> None:
        """Start (if needed) and wait until it accepts connections."""
        self.spawn()
        self.wait_ready(timeout)

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not process_alive(pid):
                if self._proc is not None and self._proc.pid == pid:
                    self._proc.poll()
                return True
            time.sleep(0.05)
        return not process_alive(pid)

    def stop(self, timeout: float = STOP_TIMEOUT) -> bool:
        """Clean shutdown: SIGTERM, wait, then SIGKILL. Returns False if it was not running."""
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGCONT)  # a SIGSTOPped node (hang simulation) must still be able to exit
        if not self._wait_gone(pid, timeout):
            if self._is_ours(pid):
                os.kill(pid, signal.SIGKILL)
            if not self._wait_gone(pid, 10):
                raise SandboxError(f"{self.name}: mariadbd pid {pid} survived SIGKILL")
        return True

    def kill(self, sig: int = signal.SIGKILL, wait: bool = True, timeout: float = STOP_TIMEOUT) -> int:
        """Send sig to the verified pid (crash/hang simulations); waits for exit on KILL/TERM/INT."""
        pid = self.pid()
        if pid is None:
            raise SandboxError(f"{self.name} is not running")
        os.kill(pid, sig)
        if wait and sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            if not self._wait_gone(pid, timeout):
                raise SandboxError(f"{self.name}: pid {pid} still alive {timeout:.0f}s after signal {sig}")
        return pid

    # ---- SQL -----------------------------------------------------------------------

    def connect(self, user: str = "root", password: str | None = None, database: str | None = None,
                **kwargs: Any) -> pymysql.connections.Connection:
        """root goes over the unix socket (empty password); other users over TCP 127.0.0.1:port."""
        params: dict[str, Any] = {"user": user, "database": database, "autocommit": True,
                                  "connect_timeout": 5, "charset": "utf8mb4"}
        if user == "root":
            params.update(unix_socket=str(self.socket), password=password or "")
        else:
            params.update(host="127.0.0.1", port=self.port,
                          password=self.users.get(user, "") if password is None else password)
        params.update(kwargs)
        return pymysql.connect(**params)

    def query(self, sql: str, args: Any = None, user: str = "root") -> list[dict[str, Any]]:
        """Run one statement on a fresh connection and return its rows as dicts."""
        conn = self.connect(user, cursorclass=pymysql.cursors.DictCursor, read_timeout=60)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return list(cur.fetchall())
        finally:
            conn.close()

    def variable(self, name: str) -> Any:
        return self.query(f"SELECT @@GLOBAL.{name} AS v")[0]["v"]

    def status_vars(self, like: str) -> dict[str, str]:
        return {r["Variable_name"]: r["Value"] for r in self.query("SHOW GLOBAL STATUS LIKE %s", (like,))}

    def slave_status(self) -> dict[str, Any] | None:
        rows = self.query("SHOW SLAVE STATUS")
        return rows[0] if rows else None


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines()) or "    (empty)"
