"""Master-master: writes spread over both masters, converge, and survive a master's death."""

from __future__ import annotations

import signal
import time

import pytest

from helpers import start_proxy, wait_until


@pytest.fixture
def mm(cluster_factory, tmp_path):
    cl = cluster_factory(replicas=1, topology="master-master")
    with cl.primary.connect(database="app") as c, c.cursor() as cur:
        cur.execute("CREATE TABLE mmw (id INT AUTO_INCREMENT PRIMARY KEY, sid INT, sess INT)")
    cl.wait_replicas_caught_up(30)
    yield cl


def _count_by_server(node) -> dict:
    with node.connect(database="app") as c, c.cursor() as cur:
        cur.execute("SELECT sid, COUNT(*) FROM mmw GROUP BY sid")
        return dict(cur.fetchall())


def test_sessions_spread_writes_and_masters_converge(mm, tmp_path):
    p = start_proxy(mm, tmp_path, proxy={"workers": 1}, cluster={"topology": "master-master"})
    try:
        m1, m2 = mm.masters
        time.sleep(1.0)  # the monitor has seen both masters
        sessions = [p.connect(autocommit=True) for _ in range(6)]
        for i, c in enumerate(sessions):
            with c.cursor() as cur:
                for _ in range(5):
                    cur.execute("INSERT INTO mmw (sid, sess) VALUES (@@server_id, %s)", (i,))
                cur.execute("SELECT DISTINCT sid FROM mmw WHERE sess = %s", (i,))
                assert len(cur.fetchall()) == 1, "a session's writes stay on one master"
        mm.wait_replicas_caught_up(30)
        assert wait_until(lambda: _count_by_server(m1) == _count_by_server(m2) == {m1.server_id: 15, m2.server_id: 15}, 15), \
            (_count_by_server(m1), _count_by_server(m2))
        for c in sessions:
            c.close()
    finally:
        p.process.stop()


def test_per_transaction_spreading(mm, tmp_path):
    p = start_proxy(mm, tmp_path, proxy={"workers": 1},
                    cluster={"topology": "master-master", "write_spread": "transaction"})
    try:
        time.sleep(1.0)
        with p.connect(autocommit=True) as c, c.cursor() as cur:
            for _ in range(6):
                cur.execute("BEGIN")
                cur.execute("INSERT INTO mmw (sid, sess) VALUES (@@server_id, 100)")
                cur.execute("INSERT INTO mmw (sid, sess) VALUES (@@server_id, 100)")
                cur.execute("COMMIT")
            cur.execute("/* rwproxy:primary */ SELECT sid, COUNT(*) FROM mmw WHERE sess = 100 GROUP BY sid")
        time.sleep(0.5)
        rows = _count_by_server(mm.masters[0])
        assert set(rows) == {m.server_id for m in mm.masters}  # transactions went to both masters
        assert all(n % 2 == 0 for n in rows.values())  # each transaction stayed on one master
    finally:
        p.process.stop()


def test_per_transaction_spreading_with_gtid_read_your_writes(mm, tmp_path):
    """After a write in gtid mode the session learns the write's GTID before the next statement;
    the next transaction must still be free to go to another master (issue 19's known defect:
    that step skipped the rest of the statement's completion, so the writer never changed)."""
    p = start_proxy(mm, tmp_path, proxy={"workers": 1}, routing={"read_your_writes": "gtid"},
                    cluster={"topology": "master-master", "write_spread": "transaction"})
    try:
        time.sleep(1.0)
        with p.connect(autocommit=True) as c, c.cursor() as cur:
            for _ in range(6):
                cur.execute("INSERT INTO mmw (sid, sess) VALUES (@@server_id, 400)")
        mm.wait_replicas_caught_up(30)
        rows = _count_by_server(mm.masters[0])
        with mm.masters[0].connect(database="app") as c, c.cursor() as cur:
            cur.execute("SELECT sid, COUNT(*) FROM mmw WHERE sess = 400 GROUP BY sid")
            spread = dict(cur.fetchall())
        assert set(spread) == {m.server_id for m in mm.masters}, (spread, rows)
    finally:
        p.process.stop()


def test_master_death_moves_writes_to_the_survivor(mm, tmp_path):
    p = start_proxy(mm, tmp_path, proxy={"workers": 1}, cluster={"topology": "master-master"})
    try:
        m1, m2 = mm.masters
        time.sleep(1.0)
        sessions = [p.connect(autocommit=True) for _ in range(4)]
        for i, c in enumerate(sessions):
            with c.cursor() as cur:
                cur.execute("INSERT INTO mmw (sid, sess) VALUES (@@server_id, %s)", (200 + i,))
        m2.kill(signal.SIGKILL)
        for i, c in enumerate(sessions):  # every session keeps writing, without an error; no promotion step
            with c.cursor() as cur:
                cur.execute("INSERT INTO mmw (sid, sess) VALUES (@@server_id, %s)", (300 + i,))
        with m1.connect(database="app") as c, c.cursor() as cur:
            cur.execute("SELECT DISTINCT sid FROM mmw WHERE sess >= 300")
            assert cur.fetchall() == ((m1.server_id,),)
        for c in sessions:
            c.close()
    finally:
        p.process.stop()
