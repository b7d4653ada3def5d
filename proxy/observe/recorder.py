"""Per-statement statistics in one worker: what the admin port's tables and /metrics are made of.

The hot path calls Recorder.record() once per answered statement (ClientConnection.command_done).
Everything it touches is a plain list updated in place, reached through references the session
caches (its digest table and its per-server rows), so a point select costs one clock read, a
bisect and about twenty list updates: ~1 µs (benchmarks/results/issue21-*.md). Nothing is
summed, sorted or copied until the control plane asks (snapshot methods below), which is how
ProxySQL's stats tables work too, with one difference: the digest table is bounded
([stats] max_digests per worker). When it is full the least recently seen tenth goes at once
(bulk eviction keeps the hot path free of LRU bookkeeping), their figures are folded into
per-route totals so no counter goes backwards, and `evicted` counts them.

Latency is measured from the moment rwproxy sends the statement to a server (or queues it on a
shared connection) until the last byte of its answer was relayed: what the client waits for,
minus the time to open a connection on a session's first statement.
"""

from __future__ import annotations

import hashlib
import time
from bisect import bisect_left

from proxy.routing import classify as C

# Histogram bucket upper bounds in seconds (Prometheus `le`); one more bucket for +Inf.
# (record() spells the indexes below as literals: NB is 17, the index of a histogram's sum.)
BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
NB = len(BOUNDS) + 1
ROUTES = {C.READ: "read", C.WRITE: "write", C.SESSION: "session"}

# A digest entry is a list: [count, total s, min s, max s, errors, rows, first seen, last seen,
# route, *NB bucket counts]. Times are time.monotonic(); snapshots convert them to wall clock.
COUNT, TOTAL, MIN, MAX, ERRORS, ROWS, FIRST, LAST, ROUTE, B0 = range(10)
# A server row (one per server and user): statements answered ok per route (1..3), with an error
# (5..7), lost with the connection (9..11), bytes to the client, bytes to the server, latency sum.
OK0, ERR0, LOST0, BYTES_IN, BYTES_OUT, LATENCY = 0, 4, 8, 12, 13, 14

_monotonic = time.monotonic


def digest_id(text: str) -> str:
    """A short stable id for a digest text (the same in every worker and across restarts)."""
    return "0x" + hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).hexdigest().upper()


def percentile(buckets, count: int, q: float, cap: float) -> float:
    """The upper bound of the bucket holding the q-th quantile (capped at the max seen)."""
    if count <= 0:
        return 0.0
    want = q * count
    seen = 0
    for i, n in enumerate(buckets):
        seen += n
        if seen >= want:
            return min(BOUNDS[i], cap) if i < len(BOUNDS) else cap
    return cap


class Recorder:
    """One worker's statistics."""

    def __init__(self, max_digests: int = 10000, max_text: int = 1024):
        self.max_digests = max_digests
        self.max_text = max_text
        self.tables: dict[tuple, dict[str, list]] = {}  # (user, db) -> digest text -> entry
        self.ndigests = 0
        self.evicted = 0  # digest entries evicted since start (or RESET STATS)
        self.folded = {r: [0, 0.0, 0, 0] for r in ROUTES}  # route -> count, total, errors, rows of evicted entries
        self.rows: dict[tuple, list] = {}  # (server, user) -> server row (never reset: Prometheus counters)
        self.hist = [[0] * NB + [0.0] for _ in range(4)]  # per route: bucket counts, then the latency sum

    # ---- the hot path -----------------------------------------------------------------
    def record(self, s, cmd, name: str, error: bool, rows: int, nbytes: int) -> None:
        """Statement `cmd` of session `s` was answered by server `name`.

        Written for the bytecode count (callgrind: ~8,000 instructions per statement before these
        rewrites): literal indexes instead of the named constants above, one error branch, and
        the route's latency sum kept in its histogram's last slot."""
        now = _monotonic()
        t = now - s.sent_at
        s.done_at = now
        cls = cmd.cls
        route = cls.route
        b = bisect_left(BOUNDS, t)
        srow = s.stat_rows.get(name) or self._server_row(s, name)
        tab = s.stat_table
        if tab is None or s.stat_db is not s.db:
            tab = self._table(s)
        e = tab.get(cls.digest) or self._entry(tab, cls.digest, route, now)
        if error:
            srow[4 + route] += 1  # ERR0
            e[4] += 1  # ERRORS
        else:
            srow[route] += 1  # OK0
        srow[12] += nbytes  # BYTES_IN
        srow[13] += len(cmd.packet)  # BYTES_OUT
        srow[14] += t  # LATENCY
        h = self.hist[route]
        h[b] += 1
        h[17] += t  # (NB: the sum)
        e[0] += 1  # COUNT
        e[1] += t  # TOTAL
        if t < e[2]:  # MIN
            e[2] = t
        if t > e[3]:  # MAX
            e[3] = t
        e[5] += rows  # ROWS
        e[7] = now  # LAST
        e[9 + b] += 1  # B0

    def lost(self, s, cmd, name: str) -> None:
        """Statement `cmd` of `s` was lost with its connection to `name` (rare path)."""
        srow = s.stat_rows.get(name) or self._server_row(s, name)
        srow[LOST0 + cmd.cls.route] += 1

    # ---- misses (rare) ------------------------------------------------------------------
    def _server_row(self, s, name: str) -> list:
        key = (name, s.user.name)
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = [0] * 14 + [0.0]
        s.stat_rows[name] = row
        return row

    def _table(self, s) -> dict:
        key = (s.user.name, s.db or "")
        tab = self.tables.get(key)
        if tab is None:
            tab = self.tables[key] = {}
        s.stat_table, s.stat_db = tab, s.db
        return tab

    def _entry(self, tab: dict, digest: str, route: int, now: float) -> list:
        if len(digest) > self.max_text:
            # stored cut short; statements this long are rare, so they may take this path each time
            key = digest[: self.max_text] + "..."
            e = tab.get(key)
            if e is not None:
                return e
            digest = key
        if self.ndigests >= self.max_digests:
            self.evict()
        e = [0, 0.0, 1e9, 0.0, 0, 0, now, now, route] + [0] * NB
        tab[digest] = e
        self.ndigests += 1
        return e

    def evict(self) -> None:
        """Drop the least recently seen tenth of the digests, folding their figures into totals."""
        entries = [(e[LAST], key, d) for key, tab in self.tables.items() for d, e in tab.items()]
        entries.sort()
        n = max(1, len(entries) // 10)
        for _, key, d in entries[:n]:
            e = self.tables[key].pop(d)
            f = self.folded.get(e[ROUTE])
            if f is not None:
                f[0] += e[COUNT]
                f[1] += e[TOTAL]
                f[2] += e[ERRORS]
                f[3] += e[ROWS]
        self.ndigests -= n
        self.evicted += n

    def reset(self) -> None:
        """RESET STATS: forget the digests (sessions' cached tables are dropped with them)."""
        self.tables = {}
        self.ndigests = 0
        self.evicted = 0
        self.folded = {r: [0, 0.0, 0, 0] for r in ROUTES}

    # ---- snapshots (the control plane asks) ------------------------------------------------
    def digest_rows(self) -> list[tuple]:
        """(id, text, user, db, route, count, total, min, max, errors, rows, first, last, buckets)
        with wall-clock times."""
        shift = time.time() - _monotonic()
        out = []
        for (user, db), tab in self.tables.items():
            for d, e in tab.items():
                if not e[COUNT]:
                    continue
                out.append((digest_id(d), d, user, db, ROUTES.get(e[ROUTE], "?"), e[COUNT], e[TOTAL], e[MIN], e[MAX],
                            e[ERRORS], e[ROWS], e[FIRST] + shift, e[LAST] + shift, tuple(e[B0:])))
        return out

    def summary(self) -> dict:
        """Counters and histograms (small: what a Prometheus scrape needs)."""
        servers: dict = {}
        for (name, user), r in self.rows.items():
            s = servers.setdefault(name, {"ok": [0, 0, 0, 0], "err": [0, 0, 0, 0], "lost": [0, 0, 0, 0],
                                          "bytes_in": 0, "bytes_out": 0, "latency": 0.0})
            for i in range(1, 4):
                s["ok"][i] += r[OK0 + i]
                s["err"][i] += r[ERR0 + i]
                s["lost"][i] += r[LOST0 + i]
            s["bytes_in"] += r[BYTES_IN]
            s["bytes_out"] += r[BYTES_OUT]
            s["latency"] += r[LATENCY]
        return {
            "servers": servers,
            "hist": {ROUTES[r]: (self.hist[r][:NB], self.hist[r][NB]) for r in ROUTES},
            "digests": self.ndigests, "evicted": self.evicted,
        }

    def pool_rows(self) -> dict[tuple, list]:
        """(server, user) -> its server row (copied)."""
        return {k: list(v) for k, v in self.rows.items()}
