"""Failover, switchover, fencing and rejoin (docs/failover.md).

controller.Failover runs them; detect decides whether the primary is dead; state holds what
the threads share; actions is what they do to the servers; ops is the SQL; switchover and
rejoin are the planned change of primary and keeping the cluster honest afterwards.
"""

from proxy.cluster.failover.controller import Failover
from proxy.cluster.failover.detect import verdict

__all__ = ["Failover", "verdict"]
