"""Several rwproxy instances, one cluster, coordinated through a real 3-member etcd on loopback
(issue 24): exactly one instance fails over, every instance follows its decision, a paused
leader cannot act when it wakes, and without an etcd quorum nobody promotes."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import pymysql
import pytest

from helpers import failover_section, start_proxy, wait_until
from proxy.cluster import gtid
from proxy.coord.etcd import Etcd
from proxy.runtime.launcher import free_port
from proxy.sandbox.etcd import EtcdCluster
from proxy.sandbox.fleet import coordination_section, haproxy_binary, haproxy_config
from proxy.testing.loadgen import Load, insert_numbered

TTL = 3  # s: short, so a paused leader is replaced within the test's patience


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    c = EtcdCluster.create(tmp_path_factory.mktemp("etcd"), 3, base_port=25379)
    c.start()
    try:
        yield c
    finally:
        c.stop()


class Fleet:
    """Three rwproxy instances of one coordinated cluster and HAProxy in front of them."""

    def __init__(self, cl, etcd, tmp_path, n=3):
        self.cl, self.name = cl, "t" + uuid.uuid4().hex[:8]  # a key prefix of its own per test
        self.proxies = []
        self.hp = None
        try:
            taken: set[int] = set()

            def port() -> int:
                while (p := free_port()) in taken:
                    pass
                taken.add(p)
                return p

            for i in range(1, n + 1):
                mport = port()
                self.proxies.append(start_proxy(cl, tmp_path / f"p{i}", proxy={"workers": 1, "listen": f"127.0.0.1:{port()}"}, failover=failover_section(cl),
                    metrics={"listen": f"127.0.0.1:{mport}"},
                    cluster=coordination_section(etcd.endpoints, f"p{i}", name=self.name, lease_ttl=TTL)))
                self.proxies[-1].metrics_port = mport
            self.front = port()
            cfg = tmp_path / "haproxy.cfg"
            cfg.write_text(haproxy_config(self.front, [(f"p{i + 1}", p.port, p.metrics_port)
                                                       for i, p in enumerate(self.proxies)]))
            self.hp_log = open(tmp_path / "haproxy.log", "wb")
            self.hp = subprocess.Popen([haproxy_binary(), "-db", "-f", str(cfg)], stdout=self.hp_log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        except BaseException:
            self.stop()
            raise

    def stop(self):
        for p in self.proxies:
            p.process.proc.send_signal(signal.SIGCONT) if p.process.proc.poll() is None else None
            p.process.stop()
        if self.hp is not None:
            self.hp.terminate()
            try:
                self.hp.wait(10)
            except subprocess.TimeoutExpired:
                self.hp.kill()
                self.hp.wait(5)

    def status(self, p) -> dict:
        r = subprocess.run([sys.executable, "-m", "proxy", "status", "--json", "--config", p.process.config_path],
                           capture_output=True, text=True, timeout=20)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def primary_of(self, p) -> str | None:
        roles = [s["name"] for s in self.status(p)["servers"] if s["role"] == "primary" and s["state"] == "up"]
        return roles[0] if len(roles) == 1 else None

    def leader(self) -> str | None:
        """The instance every live instance names as leader, once they agree."""
        names = {self.status(p)["coordination"]["leader"] for p in self.proxies if p.process.proc.poll() is None}
        return names.pop() if len(names) == 1 and None not in names else None

    def metric(self, p, name: str) -> float | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{p.metrics_port}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return None

    def by_name(self, name):
        return self.proxies[int(name[1:]) - 1]

    def all_route_writes_to(self, node) -> bool:
        for p in self.proxies:
            with p.connect(autocommit=False, connect_timeout=5, read_timeout=10) as c, c.cursor() as cur:
                cur.execute("INSERT INTO acked (w, seq) VALUES (%s, %s)", (1000 + int(time.time() * 1000) % 100000,
                                                                           p.port))
                cur.execute("SELECT @@port")  # in the write's transaction: the primary answers
                port = cur.fetchone()[0]
                c.commit()
            if port != node.port:
                return False
        return True

    def logs(self) -> list[str]:
        return [open(p.process.log_path, errors="replace").read() for p in self.proxies]

    def front_connect(self):
        return pymysql.connect(host="127.0.0.1", port=self.front, user="app", password="app", database="app",
                               autocommit=True, connect_timeout=5, read_timeout=30)


def promotions(logs: list[str]) -> int:
    return sum(len(re.findall(r"failover done in \d+ ms", text)) for text in logs)


def _rows(node) -> set:
    with node.connect(database="app") as c, c.cursor() as cur:
        cur.execute("SELECT w, seq FROM acked WHERE w < 1000")
        return set(cur.fetchall())


def test_primary_kill_through_haproxy_one_promotion_all_follow(semisync, etcd, tmp_path):
    cl = semisync
    f = Fleet(cl, etcd, tmp_path)
    try:
        assert wait_until(lambda: f.leader() is not None, 20), [f.status(p)["coordination"] for p in f.proxies]
        assert wait_until(lambda: all(f.primary_of(p) == "node1" for p in f.proxies), 20)
        with Load(f.front_connect, insert_numbered, clients=8, pause=0.005, max_seconds=90) as w:
            assert wait_until(lambda: w.count_since(0) > 50, 20), w.errors[-3:]
            cl.primary.kill(signal.SIGKILL)
            killed = time.monotonic()
            assert wait_until(lambda: all(f.primary_of(p) in ("node2", "node3") for p in f.proxies), 20), \
                [f.status(p)["failover"] for p in f.proxies]
            assert wait_until(lambda: w.first_ok_after(killed + 0.05) is not None, 15)
            time.sleep(1.0)
        new = cl.node(f.primary_of(f.proxies[0]))
        assert {f.primary_of(p) for p in f.proxies} == {new.name}
        assert wait_until(lambda: f.all_route_writes_to(new), 10)
        logs = f.logs()
        assert promotions(logs) == 1, [re.findall(r".*failover.*", t)[-5:] for t in logs]
        leader = f.leader()
        assert "failover done" in logs[int(leader[1:]) - 1]
        # the promoted primary records the epoch of the leader that promoted it
        with new.connect() as c, c.cursor() as cur:
            cur.execute("SELECT epoch, leader FROM rwproxy.leader_epoch WHERE cluster = %s", (f.name,))
            epoch, who = cur.fetchone()
        assert who == leader and epoch == f.status(f.by_name(leader))["coordination"]["epoch"]
        acked = {v for _, v in w.ok}
        cl.wait_replicas_caught_up(30, only=[n for n in cl.replicas if n is not new])
        for node in cl.replicas:
            missing = acked - _rows(node)
            assert not missing, f"{node.name} lacks acknowledged rows {sorted(missing)[:5]}"
        assert len(w.errors) <= 8 * 3, w.errors[:5]  # only statements in flight at the kill
    finally:
        f.stop()


def test_paused_leader_is_replaced_and_does_nothing_when_it_wakes(semisync, etcd, tmp_path):
    cl = semisync
    f = Fleet(cl, etcd, tmp_path)
    try:
        assert wait_until(lambda: f.leader() is not None, 20)
        assert wait_until(lambda: all(f.primary_of(p) == "node1" for p in f.proxies), 20)
        old = f.by_name(f.leader())
        others = [p for p in f.proxies if p is not old]
        old.process.proc.send_signal(signal.SIGSTOP)
        paused_at = time.monotonic()
        try:
            cl.primary.kill(signal.SIGKILL)
            assert wait_until(lambda: all(f.primary_of(p) in ("node2", "node3") for p in others), 30)
            new_leader = {f.status(p)["coordination"]["leader"] for p in others}
            assert len(new_leader) == 1 and old.process.proc.pid and new_leader != {f"p{f.proxies.index(old) + 1}"}
            time.sleep(max(0.0, TTL + 1 - (time.monotonic() - paused_at)))
        finally:
            old.process.proc.send_signal(signal.SIGCONT)
        mark = len(open(old.process.log_path, errors="replace").read())
        new = cl.node(f.primary_of(others[0]))
        assert wait_until(lambda: f.primary_of(old) == new.name, 15), f.status(old)["coordination"]
        assert wait_until(lambda: f.all_route_writes_to(new), 10)
        time.sleep(2)
        after = open(old.process.log_path, errors="replace").read()[mark:]
        assert "failover: primary" not in after and "promote" not in after.lower().replace("promoted", ""), after
        assert promotions(f.logs()) == 1
        assert not f.status(old)["coordination"]["leading"]
    finally:
        f.stop()


def test_no_etcd_quorum_no_promotion_then_exactly_one(semisync, etcd, tmp_path):
    cl = semisync
    f = Fleet(cl, etcd, tmp_path)
    down = etcd.members[1:]
    try:
        assert wait_until(lambda: f.leader() is not None, 20)
        assert wait_until(lambda: all(f.primary_of(p) == "node1" for p in f.proxies), 20)
        assert [f.metric(p, "rwproxy_coordination_etcd_up") for p in f.proxies] == [1.0] * 3
        assert sorted(f.metric(p, "rwproxy_coordination_leader") for p in f.proxies) == [0.0, 0.0, 1.0]
        for m in down:
            etcd.stop_member(m)
        assert wait_until(lambda: all(not f.status(p)["coordination"]["etcd_ok"] for p in f.proxies), 15)
        assert wait_until(lambda: [f.metric(p, "rwproxy_coordination_etcd_up") for p in f.proxies] == [0.0] * 3, 10)
        assert wait_until(lambda: [f.metric(p, "rwproxy_coordination_leader") for p in f.proxies] == [0.0] * 3, 15)
        # routing goes on: a replica's death still moves the reads
        victim = cl.node("node3")
        victim.kill(signal.SIGKILL)
        assert wait_until(lambda: all(not {s["name"]: s for s in f.status(p)["servers"]}["node3"]["readable"]
                                      for p in f.proxies), 15)
        for p in f.proxies:
            with p.connect(autocommit=True, connect_timeout=5, read_timeout=10) as c, c.cursor() as cur:
                for _ in range(5):
                    cur.execute("SELECT @@port")
                    assert cur.fetchone()[0] != victim.port
        victim.start()
        # a primary kill promotes nobody while etcd has no quorum
        cl.primary.kill(signal.SIGKILL)
        time.sleep(8)
        assert promotions(f.logs()) == 0
        assert all(f.primary_of(p) is None or f.primary_of(p) == "node1" for p in f.proxies)
        for m in down:
            etcd.restart_member(m)
        etcd.wait_healthy(30)
        assert wait_until(lambda: all(f.primary_of(p) in ("node2", "node3") for p in f.proxies), 30), \
            [f.status(p)["coordination"] for p in f.proxies]
        time.sleep(2)
        assert promotions(f.logs()) == 1
    finally:
        for m in down:
            etcd.restart_member(m)
        etcd.wait_healthy(30)
        f.stop()


def test_switchover_asked_of_a_follower_runs_once_on_the_leader(semisync, etcd, tmp_path):
    cl = semisync
    f = Fleet(cl, etcd, tmp_path)
    try:
        assert wait_until(lambda: f.leader() is not None, 20)
        assert wait_until(lambda: all(f.primary_of(p) == "node1" for p in f.proxies), 20)
        leader = f.leader()
        follower = next(p for i, p in enumerate(f.proxies) if f"p{i + 1}" != leader)
        # every instance and which one leads, seen from a follower
        inst = f.status(follower)["coordination"]["instances"]
        assert [i["name"] for i in inst] == ["p1", "p2", "p3"]
        assert [i["name"] for i in inst if i["leader"]] == [leader]
        # each instance's registration is bound to a lease of [cluster] lease_ttl seconds
        e = Etcd(etcd.endpoints)
        kvs, _ = e.get(f"/rwproxy/{f.name}/instances/", prefix=True)
        assert len(kvs) == 3
        for kv in kvs:
            assert e.call("lease/timetolive", {"ID": str(kv.lease)})["grantedTTL"] == str(TTL)
        r = subprocess.run([sys.executable, "-m", "proxy", "switchover", "--to", "node2", "--config",
                            follower.process.config_path], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert leader in r.stdout, r.stdout
        assert wait_until(lambda: all(f.primary_of(p) == "node2" for p in f.proxies), 10)
        assert wait_until(lambda: f.all_route_writes_to(cl.node("node2")), 10)
        logs = f.logs()
        assert sum(t.count("switchover done in") for t in logs) == 1
        assert "switchover done in" in logs[int(leader[1:]) - 1]
        # an operator's OFFLINE on a follower reaches every instance
        r = subprocess.run([sys.executable, "-m", "proxy", "server", "node3", "offline", "--config",
                            follower.process.config_path], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert wait_until(lambda: all({s["name"]: s for s in f.status(p)["servers"]}["node3"]["admin_state"]
                                      == "offline" for p in f.proxies), 10)
    finally:
        f.stop()


def test_an_epoch_of_a_rebuilt_etcd_does_not_block_switchovers(semisync, etcd, tmp_path):
    """Epochs are etcd revisions, and a new etcd cluster (rebuilt after losing its data) counts
    again from 1, below what the servers recorded: every step used to be refused ("already
    follows epoch N") until the revisions caught up. The recorded epoch now names its etcd
    cluster; one of another cluster gives way (one warning line), one of this cluster still
    stops a stale leader."""
    cl = semisync
    f = Fleet(cl, etcd, tmp_path, n=2)
    try:
        assert wait_until(lambda: f.leader() is not None, 20)
        assert wait_until(lambda: all(f.primary_of(p) == "node1" for p in f.proxies), 20)

        def switch(to):
            return subprocess.run([sys.executable, "-m", "proxy", "switchover", "--to", to, "--config",
                                   f.proxies[0].process.config_path], capture_output=True, text=True, timeout=60)

        r = switch("node2")
        assert r.returncode == 0, r.stdout + r.stderr
        row = cl.node("node2").query("SELECT * FROM rwproxy.leader_epoch WHERE cluster = %s", (f.name,))[0]
        ours = Etcd(etcd.endpoints).call("kv/range", {"key": "eA=="})["header"]["cluster_id"]
        assert row["etcd_cluster"] == ours and row["epoch"] > 0
        cl.node("node2").query("UPDATE rwproxy.leader_epoch SET epoch = epoch + 1000000000, etcd_cluster = "
                               "'1234567890' WHERE cluster = %s", (f.name,))
        cl.wait_replicas_caught_up(10)
        r = switch("node1")
        assert r.returncode == 0, r.stdout + r.stderr
        assert wait_until(lambda: all(f.primary_of(p) == "node1" for p in f.proxies), 10)
        assert sum(t.count("of another etcd cluster (id 1234567890;") for t in f.logs()) == 1
        row = cl.node("node1").query("SELECT * FROM rwproxy.leader_epoch WHERE cluster = %s", (f.name,))[0]
        assert row["etcd_cluster"] == ours and row["epoch"] < 1000000000

        cl.node("node1").query("UPDATE rwproxy.leader_epoch SET epoch = epoch + 1000000000 WHERE cluster = %s",
                               (f.name,))
        cl.wait_replicas_caught_up(10)
        r = switch("node2")
        assert r.returncode != 0 and "already follows epoch" in r.stdout + r.stderr, r.stdout + r.stderr
        assert all(f.primary_of(p) == "node1" for p in f.proxies)
    finally:
        f.stop()


def test_switchovers_leave_no_errant_transaction_on_the_old_primary(semisync, etcd, tmp_path):
    """Every instance's monitor writes heartbeats to the primary it knows, as the monitor user,
    which read_only does not stop. A follower that had not yet seen the leader's switchover wrote
    one on the old primary after its final position was taken: a transaction the new primary
    never got, and the old primary's replication then stopped at the new primary's first write
    (1950, gtid_strict_mode). Heartbeats are now written only where read_only is off."""
    cl = semisync
    f = Fleet(cl, etcd, tmp_path, n=3)
    try:
        assert wait_until(lambda: f.leader() is not None, 20)
        assert wait_until(lambda: all(f.primary_of(p) == "node1" for p in f.proxies), 20)
        old = "node1"
        for to in ("node2", "node1", "node3", "node1"):
            r = subprocess.run([sys.executable, "-m", "proxy", "switchover", "--to", to, "--config",
                                f.proxies[0].process.config_path], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stdout + r.stderr
            assert wait_until(lambda: all(f.primary_of(p) == to for p in f.proxies), 10)
            time.sleep(1.0)  # heartbeats on the new primary replicate to the old one
            new_pos = cl.node(to).query("SELECT @@gtid_binlog_pos AS p")[0]["p"]
            assert wait_until(lambda: gtid.reached(cl.node(old).query("SELECT @@gtid_current_pos AS p")[0]["p"], new_pos)
                              or cl.node(old).slave_status()["Slave_SQL_Running"] != "Yes", 10)
            st = cl.node(old).slave_status()
            assert st["Slave_SQL_Running"] == "Yes" and st["Last_SQL_Error"] == "", (to, st["Last_SQL_Error"])
            old = to
    finally:
        f.stop()
