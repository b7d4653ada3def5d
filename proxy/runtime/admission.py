"""Proxy-wide connection limits across worker processes: `[proxy] max_connections` and
`[[users]] max_connections` (MariaDB's max_connections and max_user_connections).

Each worker counts its own clients (in all, and per user) in a row of a shared mapping made
before forking; a check sums the rows. The check and the count it admits happen under one
lock shared by all workers (a POSIX semaphore: uncontended, about a microsecond, and only at
connect and login), so two workers admitting at the same instant cannot both take the last
slot. A worker that dies takes its sessions with it: the supervisor zeroes its row before
starting its successor.
"""

from __future__ import annotations

import logging
import mmap
import multiprocessing
import resource
import struct
import time

log = logging.getLogger("rwproxy.server")

_LOCK_WAIT = 0.5  # s; a lock held this long means a worker died holding it: admit, and say so once
SPARE_USERS = 64  # columns kept for users a reload adds
FD_RESERVE = 64  # file descriptors kept for server connections (or a 20th of the limit, if more)
_fd_said = -1e9


def fd_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def fd_reserve(limit: int) -> int:
    return max(FD_RESERVE, limit // 20)


def fds_to_spare(transport) -> bool:
    """False when a new client's socket is among the last file descriptors RLIMIT_NOFILE allows:
    it is then refused with ERROR 1040, as a full server does, so that the sessions already in
    can still open server connections. (Past the limit libuv accepts and closes connections
    without a word, and sessions' backends fail with EMFILE.) The kernel hands out the lowest free
    descriptor, so a socket numbered n means n are in use. Said once per 10 s in the log."""
    global _fd_said
    sock = transport.get_extra_info("socket")
    if sock is None:
        return True
    limit = fd_limit()
    n = sock.fileno()
    if n < limit - fd_reserve(limit):
        return True
    now = time.monotonic()
    if now - _fd_said >= 10:
        _fd_said = now
        log.error("out of file descriptors: a new client's socket is number %d of RLIMIT_NOFILE %d; new clients are "
                  "refused (1040 Too many connections) while fewer than %d are free (kept for the sessions' server connections); raise the "
                  "limit (systemd LimitNOFILE=, docker --ulimit nofile=, ulimit -n)", n, limit, fd_reserve(limit))
    return False


class Admission:
    def __init__(self, workers: int, max_connections: int, user_limits: dict[str, int]):
        self.max_connections = max_connections
        self.users = {name: i for i, name in enumerate(user_limits)}  # user name -> column - 1
        self.limits = list(user_limits.values())  # per user; 0 = no limit of its own
        self.cols = 1 + len(self.users) + SPARE_USERS
        self.workers = workers
        self._row = struct.Struct(f"<{self.cols}q")
        self._mm = mmap.mmap(-1, self._row.size * workers)  # MAP_SHARED: the workers see each other's rows
        self._lock = multiprocessing.Lock()
        self._stuck_said = False

    # ---- one worker's side ----------------------------------------------------------------
    def admit(self, worker: int, user: str | None = None) -> bool:
        """Count one more client of `worker` (in all, or for `user` once it logged in) if the
        proxy-wide limit allows it; False (nothing counted) when it is reached."""
        col, limit = (0, self.max_connections) if user is None else self._user(user)
        if col is None:
            return True  # a user the configuration no longer knows: nothing to count
        locked = self._lock.acquire(timeout=_LOCK_WAIT)
        if not locked and not self._stuck_said:
            self._stuck_said = True
            log.error("worker %d: the connection-count lock is stuck (a worker died holding it?); "
                      "connection limits are not enforced until rwproxy restarts", worker)
        try:
            if limit and locked and self._total(col) >= limit:
                return False
            self._add(worker, col, 1)
            return True
        finally:
            if locked:
                self._lock.release()

    def release(self, worker: int, user: str | None = None) -> None:
        col = 0 if user is None else self._user(user)[0]
        if col is None:
            return
        locked = self._lock.acquire(timeout=_LOCK_WAIT)
        try:
            self._add(worker, col, -1)
        finally:
            if locked:
                self._lock.release()

    def reconfigure(self, max_connections: int, user_limits: dict[str, int]) -> None:
        """A reload: new limits. Every process applies the same reloads in the same order, so a new
        user gets the same spare column everywhere; users beyond the spares are not limited until
        a restart (said once)."""
        self.max_connections = max_connections
        for name, limit in user_limits.items():
            i = self.users.get(name)
            if i is None:
                if len(self.users) >= self.cols - 1:
                    if limit:
                        log.warning("user %s: max_connections %d is enforced after a restart (more than %d users "
                                    "added since the start)", name, limit, SPARE_USERS)
                    continue
                i = self.users[name] = len(self.users)
                self.limits.append(limit)
            else:
                self.limits[i] = limit

    # ---- the supervisor's side ----------------------------------------------------------------
    def reset_worker(self, worker: int) -> None:
        """The worker is gone and so are its clients (before its successor starts)."""
        self._row.pack_into(self._mm, worker * self._row.size, *([0] * self.cols))

    # ---- rows ------------------------------------------------------------------------------------
    def _user(self, user: str) -> tuple[int | None, int]:
        i = self.users.get(user)
        return (None, 0) if i is None else (1 + i, self.limits[i])

    def _total(self, col: int) -> int:
        size = self._row.size
        return sum(self._row.unpack_from(self._mm, w * size)[col] for w in range(self.workers))

    def _add(self, worker: int, col: int, n: int) -> None:
        off = worker * self._row.size
        row = list(self._row.unpack_from(self._mm, off))
        row[col] = max(0, row[col] + n)
        self._row.pack_into(self._mm, off, *row)
