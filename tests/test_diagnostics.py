"""GET DIAGNOSTICS into user variables through rwproxy reads what a direct client reads.

A read that fails runs on a replica; the GET DIAGNOSTICS about it runs on that replica's
connection, where the variables it sets stay. Before, the next `SELECT @msg` (sent to the writer,
where user variables set by statements live) read NULL, and an INSERT of @msg stored NULL,
silently. frontend/diagnostics.py copies them to the writer before the next statement."""

from __future__ import annotations

import time

import pymysql

from proxy.frontend.diagnostics import variables

SEQUENCE = [
    "SET NAMES latin1",
    "SELECT * FROM `tablé_nope`",
    "GET DIAGNOSTICS CONDITION 1 @msg = MESSAGE_TEXT, @no = MYSQL_ERRNO, @'we ird' = RETURNED_SQLSTATE",
    "GET DIAGNOSTICS @num = NUMBER",  # (a second one, about the same statement)
    "SELECT COLLATION(@msg), CHARSET(@msg), HEX(@msg), @no + 0.5, COLLATION(@no), @'we ird', @num",
    "INSERT INTO diag_t VALUES (5, @msg)",
    "SELECT HEX(m) FROM diag_t WHERE id = 5",
    "SELECT 1 FROM DUAL WHERE 1 = 0",
    "GET DIAGNOSTICS @rc = ROW_COUNT, @num = NUMBER",
    "SELECT @rc, @num, @no",
]


def _run(cluster, conn, pause: float = 0.0) -> list:
    """SEQUENCE on `conn`, a session that has not written (its reads go to the replicas)."""
    cluster.primary.query("DROP TABLE IF EXISTS app.diag_t")
    cluster.primary.query("CREATE TABLE app.diag_t (id INT PRIMARY KEY, m VARCHAR(200) CHARACTER SET utf8mb4)")
    cluster.wait_replicas_caught_up(10)
    out = []
    with conn.cursor() as cur:
        for sql in SEQUENCE:
            try:
                cur.execute(sql)
                out.append(cur.fetchall())
            except pymysql.err.MySQLError as e:
                out.append(e.args)
            if sql.startswith("GET DIAGNOSTICS @num"):
                time.sleep(pause)  # (longer than idle_release: the variables tie the connection)
    return out


def test_get_diagnostics_after_a_replica_read_gives_what_the_server_gives(proxy, cluster):
    def connect(port):
        return pymysql.connect(host="127.0.0.1", port=port, user="app", password="app", database="app",
                               autocommit=True, charset="latin1")

    with connect(cluster.primary.port) as d:
        direct = _run(cluster, d)
    with connect(proxy.port) as p:
        with p.cursor() as cur:  # (the failing read below runs on a replica, as this one does)
            cur.execute("SELECT @@port")
            assert cur.fetchone()[0] in {n.port for n in cluster.replicas}
        proxied = _run(cluster, p, pause=1.5)
    assert direct[4][0][:2] == ("utf8mb3_general_ci", "utf8mb3") and direct[4][0][5:] == ("42S02", 1)  # (as meant)
    assert proxied == direct


def test_the_variables_of_a_get_diagnostics_statement():
    assert variables(b"GET DIAGNOSTICS CONDITION 1 @a = MESSAGE_TEXT, @`b c` = MYSQL_ERRNO /* @no */") == ["@a", "@`b c`"]
    assert variables(b"get current diagnostics @n = NUMBER, @n = ROW_COUNT") == ["@n"]
