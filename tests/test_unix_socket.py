"""Backends reached through their Unix socket (`[[backends]] socket`): sessions, the monitor
and the read/write split work as over TCP, and a wrong path is a clear client error."""

from __future__ import annotations

import pymysql
import pytest

from helpers import start_proxy


def _via_socket(cluster, **extra):
    return [{"name": n.name, "host": "127.0.0.1", "port": n.port, "socket": str(n.socket), **extra}
            for n in cluster.nodes]


def test_sessions_and_monitor_over_unix_sockets(cluster_factory, tmp_path):
    # a private cluster: the process lists below must show only this proxy's connections
    cluster = cluster_factory(replicas=1)
    with cluster.primary.connect(database="app") as c, c.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS us (id INT PRIMARY KEY, v VARCHAR(10))")
        cur.execute("DELETE FROM us")
    cluster.wait_replicas_caught_up(30)
    proxy = start_proxy(cluster, tmp_path, backends=_via_socket(cluster))
    replicas = {n.port for n in cluster.replicas}
    try:
        with proxy.connect(autocommit=True) as c, c.cursor() as cur:
            # reads reach a replica: the monitor (also over the socket) found them healthy
            seen = set()
            for _ in range(50):
                cur.execute("SELECT @@port")
                seen.add(cur.fetchone()[0])
            assert seen and seen <= replicas, seen
            cur.execute("INSERT INTO us VALUES (1, 'a')")
            cur.execute("SELECT v, @@port FROM us WHERE id = 1")  # read-your-writes: on the primary
            assert cur.fetchone() == ("a", cluster.primary.port)
            # every connection rwproxy holds (sessions as 'app', monitor as 'rwproxy') came in over
            # the socket: the server lists those as 'localhost', TCP ones as 'ip:port'
            for node in cluster.nodes:
                with node.connect() as admin, admin.cursor() as q:
                    q.execute("SELECT USER, HOST FROM information_schema.PROCESSLIST WHERE USER IN ('app', 'rwproxy')")
                    hosts = q.fetchall()
                assert hosts and {h for _, h in hosts} == {"localhost"}, (node.name, hosts)
    finally:
        proxy.process.stop()


def test_wrong_socket_path_is_a_clear_error(cluster, tmp_path):
    backends = [{"name": "p", "host": "127.0.0.1", "port": cluster.primary.port,
                 "socket": str(tmp_path / "no-such.sock"), "role": "primary"}]
    # the unreachable primary holds writes for write_hold_timeout before the error: keep it short
    proxy = start_proxy(cluster, tmp_path / "p", backends=backends,
                        failover={"auto_failover": False, "write_hold_timeout": 0.5})
    try:
        with pytest.raises(pymysql.MySQLError) as err:  # at login, or at the first statement
            with proxy.connect(autocommit=True) as c, c.cursor() as cur:
                cur.execute("INSERT INTO app.us VALUES (2, 'b')")
        code, message = err.value.args
        assert code == 9001
        assert f"Can't connect to backend p ({tmp_path / 'no-such.sock'})" in message
    finally:
        proxy.process.stop()
