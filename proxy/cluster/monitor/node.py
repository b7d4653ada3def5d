"""What the monitor keeps about one backend besides its published ServerState."""

from __future__ import annotations

import threading
import time

from proxy.cluster.monitor.health import Tracker
from proxy.cluster.monitor.lag import Timeline


class Node:
    """Everything the monitor keeps about one backend besides its published ServerState."""

    def __init__(self, backend):
        self.name, self.host, self.port = backend.name, backend.host, backend.port
        self.backend = backend
        self.configured_role = backend.role
        self.tracker = Tracker()
        self.timeline = Timeline()  # this server's binlog position over time, while it is writable
        self.server_id: int | None = None
        self.source_id: int | None = None  # Master_Server_Id
        self.source_addr = ""
        self.hb_denied = False  # heartbeat writes refused (privileges): replicas fall back to SBM
        self.hb_paused = False  # failover/switchover: no heartbeat writes here (see pause_heartbeat)
        self.hb_lock = threading.Lock()  # held around each heartbeat write
        # The last SHOW ALL SLAVES STATUS reading, reused by checks in between (see _replication):
        # (fields copied into each Observation, read_only it was taken under, time.monotonic()).
        self.repl: tuple[dict, bool, float] | None = None
        self.hb_merge = False  # the heartbeat table was readable here: checks read it too (_check_query)
        self.heard: tuple | None = None  # what it had received from its source at the last fresh reading
        self.heard_at = time.monotonic()  # when that last changed (ServerState.source_silent)
        self.quiet_until = 0.0  # time.monotonic() before which its checks are not judged (see Monitor.quiet)
        self.check_started = 0.0  # time.monotonic() the check under way began (0: none under way)
        self.label = f"{backend.name} ({backend.where})"
        self.retired = threading.Event()  # removed from the config by a reload: its threads end
        # Cadence (cadence.py), all touched on the monitor's loop only:
        self.calm = ""  # WRITER / REPLICA while its checks wait on events instead of the tick
        self.waker = None  # the future its check task naps on; wake() ends the nap
        self.napping_for: "Node | None" = None  # a calm replica: the writer whose heartbeats end the nap
        self.beats_heard = 0  # a calm replica: that writer's heartbeats answered since the nap began
        self.beat_started = 0.0  # time.monotonic() the heartbeat under way began (0: none)
        self.beat_ok = 0.0  # time.monotonic() of its last successful heartbeat
        self.judged = 0.0  # time.monotonic() of the last observation judged (a check or a heartbeat's)
        self.gtid_wait = True  # its server takes MASTER_GTID_WAIT (cleared after a refusal)
        self.complained = -60.0  # time.monotonic() an unexpected error in its tasks was last logged

    def wake(self, value=True) -> None:
        """(On the monitor's loop.) End the check task's nap now; value reaches the napper."""
        w = self.waker
        if w is not None and not w.done():
            w.set_result(value)


def close_quietly(conn) -> None:
    if conn is None:
        return
    try:
        conn.close()
    except Exception:
        pass
