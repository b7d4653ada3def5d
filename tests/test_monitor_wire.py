"""The monitor's own client (proxy/cluster/monitor/wire.py) against the real servers: values and
NULLs as the checks read them, multi-statements, column names, errors with the server's codes
(read by the same helpers as PyMySQL's), TCP and Unix sockets, a timeout and a killed connection
(2013, and the client says so instead of hanging), and a hostile backend name in the heartbeat's
SQL."""

from __future__ import annotations

import asyncio
import dataclasses

import pymysql
import pytest

from proxy.cluster.monitor import wire
from proxy.cluster.sqlerrors import describe, error_code
from proxy.config.load import build_config


def config_for(cluster, **backend):
    return build_config({
        "proxy": {"listen": "127.0.0.1:1"},
        "backends": [{"name": n.name, "host": "127.0.0.1", "port": n.port, **backend} for n in cluster.nodes],
        "users": [{"name": "app", "password": "app"}],
        "monitor": {"user": "rwproxy", "password": cluster.password("rwproxy")},
    }, source="test")


async def open_conn(cluster, node, password=None, read_timeout=2.0):
    cfg = config_for(cluster)
    b = next(x for x in cfg.backends if x.name == node.name)
    return await wire.connect(cfg, b, "rwproxy", password or cluster.password("rwproxy"), 2.0, read_timeout)


def test_values_nulls_and_several_statements(cluster):
    async def body():
        c = await open_conn(cluster, cluster.primary)
        try:
            assert c.get_server_info().lower().find("mariadb") >= 0
            assert await c.query("SELECT 1, NULL, 'é', @@server_id") == [("1", None, "é", str(cluster.primary.server_id))]
            assert await c.query("SELECT 1 FROM DUAL WHERE 1 = 0") == []
            assert await c.query("DO 1") == []
            # the last result of a multi-statement, after a statement without one
            assert await c.query("SET @x = 5; SELECT @x + 1") == [("6",)]
            big = (await c.query("SELECT REPEAT('a', 70000)"))[0][0]
            assert big == "a" * 70000
        finally:
            c.close()
    asyncio.run(body())


def test_column_names_of_show_all_slaves_status(cluster):
    async def body():
        c = await open_conn(cluster, cluster.replicas[0])
        try:
            rows = await c.query_dicts("SHOW ALL SLAVES STATUS")
            assert rows and rows[0]["Slave_SQL_Running"] == "Yes"
            assert int(rows[0]["Master_Port"]) == cluster.primary.port
        finally:
            c.close()
    asyncio.run(body())


def test_errors_carry_the_servers_code(cluster):
    async def body():
        c = await open_conn(cluster, cluster.primary)
        try:
            with pytest.raises(pymysql.MySQLError) as e:
                await c.query("SELECT * FROM no_such_schema.t")
            assert error_code(e.value) == 1146 and "1146" in describe(e.value)
            assert await c.query("SELECT 2") == [("2",)]  # the connection goes on after an error
            with pytest.raises(pymysql.MySQLError) as e:
                await c.query("SELECT 1; SELECT * FROM no_such_schema.t")
            assert error_code(e.value) == 1146
            assert await c.query("SELECT 3") == [("3",)]
        finally:
            c.close()
        with pytest.raises(pymysql.MySQLError) as e:
            await open_conn(cluster, cluster.primary, password="wrong")
        assert error_code(e.value) == 1045
    asyncio.run(body())


def test_unix_socket_and_unreachable_server(cluster):
    node = cluster.primary
    cfg = config_for(cluster)
    b = next(x for x in cfg.backends if x.name == node.name)

    async def body():
        c = await wire.connect(cfg, dataclasses.replace(b, socket=str(node.socket)), "rwproxy",
                               cluster.password("rwproxy"), 2.0, 2.0)
        try:
            assert await c.query("SELECT @@port") == [(str(node.port),)]
        finally:
            c.close()
        with pytest.raises(pymysql.MySQLError) as e:
            await wire.connect(cfg, dataclasses.replace(b, port=1), "rwproxy", cluster.password("rwproxy"), 1.0, 1.0)
        assert error_code(e.value) == 2003
    asyncio.run(body())


def test_a_slow_answer_times_out_and_a_killed_connection_says_so(cluster):
    async def body():
        c = await open_conn(cluster, cluster.primary, read_timeout=0.3)
        try:
            with pytest.raises(pymysql.MySQLError) as e:
                await c.query("SELECT SLEEP(2)")
            assert error_code(e.value) == 2013 and "timed out" in describe(e.value)
        finally:
            c.close()
        c = await open_conn(cluster, cluster.primary)
        killer = await open_conn(cluster, cluster.primary)
        try:
            cid = (await c.query("SELECT CONNECTION_ID()"))[0][0]
            await killer.query(f"KILL {int(cid)}")
            with pytest.raises(pymysql.MySQLError) as e:
                for _ in range(50):  # the kill lands asynchronously; each query either answers or fails
                    await c.query("SELECT 1")
                    await asyncio.sleep(0.02)
            assert error_code(e.value) in (2013, 1927)  # lost, or "Connection was killed"
        finally:
            c.close()
            killer.close()
    asyncio.run(body())


def test_a_hostile_backend_name_is_quoted(cluster):
    async def body():
        c = await open_conn(cluster, cluster.primary)
        try:
            name = "x'); DROP TABLE app.t; -- \\ \x00"
            assert await c.query(f"SELECT {wire.quote(name)}") == [(name,)]
        finally:
            c.close()
    asyncio.run(body())
