"""[proxy] socket: clients on the same host connect through a Unix socket, as to mysqld's own
(`mariadb -S`, PyMySQL's and mysqlclient's unix_socket, PHP's `localhost`)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys

import MySQLdb
import pymysql
import pytest

from helpers import proxy_config_dict, self_signed_cert, start_proxy, wait_until, worker_pids
from proxy.config.load import build_config, write_config
from proxy.sandbox.util import process_alive


@pytest.fixture
def on_socket(cluster, tmp_path):
    """rwproxy listening on a port and on tmp_path/rw.sock, with [proxy.tls] require = true."""
    cert, key = self_signed_cert(str(tmp_path))
    path = str(tmp_path / "rw.sock")
    p = start_proxy(cluster, tmp_path / "p", proxy={"socket": path, "tls": {"cert": cert, "key": key, "require": True}})
    try:
        yield p, path
    finally:
        p.process.stop()


def test_clients_connect_through_the_socket_and_are_routed_as_on_the_port(on_socket, cluster):
    p, path = on_socket
    assert stat.S_ISSOCK(os.stat(path).st_mode) and stat.S_IMODE(os.stat(path).st_mode) == 0o777
    # the mariadb CLI without TLS: a Unix socket is a secure transport, as for require_secure_transport
    out = subprocess.run(["mariadb", "-S", path, "-uapp", "-papp", "app", "--skip-ssl", "-N", "-e", "SELECT @@port"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) in {n.port for n in cluster.replicas}  # a read, on a replica
    # ... while the TCP port still refuses a client without TLS
    with pytest.raises(pymysql.err.OperationalError) as e:
        pymysql.connect(host=p.host, port=p.port, user="app", password="app", database="app", ssl_disabled=True)
    assert e.value.args[0] == 3159
    conn = pymysql.connect(unix_socket=path, user="app", password="app", database="app", autocommit=True,
                           ssl_disabled=True)
    with conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS unixsock (id INT PRIMARY KEY)")
        cur.execute("REPLACE INTO unixsock VALUES (1)")
        cur.execute("BEGIN")
        cur.execute("SELECT @@port, COUNT(*) FROM unixsock")
        assert cur.fetchone() == (cluster.primary.port, 1)  # in the transaction: the primary
        cur.execute("COMMIT")
    db = MySQLdb.connect(unix_socket=path, user="app", password="app", database="app")
    try:
        cur = db.cursor()
        cur.execute("SELECT 42")
        assert cur.fetchall() == ((42,),)
    finally:
        db.close()
    out = subprocess.run([sys.executable, "-m", "proxy", "status", "--config", p.process.config_path],
                         capture_output=True, text=True, timeout=60)
    assert f"on {p.host}:{p.port} and {path}, 2 worker(s)" in out.stdout, out.stdout + out.stderr
    # the server's words for a socket client: 'user'@'localhost'
    with pytest.raises(pymysql.err.OperationalError) as e:
        pymysql.connect(unix_socket=path, user="app", password="wrong", database="app", ssl_disabled=True)
    assert e.value.args == (1045, "Access denied for user 'app'@'localhost' (using password: YES)")


def test_a_stale_socket_file_is_replaced_a_live_one_refused_and_the_file_removed_at_exit(on_socket, cluster, tmp_path):
    p, path = on_socket
    # a second instance (its own port and runtime directory) on the same socket: one line, exit 1
    second = proxy_config_dict(cluster, 0, proxy={"socket": path})
    cfg_path = str(tmp_path / "second.toml")
    write_config(build_config(second, source=cfg_path), cfg_path)
    out = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", cfg_path], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1
    assert f"cannot listen on {path}: another process listens on it" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    pymysql.connect(unix_socket=path, user="app", password="app", database="app").close()  # the first serves on
    # SIGKILL leaves the file behind; the next start replaces it
    pids = [p.process.proc.pid] + worker_pids(p)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    p.process.proc.wait(10)
    assert wait_until(lambda: not any(process_alive(pid) for pid in pids), 15)
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    p.process.start()
    conn = pymysql.connect(unix_socket=path, user="app", password="app", database="app")
    conn.close()
    # a drain (SIGTERM) ends with the file removed
    p.process.stop(drain=True, timeout=30)
    assert not os.path.exists(path)


def test_a_path_that_is_not_a_socket_is_a_start_up_error(cluster, tmp_path):
    path = tmp_path / "notasocket"
    path.write_text("precious")
    cfg_path = str(tmp_path / "rw.toml")
    write_config(build_config(proxy_config_dict(cluster, 0, proxy={"socket": str(path)}), source=cfg_path), cfg_path)
    out = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", cfg_path], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and "it exists and is not a socket" in out.stderr, out.stderr
    assert path.read_text() == "precious"


def test_the_socket_path_is_checked_with_the_config():
    from proxy.config.load import ConfigError, parse_config

    base = '[[backends]]\nhost = "127.0.0.1"\nport = 1\n[[users]]\nname = "a"\npassword = "b"\n[proxy]\n'
    for value, said in (("rw.sock", "must be an absolute path"), ("/" + "s" * 107, "is 108 bytes long")):
        with pytest.raises(ConfigError) as info:
            parse_config(base + f'socket = "{value}"\n', "c.toml")
        assert any(e.startswith("c.toml: proxy.socket: " + said) for e in info.value.errors), info.value.errors
    assert parse_config(base + 'socket = "/' + "s" * 106 + '"\n', "c.toml").proxy.socket.endswith("s" * 106)
