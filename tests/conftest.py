"""Shared fixtures: a real MariaDB sandbox cluster for the whole session, and opt-in slow tests."""

from __future__ import annotations

import os
import subprocess

import pytest

from proxy.sandbox import Cluster
from proxy.testing.clusters import start_cluster, teardown_cluster

# the proxy fixtures (`proxy`, `direct`) live in helpers.py beside this file
pytest_plugins = ["helpers"]


def pytest_collection_modifyitems(config, items):
    """`slow` tests run only with RWPROXY_SLOW=1 or when selected with -m (e.g. -m slow)."""
    if os.environ.get("RWPROXY_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: set RWPROXY_SLOW=1 (or pass -m slow) to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


@pytest.fixture(scope="session", autouse=True)
def no_leaked_processes():
    """After the whole session (torn down last): every rwproxy, HAProxy or Prometheus a test
    started must be stopped. A leaked one goes on checking (and tuning) the servers of the
    tests after it; it is killed by pid and reported as an error."""
    yield
    leaked = []
    for pid in _children(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(word in cmd for word in (" proxy serve ", "haproxy", "prometheus", "benchmarks.forwarder", "bin/etcd ")):
            leaked.append(f"{pid}: {cmd[:160]}")
            for child in _children(pid):
                os.kill(child, 9)
            os.kill(pid, 9)
    assert not leaked, "processes left running by the tests:\n" + "\n".join(leaked)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> Cluster:
    """Primary + 2 replicas (app/app, rwproxy/rwproxy), ports searched from 24306 upward.

    Tests may stop or kill nodes but must leave the cluster as they found it (restart with
    cluster.up(), which restarts stopped nodes), since every later test shares it.
    """
    c = start_cluster(tmp_path_factory.mktemp("sandbox"), replicas=2)
    try:
        yield c
    finally:
        teardown_cluster(c)


@pytest.fixture
def cluster_factory(tmp_path_factory):
    """make(**kwargs) -> a private Cluster (same arguments as start_cluster), stopped after the test."""
    made: list[Cluster] = []

    def make(**kwargs) -> Cluster:
        c = start_cluster(tmp_path_factory.mktemp("cluster"), **kwargs)
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            teardown_cluster(c)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (root only, as CI runs): a disk that fills up, for real."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
