"""Which replica takes a read: weighted least-outstanding (default), round-robin or lowest-lag.

One Balancer per worker; it also counts the statements in flight and routed per server (the
`rwproxy status` ROUTED column comes from here).
"""

from __future__ import annotations

import itertools

from proxy.config.schema import BALANCE_LOWEST_LAG, BALANCE_ROUND_ROBIN


class Balancer:
    """Picks a replica from the read pool: weighted least-outstanding (default), round-robin, lowest-lag."""

    def __init__(self, policy: str):
        self.policy = policy
        self.outstanding: dict[str, int] = {}  # statements in flight per server
        self.routed: dict[str, int] = {}  # statements sent per server, ever
        self._rr = itertools.count()

    def started(self, name: str) -> None:
        self.outstanding[name] = self.outstanding.get(name, 0) + 1
        self.routed[name] = self.routed.get(name, 0) + 1

    def finished(self, name: str) -> None:
        n = self.outstanding.get(name, 0)
        self.outstanding[name] = n - 1 if n > 0 else 0

    def pick(self, cands: list, exclude: frozenset = frozenset()):
        if exclude:
            cands = [s for s in cands if s.name not in exclude]
        n = len(cands)
        if n < 2:
            return cands[0] if n and cands[0].weight > 0 else None
        policy = self.policy
        if policy == BALANCE_ROUND_ROBIN:
            # weighted: a server appears `weight` times in the cycle
            wheel = [s for s in cands for _ in range(min(s.weight, 100))]
            return wheel[next(self._rr) % len(wheel)] if wheel else None
        if policy == BALANCE_LOWEST_LAG:
            live = [s for s in cands if s.weight > 0]
            return min(live, key=lambda s: (s.lag_ms if s.lag_ms is not None else 1e12, self.outstanding.get(s.name, 0)), default=None)
        out = self.outstanding
        # least (outstanding + 1) / weight; ties broken round-robin so idle servers share reads
        start = next(self._rr)
        if n == 2:  # (two replicas, the common case, without the loop: ~40% of this method's cost)
            a, b = cands if start & 1 == 0 else (cands[1], cands[0])
            wa, wb = a.weight, b.weight
            if wa <= 0 or wb <= 0:
                return a if wa > 0 else b if wb > 0 else None
            return b if (out.get(b.name, 0) + 1) / wb < (out.get(a.name, 0) + 1) / wa else a
        best, best_score = None, 1e300
        for i in range(n):
            s = cands[(start + i) % n]
            w = s.weight
            if w > 0:
                score = (out.get(s.name, 0) + 1) / w
                if score < best_score:
                    best, best_score = s, score
        return best
