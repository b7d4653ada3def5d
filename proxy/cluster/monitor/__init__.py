"""The health and lag monitor: checks every server, decides roles, health and read-pool
membership, and publishes topology snapshots (docs/monitor.md).

checker.Monitor runs the threads; health turns one check into a server state (pure); lag
measures replica lag from heartbeats and the writer's GTID timeline; replication reads the
replication threads' state.
"""

from proxy.cluster.monitor.checker import Monitor

__all__ = ["Monitor"]
