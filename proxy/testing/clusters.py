"""Throw-away clusters for tests and benchmarks: free ports, retry on port races, always torn down."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from proxy.sandbox.cluster import Cluster
from proxy.sandbox.util import PortInUse, find_free_base_port

# Far from the default sandbox (23306) so tests never touch a developer's own cluster.
TEST_PORT_START = 24306


def start_cluster(dir: str | os.PathLike, *, replicas: int = 2, topology: str = "primary-replica",
                  semi_sync: bool = False, port_start: int = TEST_PORT_START, attempts: int = 5,
                  timeout: float = 60.0, **kwargs: Any) -> Cluster:
    """Start a fresh cluster in dir on the first free block of ports at or above port_start.

    Other test sessions may grab the same ports between our check and mariadbd's bind,
    so a PortInUse restarts from scratch on the next block instead of failing the run.
    """
    dir = Path(dir)
    count = (2 if topology == "master-master" else 1) + replicas
    start = port_start
    for attempt in range(attempts):
        base = find_free_base_port(count, start)
        cluster = Cluster(dir, replicas=replicas, topology=topology, base_port=base,
                          semi_sync=semi_sync, **kwargs)
        try:
            return cluster.up(timeout=timeout)
        except PortInUse:
            if attempt == attempts - 1:
                raise
            if cluster.exists:
                cluster.down()
            shutil.rmtree(dir, ignore_errors=True)
            start = base + count
    raise AssertionError("unreachable")


def teardown_cluster(cluster: Cluster, keep_data: bool = False) -> None:
    """Stop every node by pid; drop the datadirs (logs and my.cnf stay for post-mortems)."""
    if not cluster.exists:
        return
    cluster.down()
    if not keep_data:
        for n in cluster.nodes:
            shutil.rmtree(n.datadir, ignore_errors=True)


@contextmanager
def running_cluster(dir: str | os.PathLike, **kwargs: Any) -> Iterator[Cluster]:
    """`with running_cluster(tmp) as c:` - the cluster is stopped even if the body fails."""
    cluster = start_cluster(dir, **kwargs)
    try:
        yield cluster
    finally:
        teardown_cluster(cluster)


def cluster_processes(cluster: Cluster) -> list[int]:
    """Pids of any live mariadbd whose command line names one of this cluster's my.cnf files."""
    wanted = {f"--defaults-file={n.cnf}" for n in cluster.nodes}
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if wanted.intersection(argv):
            pids.append(int(entry))
    return pids


def user_connections(cluster, user: str) -> dict[str, int]:
    """How many connections `user` has on each server of `cluster` now (name -> count, from the
    process lists): what a proxy holds open to the servers."""
    out = {}
    for node in cluster.nodes:
        with node.connect() as c, c.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = %s", (user,))
            out[node.name] = cur.fetchone()[0]
    return out
