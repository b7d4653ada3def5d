"""Where each statement runs: (statement class, session state, topology) -> server.

Pure decisions, no I/O, so every rule is unit-testable. The order of the
checks is the order of precedence: operator rules, then anything that ties
the session to one connection (transactions, locks, temporary tables,
connection-bound functions), then writes, then hints and read-your-writes,
then the balancer.
"""

from __future__ import annotations

import itertools
import time

from proxy.routing import classify as C
from proxy.cluster.topology import REPLICA

PRIMARY = "primary"  # sentinel target: the session's writer


class Reject(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class NoServer(Exception):
    """No server may take this statement now (reported to the client as an error)."""


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
        if policy == "round-robin":
            # weighted: a server appears `weight` times in the cycle
            wheel = [s for s in cands for _ in range(min(s.weight, 100))]
            return wheel[next(self._rr) % len(wheel)] if wheel else None
        if policy == "lowest-lag":
            live = [s for s in cands if s.weight > 0]
            return min(live, key=lambda s: (s.lag_ms if s.lag_ms is not None else 1e12, self.outstanding.get(s.name, 0)), default=None)
        out = self.outstanding
        # least (outstanding + 1) / weight; ties broken round-robin so idle servers share reads
        start = next(self._rr)
        best, best_score = None, 1e300
        for i in range(n):
            s = cands[(start + i) % n]
            w = s.weight
            if w > 0:
                score = (out.get(s.name, 0) + 1) / w
                if score < best_score:
                    best, best_score = s, score
        return best


class Router:
    """One per worker; sessions call route() for every statement."""

    def __init__(self, config):
        r = config.routing
        self.cfg = r
        self.split = r.read_write_split
        self.primary_serves_reads = r.primary_serves_reads
        self.reads_on_primary = r.reads_on_primary_when_no_replica
        self.window = r.read_your_writes_window
        self.balancer = Balancer(r.balance)
        self.rules = tuple(r.rules)
        self._topo = None  # the snapshot _pool was computed from
        self._pool: list = []

    def _read_pool(self, topology) -> list:
        """Servers that may take reads, computed once per topology snapshot."""
        if topology is not self._topo:
            pool = [r for r in topology.readers if r.weight > 0]
            if self.primary_serves_reads:
                p = topology.primary
                if p is not None and p.state == "up":
                    pool.append(p)
            self._topo, self._pool = topology, pool
        return self._pool

    def check_rules(self, user: str, sql: str, digest: str):
        """Operator rules: returns 'primary', 'replica' or None; raises Reject."""
        for rule in self.rules:
            if rule.users and user not in rule.users:
                continue
            if rule.regex is not None:
                if not rule.regex.search(sql):
                    continue
            elif rule.digest != digest:
                continue
            if rule.route == "reject":
                raise Reject(rule.error_code, rule.error_message)
            return rule.route
        return None

    def route(self, s, cls, topology, sql: str = "") -> str:
        """Return the name of the server for this statement, or PRIMARY."""
        flags = cls.flags
        if s.ro_trx is not None:  # inside START TRANSACTION READ ONLY on a replica
            return s.ro_trx
        forced = self.check_rules(s.user.name, sql, cls.digest) if self.rules else None
        if flags & C.F_CONN_BOUND and s.last_backend is not None:
            return s.last_backend
        if s.pinned():
            return PRIMARY
        if forced == "primary" or flags & C.F_HINT_PRIMARY:
            return PRIMARY
        if cls.route != C.READ and not (flags & C.F_READ_ONLY_TXN):
            if forced == "replica" or flags & C.F_HINT_REPLICA:
                return self._replica(s, topology)
            return PRIMARY
        if forced == "replica" or flags & C.F_HINT_REPLICA:
            return self._replica(s, topology)
        if flags & C.F_USER_VAR_READ and s.user_vars:
            return PRIMARY
        if not self.split or s.user.default_route == "primary":
            return PRIMARY
        mode = s.ryw_mode
        if mode == "session" and s.last_write and time.monotonic() - s.last_write < self.window:
            return PRIMARY
        if mode == "gtid" and s.last_gtid:
            return self._gtid_replica(s, topology)
        return self._replica(s, topology)

    def _replica(self, s, topology) -> str:
        """A replica from the read pool; the primary (or an error) when there is none."""
        pick = self.balancer.pick(self._read_pool(topology), s.failed_servers)
        if pick is not None:
            return pick.name
        if self.reads_on_primary:
            return PRIMARY
        raise NoServer("no replica is available for reads and reads_on_primary_when_no_replica = false")

    def _gtid_replica(self, s, topology) -> str:
        """A replica known to have applied the session's last write, else one to wait on."""
        readers = [r for r in topology.readers if r.name not in s.failed_servers]
        caught_up = [r for r in readers if gtid_covers(r.gtid_slave_pos or r.gtid_current_pos, s.last_gtid)]
        if caught_up:
            pick = self.balancer.pick(caught_up)
            return pick.name
        pick = self.balancer.pick(readers)
        if pick is None:
            return PRIMARY
        s.gtid_wait = True  # the session waits for the GTID on this replica before the read
        return pick.name


def parse_gtids(pos: str) -> dict[int, int]:
    """'0-1-100,1-2-7' -> {domain: seq} (server id is irrelevant for ordering within a domain)."""
    out = {}
    for part in pos.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            d, _, seq = part.split("-")
            out[int(d)] = max(out.get(int(d), 0), int(seq))
        except ValueError:
            continue
    return out


def gtid_covers(position: str, gtid: str) -> bool:
    """True if a server at `position` has applied every transaction in `gtid`."""
    if not position:
        return False
    have = parse_gtids(position)
    for d, seq in parse_gtids(gtid).items():
        if have.get(d, -1) < seq:
            return False
    return True


__all__ = ["Router", "Balancer", "Reject", "NoServer", "PRIMARY", "REPLICA", "gtid_covers"]
