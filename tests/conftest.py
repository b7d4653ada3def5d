"""Shared fixtures: a real MariaDB sandbox cluster for the whole session, and opt-in slow tests."""

from __future__ import annotations

import os

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
