"""Read/write routing against the real cluster: which server answered, and that the client
sees what a single primary would give. `SELECT @@port` in a statement shows where it ran
(the statement itself is routed as the test intends)."""

from __future__ import annotations

import time

import mysql.connector
import pymysql
import pytest

from helpers import start_proxy


@pytest.fixture
def conn(proxy):
    c = proxy.connect(autocommit=True)
    try:
        yield c
    finally:
        c.close()


def ports(cluster):
    return cluster.primary.port, {n.port for n in cluster.replicas}


def where(c, sql="SELECT @@port", args=None):
    with c.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchone()


@pytest.fixture(scope="module", autouse=True)
def table(cluster):
    with cluster.primary.connect(database="app") as c, c.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS rt (id INT AUTO_INCREMENT PRIMARY KEY, v VARCHAR(20))")
        cur.execute("INSERT INTO rt (v) VALUES ('seed')")
    cluster.wait_replicas_caught_up(30)


def wait_for_read_pool(proxy, timeout=10.0):
    """The monitor needs a moment to admit replicas after the proxy starts."""
    p, reps = ports(proxy.cluster)
    deadline = time.monotonic() + timeout
    with proxy.connect(autocommit=True) as c:  # PyMySQL's default autocommit=0 pins to the primary
        while time.monotonic() < deadline:
            if where(c)[0] in reps:
                return
            time.sleep(0.1)
    raise AssertionError("replicas never joined the read pool")


def test_plain_reads_go_to_replicas_and_spread(proxy, conn):
    wait_for_read_pool(proxy)
    p, reps = ports(proxy.cluster)
    seen = {where(conn)[0] for _ in range(40)}
    assert seen == reps, f"reads reached {seen}, replicas are {reps}"


def test_writes_go_to_the_primary(proxy, conn):
    p, _ = ports(proxy.cluster)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO rt (v) VALUES (CONCAT('w', @@port))")
        cur.execute("SELECT v FROM rt WHERE id = LAST_INSERT_ID()")
        assert cur.fetchone() == (f"w{p}",)


def test_autocommit_off_pins_reads_to_primary(proxy, conn):
    wait_for_read_pool(proxy)
    p, reps = ports(proxy.cluster)
    with conn.cursor() as cur:
        cur.execute("SET autocommit=0")
        assert where(conn)[0] == p
        cur.execute("COMMIT")
        assert where(conn)[0] == p  # still autocommit=0: a new transaction began
        cur.execute("SET autocommit=1")
    time.sleep(1.1)  # past the read-your-writes window of the COMMIT
    assert where(conn)[0] in reps


def test_transaction_pins_and_releases(proxy, conn):
    wait_for_read_pool(proxy)
    p, reps = ports(proxy.cluster)
    with conn.cursor() as cur:
        cur.execute("BEGIN")
        assert where(conn)[0] == p
        cur.execute("ROLLBACK")
    assert where(conn)[0] in reps


def test_session_variables_follow_reads_to_replicas(proxy, conn):
    wait_for_read_pool(proxy)
    _, reps = ports(proxy.cluster)
    with conn.cursor() as cur:
        cur.execute("SET SESSION sql_mode = 'PIPES_AS_CONCAT'")
        cur.execute("SET NAMES utf8mb4 COLLATE utf8mb4_unicode_ci")
    port, concat, mode, coll = where(conn, "SELECT @@port, 'a' || 'b', @@sql_mode, @@collation_connection")
    assert port in reps and concat == "ab" and mode == "PIPES_AS_CONCAT" and coll == "utf8mb4_unicode_ci"


def test_variables_set_with_autocommit_follow_reads_to_replicas(proxy):
    """Connector/J starts every connection with one SET of autocommit, sql_mode and its
    sessionVariables: the variables other than autocommit must reach replica connections too
    (they used to be left out of the replayed history with the autocommit)."""
    wait_for_read_pool(proxy)
    _, reps = ports(proxy.cluster)
    with proxy.connect(autocommit=None) as c:
        with c.cursor() as cur:
            cur.execute("set autocommit=1, sql_mode = concat(@@sql_mode,',STRICT_TRANS_TABLES'),"
                        "sql_mode='PIPES_AS_CONCAT', auto_increment_increment=2")
        for _ in range(4):  # both replicas, whichever connection serves the read
            port, concat, mode, inc = where(c, "SELECT @@port, 'a' || 'b', @@sql_mode, @@auto_increment_increment")
            assert port in reps and (concat, mode, inc) == ("ab", "PIPES_AS_CONCAT", 2)


def test_a_repeated_set_is_replayed_where_it_now_stands(cluster, tmp_path):
    """SET @v='a', SET @v='b', SET @v='a': the history keeps each SET once, at its latest
    place, so a replica connection that had run the first two must run 'a' again. It used to
    count itself up to date (Connector/J's setClientInfo read back 'ccc' for 'test\\Driver')."""
    from helpers import start_proxy
    p = start_proxy(cluster, tmp_path, proxy={"workers": 1}, pool={"multiplex": False})
    try:
        wait_for_read_pool(p)
        _, reps = ports(cluster)
        with p.connect(autocommit=True) as c:
            for value in ("a", "b", "a"):
                with c.cursor() as cur:
                    cur.execute("SET @v = %s", (value,))
                seen = {where(c, "SELECT @@port, @v") for _ in range(4)}  # both replicas' connections
                assert {port for port, _ in seen} <= reps and {v for _, v in seen} == {value}, seen
    finally:
        p.process.stop()


def test_use_database_follows_reads(proxy, conn, cluster):
    with cluster.primary.connect() as c, c.cursor() as cur:
        cur.execute("CREATE DATABASE IF NOT EXISTS app_route")
        cur.execute("GRANT ALL ON app_route.* TO 'app'@'%'")
    cluster.wait_replicas_caught_up(30)
    wait_for_read_pool(proxy)
    _, reps = ports(cluster)
    with conn.cursor() as cur:
        cur.execute("USE app_route")
    port, db = where(conn, "SELECT @@port, DATABASE()")
    assert port in reps and db == "app_route"


def test_temporary_table_pins_session(proxy, conn):
    p, _ = ports(proxy.cluster)
    with conn.cursor() as cur:
        cur.execute("CREATE TEMPORARY TABLE tt (x INT)")
        cur.execute("INSERT INTO tt VALUES (7)")
    time.sleep(1.1)
    assert where(conn, "SELECT @@port, x FROM tt") == (p, 7)
    assert where(conn)[0] == p  # the session stays on the primary while the table exists


def test_get_lock_pins_until_released(proxy, conn):
    wait_for_read_pool(proxy)
    p, reps = ports(proxy.cluster)
    assert where(conn, "SELECT GET_LOCK('rt_lock', 5)") == (1,)
    assert where(conn)[0] == p
    assert where(conn, "SELECT RELEASE_LOCK('rt_lock')") == (1,)
    assert where(conn)[0] in reps


def test_user_variables_read_where_they_were_set(proxy, conn):
    """A variable set to a literal is in the SET history, replayed on every connection the session
    uses (a replica's included); one set by an expression lives only on the primary connection."""
    wait_for_read_pool(proxy)
    p, reps = ports(proxy.cluster)
    with conn.cursor() as cur:
        cur.execute("SET @mine = 42")
    assert where(conn, "SELECT @mine, @@port")[0] == 42
    assert where(conn)[0] in reps  # statements not touching user variables still use replicas
    with conn.cursor() as cur:
        cur.execute("SET @computed := (SELECT 40 + 3)")
    assert where(conn, "SELECT @computed, @mine, @@port") == (43, 42, p)


def test_last_insert_id_and_found_rows_use_the_same_connection(proxy, conn):
    wait_for_read_pool(proxy)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO rt (v) VALUES ('lid')")
        expected = cur.lastrowid
        time.sleep(1.1)  # outside the read-your-writes window: only the connection binding helps
        cur.execute("INSERT INTO rt (v) VALUES ('lid2')")
        cur.execute("SELECT LAST_INSERT_ID()")
        assert cur.fetchone() == (expected + 1,)
        cur.execute("SELECT SQL_CALC_FOUND_ROWS id FROM rt LIMIT 1")
        cur.execute("SELECT FOUND_ROWS()")
        assert cur.fetchone()[0] >= 2


def test_select_for_update_goes_to_primary(proxy, conn):
    wait_for_read_pool(proxy)
    p, _ = ports(proxy.cluster)
    assert where(conn, "SELECT @@port, id FROM rt WHERE id = 1 FOR UPDATE")[0] == p
    assert where(conn, "SELECT @@port, id FROM rt WHERE id = 1 /*!50000 FOR UPDATE */")[0] == p
    assert where(conn, "SELECT @@port, id FROM rt WHERE id = 1 LOCK IN SHARE MODE")[0] == p
    with conn.cursor() as cur:
        cur.execute("BEGIN")
        assert where(conn, "SELECT @@port, id FROM rt WHERE id = 1 FOR UPDATE")[0] == p
        cur.execute("COMMIT")


def test_read_only_transaction_runs_on_one_replica(proxy, conn):
    """A write inside START TRANSACTION READ ONLY gets the server's ERROR 1792, and the transaction
    goes on where it runs. rwproxy took the refusal (an ERR, which carries no status) for the end of
    the transaction: the next write ran on the primary, in autocommit, and stayed (a differential
    fuzzing run's finding)."""
    wait_for_read_pool(proxy)
    _, reps = ports(proxy.cluster)
    with conn.cursor() as cur:
        cur.execute("START TRANSACTION READ ONLY")
        first = where(conn)[0]
        assert first in reps
        assert all(where(conn)[0] == first for _ in range(5))
        for sql in ("INSERT INTO rt (v) VALUES ('nope')", "CREATE TEMPORARY TABLE ro_tmp (a INT)",
                    "SELECT id FROM rt WHERE id = 1 FOR UPDATE", "INSERT INTO rt (v) VALUES ('nope')"):
            with pytest.raises(pymysql.err.MySQLError) as e:
                cur.execute(sql)
            assert e.value.args[0] == 1792, (sql, e.value.args)  # as a primary answers, not a replica's 1290
            assert where(conn, "SELECT @@port, @@in_transaction") == (first, 1)
        cur.execute("SAVEPOINT s1")  # what the server lets run, runs
        cur.execute("SELECT id FROM rt WHERE id = 1 LOCK IN SHARE MODE")
        cur.execute("COMMIT")
        assert where(conn, "/* rwproxy:primary */ SELECT COUNT(*) FROM rt WHERE v = 'nope'") == (0,)


def test_statements_under_no_backslash_escapes_are_lexed_as_the_server_lexes_them(proxy, conn):
    """Under sql_mode NO_BACKSLASH_ESCAPES a backslash ends nothing: 'a\\' is a whole string. Lexed
    with backslash escapes, `SELECT 'a\\', @v := 5 -- '` was one string and a comment: a plain read,
    sent to a replica, where the variable was set, and the next SELECT @v read NULL on the primary
    (a probe's finding; a sequence advanced on a replica the same way)."""
    wait_for_read_pool(proxy)
    p, reps = ports(proxy.cluster)
    with conn.cursor() as cur:
        cur.execute("SET SESSION sql_mode = CONCAT(@@sql_mode, ',NO_BACKSLASH_ESCAPES')")
        cur.execute("SELECT 'a\\', @v := 5 -- '")
        assert cur.fetchall() == (("a\\", 5),)
        assert where(conn, "SELECT @v") == (5,)
        assert where(conn, "SELECT 'a\\', @@port, GET_LOCK('nbe_lock', 0) -- '") == ("a\\", p, 1)
        assert where(conn, "SELECT 'C:\\dir\\', @@port")[1] == p  # (the session holds a lock now)
        cur.execute("SELECT RELEASE_LOCK('nbe_lock')")
        cur.execute("SET SESSION sql_mode = DEFAULT")
    with proxy.connect(autocommit=True) as other:  # (a session without the mode: reads go to replicas)
        assert where(other, "SELECT 'a\\\\', @@port -- '")[1] in reps


def test_hints_force_the_route(proxy, conn):
    wait_for_read_pool(proxy)
    p, reps = ports(proxy.cluster)
    assert where(conn, "/* rwproxy:primary */ SELECT @@port")[0] == p
    with conn.cursor() as cur:
        cur.execute("INSERT INTO rt (v) VALUES ('hint')")  # would keep reads on the primary...
    assert where(conn, "/* rwproxy:replica */ SELECT @@port")[0] in reps  # ...but the hint wins


def test_prepared_statements_route_by_class(proxy):
    wait_for_read_pool(proxy)
    p, reps = ports(proxy.cluster)
    c = mysql.connector.connect(host=proxy.host, port=proxy.port, user="app", password="app", database="app",
                                use_pure=True, ssl_disabled=True, autocommit=True)
    try:
        read = c.cursor(prepared=True)
        read.execute("SELECT @@port, ? + 1", (1,))
        assert read.fetchall()[0] in [(r, 2) for r in reps]
        write = c.cursor(prepared=True)
        write.execute("INSERT INTO rt (v) VALUES (CONCAT(?, @@port))", ("ps",))
        cur = c.cursor()
        cur.execute("SELECT v FROM rt WHERE id = LAST_INSERT_ID()")
        assert cur.fetchall() == [(f"ps{p}",)]
        time.sleep(1.1)
        for i in range(6):  # executed on both replicas: prepared lazily on each
            read.execute("SELECT @@port, ? + 1", (i,))
            port, val = read.fetchall()[0]
            assert port in reps and val == i + 1
    finally:
        c.close()


def _delayed_cluster(cluster_factory, delay):
    cl = cluster_factory(replicas=1)
    rep = cl.replicas[0]
    with rep.connect() as c, c.cursor() as cur:
        cur.execute("STOP SLAVE")
        cur.execute(f"CHANGE MASTER TO MASTER_DELAY={delay}, MASTER_HEARTBEAT_PERIOD=0.2")
        cur.execute("START SLAVE")
    with cl.primary.connect(database="app") as c, c.cursor() as cur:
        cur.execute("CREATE TABLE ryw (id INT PRIMARY KEY)")
    time.sleep(delay + 1)
    return cl


@pytest.mark.parametrize("mode", ["session", "gtid", "none"])
def test_read_your_writes_with_a_delayed_replica(cluster_factory, tmp_path, mode):
    cl = _delayed_cluster(cluster_factory, 5)
    # a lag threshold above the delay keeps the delayed replica in the read pool
    p = start_proxy(cl, tmp_path, proxy={"workers": 1},
                    routing={"read_your_writes": mode, "max_replica_lag": 30.0, "gtid_wait_timeout": 0.5})
    try:
        wait_for_read_pool(p, timeout=20)
        with p.connect(autocommit=True) as c, c.cursor() as cur:
            cur.execute("INSERT INTO ryw VALUES (1)")
            cur.execute("SELECT @@port, COUNT(*) FROM ryw")
            port, n = cur.fetchone()
        if mode == "none":
            assert (port, n) == (cl.replicas[0].port, 0)  # a stale read, as configured
            return
        assert n == 1, f"{mode}: the session did not read its own write (answered by {port})"
        # The client's writes stay its own across COM_RESET_CONNECTION and COM_CHANGE_USER, which
        # reset the session on the server but do not hide what it wrote.
        c = mysql.connector.connect(host="127.0.0.1", port=p.port, user="app", password="app", database="app",
                                    autocommit=True, use_pure=True)
        try:
            cur = c.cursor()
            cur.execute("INSERT INTO ryw VALUES (2)")
            cur.close()
            c.cmd_reset_connection()
            cur = c.cursor()
            cur.execute("SELECT COUNT(*) FROM ryw")
            assert cur.fetchall() == [(2,)], f"{mode}: a write hidden by COM_RESET_CONNECTION"
            cur.execute("INSERT INTO ryw VALUES (3)")
            cur.close()
            c.cmd_change_user(username="app", password="app", database="app")
            cur = c.cursor()
            cur.execute("SELECT COUNT(*) FROM ryw")
            assert cur.fetchall() == [(3,)], f"{mode}: a write hidden by COM_CHANGE_USER"
        finally:
            c.close()
    finally:
        p.process.stop()


def test_session_read_your_writes_past_the_window_waits_until_a_replica_is_known_to_hold_the_write(
        cluster_factory, tmp_path):
    """The window is a guess: a replica whose lag jumps past max_replica_lag serves reads until a
    check takes it out of the pool (a Django suite found it: a session read rows its TRUNCATE had
    removed). Past the window a session that wrote reads from a replica only once the monitor
    has proven the replica holds the write (cluster/progress.py), from any worker."""
    cl = _delayed_cluster(cluster_factory, 3)
    # the delayed replica stays in the read pool (lag 3 s < 30) and the window is short
    p = start_proxy(cl, tmp_path, proxy={"workers": 2},
                    routing={"read_your_writes": "session", "read_your_writes_window": 0.2, "max_replica_lag": 30.0})
    try:
        wait_for_read_pool(p, timeout=20)
        rep = cl.replicas[0].port
        with p.connect(autocommit=True) as c, c.cursor() as cur:
            cur.execute("SELECT @@port, COUNT(*) FROM ryw")
            assert cur.fetchone() == (rep, 0)  # reads go to the replica
            cur.execute("INSERT INTO ryw VALUES (1)")
            t0 = time.monotonic()
            time.sleep(0.5)  # past the window; the replica applies the write 3 s after it
            cur.execute("SELECT @@port, COUNT(*) FROM ryw")
            assert cur.fetchone() == (cl.primary.port, 1), "a read past the window saw the replica without the write"
            seen = None
            while time.monotonic() - t0 < 20:  # once proven, reads go back to the replica
                cur.execute("SELECT @@port, COUNT(*) FROM ryw")
                port, n = cur.fetchone()
                assert n == 1, f"a stale read from {port}"
                if port == rep:
                    seen = time.monotonic() - t0
                    break
                time.sleep(0.1)
            assert seen is not None and seen >= 3.0, f"reads did not come back to the replica ({seen})"
        # another session (on either worker) that never wrote reads from the replica at once
        with p.connect(autocommit=True) as c2, c2.cursor() as cur:
            cur.execute("SELECT @@port")
            assert cur.fetchone() == (rep,)
    finally:
        p.process.stop()


def test_rules_reject_and_route(cluster, tmp_path):
    rules = [
        {"match": r"^\s*DELETE\s+FROM\s+audit", "route": "reject", "error_code": 1142, "error_message": "deleting audit rows is not allowed"},
        {"match": r"FROM\s+rt\b", "route": "primary"},
    ]
    p = start_proxy(cluster, tmp_path, proxy={"workers": 1}, routing={"rules": rules})
    try:
        wait_for_read_pool(p)
        with p.connect(autocommit=True) as c, c.cursor() as cur:
            with pytest.raises(pymysql.err.MySQLError) as e:
                cur.execute("DELETE FROM audit WHERE 1")
            assert e.value.args == (1142, "deleting audit rows is not allowed")
            assert where(c, "SELECT @@port, COUNT(*) FROM rt")[0] == cluster.primary.port
            assert where(c)[0] in {n.port for n in cluster.replicas}
    finally:
        p.process.stop()


def test_user_default_route_replica(cluster, tmp_path):
    users = [{"name": "app", "password": "app", "default_route": "replica", "read_your_writes": "none"}]
    p = start_proxy(cluster, tmp_path, proxy={"workers": 1}, users=users)
    try:
        wait_for_read_pool(p)
        with p.connect(autocommit=True) as c, c.cursor() as cur:
            cur.execute("INSERT INTO rt (v) VALUES ('analytics')")
            assert where(c)[0] in {n.port for n in cluster.replicas}
    finally:
        p.process.stop()


def test_no_replica_reads_fall_back_or_error(cluster_factory, tmp_path):
    cl = cluster_factory(replicas=0)
    ok = start_proxy(cl, tmp_path / "fallback", proxy={"workers": 1})
    strict = start_proxy(cl, tmp_path / "strict", proxy={"workers": 1}, routing={"reads_on_primary_when_no_replica": False})
    try:
        with ok.connect(autocommit=True) as c:
            assert where(c)[0] == cl.primary.port
        with strict.connect(autocommit=True) as c, c.cursor() as cur:
            with pytest.raises(pymysql.err.MySQLError) as e:
                cur.execute("SELECT 1")
            assert e.value.args[0] == 1105 and "no replica is available" in e.value.args[1]
            cur.execute("CREATE TABLE IF NOT EXISTS rt2 (id INT)")  # writes still work
    finally:
        ok.process.stop()
        strict.process.stop()


def test_prepared_statements_bounded_per_backend_connection(cluster, tmp_path):
    """More prepared statements than max_prepared_per_connection: the oldest are closed on the
    backend and prepared again when used, so every statement keeps working."""
    p = start_proxy(cluster, tmp_path, proxy={"workers": 1}, routing={"max_prepared_per_connection": 3})
    try:
        c = mysql.connector.connect(host=p.host, port=p.port, user="app", password="app", database="app",
                                    use_pure=True, ssl_disabled=True, autocommit=True)
        try:
            curs = []
            for i in range(8):
                cur = c.cursor(prepared=True)
                cur.execute(f"SELECT CONNECTION_ID(), {i} + ?", (1,))  # connection-bound: the primary
                curs.append(cur)
                cur.fetchall()
            conn_id = None
            for _ in range(2):
                for i, cur in enumerate(curs):
                    cur.execute(f"SELECT CONNECTION_ID(), {i} + ?", (1,))
                    cid, v = cur.fetchall()[0]
                    assert v == i + 1
                    conn_id = conn_id or cid
            with cluster.primary.connect() as root, root.cursor() as rc:
                rc.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = %s", (conn_id,))
                assert rc.fetchone() == (1,)
                rc.execute("SHOW GLOBAL STATUS LIKE 'Prepared_stmt_count'")
                open_total = int(rc.fetchone()[1])
            assert open_total <= 3 + 2, f"{open_total} statements open on the primary (bound 3 per connection)"
        finally:
            c.close()
    finally:
        p.process.stop()
