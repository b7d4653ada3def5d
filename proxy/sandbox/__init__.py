"""A real MariaDB primary-replica / master-master cluster on 127.0.0.1 for the demo, tests and benchmarks."""

from proxy.sandbox.cluster import Cluster
from proxy.sandbox.node import Node
from proxy.sandbox.util import PortInUse, SandboxError, find_free_base_port

__all__ = ["Cluster", "Node", "PortInUse", "SandboxError", "find_free_base_port"]
