"""Replica lag with sub-second precision: heartbeat rows plus the writer's GTID timeline.

A heartbeat row alone gives only an upper bound: a replica that applied the row
written at A (writer clock) is at most ``now - A`` behind, so the reading saws
between the true lag and true lag + heartbeat_interval.  The monitor therefore
also records, for every writer, *when* (writer clock) its binlog reached which
GTID position (one sample per check and one after each heartbeat write).  A
replica's own GTID position then brackets its lag between two consecutive
samples:

* it has reached the sample taken at T_j  -> it holds everything committed
  before T_j, so lag <= now - T_j;
* it has not reached the sample taken at T_k -> it lacks something committed
  before T_k, so lag > now - T_k.

Within the bracket the replica's state is placed by the share of the
transactions between the two samples it has applied (exact under a steady
write rate, never outside the bracket, whose width is the sampling gap,
<= interval).  A replica that has reached the newest sample reads 0: nothing
it could lag behind has been seen yet; without writes nothing can be stale.
The heartbeat row's upper bound is kept as a cross-check: should the GTID
comparison contradict it (exotic domain setups), the heartbeat alone is used.

Every time here is UNIX seconds from a *server* clock (UNIX_TIMESTAMP(NOW(6))),
never the monitor host's: the writer's samples against the replica's NOW() in
the same query as its position.  Only the writer's and the replica's clocks
must agree.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

from proxy.cluster.gtid import contains, seqs


@dataclass(slots=True)
class _Run:
    """Consecutive samples with the same GTID position: first and last time it was seen."""
    first: float
    last: float
    gtid: dict[int, int]
    text: str


class Timeline:
    """One writer's binlog position over (its own) time; shared by checker threads."""

    def __init__(self, maxlen: int = 4096):
        self._runs: deque[_Run] = deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self.updated = 0.0  # time.monotonic() of the newest sample (monitor clock: staleness only)

    def add(self, t: float, gtid: str, mono: float | None = None) -> None:
        """Record that at writer time t the writer's gtid_binlog_pos was gtid."""
        with self._lock:
            self.updated = max(self.updated, time.monotonic() if mono is None else mono)
            if self._runs and t <= self._runs[-1].last:
                return  # a late sample from the other thread: the newer one already covers it
            if self._runs and gtid == self._runs[-1].text:
                self._runs[-1].last = t
                return
            parsed = seqs(gtid)
            if self._runs and not contains(parsed, self._runs[-1].gtid):
                self._runs.clear()  # RESET MASTER or similar: positions no longer comparable
            self._runs.append(_Run(t, t, parsed, gtid))

    @property
    def end(self) -> float | None:
        """Writer time of the newest sample."""
        with self._lock:
            return self._runs[-1].last if self._runs else None

    def __len__(self) -> int:
        return len(self._runs)

    def locate(self, have: dict[int, int], now: float) -> tuple[float, float | None, float] | None:
        """(lower, upper, estimate) lag in seconds at server time `now` for a replica at `have`.

        upper is None when the replica has not reached even the oldest sample kept.
        None when there is no sample yet.
        """
        with self._lock:
            runs = self._runs
            n = len(runs)
            if n == 0:
                return None
            lo, hi = 0, n  # first run not reached (positions only grow, so reached is a prefix)
            while lo < hi:
                mid = (lo + hi) // 2
                if contains(have, runs[mid].gtid):
                    lo = mid + 1
                else:
                    hi = mid
            k = lo
            if k == n:  # has everything the writer had at its newest sample: nothing seen to lag behind
                return 0.0, max(0.0, now - runs[-1].last), 0.0
            lower = max(0.0, now - runs[k].first)
            if k == 0:
                return lower, None, lower
            a, b = runs[k - 1], runs[k]
            # its state lies between a.last and b.first: place it by the share of the
            # transactions in between that it has applied (exact under a steady write rate)
            point = a.last + progress(have, a.gtid, b.gtid) * (b.first - a.last)
            return lower, max(0.0, now - a.last), max(0.0, now - point)


def progress(have: dict[int, int], a: dict[int, int], b: dict[int, int]) -> float:
    """Share (0..1) of the transactions between positions a and b that `have` contains."""
    total = done = 0
    for d, seq_b in b.items():
        span = seq_b - a.get(d, 0)
        if span > 0:
            total += span
            done += min(max(have.get(d, 0) - a.get(d, 0), 0), span)
    return done / total if total else 0.5


@dataclass(frozen=True, slots=True)
class LagReading:
    """One lag measurement: ms (None = unknown) and how it was obtained."""
    ms: float | None
    source: str  # "heartbeat", "heartbeat-stale", "seconds_behind", "frozen", ""
    lower_ms: float | None = None
    upper_ms: float | None = None
    note: str = ""


def estimate(timeline: Timeline | None, have: dict[int, int], now: float,
             hb_ts: float | None, hb_now: float | None, stale: bool) -> LagReading | None:
    """Lag from the writer's timeline and the newest applied heartbeat; None if neither is usable.

    When `stale` (the writer has not been sampled for a while: it is down, hung
    or no longer writable) lags are measured against the writer's last known
    time instead of now, so a replica that applied everything the writer wrote
    reads 0 instead of growing forever.
    """
    ref = now
    end = timeline.end if timeline is not None else None
    if stale and end is not None:
        ref = min(now, end)
    loc = timeline.locate(have, ref) if timeline is not None else None
    hb_upper = None
    if hb_ts is not None:
        hb_ref = ref if (stale and end is not None) else (hb_now if hb_now is not None else now)
        hb_upper = max(0.0, hb_ref - hb_ts)
    source = "heartbeat-stale" if stale else "heartbeat"
    if loc is None:
        if hb_upper is None:
            return None
        return LagReading(hb_upper * 1000, source, None, hb_upper * 1000, "heartbeat only")
    lower, upper, point = loc
    if hb_upper is not None:
        if lower > hb_upper + 0.005:
            # the replica holds a heartbeat newer than a position it supposedly lacks:
            # GTID positions do not compare here, trust the heartbeat
            return LagReading(hb_upper * 1000, source, None, hb_upper * 1000, "gtid contradicts heartbeat")
        upper = hb_upper if upper is None else min(upper, hb_upper)
        point = min(point, upper)
    return LagReading(point * 1000, source, lower * 1000, None if upper is None else upper * 1000,
                      "" if upper is not None else "beyond the timeline")
