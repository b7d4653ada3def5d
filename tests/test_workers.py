"""Worker processes, CPU affinity (`[proxy] cpu_affinity`) and scheduling policy (`[proxy] scheduling`),
checked in /proc of the real processes."""

from __future__ import annotations

import os
import signal
import socket
import time

import pymysql
import pytest

from helpers import start_proxy, worker_pids
from proxy.sandbox.util import process_alive


def _allowed_cpus(pid: int) -> set[int]:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Cpus_allowed_list:"):
                cpus: set[int] = set()
                for part in line.split(":", 1)[1].strip().split(","):
                    lo, _, hi = part.partition("-")
                    cpus.update(range(int(lo), int(hi or lo) + 1))
                return cpus
    raise AssertionError(f"no Cpus_allowed_list for pid {pid}")


def _wait_for(pred, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_default_leaves_workers_unpinned(proxy):
    cpus = os.sched_getaffinity(0)
    workers = worker_pids(proxy)
    assert len(workers) == 2
    assert all(_allowed_cpus(w) == cpus for w in workers)


def test_scheduling_batch_puts_workers_not_the_control_plane_under_sched_batch(cluster, tmp_path):
    """scheduling = "batch": every worker under SCHED_BATCH, the supervisor (monitor, heartbeats)
    under SCHED_OTHER, and a restarted worker under SCHED_BATCH again."""
    p = start_proxy(cluster, tmp_path, proxy={"workers": 2, "scheduling": "batch"})
    try:
        _wait_for(lambda: "worker 1 serving on" in p.process.log_tail(200) and "worker 0 serving on" in p.process.log_tail(200))
        workers = worker_pids(p)
        assert len(workers) == 2
        assert all(os.sched_getscheduler(w) == os.SCHED_BATCH for w in workers)
        assert os.sched_getscheduler(p.process.proc.pid) == os.SCHED_OTHER
        with p.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
        os.kill(workers[0], signal.SIGKILL)
        new = _wait_for(lambda: [w for w in worker_pids(p) if w not in workers])
        _wait_for(lambda: os.sched_getscheduler(new[0]) == os.SCHED_BATCH)
        with p.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT 2")
            assert cur.fetchone() == (2,)
    finally:
        p.process.stop()


def test_default_scheduling_leaves_workers_under_sched_other(proxy):
    workers = worker_pids(proxy)
    assert len(workers) == 2
    assert all(os.sched_getscheduler(w) == os.SCHED_OTHER for w in workers)


def test_spread_pins_each_worker_and_a_restarted_worker_again(cluster, tmp_path):
    cpus = sorted(os.sched_getaffinity(0))
    p = start_proxy(cluster, tmp_path, proxy={"workers": 2, "cpu_affinity": "spread"})
    try:
        sup = p.process.proc.pid
        lines = [f"worker {i} serving on 127.0.0.1:{p.port} (pinned to CPU {cpus[i % len(cpus)]})" for i in range(2)]
        _wait_for(lambda: all(line in p.process.log_tail(200) for line in lines))  # workers pin before serving
        workers = worker_pids(p)
        assert len(workers) == 2
        assert sorted(min(_allowed_cpus(w)) for w in workers) == sorted(cpus[i % len(cpus)] for i in range(2))
        assert all(len(_allowed_cpus(w)) == 1 for w in workers)
        assert _allowed_cpus(sup) == set(cpus), "the control plane (supervisor) stays unpinned"

        # both workers answer clients (the connection id's top byte is the worker's index + 1)
        seen = set()
        for _ in range(40):
            with p.connect() as conn, conn.cursor() as cur:
                cur.execute("SELECT 1")
                assert cur.fetchone() == (1,)
                seen.add((conn.thread_id() >> 24) - 1)
            if seen == {0, 1}:
                break
        assert seen == {0, 1}

        # a worker that crashes is restarted on the same CPU
        victim = workers[0]
        cpu = _allowed_cpus(victim)
        os.kill(victim, signal.SIGKILL)
        new = _wait_for(lambda: [w for w in worker_pids(p) if w not in workers])
        _wait_for(lambda: _allowed_cpus(new[0]) != set(cpus) or len(cpus) == 1)  # it pins itself on start
        assert _allowed_cpus(new[0]) == cpu
        with p.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT 2")
            assert cur.fetchone() == (2,)
    finally:
        p.process.stop()


def test_workers_that_keep_dying_stop_the_proxy(cluster, tmp_path):
    """Ten restarts in a minute are kept going; the eleventh stops rwproxy with exit status 1 and
    one line saying why, the other worker ended too (a service manager then takes over)."""
    p = start_proxy(cluster, tmp_path, proxy={"workers": 2})
    try:
        killed = []
        for n in range(11):
            # two workers not killed yet (a killed one the supervisor has not reaped is still listed)
            live = _wait_for(lambda: (ws if len(ws := [w for w in worker_pids(p) if w not in killed]) == 2 else None))
            os.kill(live[0], signal.SIGKILL)
            killed.append(live[0])
        assert p.process.proc.wait(20) == 1
        log = p.process.log_tail(400)
        assert log.count("was killed by SIGKILL; restarting it") == 10, log
        assert "was killed by SIGKILL; workers keep crashing (more than 10 restarts in a minute): stopping" in log
        sibling = [w for w in live if w != killed[-1]]
        assert len(sibling) == 1
        assert _wait_for(lambda: not process_alive(sibling[0]), 10)
    finally:
        p.process.stop()


def test_workers_do_not_outlive_a_killed_supervisor(cluster, tmp_path):
    """SIGKILL of the supervisor (the OOM killer's choice, a kill -9) used to leave its workers
    serving on the port for good, routing by the last topology they had been sent: after a
    failover elsewhere they would have written to the old primary. Now they drain and exit: an
    idle session is ended, and the port is free for a new rwproxy."""
    p = start_proxy(cluster, tmp_path, proxy={"workers": 2, "shutdown_timeout": 5})
    try:
        _wait_for(lambda: len(worker_pids(p)) == 2)
        workers = worker_pids(p)
        conn = p.connect()
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        os.kill(p.process.proc.pid, signal.SIGKILL)
        p.process.proc.wait(10)
        _wait_for(lambda: not any(process_alive(w) for w in workers), 20)
        assert p.process.log_tail(100).count("the supervisor (the control plane) is gone") == 2
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 2")
            raise AssertionError("the session outlived its worker")
        except pymysql.err.OperationalError:
            pass
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", p.port), timeout=2).close()
        p.process.start()  # the same config again: port and runtime directory are free
        with p.connect() as again, again.cursor() as cur:
            cur.execute("SELECT 3")
            assert cur.fetchone() == (3,)
    finally:
        p.process.stop()


def test_running_out_of_file_descriptors_refuses_new_clients_with_1040(cluster, tmp_path):
    """A worker whose RLIMIT_NOFILE is nearly used up refuses new clients with ERROR 1040 (08004),
    as a full server does, keeping the last descriptors for its sessions' server connections; it
    used to accept them all until libuv closed new connections without a word and sessions'
    backends failed with EMFILE. Said once in the log; clients get in again once others leave."""
    import resource

    p = start_proxy(cluster, tmp_path, proxy={"workers": 1})
    try:
        (worker,) = _wait_for(lambda: worker_pids(p) if len(worker_pids(p)) == 1 else None)
        resource.prlimit(worker, resource.RLIMIT_NOFILE, (200, 200))
        conns, refused = [], []
        for _ in range(250):
            try:
                conns.append(p.connect())
            except pymysql.err.OperationalError as e:
                refused.append(e.args)
        assert 20 < len(conns) < 200 and len(refused) == 250 - len(conns)
        assert set(refused) == {(1040, "Too many connections")}
        for i, conn in enumerate(conns):  # every session in still gets its answers, writes included
            with conn.cursor() as cur:
                cur.execute("SELECT %s", (i,))
                assert cur.fetchone() == (i,)
                if i % 10 == 0:
                    cur.execute("SELECT @@read_only FROM DUAL FOR UPDATE")
        assert p.process.log_tail(200).count("out of file descriptors: a new client's socket is number") == 1
        for conn in conns[:10]:
            conn.close()
        again = _wait_for(lambda: _try_connect(p), 10)
        again.close()
    finally:
        for conn in conns:
            if conn.open:
                conn.close()
        p.process.stop()


def _try_connect(p):
    try:
        return p.connect()
    except pymysql.err.OperationalError:
        return None


def test_sighup_to_every_process_reloads_and_keeps_theworker_pids(cluster, tmp_path):
    """`systemctl kill -s HUP` (or `pkill -HUP`) reaches the workers too: they used to die of it
    (SIGHUP's default action), every client of theirs with them; now the supervisor reloads and the
    workers go on."""
    p = start_proxy(cluster, tmp_path, proxy={"workers": 2})
    try:
        workers = _wait_for(lambda: worker_pids(p) if len(worker_pids(p)) == 2 else None)
        conn = p.connect()
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        for pid in [p.process.proc.pid] + workers:
            os.kill(pid, signal.SIGHUP)
        _wait_for(lambda: "(SIGHUP)" in p.process.log_tail(100), 10)
        time.sleep(0.5)
        assert sorted(worker_pids(p)) == sorted(workers)
        assert "restarting it" not in p.process.log_tail(200)
        with conn.cursor() as cur:
            cur.execute("SELECT 2")
            assert cur.fetchone() == (2,)
        conn.close()
    finally:
        p.process.stop()
