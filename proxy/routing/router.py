"""Where each statement runs: (statement class, session state, topology) -> a Plan.

Decide, then act: Router.plan is a pure decision (no I/O, no change to the session) that
the session carries out, so every rule is unit-testable without sockets
(tests/test_router.py). The order of the checks is the order of precedence: operator rules,
then anything that ties the session to one connection (read-only transactions on a replica,
connection-bound functions, transactions, locks, temporary tables), then writes, then hints
and read-your-writes, then the balancer.
"""

from __future__ import annotations

import time

from proxy.cluster.gtid import reached
from proxy.cluster.progress import NO_PROOF
from proxy.config.schema import (
    BALANCE_LEAST_OUTSTANDING, ROUTE_PRIMARY, ROUTE_REJECT, ROUTE_REPLICA, RYW_GTID, RYW_SESSION,
)
from proxy.cluster.topology import UP
from proxy.protocol.constants import COM_QUERY, ER_UNKNOWN_ERROR
from proxy.routing import classify as C
from proxy.routing.balancer import Balancer


class _Writer:
    """The session's writer: the primary, or in master-master mode the master the session
    (or its transaction) was given. A unique object, so no backend name can be mistaken for it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "WRITER"


WRITER = _Writer()


class Why:
    """Why a plan sends a statement where it does (sessions table, logs, tests)."""

    RULE = "rule"
    HINT = "hint"
    READ_ONLY_TRX = "read-only transaction"
    CONN_BOUND = "connection-bound"
    WRITE = "write"
    USER_VAR = "user variable"
    NO_SPLIT = "read_write_split off"
    USER_ROUTE = "user default_route"
    RYW_WINDOW = "read-your-writes window"
    RYW_UNPROVEN = "no replica known to hold its write"
    GTID_CAUGHT_UP = "replica has its GTID"
    GTID_WAIT = "waits for its GTID"
    READ = "read"
    NO_REPLICA = "no replica"
    NO_PRIMARY = "no writable primary"  # a SET/USE runs on a replica meanwhile
    # pins (SessionState.pin) are reasons too: transaction, temporary table, ...


# Statement flags that keep a read off shared connections: anything but a routing hint.
_NO_SHARE = ~(C.F_HINT_PRIMARY | C.F_HINT_REPLICA)
_READ, _WRITE, _CONN_BOUND, _PREVIOUS = C.READ, C.WRITE, C.F_CONN_BOUND, C.F_PREVIOUS
_SESSION = C.SESSION
_AUTOCOMMIT_OFF, _AUTOCOMMIT_ON = C.F_AUTOCOMMIT_OFF, C.F_AUTOCOMMIT_ON

_RO_TRX_WRITE = (1792, "25006", "Cannot execute statement in a READ ONLY transaction")
_DATA_VERBS = frozenset(("INSERT", "UPDATE", "DELETE", "REPLACE", "LOAD"))


def refused_read_only(cls) -> bool:
    """Whether the server refuses `cls` inside START TRANSACTION READ ONLY with ERROR 1792: rows
    changed or locked for update, a sequence advanced, a temporary table created (measured on
    MariaDB 10.11; SAVEPOINT, LOCK IN SHARE MODE, GET_LOCK and SET run). The transaction runs on a
    replica, whose read_only would answer such a write 1290 instead."""
    d = cls.digest.lstrip("( ").upper()
    verb = d.split(None, 1)[0] if d else ""
    return (verb in _DATA_VERBS or d.startswith("CREATE TEMPORARY") or " FOR UPDATE" in d or "NEXTVAL(" in d
            or "NEXT VALUE FOR" in d or "SETVAL(" in d)


class Plan:
    """What the session does with one statement.

    target: a server name, or WRITER (resolved by the session: the primary, or its master).
    share: it may go on a shared connection (multiplexing; the digest must still be known to
        answer small and fast, which the shared connections decide).
    hold: it must wait for a writable primary (failover or switchover under way).
    wait_gtid: the replica must first reach the session's last GTID (MASTER_GTID_WAIT).
    replay_shared: a statement about the previous one (F_PREVIOUS: SHOW WARNINGS, FOUND_ROWS()...)
        right after one that ran on a shared connection: a read runs again on the session's own
        connection first (a write cannot; see slowpath.replay_shared).
    error: (code, sqlstate, message) to answer instead (a reject rule, no server).
    """

    __slots__ = ("target", "why", "share", "hold", "wait_gtid", "replay_shared", "error")

    def __init__(self, target, why: str, share: bool = False, hold: bool = False, wait_gtid: bool = False,
                 replay_shared: bool = False, error: tuple | None = None):
        self.target = target
        self.why = why
        self.share = share
        self.hold = hold
        self.wait_gtid = wait_gtid
        self.replay_shared = replay_shared
        self.error = error

    @property
    def to_writer(self) -> bool:
        return self.target is WRITER

    def __repr__(self) -> str:
        flags = [k for k in ("share", "hold", "wait_gtid", "replay_shared") if getattr(self, k)]
        return f"Plan({self.target!r}, {self.why!r}{', ' if flags else ''}{', '.join(flags)}" + (
            f", error={self.error!r})" if self.error else ")")


class Router:
    """One per worker; sessions ask plan() for every statement."""

    def __init__(self, config):
        r = config.routing
        self.cfg = r
        self.split = r.read_write_split
        self.primary_serves_reads = r.primary_serves_reads
        self.reads_on_primary = r.reads_on_primary_when_no_replica
        self.window = r.read_your_writes_window
        self.balancer = Balancer(r.balance or BALANCE_LEAST_OUTSTANDING)
        self.rules = tuple(r.rules)
        self.rule_hits = [0] * len(self.rules)  # statements each rule decided (admin `rules` table)
        self._topo = None  # the snapshot _pool was computed from
        self._pool: list = []
        self._plans: dict[tuple, Plan] = {}  # every distinct plan made (few: servers x reasons x flags)
        self.backoff_secs = r.replica_error_backoff
        self.backoff: dict[str, dict[str, float]] = {}  # user -> {replica -> monotonic end of its back-off}
        # cluster.progress.Progress (primary-replica): past the window, a session that wrote reads
        # only where its write is known applied; None: the window alone decides
        self.progress = None

    def back_off(self, user: str, server: str) -> bool:
        """`server` refused a connection for `user`: none of that user's new reads go there for
        replica_error_backoff seconds. True if it was not backed off already (say it once)."""
        if not self.backoff_secs:
            return False
        now = time.monotonic()
        mine = self.backoff.setdefault(user, {})
        fresh = mine.get(server, 0.0) <= now
        mine[server] = now + self.backoff_secs
        return fresh

    def _excluded(self, s) -> frozenset:
        """Replicas this statement may not use: those that failed it, and those backed off for its user."""
        mine = self.backoff.get(s.user.name)
        if not mine:
            return s.failed_servers
        now = time.monotonic()
        for server, until in list(mine.items()):
            if until <= now:
                del mine[server]
        if not mine:
            del self.backoff[s.user.name]
            return s.failed_servers
        return s.failed_servers | mine.keys()

    def plan(self, s, cls, topology, sql: str = "", autocommit: bool = True, primary_ok: bool = True,
             sharing: bool = False, after_shared: bool = False) -> Plan:
        """The plan for statement class `cls` of session state `s`.

        sql: the statement text, only needed when operator rules exist. autocommit: the session's
        autocommit as the primary last reported it. primary_ok: a writable primary exists and writes
        are not held. sharing: this worker multiplexes. after_shared: the session's previous statement
        was answered on a shared connection.

        Plans are values: equal decisions give the same (cached) Plan object, which keeps the hot
        path from building one per statement.
        """
        flags = cls.flags
        wait = False
        pin = ""
        if s.ro_trx is not None:  # inside START TRANSACTION READ ONLY on a replica
            if cls.route == _WRITE and refused_read_only(cls):
                return Plan(None, Why.READ_ONLY_TRX, error=_RO_TRX_WRITE)
            target, why = s.ro_trx, Why.READ_ONLY_TRX
        else:
            forced = None
            if self.rules:
                forced = self.check_rules(s.user.name, sql, cls.digest)
                if type(forced) is tuple:
                    return Plan(None, Why.RULE, error=forced)
            if flags & _CONN_BOUND and s.last_backend is not None:
                # FOUND_ROWS(), SHOW WARNINGS...: where the previous statement ran; LAST_INSERT_ID(),
                # CONNECTION_ID()...: the writer, whatever read ran on a replica in between
                target, why = s.last_backend if flags & _PREVIOUS else WRITER, Why.CONN_BOUND
            elif (pin := s.pin()):
                target, why = WRITER, pin
            elif forced == ROUTE_PRIMARY:
                target, why = WRITER, Why.RULE
            elif flags & C.F_HINT_PRIMARY:
                target, why = WRITER, Why.HINT
            elif forced == ROUTE_REPLICA or flags & C.F_HINT_REPLICA:
                target, why, wait = self._replica(s, topology, Why.RULE if forced else Why.HINT)
            elif cls.route != _READ and not flags & C.F_READ_ONLY_TXN:
                if (cls.route == _SESSION and not primary_ok and self.split and topology.readers
                        and not flags & _AUTOCOMMIT_OFF and (autocommit or not flags & _AUTOCOMMIT_ON)
                        and s.user.default_route != ROUTE_PRIMARY):
                    # No writable primary (down with auto_failover off, or no replica fit to promote):
                    # a SET or USE runs on a replica and is replayed elsewhere as always, so a client
                    # that sets its session up at connect can still read; writes wait for a primary.
                    # Autocommit is followed on the writer: only a SET that leaves it on (Connector/J's
                    # `set autocommit=1, sql_mode=...`) may run on a replica, which always has it on.
                    target, why, wait = self._replica(s, topology, Why.NO_PRIMARY)
                else:
                    target, why = WRITER, Why.WRITE
            elif flags & C.F_USER_VAR_READ and (s.user_vars or s.conn_state):  # (a CALL may have set them)
                target, why = WRITER, Why.USER_VAR
            elif not self.split:
                target, why = WRITER, Why.NO_SPLIT
            elif s.user.default_route == ROUTE_PRIMARY:
                target, why = WRITER, Why.USER_ROUTE
            elif s.ryw_mode == RYW_SESSION and s.last_write and time.monotonic() - s.last_write < self.window:
                target, why = WRITER, Why.RYW_WINDOW
            elif s.ryw_mode == RYW_GTID and s.last_gtid:
                target, why, wait = self._gtid_replica(s, topology)
            else:
                target, why, wait = self._replica(s, topology, Why.READ)
                if (s.last_write and self.progress is not None and s.ryw_mode == RYW_SESSION
                        and target is not WRITER and target is not None):
                    target, why = self._holding_write(s, topology, target)
            if target is None:  # (no replica, and reads may not go to the primary)
                return Plan(None, why, error=wait)
        to_writer = target is WRITER
        route = cls.route
        # Autocommit writes share too (their digests must also be plain DML: Profiles decides),
        # except in gtid read-your-writes mode, which learns each write's GTID on its own connection.
        share = (sharing and not flags & _NO_SHARE and autocommit and not wait and not pin and not s.user_vars
                 and s.ro_trx is None and not s.pending_write and (primary_ok or not to_writer)
                 and (route == _READ or (route == _WRITE and to_writer and s.ryw_mode != RYW_GTID and not s.next_trx)))
        key = (target, why, share, to_writer and not primary_ok, wait, after_shared and bool(flags & _PREVIOUS))
        p = self._plans.get(key)
        if p is None:
            p = self._plans[key] = Plan(*key)
        return p

    def check_rules(self, user: str, sql: str, digest: str):
        """Operator rules: ROUTE_PRIMARY, ROUTE_REPLICA, an error (code, sqlstate, message) for a
        reject rule, or None when no rule matches."""
        for i, rule in enumerate(self.rules):
            if not rule.applies_to(user):
                continue
            if rule.regex is not None:
                if not rule.regex.search(sql):
                    continue
            elif rule.digest != digest:
                continue
            self.rule_hits[i] += 1
            if rule.route == ROUTE_REJECT:
                return (rule.error_code, "HY000", rule.error_message)
            return rule.route
        return None

    def _read_pool(self, topology) -> list:
        """Servers that may take reads, computed once per topology snapshot."""
        if topology is not self._topo:
            pool = [r for r in topology.readers if r.weight > 0]
            if self.primary_serves_reads:
                p = topology.primary
                if p is not None and p.state == UP:
                    pool.append(p)
            self._topo, self._pool = topology, pool
        return self._pool

    def _replica(self, s, topology, why: str):
        """A replica from the read pool; the writer (or an error) when there is none."""
        pool = self._pool if topology is self._topo else self._read_pool(topology)
        pick = self.balancer.pick(pool, self._excluded(s) if self.backoff else s.failed_servers)
        if pick is not None:
            return pick.name, why, False
        if self.reads_on_primary:
            return WRITER, Why.NO_REPLICA, False
        return None, Why.NO_REPLICA, (ER_UNKNOWN_ERROR[0], "HY000",
                                      "no replica is available for reads and reads_on_primary_when_no_replica = false")

    def _holding_write(self, s, topology, pick: str):
        """(Session mode, past the window) `pick` if the monitor knows it holds the session's last
        write, else another replica that does, else the writer: a window is only a guess, and a
        replica whose lag jumps past max_replica_lag serves reads until its next check."""
        p = self.progress
        w = s.last_write
        if p.applied(pick) >= w:
            return pick, Why.READ
        held = [r for r in self._read_pool(topology) if r.name != pick and p.applied(r.name) >= w]
        other = self.balancer.pick(held, self._excluded(s)) if held else None
        return (other.name, Why.READ) if other is not None else (WRITER, Why.RYW_UNPROVEN)

    def _gtid_replica(self, s, topology):
        """A replica known to have applied the session's last write, else one to wait on. Known: by
        its position in the topology (published about once a second), or by the monitor's proof
        (progress.py, as soon as a check ends), which saves the wait's round trip."""
        excluded = self._excluded(s)
        readers = [r for r in topology.readers if r.name not in excluded]
        p, w = self.progress, s.last_write
        caught_up = [r for r in readers if gtid_covers(r.gtid_slave_pos or r.gtid_current_pos, s.last_gtid)
                     or (p is not None and w <= p.applied(r.name) < NO_PROOF)]
        pick = self.balancer.pick(caught_up) if caught_up else None
        if pick is not None:
            return pick.name, Why.GTID_CAUGHT_UP, False
        pick = self.balancer.pick(readers)
        if pick is None:
            return WRITER, Why.NO_REPLICA, False
        return pick.name, Why.GTID_WAIT, True  # the session waits for the GTID there before the read


def rule_text(pkt: bytes) -> str:
    """The text operator rules match: a COM_QUERY's statement ("" for other commands)."""
    return bytes(pkt[5:]).decode("utf-8", "replace") if pkt[4] == COM_QUERY else ""


def gtid_covers(position: str, gtid: str) -> bool:
    """True if a server at `position` has applied every transaction in `gtid` (an unknown
    position covers nothing)."""
    return bool(position) and reached(position, gtid)


__all__ = ["Router", "Plan", "Why", "WRITER", "gtid_covers", "rule_text"]
