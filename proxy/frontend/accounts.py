"""Accounts that exist only on the servers ([auth] server_accounts, off by default).

Applications and test suites create accounts at run time; with this on they log in through
rwproxy without a [[users]] entry, as pgcat's auth_query allows (ProxySQL has nothing like it).
The monitor user reads the account's stored mysql_native_password hash from the primary
(`mysql.user`: SHA1(SHA1(password))); the client's answer to the greeting's scramble, with that
hash, gives SHA1(password) (auth.native_stage1), which is all a mysql_native_password login needs:
rwproxy logs in to the backends on the client's behalf without ever knowing the clear-text
password. Only mysql_native_password accounts are covered (caching_sha2_password, ed25519 and
mysql_clear_password need what a hash does not give); others are refused like an unknown user.

Looked-up accounts are kept for `ttl` seconds; a login that does not match its cached hash looks
the account up again once (its password may have changed); a name the primary does not know is
remembered as unknown for a few seconds, so that a client guessing names cannot make rwproxy query
the primary at its own rate.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

from proxy.backend.connection import BackendError
from proxy.backend.opening import connect
from proxy.logs import clean
from proxy.protocol import auth
from proxy.protocol.constants import COM_QUERY, DEFAULT_CHARSET
from proxy.protocol.packets import command, text_rows
from proxy.protocol.scan import RESULT

log = logging.getLogger("rwproxy.login")

UNKNOWN_TTL = 5.0  # s a name the primary does not know is not asked about again


@dataclass(frozen=True, slots=True)
class Account:
    name: str
    stored: bytes  # SHA1(SHA1(password)); b"" for an account without a password


def _quote(value: str) -> bytes:
    """A SQL string literal for the lookup (the name a client sent, never trusted)."""
    return b"'" + value.encode("utf-8", "replace").replace(b"\\", b"\\\\").replace(b"'", b"''") + b"'"


def _host_rank(pattern: str, host: str) -> int | None:
    """How well account host `pattern` matches client `host` (lower is better; None: no match):
    an exact host first, then patterns by fewer wildcards, '%' last, as MariaDB sorts them."""
    if pattern == host or (pattern == "localhost" and host in ("127.0.0.1", "::1")):
        return 0
    if "%" in pattern or "_" in pattern:
        rx = "^" + "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern) + "$"
        if re.match(rx, host):
            return 1 + pattern.count("%") + pattern.count("_") + (100 if pattern == "%" else 0)
    return None


class ServerAccounts:
    """The accounts one worker looked up on the primary, and the lookups themselves."""

    def __init__(self, worker, ttl: float):
        self.worker = worker
        self.ttl = ttl
        self._known: dict[tuple[str, str], tuple[Account | None, float]] = {}  # (user, host) -> (account, expires)

    async def lookup(self, user: str, host: str, fresh: bool = False) -> Account | None:
        """The native-password account `user` the client at `host` would log in as, or None."""
        key = (user, host)
        hit = self._known.get(key)
        now = time.monotonic()
        if hit is not None and hit[1] > now and not (fresh and hit[0] is not None):
            return hit[0]
        try:
            rows = await self._query(user)
        except (BackendError, ConnectionError, OSError, TimeoutError) as e:
            log.warning("server accounts: cannot look up user %s on the primary: %s", clean(user),
                        clean(getattr(e, "message", None) or str(e), 256))
            return None
        best = None
        for host_pattern, plugin, stored in rows:
            rank = _host_rank((host_pattern or b"").decode("utf-8", "replace"), host)
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, (plugin or b"").decode(), (stored or b"").decode("ascii", "replace"))
        account = None
        if best is not None:
            _, plugin, stored = best
            if plugin in ("", auth.NATIVE) and (stored == "" or (len(stored) == 41 and stored.startswith("*"))):
                account = Account(user, bytes.fromhex(stored[1:]) if stored else b"")
            else:
                log.info("server accounts: %s@%s uses %s, which rwproxy cannot log in with on its behalf "
                         "(mysql_native_password only); add it to [[users]]", clean(user), host, clean(plugin))
        self._known[key] = (account, now + (self.ttl if account is not None else UNKNOWN_TTL))
        if len(self._known) > 10000:  # bounded whatever names clients try
            self._known = {k: v for k, v in self._known.items() if v[1] > now}
        return account

    async def _query(self, user: str) -> list:
        """(Host, plugin, authentication_string) rows for `user`, read on the primary as the monitor user."""
        w = self.worker
        mon_user, mon_password = w.config.monitor_credentials()
        server = w.servers[w.primary_name]
        timeout = w.config.pool.connect_timeout
        conn = await connect(server, None, 0, mon_user, mon_password, None, DEFAULT_CHARSET, timeout,
                             w.backend_tls.get(server.name))
        try:
            sql = b"SELECT Host, plugin, authentication_string FROM mysql.user WHERE User = " + _quote(user)
            resp = await conn.command(command(COM_QUERY, sql), RESULT, timeout=timeout + 5)
        finally:
            conn.close()
        if resp[4:5] == b"\xff":
            raise BackendError(1142, "42000", bytes(resp[13:200]).decode("utf-8", "replace")
                               + " (the monitor user needs SELECT on mysql.user)")
        return text_rows(resp) or []


__all__ = ["Account", "ServerAccounts"]
