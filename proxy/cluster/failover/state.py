"""Everything failover, switchover and rejoin share between threads, behind one lock.

Three kinds of threads touch it: the monitor's publisher (observe, on every snapshot), the
failover thread (decisions, failover, fencing, rejoin), and the control socket's threads
(switchover, enable-failover, rejoin, status). Every write happens in a method here, under
the lock; readers get copies. The lock is never held during SQL.
"""

from __future__ import annotations

import threading
import time


class FailoverState:
    def __init__(self, auto_failover: bool):
        self._lock = threading.Lock()
        self._latest = None  # the newest Topology the monitor published
        self._min_version = 0  # snapshots older than the last designation are not acted on
        self._holding = False  # writes are held (a failover or switchover is changing the writer)
        self._auto = auto_failover  # automatic failover is enabled
        self._disabled_reason = "" if auto_failover else "auto_failover = false in the config"
        self._cooldown_until = 0.0  # time.time() before which no automatic failover starts
        self._last: dict[str, dict] = {}  # "failover" / "switchover" -> the last one's record
        self._counts: dict[str, int] = {}  # "failover ok" / "switchover failed" ... -> how many (metrics)
        self._in_progress: str | None = None  # "failover" or "switchover" while one runs
        self._demoted: dict[str, str | None] = {}  # to fence/rejoin -> GTID end of its history (None: unknown)
        self._kept_out: dict[str, str] = {}  # servers kept out of the cluster -> why
        self._retry_at: dict[str, float] = {}  # server -> monotonic time of its next fence/rejoin attempt
        self._said: set[str] = set()  # warnings already logged once (until the condition clears)
        self._semi: dict | None = None  # the primary's semi-sync settings, read while it was alive
        self._connect_retry: int | None = None  # MASTER_CONNECT_RETRY the replicas had
        self._paused: dict[str, str] = {}  # replica a backup took out -> the lock its process holds there

    # ---- the newest picture -------------------------------------------------------------
    def observe(self, topology) -> bool:
        """Keep the monitor's newest snapshot; True while writes are held."""
        with self._lock:
            self._latest = topology
            return self._holding

    @property
    def latest(self):
        return self._latest

    def actionable(self, topology) -> bool:
        """The snapshot reflects the last designation (older ones are not acted on)."""
        return topology is not None and topology.version >= self._min_version

    def designated(self, min_version: int) -> None:
        with self._lock:
            self._min_version = min_version

    # ---- holding writes and actions in progress ---------------------------------------------
    def hold(self, held: bool) -> None:
        with self._lock:
            self._holding = held

    def begin(self, kind: str) -> None:
        with self._lock:
            self._in_progress = kind

    def end(self) -> bool:
        """The action is over; True if writes were still held (the caller releases them)."""
        with self._lock:
            self._in_progress = None
            return self._holding

    def record(self, kind: str, result: dict, cooldown: float = 0.0) -> None:
        """The outcome of a failover or switchover (status shows it); a successful failover
        starts the cooldown."""
        with self._lock:
            self._last[kind] = result
            key = f"{kind} {'ok' if result.get('ok') else 'failed'}"
            self._counts[key] = self._counts.get(key, 0) + 1
            if cooldown:
                self._cooldown_until = time.time() + cooldown

    # ---- automatic failover on / off -----------------------------------------------------
    def disable(self, reason: str) -> None:
        with self._lock:
            self._auto = False
            self._disabled_reason = reason
            self._said.add("disabled")

    def enable(self) -> None:
        with self._lock:
            self._auto, self._disabled_reason = True, ""
            self._said.discard("disabled")

    def auto(self) -> tuple[bool, str, float]:
        """(enabled, why not, cooldown end)."""
        with self._lock:
            return self._auto, self._disabled_reason, self._cooldown_until

    # ---- servers to fence, rejoin or keep out ------------------------------------------------
    def demote(self, name: str, end_of_history: str | None) -> None:
        """`name` wrote before the current primary took over at `end_of_history` (None: compare
        with the primary's position): fence it and rejoin it."""
        with self._lock:
            self._demoted[name] = end_of_history

    def demote_unless_known(self, names: list[str]) -> None:
        with self._lock:
            for n in names:
                self._demoted.setdefault(n, None)

    def undemote(self, name: str) -> None:
        with self._lock:
            self._demoted.pop(name, None)

    def demoted(self) -> dict[str, str | None]:
        with self._lock:
            return dict(self._demoted)

    def keep_out(self, name: str, why: str) -> None:
        with self._lock:
            self._kept_out[name] = why
            self._demoted.pop(name, None)

    def let_back(self, name: str) -> None:
        """The operator resolved it: retry fencing/rejoining `name` now."""
        with self._lock:
            self._kept_out.pop(name, None)
            self._demoted[name] = None
            self._retry_at.pop(name, None)

    def retry_due(self, name: str, every: float) -> bool:
        """True (and the next attempt set `every` seconds on) when `name` may be tried now."""
        now = time.monotonic()
        with self._lock:
            if now < self._retry_at.get(name, 0.0):
                return False
            self._retry_at[name] = now + every
            return True

    # ---- replicas a backup paused ------------------------------------------------------------
    def paused_by_backup(self, name: str, lock: str) -> None:
        """`name` was taken out by a backup holding `lock` on it ("": not any more)."""
        with self._lock:
            if lock:
                self._paused[name] = lock
            else:
                self._paused.pop(name, None)

    def backup_pauses(self) -> dict[str, str]:
        with self._lock:
            return dict(self._paused)

    # ---- said once ---------------------------------------------------------------------------
    def first_time(self, key: str) -> bool:
        """True the first time `key` is said (until forget)."""
        with self._lock:
            if key in self._said:
                return False
            self._said.add(key)
            return True

    def forget(self, *keys: str) -> bool:
        """Forget that these were said; True if any had been."""
        with self._lock:
            had = bool(self._said & set(keys))
            self._said -= set(keys)
            return had

    # ---- what the old primary taught us ------------------------------------------------------
    def set_semi(self, semi: dict | None, only_if_unknown: bool = False) -> None:
        with self._lock:
            if not only_if_unknown or self._semi is None:
                self._semi = semi

    @property
    def semi(self) -> dict | None:
        return self._semi

    def set_connect_retry(self, seconds: int) -> None:
        with self._lock:
            self._connect_retry = seconds

    @property
    def connect_retry(self) -> int | None:
        return self._connect_retry

    # ---- several instances (proxy/coord) ----------------------------------------------------
    def mirror(self, shared: dict) -> None:
        """Take the leader's published decisions (coord/shared.py) as this instance's own: what
        status shows on a follower, and where a new leader carries on from."""
        with self._lock:
            self._demoted = dict(shared.get("demoted") or {})
            self._kept_out = dict(shared.get("kept_out") or {})
            self._auto = bool(shared.get("auto_failover", self._auto))
            self._disabled_reason = shared.get("disabled_reason") or ""
            self._cooldown_until = shared.get("cooldown_until") or 0.0
            self._in_progress = shared.get("in_progress")
            for kind in ("failover", "switchover"):
                if shared.get(f"last_{kind}"):
                    self._last[kind] = shared[f"last_{kind}"]

    # ---- status ------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        with self._lock:
            left = max(0.0, self._cooldown_until - time.time())
            return {"auto_failover": self._auto, "disabled_reason": self._disabled_reason,
                    "in_progress": self._in_progress, "writes_held": self._holding,
                    "cooldown_until": self._cooldown_until if left else None, "cooldown_left_s": round(left, 1),
                    "last_failover": self._last.get("failover"), "last_switchover": self._last.get("switchover"),
                    "kept_out": dict(self._kept_out), "awaiting_rejoin": sorted(self._demoted),
                    "counts": dict(self._counts)}
