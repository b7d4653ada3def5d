"""Without [cluster] coordination: the failover's decisions kept in the runtime directory.

What operators and failovers decide lives in the control plane's memory: servers set OFFLINE or
MAINTENANCE, servers kept out after a failover (ahead of the new primary) or awaiting fencing and
the position the new primary took over at, automatic failover disabled and why, the cooldown
after a failover, the last failover and switchover. A restart (an upgrade, a crash, the OOM
killer) used to drop all of it without a word: a server an operator had taken out came back into
the read pool, and a failover that had disabled itself (a vetoing pre-hook, a candidate missing
transactions) was armed again. With coordination these decisions live in etcd (coord/shared.py);
without it, the same value goes to DIR/decisions.json (0600) whenever it changes, and a start
applies it as a new leader applies its predecessor's. Which server is the primary is not taken
from the file: the servers say that themselves (read_only) when rwproxy starts.
"""

from __future__ import annotations

import json
import logging
import os
import threading

from proxy.coord import shared

log = logging.getLogger("rwproxy.failover")

FILE = "decisions.json"
# (backup_pauses: a backup's OFFLINE is its own, resumed when the backup's lock is free, not an operator's)
KEPT = ("admin", "kept_out", "demoted", "backup_pauses", "auto_failover", "disabled_reason", "cooldown_until",
        "last_failover", "last_switchover")
EVERY = 1.0  # s between looks for a change (a dict built and compared: a few µs)


def _well_typed(key: str, value) -> bool:
    """Each kept value of the type the failover state holds (a wrong one would fail later, in the
    failover thread or in status, instead of at start)."""
    if key == "auto_failover":
        return isinstance(value, bool)
    if key == "disabled_reason":
        return isinstance(value, str)
    if key == "cooldown_until":
        return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
    if key in ("last_failover", "last_switchover"):
        return value is None or isinstance(value, dict)
    if not isinstance(value, dict) or not all(isinstance(n, str) for n in value):
        return False
    if key == "admin":
        return all(v in ("", "offline", "maintenance") for v in value.values())
    if key == "demoted":
        return all(v is None or isinstance(v, str) for v in value.values())
    return all(isinstance(v, str) for v in value.values())  # kept_out, backup_pauses


class LocalDecisions:
    def __init__(self, directory: str, failover, config):
        self.path = os.path.join(directory, FILE)
        self.failover = failover
        self.auto_in_config = config.failover.auto_failover
        self.saved: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed = False

    def owner(self) -> dict:
        """Whose decisions: the runtime directory is named for the listen address, which another
        configuration (another test's, another cluster's) may use later. Servers the file names
        that the configuration no longer has are dropped one by one (restore)."""
        return {"config": os.path.realpath(self.failover.config.source)}

    def current(self) -> dict:
        now = shared.decisions(self.failover)
        return {k: now.get(k) for k in KEPT}

    def restore(self) -> list[str]:
        """Apply what the last run left (before the failover thread starts); returns the log lines."""
        try:
            with open(self.path, encoding="utf-8") as f:
                state = json.load(f)
            if not isinstance(state, dict) or not isinstance(state.get("decisions"), dict):
                raise ValueError("not what rwproxy writes there")
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            log.warning("%s cannot be read (%s): starting without the decisions of the last run", self.path, e)
            return []
        owner = self.owner()
        if {k: state.get(k) for k in owner} != owner:
            log.info("%s was written for another configuration (%s): not applied",
                     self.path, state.get("config") or "?")
            return []
        state = state["decisions"]
        servers = self.failover.monitor.topology.servers
        bad = sorted(k for k in KEPT if k in state and not _well_typed(k, state[k]))
        if bad:  # (a file edited by hand: the rest is still applied)
            log.warning("%s: %s not as rwproxy writes them: left out", self.path, ", ".join(bad))
        state = {k: state[k] for k in KEPT if k in state and k not in bad}
        for key in ("admin", "kept_out", "demoted", "backup_pauses"):
            value = state.get(key) if isinstance(state.get(key), dict) else {}
            gone = sorted(set(value) - set(servers))
            if gone:
                log.warning("decisions of the last run about %s dropped: no longer in [[backends]]", ", ".join(gone))
            state[key] = {n: v for n, v in value.items() if n in servers}
        if not self.auto_in_config:
            state["auto_failover"] = False  # the file's auto_failover = false wins over what the last run left
        lines = [f"{n} {s.upper()}" + (" (a backup's pause)" if n in state["backup_pauses"] else "")
                 for n, s in sorted(state["admin"].items()) if s]
        lines += [f"{n} kept out ({why})" for n, why in sorted(state["kept_out"].items())]
        lines += [f"{n} awaiting fencing or rejoin" for n in sorted(state["demoted"])]
        if self.auto_in_config and state.get("auto_failover") is False:
            lines.append(f"automatic failover disabled ({state.get('disabled_reason') or 'by an operator'}; "
                         "rwproxy enable-failover re-enables it)")
        shared.apply(self.failover, state, as_leader=True)
        if lines:
            log.warning("as the last run left them (%s): %s", self.path, "; ".join(lines))
        self.saved = {**owner, "decisions": self.current()}
        return lines

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rwproxy-decisions", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.save()

    def _run(self) -> None:
        while not self._stop.wait(EVERY):
            self.save()

    def save(self) -> None:
        """Write the decisions if they changed since the last write (atomically: a crash mid-write
        leaves the old file). A write that fails is said once, and tried again every second."""
        now = {**self.owner(), "decisions": self.current()}
        if now == self.saved:
            return
        tmp = self.path + ".tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(now, f, sort_keys=True)
            os.replace(tmp, self.path)
        except (OSError, TypeError, ValueError) as e:
            if not self._failed:
                log.error("cannot write %s (%s): a restart would lose what operators and failovers decided",
                          self.path, e)
            self._failed = True
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return
        if self._failed:
            log.warning("%s written again", self.path)
        self._failed = False
        self.saved = now
