"""The monitor's own client (proxy/cluster/monitor/wire.py) against the real servers: values and
NULLs as the checks read them, multi-statements, column names, errors with the server's codes
(read by the same helpers as PyMySQL's), TCP and Unix sockets, and a hostile backend name in
the heartbeat's SQL."""

from __future__ import annotations

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
        "monitor": {"user": "rwproxy", "password": "rwproxy"},
    }, source="test")


def open_conn(cluster, node, password="rwproxy"):
    cfg = config_for(cluster)
    b = next(x for x in cfg.backends if x.name == node.name)
    return wire.connect(cfg, b, "rwproxy", password, 2.0, 2.0)


def test_values_nulls_and_several_statements(cluster):
    c = open_conn(cluster, cluster.primary)
    try:
        assert c.get_server_info().lower().find("mariadb") >= 0
        assert c.query("SELECT 1, NULL, 'é', @@server_id") == [("1", None, "é", str(cluster.primary.server_id))]
        assert c.query("SELECT 1 FROM DUAL WHERE 1 = 0") == []
        assert c.query("DO 1") == []
        # the last result of a multi-statement, after a statement without one
        assert c.query("SET @x = 5; SELECT @x + 1") == [("6",)]
        big = c.query("SELECT REPEAT('a', 70000)")[0][0]
        assert big == "a" * 70000
    finally:
        c.close()


def test_column_names_of_show_all_slaves_status(cluster):
    c = open_conn(cluster, cluster.replicas[0])
    try:
        rows = c.query_dicts("SHOW ALL SLAVES STATUS")
        assert rows and rows[0]["Slave_SQL_Running"] == "Yes"
        assert int(rows[0]["Master_Port"]) == cluster.primary.port
    finally:
        c.close()


def test_errors_carry_the_servers_code(cluster):
    c = open_conn(cluster, cluster.primary)
    try:
        with pytest.raises(pymysql.MySQLError) as e:
            c.query("SELECT * FROM no_such_schema.t")
        assert error_code(e.value) == 1146 and "1146" in describe(e.value)
        assert c.query("SELECT 2") == [("2",)]  # the connection goes on after an error
        with pytest.raises(pymysql.MySQLError) as e:
            c.query("SELECT 1; SELECT * FROM no_such_schema.t")
        assert error_code(e.value) == 1146
        assert c.query("SELECT 3") == [("3",)]
    finally:
        c.close()
    with pytest.raises(pymysql.MySQLError) as e:
        open_conn(cluster, cluster.primary, password="wrong")
    assert error_code(e.value) == 1045


def test_unix_socket_and_unreachable_server(cluster):
    node = cluster.primary
    cfg = config_for(cluster)
    b = next(x for x in cfg.backends if x.name == node.name)
    c = wire.connect(cfg, dataclasses.replace(b, socket=str(node.socket)), "rwproxy", "rwproxy", 2.0, 2.0)
    try:
        assert c.query("SELECT @@port") == [(str(node.port),)]
    finally:
        c.close()
    with pytest.raises(pymysql.MySQLError) as e:
        wire.connect(cfg, dataclasses.replace(b, port=1), "rwproxy", "rwproxy", 1.0, 1.0)
    assert error_code(e.value) == 2003


def test_a_hostile_backend_name_is_quoted(cluster):
    c = open_conn(cluster, cluster.primary)
    try:
        name = "x'); DROP TABLE app.t; -- \\ \x00"
        assert c.query(f"SELECT {wire.quote(name)}") == [(name,)]
    finally:
        c.close()
