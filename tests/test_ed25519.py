"""MariaDB's ed25519 authentication on both sides of rwproxy.

Backend accounts created `IDENTIFIED VIA ed25519`: clients log in to rwproxy as usual; the
servers then ask rwproxy's backend connections to switch to client_ed25519, and rwproxy must
sign their scramble with the configured password (a private cluster, since the plugin is
installed on its servers). And clients of a user with `auth_plugin = "client_ed25519"` must
log in to rwproxy with that plugin, real client libraries included."""

from __future__ import annotations

import asyncio
import subprocess

import MySQLdb
import pymysql
import pytest

from helpers import ensure_backend_user, start_proxy
from proxy.backend.connection import BackendError
from proxy.backend.opening import connect
from proxy.config.schema import BackendConfig
from proxy.protocol.constants import PROXY_CAPABILITIES

ED_USER, ED_PASSWORD = "edu", "ed secret 1"


@pytest.fixture(scope="module")
def ed_cluster(tmp_path_factory):
    from proxy.testing.clusters import start_cluster, teardown_cluster

    c = start_cluster(tmp_path_factory.mktemp("ed25519-sandbox"), replicas=1)
    try:
        for node in c.nodes:  # plugins are per server: not replicated
            with node.connect() as conn, conn.cursor() as cur:
                cur.execute("SET sql_log_bin = 0")
                cur.execute("INSTALL SONAME 'auth_ed25519'")
        with c.primary.connect() as conn, conn.cursor() as cur:
            cur.execute(f"CREATE USER '{ED_USER}'@'%' IDENTIFIED VIA ed25519 USING PASSWORD('{ED_PASSWORD}')")
            cur.execute(f"GRANT ALL ON app.* TO '{ED_USER}'@'%'")
            cur.execute("CREATE USER 'edmon'@'%' IDENTIFIED VIA ed25519 USING PASSWORD('ed monitor')")
            cur.execute("GRANT ALL ON *.* TO 'edmon'@'%'")  # the monitor's account, through PyMySQL
            cur.execute("CREATE USER 'edstale'@'%' IDENTIFIED VIA ed25519 USING PASSWORD('changed on the server')")
            cur.execute("GRANT ALL ON app.* TO 'edstale'@'%'")
        c.wait_replicas_caught_up(30)
        yield c
    finally:
        teardown_cluster(c)


def test_reads_and_writes_as_an_ed25519_account(ed_cluster, tmp_path):
    users = [{"name": ED_USER, "password": ED_PASSWORD}, {"name": "edstale", "password": "the old password"}]
    p = start_proxy(ed_cluster, tmp_path, users=users, monitor={"user": "edmon", "password": "ed monitor"})
    try:
        args = {"host": p.host, "port": p.port, "database": "app", "autocommit": True}
        with pymysql.connect(user=ED_USER, password=ED_PASSWORD, **args) as writer, writer.cursor() as cur:
            cur.execute("CREATE TABLE ed_rows (id INT PRIMARY KEY)")
            cur.execute("INSERT INTO ed_rows VALUES (1), (2)")
        with ed_cluster.primary.connect(database="app") as direct, direct.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM ed_rows")
            assert cur.fetchone()[0] == 2  # the writes reached the primary
        ed_cluster.wait_replicas_caught_up(30)
        with pymysql.connect(user=ED_USER, password=ED_PASSWORD, **args) as reader, reader.cursor() as cur:
            cur.execute("SELECT CURRENT_USER(), @@port, (SELECT COUNT(*) FROM ed_rows)")
            # a replica answered: it is in the read pool, so the monitor's ed25519 logins work too
            assert cur.fetchone() == (f"{ED_USER}@%", ed_cluster.replicas[0].port, 2)

        # The config's password is no longer the server's: the server's refusal reaches the client.
        with pytest.raises(pymysql.err.OperationalError) as err:
            with pymysql.connect(user="edstale", password="the old password", **args) as c, c.cursor() as cur:
                cur.execute("SELECT 1")
        assert err.value.args[0] == 1045 and "edstale" in err.value.args[1]
        with pymysql.connect(user=ED_USER, password=ED_PASSWORD, **args) as c, c.cursor() as cur:
            cur.execute("SELECT 1")  # and everyone else is still served
            assert cur.fetchone() == (1,)
    finally:
        p.process.stop()


def test_every_scramble_signs_correctly(ed_cluster):
    """Many fresh backend logins, each with the server's random 32-byte scramble (some end in zero
    bytes, which must not be stripped as they are from the 20-byte ones of other plugins)."""
    server = BackendConfig(name="node1", host="127.0.0.1", port=ed_cluster.primary.port)

    async def logins(n: int) -> int:
        done = 0
        for _ in range(n):
            conn = await connect(server, ("node1", ED_USER, PROXY_CAPABILITIES, 45, "app"), PROXY_CAPABILITIES,
                                 ED_USER, ED_PASSWORD, "app", 45, 5.0)
            conn.close()
            done += 1
        with pytest.raises(BackendError) as err:
            await connect(server, ("node1", ED_USER, PROXY_CAPABILITIES, 45, "app"), PROXY_CAPABILITIES,
                          ED_USER, "wrong", "app", 45, 5.0)
        assert err.value.code == 1045
        return done

    assert asyncio.run(logins(400)) == 400


def test_clients_log_in_to_rwproxy_with_client_ed25519(cluster, tmp_path):
    ensure_backend_user(cluster, "edfront", "front pw")  # the server account uses mysql_native_password
    users = [{"name": "edfront", "password": "front pw", "auth_plugin": "client_ed25519"},
             {"name": "app", "password": "app"}]
    p = start_proxy(cluster, tmp_path, users=users)
    try:
        cli = subprocess.run(["mariadb", "-h", p.host, "-P", str(p.port), "-u", "edfront", "-pfront pw", "-N", "-e",
                              "SELECT CURRENT_USER()"], capture_output=True, text=True, timeout=30)
        assert cli.returncode == 0 and cli.stdout.strip() == "edfront@%", cli.stderr
        with pymysql.connect(host=p.host, port=p.port, user="edfront", password="front pw") as c, c.cursor() as cur:
            cur.execute("SELECT 41 + 1")
            assert cur.fetchone() == (42,)
        with MySQLdb.connect(host=p.host, port=p.port, user="edfront", password="front pw") as c:
            cur = c.cursor()
            cur.execute("SELECT 'libmariadb'")
            assert cur.fetchone() == ("libmariadb",)
        with MySQLdb.connect(host=p.host, port=p.port, user="app", password="app") as c:
            c.change_user("edfront", "front pw")  # COM_CHANGE_USER, then the same switch to ed25519
            cur = c.cursor()
            cur.execute("SELECT CURRENT_USER()")
            assert cur.fetchone() == ("edfront@%",)
        wrong = subprocess.run(["mariadb", "-h", p.host, "-P", str(p.port), "-u", "edfront", "-pnot it", "-e", "SELECT 1"],
                               capture_output=True, text=True, timeout=30)
        assert wrong.returncode != 0
        assert "ERROR 1045 (28000): Access denied for user 'edfront'@'127.0.0.1' (using password: YES)" in wrong.stderr
        with pytest.raises(pymysql.err.OperationalError) as err:
            pymysql.connect(host=p.host, port=p.port, user="edfront", password="")
        assert err.value.args[0] == 1045
    finally:
        p.process.stop()
