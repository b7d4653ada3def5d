"""A MariaDB primary-replica (or master-master) cluster on 127.0.0.1: create, restart, inspect, stop."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pymysql

from proxy.sandbox import render, template
from proxy.sandbox.accounts import new_accounts, passwords, saved_accounts
from proxy.sandbox.node import Node, check_server_option
from proxy.cluster.gtid import reached
from proxy.sandbox.util import SandboxError, check_ports_free, find_binary, socket_path, write_private

TOPOLOGIES = ("primary-replica", "master-master")
DEFAULTS = {"replicas": 2, "topology": "primary-replica", "base_port": 23306, "semi_sync": False, "tls": False,
            "proxy_port": 6033}
STATE_FILE = "sandbox.json"
CONFIG_FILE = "rwproxy.toml"


class Cluster:
    """A sandbox in a directory. Arguments left as None come from DIR/sandbox.json or the defaults;
    explicit arguments that contradict an existing sandbox are refused rather than silently ignored."""

    def __init__(self, dir: str | os.PathLike = "sandbox", replicas: int | None = None,
                 topology: str | None = None, base_port: int | None = None,
                 semi_sync: bool | None = None, proxy_port: int | None = None,
                 mariadbd: str | None = None, install_db: str | None = None, tls: bool | None = None,
                 server_options: list[str] | tuple[str, ...] | None = None):
        self.dir = Path(os.path.abspath(dir))
        self.state_path = self.dir / STATE_FILE
        self.config_path = self.dir / CONFIG_FILE
        self._mariadbd_opt = mariadbd
        self._install_db_opt = install_db
        state = self._load_state()
        # a sandbox whose first `up` failed half-way is rebuilt from scratch, with the new arguments
        self._stale_specs: list[dict[str, Any]] = []
        if state is not None and not state.get("bootstrapped"):
            self._stale_specs, state = state["nodes"], None
        asked = {"replicas": replicas, "topology": topology, "base_port": base_port, "semi_sync": semi_sync,
                 "tls": tls}
        if state is not None:
            state.setdefault("tls", False)  # sandboxes made before TLS was an option
            for key, value in asked.items():
                if value is not None and value != state[key]:
                    raise SandboxError(
                        f"{self.dir} already holds a sandbox with {key}={state[key]!r} (asked {value!r}); "
                        f"run `rwproxy sandbox down --dir {self.dir}`, delete the directory and run up again, "
                        f"or use another --dir")
            params = {k: state[k] for k in asked}
            params["proxy_port"] = proxy_port or state.get("proxy_port", DEFAULTS["proxy_port"])
        else:
            params = {k: (DEFAULTS[k] if v is None else v) for k, v in {**asked, "proxy_port": proxy_port}.items()}
        self.replicas_count: int = int(params["replicas"])
        self.topology: str = params["topology"]
        self.base_port: int = int(params["base_port"])
        self.semi_sync: bool = bool(params["semi_sync"])
        self.tls: bool = bool(params["tls"])  # servers accept TLS (certificates from DIR/tls, our own CA)
        self.tls_dir = self.dir / "tls"
        self.proxy_port: int = int(params["proxy_port"])
        # The admin port has no default password: each sandbox gets its own, kept across `up`s.
        self.admin_password: str = (state or {}).get("admin_password") or secrets.token_urlsafe(12)
        # the server accounts and their passwords (accounts.py: the privileged ones are this sandbox's own)
        self.users = saved_accounts(state.get("users")) if state else new_accounts()
        if self.topology not in TOPOLOGIES:
            raise SandboxError(f"unknown topology {self.topology!r}; use one of: {', '.join(TOPOLOGIES)}")
        if self.replicas_count < 0:
            raise SandboxError("--replicas must be >= 0")
        self.bootstrapped: bool = bool(state and state.get("bootstrapped"))
        self.last_started: list[str] = []  # names of the nodes the last up() launched
        binary = (state or {}).get("mariadbd") or mariadbd
        specs = state["nodes"] if state else self._plan()
        kept = tuple((state or {}).get("server_options", ()))
        if server_options is None:
            options = kept
        else:  # an empty option ('') clears them
            options = tuple(check_server_option(o) for o in server_options if o.strip())
        self.server_options: tuple[str, ...] = options  # extra [mariadbd] lines on every node
        self.nodes: list[Node] = [
            Node(s, mariadbd=binary, users=passwords(self.users),
                 semi_sync=self.semi_sync, tls_dir=self.tls_dir if self.tls else None, options=options)
            for s in specs]
        if options != kept and any(n.is_running() for n in self.nodes):
            raise SandboxError(f"{self.dir} is running with server options {list(kept)} (asked {list(options)}); "
                               f"run `rwproxy sandbox down --dir {self.dir}` first: they apply when the servers start")

    # ---- layout --------------------------------------------------------------------

    def _plan(self) -> list[dict[str, Any]]:
        """Node specs for a new sandbox: masters first, then replicas of the first master."""
        mm = self.topology == "master-master"
        masters = 2 if mm else 1
        specs = []
        for i in range(masters + self.replicas_count):
            spec = self._node_spec(f"node{i + 1}", self.base_port + i, i + 1, master="node1")
            if i < masters:
                spec["role"] = "master" if mm else "primary"
                spec["master"] = ("node2" if i == 0 else "node1") if mm else None
                if mm:  # distinct domains so both masters can write under gtid_strict_mode
                    spec["gtid_domain_id"] = i + 1
                    spec["auto_increment_offset"] = i + 1
            specs.append(spec)
        return specs

    def _node_spec(self, name: str, port: int, server_id: int, master: str | None) -> dict[str, Any]:
        d = self.dir / name
        return {"name": name, "port": port, "server_id": server_id, "dir": str(d), "datadir": str(d / "data"),
                "socket": str(socket_path(self.dir, name)), "pid_file": str(d / "mariadbd.pid"),
                "cnf": str(d / "my.cnf"), "error_log": str(d / "error.log"), "gtid_domain_id": 0, "master": master,
                "auto_increment_offset": None, "role": "replica"}

    @property
    def exists(self) -> bool:
        return self.state_path.is_file()

    @property
    def primary(self) -> Node:
        """The first master (node1): bootstrap target and source of the replicas."""
        return self.nodes[0]

    @property
    def masters(self) -> list[Node]:
        return [n for n in self.nodes if n.is_master]

    @property
    def replicas(self) -> list[Node]:
        return [n for n in self.nodes if not n.is_master]

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def node_by_port(self, port: int) -> Node | None:
        return next((n for n in self.nodes if n.port == port), None)

    # ---- state ---------------------------------------------------------------------

    def _load_state(self) -> dict[str, Any] | None:
        if not self.state_path.is_file():
            return None
        try:
            state = json.loads(self.state_path.read_text())
            for key in ("replicas", "topology", "base_port", "semi_sync", "nodes"):
                state[key]
        except (OSError, ValueError, KeyError) as e:
            raise SandboxError(f"{self.state_path} is unreadable ({e}); delete {self.dir} to start over")
        return state

    def _save_state(self) -> None:
        state = {
            "version": 1, "topology": self.topology, "replicas": self.replicas_count,
            "base_port": self.base_port, "semi_sync": self.semi_sync, "tls": self.tls, "proxy_port": self.proxy_port,
            "admin_password": self.admin_password, "server_options": list(self.server_options),
            "bootstrapped": self.bootstrapped, "mariadbd": self.nodes[0].mariadbd,
            "nodes": [n.spec() for n in self.nodes],
            "users": {u: {k: v for k, v in info.items() if k != "why"} for u, info in self.users.items()},
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".json.tmp")
        write_private(tmp, json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.state_path)

    def password(self, user: str) -> str:
        """The password of a sandbox account (`app`, `rwproxy`, `repl`; accounts.py)."""
        return self.users[user]["password"]

    def _require_exists(self) -> None:
        if not self.exists:
            raise SandboxError(f"no sandbox in {self.dir} ({STATE_FILE} missing); run `rwproxy sandbox up` first")

    # ---- up --------------------------------------------------------------------------

    def up(self, timeout: float = 60.0) -> "Cluster":
        """Create and bootstrap the cluster, or restart the stopped nodes of an existing one."""
        binary = find_binary("mariadbd", self._mariadbd_opt)
        for n in self.nodes:
            n.mariadbd = binary
        self.last_started = []
        if self.bootstrapped:
            self._make_certificates()
            self._restart(timeout)
        else:
            self._create(timeout)
        self._save_state()
        self._write_proxy_config()
        return self

    def _write_proxy_config(self) -> None:
        key = self.dir / "backup.key"
        if not key.exists():  # the sandbox's own backup key (age identity, 0600)
            from proxy.backup.codec import keygen

            keygen(str(key))
        text = render.proxy_config_toml(self.nodes, self.topology, self.proxy_port,
                                        app_user=("app", self.password("app")),
                                        monitor_user=("rwproxy", self.password("rwproxy")),
                                        repl_user=("repl", self.password("repl")),
                                        ca="tls/ca.pem" if self.tls else "", admin_password=self.admin_password,
                                        backups=str(self.dir / "backups"))
        write_private(self.config_path, text)

    def _make_certificates(self) -> None:
        if self.tls:
            from proxy.sandbox.certs import make_authority

            make_authority(self.tls_dir)

    def _create(self, timeout: float) -> None:
        if self.dir.exists() and any(self.dir.iterdir()) and not self.exists:
            raise SandboxError(f"{self.dir} exists and is not a sandbox ({STATE_FILE} missing); "
                               f"use an empty or new --dir")
        install_db = find_binary("mariadb-install-db", self._install_db_opt)
        for spec in self._stale_specs:  # a previous `up` failed half-way: clear only our own node dirs
            stale = Node(spec)
            stale.stop(timeout=10)
            shutil.rmtree(stale.dir, ignore_errors=True)
        self._stale_specs = []
        check_ports_free(n.port for n in self.nodes)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._save_state()
        self._make_certificates()
        self._install_datadirs(install_db)
        started: list[Node] = []
        try:
            self._start_nodes(self.nodes, timeout, started)
            self._bootstrap_sql(timeout)
            self.bootstrapped = True
            self._save_state()
        except BaseException:
            for n in started:
                n.stop(timeout=10)
            raise

    def _install_datadirs(self, install_db: str) -> None:
        """Copies of one install-db template: much faster than running install-db per node."""
        tpl = template.template_datadir(install_db, self.nodes[0].mariadbd)
        for n in self.nodes:
            template.copy_datadir(tpl, n.datadir)

    def _start_nodes(self, nodes: list[Node], timeout: float, started: list[Node]) -> None:
        """Start all given nodes in parallel and wait for each; started collects what we launched."""
        down = [n for n in nodes if not n.is_running()]
        check_ports_free(n.port for n in down)
        for n in nodes:
            n.write_cnf()
        for n in down:
            if n.spawn():
                started.append(n)
                self.last_started.append(n.name)
        for n in down:
            n.wait_ready(timeout)

    def _bootstrap_sql(self, timeout: float) -> None:
        """Users and database on node1 (binlogged, so replicas get them), then replication."""
        p = self.primary
        if self.semi_sync:  # no semi-sync client yet: don't make every bootstrap write wait for the timeout
            for m in self.masters:
                m.query("SET GLOBAL rpl_semi_sync_master_enabled=OFF")
        with p.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT user, host FROM mysql.user WHERE user = '' "
                        "OR (user = 'root' AND host <> 'localhost')")
            for user, host in cur.fetchall():  # anonymous users and passwordless root over TCP
                cur.execute("DROP USER IF EXISTS %s@%s", (user, host))
            cur.execute("CREATE DATABASE IF NOT EXISTS app")
            for user, info in self.users.items():
                if user == "root":
                    continue
                cur.execute("CREATE USER IF NOT EXISTS %s@'%%' IDENTIFIED BY %s", (user, info["password"]))
                cur.execute(f"GRANT {info['grants']} TO %s@'%%'", (user,))
        if self.semi_sync:
            for m in self.masters:
                m.query("SET GLOBAL rpl_semi_sync_master_enabled=ON")
        # master-master: node2 first copies node1 (and so gets the repl user) before node1 follows node2
        masters = [n for n in self.masters if n.master]
        for n in list(reversed(masters)) + [n for n in self.replicas if n.master]:
            self._change_master(n, self.node(n.master))
            if n.is_master:
                self.wait_replicas_caught_up(timeout, only=[n])
        self.wait_replicas_caught_up(timeout)
        if self.semi_sync:
            self._wait_semi_sync(timeout)

    def add_replica(self, restore_into, gtid: str, timeout: float = 120.0) -> Node:
        """A new replica whose data comes from `restore_into(datadir)` (a backup restored there),
        replicating from the current primary from `gtid` (the backup's consistent point)."""
        self._require_exists()
        name = f"node{max(int(n.name[4:]) for n in self.nodes if n.name[4:].isdigit()) + 1}"
        port = max(n.port for n in self.nodes) + 1
        check_ports_free([port])
        source = next((self.node(r["node"]) for r in self.status()
                       if r["state"] == "up" and r["read_only"] == 0 and not r["master_port"]), None)
        if source is None:
            raise SandboxError("no running primary in the sandbox (a writable node that replicates from nobody)")
        spec = self._node_spec(name, port, max(n.server_id for n in self.nodes) + 1, master=source.name)
        node = Node(spec, mariadbd=self.nodes[0].mariadbd, users=passwords(self.users),
                    semi_sync=self.semi_sync, tls_dir=self.tls_dir if self.tls else None, options=self.server_options)
        node.dir.mkdir(parents=True, exist_ok=False)
        restore_into(node.datadir)
        node.write_cnf()
        node.start(timeout)
        node.query("SET GLOBAL gtid_slave_pos = %s", (gtid,))
        self._change_master(node, source)
        self.nodes.append(node)
        self.replicas_count += 1
        self._save_state()
        self.wait_replicas_caught_up(timeout, only=[node])
        self._write_proxy_config()
        return node

    def _change_master(self, replica: Node, source: Node) -> None:
        # MASTER_CONNECT_RETRY=1: after a source restart the IO thread reconnects in 1 s, not 60 s
        replica.query(
            "CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT=%s, MASTER_USER='repl', "
            "MASTER_PASSWORD=%s, MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1",
            (source.port, self.password("repl")))
        replica.query("START SLAVE")

    def _restart(self, timeout: float) -> None:
        """Bring stopped nodes back and restart stopped replication threads.

        Never re-points replication: after a proxy failover the live topology may differ from the
        one we created, and CHANGE MASTER back to node1 could make the data diverge.
        """
        started: list[Node] = []
        try:
            self._start_nodes(self.nodes, timeout, started)
        except BaseException:
            for n in started:
                n.stop(timeout=10)
            raise
        # replication trouble leaves the nodes running, so it can be inspected and fixed
        for n in self.nodes:
            ss = n.slave_status()
            if ss is None or not ss.get("Master_Host"):
                continue
            if ss["Slave_IO_Running"] != "Yes" or ss["Slave_SQL_Running"] != "Yes":
                # kick a waiting IO thread too, so it does not sit out its retry interval
                n.query("STOP SLAVE")
                n.query("START SLAVE")
        self.wait_replicas_caught_up(timeout)
        if self.semi_sync:
            self._wait_semi_sync(timeout)

    # ---- replication checks ----------------------------------------------------------

    def _sources(self) -> list[tuple[Node, Node]]:
        """(replica, source) pairs from the live SHOW SLAVE STATUS, sources' own catch-up first."""
        pairs = []
        for n in self.nodes:
            if not n.is_running():  # a stopped or killed node has nothing to catch up
                continue
            ss = n.slave_status()
            if ss and ss.get("Master_Host"):
                src = self.node_by_port(int(ss["Master_Port"]))
                if src is None:
                    raise SandboxError(f"{n.name} replicates from port {ss['Master_Port']}, not a sandbox node")
                pairs.append((n, src))
        feeding = {src.name for _, src in pairs}
        return sorted(pairs, key=lambda p: p[0].name not in feeding)

    def wait_replicas_caught_up(self, timeout: float = 30.0, only: list[Node] | None = None) -> None:
        """Wait until every replicating node runs IO+SQL threads and has applied its source's binlog.

        Nodes that are not running are skipped. Raises SandboxError at once on a stopped thread
        with an error or an unreachable node, else after timeout.
        """
        try:
            self._wait_caught_up(time.monotonic() + timeout, timeout, only)
        except pymysql.err.MySQLError as e:
            raise SandboxError(f"checking replication: {e}") from None

    def _wait_caught_up(self, deadline: float, timeout: float, only: list[Node] | None) -> None:
        for replica, source in self._sources():
            if only is not None and replica not in only:
                continue
            target = source.variable("gtid_binlog_pos")
            while True:
                ss = replica.slave_status() or {}
                io, sql = ss.get("Slave_IO_Running"), ss.get("Slave_SQL_Running")
                if io == "Yes" and sql == "Yes" and reached(replica.variable("gtid_current_pos"), target):
                    break
                for thread, running, errno_key, err_key in (("IO", io, "Last_IO_Errno", "Last_IO_Error"),
                                                            ("SQL", sql, "Last_SQL_Errno", "Last_SQL_Error")):
                    if running == "No" and ss.get(errno_key):
                        raise SandboxError(f"{replica.name}: replication {thread} thread stopped: "
                                           f"{ss[errno_key]} {ss.get(err_key)}")
                if time.monotonic() > deadline:
                    raise SandboxError(
                        f"{replica.name} did not catch up with {source.name} within {timeout:.0f}s "
                        f"(IO:{io} SQL:{sql}, at {replica.variable('gtid_current_pos')!r}, want {target!r}; "
                        f"last IO error: {ss.get('Last_IO_Error') or '-'})")
                time.sleep(0.05)

    def _wait_semi_sync(self, timeout: float) -> None:
        """Semi-sync is only real once each master reports it active with at least one client."""
        deadline = time.monotonic() + min(timeout, 30.0)
        sources = {src.name: src for _, src in self._sources()}  # live topology, e.g. after a failover
        for m in sources.values():
            if not m.variable("rpl_semi_sync_master_enabled"):
                continue  # e.g. a replica promoted by a failover: semi-sync is the promoter's call
            while True:
                st = m.status_vars("Rpl_semi_sync_master_%")
                if st.get("Rpl_semi_sync_master_status") == "ON" and int(st.get("Rpl_semi_sync_master_clients", 0)) >= 1:
                    break
                if time.monotonic() > deadline:
                    raise SandboxError(f"semi-sync not active on {m.name}: status="
                                       f"{st.get('Rpl_semi_sync_master_status')} "
                                       f"clients={st.get('Rpl_semi_sync_master_clients')}")
                time.sleep(0.1)

    # ---- status and down -----------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """One dict per node: live state, role (learned from read_only), replication, lag, semi-sync."""
        self._require_exists()
        return [self._node_status(n) for n in self.nodes]

    def _node_status(self, n: Node) -> dict[str, Any]:
        row: dict[str, Any] = {"node": n.name, "port": n.port, "role": n.role, "configured_role": n.role,
                               "server_id": n.server_id, "pid": n.pid(), "state": "down", "read_only": None,
                               "replication": None, "lag": None, "io_running": None, "sql_running": None,
                               "master_port": None, "gtid_current_pos": None, "semi_sync": None,
                               "semi_sync_text": None}
        if row["pid"] is None:
            return row
        try:
            conn = n.connect(connect_timeout=2, read_timeout=5, cursorclass=pymysql.cursors.DictCursor)
            with conn, conn.cursor() as cur:
                cur.execute("SELECT @@read_only AS ro, @@gtid_current_pos AS pos")
                r = cur.fetchone()
                cur.execute("SHOW SLAVE STATUS")
                ss = cur.fetchone()
                cur.execute("SHOW GLOBAL STATUS LIKE 'Rpl_semi_sync_%%'")
                semi = {x["Variable_name"]: x["Value"] for x in cur.fetchall()}
        except pymysql.err.MySQLError:  # alive but not answering: starting, stopping or SIGSTOPped
            row["state"] = "unreachable"
            return row
        row.update(state="up", read_only=int(r["ro"]), gtid_current_pos=r["pos"])
        replicating = bool(ss and ss.get("Master_Host"))
        if replicating:
            row.update(io_running=ss["Slave_IO_Running"], sql_running=ss["Slave_SQL_Running"],
                       master_port=int(ss["Master_Port"]), lag=ss["Seconds_Behind_Master"])
            row["replication"] = f"IO:{ss['Slave_IO_Running']} SQL:{ss['Slave_SQL_Running']} from {ss['Master_Port']}"
        if row["read_only"]:
            row["role"] = "replica"
        else:
            row["role"] = "master" if replicating or self.topology == "master-master" else "primary"
        if self.semi_sync:
            parts = []
            if semi.get("Rpl_semi_sync_master_status") == "ON" or n.is_master:
                parts.append(f"master:{semi.get('Rpl_semi_sync_master_status')} "
                             f"clients={semi.get('Rpl_semi_sync_master_clients')}")
            if replicating:
                parts.append(f"slave:{semi.get('Rpl_semi_sync_slave_status')}")
            row["semi_sync"] = semi
            row["semi_sync_text"] = " ".join(parts) or None
        return row

    def status_table(self) -> str:
        return render.status_table(self.status(), self.semi_sync)

    def _stop_all(self, timeout: float = 30.0) -> list[str]:
        with ThreadPoolExecutor(max_workers=max(1, len(self.nodes))) as pool:
            stopped = list(pool.map(lambda n: n.stop(timeout), self.nodes))
        return [n.name for n, s in zip(self.nodes, stopped) if s]

    def down(self, timeout: float = 30.0, remove: bool = False) -> list[str]:
        """Stop every node by verified pid (in parallel); returns the names that were running.

        remove=True also deletes DIR (tests use it to free disk space).
        """
        self._require_exists()
        for spec in self._stale_specs:  # nodes of a half-made sandbox (e.g. `up` was killed)
            Node(spec).stop(timeout)
        stopped = self._stop_all(timeout)
        left = [n.name for n in self.nodes if n.is_running()]
        if left:
            raise SandboxError(f"nodes still running after down: {', '.join(left)}")
        sock_dirs = {n.socket.parent for n in self.nodes if n.socket.parent.name.startswith("rwp-")}
        for d in sock_dirs:
            shutil.rmtree(d, ignore_errors=True)
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)
        return stopped

