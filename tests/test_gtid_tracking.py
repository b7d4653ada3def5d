"""Read-your-writes in gtid mode learns each write's GTID from its own OK packet (session
tracking, protocol/tracking.py), against the real cluster: no SELECT @@last_gtid per write, the
bytes a client without session tracking receives are the ones a server would send it, a
client with tracking sees the GTID, and every client reads its own writes."""

from __future__ import annotations

import json
import subprocess
import sys

import pymysql
import pytest

from proxy.protocol.constants import CLIENT_MULTI_STATEMENTS, CLIENT_SESSION_TRACK, SERVER_SESSION_STATE_CHANGED
from proxy.protocol.packets import parse_ok
from proxy.protocol.tracking import last_gtid
from proxy.testing.rawclient import RawClient

from helpers import start_proxy


@pytest.fixture(scope="module")
def gtid_proxy(cluster, tmp_path_factory):
    with cluster.primary.connect(database="app") as c, c.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS gt (id INT PRIMARY KEY, v INT)")
        cur.execute("REPLACE INTO gt VALUES (1, 0), (2, 0)")
    cluster.wait_replicas_caught_up(30)
    p = start_proxy(cluster, tmp_path_factory.mktemp("gtid"), proxy={"workers": 1},
                    routing={"read_your_writes": "gtid"})
    try:
        yield p
    finally:
        p.process.stop()


def counters(p) -> tuple[int, int]:
    r = subprocess.run([sys.executable, "-m", "proxy", "status", "--json", "--config", p.process.config_path],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    return st["gtid_from_ok"], st["gtid_fetched"]


def test_a_client_without_tracking_gets_the_servers_ok_and_no_extra_round_trip(gtid_proxy, cluster):
    before = counters(gtid_proxy)
    drop = CLIENT_SESSION_TRACK | CLIENT_MULTI_STATEMENTS
    direct = RawClient("127.0.0.1", cluster.primary.port, drop_caps=drop)
    via = RawClient(gtid_proxy.host, gtid_proxy.port, drop_caps=drop)
    try:
        for i in range(3):
            sql = b"UPDATE gt SET v = v + 1 WHERE id IN (1, 2)"
            want = parse_ok(direct.command(b"\x03" + sql))
            got_payload = via.command(b"\x03" + sql)
            got = parse_ok(got_payload)
            assert not got.status & SERVER_SESSION_STATE_CHANGED
            assert (got.affected_rows, got.info, got.status, got.warnings) == (
                want.affected_rows, want.info, want.status, want.warnings)
            assert got.info.endswith(b"Rows matched: 2  Changed: 2  Warnings: 0")
        via.send(b"\x03SELECT v FROM gt WHERE id = 1")
        rows = via.response(0)
        assert rows[2][1:] == b"6"  # both clients' 3 updates each: read your writes
    finally:
        direct.close()
        via.close()
    after = counters(gtid_proxy)
    assert after[0] - before[0] == 3 and after[1] == before[1]


def test_a_client_with_tracking_sees_the_gtid(gtid_proxy):
    via = RawClient(gtid_proxy.host, gtid_proxy.port)
    try:
        payload = via.command(b"\x03UPDATE gt SET v = v + 1 WHERE id = 2")
        assert last_gtid(payload).count("-") == 2
    finally:
        via.close()


@pytest.mark.parametrize("module", ["pymysql", "MySQLdb", "mysql.connector"])
def test_every_client_reads_its_own_writes(gtid_proxy, module):
    import importlib

    mod = importlib.import_module(module)
    kw = dict(host=gtid_proxy.host, port=gtid_proxy.port, user="app", password="app", database="app")
    if module == "MySQLdb":
        kw["db"] = kw.pop("database")
    c = mod.connect(**kw)
    try:
        c.autocommit(True) if module != "mysql.connector" else setattr(c, "autocommit", True)
        cur = c.cursor()
        for i in range(20):
            cur.execute("UPDATE gt SET v = %s WHERE id = 1", (1000 + i,))
            cur.execute("SELECT v FROM gt WHERE id = 1")
            assert cur.fetchone()[0] == 1000 + i
        cur.close()
    finally:
        c.close()


def test_results_on_a_tracked_connection_arrive_whole(gtid_proxy, cluster):
    """The writer connection holds back each response's last bytes (to strip the final OK's
    session state): results of every size on it arrive byte for byte as the server sends them."""
    from proxy.protocol.scan import Scanner

    drop = CLIENT_SESSION_TRACK | CLIENT_MULTI_STATEMENTS
    direct = RawClient("127.0.0.1", cluster.primary.port, drop_caps=drop)
    via = RawClient(gtid_proxy.host, gtid_proxy.port, drop_caps=drop)
    try:
        via.command(b"\x03BEGIN")  # (in a transaction: on the writer connection)
        direct.command(b"\x03BEGIN")
        for n in (0, 10, 1000, 1023, 1024, 1025, 70000, 300000):
            sql = b"SELECT REPEAT('x', %d) AS a, 7 AS b" % n
            want, got = bytearray(), bytearray()
            direct.query_raw(sql, Scanner(True), want)
            via.query_raw(sql, Scanner(True), got)
            assert got == want, n
        assert parse_ok(via.command(b"\x03COMMIT")).status & SERVER_SESSION_STATE_CHANGED == 0
    finally:
        direct.close()
        via.close()
