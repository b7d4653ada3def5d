"""The admin port's commands: what an operator can change, in words a person reads.

Parsed here into values (tested without a server), carried out by the control plane
(runtime/controlplane.py), answered as a small result set saying what happened.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = r"""(?:'((?:[^'\\]|\\.|'')*)'|"((?:[^"\\]|\\.|"")*)"|`((?:[^`]|``)*)`|([A-Za-z0-9_.:\[\]-]+))"""
_COMMENT = re.compile(r"/\*.*?\*/|(?:--\s|#)[^\n]*", re.DOTALL)

HELP_ROWS = [
    ("SELECT ... FROM servers | digests | pools | sessions | rules | users | config | events | status",
     "the tables (SQL: WHERE, ORDER BY, GROUP BY, LIMIT, joins)"),
    ("SWITCHOVER TO 'name'", "planned switchover to that replica (admin role)"),
    ("ENABLE FAILOVER", "re-enable automatic failover after a failed one disabled it"),
    ("SET SERVER 'name' OFFLINE", "drain: no new statements; running ones and read-only transactions finish"),
    ("SET SERVER 'name' MAINTENANCE", "out of every pool at once (its connections are closed)"),
    ("SET SERVER 'name' ONLINE", "back to what its health checks say"),
    ("REJOIN SERVER 'name'", "retry fencing/rejoining a server failover kept out"),
    ("RELOAD CONFIG", "re-read the config file and apply what changed"),
    ("KILL SESSION id  |  KILL [QUERY] id", "end a client session (or only its statement)"),
    ("RESET STATS", "clear the digests and rule hit counts (Prometheus counters keep counting)"),
    ("SHOW COMMANDS  (or HELP, outside the mariadb CLI)", "this list"),
]

TITLES = {"switchover": "SWITCHOVER", "enable-failover": "ENABLE FAILOVER", "server-state": "SET SERVER",
          "rejoin": "REJOIN SERVER", "reload": "RELOAD CONFIG", "kill": "KILL", "reset-stats": "RESET STATS",
          "help": "SHOW COMMANDS"}


@dataclass(frozen=True)
class Command:
    verb: str  # switchover, enable-failover, server-state, rejoin, reload, kill, reset-stats, help
    target: str = ""  # a server name
    state: str = ""  # offline, online, maintenance
    session: int = 0
    query_only: bool = False


def _name(m: re.Match, first: int) -> str:
    for i, unq in ((first, lambda s: s.replace("''", "'").replace("\\'", "'")),
                   (first + 1, lambda s: s.replace('""', '"').replace('\\"', '"')),
                   (first + 2, lambda s: s.replace("``", "`")), (first + 3, lambda s: s)):
        if m.group(i) is not None:
            return unq(m.group(i))
    return ""


_PATTERNS = [
    (re.compile(rf"SWITCHOVER\s+TO\s+{_NAME}", re.I), lambda m: Command("switchover", target=_name(m, 1))),
    (re.compile(r"ENABLE\s+(?:AUTOMATIC\s+|AUTO\s+)?FAILOVER", re.I), lambda m: Command("enable-failover")),
    (re.compile(rf"SET\s+SERVER\s+{_NAME}\s+(OFFLINE|ONLINE|MAINTENANCE)", re.I),
     lambda m: Command("server-state", target=_name(m, 1), state=m.group(5).lower())),
    (re.compile(rf"REJOIN\s+(?:SERVER\s+)?{_NAME}", re.I), lambda m: Command("rejoin", target=_name(m, 1))),
    (re.compile(r"RELOAD\s+CONFIG(?:URATION)?", re.I), lambda m: Command("reload")),
    (re.compile(r"KILL\s+SESSION\s+(\d{1,19})", re.I), lambda m: Command("kill", session=int(m.group(1)))),
    (re.compile(r"KILL\s+(?:(?:HARD|SOFT)\s+)?(?:(CONNECTION|QUERY)\s+)?(\d{1,19})", re.I),
     lambda m: Command("kill", session=int(m.group(2)), query_only=(m.group(1) or "").upper() == "QUERY")),
    (re.compile(r"RESET\s+STATS", re.I), lambda m: Command("reset-stats")),
    (re.compile(r"HELP|SHOW\s+COMMANDS", re.I), lambda m: Command("help")),
]


def parse(sql: str) -> Command | None:
    """The admin command `sql` is, or None (then it is SQL for the tables)."""
    text = _COMMENT.sub(" ", sql).strip().rstrip(";").strip()
    for rx, make in _PATTERNS:
        m = rx.fullmatch(text)
        if m:
            return make(m)
    return None


def is_command_word(sql: str) -> bool:
    """Starts like a command but did not parse: answer with the command's syntax, not SQL's."""
    head = _COMMENT.sub(" ", sql).strip().split(None, 1)
    return bool(head) and head[0].upper() in ("SWITCHOVER", "ENABLE", "REJOIN", "RELOAD", "KILL", "RESET") or (
        len(head) == 2 and head[0].upper() == "SET" and head[1].upper().startswith("SERVER"))
