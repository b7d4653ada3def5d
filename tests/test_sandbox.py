"""The sandbox against real mariadbd processes: replication, read_only, status, down/up, errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import tomllib
import uuid

import pymysql
import pytest

from proxy.sandbox import Cluster, PortInUse, SandboxError, find_free_base_port
from proxy.sandbox.cli import main as cli_main
from proxy.sandbox.node import Node
from proxy.sandbox.render import proxy_config_toml
from proxy.testing.clusters import cluster_processes, running_cluster
from proxy.sandbox.util import process_alive, socket_path

MISSING = "mariadbd not found: install the Debian package mariadb-server (apt-get install mariadb-server)"


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def rows(node, sql, user="rwproxy"):
    conn = node.connect(user, database="app")
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()
    finally:
        conn.close()


def table_name() -> str:
    return "t_" + uuid.uuid4().hex[:12]


# ---- the shared primary + 2 replicas -------------------------------------------------

def test_roles_read_only_and_threads(cluster):
    st = {r["node"]: r for r in cluster.status()}
    assert st["node1"]["role"] == "primary" and st["node1"]["read_only"] == 0
    assert st["node1"]["replication"] is None
    assert len(cluster.replicas) == 2
    for r in cluster.replicas:
        row = st[r.name]
        assert row["state"] == "up" and row["role"] == "replica" and row["read_only"] == 1
        assert (row["io_running"], row["sql_running"]) == ("Yes", "Yes")
        assert row["master_port"] == cluster.primary.port
        assert r.variable("read_only") == 1


def test_row_on_primary_reaches_every_replica(cluster):
    t = table_name()
    with cluster.primary.connect("app", database="app") as conn, conn.cursor() as cur:
        cur.execute(f"CREATE TABLE {t} (id INT PRIMARY KEY, v VARCHAR(20))")
        cur.execute(f"INSERT INTO {t} VALUES (1, 'hello')")
    for r in cluster.replicas:
        wait_for(lambda: _table_exists(r, t) and rows(r, f"SELECT id FROM {t}"),
                 timeout=10, what=f"the row on {r.name}")
        assert rows(r, f"SELECT id, v FROM {t}", user="app") == ((1, "hello"),)
    cluster.wait_replicas_caught_up(timeout=10)


def _table_exists(node, t) -> bool:
    return bool(rows(node, f"SELECT 1 FROM information_schema.tables WHERE table_schema='app' AND table_name='{t}'"))


def test_app_write_on_replica_is_refused_1290(cluster):
    replica = cluster.replicas[0]
    with replica.connect("app", database="app") as conn, conn.cursor() as cur:
        with pytest.raises(pymysql.err.MySQLError) as exc:
            cur.execute(f"CREATE TABLE {table_name()} (id INT)")
        assert exc.value.args[0] == 1290
        assert "--read-only" in exc.value.args[1]


def test_app_has_no_global_privileges(cluster):
    with cluster.primary.connect("app") as conn, conn.cursor() as cur:
        cur.execute("SHOW GRANTS")
        grants = [g[0] for g in cur.fetchall()]
    assert any("ON `app`.*" in g and "ALL PRIVILEGES" in g for g in grants), grants
    assert all("ON *.*" not in g or g.startswith("GRANT USAGE ON *.*") for g in grants), grants


def test_status_table_and_cli(cluster, capsys):
    table = cluster.status_table()
    lines = table.splitlines()
    assert lines[0].split() == ["NODE", "PORT", "ROLE", "STATE", "READ_ONLY", "REPLICATION", "LAG"]
    assert len(lines) == 4
    for r in cluster.replicas:
        line = next(l for l in lines if l.startswith(r.name + " "))
        assert f"IO:Yes SQL:Yes from {cluster.primary.port}" in line
        assert str(r.port) in line and "replica" in line
    assert cli_main(["sandbox", "status", "--dir", str(cluster.dir)]) == 0
    out = capsys.readouterr().out
    assert "node1" in out and str(cluster.primary.port) in out and "primary" in out


def test_state_file_and_proxy_config(cluster):
    state = json.loads((cluster.dir / "sandbox.json").read_text())
    assert state["topology"] == "primary-replica" and state["semi_sync"] is False
    assert [n["name"] for n in state["nodes"]] == ["node1", "node2", "node3"]
    assert len({n["server_id"] for n in state["nodes"]}) == 3
    assert {"app", "rwproxy", "repl"} <= set(state["users"])
    cfg = tomllib.loads(cluster.config_path.read_text())
    assert cfg["proxy"]["listen"] == "127.0.0.1:6033"
    assert [(b["name"], b["host"], b["port"]) for b in cfg["backends"]] == \
        [(n.name, "127.0.0.1", n.port) for n in cluster.nodes]
    assert all("role" not in b for b in cfg["backends"])
    assert cfg["users"] == [{"name": "app", "password": "app"}]
    # the accounts that can do more than `app` have passwords of this sandbox's own, kept in its state
    monitor = cfg["monitor"]
    assert monitor["user"] == "rwproxy" and len(monitor["password"]) >= 16
    assert monitor["password"] == state["users"]["rwproxy"]["password"] == cluster.password("rwproxy")
    assert cfg["failover"]["replication_password"] == state["users"]["repl"]["password"] == cluster.password("repl")
    assert len(cluster.password("repl")) >= 16 and cluster.password("repl") != monitor["password"]
    for user in ("rwproxy", "repl"):  # the servers refuse the old fixed password
        with pytest.raises(pymysql.err.OperationalError) as e:
            pymysql.connect(host="127.0.0.1", port=cluster.primary.port, user=user, password=user).close()
        assert e.value.args[0] == 1045
    assert cfg["cluster"] == {"topology": "primary-replica"}
    # the admin port gets a random password of its own, kept across `up`s; the file holding it is private
    (admin,) = cfg["admin"]["users"]
    assert admin["name"] == "admin" and len(admin["password"]) >= 16 and admin["password"] == state["admin_password"]
    assert cfg["admin"]["listen"] == "127.0.0.1:6032" and cfg["metrics"]["listen"] == "127.0.0.1:9033"
    assert cluster.config_path.stat().st_mode & 0o077 == 0
    assert (cluster.dir / "sandbox.json").stat().st_mode & 0o077 == 0  # (it holds the passwords too)


def test_up_again_is_a_no_op_and_topology_change_is_refused(cluster):
    pids = [n.pid() for n in cluster.nodes]
    again = Cluster(cluster.dir).up(timeout=30)
    assert [n.pid() for n in again.nodes] == pids
    assert again.admin_password == cluster.admin_password
    with pytest.raises(SandboxError, match="topology"):
        Cluster(cluster.dir, topology="master-master")
    with pytest.raises(SandboxError, match="replicas"):
        Cluster(cluster.dir, replicas=5)


# ---- private clusters ----------------------------------------------------------------

@pytest.fixture(scope="module")
def semi(tmp_path_factory):
    """Primary + 1 replica with semi-sync; the down/up/crash tests below restore it as they go."""
    with running_cluster(tmp_path_factory.mktemp("semi"), replicas=1, semi_sync=True) as c:
        yield c


def test_semi_sync_is_active(semi):
    p, r = semi.primary, semi.replicas[0]
    st = p.status_vars("Rpl_semi_sync_master_%")
    assert st["Rpl_semi_sync_master_status"] == "ON"
    assert int(st["Rpl_semi_sync_master_clients"]) >= 1
    assert r.status_vars("Rpl_semi_sync_slave_status")["Rpl_semi_sync_slave_status"] == "ON"
    yes_before = int(st["Rpl_semi_sync_master_yes_tx"])
    t = table_name()
    with p.connect("app", database="app") as conn, conn.cursor() as cur:
        cur.execute(f"CREATE TABLE {t} (id INT PRIMARY KEY)")
        cur.execute(f"INSERT INTO {t} VALUES (1)")
    assert int(p.status_vars("Rpl_semi_sync_master_yes_tx")["Rpl_semi_sync_master_yes_tx"]) >= yes_before + 2
    assert "master:ON clients=1" in semi.status_table()


def test_down_then_up_keeps_data(semi):
    t = table_name()
    with semi.primary.connect("app", database="app") as conn, conn.cursor() as cur:
        cur.execute(f"CREATE TABLE {t} (id INT PRIMARY KEY)")
        cur.execute(f"INSERT INTO {t} VALUES (42)")
    semi.wait_replicas_caught_up(timeout=10)
    pids = [n.pid() for n in semi.nodes]
    assert all(pids)
    assert sorted(semi.down()) == ["node1", "node2"]
    assert cluster_processes(semi) == []
    for pid in pids:
        assert not process_alive(pid), pid
    assert {row["state"] for row in semi.status()} == {"down"}
    assert "down" in semi.status_table()

    again = Cluster(semi.dir).up(timeout=60)
    assert all(n.pid() and n.pid() not in pids for n in again.nodes)
    for n in again.nodes:
        assert rows(n, f"SELECT id FROM {t}") == ((42,),)
    st = {row["node"]: row for row in again.status()}
    assert (st["node2"]["io_running"], st["node2"]["sql_running"]) == ("Yes", "Yes")
    assert int(again.primary.status_vars("Rpl_semi_sync_master_clients")["Rpl_semi_sync_master_clients"]) >= 1


def test_up_restarts_crashed_and_hung_nodes(semi):
    p, r = semi.primary, semi.replicas[0]
    old = p.kill(signal.SIGKILL)
    assert not process_alive(old) and p.pid() is None
    assert semi.status()[0]["state"] == "down"
    r.kill(signal.SIGSTOP, wait=False)  # a hung node must still stop cleanly
    assert r.stop(timeout=30) is True and r.pid() is None
    semi.up(timeout=60)
    assert p.pid() not in (None, old)
    t = table_name()
    with p.connect("app", database="app") as conn, conn.cursor() as cur:
        cur.execute(f"CREATE TABLE {t} (id INT PRIMARY KEY)")
        cur.execute(f"INSERT INTO {t} VALUES (7)")
    semi.wait_replicas_caught_up(timeout=15)
    assert rows(r, f"SELECT id FROM {t}") == ((7,),)


def test_server_options_reach_every_node_and_change_only_while_down(tmp_path, capsys):
    """`sandbox up --server-option` adds [mariadbd] lines (the benchmark's server settings);
    they are kept for later ups, refused while the servers run with others, and never allowed
    to override what the sandbox itself depends on."""
    d = tmp_path / "opts"
    base = find_free_base_port(2, 26900)
    assert cli_main(["sandbox", "up", "--dir", str(d), "--replicas", "1", "--base-port", str(base), "--proxy-port",
                     str(base + 50), "--server-option", "thread_handling=pool-of-threads",
                     "--server-option", "max-connect-errors=77"]) == 0
    c = Cluster(d)
    try:
        for n in c.nodes:
            assert n.variable("thread_handling") == "pool-of-threads" and n.variable("max_connect_errors") == 77
        assert n.slave_status()["Slave_SQL_Running"] == "Yes"
        assert json.loads((d / "sandbox.json").read_text())["server_options"] == [
            "thread_handling=pool-of-threads", "max-connect-errors=77"]
        assert Cluster(d).server_options == c.server_options  # kept when `up` names none
        with pytest.raises(SandboxError, match="sandbox down"):
            Cluster(d, server_options=["thread_handling=one-thread-per-connection"])
        c.down()
        assert cli_main(["sandbox", "up", "--dir", str(d), "--server-option", ""]) == 0  # cleared while down: applies at start
        c = Cluster(d)
        assert c.server_options == ()
        assert all(n.variable("thread_handling") == "one-thread-per-connection" for n in c.nodes)
    finally:
        c.down()
    capsys.readouterr()
    for bad, why in (("port=1", "sets port itself"), ("log-bin", "sets log-bin itself"),
                     ("a b=1", "NAME=VALUE"), ("x=1\nport=2", "NAME=VALUE")):
        assert cli_main(["sandbox", "up", "--dir", str(tmp_path / "bad"), "--server-option", bad]) != 0
        assert why in capsys.readouterr().err
        assert not (tmp_path / "bad" / "sandbox.json").exists()


def test_master_master_both_ways_without_auto_increment_collisions(tmp_path):
    with running_cluster(tmp_path / "mm", topology="master-master", replicas=1) as c:
        m1, m2 = c.masters
        replica = c.replicas[0]
        assert (m1.port + 1, replica.port) == (m2.port, m2.port + 1)
        assert m1.variable("read_only") == 0 and m2.variable("read_only") == 0
        assert m1.variable("gtid_domain_id") != m2.variable("gtid_domain_id")
        t = table_name()
        with m1.connect("app", database="app") as conn, conn.cursor() as cur:
            cur.execute(f"CREATE TABLE {t} (id INT AUTO_INCREMENT PRIMARY KEY, src CHAR(2))")
        c.wait_replicas_caught_up(timeout=10)
        c1, c2 = m1.connect("app", database="app"), m2.connect("app", database="app")
        try:
            for _ in range(5):  # interleaved, no waiting: ids must still never collide
                c1.cursor().execute(f"INSERT INTO {t} (src) VALUES ('m1')")
                c2.cursor().execute(f"INSERT INTO {t} (src) VALUES ('m2')")
        finally:
            c1.close()
            c2.close()
        c.wait_replicas_caught_up(timeout=15)
        expected = rows(m1, f"SELECT id, src FROM {t} ORDER BY id")
        assert len(expected) == 10
        assert {i % 2 for i, src in expected if src == "m1"} == {1}
        assert {i % 2 for i, src in expected if src == "m2"} == {0}
        for n in (m2, replica):
            assert rows(n, f"SELECT id, src FROM {t} ORDER BY id") == expected
        st = {row["node"]: row for row in c.status()}
        assert st["node1"]["master_port"] == m2.port and st["node2"]["master_port"] == m1.port
        assert st["node3"]["master_port"] == m1.port and st["node3"]["read_only"] == 1
        assert tomllib.loads(c.config_path.read_text())["cluster"]["topology"] == "master-master"


# ---- errors --------------------------------------------------------------------------

def test_busy_port_is_named_before_anything_starts(tmp_path, capsys):
    base = find_free_base_port(2, 25306)
    with socket.socket() as s:
        s.bind(("127.0.0.1", base + 1))
        s.listen()
        with pytest.raises(PortInUse, match=str(base + 1)):
            Cluster(tmp_path / "busy", replicas=1, base_port=base).up()
        assert not (tmp_path / "busy").exists()
        code = cli_main(["sandbox", "up", "--dir", str(tmp_path / "busy"), "--replicas", "1",
                         "--base-port", str(base)])
    err = capsys.readouterr().err
    assert code == 1 and f"port {base + 1}" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_lost_port_race_is_port_in_use_and_a_retry_rebuilds(tmp_path, monkeypatch):
    """Someone binds the port between our check and mariadbd's bind: PortInUse, nothing left running."""
    base = find_free_base_port(1, 25406)
    d = tmp_path / "race"
    with monkeypatch.context() as m, socket.socket() as s:
        m.setattr("proxy.sandbox.cluster.check_ports_free", lambda ports: None)
        s.bind(("127.0.0.1", base))
        s.listen()
        c = Cluster(d, replicas=0, base_port=base)
        with pytest.raises(PortInUse, match=str(base)):
            c.up(timeout=30)
        assert cluster_processes(c) == []
    other = find_free_base_port(1, base + 1)
    c2 = Cluster(d, replicas=0, base_port=other).up(timeout=30)  # half-made sandbox: rebuilt, new port
    try:
        assert c2.primary.port == other and c2.status()[0]["state"] == "up"
    finally:
        c2.down(remove=True)
    assert cluster_processes(c2) == []


def test_missing_mariadbd_gives_one_clear_line(tmp_path, capsys):
    with pytest.raises(SandboxError) as exc:
        Cluster(tmp_path / "x", mariadbd=str(tmp_path / "no" / "mariadbd")).up()
    assert str(exc.value) == MISSING
    code = cli_main(["sandbox", "up", "--dir", str(tmp_path / "x"), "--mariadbd", "/nonexistent/mariadbd"])
    err = capsys.readouterr().err
    assert code == 1 and err.strip() == f"rwproxy sandbox: error: {MISSING}"
    with pytest.raises(SandboxError, match="^mariadb-install-db not found: install the Debian package"):
        Cluster(tmp_path / "y", install_db="/nonexistent/mariadb-install-db").up()
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_directory_that_cannot_be_made_gives_one_clear_line(tmp_path, capsys):
    """(It was a FileNotFoundError traceback, for `sandbox up` and `demo` alike.)"""
    from proxy.cli import main as rwproxy_main

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for argv in (["sandbox", "up", "--dir", str(blocker / "sb")], ["demo", "--dir", str(blocker / "sb"), "--exit"]):
        code = rwproxy_main(argv)
        out = capsys.readouterr()
        text = (out.err + out.out).strip().splitlines()[-1]
        assert code == 1 and "Traceback" not in out.err and "Not a directory" in text, (argv, out)
        assert text.startswith(("rwproxy sandbox: error: ", "rwproxy demo: ")), text


def test_a_full_disk_gives_one_line_naming_the_directory(small_disk, capsys):
    from proxy.cli import main as rwproxy_main

    (small_disk / "filler").write_bytes(b"\0" * 60_000)
    code = rwproxy_main(["sandbox", "up", "--dir", str(small_disk / "sb"), "--base-port", str(find_free_base_port(3, 27306))])
    out = capsys.readouterr()
    assert code == 1 and "Traceback" not in out.err, out
    last = out.err.strip().splitlines()[-1]
    assert last.startswith("rwproxy sandbox: error: ") and "No space left on device" in last, last
    assert str(small_disk / "sb") in last, last


def test_failed_start_reports_the_error_log(tmp_path):
    spec = {k: str(tmp_path / v) for k, v in {"dir": "", "datadir": "data", "socket": "s.sock",
            "pid_file": "p.pid", "cnf": "my.cnf", "error_log": "err.log"}.items()}
    node = Node({**spec, "name": "bad", "role": "primary", "port": find_free_base_port(1, 26306),
                 "server_id": 1}, mariadbd="/usr/sbin/mariadbd")
    node.write_cnf()  # but no datadir: mariadbd aborts at once
    with pytest.raises(SandboxError, match="(?s)exited with code 1; last lines of .*Can't change dir"):
        node.start(timeout=30)
    assert node.pid() is None


def test_foreign_pid_in_pid_file_is_never_signalled(tmp_path):
    spec = {k: str(tmp_path / v) for k, v in {"dir": "", "datadir": "data", "socket": "s.sock",
            "pid_file": "p.pid", "cnf": "my.cnf", "error_log": "err.log"}.items()}
    node = Node({**spec, "name": "n", "role": "replica", "port": 1, "server_id": 2})
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        node.pid_file.write_text(f"{sleeper.pid}\n")
        assert node.pid() is None
        assert node.stop(timeout=1) is False
        with pytest.raises(SandboxError):
            node.kill(signal.SIGKILL)
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait(5)


# ---- pure helpers ----------------------------------------------------------------------

def test_helpers(tmp_path):
    long_dir = tmp_path / ("d" * 120)
    assert str(socket_path(long_dir, "node1")).startswith("/tmp/rwp-")
    assert len(str(socket_path(long_dir, "node1"))) < 107
    assert socket_path(tmp_path, "node1") == tmp_path / "node1" / "mysql.sock"
    base = find_free_base_port(3, 27306)
    with socket.socket() as s:
        s.bind(("127.0.0.1", base + 1))
        s.listen()
        assert find_free_base_port(3, base) >= base + 2

    class N:
        def __init__(self, name, port):
            self.name, self.port = name, port
    cfg = tomllib.loads(proxy_config_toml([N("node1", 1), N("node2", 2)], "master-master", 7000,
                                          ("app", "a"), ("rwproxy", "m"), ("repl", "r")))
    assert cfg["proxy"]["listen"] == "127.0.0.1:7000" and len(cfg["backends"]) == 2


def test_privileged_accounts_get_passwords_of_their_own_and_old_sandboxes_keep_theirs():
    from proxy.sandbox.accounts import new_accounts, saved_accounts

    a, b = new_accounts(), new_accounts()
    assert a["app"]["password"] == "app" and a["root"]["password"] == ""  # the README's login; root: socket only
    for user in ("rwproxy", "repl"):
        assert len(a[user]["password"]) >= 16 and a[user]["password"] not in (user, b[user]["password"])
    # a sandbox's state file keeps them; one written before it kept them had the old fixed ones
    state = {u: {k: v for k, v in info.items() if k != "why"} for u, info in a.items()}
    assert {u: i["password"] for u, i in saved_accounts(state).items()} == {u: i["password"] for u, i in a.items()}
    old = {u: i["password"] for u, i in saved_accounts(None).items()}
    assert old == {"app": "app", "rwproxy": "rwproxy", "repl": "repl", "root": ""}


def test_the_template_cache_and_socket_directories_are_private(tmp_path, monkeypatch):
    """Another local user's directory under a computable name is refused, never used: the
    template cache lives in the user's own cache directory, and is rebuilt when half of one is left."""
    from proxy.sandbox import template
    from proxy.sandbox.util import find_binary, private_dir

    for mode in (0o777, 0o770):
        d = tmp_path / f"open-{mode:o}"
        d.mkdir()
        d.chmod(mode)
        with pytest.raises(SandboxError, match="writable by it alone"):
            private_dir(d)
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)  # (nobody; the suite runs as root)
    with pytest.raises(SandboxError, match="owned by this user"):
        private_dir(theirs)

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    install_db, mariadbd = find_binary("mariadb-install-db", None), find_binary("mariadbd", None)
    tpl = template.template_datadir(install_db, mariadbd)
    assert tpl.parent == tmp_path / "cache" / "rwproxy" and (tpl.parent.stat().st_mode & 0o777) == 0o700
    assert (tpl / template.DONE).is_file() and (tpl / "mysql").is_dir()
    template.copy_datadir(tpl, tmp_path / "node" / "data")
    assert not (tmp_path / "node" / "data" / template.DONE).exists() and (tmp_path / "node" / "data" / "mysql").is_dir()
    (tpl / template.DONE).unlink()  # half a template: built again, not used
    (tpl / "junk").write_text("x")
    again = template.template_datadir(install_db, mariadbd)
    assert again == tpl and (tpl / template.DONE).is_file() and not (tpl / "junk").exists()


def test_only_the_sandbox_owner_reaches_a_node_socket(cluster):
    """root@localhost has no password (the admin shell logs in with it): another local user must
    not reach the socket (before, `nobody` logged in as root@localhost through it)."""
    node = cluster.nodes[0]
    probe = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
             "try:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n    print(type(e).__name__)\nelse:\n    print('connected')\n")

    def as_nobody():
        os.setgid(65534)
        os.setuid(65534)

    r = subprocess.run(["/usr/bin/python3", "-c", probe, str(node.socket)], capture_output=True, text=True,
                       timeout=30, preexec_fn=as_nobody, cwd="/")
    assert r.stdout.strip() == "PermissionError", (r.stdout, r.stderr)
    assert (node.dir.stat().st_mode & 0o777) == 0o700
    with node.connect() as c, c.cursor() as cur:  # the owner still does
        cur.execute("SELECT CURRENT_USER()")
        assert cur.fetchone()[0] == "root@localhost"


def test_the_template_cache_without_a_usable_home_is_a_private_tmp_directory(tmp_path, monkeypatch):
    """A system user without a home (the Docker image's): a scheduled test restore still finds a
    private place for the template, not a home it cannot create."""
    from proxy.sandbox import template

    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", "/proc/no-such-home")  # (cannot be created)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    root = template.cache_root()
    assert root == tmp_path / f"rwproxy-cache-{os.getuid()}" and (root.stat().st_mode & 0o777) == 0o700


def test_a_second_fleet_up_starts_again_only_what_died(tmp_path, capsys):
    """`sandbox up --proxies 2 --etcd 3` twice: the second one starts again the instance, the etcd
    member and the HAProxy that were killed, on their ports and data, and leaves the running ones
    alone (it used to stop every instance and wipe etcd, whose epochs went back to the start);
    `sandbox down` then stops all of them by pid."""
    d = tmp_path / "fleet"
    base = find_free_base_port(3, 27606)
    argv = ["sandbox", "up", "--dir", str(d), "--base-port", str(base), "--proxy-port", str(base + 60),
            "--proxies", "2", "--etcd", "3"]
    assert cli_main(argv) == 0
    try:
        spec = json.loads((d / "fleet.json").read_text())
        first, second = spec["proxies"]
        member = d / "etcd" / "etcd2"
        etcd_pid = int((member / "etcd.pid").read_text())
        for pid in (first["pid"], spec["haproxy"]["pid"], etcd_pid):
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not process_alive(first["pid"]) and not process_alive(etcd_pid), 10, "the kills")
        capsys.readouterr()
        assert cli_main(argv) == 0
        assert "fleet: started again etcd2, rwproxy1, haproxy; the rest was running" in capsys.readouterr().out
        again = json.loads((d / "fleet.json").read_text())
        assert again["proxies"][1]["pid"] == second["pid"] and process_alive(second["pid"])
        assert again["proxies"][0]["pid"] != first["pid"] and process_alive(again["proxies"][0]["pid"])
        assert [p["port"] for p in again["proxies"]] == [first["port"], second["port"]]
        assert again["etcd"] == spec["etcd"] and int((member / "etcd.pid").read_text()) != etcd_pid
        with pymysql.connect(host="127.0.0.1", port=base + 60, user="app", password="app", database="app") as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
                assert cur.fetchone() == (1,)
    finally:
        assert cli_main(["sandbox", "down", "--dir", str(d)]) == 0
    for pid in (again["proxies"][0]["pid"], second["pid"], again["haproxy"]["pid"]):
        assert not process_alive(pid)
    assert not (d / "fleet.json").exists()
