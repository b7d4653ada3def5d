"""The last N things that happened to the cluster and the proxy, for the admin `events` table.

A logging handler on the control plane's loggers (monitor, failover, reload, admin, drain)
keeps the recent INFO-and-above lines in a ring: every topology change, failover step and
reload already has exactly one log line, so the events table says what the log says, in
the same words, without a second place that could drift from it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

SOURCES = ("rwproxy.monitor", "rwproxy.failover", "rwproxy.reload", "rwproxy.admin", "rwproxy.drain",
           "rwproxy.controlplane", "rwproxy.server", "rwproxy.coord")


class EventLog(logging.Handler):
    def __init__(self, size: int = 200):
        super().__init__(logging.INFO)
        self._ring: deque = deque(maxlen=size)
        self._seq = 0
        self._mu = threading.Lock()
        self._attached: list[logging.Logger] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:
            return
        with self._mu:
            self._seq += 1
            self._ring.append((self._seq, record.created, record.levelname.lower(),
                               record.name.removeprefix("rwproxy."), msg))

    def add(self, source: str, message: str, level: str = "info") -> None:
        """An event that has no log line of its own."""
        with self._mu:
            self._seq += 1
            self._ring.append((self._seq, time.time(), level, source, message))

    def rows(self) -> list[tuple]:
        """(seq, time, level, source, message), oldest first."""
        with self._mu:
            return list(self._ring)

    def resize(self, size: int) -> None:
        with self._mu:
            if size != self._ring.maxlen:
                self._ring = deque(self._ring, maxlen=size)

    def attach(self) -> None:
        for name in SOURCES:
            lg = logging.getLogger(name)
            lg.addHandler(self)
            self._attached.append(lg)

    def detach(self) -> None:
        for lg in self._attached:
            lg.removeHandler(self)
        self._attached = []
